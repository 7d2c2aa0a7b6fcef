"""LoRA: low-rank adapters on the linear layers of the UNet and the text encoder, and their diffusers files.

Where LoRA lives: `add_lora` replaces each targeted `nnx.Linear` of a loaded module, in place, by a
`LoRALinear` that keeps the same `kernel` and `bias` variables under the same names (so the frozen part of
the model has exactly the paths and values of the base model) and adds two `nnx.LoRAParam`s next to them:

  lora_down `(in, rank)`   random: kaiming-uniform, bound 1/sqrt(in) (peft's default for lora_A)
  lora_up   `(rank, out)`  zero, so the adapted model is the base model until the first update

and computes `x W + b + (alpha / rank) (x down) up`. A rank below 1 is a fraction of each layer's output width
(its rank max(round(out rank), 1), HCP-Diffusion's relative ranks), so layers' ranks and scales differ. The
trainer selects the adapters with the NNX filter `nnx.LoRAParam` (`nnx.split(module, nnx.LoRAParam, ...)`);
everything else stays frozen.

Files: `lora_state_dict` writes one of two key layouts, both of which diffusers' `load_lora_weights` reads
for Stable Diffusion 1.x/2.x and XL:

  diffusers  peft-style `unet.<module>.lora_A.weight` `(rank, in)`, `unet.<module>.lora_B.weight` `(out, rank)`,
             `text_encoder.text_model.<module>...` (SDXL's second encoder: `text_encoder_2.text_model.<module>`,
             its projection `text_encoder_2.text_projection`); diffusers gives a file without alphas the scale 1,
             so alpha/rank is folded into lora_B.
  kohya      kohya-ss's, which A1111 and ComfyUI read: `lora_unet_<module>.lora_down.weight` `(rank, in)`,
             `.lora_up.weight` `(out, rank)` and a scalar `.alpha`, text encoder `lora_te_text_model_<module>`;
             `<module>` is the diffusers module path with `_` for `.` (kohya trains SD 1.x on diffusers' UNet).
             SDXL files name the encoders `lora_te1_`, `lora_te2_`, and the UNet's layers as in the SGM UNet kohya
             trains SDXL on (`input_blocks.4.1.transformer_blocks.0.attn1.to_q` for diffusers'
             `down_blocks.1.attentions.0...`: `sgm_module_path`).

`read_lora_file` and `merge_lora` fold either into plain weights (W + alpha/rank B A; alpha = rank when a
module has no `.alpha`); a kohya UNet name may be either model's (diffusers' or SGM's).
"""
from __future__ import annotations

import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nsync_jax.errors import UserError

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # diffusers' attention projections
FEED_FORWARD_TARGETS = ("ff.net.0.proj", "ff.net.2")  # the transformer blocks' GEGLU input and output
# The prefix of each component's keys in a diffusers LoRA file; a text encoder's module follows `text_model.`
# (`text_module_name`).
FILE_PREFIXES = {"unet": "unet.", "text_encoder": "text_encoder.", "text_encoder_2": "text_encoder_2."}
# kohya's: SD 1.x/2.x's text encoder is `lora_te_`, SDXL's two are `lora_te1_` and `lora_te2_`.
KOHYA_PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te_"}
KOHYA_SDXL_PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
_LINEAR_ATTRIBUTES = ("in_features", "out_features", "use_bias", "dtype", "param_dtype", "precision",
                      "dot_general", "promote_dtype", "preferred_element_type")


def initial_adapter(key: jax.Array, in_features: int, rank: int, out_features: int) -> tuple[jax.Array, jax.Array]:
    """A new adapter's `(lora_down (in, rank), lora_up (rank, out))`: see the module docstring."""
    bound = 1.0 / np.sqrt(in_features)
    return (jax.random.uniform(key, (in_features, rank), jnp.float32, -bound, bound),
            jnp.zeros((rank, out_features), jnp.float32))


