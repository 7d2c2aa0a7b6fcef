"""StyleForge on the one trainer: the dual-binding loss, its data (concepts, schedules, random crops, generated
Aux images) and a run end to end."""
import functools
import io
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image
from safetensors import safe_open

from conftest import jitted, tiny_config
from nsync_jax import tokens
from nsync_jax.data.style_dataset import decode_image
from nsync_jax.errors import UserError
from nsync_jax.models.vae import sample_posterior
from nsync_jax.pipeline import load_pipeline
from nsync_jax.schedulers import add_noise, training_target
from nsync_jax.schedulers import NoiseSchedule
from nsync_jax.train import methods, trainables, trainer
from nsync_jax.train.config import check_config
from nsync_jax.train.methods import styleforge
from nsync_jax.train.step import StepSpec


@pytest.fixture(scope="module")
def aux_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("aux")
    rng = np.random.default_rng(1)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (36, 30, 3), dtype=np.uint8)).save(root / f"person{i}.png")
    return root


def styleforge_config(model, style, aux, **overrides):
    settings = dict(method="styleforge", trainable="lora", lora__rank=2, lora__alpha=2.0, data__negatives="",
                    data__captions="", data__aux_images=str(aux), data__flip=False, data__resize="random_crop",
                    train__scale_lr=False)
    return tiny_config(model, style, **{**settings, **overrides})


def test_loss_is_instance_mse_plus_weighted_prior_mse(sd1_dir, style_dir, aux_dir, tmp_path):
    config = styleforge_config(sd1_dir, style_dir, aux_dir, trainable="full", full__train_text_encoder=True)
    pipe = load_pipeline(sd1_dir)
    data = styleforge.prepare_concepts(pipe, config, tmp_path, progress=False)
    batch = styleforge.step_batch(data, "joint", 10, 2, seed=0, step=3, flip=False)
    trainable = trainables.get("full")
    graphdefs, frozen, trained = trainable.split(pipe, config, methods.get("styleforge"), ("text_encoder", "unet"))
    schedule = NoiseSchedule.from_config(pipe.scheduler_config)
    spec = StepSpec(graphdefs, schedule, pipe.vae.config.scaling_factor, jnp.float32, 0, trainable=trainable)
    key = jax.random.key(7)
    loss, parts = jax.jit(functools.partial(styleforge.styleforge_losses, spec, 0.5))(trained, frozen, batch, key)

    # Directly: each group through the text encoder and UNet on its own, with its own latent sample, noise and
    # timesteps, and the mean squared error over its elements.
    direct, text_encoder, unet = [], jitted(pipe.text_encoder), jitted(pipe.unet)
    for group in range(2):
        k_latent, k_noise, k_time = jax.random.split(jax.random.fold_in(key, group), 3)
        latents = sample_posterior(batch["mean"][group], batch["logvar"][group], k_latent)
        latents = latents * pipe.vae.config.scaling_factor
        noise = jax.random.normal(k_noise, latents.shape)
        t = jax.random.randint(k_time, (2,), 0, schedule.num_train_timesteps)
        context = text_encoder(jnp.asarray(batch["ids"][group]))
        prediction = unet(add_noise(schedule.alphas_cumprod, latents, noise, t), t, context)
        direct.append(float(jnp.mean(jnp.square(prediction - training_target(schedule, latents, noise, t)))))
    np.testing.assert_allclose([parts["loss_instance"], parts["loss_prior"]], direct, rtol=1e-5)
    np.testing.assert_allclose(loss, direct[0] + 0.5 * direct[1], rtol=1e-5)
    # The two groups are different examples with their own prompts.
    np.testing.assert_array_equal(batch["ids"][:, 0], tokens.tokenize(pipe.tokenizer, ["zwx style", "style"]))


def test_pairs_are_fixed_once_by_index_as_the_released_loader_pairs_them():
    pairs = styleforge.released_pairs(3, 5, seed=0, concept=0)
    assert pairs.shape == (5, 2)
    assert pairs[:, 1].tolist() == [0, 1, 2, 3, 4]  # Aux image i mod 5 ...
    assert pairs[:, 0].tolist() == [pairs[i % 3, 0] for i in range(5)]  # ... with shuffled StyleRef i mod 3
    assert sorted(pairs[:3, 0]) == [0, 1, 2]
    batches = styleforge.cached_batches(pairs, 2, seed=0, concept=0)
    assert [len(b) for b in batches] == [2, 2, 2]  # the short last batch is filled from the first pairs
    flat = np.concatenate(batches)
    assert sorted(map(tuple, flat[:5])) == sorted(map(tuple, pairs)) and (flat[5] == flat[0]).all()


