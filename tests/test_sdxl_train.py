"""Textual Inversion and NSYNC token rows on the tiny SDXL: both encoders' rows train and resume bit-identically,
NSYNC projects each encoder's gradient on its own, the clip_l/clip_g export loads into diffusers, and what SDXL
does not support yet is refused naming the key."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from conftest import tiny_config
from nsync_jax import tokens
from nsync_jax.cli import main
from nsync_jax.errors import UserError
from nsync_jax.optim import orthogonal_projection
from nsync_jax.pipeline import load_pipeline
from nsync_jax.sdxl import encode_prompt
from nsync_jax.train import data as train_data, methods, step as train_step, trainables, trainer
from sdxl_fixtures import sdxl_dir  # noqa: F401 (a fixture)

def sdxl_config(sdxl_dir, style_dir, **overrides):
    return tiny_config(sdxl_dir, style_dir, **{"train__steps": 2, "checkpoint__every_steps": 1, **overrides})


# Three short runs each (about 30 s on 2 CPU cores): with `-m slow`.
@pytest.mark.slow
@pytest.mark.parametrize("method", ["nsync", "textual_inversion"])
def test_resume_is_bit_identical(sdxl_dir, style_dir, tmp_path, method):
    config = sdxl_config(sdxl_dir, style_dir, method=method, nsync__granularity="leaf")
    straight = trainer.train(config, tmp_path / "straight", progress=False).trained
    assert {name: rows.shape for name, rows in straight.items()} == {"text_encoder": (2, 24),
                                                                     "text_encoder_2": (2, 40)}
    # Stopped after its first step's checkpoint (a shorter run in the same workdir), then continued.
    trainer.train(sdxl_config(sdxl_dir, style_dir, method=method, nsync__granularity="leaf", train__steps=1),
                  tmp_path / "resumed", progress=False)
    resumed = trainer.train(config, tmp_path / "resumed", progress=False).trained
    jax.tree.map(np.testing.assert_array_equal, straight, resumed)

    # Each encoder's rows moved away from the initializer word's row of that encoder.
    pipe = load_pipeline(sdxl_dir, allow_sdxl=True)
    for name, tokenizer in (("text_encoder", pipe.tokenizer), ("text_encoder_2", pipe.tokenizer_2)):
        table = np.asarray(pipe.modules()[name].embeddings.token_embedding.embedding[...])
        initial = table[tokenizer.convert_tokens_to_ids("painting</w>")]
        assert np.abs(straight[name] - initial).max() > 1e-3


def assert_sdxl_token_encodes_as_in_diffusers(sdxl_dir, token_file, prompt):
    """The clip_l/clip_g file read by `sample --embeddings` (`add_embeddings`) and by diffusers'
    `load_textual_inversion` into each encoder gives the same ids, prompt embeddings and pooled embedding."""
    from diffusers import StableDiffusionXLPipeline
    from safetensors.torch import load_file

    pipe = load_pipeline(sdxl_dir, allow_sdxl=True)
    (token,) = pipe.add_embeddings(token_file)
    ids = pipe.token_ids([prompt])
    ours = encode_prompt(pipe.text_encoder, pipe.text_encoder_2, *map(jnp.asarray, ids),
                         extra_token_rows=tuple(map(jnp.asarray, pipe.extra_token_rows)))
    reference = StableDiffusionXLPipeline.from_pretrained(sdxl_dir)
    state = load_file(token_file)
    reference.load_textual_inversion(state["clip_l"], token=token, text_encoder=reference.text_encoder,
                                     tokenizer=reference.tokenizer)
    reference.load_textual_inversion(state["clip_g"], token=token, text_encoder=reference.text_encoder_2,
                                     tokenizer=reference.tokenizer_2)
    with torch.no_grad():
        expected = reference.encode_prompt(prompt, do_classifier_free_guidance=False)
    for tokenizer, our_ids in zip((reference.tokenizer, reference.tokenizer_2), ids):
        text = reference.maybe_convert_prompt(prompt, tokenizer)
        np.testing.assert_array_equal(tokenizer(text, padding="max_length", truncation=True,
                                                max_length=tokenizer.model_max_length).input_ids, our_ids[0])
    for got, want in zip(ours, (expected[0], expected[2])):
        want = want.numpy()
        assert np.abs(np.asarray(got) - want).max() / np.abs(want).max() <= 1e-4


def test_textual_inversion_trains_both_encoders_rows_and_its_export_encodes_as_in_diffusers(sdxl_dir, style_dir,
                                                                                          tmp_path):
    config = sdxl_config(sdxl_dir, style_dir, method="textual_inversion",
                         train__sample_every_steps=2, sample__steps=2, sample__count=1, sample__scheduler="euler")
    result = trainer.train(config, tmp_path / "work", progress=False)
    assert (tmp_path / "work" / "samples" / "step_000002.png").is_file()  # previews draw with both rows
    token_file = tmp_path / "tiny-style.safetensors"
    assert main(["export", "--workdir", str(tmp_path / "work"), "--output", str(token_file), "--format", "a1111"]) == 0
    from safetensors.numpy import load_file

    for path in (tmp_path / "work" / "learned_embeds.safetensors", token_file):
        state = load_file(path)
        assert set(state) == {"clip_l", "clip_g"}
        np.testing.assert_array_equal(state["clip_l"], result.trained["text_encoder"])
        np.testing.assert_array_equal(state["clip_g"], result.trained["text_encoder_2"])
    assert_sdxl_token_encodes_as_in_diffusers(sdxl_dir, token_file, "a cat in the style of tiny-style")


def test_leaf_projection_refines_each_encoders_gradient_on_its_own(sdxl_dir, style_dir):
    """One NSYNC step's (g_p, g_n) of both encoders' rows, and the update of variant `orthogonal` with
    `granularity="leaf"`: per encoder, g_p - <g_p, g_n> / <g_n, g_n> g_n (numpy), not over their concatenation."""
    config = sdxl_config(sdxl_dir, style_dir, nsync__variant="orthogonal")
    pipe = load_pipeline(sdxl_dir, allow_sdxl=True)
    method = methods.get("nsync")
    trainable = trainables.get("embeddings").for_model(True, config, method)
    graphdefs, frozen, rows = trainable.split(pipe, config, method, method.frozen_modules(config))
    data = method.prepare(pipe, train_data.read_style_dataset(config), config, None, False)
    spec = train_step.StepSpec(graphdefs, train_step.NoiseSchedule.from_config(pipe.scheduler_config),
                               pipe.vae.config.scaling_factor, jnp.float32, 0, trainable=trainable,
                               time_ids=trainer.training_time_ids(config))
    gradients = method.gradients(spec, config)
    positive, extra, _ = jax.jit(gradients)(rows, frozen, data.batch(0), jax.random.key(0))
    negative = extra["negative_grads"]
    refined, _ = orthogonal_projection("orthogonal", "leaf").update(positive, (), **extra)
    for name in ("text_encoder", "text_encoder_2"):
        p, n = np.asarray(positive[name], np.float64), np.asarray(negative[name], np.float64)
        expected = p - np.vdot(p, n) / np.vdot(n, n) * n
        np.testing.assert_allclose(np.asarray(refined[name]), expected, rtol=1e-5, atol=1e-7)
        assert np.abs(p).max() > 0 and np.abs(n).max() > 0
    # The global form (an option) projects the two encoders' rows as one vector: another update.
    joint, _ = orthogonal_projection("orthogonal", "global").update(positive, (), **extra)
    assert not np.allclose(joint["text_encoder"], refined["text_encoder"])


@pytest.mark.parametrize("override, key", [
    (dict(method="styleforge", trainable="full", data__negatives="", styleforge__generate_aux=1),
     "method='styleforge' is not supported on Stable Diffusion XL yet: use textual_inversion, nsync or dreamartist"),
    (dict(train__weight_decay_scope="table"), "train.weight_decay_scope='table'"),
])
def test_what_sdxl_does_not_support_yet_is_refused_naming_the_key(sdxl_dir, style_dir, tmp_path, override, key):
    with pytest.raises(UserError, match=re.escape(key)):
        trainer.train(sdxl_config(sdxl_dir, style_dir, **override), tmp_path / "work", progress=False)
    assert not (tmp_path / "work").exists()


def test_the_released_scripts_pair_of_bin_files_reads_as_one_token(sdxl_dir, tmp_path):
    """`learned_embeds1/2-step-N.bin` (`{token: row}` for encoder 1 and 2), named by either file."""
    rng = np.random.default_rng(0)
    rows = {"1": rng.standard_normal(24, np.float32), "2": rng.standard_normal(40, np.float32)}
    for index, row in rows.items():
        torch.save({"<illustration-special>": torch.from_numpy(row)}, tmp_path / f"learned_embeds{index}-step-8.bin")
    pipe = load_pipeline(sdxl_dir, allow_sdxl=True)
    assert pipe.add_embeddings(tmp_path / "learned_embeds2-step-8.bin") == ["<illustration-special>"]
    np.testing.assert_array_equal(pipe.extra_token_rows[0], rows["1"][None])
    np.testing.assert_array_equal(pipe.extra_token_rows[1], rows["2"][None])
    first = tokens.load_sdxl_embeddings(tmp_path / "learned_embeds1-step-8.bin")
    jax.tree.map(np.testing.assert_array_equal, first, ({"<illustration-special>": rows["1"][None]},
                                                        {"<illustration-special>": rows["2"][None]}))
    (tmp_path / "learned_embeds2-step-8.bin").unlink()
    with pytest.raises(UserError, match=r"learned_embeds2-step-8\.bin: not found"):
        tokens.load_sdxl_embeddings(tmp_path / "learned_embeds1-step-8.bin")
