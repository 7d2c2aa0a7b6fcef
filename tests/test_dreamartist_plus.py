"""DreamArtist++ (method dreamartist, trainable lora): the words and a LoRA per branch of the fusion, each
branch's adapters reached by its own prompts' gradient; training resumes bit-identically; the words export as
embeddings and each branch's adapters as a LoRA file that diffusers' `load_lora_weights` loads, with the
same text encoder and UNet as `sample --lora` merges."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from conftest import jitted, tiny_config
from nsync_jax import lora, tokens
from nsync_jax.cli import main
from nsync_jax.errors import UserError
from nsync_jax.pipeline import encode_text, load_pipeline
from nsync_jax.sampling import SampleSettings, generate
from nsync_jax.schedulers import NoiseSchedule
from nsync_jax.train import methods, trainables, trainer
from nsync_jax.train.config import check_config
from nsync_jax.train.methods import dreamartist
from nsync_jax.train.step import StepSpec
from test_trainable import rel_error, torch_text_and_unet, unet_inputs

TOKEN = "<tiny-style>"
PROMPT = f"a cat in the style of {TOKEN}"


def plus_config(model, data, **overrides):
    """DreamArtist++ on the tiny model: 2 positive and 2 negative vectors, adapters on the UNet's attention with
    ranks 1/8 of each layer's width (1 and 2 on the tiny UNet) and on the text encoder's attention and MLPs at
    rank 1, learning rates large
    enough to move the adapters in a few steps, the loss min-SNR weighted as the released config."""
    settings = dict(method="dreamartist", trainable="lora", data__negatives="", dreamartist__num_negative_vectors=2,
                    lora__relative_rank=0.125, lora__alpha=1.0, lora__text_encoder=True, lora__text_encoder_rank=1,
                    lora__text_encoder_targets=("q_proj", "v_proj", "mlp.fc1", "mlp.fc2"),
                    dreamartist__lora_learning_rate=0.05, dreamartist__neg_lora_learning_rate=0.02,
                    dreamartist__text_encoder_lora_learning_rate=0.01, dreamartist__min_snr_gamma=2.0, train__steps=4)
    return tiny_config(model, data, **{**settings, **overrides})


@pytest.fixture(scope="module")
def runs(sd1_dir, style_dir, tmp_path_factory):
    """Four steps straight (drawing a preview grid), and two then resumed to four: the root of the two workdirs
    and what each trained."""
    root = tmp_path_factory.mktemp("dreamartist_plus")
    config = plus_config(sd1_dir, style_dir, train__sample_every_steps=4, sample__steps=2, sample__count=1)
    straight = trainer.train(config, root / "straight", progress=False)  # with a preview grid at the end
    config.train.sample_every_steps = 0
    config.train.steps = 2
    trainer.train(config, root / "resumed", progress=False)
    config.train.steps = 4
    resumed = trainer.train(config, root / "resumed", progress=False)
    return root, straight, resumed


# Three training runs (about 3 minutes on 2 CPU cores) and four diffusers pipelines: run with `-m slow`.
@pytest.mark.slow
def test_trains_the_words_and_each_branchs_adapters_and_resumes_bit_identically(runs):
    root, straight, resumed = runs
    trained = straight.trained
    assert trained.keys() == {"rows", "negative", "positive"} and trained["rows"].shape == (4, 32)
    for branch in ("negative", "positive"):
        assert trained[branch].keys() == {"unet", "text_encoder"}
    np.testing.assert_array_equal(trained["rows"], resumed.trained["rows"])
    for branch, component in [(b, c) for b in ("negative", "positive") for c in ("unet", "text_encoder")]:
        ours, again = trained[branch][component], resumed.trained[branch][component]
        assert all(np.array_equal(ours[path], again[path]) for path in ours)
        ups = [path for path in ours if path.endswith(".lora_up")]
        assert all(ours[path].any() for path in ups)  # moved from zero by the training
    # Each layer's rank is 1/8 of its output width.
    ranks = {path: down.shape[1] for path, down in trained["positive"]["unet"].items() if path.endswith("_down")}
    widths = {path: trained["positive"]["unet"][path[:-4] + "up"].shape[1] for path in ranks}
    assert all(ranks[path] == max(round(0.125 * widths[path]), 1) for path in ranks) and len(set(ranks.values())) > 1
    text_encoder = trained["positive"]["text_encoder"]
    assert {path.split(".")[-2] for path in text_encoder} == {"q_proj", "v_proj", "fc1", "fc2"}
    assert all(down.shape[1] == 1 for path, down in text_encoder.items() if path.endswith("_down"))
    # Two sets of adapters: different starts, different updates.
    path = next(p for p in trained["positive"]["unet"] if p.endswith(".lora_down"))
    assert not np.allclose(trained["positive"]["unet"][path], trained["negative"]["unet"][path])
    assert [f.name for f in straight.files] == ["learned_embeds.safetensors", "learned_embeds-neg.safetensors",
                                                "lora-neg.safetensors", "lora.safetensors"]
    assert "positive_lora_grad_norm" in (root / "straight" / "metrics.jsonl").read_text()
    assert (root / "straight" / "samples" / "step_000004.png").is_file()


@pytest.mark.slow  # compiles the UNet's backward pass for both branches (about a minute on 2 CPU cores)
def test_each_branchs_adapters_take_the_gradient_of_its_own_prompts(sd1_dir, style_dir):
    """With both words and both adapter sets equal, the branches differ only by their place in the fusion
    eps_n + gamma (eps_p - eps_n): the negative adapters' gradient is (1 - gamma) / gamma times the positive's
    (gamma = 3). Swapped branches would give the inverse factor."""
    config = plus_config(sd1_dir, style_dir)
    method, trainable = methods.get("dreamartist"), trainables.get("lora").configured(config)
    assert isinstance(trainable, trainables.BranchedLoRA)
    pipe = load_pipeline(sd1_dir)
    graphdefs, frozen, trained = trainable.split(pipe, config, method, method.frozen_modules(config))
    data = method.prepare(pipe, method.read_data(config), config, workdir=None, progress=False)
    spec = StepSpec(graphdefs, NoiseSchedule.from_config(pipe.scheduler_config), pipe.vae.config.scaling_factor,
                    jnp.float32, 0, trainable=trainable)
    rng = np.random.default_rng(0)
    word = rng.standard_normal((2, 32)).astype(np.float32)
    # Non-zero up matrices, so that the down matrices and the text encoder's output carry gradient too.
    adapters = jax.tree.map(lambda x: 0.1 * rng.standard_normal(x.shape).astype(np.float32), trained["positive"])
    same = {"rows": np.concatenate([word, word]), "negative": adapters, "positive": adapters}
    batch = {k: jnp.asarray(v) for k, v in data.batch(0).items()}
    grads, _, metrics = jax.jit(method.gradients(spec, config))(same, frozen, batch, jax.random.key(0))
    assert metrics["negative_lora_grad_norm"] > 0 and metrics["positive_lora_grad_norm"] > 0
    scale = max(np.abs(g).max() for g in jax.tree.leaves(grads["positive"]))
    jax.tree.map(lambda neg, pos: np.testing.assert_allclose(neg, (1 - 3.0) / 3.0 * pos, rtol=1e-4,
                                                             atol=1e-4 * scale), grads["negative"], grads["positive"])
    np.testing.assert_allclose(grads["rows"][2:], (1 - 3.0) / 3.0 * grads["rows"][:2], rtol=1e-4,
                               atol=1e-4 * np.abs(grads["rows"]).max())


@pytest.mark.slow
def test_exports_words_and_both_loras_that_diffusers_loads(runs, sd1_dir, tmp_path, capsys):
    from diffusers import StableDiffusionPipeline

    root, _, _ = runs
    workdir = root / "resumed"
    for fmt, name in (("a1111", "style.pt"), ("diffusers-lora", "style_lora.safetensors"),
                      ("a1111-lora", "kohya.safetensors")):
        assert main(["export", "--workdir", str(workdir), "--format", fmt, "--output", str(tmp_path / name)]) == 0, \
            capsys.readouterr().err
    out = capsys.readouterr().out
    assert "style-neg.pt (<tiny-style>-neg, 2 vectors)" in out
    assert "style_lora-neg.safetensors (negative branch)" in out and "style_lora.safetensors (positive branch)" in out
    assert main(["export", "--workdir", str(workdir), "--format", "diffusers-pipeline", "--output",
                 str(tmp_path / "pipe")]) == 2
    for name in ("style_lora.safetensors", "style_lora-neg.safetensors"):  # what training wrote, as exported
        exported, written = load_file(tmp_path / name), load_file(workdir / name.replace("style_", ""))
        assert exported.keys() == written.keys()
        assert all(np.array_equal(exported[k], written[k]) for k in exported)
    assert lora.read_lora_metadata(tmp_path / "style_lora-neg.safetensors")["lora_branch"] == "negative"

    inputs = unet_inputs(1)
    base = StableDiffusionPipeline.from_pretrained(sd1_dir, safety_checker=None)
    _, base_text, base_unet = torch_text_and_unet(base, "a cat", inputs)
    # kohya's layout holds the same weight deltas. (diffusers 0.42 drops the text encoder's attention adapters
    # of a kohya file that also adapts its MLPs, so only the diffusers-layout files go through diffusers.)
    kohya, diffusers_layout = (lora.read_lora_file(tmp_path / f"{name}-neg.safetensors") for name in
                               ("kohya", "style_lora"))
    for component in ("unet", "text_encoder"):
        assert {k.replace(".", "_") for k in diffusers_layout[component]} == set(kohya[component])
        for module, delta in diffusers_layout[component].items():
            np.testing.assert_allclose(kohya[component][module.replace(".", "_")], delta, rtol=1e-6, atol=1e-9)
    for name in ("style_lora.safetensors", "style_lora-neg.safetensors"):
        reference = StableDiffusionPipeline.from_pretrained(sd1_dir, safety_checker=None)
        reference.load_lora_weights(str(tmp_path / name))
        _, torch_text, torch_unet = torch_text_and_unet(reference, "a cat", inputs)
        assert rel_error(torch_text, base_text) > 1e-4 and rel_error(torch_unet, base_unet) > 1e-4
        pipe = load_pipeline(sd1_dir)
        lora.merge_lora(pipe.modules(), lora.read_lora_file(tmp_path / name))  # what `sample --lora` does
        ids = tokens.tokenize(pipe.tokenizer, ["a cat"])
        text = np.asarray(encode_text(pipe.text_encoder, jnp.asarray(pipe.extra_token_rows), jnp.asarray(ids)))
        assert rel_error(text, torch_text) <= 1e-4, name
        assert rel_error(np.asarray(jitted(pipe.unet)(*inputs)), torch_unet) <= 1e-4, name


def test_each_part_steps_with_its_own_learning_rate(sd1_dir, style_dir):
    """Adam's first update is the learning rate times the gradient's sign (parameters at zero: no decay): the
    words at train.learning_rate (the negative's times neg_lr_weight), each branch's UNet and text encoder
    adapters at theirs."""
    config = plus_config(sd1_dir, style_dir, dreamartist__neg_lr_weight=0.5, train__scale_lr=False)
    tx = trainer.make_optimizer(config, methods.get("dreamartist"))
    adapters = {"unet": {"mid.to_k.lora_down": np.zeros((8, 2), np.float32)},
                "text_encoder": {"layers.0.q_proj.lora_down": np.zeros((4, 2), np.float32)}}
    params = {"rows": np.zeros((4, 32), np.float32), "negative": adapters, "positive": adapters}
    # Small gradients: under every clipping norm, so that each update is the bare learning rate.
    grads = jax.tree.map(lambda x: np.full(x.shape, 1e-3, np.float32), params)
    updates, _ = tx.update(grads, tx.init(params), params)
    expected = {"rows": np.repeat([[0.01], [0.005]], 2, axis=0) * np.ones((1, 32)),
                **{branch: {"unet": {"mid.to_k.lora_down": np.full((8, 2), unet_rate)},
                            "text_encoder": {"layers.0.q_proj.lora_down": np.full((4, 2), 0.01)}}
                   for branch, unet_rate in (("positive", 0.05), ("negative", 0.02))}}
    jax.tree.map(lambda update, rate: np.testing.assert_allclose(-update, rate, rtol=1e-4), updates, expected)


@pytest.mark.slow
def test_samples_with_the_negative_lora_on_the_negative_branch_only(runs, sd1_dir, tmp_path):
    """As HCP-Diffusion's guide samples DreamArtist++: the positive word and LoRA on the positive branch, the
    negative LoRA alone on the negative one. With the positive LoRA on both branches the image is the one of
    plain --lora (each branch run on its own: float rounding apart)."""
    from PIL import Image

    workdir = runs[0] / "resumed"

    def image(name, *flags):
        assert main(["sample", "--model", str(sd1_dir), "--embeddings", str(workdir / "learned_embeds.safetensors"),
                     "--lora", str(workdir / "lora.safetensors"), *flags, "--prompt", PROMPT, "--steps", "4",
                     "--height", "32", "--width", "32", "--output", str(tmp_path / name)]) == 0
        return np.asarray(Image.open(tmp_path / name / "000000.png").convert("RGB")).astype(np.int16)

    plain = image("plain")
    same = image("same", "--negative-lora", str(workdir / "lora.safetensors"))
    branched = image("branched", "--negative-lora", str(workdir / "lora-neg.safetensors"))
    assert np.abs(same - plain).max() <= 2
    assert np.abs(branched - plain).max() > np.abs(same - plain).max()


def test_min_snr_weighting_is_hcps(monkeypatch, sd1_dir):
    """dreamartist.min_snr_gamma weights each example's squared error of the fused prediction by
    min(gamma / SNR(t), 1), as HCP-Diffusion's MinSNRLoss (the UNet pass replaced by fixed predictions)."""
    schedule = NoiseSchedule.from_config(json.loads((sd1_dir / "scheduler" / "scheduler_config.json").read_text()))
    rng = np.random.default_rng(0)
    prediction, target = (jnp.asarray(rng.standard_normal((2, 3, 4, 4, 4)), jnp.float32) for _ in range(2))
    t = jnp.asarray([[10, 500, 990]] * 2)
    monkeypatch.setattr(dreamartist, "denoise", lambda *args, **kwargs: (prediction, target, target, t))
    spec = StepSpec(None, schedule, 1.0, jnp.float32, 0)
    batch = {"ids": np.zeros((2, 3, 4), np.int32), "mean": np.zeros((1, 3, 4, 4, 4), np.float32),
             "logvar": np.zeros((1, 3, 4, 4, 4), np.float32)}
    squared = np.square(np.asarray(prediction[0] + 3.0 * (prediction[1] - prediction[0]) - target[1]))
    abar = np.asarray(schedule.alphas_cumprod)[np.asarray(t[1])]
    weights = np.minimum(2.0 / (abar / (1 - abar)), 1.0)
    assert weights[0] < 1 and weights[2] == 1  # clipped at high noise only
    for gamma, expected in ((0.0, squared.mean()), (2.0, (weights[:, None, None, None] * squared).mean())):
        da = dreamartist.DreamArtistSpec(2, guidance=3.0, min_snr_gamma=gamma)
        loss, _ = dreamartist.dreamartist_losses(spec, da, jnp.zeros((4, 32)), None, batch, jax.random.key(0))
        np.testing.assert_allclose(loss, expected, rtol=1e-5)


def test_refusals(sd1_dir, style_dir, tmp_path, capsys):
    with pytest.raises(UserError, match="trainable='full' is not supported with method dreamartist"):
        check_config(plus_config(sd1_dir, style_dir, trainable="full"))
    with pytest.raises(UserError, match=r"lora.relative_rank=1.5 must be in \[0, 1\)"):
        check_config(plus_config(sd1_dir, style_dir, lora__relative_rank=1.5))
    with pytest.raises(UserError, match="lora.text_encoder_rank=-1 must be a non-negative integer"):
        check_config(plus_config(sd1_dir, style_dir, lora__text_encoder_rank=-1))
    with pytest.raises(UserError, match="dreamartist.min_snr_gamma=-1.0 must not be negative"):
        check_config(plus_config(sd1_dir, style_dir, dreamartist__min_snr_gamma=-1.0))
    with pytest.raises(UserError, match="dreamartist.neg_lora_learning_rate=0.0 must be positive"):
        check_config(plus_config(sd1_dir, style_dir, dreamartist__neg_lora_learning_rate=0.0))
    (tmp_path / "captions").mkdir()
    assert main(["sample", "--model", str(sd1_dir), "--captions", str(tmp_path / "captions"), "--negative-lora",
                 str(tmp_path / "lora-neg.safetensors"), "--output", str(tmp_path / "out")]) == 2
    assert "--negative-lora takes --prompt" in capsys.readouterr().err
    pipe = load_pipeline(sd1_dir)
    with pytest.raises(UserError, match="needs --guidance above 1 and no handoff"):
        generate(pipe, ["a cat"], settings=SampleSettings(guidance=1.0, steps=1), negative_model=pipe)
