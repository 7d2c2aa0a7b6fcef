"""PyTorch weights of the metric networks -> the files `evaluate` reads (`nsync-jax convert-weights`).

The Flax modules and their loading stay in `models/` (`inception`, `clip_vision`); this module only converts,
checking that the result loads into the module it is for before anything is written. Each converter needs the
`torch` extra and writes under a temporary name, then renames, so its output is complete or absent.

* `convert_inception(src, dst, variant)`: pytorch-fid's or torchvision's Inception-v3 `.pth` -> one
  `.safetensors` file (PyTorch's names and layouts) for `inception.load_inception`.
* `convert_openai_clip(src_pt, dst_folder)`: OpenAI's `ViT-*.pt` release files (TorchScript) or a plain state
  dict of OpenAI's layout -> a transformers `CLIPVisionModelWithProjection` folder (config.json +
  model.safetensors, tensors kept in the source's dtype; the image tower only) for `clip_vision.load_clip_vision`.
* `convert_csd(src_checkpoint, dst_folder)`: CSD's training checkpoint -> a folder for `clip_vision.load_csd`:
  the backbone as a transformers `CLIPVisionModel` plus `style_projection.weight`, which is `last_layer_style`
  transposed (transformers' `Linear` layout, as `visual_projection.weight`); `projection_dim` in its
  config.json is the style embedding's size. The content head is dropped (no metric uses it).
* `openai_to_transformers(state_dict)`: the renaming and layout change behind the last two.
* `convert_lpips(backbone, heads, dst, net)`: torchvision's AlexNet or VGG-16 `.pth` and lpips'
  `weights/v0.1/{alex,vgg}.pth` -> one `.safetensors` file for `lpips.load_lpips` (`evaluate-edits`).
* `convert_dino(src, dst_folder)`: DINO's ViT release file (`dino_vitbase8_pretrain.pth`, timm's layout) ->
  a transformers `ViTModel` folder, as `facebook/dino-vitb8` on the Hub, for `vit.load_vit`.
"""
from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from nsync_jax import weights
from nsync_jax.errors import UserError
from nsync_jax.files import atomic_folder, atomic_write
from nsync_jax.models import clip_vision, inception, lpips, vit


# ------------------------------------------------------------------------------------------------ Inception-v3

def convert_inception(src: Path, dst: Path, variant: str) -> Path:
    """Converts PyTorch Inception-v3 weights (pytorch-fid's or torchvision's `.pth`) to `dst` (.safetensors).

    The state dict must load into `variant` (the two are told apart by the classifier's size, 1008 or 1000);
    `AuxLogits.*` and `num_batches_tracked` are dropped. `dst` is written under a temporary name in its folder
    and then renamed, so it is either complete or absent. The tensors keep PyTorch's names and layouts.
    """
    from safetensors.numpy import save_file

    src, dst = Path(src), Path(dst)
    inception.check_variant(variant)
    if dst.suffix != ".safetensors":
        raise UserError(f"{dst}: the converted weights must be a .safetensors file")
    state = inception.read_inception_state(src)
    inception.inception_from_state(state, variant, src)  # checks every key and shape
    atomic_write(dst, lambda tmp: save_file({k: np.ascontiguousarray(v, np.float32) for k, v in state.items()},
                                            str(tmp), metadata={"format": "pt", "inception_variant": variant}))
    return dst


# ------------------------------------------------------------------------------------------------ CLIP and CSD

_RESBLOCK = re.compile(r"transformer\.resblocks\.(\d+)\.")


