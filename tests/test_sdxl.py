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
from sdxl_fixtures import SDXL_VAE, TEXT_ENCODER_1, TEXT_ENCODER_2, sdxl_dir  # noqa: F401 (a fixture)

# Short, long (truncated to the tokenizers' 16 tokens), empty, and byte-level text.
PROMPTS = ["a photo of a cat", "a red dog in the style of a blue star circle painting of the cat in a photo", "",
           "Zebra, 42!"]
PROMPTS_2 = ["a blue star", "in the style of", "a red circle painting", ""]


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


def test_noise_prediction_from_prompts_matches_diffusers(sdxl, torch_pipe, encode):
    """The pieces together, as a sampling step uses them: prompts -> both encoders -> UNet with the pooled
    embedding and the micro-conditioning of a 64x48 image, against diffusers' own chain."""
    from conftest import jitted

    size = (64, 48)
    with torch.no_grad():
        embeds, _, pooled, _ = torch_pipe.encode_prompt(PROMPTS[:2], device="cpu", do_classifier_free_guidance=False)
        torch_time_ids = torch_pipe._get_add_time_ids(size, (0, 0), size, dtype=torch.float32,
                                                      text_encoder_projection_dim=TEXT_ENCODER_2["projection_dim"])
        latents = torch.randn(2, 4, 8, 6, generator=torch.Generator().manual_seed(0))
        reference = torch_pipe.unet(latents, 500, embeds, added_cond_kwargs=dict(
            text_embeds=pooled, time_ids=torch_time_ids.repeat(2, 1))).sample.numpy()
    ours_embeds, ours_pooled = encode(*sdxl.tokenize(PROMPTS[:2]))
    added_cond = {"text_embeds": jnp.asarray(ours_pooled),
                  "time_ids": jnp.broadcast_to(time_ids(size, (0, 0), size), (2, 6))}
    ours = jitted(sdxl.unet)(jnp.asarray(latents.numpy().transpose(0, 2, 3, 1)), jnp.array([500, 500]),
                             jnp.asarray(ours_embeds), added_cond)
    assert rel_error(np.asarray(ours).transpose(0, 3, 1, 2), reference) <= 1e-4


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


def test_load_pipeline_detects_sdxl_folders(sdxl_dir, sd1_dir):
    from nsync_jax.sdxl import StableDiffusionXL

    pipe = load_pipeline(sdxl_dir, allow_sdxl=True)
    assert isinstance(pipe, StableDiffusionXL) and not isinstance(load_pipeline(sd1_dir), StableDiffusionXL)
    # UNet sample_size 8 latents, the tiny VAE's factor 2 (SDXL base: 128 x 8 = 1024).
    assert (pipe.vae_scale_factor, pipe.default_resolution) == (2, 16)
    assert pipe.force_zeros_for_empty_prompt
    # Callers that do not handle SDXL (editing) get one line, not an attribute error later.
    with pytest.raises(UserError, match=f"{sdxl_dir}: a Stable Diffusion XL folder; on SDXL only sample, negatives"):
        load_pipeline(sdxl_dir)


def test_force_upcast_vae_decodes_in_float32(sdxl_dir, tmp_path):
    """SDXL's VAE overflows in half precision: with `force_upcast` it keeps float32 weights in a bfloat16 model."""
    dtypes = lambda pipe: (pipe.unet.conv_in.kernel[...].dtype, pipe.vae.decoder.conv_in.kernel[...].dtype)
    assert dtypes(load_sdxl(sdxl_dir, dtype=jnp.bfloat16)) == (jnp.bfloat16, jnp.float32)
    folder = edited_copy(sdxl_dir, tmp_path, "vae", force_upcast=False)
    assert dtypes(load_sdxl(folder, dtype=jnp.bfloat16)) == (jnp.bfloat16, jnp.bfloat16)


