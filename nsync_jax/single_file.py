"""Single-file Stable Diffusion checkpoints (the original LDM layout that A1111, ComfyUI and Civitai use, and SDXL's
SGM layout) as diffusers folders.

`diffusers_folder` converts a `.safetensors` (or `.ckpt`, read by torch with `weights_only=True`) file with
diffusers' own single-file machinery (`StableDiffusionPipeline.from_single_file`, or
`StableDiffusionXLPipeline.from_single_file` as the config's model_index.json names it; torch on CPU) into a
diffusers folder, once: the folder is kept in the Hugging Face cache under the file's SHA-256, written under a
temporary name and renamed, so a second load reads it as fast as any folder and a failure leaves nothing behind.

The architecture is detected from the checkpoint's keys and shapes as diffusers detects it
(`infer_diffusers_model_type`), and its configs come from `architectures/` in this package (SD 1.x; SD 2.x base,
epsilon; SD 2.x 768-v, v-prediction; SDXL base 1.0), so a standard checkpoint converts with no network. An SD 2.x
file is v-prediction unless its `global_step` is 875000 (the 2-base release), as in diffusers; any other
architecture, or a different choice, is named with a config folder (diffusers' `config=`) or a shipped
architecture's name. The UNet gets the non-EMA weights of a file that has both, as diffusers' default. Other SDXL
types (refiner, inpainting, Playground) are refused.
"""
from __future__ import annotations

import hashlib
import pickle
import shutil
import tempfile
import types
from pathlib import Path

from nsync_jax import tokens, weights
from nsync_jax.errors import UserError
from nsync_jax.files import atomic_folder, write_text

PACKAGE = Path(__file__).resolve().parent
ARCHITECTURES = PACKAGE / "architectures"
# The Hub model whose configs each shipped folder holds: naming it as the config reads the shipped copy, offline.
ARCHITECTURE_IDS = {"stable-diffusion-v1-5/stable-diffusion-v1-5": "sd1",
                    "stabilityai/stable-diffusion-2-base": "sd2-base", "stabilityai/stable-diffusion-2-1": "sd2-v",
                    "stabilityai/stable-diffusion-xl-base-1.0": "sdxl-base"}
# The pipelines a config folder's model_index.json may name: the ones whose single files this module converts.
PIPELINES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline")
# OpenAI CLIP's BPE merges, shipped with the toy world: every SD and SDXL tokenizer's vocabulary is built from them.
CLIP_BPE = PACKAGE / "toyworld" / "assets" / "bpe_simple_vocab_16e6.txt.gz"
# The UNet's first convolution: every Stable Diffusion checkpoint in the LDM layout has it.
UNET_KEY = "model.diffusion_model.input_blocks.0.0.weight"
NEEDS_DIFFUSERS = "converting a single-file checkpoint needs torch and diffusers (pip install 'nsync_jax[single-file]')"
SD2_BASE_GLOBAL_STEP = 875000  # the step of the stable-diffusion-2-base release (epsilon prediction)


def read_shapes(path: Path) -> tuple[dict[str, tuple[int, ...]], int | None]:
    """The tensor shapes of a checkpoint file by key (its `state_dict`), and its `global_step` if it has one.

    A `.safetensors` file is read from its header alone; a truncated or corrupt file is a one-line error."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="numpy") as f:
                return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}, None
        except Exception as e:  # safetensors raises its own SafetensorError for a bad header or a short file
            raise UserError(f"{path}: not a readable safetensors file, truncated or corrupt ({e})") from None
    if path.suffix not in (".ckpt", ".pt", ".pth"):
        raise UserError(f"{path}: not a model folder or a single-file checkpoint (.safetensors or .ckpt)")
    state = _torch_load(path)
    global_step = state.get("global_step")
    while isinstance(state.get("state_dict"), dict):  # Lightning checkpoints nest the weights
        state = state["state_dict"]
    return {k: tuple(v.shape) for k, v in state.items() if hasattr(v, "shape")}, global_step


def _torch_load(path: Path) -> dict:
    try:
        import torch
    except ImportError:
        raise UserError(f"{path}: a .ckpt file needs torch (pip install 'nsync_jax[single-file]'), or use its "
                        ".safetensors version") from None
    try:
        try:  # mapped, not read: only the shapes are wanted here
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)  # the legacy (pre-zip) format
    except pickle.UnpicklingError:
        raise UserError(f"{path}: holds Python objects besides tensors, which torch.load(weights_only=True) refuses "
                        "to run; use a .safetensors version of it") from None
    except Exception as e:  # zip and torch errors alike
        raise UserError(f"{path}: not a readable checkpoint, truncated or corrupt ({str(e).strip().splitlines()[0]})"
                        ) from None
    if not isinstance(state, dict):
        raise UserError(f"{path}: not a Stable Diffusion checkpoint (holds a {type(state).__name__}, not a "
                        "state dict)")
    return state


def detect_architecture(shapes: dict[str, tuple[int, ...]], global_step: int | None, *, source: Path) -> str:
    """The shipped architecture (a folder of `architectures/`) of an LDM-layout checkpoint's `shapes`, as
    diffusers' `infer_diffusers_model_type` reads them."""
    try:
        from diffusers.loaders.single_file_utils import infer_diffusers_model_type
    except ImportError:
        raise UserError(f"{source}: {NEEDS_DIFFUSERS}") from None

    model_type = infer_diffusers_model_type({k: types.SimpleNamespace(shape=s) for k, s in shapes.items()})
    if model_type == "v1":
        return "sd1"
    if model_type == "v2":
        return "sd2-base" if global_step == SD2_BASE_GLOBAL_STEP else "sd2-v"
    if model_type == "xl_base":
        return "sdxl-base"
    raise UserError(f"{source}: a checkpoint of type {model_type} (as diffusers names it); nsync-jax reads "
                    "text-to-image Stable Diffusion 1.x, 2.x and SDXL base checkpoints")


