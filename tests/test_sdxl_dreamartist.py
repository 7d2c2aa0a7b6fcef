"""DreamArtist on the tiny SDXL: both words (positive and negative) train rows in both text encoders, are written as
one clip_l/clip_g file per word that diffusers' `load_textual_inversion` loads into both encoders, and
`nsync-jax sample` with both files and the negative word as the negative prompt draws what diffusers draws; cropped
images condition the step on their own micro-conditioning."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.numpy import load_file

from conftest import tiny_config
from nsync_jax.cli import main
from nsync_jax.pipeline import load_pipeline
from nsync_jax.train import methods, trainables, trainer
from nsync_jax.train.methods.dreamartist import DreamArtistSpec, dreamartist_losses
from nsync_jax.train.step import NoiseSchedule, StepSpec
from sdxl_fixtures import sdxl_dir  # noqa: F401 (a fixture)

POSITIVE, NEGATIVE = 2, 3  # rows of each word
HEIGHT, WIDTH = 24, 32
# The pixel reconstruction term (the SDXL VAE in the step), each word with its own EMA and learning rate.
OVERRIDES = dict(method="dreamartist", data__negatives="", dreamartist__num_negative_vectors=NEGATIVE,
                 dreamartist__reconstruction=True, dreamartist__ema_weight=0.8, dreamartist__ema_rep_step=2,
                 dreamartist__neg_lr_weight=0.5)


@pytest.fixture(scope="module")
def run(sdxl_dir, style_dir, tmp_path_factory):
    """Two DreamArtist steps: `(workdir, what it learned)`."""
    config = tiny_config(sdxl_dir, style_dir, train__steps=2, checkpoint__every_steps=2, **OVERRIDES)
    workdir = tmp_path_factory.mktemp("dreamartist_sdxl") / "work"
    return workdir, trainer.train(config, workdir, progress=False).trained


def test_both_words_train_rows_in_both_encoders(run, sdxl_dir):
    workdir, learned = run
    assert {name: rows.shape for name, rows in learned.items()} == {
        "text_encoder": (POSITIVE + NEGATIVE, 24), "text_encoder_2": (POSITIVE + NEGATIVE, 40)}
    pipe = load_pipeline(sdxl_dir, allow_sdxl=True)
    for name, tokenizer in (("text_encoder", pipe.tokenizer), ("text_encoder_2", pipe.tokenizer_2)):
        start = np.asarray(pipe.modules()[name].embeddings.token_embedding.embedding[...])[
            tokenizer.convert_tokens_to_ids("painting</w>")]
        moved = np.abs(learned[name] - start).max(axis=1)
        assert (moved > 1e-3).all(), (name, moved)  # every row of both words, in each encoder
    metrics = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert all(m["grad_norm"] > 0 and m["negative_grad_norm"] > 0 and m["loss_reconstruction"] > 0 for m in metrics)
    # The run's own files: one clip_l/clip_g file per word.
    for name, rows in (("learned_embeds", slice(0, POSITIVE)), ("learned_embeds-neg", slice(POSITIVE, None))):
        state = load_file(workdir / f"{name}.safetensors")
        assert set(state) == {"clip_l", "clip_g"}
        np.testing.assert_array_equal(state["clip_l"], learned["text_encoder"][rows])
        np.testing.assert_array_equal(state["clip_g"], learned["text_encoder_2"][rows])


def test_exported_words_load_in_diffusers_and_sample_with_the_negative_word(run, sdxl_dir, tmp_path, capsys):
    from diffusers import StableDiffusionXLPipeline

    workdir, learned = run
    assert main(["export", "--workdir", str(workdir), "--output", str(tmp_path / "style.safetensors"),
                 "--format", "diffusers"]) == 0
    out = capsys.readouterr().out
    assert "style-neg.safetensors (SDXL clip_l/clip_g, 3 vectors; the token is the file name: style-neg)" in out
    files = {"style": tmp_path / "style.safetensors", "style-neg": tmp_path / "style-neg.safetensors"}
    sidecar = json.loads((tmp_path / "style-neg.json").read_text())
    assert sidecar["method"] == "dreamartist" and sidecar["num_vectors"] == NEGATIVE

    # diffusers: each word's clip_l into encoder 1, clip_g into encoder 2.
    reference = StableDiffusionXLPipeline.from_pretrained(sdxl_dir)
    reference.set_progress_bar_config(disable=True)
    for token, path in files.items():
        state = load_file(path)
        for key, encoder, tokenizer in (("clip_l", reference.text_encoder, reference.tokenizer),
                                        ("clip_g", reference.text_encoder_2, reference.tokenizer_2)):
            reference.load_textual_inversion(torch.from_numpy(state[key]), token=token, text_encoder=encoder,
                                             tokenizer=tokenizer)
    table = reference.text_encoder_2.get_input_embeddings().weight.detach().numpy()
    np.testing.assert_array_equal(table[-NEGATIVE:], learned["text_encoder_2"][POSITIVE:])

    # The negative word is guidance's unconditional prompt, as DreamArtist samples on SD.
    prompt = "a cat in the style of style"
    latents = np.random.default_rng(3).standard_normal((1, 4, HEIGHT // 2, WIDTH // 2)).astype(np.float32)
    np.save(tmp_path / "latents.npy", latents)
    assert main(["sample", "--model", str(sdxl_dir), "--prompt", prompt, "--negative-prompt", "style-neg",
                 "--embeddings", str(files["style"]), "--embeddings", str(files["style-neg"]), "--steps", "2",
                 "--guidance", "5.0", "--height", str(HEIGHT), "--width", str(WIDTH), "--latents",
                 str(tmp_path / "latents.npy"), "--output", str(tmp_path / "out")]) == 0
    expected = reference(prompt, negative_prompt="style-neg", num_inference_steps=2, guidance_scale=5.0,
                         height=HEIGHT, width=WIDTH, latents=torch.from_numpy(latents), output_type="np").images[0]
    drawn = np.asarray(Image.open(tmp_path / "out" / "000000.png"), np.float32) / 255
    assert np.abs(drawn - np.round(expected * 255) / 255).max() <= 2 / 255  # both as 8-bit images
    # ... and the negative word made a difference, so the comparison says something about it.
    plain = reference(prompt, num_inference_steps=2, guidance_scale=5.0, height=HEIGHT, width=WIDTH,
                      latents=torch.from_numpy(latents), output_type="np").images[0]
    assert np.abs(plain - expected).max() > 10 / 255


# Two more runs (each compiles its step): with `-m slow`.
@pytest.mark.slow
def test_resume_is_bit_identical(run, sdxl_dir, style_dir, tmp_path):
    """A run stopped after its first step and resumed learns what the straight run learned (words, EMA state)."""
    _, straight = run
    for steps in (1, 2):
        config = tiny_config(sdxl_dir, style_dir, train__steps=steps, checkpoint__every_steps=1, **OVERRIDES)
        resumed = trainer.train(config, tmp_path / "work", progress=False).trained
    jax.tree.map(np.testing.assert_array_equal, straight, resumed)


# test_sdxl_data checks per-image time_ids in the step's loss by default; this, DreamArtist's groups, with -m slow.
@pytest.mark.slow
def test_cropped_images_condition_the_step_on_their_own_time_ids(sdxl_dir, style_dir):
    """With a cropping `data.resize` (accepted on SDXL), the loss of both words' fused prediction reads each image's
    `time_ids` from the batch: the squashed images' (res, res, 0, 0, res, res), the step's default, give another."""
    config = tiny_config(sdxl_dir, style_dir, **{**OVERRIDES, "dreamartist__reconstruction": False},
                         data__resize="center_crop")
    method = methods.get("dreamartist")
    trainable = trainables.get("embeddings").for_model(True, config, method)
    pipe = load_pipeline(sdxl_dir, allow_sdxl=True)
    graphdefs, frozen, rows = trainable.split(pipe, config, method, method.frozen_modules(config))
    data = method.prepare(pipe, method.read_data(config), config, None, False)
    spec = StepSpec(graphdefs, NoiseSchedule.from_config(pipe.scheduler_config), pipe.vae.config.scaling_factor,
                    jnp.float32, 0, trainable=trainable, time_ids=trainer.training_time_ids(config))
    batch = {k: jnp.asarray(v) for k, v in data.batch(0).items()}
    squashed = jnp.broadcast_to(jnp.asarray(spec.time_ids), batch["time_ids"].shape)
    assert batch["time_ids"].shape == (1, config.train.batch_size, 6)
    assert not np.array_equal(batch["time_ids"], squashed)  # 40 x 48 images: another original size and crop
    loss = jax.jit(lambda batch: dreamartist_losses(spec, DreamArtistSpec.from_config(config), rows, frozen, batch,
                                                    jax.random.key(0))[0])
    cropped, as_squashed = float(loss(batch)), float(loss({**batch, "time_ids": squashed}))
    assert float(loss({k: v for k, v in batch.items() if k != "time_ids"})) == pytest.approx(as_squashed, rel=1e-6)
    assert abs(cropped - as_squashed) > 1e-6 * abs(cropped)
