"""Learned embeddings in the files the PyTorch world loads.

* `diffusers`: `learned_embeds.safetensors` with one key, the placeholder token, holding float32
  `(num_vectors, width)`; diffusers' `load_textual_inversion` reads it (expanding several vectors to
  `<tok>`, `<tok>_1`, ...), and so does A1111 (the trigger word is then the file name). A JSON sidecar
  records where it came from. Needs no torch.
* `a1111`: A1111's `.pt` layout (`string_to_param`), written with torch (the `torch` extra).

One file holds one word: diffusers' `load_textual_inversion` refuses a file with several keys. A run that
learns several words (DreamArtist's `<tok>` and `<tok>-neg`) writes one file per word, named by
`sibling_path` (`name.pt`, `name-neg.pt`: A1111 takes the file name as the word).

Files are written under a temporary name and renamed, so a crash never leaves half a file.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np

from nsync_jax.errors import UserError
from nsync_jax.files import atomic_folder, atomic_write, write_json

FORMATS = ("diffusers", "a1111")
# Formats of LoRA and full fine-tuning runs (trainer.export_run); the LoRA ones by their key layout (lora.py).
LORA_FORMATS = {"diffusers-lora": "diffusers", "a1111-lora": "kohya"}
MODEL_FORMATS = (*LORA_FORMATS, "diffusers-pipeline")
# The weight files a diffusers folder's unet/ and text_encoder/ may hold; replaced on export.
_WEIGHT_FILE_STEMS = ("diffusion_pytorch_model", "model", "pytorch_model")


def sibling_path(path: Path, suffix: str) -> Path:
    """`dir/name.ext` -> `dir/name<suffix>.ext`: where a run's other words go next to its first."""
    path = Path(path)
    return path.with_name(f"{path.stem}{suffix}{path.suffix}")


def write_embeddings(path: Path, token: str, rows: np.ndarray, *, fmt: str = "diffusers",
                     metadata: dict[str, Any] | None = None) -> None:
    """Writes `rows` `(num_vectors, width)` for `token` in format `fmt`, with a `.json` sidecar of `metadata`."""
    rows = np.ascontiguousarray(np.asarray(rows, np.float32))
    if fmt == "diffusers":
        from safetensors.numpy import save_file

        atomic_write(path, lambda tmp: save_file({token: rows}, str(tmp)))
    elif fmt == "a1111":
        try:
            import torch
        except ImportError:
            raise UserError("--format a1111 writes a PyTorch .pt file and needs the torch extra "
                            "(pip install 'nsync_jax[torch]'); --format diffusers needs no torch") from None
        payload = {"string_to_token": {"*": 265}, "string_to_param": {"*": torch.from_numpy(rows)},
                   "name": token, "step": (metadata or {}).get("step", 0),
                   "sd_checkpoint": None, "sd_checkpoint_name": None}
        atomic_write(path, lambda tmp: torch.save(payload, str(tmp)))
    else:
        raise UserError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    write_sidecar(path, metadata)


def write_sdxl_embeddings(path: Path, clip_l: np.ndarray, clip_g: np.ndarray, *,
                          metadata: dict[str, Any] | None = None) -> None:
    """One SDXL token as A1111, ComfyUI and Civitai share it: a safetensors file with `clip_l` `(n, 768)` (text
    encoder 1's rows) and `clip_g` `(n, 1280)` (encoder 2's), whose name is the token; a `.json` sidecar of
    `metadata`."""
    from safetensors.numpy import save_file

    state = {name: np.ascontiguousarray(np.asarray(rows, np.float32)) for name, rows in
             (("clip_l", clip_l), ("clip_g", clip_g))}
    atomic_write(path, lambda tmp: save_file(state, str(tmp)))
    write_sidecar(path, metadata)


def write_sidecar(path: Path, metadata: dict[str, Any] | None) -> None:
    """`metadata` (where a run's file came from) as the `.json` next to the file at `path`."""
    if metadata is not None:
        write_json(Path(path).with_suffix(".json"), metadata, sort_keys=True)


def write_diffusers_pipeline(output: Path, base: Path, modules: dict[str, Any], variant: str | None = None) -> None:
    """A complete diffusers Stable Diffusion (or SDXL) folder at `output`: every file of the base folder `base`
    (copied, not linked, from a Hugging Face cache snapshot), with the weights of the components in `modules`
    (`{"unet": ..., "text_encoder": ..., "text_encoder_2": ...}`, NNX modules) replaced, as float32 safetensors.
    The base's `variant` weight files (`*.fp16.safetensors`) take the plain names, so the folder loads without a
    variant. Written to a temporary folder, then renamed: never half a folder."""
    output, base = Path(output), Path(base)

    def skip_weights(folder, names):
        if Path(folder).name not in modules:
            return []
        return [n for n in names if n.split(".")[0] in _WEIGHT_FILE_STEMS and not n.endswith(".json")
                or n.endswith(".index.json")]

    with atomic_folder(output, exists_hint="give a new folder") as temporary:
        shutil.copytree(base, temporary, ignore=skip_weights, dirs_exist_ok=True)  # follows the cache's links
        for path in temporary.glob(f"*/*.{variant}.*") if variant else ():
            path.replace(path.with_name(path.name.replace(f".{variant}.", ".")))
        for name, module in modules.items():
            write_module_weights(temporary / name, name, module)


# The weight file of each component in a diffusers folder.
WEIGHT_FILES = {"vae": "diffusion_pytorch_model.safetensors", "unet": "diffusion_pytorch_model.safetensors",
                "text_encoder": "model.safetensors", "text_encoder_2": "model.safetensors"}


def write_module_weights(folder: Path, name: str, module) -> None:
    """Component `name`'s weights (an NNX module) as `folder/<its weight file>`: float32 safetensors under the
    names diffusers and transformers read (`text_model.` before a text encoder's, except SDXL's `text_projection`,
    which transformers' `CLIPTextModelWithProjection` keeps beside `text_model`)."""
    from safetensors.numpy import save_file

    from nsync_jax.weights import module_state_dict

    state = module_state_dict(module)
    if name.startswith("text_encoder"):  # transformers' CLIPTextModel keeps its weights under text_model.
        state = {k if k.startswith("text_projection.") else f"text_model.{k}": v for k, v in state.items()}
    save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, str(Path(folder) / WEIGHT_FILES[name]),
              metadata={"format": "pt"})