class LoRALinear(nnx.Module):
    """An `nnx.Linear` plus a low-rank update; the base layer's variables and arithmetic are kept as they are."""

    def __init__(self, base: nnx.Linear, *, rank: int, alpha: float, key: jax.Array):
        for name in _LINEAR_ATTRIBUTES:
            setattr(self, name, getattr(base, name))
        self.kernel, self.bias = base.kernel, base.bias
        self.scale = alpha / rank
        down, up = initial_adapter(key, base.in_features, rank, base.out_features)
        self.lora_down, self.lora_up = nnx.LoRAParam(down), nnx.LoRAParam(up)

    def __call__(self, x: jax.Array) -> jax.Array:
        y = nnx.Linear.__call__(self, x)  # the base layer exactly (its dtype promotion and precision)
        down, up = self.lora_down[...], self.lora_up[...]
        x, down, up = self.promote_dtype((x, down, up), dtype=self.dtype)
        return y + ((x @ down) @ up * self.scale).astype(y.dtype)


def _path_matches(path: str, targets) -> bool:
    return any(path == t or path.endswith("." + t) for t in targets)


def layer_rank(rank: int | float, out_features: int) -> int:
    """A layer's rank: `rank`, or with `rank` below 1 that fraction of the layer's output width (at least 1)."""
    return rank if rank >= 1 else max(round(out_features * rank), 1)


def add_lora(module: nnx.Module, targets, *, rank: int | float, alpha: float, key: jax.Array,
             setting: str = "lora.targets") -> list[str]:
    """Puts a `LoRALinear` in place of every `nnx.Linear` of `module` whose dotted path ends with one of
    `targets` (e.g. `to_q`, `to_out.0`), of rank `layer_rank(rank, out_features)`; returns their paths. Each
    adapter's key is `fold_in(key, index)`; `setting` is the config key an error names."""
    found = [(path, m) for path, m in nnx.iter_modules(module)
             if type(m) is nnx.Linear and _path_matches(".".join(map(str, path)), targets)]
    if not found:
        raise UserError(f"config {setting}={list(targets)}: no linear layer of the "
                        f"{type(module).__name__} matches")
    for index, (path, linear) in enumerate(found):
        parent = module
        for part in path[:-1]:
            parent = parent[part] if isinstance(part, int) else getattr(parent, part)
        adapted = LoRALinear(linear, rank=layer_rank(rank, linear.out_features), alpha=alpha,
                             key=jax.random.fold_in(key, index))
        if isinstance(path[-1], int):
            parent[path[-1]] = adapted
        else:
            setattr(parent, path[-1], adapted)
    return [".".join(map(str, path)) for path, _ in found]


# ------------------------------------------------------------------------------------------------------------
# Trainable parameters as flat dicts {dotted path: array}: what the optimizer, Orbax and export see.
# ------------------------------------------------------------------------------------------------------------

def flat_params(state) -> dict[str, jax.Array]:
    """An NNX state as `{"down_blocks.0....to_q.lora_down": array}`."""
    return {".".join(map(str, path)): variable[...] for path, variable in nnx.to_flat_state(state)}


def fresh_adapters(like: dict[str, dict[str, jax.Array]], key: jax.Array) -> dict[str, dict[str, jax.Array]]:
    """New adapters of the shapes of `like` (`{component: {"<module>.lora_down": (in, r), ...}}`), drawn from
    `key` as `add_lora` draws them: another set for the same layers."""
    fresh = {}
    for index, component in enumerate(sorted(like)):
        flat, fresh[component] = like[component], {}
        downs = sorted(path for path in flat if path.endswith(".lora_down"))
        for layer, down_path in enumerate(downs):
            up_path = down_path.removesuffix("_down") + "_up"
            (in_features, rank), out_features = flat[down_path].shape, flat[up_path].shape[1]
            fresh[component][down_path], fresh[component][up_path] = initial_adapter(
                jax.random.fold_in(jax.random.fold_in(key, index), layer), in_features, rank, out_features)
    return fresh


