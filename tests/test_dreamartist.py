"""DreamArtist on the shared trainer: the fused gradient against the fusion written out, the negative word's
gradient structure, the optimizer against torch's, exact resume, export of both words and sampling with the
negative word."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx
from PIL import Image

from nsync_jax import tokens
from nsync_jax.cli import main
from nsync_jax.errors import UserError
from nsync_jax.pipeline import encode_text, load_pipeline
from nsync_jax.schedulers import add_noise
from conftest import CONFIG, tiny_config, write_style_dataset
from nsync_jax.schedulers import NoiseSchedule
from nsync_jax.train import data as train_data, methods, trainer
from nsync_jax.train.config import default_config
from nsync_jax.train.methods import dreamartist
from nsync_jax.train.step import StepSpec, denoise, draw_latents, group_keys
from test_train import diffusers_text_states

TOKEN, NEGATIVE = "<tiny-style>", "<tiny-style>-neg"


def dreamartist_config(model, data, **overrides):
    """The tiny config as DreamArtist (gamma 3): 2 positive and 2 negative vectors (equal counts, so that the
    gradient-structure test can give both words the same rows), reconstruction on."""
    return tiny_config(model, data, method="dreamartist", data__negatives="", dreamartist__num_negative_vectors=2,
                       dreamartist__reconstruction=True, **overrides)


def frozen_model(pipe):
    """The step's static spec and the frozen states of the text encoder, UNet and VAE, float32."""
    graphdefs, frozen = {}, {}
    for name in ("text_encoder", "unet", "vae"):
        graphdefs[name], frozen[name] = nnx.split(pipe.modules()[name])
    spec = StepSpec(graphdefs, NoiseSchedule.from_config(pipe.scheduler_config), pipe.vae.config.scaling_factor,
                    jnp.float32, 0)
    return spec, frozen


@pytest.fixture(scope="module")
def first_step(sd1_dir, style_dir):
    """The first step of a DreamArtist run as `trainer.train` builds it (gamma = 3, reconstruction on), its
    gradient function compiled once for both gradient tests, and the first learned row's token id."""
    config = dreamartist_config(sd1_dir, style_dir)
    pipe = load_pipeline(sd1_dir)
    vocab = len(pipe.tokenizer)
    method = methods.get("dreamartist")
    method.add_words(pipe.tokenizer, config)
    prepared = train_data.prepare(pipe, method.read_data(config), config, TOKEN, negative_word=NEGATIVE,
                                  keep_images=True)
    batch = {k: jnp.asarray(v) for k, v in method.batch(prepared, config, step=0).items()}
    spec, frozen = frozen_model(pipe)
    da = dreamartist.DreamArtistSpec.from_config(config)
    gradients = jax.jit(lambda rows, frozen, batch, key: dreamartist.dreamartist_gradients(spec, da, rows, frozen,
                                                                                            batch, key))
    return spec, frozen, batch, vocab, gradients


