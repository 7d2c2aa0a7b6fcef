"""Stable Diffusion XL folders: loading, both text encoders' prompt encoding and the micro-conditioning, against
diffusers' `StableDiffusionXLPipeline` on a tiny random SDXL (tests/sdxl_fixtures.py)."""
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from nsync_jax.errors import UserError
from nsync_jax.pipeline import load_pipeline
from nsync_jax.sdxl import encode_prompt, load_sdxl, time_ids
from sdxl_fixtures import SDXL_VAE, TEXT_ENCODER_1, TEXT_ENCODER_2, build_tiny_sdxl

# Short, long (truncated to the tokenizers' 16 tokens), empty, and byte-level text.
PROMPTS = ["a photo of a cat", "a red dog in the style of a blue star circle painting of the cat in a photo", "",
           "Zebra, 42!"]
PROMPTS_2 = ["a blue star", "in the style of", "a red circle painting", ""]


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory, tiny_tokenizer_dir):
    return build_tiny_sdxl(tmp_path_factory.mktemp("sdxl"), tiny_tokenizer_dir)


@pytest.fixture(scope="module")
def torch_pipe(sdxl_dir):
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline.from_pretrained(sdxl_dir)


@pytest.fixture(scope="module")
def sdxl(sdxl_dir):
    return load_sdxl(sdxl_dir)


@pytest.fixture(scope="module")
def encode(sdxl):
    """`encode_prompt` on both encoders, compiled once (the encoders' parameters are jit arguments)."""
    graphdef, state = nnx.split((sdxl.text_encoder, sdxl.text_encoder_2))
    fn = jax.jit(lambda state, ids, ids_2, rows, clip_skip: encode_prompt(
        *nnx.merge(graphdef, state), ids, ids_2, extra_token_rows=rows, clip_skip=clip_skip), static_argnums=4)
    return lambda ids, ids_2, rows=None, clip_skip=0: jax.tree.map(
        np.asarray, fn(state, jnp.asarray(ids), jnp.asarray(ids_2), rows, clip_skip))


def rel_error(ours, reference) -> float:
    return float(np.abs(ours - reference).max() / np.abs(reference).max())


def test_loads_every_part(sdxl):
    assert sdxl.text_encoder.config.hidden_size == TEXT_ENCODER_1["hidden_size"]
    assert sdxl.text_encoder_2.config.projection_dim == TEXT_ENCODER_2["projection_dim"]
    assert sdxl.unet.config.addition_embed_type == "text_time"
    assert sdxl.vae.config.scaling_factor == SDXL_VAE["scaling_factor"]
    assert sdxl.scheduler_config["_class_name"] == "EulerDiscreteScheduler"
    assert set(sdxl.modules()) == {"text_encoder", "text_encoder_2", "unet", "vae"}


def test_tokenizers_pad_as_diffusers(sdxl, torch_pipe):
    ids, ids_2 = sdxl.tokenize(PROMPTS)
    for ours, tokenizer in ((ids, torch_pipe.tokenizer), (ids_2, torch_pipe.tokenizer_2)):
        reference = tokenizer(PROMPTS, padding="max_length", max_length=tokenizer.model_max_length,
                              truncation=True, return_tensors="np").input_ids
        np.testing.assert_array_equal(ours, reference)
    # The second tokenizer pads with "!" (as OpenCLIP's does, id 0 in SDXL's vocabulary), the first with its eos.
    assert sdxl.tokenizer_2.pad_token == "!"
    assert ids_2[0, -1] == sdxl.tokenizer_2.convert_tokens_to_ids("!") != ids[0, -1] == sdxl.tokenizer.eos_token_id


@pytest.mark.parametrize("prompts_2, clip_skip", [(None, 0), (PROMPTS_2, 0), (None, 1)])
def test_encode_prompt_matches_diffusers(prompts_2, clip_skip, sdxl, torch_pipe, encode):
    with torch.no_grad():
        embeds, _, pooled, _ = torch_pipe.encode_prompt(PROMPTS, prompts_2, device="cpu",
                                                       do_classifier_free_guidance=False,
                                                       clip_skip=clip_skip or None)
    ours, ours_pooled = encode(*sdxl.tokenize(PROMPTS, prompts_2), clip_skip=clip_skip)
    assert ours.shape == tuple(embeds.shape) == (4, 16, TEXT_ENCODER_1["hidden_size"] + TEXT_ENCODER_2["hidden_size"])
    assert ours_pooled.shape == tuple(pooled.shape) == (4, TEXT_ENCODER_2["projection_dim"])
    assert rel_error(ours, embeds.numpy()) <= 1e-4
    assert rel_error(ours_pooled, pooled.numpy()) <= 1e-4