def nested_params(flat: dict) -> dict:
    """The inverse of `flat_params`, as the nested pure dict `nnx.merge` accepts (list indices as ints)."""
    tree: dict = {}
    for key, value in flat.items():
        node = tree
        *parents, leaf = [int(p) if p.isdigit() else p for p in key.split(".")]
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


# ------------------------------------------------------------------------------------------------------------
# LoRA files (diffusers and kohya layouts).
# ------------------------------------------------------------------------------------------------------------

def text_module_name(module: str) -> str:
    """A text encoder layer's name in transformers' state dict: under `text_model.`, except SDXL's
    `text_projection`, which `CLIPTextModelWithProjection` keeps beside it."""
    return module if module.split(".")[0] == "text_projection" else "text_model." + module


# The SGM UNet's names of diffusers' linear layers outside the blocks, and of a resnet's one linear layer.
_SGM_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
            "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}
_SGM_RESNET = {"time_emb_proj": "emb_layers.1"}
_BLOCK_LAYER = re.compile(r"^(?P<level>down_blocks|mid_block|up_blocks)\.(?:(?P<block>\d+)\.)?"
                          r"(?P<kind>resnets|attentions)\.(?P<index>\d+)\.(?P<rest>.+)$")


def sgm_module_path(path: str, layers_per_block: tuple[int, ...]) -> str | None:
    """The name of the diffusers UNet's linear layer `path` in the SGM (LDM) UNet, which kohya trains SDXL on
    and whose `input_blocks`, `middle_block` and `output_blocks` number a level's resnets and attentions
    together: diffusers' `down_blocks.1.attentions.0.<rest>` is `input_blocks.4.1.<rest>` with 2 layers per block.
    `layers_per_block`: the UNet's, per down block. None where the SGM UNet has no such linear layer."""
    if path in _SGM_TOP:
        return _SGM_TOP[path]
    match = _BLOCK_LAYER.match(path)
    if not match or (match["level"] == "mid_block") == bool(match["block"]):
        return None
    level, kind, index, rest = match["level"], match["kind"], int(match["index"]), match["rest"]
    if kind == "resnets":
        if rest not in _SGM_RESNET:
            return None
        rest = _SGM_RESNET[rest]
    if level == "mid_block":
        position = {("resnets", 0): 0, ("attentions", 0): 1, ("resnets", 1): 2}.get((kind, index))
        return None if position is None else f"middle_block.{position}.{rest}"
    block, inner = int(match["block"]), 0 if kind == "resnets" else 1
    if level == "down_blocks":  # input_blocks.0 is conv_in; each level is its layers, then a downsampler
        return f"input_blocks.{1 + sum(n + 1 for n in layers_per_block[:block]) + index}.{inner}.{rest}"
    # Each up level has one layer more than its down level (the last one holds the upsampler too).
    return f"output_blocks.{sum(n + 1 for n in layers_per_block[::-1][:block]) + index}.{inner}.{rest}"


def lora_state_dict(params: dict[str, dict[str, np.ndarray]], alpha: float, layout: str = "diffusers",
                    sdxl_layers_per_block: tuple[int, ...] | None = None) -> dict[str, np.ndarray]:
    """The file keys, in layout "diffusers" or "kohya" (see the module docstring), of trained adapters
    `{component: {"<module>.lora_down": (in, r), ...}}` whose scale is alpha / r (r: each adapter's rank).
    `sdxl_layers_per_block`: an SDXL model's UNet `layers_per_block`, for kohya's SDXL names; None for SD 1.x/2.x."""
    state = {}
    for component, flat in params.items():
        for key, down in flat.items():
            if not key.endswith(".lora_down"):
                continue
            module = key.removesuffix(".lora_down")
            down = np.ascontiguousarray(np.asarray(down, np.float32).T)
            up = np.ascontiguousarray(np.asarray(flat[module + ".lora_up"], np.float32).T)
            name = module if component == "unet" else text_module_name(module)
            if layout == "diffusers":
                prefix = FILE_PREFIXES[component] + name
                state[prefix + ".lora_A.weight"] = down
                state[prefix + ".lora_B.weight"] = up * np.float32(alpha / down.shape[0])
                continue
            if sdxl_layers_per_block is None:
                prefix = KOHYA_PREFIXES[component] + name.replace(".", "_")
            else:
                if component == "unet":
                    name = sgm_module_path(module, sdxl_layers_per_block)
                    if name is None:
                        raise UserError(f"the UNet's layer {module!r} has no name in kohya's SDXL layout (its SGM "
                                        "UNet): export with --format diffusers-lora")
                prefix = KOHYA_SDXL_PREFIXES[component] + name.replace(".", "_")
            state[prefix + ".lora_down.weight"], state[prefix + ".lora_up.weight"] = down, up
            state[prefix + ".alpha"] = np.asarray(alpha, np.float32)
    return state