def test_fused_gradient_equals_the_fusion_written_out(first_step):
    spec, frozen, batch, _, gradients = first_step
    rows = jnp.asarray(np.random.default_rng(0).standard_normal((4, 32)), jnp.float32)
    key = jax.random.key(3)

    def written_out(rows, frozen, batch):  # two UNet passes, eps_n + 3 (eps_p - eps_n), MSE + L1 of its x0
        text_encoder = nnx.merge(spec.graphdefs["text_encoder"], frozen["text_encoder"])
        unet = nnx.merge(spec.graphdefs["unet"], frozen["unet"])
        vae = nnx.merge(spec.graphdefs["vae"], frozen["vae"])
        table = text_encoder.embeddings.token_embedding.embedding[...]
        # The noise and timesteps of the step: both words use the key of group 0.
        latents, noise, t = draw_latents(spec, jax.random.fold_in(key, 0), batch["mean"][0],
                                                 batch["logvar"][0])
        noisy = add_noise(spec.schedule.alphas_cumprod, latents, noise, t)

        def predict(ids):
            return unet(noisy, t, text_encoder(inputs_embeds=tokens.embed_tokens(table, rows, ids)))

        # Two separate passes, negative prompts then positive ones (a loop, so that the UNet compiles once).
        eps_neg, eps_pos = jax.lax.map(predict, batch["ids"])
        fused = eps_neg + 3.0 * (eps_pos - eps_neg)
        abar = jnp.asarray(spec.schedule.alphas_cumprod)[t][:, None, None, None]
        x0 = (noisy - jnp.sqrt(1 - abar) * fused) / jnp.sqrt(abar)
        images = vae.decode(x0 / spec.scaling_factor)
        return jnp.mean((fused - noise) ** 2) + jnp.mean(jnp.abs(images - batch["pixels"][0]))

    expected_loss, expected = jax.jit(jax.value_and_grad(written_out))(rows, frozen, batch)
    grads, extra, metrics = gradients(rows, frozen, batch, key)
    assert extra == {} and metrics["loss_reconstruction"] > 0
    np.testing.assert_allclose(metrics["loss"], expected_loss, rtol=1e-5)
    np.testing.assert_allclose(grads, expected, rtol=2e-4, atol=2e-4 * np.abs(expected).max())
    assert np.abs(grads[:2]).max() > 0 and np.abs(grads[2:]).max() > 0


def test_negative_gradient_is_the_positive_one_times_one_minus_gamma_over_gamma(first_step):
    spec, frozen, batch, vocab, gradients = first_step
    negative_ids, positive_ids = np.asarray(batch["ids"])
    # The negative prompt is the positive prompt with the other word (2 rows further on), nothing else.
    np.testing.assert_array_equal(negative_ids, np.where(positive_ids >= vocab, positive_ids + 2, positive_ids))
    word = np.random.default_rng(1).standard_normal((2, 32)).astype(np.float32)
    grads, _, _ = gradients(jnp.asarray(np.concatenate([word, word])), frozen, batch, jax.random.key(0))
    # gamma = 3: the negative word is pushed against the positive, by 2/3 of its gradient.
    np.testing.assert_allclose(grads[2:], (1 - 3.0) / 3.0 * grads[:2], rtol=1e-4, atol=1e-4 * np.abs(grads).max())
    assert np.abs(grads[:2]).max() > 0