def test_negative_prompt_encoding_matches_diffusers(sdxl, torch_pipe, encode):
    """A negative prompt is encoded as a prompt (diffusers zeroes it only when none is given)."""
    with torch.no_grad():
        _, negative, _, negative_pooled = torch_pipe.encode_prompt(
            PROMPTS[:2], device="cpu", do_classifier_free_guidance=True, negative_prompt=PROMPTS[2:])
    ours, ours_pooled = encode(*sdxl.tokenize(PROMPTS[2:]))
    assert rel_error(ours, negative.numpy()) <= 1e-4
    assert rel_error(ours_pooled, negative_pooled.numpy()) <= 1e-4


def test_learned_rows_stand_in_for_table_rows(sdxl, encode):
    """Ids past each table select that encoder's extra rows: here copies of the rows the prompt uses."""
    ids, ids_2 = sdxl.tokenize(PROMPTS[:1])
    rows, moved = [], []
    for encoder, encoder_ids in ((sdxl.text_encoder, ids), (sdxl.text_encoder_2, ids_2)):
        table = encoder.embeddings.token_embedding.embedding[...]
        rows.append(table[encoder_ids[0, 1:3]])
        moved.append(encoder_ids.copy())
        moved[-1][0, 1:3] = len(table) + np.arange(2)
    expected = encode(ids, ids_2)
    for ours, reference in zip(encode(*moved, tuple(rows)), expected):
        np.testing.assert_allclose(ours, reference, rtol=0, atol=1e-6)
    # Other rows, other states: the rows are not ignored.
    other = encode(*moved, tuple(r[::-1] for r in rows))
    assert rel_error(other[0], expected[0]) > 1e-3


def test_clip_skip_out_of_range(sdxl, encode):
    with pytest.raises(UserError, match="clip_skip=3 is out of range: .* 3 layers"):
        encode(*sdxl.tokenize(PROMPTS[:1]), clip_skip=3)


def test_time_ids_match_diffusers(torch_pipe):
    reference = torch_pipe._get_add_time_ids((768, 1024), (16, 32), (1024, 512), dtype=torch.float32,
                                             text_encoder_projection_dim=TEXT_ENCODER_2["projection_dim"])
    ours = time_ids((768, 1024), (16, 32), (1024, 512))
    assert ours.dtype == np.float32
    np.testing.assert_array_equal(ours[None], reference.numpy())


def edited_copy(sdxl_dir, tmp_path, part, **changes):
    folder = tmp_path / "sdxl"
    shutil.copytree(sdxl_dir, folder)
    config = folder / part / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), **changes}))
    return folder


def test_conditioning_widths_are_checked(sdxl_dir, tmp_path):
    # addition_time_embed_dim shapes no weight, so only the width check can catch it.
    folder = edited_copy(sdxl_dir, tmp_path, "unet", addition_time_embed_dim=4)
    with pytest.raises(UserError, match=r"unet/config.json: config projection_class_embeddings_input_dim=76, "
                                        r"but text_encoder_2's projection_dim and 6 time ids .* make 52"):
        load_sdxl(folder)


def test_not_sdxl_and_missing_parts(sd1_dir, sdxl_dir, tmp_path):
    with pytest.raises(UserError, match=f"{sd1_dir}: not a Stable Diffusion XL folder"):
        load_sdxl(sd1_dir)
    folder = edited_copy(sdxl_dir, tmp_path, "unet")
    shutil.rmtree(folder / "tokenizer_2")
    with pytest.raises(UserError, match=f"{folder}: subfolder tokenizer_2/ missing"):
        load_sdxl(folder)


def test_load_pipeline_refuses_sdxl(sdxl_dir):
    with pytest.raises(UserError, match=f"{sdxl_dir}: a Stable Diffusion XL folder .* not supported yet"):
        load_pipeline(sdxl_dir)