# A down matrix's key in each layout read: diffusers/peft, diffusers' older `lora.down`, kohya; and its up key.
_KEY = re.compile(r"^(?P<module>.+)\.(?P<down>lora_A|lora\.down|lora_down)\.weight$")
_UP = {"lora_A": "lora_B", "lora.down": "lora.up", "lora_down": "lora_up"}
# Key prefixes per component in either layout (SD's and SDXL's kohya names).
_READ_PREFIXES = [(component, prefix) for prefixes in (FILE_PREFIXES, KOHYA_PREFIXES, KOHYA_SDXL_PREFIXES)
                  for component, prefix in prefixes.items()]


def read_lora_file(path: Path) -> dict[str, dict[str, np.ndarray]]:
    """The weight deltas of a LoRA file (either layout): `{component: {module: delta kernel (in, out)}}`, in
    Flax layout (delta = alpha/rank B A, transposed); `module` is this project's module path (kohya files:
    with `_` for `.`, and SGM names for an SDXL UNet, which `merge_lora` matches)."""
    from nsync_jax.weights import read_state_dict

    return read_lora_state(read_state_dict(Path(path)), source=path)


def read_lora_state(state: dict[str, np.ndarray], source: Path | str) -> dict[str, dict[str, np.ndarray]]:
    """`read_lora_file` for a state dict already read."""
    path = source
    deltas: dict[str, dict[str, np.ndarray]] = {component: {} for component in FILE_PREFIXES}
    used = set()
    for key in state:
        match = _KEY.match(key)
        if not match:
            continue
        name = match["module"]
        up_key = f"{name}.{_UP[match['down']]}.weight"
        if up_key not in state:
            raise UserError(f"{path}: {key!r} has no matching {up_key!r}")
        down, up = np.asarray(state[key], np.float32), np.asarray(state[up_key], np.float32)
        rank = down.shape[0]
        alpha = float(np.asarray(state[name + ".alpha"])) if name + ".alpha" in state else rank
        for component, prefix in _READ_PREFIXES:
            if name.startswith(prefix):
                module = name.removeprefix(prefix)
                if component != "unet":  # diffusers files may lack `text_model.`
                    module = re.sub(r"^text_model[._]", "", module)
                deltas[component][module] = ((alpha / rank) * (up @ down)).T
                break
        else:
            raise UserError(f"{path}: LoRA key {key!r} is not for the unet or a text encoder")
        used.update({key, up_key, name + ".alpha"})
    unexpected = sorted(set(state) - used)
    if unexpected:
        raise UserError(f"{path}: unexpected key {unexpected[0]!r} (expected diffusers/peft LoRA keys "
                        "'unet.<module>.lora_A.weight', 'unet.<module>.lora_B.weight' or kohya's "
                        "'lora_unet_<module>.lora_down.weight', '.lora_up.weight', '.alpha')")
    if not any(deltas.values()):
        raise UserError(f"{path}: no LoRA weights in the file")
    return deltas