def test_guidance_schedules_match_the_released_formulas():
    t = jnp.asarray([0, 250, 500, 999])
    rho = np.asarray(t) / 999
    ramps = {"ln": rho, "cos": np.cos((rho - 1) * np.pi / 2), "cos2": 1 - np.cos(rho * np.pi / 2)}
    for schedule, ramp in ramps.items():
        da = dreamartist.DreamArtistSpec(2, guidance=5.0, guidance_schedule=schedule, guidance_min=1.0)
        np.testing.assert_allclose(dreamartist.fusion_guidance(da, t, 1000), 1.0 + 4.0 * ramp, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(dreamartist.fusion_guidance(dreamartist.DreamArtistSpec(2, guidance=3.0), t, 1000), 3.0)


def test_optimizer_matches_torch_adamw_with_a_group_and_a_clip_per_word():
    config = default_config()
    config.method, config.num_vectors, config.train.scale_lr = "dreamartist", 2, False
    config.train.learning_rate, config.dreamartist.num_negative_vectors = 3e-3, 3
    config.dreamartist.neg_lr_weight, config.dreamartist.ema_weight, config.dreamartist.ema_rep_step = 0.5, 0.9, 3
    config.dreamartist.neg_ema_weight, config.dreamartist.neg_ema_rep_step = 0.8, 2  # its own EMA, as released
    tx = trainer.make_optimizer(config, methods.get("dreamartist"))
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((5, 4)).astype(np.float32)
    grads = [rng.standard_normal((5, 4)).astype(np.float32) * scale for scale in (3.0, 0.1, 2.0, 0.2, 5.0, 1.0, 0.3)]

    positive, negative = (torch.nn.Parameter(torch.from_numpy(x.copy())) for x in (rows[:2], rows[2:]))
    adamw = torch.optim.AdamW([{"params": [positive], "lr": 3e-3}, {"params": [negative], "lr": 1.5e-3}],
                              betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)
    ema = [p.detach().clone() for p in (positive, negative)]
    params, state = jnp.asarray(rows), tx.init(jnp.asarray(rows))
    for step, g in enumerate(grads, 1):
        for p, block in ((positive, g[:2]), (negative, g[2:])):
            p.grad = torch.from_numpy(block.copy())
            torch.nn.utils.clip_grad_norm_(p, 1.0)
        adamw.step()
        with torch.no_grad():
            for p, average, decay, every in zip((positive, negative), ema, (0.9, 0.8), (3, 2)):
                average.mul_(decay).add_(p, alpha=1 - decay)
                if step % every == 0:
                    p.copy_(average)
        updates, state = tx.update(jnp.asarray(g), state, params)
        params = optax.apply_updates(params, updates)
        expected = torch.cat([positive, negative]).detach().numpy()
        np.testing.assert_allclose(params, expected, rtol=1e-5, atol=1e-6, err_msg=f"step {step}")


def test_config_errors_name_the_key(sd1_dir, style_dir, tmp_path):
    for overrides, message in (
            (dict(dreamartist__guidance_schedule="exp"), "dreamartist.guidance_schedule='exp' must be one of"),
            (dict(dreamartist__guidance_schedule="cos"), "dreamartist.guidance_min=None: set it"),
            (dict(dreamartist__guidance_min=1.0), "dreamartist.guidance_min=1.0: set it"),
            (dict(data__negatives=str(style_dir / "negatives")), "data.negatives=.* is not used by method dreamartist"),
            (dict(initializer_embedding="x.pt"), "initializer_embedding is not supported with method dreamartist"),
            (dict(dreamartist__ema_weight=0.0), "dreamartist.ema_weight=0.0 must be in")):
        config = dreamartist_config(sd1_dir, style_dir)
        for key, value in overrides.items():
            *parents, leaf = key.split("__")
            node = config
            for part in parents:
                node = node[part]
            node[leaf] = value
        with pytest.raises(UserError, match=message):
            trainer.train(config, tmp_path / "never", progress=False)
    assert not (tmp_path / "never").exists()


# ------------------------------------------------------------------------------------------------------------
# Whole runs: resume, export, sampling with the negative word.
# ------------------------------------------------------------------------------------------------------------

RUN_FLAGS = ["--config.method=dreamartist", "--config.data.negatives=", "--config.dreamartist.num_negative_vectors=3",
             "--config.dreamartist.reconstruction=True", "--config.dreamartist.guidance_schedule=cos2",
             "--config.dreamartist.guidance_min=1.0", "--config.dreamartist.ema_weight=0.8",
             "--config.dreamartist.ema_rep_step=2", "--config.dreamartist.neg_lr_weight=0.5"]


def train_run(workdir, sd1_dir, style_dir, *flags):
    assert main(["train", "--config", str(CONFIG), "--workdir", str(workdir), f"--config.model={sd1_dir}",
                 f"--config.data.images={style_dir / 'images'}", f"--config.data.captions={style_dir / 'captions'}",
                 *RUN_FLAGS, *flags]) == 0


@pytest.fixture(scope="module")
def straight_run(sd1_dir, style_dir, tmp_path_factory):
    """A 6-step DreamArtist run through the CLI."""
    workdir = tmp_path_factory.mktemp("dreamartist") / "straight"
    train_run(workdir, sd1_dir, style_dir)
    return workdir


def test_resume_is_bit_identical(straight_run, sd1_dir, style_dir, tmp_path):
    from safetensors.numpy import load_file

    for steps in (3, 6):  # the same run, stopped after 3 steps and resumed
        train_run(tmp_path / "resumed", sd1_dir, style_dir, f"--config.train.steps={steps}")
    for name, token, count in (("learned_embeds", TOKEN, 2), ("learned_embeds-neg", NEGATIVE, 3)):
        straight, resumed = (load_file(d / f"{name}.safetensors")[token] for d in (straight_run, tmp_path / "resumed"))
        assert straight.shape == (count, 32)
        np.testing.assert_array_equal(straight, resumed)
        assert json.loads((straight_run / f"{name}.json").read_text())["token"] == token
    metrics = [json.loads(line) for line in (straight_run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5, 6]
    assert all({"loss", "loss_denoise", "loss_reconstruction", "grad_norm", "negative_grad_norm"} <= set(m)
               for m in metrics)


def test_export_loads_both_words_in_diffusers_and_samples_with_the_negative(sd1_dir, straight_run, tmp_path,
                                                                           capsys):
    for fmt, name in (("diffusers", "style.safetensors"), ("a1111", "style.pt")):
        assert main(["export", "--workdir", str(straight_run), "--output", str(tmp_path / name), "--format", fmt]) == 0
    assert "style-neg.safetensors (<tiny-style>-neg, 3 vectors)" in capsys.readouterr().out
    sidecar = json.loads((tmp_path / "style-neg.json").read_text())
    assert sidecar["method"] == "dreamartist" and sidecar["token"] == NEGATIVE and sidecar["num_vectors"] == 3

    prompts = [f"a cat in the style of {TOKEN}", NEGATIVE]
    pipe = load_pipeline(sd1_dir)
    for name in ("style.safetensors", "style-neg.safetensors"):
        pipe.add_embeddings(tmp_path / name)
    ids = tokens.tokenize(pipe.tokenizer, [tokens.expand_placeholders(p, pipe.tokenizer) for p in prompts])
    ours = np.asarray(encode_text(pipe.text_encoder, jnp.asarray(pipe.extra_token_rows), jnp.asarray(ids)))
    for files in (["style.safetensors", "style-neg.safetensors"], ["style.pt", "style-neg.pt"]):
        reference, torch_ids, expected = diffusers_text_states(sd1_dir, [str(tmp_path / f) for f in files], prompts)
        np.testing.assert_array_equal(torch_ids, ids)
        assert np.abs(ours - expected).max() / np.abs(expected).max() <= 1e-5

    # Inference: the negative word as the unconditional branch of guidance, as diffusers' negative_prompt.
    latents = np.random.default_rng(3).standard_normal((1, 4, 16, 16)).astype(np.float32)
    np.save(tmp_path / "latents.npy", latents)
    assert main(["sample", "--model", str(sd1_dir), "--prompt", prompts[0], "--negative-prompt", NEGATIVE,
                 "--embeddings", str(tmp_path / "style.safetensors"), "--embeddings",
                 str(tmp_path / "style-neg.safetensors"), "--steps", "3", "--height", "32", "--width", "32",
                 "--latents", str(tmp_path / "latents.npy"), "--output", str(tmp_path / "out")]) == 0
    reference.set_progress_bar_config(disable=True)
    expected = reference(prompts[0], negative_prompt=NEGATIVE, num_inference_steps=3, height=32, width=32,
                         latents=torch.from_numpy(latents), output_type="pil").images[0]
    ours = np.asarray(Image.open(tmp_path / "out" / "000000.png"), np.int16)
    assert np.abs(ours - np.asarray(expected, np.int16)).max() <= 2


def test_attention_masks_weight_the_denoising_loss(sd1_dir, tmp_path):
    """`<stem>_att.png` is a mask, not a training image, and weights the squared error per latent pixel."""
    from nsync_jax.data.style_dataset import find_style_items, mask_weights

    root = write_style_dataset(tmp_path / "style")
    grey = np.zeros((40, 48), np.uint8)
    grey[:, 24:] = 255  # right half weight 5, left half 0
    Image.fromarray(grey).save(root / "images" / "item0_att.png")
    assert len(find_style_items(root / "images", captions=None, negatives=None)) == 5  # masks off: an image
    items = find_style_items(root / "images", captions=None, negatives=None, masks=True)
    assert [item.stem for item in items] == ["item0", "item1", "item2", "item3"]
    assert items[0].mask is not None and all(item.mask is None for item in items[1:])
    np.testing.assert_allclose(mask_weights(np.array([[[0, 127], [191, 255]]], np.float32), 2),
                               [[[0, 1], [3, 5]]], rtol=1e-6)

    config = dreamartist_config(sd1_dir, root, dreamartist__attention_masks=True)
    config.dreamartist.reconstruction = False
    pipe = load_pipeline(sd1_dir)
    method = methods.get("dreamartist")
    method.add_words(pipe.tokenizer, config)
    prepared = train_data.prepare(pipe, method.read_data(config), config, TOKEN, negative_word=NEGATIVE)
    weights = prepared.loss_weights
    size = prepared.positives.shape[2]
    assert weights.shape == (4, 2, size, size)
    np.testing.assert_array_equal(weights[1:], 1.0)  # no mask: every pixel weighs 1
    assert weights[0, 0, :, 0].max() < 0.1 and weights[0, 0, :, -1].min() > 4.9
    np.testing.assert_array_equal(weights[0, 1], weights[0, 0, :, ::-1])  # the mirror image's mask is mirrored
    # The first step whose batch draws the masked image.
    config.train.batch_size, config.train.seed = 4, 1
    batch = next(b for b in (method.batch(prepared, config, step=s) for s in range(20))
                 if (b["weights"] != 1).any())
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    spec, frozen = frozen_model(pipe)
    da = dreamartist.DreamArtistSpec.from_config(config)
    rows = jnp.asarray(np.random.default_rng(0).standard_normal((4, 32)), jnp.float32)
    key = jax.random.key(0)
    masked, _ = dreamartist.dreamartist_losses(spec, da, rows, frozen, batch, key)
    prediction, target, _, t = denoise(spec, jnp.broadcast_to(rows, (2, *rows.shape)), frozen, batch["ids"],
                                               jnp.broadcast_to(batch["mean"], (2, *batch["mean"].shape[1:])),
                                               jnp.broadcast_to(batch["logvar"], (2, *batch["logvar"].shape[1:])),
                                               group_keys(key, 2, share_noise=True))
    gamma = dreamartist.fusion_guidance(da, t[1], spec.schedule.num_train_timesteps)[:, None, None, None]
    fused = prediction[0] + gamma * (prediction[1] - prediction[0])
    expected = jnp.mean(jnp.square(fused - target[1]) * batch["weights"][0][..., None])
    np.testing.assert_allclose(masked, expected, rtol=1e-6)
    unweighted, _ = dreamartist.dreamartist_losses(spec, da, rows, frozen, {k: v for k, v in batch.items()
                                                                        if k != "weights"}, key)
    assert abs(float(unweighted) - float(masked)) > 1e-3 * float(unweighted)


def test_the_released_preprocessing_takes_the_centre_square_unmirrored(tmp_path):
    """configs/dreamartist_sd15.py reads a non-square image as its centre square (bicubic), not squashed, with
    mirroring off and one latent per image, as the released extension."""
    from pathlib import Path

    from nsync_jax.config import load_config

    images = tmp_path / "images"
    images.mkdir()
    wide = np.zeros((32, 64, 3), np.uint8)
    wide[:, :16], wide[:, 48:] = 255, 80  # side bands that only a squash keeps
    wide[:, 16:48] = np.arange(32, dtype=np.uint8)[None, :, None] * 8  # a ramp across the centre square
    Image.fromarray(wide).save(images / "wide.png")
    config = load_config(Path(__file__).resolve().parents[1] / "configs" / "dreamartist_sd15.py",
                         [f"data.images={images}", "data.resolution=16", "model=unused"])
    dataset = methods.get("dreamartist").read_data(config)
    expected = np.asarray(Image.fromarray(wide[:, 16:48]).resize((16, 16), Image.Resampling.BICUBIC), np.float32)
    np.testing.assert_allclose(dataset.positives[0], expected / 127.5 - 1, atol=1e-6)
    squashed = np.asarray(Image.fromarray(wide).resize((16, 16), Image.Resampling.BICUBIC), np.float32)
    assert np.abs(dataset.positives[0] - (squashed / 127.5 - 1)).max() > 0.5
    assert not config.data.flip and config.data.latent_sample == "once"
