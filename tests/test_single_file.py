"""Single-file checkpoints in the original LDM / A1111 layout: written here from the tiny diffusers test models
(the inverse of diffusers' conversion, checked by converting back with diffusers' own converters), loaded
through `load_pipeline` and `sample`, cached, detected, and refused in one line when they are not checkpoints."""
import re
from pathlib import Path

import huggingface_hub
import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import load_file, save_file

from nsync_jax import single_file, sources
from nsync_jax.cli import main
from nsync_jax.errors import UserError
from nsync_jax.pipeline import load_pipeline
from nsync_jax.weights import module_state_dict

RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
          "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
OPEN_CLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
                   "self_attn.out_proj": "attn.out_proj"}


def unet_to_ldm(key: str, config: dict) -> str:
    """The LDM name of a diffusers UNet parameter (`openaimodel.UNetModel`'s input/middle/output blocks)."""
    per_down, per_up = config["layers_per_block"], config["layers_per_block"] + 1
    fixed = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
    name, parameter = key.rsplit(".", 1)
    if name in fixed:
        return f"{fixed[name]}.{parameter}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        block, kind, layer, rest = int(m[1]), m[2], int(m[3]), m[4]
        prefix = f"input_blocks.{(per_down + 1) * block + layer + 1}.{0 if kind == 'resnets' else 1}"
    elif m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"input_blocks.{(per_down + 1) * (int(m[1]) + 1)}.0.op.{m[2]}"
    elif m := re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", key):
        kind, layer, rest = m[1], int(m[2]), m[3]
        prefix = f"middle_block.{2 * layer if kind == 'resnets' else 1}"
    elif m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        block, kind, layer, rest = int(m[1]), m[2], int(m[3]), m[4]
        prefix = f"output_blocks.{per_up * block + layer}.{0 if kind == 'resnets' else 1}"
    elif m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        block = int(m[1])
        with_attention = config["up_block_types"][block].startswith("CrossAttn")
        return f"output_blocks.{per_up * block + per_up - 1}.{2 if with_attention else 1}.conv.{m[2]}"
    else:
        raise AssertionError(f"no LDM name for UNet key {key}")
    if kind == "resnets":
        first, _, tail = rest.partition(".")
        rest = f"{RESNET[first]}.{tail}"
    return f"{prefix}.{rest}"


def vae_to_ldm(key: str, config: dict) -> str:
    """The LDM name of a diffusers VAE parameter (`first_stage_model`'s encoder.down / decoder.up, reversed)."""
    key = re.sub(r"^(encoder|decoder)\.conv_norm_out", r"\1.norm_out", key)
    key = re.sub(r"mid_block\.resnets\.(\d)", lambda m: f"mid.block_{int(m[1]) + 1}", key)
    key = re.sub(r"mid_block\.attentions\.0\.([a-z_]+(?:\.0)?)\.",
                 lambda m: f"mid.attn_1.{VAE_ATTENTION[m[1]]}.", key)
    key = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0", r"encoder.down.\1.downsample", key)
    key = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets", r"encoder.down.\1.block", key)
    last = len(config["up_block_types"]) - 1
    key = re.sub(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0", lambda m: f"decoder.up.{last - int(m[1])}.upsample",
                 key)
    key = re.sub(r"decoder\.up_blocks\.(\d+)\.resnets", lambda m: f"decoder.up.{last - int(m[1])}.block", key)
    return key.replace("conv_shortcut", "nin_shortcut")


def open_clip_state(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """An SD 2.x text encoder as OpenCLIP names it: fused q/k/v (`in_proj`), `resblocks`, `ln_final`."""
    out = {"token_embedding.weight": state["text_model.embeddings.token_embedding.weight"],
           "positional_embedding": state["text_model.embeddings.position_embedding.weight"],
           "ln_final.weight": state["text_model.final_layer_norm.weight"],
           "ln_final.bias": state["text_model.final_layer_norm.bias"]}
    layers = {int(m[1]) for k in state if (m := re.match(r"text_model\.encoder\.layers\.(\d+)\.", k))}
    for i in layers:
        layer = f"text_model.encoder.layers.{i}"
        for parameter in ("weight", "bias"):
            out[f"transformer.resblocks.{i}.attn.in_proj_{parameter}"] = np.concatenate(
                [state[f"{layer}.self_attn.{p}_proj.{parameter}"] for p in "qkv"])
            for ours, theirs in OPEN_CLIP_LAYER.items():
                out[f"transformer.resblocks.{i}.{theirs}.{parameter}"] = state[f"{layer}.{ours}.{parameter}"]
    return out


def ldm_checkpoint(folder: Path) -> dict[str, np.ndarray]:
    """The diffusers folder's weights in one LDM-layout state dict, as an A1111 checkpoint holds them."""
    import json

    def read(part, name="diffusion_pytorch_model.safetensors"):
        return load_file(str(folder / part / name)), json.loads((folder / part / "config.json").read_text())

    unet, unet_config = read("unet")
    vae, vae_config = read("vae")
    text, text_config = read("text_encoder", "model.safetensors")
    # transformers 5 saves CLIPTextModel without its `text_model.` prefix; checkpoints have it.
    text = {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in text.items()}
    state = {f"model.diffusion_model.{unet_to_ldm(k, unet_config)}": v for k, v in unet.items()}
    for key, value in vae.items():
        if ".attentions." in key and value.ndim == 2:  # LDM's VAE attention projections are 1x1 convolutions
            value = value[:, :, None, None]
        state[f"first_stage_model.{vae_to_ldm(key, vae_config)}"] = value
    if text_config["hidden_act"] == "quick_gelu":  # SD 1.x: OpenAI CLIP through transformers, names kept
        state.update({f"cond_stage_model.transformer.{k}": v for k, v in text.items()
                      if not k.endswith("position_ids")})
    else:
        state.update({f"cond_stage_model.model.{k}": v for k, v in open_clip_state(text).items()})
    return state


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """An empty Hugging Face home, offline: conversions land in it."""
    home = tmp_path / "hf-home"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HOME", str(home))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return home


def states(pipe) -> dict[str, dict[str, np.ndarray]]:
    return {name: module_state_dict(module) for name, module in pipe.modules().items()}


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_ldm_file_converts_back_to_the_folder(family, sd1_dir, sd2_dir, tmp_path, cache):
    folder = sd1_dir if family == "sd1" else sd2_dir
    checkpoint = tmp_path / f"tiny-{family}.safetensors"
    save_file(ldm_checkpoint(folder), str(checkpoint))
    pipe = load_pipeline(checkpoint, model_config=folder)
    assert pipe.folder.is_relative_to(cache / "nsync-jax" / "single-file")
    assert pipe.folder.parent.name == single_file.file_digest(checkpoint)
    original = load_pipeline(folder)
    for part, expected in states(original).items():
        got = states(pipe)[part]
        assert got.keys() == expected.keys()
        for key in expected:
            np.testing.assert_array_equal(got[key], expected[key], err_msg=f"{part} {key}")
    assert pipe.scheduler_config["prediction_type"] == original.scheduler_config["prediction_type"]
    assert pipe.tokenizer("a red star").input_ids == original.tokenizer("a red star").input_ids