def _linears_by_name(component: str, module: nnx.Module) -> dict[str, nnx.Linear]:
    """The linear layers of `module` by module path with `_` for `.`, which matches both layouts' names (no two
    layers differ only there); a UNet's also by their SGM names (kohya's SDXL files)."""
    linears = {}
    for path, m in nnx.iter_modules(module):
        if isinstance(m, nnx.Linear):
            dotted = ".".join(map(str, path))
            names = [dotted, sgm_module_path(dotted, module.config.layers_per_block) if component == "unet" else None]
            linears.update({name.replace(".", "_"): m for name in names if name})
    return linears


def merge_lora(modules: dict[str, nnx.Module], deltas: dict[str, dict[str, np.ndarray]], scale: float = 1.0,
               source: Path | str = "LoRA file") -> None:
    """Adds `scale * delta` to each targeted linear kernel of `modules` (`{"unet": ..., "text_encoder": ...}`),
    in float32, keeping each kernel's dtype."""
    for component, per_module in deltas.items():
        if not per_module:
            continue
        if component not in modules:
            raise UserError(f"{source}: holds LoRA weights for a {component}, which the model has not (an SDXL "
                            "LoRA on Stable Diffusion 1.x/2.x?)")
        linears = _linears_by_name(component, modules[component])
        for name, delta in per_module.items():
            if name.replace(".", "_") not in linears:
                raise UserError(f"{source}: the {component} has no linear layer {name!r}")
            kernel = linears[name.replace(".", "_")].kernel
            if tuple(kernel.shape) != delta.shape:
                raise UserError(f"{source}: {component} {name}: LoRA of shape {delta.shape[::-1]}, the layer is "
                                f"{tuple(kernel.shape)[::-1]}")
            merged = kernel[...].astype(jnp.float32) + scale * jnp.asarray(delta)
            kernel[...] = merged.astype(kernel.dtype)


def read_lora_metadata(path: Path) -> dict:
    """What `write_lora_file` recorded in a LoRA's header (`{}` for files from other tools or without a header)."""
    import json

    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if path.suffix != ".safetensors":
        return {}
    try:
        with safe_open(str(path), framework="numpy") as f:
            recorded = (f.metadata() or {}).get("nsync_jax", "{}")
    except (SafetensorError, OSError) as e:
        raise UserError(f"{path}: cannot read safetensors header ({e})") from None
    try:
        metadata = json.loads(recorded)
    except json.JSONDecodeError:
        raise UserError(f"{path}: header key 'nsync_jax' is not JSON") from None
    return metadata if isinstance(metadata, dict) else {}


def write_lora_file(path: Path, params: dict[str, dict[str, np.ndarray]], alpha: float,
                    metadata: dict | None = None, layout: str = "diffusers",
                    sdxl_layers_per_block: tuple[int, ...] | None = None) -> None:
    """Writes trained adapters as a LoRA `.safetensors` in `layout` (see `lora_state_dict`), atomically;
    `metadata` goes into the file's header as JSON under `nsync_jax`."""
    import json

    from safetensors.numpy import save_file

    from nsync_jax.files import atomic_write

    state = lora_state_dict(params, alpha, layout, sdxl_layers_per_block)
    header = {"format": "pt", "nsync_jax": json.dumps(metadata or {}, sort_keys=True)}
    atomic_write(Path(path), lambda tmp: save_file(state, str(tmp), metadata=header))


def recorded_handoff(lora_files: list[Path]) -> int:
    """The handoff timestep the LoRA files were trained for (their `train.max_timestep`, which `write_lora_file`
    records as `handoff_timestep`), 0 where none is; files that record different ones are an error."""
    recorded = {}
    for path in lora_files:
        value = read_lora_metadata(path).get("handoff_timestep") or 0
        if not isinstance(value, int) or value < 0:
            raise UserError(f"{path}: header key 'handoff_timestep' must be a non-negative integer, got {value!r}")
        recorded[path] = value
    if len(set(recorded.values())) > 1:
        listed = ", ".join(f"{path}: {value}" for path, value in recorded.items())
        raise UserError(f"the --lora files record different handoff timesteps ({listed}); pass --handoff-timestep")
    return next(iter(recorded.values()), 0)