# unet/config.json and text_encoder_2/config.json of stabilityai/stable-diffusion-xl-base-1.0.
SDXL_BASE_UNET = {
    "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.19.0.dev0", "act_fn": "silu",
    "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64, "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280], "center_input_sample": False,
    "class_embed_type": None, "class_embeddings_concat": False, "conv_in_kernel": 3, "conv_out_kernel": 3,
    "cross_attention_dim": 2048, "cross_attention_norm": None,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"], "downsample_padding": 1,
    "dual_cross_attention": False, "encoder_hid_dim": None, "encoder_hid_dim_type": None, "flip_sin_to_cos": True,
    "freq_shift": 0, "in_channels": 4, "layers_per_block": 2, "mid_block_only_cross_attention": None,
    "mid_block_scale_factor": 1, "mid_block_type": "UNetMidBlock2DCrossAttn", "norm_eps": 1e-05,
    "norm_num_groups": 32, "num_attention_heads": None, "num_class_embeds": None, "only_cross_attention": False,
    "out_channels": 4, "projection_class_embeddings_input_dim": 2816, "resnet_out_scale_factor": 1.0,
    "resnet_skip_time_act": False, "resnet_time_scale_shift": "default", "sample_size": 128,
    "time_cond_proj_dim": None, "time_embedding_act_fn": None, "time_embedding_dim": None,
    "time_embedding_type": "positional", "timestep_post_act": None, "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "upcast_attention": None,
    "use_linear_projection": True,
}
SDXL_BASE_TEXT_ENCODER_2 = {
    "architectures": ["CLIPTextModelWithProjection"], "attention_dropout": 0.0, "bos_token_id": 0, "dropout": 0.0,
    "eos_token_id": 2, "hidden_act": "gelu", "hidden_size": 1280, "initializer_factor": 1.0,
    "initializer_range": 0.02, "intermediate_size": 5120, "layer_norm_eps": 1e-05, "max_position_embeddings": 77,
    "model_type": "clip_text_model", "num_attention_heads": 20, "num_hidden_layers": 32, "pad_token_id": 1,
    "projection_dim": 1280, "torch_dtype": "float16", "transformers_version": "4.32.0.dev0", "vocab_size": 49408,
}


def flax_shapes(build) -> dict[str, tuple]:
    """PyTorch key -> PyTorch-layout shape of every parameter of `build(rngs)`, nothing allocated."""
    from nsync_jax import weights

    state = nnx.state(weights.abstract_module(build), nnx.Param)
    return {weights.torch_key(path): weights.to_torch_layout(np.empty(v.shape, np.uint8), path).shape
            for path, v in nnx.to_flat_state(state)}


@pytest.mark.slow
def test_released_sdxl_unet_config_builds_diffusers_shapes():
    """SDXL base's UNet: every parameter's name and shape as diffusers builds it (on torch's meta device: shapes
    only); slow because building the shapes of 2.6 B parameters in NNX takes 10 s or more."""
    from diffusers import UNet2DConditionModel as TorchUNet

    from nsync_jax.models.unet import UNet2DConditionModel, UNetConfig

    config = UNetConfig.from_dict(SDXL_BASE_UNET)
    assert config.num_attention_heads == (5, 10, 20)
    assert config.transformer_layers_per_block == (1, 2, 10)
    ours = flax_shapes(lambda rngs: UNet2DConditionModel(config, rngs=rngs))
    with torch.device("meta"):
        reference = TorchUNet.from_config({k: v for k, v in SDXL_BASE_UNET.items() if not k.startswith("_")})
    assert ours == {key: tuple(value.shape) for key, value in reference.state_dict().items()}
    assert sum(np.prod(shape) for shape in ours.values()) == 2_567_463_684


def test_released_text_encoder_2_config_builds_transformers_shapes():
    """SDXL base's OpenCLIP bigG text encoder with its projection, as transformers builds it (shapes only)."""
    from transformers import CLIPTextConfig as TorchCLIPTextConfig
    from transformers import CLIPTextModelWithProjection as TorchCLIPTextModelWithProjection

    from nsync_jax.models.clip_text import CLIPTextModelWithProjection, CLIPTextWithProjectionConfig

    config = CLIPTextWithProjectionConfig.from_dict(SDXL_BASE_TEXT_ENCODER_2)
    ours = flax_shapes(lambda rngs: CLIPTextModelWithProjection(config, rngs=rngs))
    with torch.device("meta"):
        reference = TorchCLIPTextModelWithProjection(TorchCLIPTextConfig(**SDXL_BASE_TEXT_ENCODER_2))
    assert ours == {key.removeprefix("text_model."): tuple(value.shape)
                    for key, value in reference.state_dict().items()}
    assert sum(np.prod(shape) for shape in ours.values()) == 694_659_840