def test_schedules_and_optimizer_restarts():
    sizes, seed = [2, 3], 7
    mixed = [styleforge.step_source(s, 10, sizes, "mixed", seed) for s in range(10)]
    epoch = {(0, 0), (0, 1), (1, 0), (1, 1), (1, 2)}
    assert set(mixed[:5]) == epoch and set(mixed[5:]) == epoch  # each epoch one pass over every batch ...
    assert mixed[:5] != mixed[5:]  # ... shuffled afresh
    assert [c for c, _ in mixed] != sorted(c for c, _ in mixed)  # concepts mixed within an epoch
    joint = [styleforge.step_source(s, 10, sizes, "joint", seed) for s in range(10)]
    assert [c for c, _ in joint] == [0, 1] * 5
    assert {b for c, b in joint[:4] if c == 0} == {0, 1} and {b for c, b in joint[:6] if c == 1} == {0, 1, 2}
    staged = [styleforge.step_source(s, 9, [2, 3, 2], "staged", seed) for s in range(9)]
    assert [c for c, _ in staged] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert {b for c, b in staged[3:6]} == {0, 1, 2}
    assert styleforge.optimizer_restarts(9, 3, "staged") == {3, 6}
    assert styleforge.optimizer_restarts(9, 3, "mixed") == styleforge.optimizer_restarts(9, 3, "joint") == set()


def test_step_batch_takes_one_cached_batch_of_pairs():
    def concept(n_refs, n_aux, offset):
        refs = np.arange(n_refs, dtype=np.float32)[:, None, None].repeat(2, 1) + offset
        aux = 100 + np.arange(n_aux, dtype=np.float32)[:, None, None].repeat(2, 1) + offset
        return styleforge.ConceptData([], np.arange(n_refs)[:, None] + offset, refs[..., None].repeat(2, -1),
                                      100 + np.arange(n_aux)[:, None] + offset, aux[..., None].repeat(2, -1))

    concepts = [concept(3, 2, 0), concept(2, 2, 1000)]
    seen = set()
    for step in range(5):  # one epoch of the mixed schedule: 3 + 2 pairs, batch 1
        batch = styleforge.step_batch(concepts, "mixed", 5, 1, seed=3, step=step, flip=False)
        ref, aux = batch["ids"][:, 0, 0]
        np.testing.assert_array_equal(batch["mean"][:, 0, 0, 0], [ref, aux])
        seen.add((int(ref), int(aux)))
    pairs = [styleforge.released_pairs(3, 2, 3, 0), styleforge.released_pairs(2, 2, 3, 1)]
    assert seen == {(r + o, 100 + a + o) for p, o in zip(pairs, (0, 1000)) for r, a in p}


def test_random_crop_is_the_short_side_resize_cropped_per_seed():
    pixels = (np.indices((24, 40)).sum(0) * 5 % 256).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(np.stack([pixels] * 3, -1)).save(buffer, format="PNG")
    resized = np.asarray(Image.fromarray(np.stack([pixels] * 3, -1)).resize((20, 12), Image.Resampling.BILINEAR),
                         np.float32) / 127.5 - 1
    crops = [decode_image(buffer.getvalue(), 12, "random_crop", crop_seed=[seed]) for seed in range(6)]
    offsets = set()
    for crop in crops:
        assert crop.shape == (12, 12, 3)
        left = next(x for x in range(9) if np.array_equal(resized[:, x:x + 12], crop))
        offsets.add(left)
    assert len(offsets) > 1  # the offset depends on the seed ...
    np.testing.assert_array_equal(crops[0], decode_image(buffer.getvalue(), 12, "random_crop", crop_seed=[0]))