def file_digest(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def config_digest(folder: Path) -> str:
    """A short hash of a config folder's JSON and tokenizer files: a conversion depends on them."""
    digest = hashlib.sha256()
    for file in sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.suffix in (".json", ".txt")):
        digest.update(file.relative_to(folder).as_posix().encode() + b"\0" + file.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def diffusers_folder(path: Path, cache: Path, config: str | Path | None = None) -> Path:
    """The diffusers folder converted from checkpoint file `path`, kept in `cache` under the file's SHA-256.

    `config` is a shipped architecture's name (`sd1`, `sd2-base`, `sd2-v`, `sdxl-base`) or a diffusers folder whose
    configs and tokenizer describe the checkpoint (its weights are not read); by default the architecture is
    detected."""
    path = Path(path)
    shapes, global_step = read_shapes(path)
    if UNET_KEY not in shapes:
        raise UserError(f"{path}: not a Stable Diffusion checkpoint in the original (LDM / A1111) layout (no "
                        f"{UNET_KEY})")
    converted = cache / file_digest(path)
    if config is None:
        detected = converted / "detected-architecture"  # detecting imports diffusers: a second load reads this
        if detected.is_file():
            config = detected.read_text().strip()
        else:
            config = detect_architecture(shapes, global_step, source=path)
            write_text(detected, config)
    target = converted / (config if isinstance(config, str) else f"config-{config_digest(config)}")
    if (target / "model_index.json").is_file():
        return target
    with tempfile.TemporaryDirectory() as scratch:
        if isinstance(config, str):
            config = shipped_config(config, Path(scratch) / config)
        try:
            with atomic_folder(target) as folder:
                _convert(path, config, folder)
        except (OSError, UserError):  # the rename, or the folder found on entry
            if not (target / "model_index.json").is_file():
                raise
            # another process (a host of the same run) converted it meanwhile: its folder is as good
    return target


def shipped_config(architecture: str, folder: Path) -> Path:
    """A config folder for `architecture`: the shipped configs, with the CLIP vocabulary of each tokenizer (SDXL
    has two) built from its merges."""
    shutil.copytree(ARCHITECTURES / architecture, folder)
    for tokenizer in sorted(folder.glob("tokenizer*")):
        settings = {name: (tokenizer / name).read_bytes()
                    for name in ("special_tokens_map.json", "tokenizer_config.json")}
        tokens.write_clip_tokenizer(tokenizer, tokens.clip_bpe_merges(CLIP_BPE))
        for name, data in settings.items():  # SD 2.x and SDXL's second pad with "!", not CLIP's end-of-text token
            (tokenizer / name).write_bytes(data)
    return folder


def _convert(path: Path, config: Path, folder: Path) -> None:
    pipeline = weights.read_json(config / "model_index.json").get("_class_name")
    if pipeline not in PIPELINES:
        raise UserError(f"{config / 'model_index.json'}: a {pipeline} pipeline; single-file checkpoints convert "
                        f"with the configs of a {' or '.join(PIPELINES)}")
    try:
        import diffusers
    except ImportError:
        raise UserError(f"{path}: {NEEDS_DIFFUSERS}") from None
    try:
        pipe = getattr(diffusers, pipeline).from_single_file(str(path), config=str(config), local_files_only=True)
    except Exception as e:  # diffusers raises ValueError, KeyError, RuntimeError for keys or shapes that do not fit
        raise UserError(f"{path}: cannot convert with the configs of {config} ({type(e).__name__}: "
                        f"{str(e).strip().splitlines()[0] if str(e).strip() else 'no message'})") from None
    pipe.save_pretrained(folder, safe_serialization=True)