def openai_to_transformers(state_dict: dict[str, Any], *, prefix: str = "visual.", projection: bool = True,
                           source: Path | str = "state dict") -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """OpenAI CLIP's image tower (`clip/model.py` `VisionTransformer`) in transformers' layout.

    Args:
      state_dict: OpenAI's keys (`visual.conv1.weight`, `visual.transformer.resblocks.0.attn.in_proj_weight`, ...)
        to arrays; keys outside `prefix` (the text tower of a full CLIP file) are left out.
      prefix: where the image tower's keys start (`"backbone."` in CSD's checkpoints).
      projection: whether the tower has its `proj` (`x @ proj`, so `visual_projection.weight = proj.T`);
        CSD's has none.
      source: named in errors.

    Returns:
      The transformers `CLIPVisionConfig` dict (sizes read off the shapes; OpenAI's heads = width // 64, quick
      GELU, layer norm epsilon 1e-5) and the state dict (`vision_model.*`, `visual_projection.weight`),
      in the source's dtype. Missing, unexpected or inconsistent weights raise `UserError` naming `source`.
    """
    visual = {k[len(prefix):]: np.asarray(v) for k, v in state_dict.items() if k.startswith(prefix)}

    def take(name: str) -> np.ndarray:
        if name not in visual:
            raise UserError(f"{source}: missing weight {prefix + name!r}")
        return visual.pop(name)

    conv = take("conv1.weight")
    if conv.ndim != 4:
        raise UserError(f"{source}: weight {prefix + 'conv1.weight'!r} has shape {conv.shape}, expected 4 axes")
    width, channels, patch = conv.shape[0], conv.shape[1], conv.shape[-1]
    if width % 64:
        raise UserError(f"{source}: image tower width {width} is not a multiple of 64 (OpenAI CLIP has "
                        f"width // 64 heads)")
    positions = take("positional_embedding")
    grid = round((positions.shape[0] - 1) ** 0.5)
    if grid * grid + 1 != positions.shape[0]:
        raise UserError(f"{source}: weight {prefix + 'positional_embedding'!r} has {positions.shape[0]} rows, "
                        "not 1 + a square number of patches")
    out = {
        "vision_model.embeddings.patch_embedding.weight": conv,
        "vision_model.embeddings.class_embedding": take("class_embedding"),
        "vision_model.embeddings.position_embedding.weight": positions,
    }
    for src, dst in (("ln_pre", "pre_layrnorm"), ("ln_post", "post_layernorm")):
        for leaf in ("weight", "bias"):
            out[f"vision_model.{dst}.{leaf}"] = take(f"{src}.{leaf}")
    layers = sorted({int(m.group(1)) for k in visual if (m := _RESBLOCK.match(k))})
    if layers != list(range(len(layers))) or not layers:
        raise UserError(f"{source}: image tower layers {layers} are not numbered 0 to n-1")
    for i in layers:
        src, dst = f"transformer.resblocks.{i}.", f"vision_model.encoder.layers.{i}."
        qkv_weight = np.split(take(src + "attn.in_proj_weight"), 3)
        qkv_bias = np.split(take(src + "attn.in_proj_bias"), 3)
        for name, weight, bias in zip(("q_proj", "k_proj", "v_proj"), qkv_weight, qkv_bias):
            out[f"{dst}self_attn.{name}.weight"], out[f"{dst}self_attn.{name}.bias"] = weight, bias
        for ours, theirs in (("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"),
                             ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
            for leaf in ("weight", "bias"):
                out[f"{dst}{ours}.{leaf}"] = take(f"{src}{theirs}.{leaf}")
    config = {
        "architectures": ["CLIPVisionModelWithProjection" if projection else "CLIPVisionModel"],
        "model_type": "clip_vision_model",
        "hidden_size": width,
        "intermediate_size": int(out["vision_model.encoder.layers.0.mlp.fc1.weight"].shape[0]),
        "num_hidden_layers": len(layers),
        "num_attention_heads": width // 64,
        "num_channels": channels,
        "image_size": patch * grid,
        "patch_size": patch,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
    }
    if projection:
        proj = take("proj")
        out["visual_projection.weight"] = proj.T
        config["projection_dim"] = int(proj.shape[1])
    if visual:
        raise UserError(f"{source}: unexpected weight {prefix + min(visual)!r} in the image tower")
    return config, out


def _import_torch(path: Path):
    try:
        import torch
    except ImportError:
        raise UserError(f"{path}: converting it needs PyTorch; install the extra (pip install 'nsync_jax[torch]')"
                        ) from None
    return torch


def _check_converted(config: dict, state: dict, build, source: Path) -> None:
    """Loads the converted weights into the module they are for, so that a bad file fails before any write."""
    cfg = clip_vision.CLIPVisionConfig.from_dict(config, source)
    weights.load_module(weights.abstract_module(lambda rngs: build(cfg, rngs)), state, source=source)


def _write_folder(folder: Path, config: dict, state: dict[str, np.ndarray]) -> Path:
    """Writes config.json + model.safetensors into a new folder, atomically."""
    from safetensors.numpy import save_file

    with atomic_folder(folder, exists_hint="choose a new folder for the converted model") as temporary:
        (temporary / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, str(temporary / "model.safetensors"),
                  metadata={"format": "pt"})
    return Path(folder)


def _torch_state(state: dict) -> dict[str, np.ndarray]:
    return {k: weights.tensor_to_numpy(v) for k, v in state.items() if hasattr(v, "detach")}


def convert_openai_clip(src_pt: Path, dst_folder: Path) -> Path:
    """Converts the image tower of an OpenAI CLIP file (`ViT-L-14.pt`, `ViT-L-14-336px.pt`, ...) to a
    transformers `CLIPVisionModelWithProjection` folder for `load_clip_vision`.

    OpenAI's release files are TorchScript archives (read with `torch.jit.load`, which runs no pickled
    code); a plain state dict of the same keys is read with `torch.load(weights_only=True)`.
    """
    src = Path(src_pt)
    if not src.is_file():
        raise UserError(f"{src}: file not found")
    torch = _import_torch(src)
    try:
        with warnings.catch_warnings():  # torch 2.13 deprecates TorchScript, the format of OpenAI's files
            warnings.filterwarnings("ignore", "`torch.jit", DeprecationWarning)
            state = torch.jit.load(str(src), map_location="cpu").state_dict()
    except RuntimeError:  # not a TorchScript archive
        state = weights.read_torch_pickle(src)
    config, converted = openai_to_transformers(_torch_state(state), source=src)
    _check_converted(config, converted,
                     lambda cfg, rngs: clip_vision.CLIPVisionModelWithProjection(cfg, rngs=rngs), src)
    return _write_folder(dst_folder, config, converted)


def convert_csd(src_checkpoint: Path, dst_folder: Path) -> Path:
    """Converts CSD's checkpoint (learn2phoenix/CSD, e.g. HF `tomg-group-umd/CSD-ViT-L` `pytorch_model.bin`) to
    a folder for `load_csd`.

    The file is a training checkpoint, `{'model_state_dict', 'args', 'opt_bb', ...}`; only
    `model_state_dict` is kept: `module.backbone.*` (OpenAI's image tower without `proj`) and
    `module.last_layer_style`. Its pickle holds an `argparse.Namespace`, which `torch.load(weights_only=True)`
    refuses, so this is the one place that reads a pickle with `weights_only=False`: that runs code stored
    in the file. Convert only checkpoints you trust.
    """
    src = Path(src_checkpoint)
    if not src.is_file():
        raise UserError(f"{src}: file not found")
    torch = _import_torch(src)
    try:
        raw = torch.load(str(src), map_location="cpu", weights_only=False)
    except Exception as e:  # torch raises many types for corrupt pickles
        raise UserError(f"{src}: cannot read PyTorch file ({type(e).__name__}: {e})") from None
    if not isinstance(raw, dict):
        raise UserError(f"{src}: expected a dict, found {type(raw).__name__}")
    state = {k.removeprefix("module."): v for k, v in _torch_state(raw.get("model_state_dict", raw)).items()}
    if "last_layer_style" not in state:
        raise UserError(f"{src}: missing weight 'last_layer_style' (is this a CSD checkpoint?)")
    style = state.pop("last_layer_style")  # (hidden, style_dim), applied as feature @ style
    other = sorted(k for k in state if not k.startswith(("backbone.", "last_layer_content")))
    if other:
        raise UserError(f"{src}: unexpected weight {other[0]!r} in a CSD checkpoint")
    config, converted = openai_to_transformers(state, prefix="backbone.", projection=False, source=src)
    if style.ndim != 2 or style.shape[0] != config["hidden_size"]:
        raise UserError(f"{src}: weight 'last_layer_style' has shape {style.shape}, expected "
                        f"({config['hidden_size']}, style size)")
    config["projection_dim"] = int(style.shape[1])
    converted[clip_vision.STYLE_KEY] = style.T
    _check_converted(config, converted, lambda cfg, rngs: clip_vision.CSDStyleModel(cfg, rngs=rngs), src)
    return _write_folder(dst_folder, config, converted)


# ------------------------------------------------------------------------------------------------ LPIPS

_LPIPS_HEAD = re.compile(r"lin(\d)\.model\.1\.weight$")


def convert_lpips(backbone: Path, heads: Path, dst: Path, net: str) -> Path:
    """Converts LPIPS (`net` "alex" or "vgg") to `dst` (.safetensors) for `lpips.load_lpips`.

    `backbone` is torchvision's ImageNet file (`alexnet-owt-7be5be79.pth`, `vgg16-397923af.pth`; its
    `classifier.*` is dropped), `heads` lpips' `weights/v0.1/alex.pth` or `vgg.pth` (`lin{k}.model.1.weight`,
    stored as `heads.{k}.weight`). Every key and shape is checked against the network before `dst` is written
    (under a temporary name, then renamed).
    """
    from safetensors.numpy import save_file

    backbone, heads, dst = Path(backbone), Path(heads), Path(dst)
    lpips.check_net(net)
    if dst.suffix != ".safetensors":
        raise UserError(f"{dst}: the converted weights must be a .safetensors file")
    state = {k: v for k, v in weights.read_state_dict(backbone).items() if not k.startswith("classifier.")}
    for key, value in weights.read_state_dict(heads).items():
        if not (m := _LPIPS_HEAD.match(key)):
            raise UserError(f"{heads}: unexpected weight {key!r} in lpips' heads (expected lin0.model.1.weight, ...)")
        state[f"heads.{m.group(1)}.weight"] = value
    lpips.lpips_from_state(state, net, f"{backbone} + {heads}")
    atomic_write(dst, lambda tmp: save_file({k: np.ascontiguousarray(v, np.float32) for k, v in state.items()},
                                            str(tmp), metadata={"format": "pt", "lpips_net": net}))
    return dst


# ------------------------------------------------------------------------------------------------ DINO ViT

_DINO_BLOCK = re.compile(r"blocks\.(\d+)\.")
# DINO's (timm's) block names -> transformers' ViT names.
_DINO_RENAMES = (("norm1", "layernorm_before"), ("attn.proj", "attention.output.dense"),
                 ("norm2", "layernorm_after"), ("mlp.fc1", "intermediate.dense"), ("mlp.fc2", "output.dense"))


def dino_to_transformers(state: dict[str, np.ndarray], source: Path | str) -> tuple[dict, dict[str, np.ndarray]]:
    """DINO's `VisionTransformer` state dict in transformers' `ViTModel` layout, and its config dict.

    Sizes are read off the shapes; DINO's heads are width // 64 (ViT-S 6, ViT-B 12), its layer norms have
    epsilon 1e-6 and its MLP exact GELU. The fused `attn.qkv` is split into query, key and value.
    """
    state = dict(state)

    def take(name: str) -> np.ndarray:
        if name not in state:
            raise UserError(f"{source}: missing weight {name!r} (is this a DINO ViT file?)")
        return state.pop(name)

    conv = take("patch_embed.proj.weight")
    width, channels, patch = conv.shape[0], conv.shape[1], conv.shape[-1]
    positions = take("pos_embed")
    grid = round((positions.shape[1] - 1) ** 0.5)
    if width % 64 or grid * grid + 1 != positions.shape[1]:
        raise UserError(f"{source}: width {width} and {positions.shape[1]} positions are not a DINO ViT's "
                        "(a multiple of 64; 1 + a square number of patches)")
    out = {"embeddings.patch_embeddings.projection.weight": conv,
           "embeddings.patch_embeddings.projection.bias": take("patch_embed.proj.bias"),
           "embeddings.cls_token": take("cls_token"), "embeddings.position_embeddings": positions,
           "layernorm.weight": take("norm.weight"), "layernorm.bias": take("norm.bias")}
    layers = sorted({int(m.group(1)) for k in state if (m := _DINO_BLOCK.match(k))})
    if layers != list(range(len(layers))) or not layers:
        raise UserError(f"{source}: blocks {layers} are not numbered 0 to n-1")
    for i in layers:
        src, dst = f"blocks.{i}.", f"encoder.layer.{i}."
        for leaf in ("weight", "bias"):
            for name, part in zip(("query", "key", "value"), np.split(take(f"{src}attn.qkv.{leaf}"), 3)):
                out[f"{dst}attention.attention.{name}.{leaf}"] = part
            for theirs, ours in _DINO_RENAMES:
                out[f"{dst}{ours}.{leaf}"] = take(f"{src}{theirs}.{leaf}")
    if state:
        raise UserError(f"{source}: unexpected weight {min(state)!r} in a DINO ViT")
    config = {"architectures": ["ViTModel"], "model_type": "vit", "hidden_size": width,
              "intermediate_size": int(out["encoder.layer.0.intermediate.dense.weight"].shape[0]),
              "num_hidden_layers": len(layers), "num_attention_heads": width // 64, "num_channels": channels,
              "image_size": patch * grid, "patch_size": patch, "hidden_act": "gelu", "layer_norm_eps": 1e-6,
              "qkv_bias": True}
    return config, out


def convert_dino(src: Path, dst_folder: Path) -> Path:
    """Converts DINO's ViT release file (facebookresearch/dino `dino_vitbase8_pretrain.pth`, what Splice's
    `torch.hub.load('facebookresearch/dino:main', 'dino_vitb8')` loads) to a transformers `ViTModel` folder."""
    src = Path(src)
    config, converted = dino_to_transformers(weights.read_state_dict(src), src)
    cfg = vit.ViTConfig.from_dict(config, src)
    weights.load_module(weights.abstract_module(lambda rngs: vit.ViTModel(cfg, rngs=rngs)),
                        vit.to_encoder_names(converted), source=src)
    return _write_folder(dst_folder, config, converted)