@pytest.mark.parametrize("change, message", [
    ({"trainable": "embeddings"}, "trainable='full'"),
    ({"data__negatives": "negs"}, "data.negatives"),
    ({"data__aux_images": ""}, "data.aux_images is empty"),
    ({"styleforge__schedule": "interleaved"}, "styleforge.schedule"),
    ({"styleforge__schedule": "sequential"}, "now called 'staged'"),
    ({"styleforge__prior_loss_weight": -1.0}, "prior_loss_weight"),
])
def test_config_errors_name_the_key(sd1_dir, style_dir, aux_dir, change, message):
    config = styleforge_config(sd1_dir, style_dir, aux_dir, **change)
    with pytest.raises(UserError, match=message):
        check_config(config)


# 42 s on 2 cores; a StyleForge run trains and exports by default in the replacement-VAE test.
@pytest.mark.slow
def test_multi_concept_run_with_generated_aux_images(sd1_dir, style_dir, aux_dir, tmp_path):
    """Two concepts trained jointly (LoRA, two steps of two microbatches): one with its Aux images, one whose
    Aux images are drawn with its class prompt first; both concepts' prompts reach the step and the metrics
    hold both losses."""
    import ml_collections

    config = styleforge_config(sd1_dir, style_dir, aux_dir, data__images="", data__aux_images="",
                               train__steps=2, styleforge__generate_aux=2, sample__steps=2, sample__count=2,
                               train__sample_every_steps=2, train__grad_accum_steps=2)
    config.styleforge.concepts = ml_collections.ConfigDict({
        "a_style": {"instance_prompt": "zwx style", "class_prompt": "style", "images": str(style_dir / "images"),
                    "captions": str(style_dir / "captions"), "aux_images": str(aux_dir), "aux_captions": ""},
        "b_people": {"instance_prompt": "a ukj person", "class_prompt": "a person",
                     "images": str(aux_dir), "captions": "", "aux_images": "", "aux_captions": ""}})
    config.styleforge.append_captions = True
    trained = trainer.train(config, tmp_path / "work", progress=False).trained

    drawn = sorted(p.name for p in (tmp_path / "work" / "aux" / "b_people").glob("*.png"))
    assert drawn == ["aux_0.png", "aux_1.png"]
    manifest = json.loads((tmp_path / "work" / "aux" / "b_people" / "manifest.json").read_text())
    assert set(manifest["files"].values()) == {"a person"}
    assert not (tmp_path / "work" / "aux" / "a_style").exists()  # it has its own Aux images
    logged = [json.loads(line) for line in (tmp_path / "work" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in logged] == [1, 2]
    assert all(m["loss_instance"] > 0 and m["loss_prior"] > 0 for m in logged)
    assert any(np.any(v) for k, v in trained["unet"].items() if k.endswith("lora_up"))
    assert Image.open(tmp_path / "work" / "samples" / "step_000002.png").size == (2 * 32, 32)
    with safe_open(tmp_path / "work" / "lora.safetensors", "np") as exported:  # says what to prompt with
        assert json.loads(exported.metadata()["nsync_jax"])["prompts"] == {"a_style": "zwx style",
                                                                           "b_people": "a ukj person"}

    pipe = load_pipeline(sd1_dir)
    data = styleforge.prepare_concepts(pipe, config, tmp_path / "work", progress=False)
    captions = [(style_dir / "captions" / f"item{i}.txt").read_text() for i in range(4)]
    np.testing.assert_array_equal(data[0].style_ids, tokens.tokenize(pipe.tokenizer,
                                                                     [f"zwx style, {c}" for c in captions]))
    np.testing.assert_array_equal(data[1].style_ids, tokens.tokenize(pipe.tokenizer, ["a ukj person"] * 3))
    np.testing.assert_array_equal(data[1].aux_ids, tokens.tokenize(pipe.tokenizer, ["a person"] * 2))

    # The sample grids draw with the adapters as trained so far.
    lora_trainable = trainables.get("lora")
    lora_trainable.split(pipe, config, methods.get("styleforge"), ("text_encoder", "unet"))  # untrained adapters
    lora_trainable.show(pipe, jax.tree.map(jnp.asarray, trained))
    adapter = pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
    key = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_up"
    np.testing.assert_array_equal(np.asarray(adapter.lora_up[...]), trained["unet"][key])


@pytest.fixture
def other_vae(sd1_dir, tmp_path):
    """The model's VAE with other weights: a replacement that is a drop-in (as sd-vae-ft-mse is for SD 1.5)."""
    import shutil

    from safetensors.numpy import load_file, save_file

    folder = tmp_path / "other-vae"
    shutil.copytree(sd1_dir / "vae", folder)
    weights_file = folder / "diffusion_pytorch_model.safetensors"
    save_file({k: v * 1.5 for k, v in load_file(weights_file).items()}, weights_file)
    return folder


def test_replacement_vae_is_used_checked_and_exported(sd1_dir, style_dir, aux_dir, other_vae, tmp_path):
    """config.vae replaces the model's VAE when training (and so in the sample grids) and in the exported
    pipeline; a VAE whose latents differ is refused, naming its config file and the key."""
    weights_of = lambda vae: [np.asarray(x) for x in jax.tree.leaves(nnx.state(vae))]
    own = weights_of(load_pipeline(sd1_dir).vae)
    for folder in (other_vae, tmp_path):  # a VAE folder, or a model folder with vae/
        if folder == tmp_path:
            (tmp_path / "vae").symlink_to(other_vae)
        replaced = weights_of(load_pipeline(sd1_dir, vae=folder).vae)
        for ours, theirs in zip(replaced, own):
            np.testing.assert_allclose(ours, 1.5 * theirs, rtol=1e-6)

    config = styleforge_config(sd1_dir, style_dir, aux_dir, trainable="full", vae=str(other_vae))
    out = tmp_path / "exported"
    trainables.get("full").export(out, "diffusers-pipeline", config, methods.get("styleforge"), {}, {"step": 0},
                                  None)
    for ours, theirs in zip(weights_of(load_pipeline(out).vae), own):
        np.testing.assert_allclose(ours, 1.5 * theirs, rtol=1e-6)

    settings = json.loads((other_vae / "config.json").read_text())
    (other_vae / "config.json").write_text(json.dumps({**settings, "scaling_factor": 0.13025}))
    with pytest.raises(UserError, match=r"other-vae/config.json: scaling_factor=0.13025 differs from the "
                                        r"model's scaling_factor=0.18215"):
        load_pipeline(sd1_dir, vae=other_vae)
    with pytest.raises(UserError, match="no-such-vae: VAE folder not found"):
        load_pipeline(sd1_dir, vae=tmp_path / "no-such-vae")


def test_replacement_vae_from_the_hugging_face_cache(sd1_dir, other_vae, tmp_path, monkeypatch):
    """A Hub id fetches the VAE repository's config and weights (here from an offline cache)."""
    import huggingface_hub
    from test_sources import add_to_cache

    cache = tmp_path / "hf-cache"
    add_to_cache(cache, "stabilityai/sd-vae-ft-mse", other_vae)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    weights_of = lambda vae: [np.asarray(x) for x in jax.tree.leaves(nnx.state(vae))]
    for ours, theirs in zip(weights_of(load_pipeline(sd1_dir, vae="stabilityai/sd-vae-ft-mse").vae),
                            weights_of(load_pipeline(sd1_dir).vae)):
        np.testing.assert_allclose(ours, 1.5 * theirs, rtol=1e-6)
    with pytest.raises(UserError, match=r"^org/missing-vae: .*Hugging Face"):  # one line naming the id
        load_pipeline(sd1_dir, vae="org/missing-vae")


def test_sample_vae_draws_as_a_model_whose_vae_is_replaced(sd1_dir, other_vae, tmp_path):
    import shutil

    from nsync_jax.cli import main

    swapped = tmp_path / "swapped"
    shutil.copytree(sd1_dir, swapped)
    shutil.rmtree(swapped / "vae")
    shutil.copytree(other_vae, swapped / "vae")
    flags = ["--prompt", "zwx style, a girl", "--steps", "2", "--height", "32", "--scheduler", "ddim"]
    drawn = {}
    for name, model in (("flag", ["--model", str(sd1_dir), "--vae", str(other_vae)]),
                        ("folder", ["--model", str(swapped)]), ("own", ["--model", str(sd1_dir)])):
        assert main(["sample", *model, *flags, "--output", str(tmp_path / name)]) == 0
        drawn[name] = np.asarray(Image.open(tmp_path / name / "000000.png"))
    np.testing.assert_array_equal(drawn["flag"], drawn["folder"])
    assert not np.array_equal(drawn["flag"], drawn["own"])
