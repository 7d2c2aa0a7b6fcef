"""Where a model comes from: one reference names it everywhere (`--model`, `config.model`, `load_pipeline`).

`resolve_model` turns a reference into a local diffusers Stable Diffusion (or SDXL) folder:

- an existing folder is used as it is;
- a Hugging Face Hub id (`org/name`, with an optional revision and weight variant such as `fp16`) is fetched with
  `huggingface_hub` into its standard cache (`HF_HOME`, `HF_HUB_CACHE`): only the files `load_pipeline` reads,
  `.safetensors` rather than `.bin`, and only the asked variant's weights. With `HF_HUB_OFFLINE=1` only the cache
  is read;
- a single-file checkpoint (`.safetensors`, `.ckpt`) in the original LDM / A1111 (or SDXL's SGM) layout is
  converted once into a diffusers folder kept in the Hugging Face cache (`single_file`); `model_config` names its
  architecture's configs when they are not the detected standard ones: a folder, a Hub id (only its configs are
  fetched), or a shipped architecture (`sd1`, `sd2-base`, `sd2-v`, `sdxl-base`, or the Hub id they come from).

Every failure is one `UserError` naming what was asked and what to do.
"""
from __future__ import annotations

import contextlib
import re
from pathlib import Path
from typing import Iterable, Iterator

from nsync_jax import single_file, weights
from nsync_jax.errors import UserError

# What `load_pipeline` reads besides the weights, as patterns of paths in a model repository.
# (SDXL's second text encoder and tokenizer included: patterns an SD repository lacks match nothing.)
CONFIG_FILES = ("model_index.json", "scheduler/scheduler_config.json", "text_encoder/config.json", "tokenizer/*",
                "text_encoder_2/config.json", "tokenizer_2/*", "unet/config.json", "vae/config.json")
# The stems of each model's weight files.
WEIGHT_STEMS = {"text_encoder": weights.TRANSFORMERS_WEIGHTS, "text_encoder_2": weights.TRANSFORMERS_WEIGHTS,
                "unet": weights.DIFFUSERS_WEIGHTS, "vae": weights.DIFFUSERS_WEIGHTS}
HUB_ID = re.compile(r"\w[\w.-]*/\w[\w.-]*")
# A variant's weight file, e.g. unet/diffusion_pytorch_model.fp16.safetensors (group 1: the variant).
VARIANT_FILE = re.compile(rf"[^/]+/(?:{'|'.join(weights.DIFFUSERS_WEIGHTS + weights.TRANSFORMERS_WEIGHTS)})"
                          r"\.(\w+)\.(?:safetensors|bin)")


def resolve_model(reference: str | Path, *, revision: str | None = None, variant: str | None = None,
                  model_config: str | Path | None = None) -> Path:
    """The local diffusers folder that `reference` names: a folder, a Hub id fetched into the Hugging Face cache
    (at `revision`, default the main branch, with the `variant`'s weight files, e.g. "fp16"), or a single-file
    checkpoint converted into the cache (with the configs `model_config` names, or those of its detected
    architecture)."""
    path = Path(reference)
    if model_config and not path.is_file():
        raise UserError(f"{reference}: a model config ({model_config}) describes a single-file checkpoint; a "
                        "diffusers folder or Hub id has its own")
    if path.is_dir():
        if revision:
            raise UserError(f"{path}: a revision ({revision}) picks a version of a Hugging Face Hub model; a local "
                            "folder has none")
        if variant:
            weight_patterns(files_under(path), variant, source=path)  # fails if the folder lacks the variant
        return path
    if path.is_file():
        if revision or variant:
            raise UserError(f"{path}: a {'revision' if revision else 'variant'} ({revision or variant}) picks files "
                            "of a Hugging Face Hub model or folder; a single-file checkpoint has none")
        from huggingface_hub import constants

        cache = Path(constants.HF_HOME) / "nsync-jax" / "single-file"
        return single_file.diffusers_folder(path, cache, _model_config(model_config) if model_config else None)
    if HUB_ID.fullmatch(str(reference)):
        return _from_hub(str(reference), revision, variant)
    raise UserError(f"{reference}: model folder not found")


def _model_config(reference: str | Path) -> str | Path:
    """A single file's configs: a local folder holding them, or a shipped architecture's name."""
    if Path(reference).is_dir():
        return Path(reference)
    name = single_file.ARCHITECTURE_IDS.get(str(reference), str(reference))
    if name in single_file.ARCHITECTURE_IDS.values():
        return name
    if HUB_ID.fullmatch(str(reference)):
        return _from_hub(str(reference), None, None, configs_only=True)
    raise UserError(f"{reference}: model config not found (a diffusers folder, a Hugging Face Hub id, or one of "
                    f"{', '.join(single_file.ARCHITECTURE_IDS.values())})")


def resolve_vae(reference: str | Path) -> Path:
    """The local diffusers VAE folder (`config.json` and weights) that `reference` names: a VAE folder, a model
    folder with `vae/`, or the Hub id of a VAE repository such as stabilityai/sd-vae-ft-mse."""
    path = Path(reference)
    if path.is_dir():
        folder = path / "vae" if (path / "vae" / "config.json").is_file() else path
        if not (folder / "config.json").is_file():
            raise UserError(f"{path}: not a diffusers VAE folder (no config.json, no vae/config.json)")
        return folder
    if not HUB_ID.fullmatch(str(reference)):
        raise UserError(f"{reference}: VAE folder not found")
    import huggingface_hub

    with hub_errors(str(reference), None, what="VAE"):
        return Path(huggingface_hub.snapshot_download(
            str(reference), allow_patterns=["config.json", "diffusion_pytorch_model.safetensors"],
            local_files_only=huggingface_hub.is_offline_mode()))


def files_under(folder: Path) -> list[str]:
    """The files of a folder, as paths relative to it with `/`."""
    return [p.relative_to(folder).as_posix() for p in Path(folder).rglob("*") if p.is_file()]


def weight_patterns(files: Iterable[str], variant: str | None = None, *, source: str | Path) -> list[str]:
    """The weight files to fetch from a repository holding `files`: per model, the first of
    `weights.weight_file_names` present (never `.bin` when `.safetensors` exist; the variant's files before the
    plain ones), with the shards of a sharded index (`unet/diffusion_pytorch_model-*.safetensors`).

    A `variant` that no model has is an error naming `source`, as in diffusers."""
    files = set(files)
    chosen, found_variant = [], False
    for part, stems in WEIGHT_STEMS.items():
        name = next((n for n in weights.weight_file_names(stems, variant) if f"{part}/{n}" in files), None)
        if name is None:
            continue  # load_pipeline names what is missing
        chosen.append(f"{part}/{name}")
        is_variant = name not in weights.weight_file_names(stems)
        found_variant |= is_variant
        if ".index." in name:  # a sharded index; shards: <stem>[.<variant>]-00001-of-00002.<extension>
            stem, extension = name.split(".")[:2]
            chosen.append(f"{part}/{stem}{f'.{variant}' if is_variant else ''}-*.{extension}")
    if variant and not found_variant:
        there = sorted({m[1] for f in files if (m := VARIANT_FILE.fullmatch(f))})
        raise UserError(f"{source}: no weight files of variant {variant!r} (such as unet/"
                        f"{weights.with_variant('diffusion_pytorch_model.safetensors', variant)}); variants there: "
                        f"{', '.join(there) or 'none'}")
    return chosen


def _from_hub(repo_id: str, revision: str | None, variant: str | None, *, configs_only: bool = False) -> Path:
    """The snapshot folder of `repo_id` in the Hugging Face cache, with the files `load_pipeline` reads (only the
    configs and tokenizer if `configs_only`)."""
    import huggingface_hub
    from huggingface_hub import errors

    def download(revision: str | None, patterns) -> Path:
        return Path(huggingface_hub.snapshot_download(repo_id, revision=revision, allow_patterns=list(patterns),
                                                      local_files_only=huggingface_hub.is_offline_mode()))

    with hub_errors(repo_id, revision):
        folder = download(revision, CONFIG_FILES)  # a snapshot folder is named by its commit
        if configs_only:
            return folder
        try:
            files = [f.path for f in huggingface_hub.get_cached_repo_tree(repo_id, revision=folder.name)]
        except errors.CachedRepoTreeNotFoundError:  # a cache filled without the repository's listing
            files = files_under(folder)
        name = repo_id + (f" (revision {revision})" if revision else "")
        return download(folder.name, [*CONFIG_FILES, *weight_patterns(files, variant, source=name)])


@contextlib.contextmanager
def hub_errors(repo_id: str, revision: str | None, *, what: str = "model") -> Iterator[None]:
    """Turns `huggingface_hub`'s failures to fetch `repo_id` (a `what`: "model", "VAE") into one-line `UserError`s
    that name it and say what to do."""
    import huggingface_hub
    from huggingface_hub import errors

    name = repo_id + (f" (revision {revision})" if revision else "")
    try:
        yield
    except errors.IncompleteSnapshotError:
        raise UserError(f"{name}: the cached snapshot lacks files this {what} needs; run once with network "
                        "(HF_HUB_OFFLINE=0) to complete it") from None
    except errors.LocalEntryNotFoundError:
        where = f"not in the Hugging Face cache ({huggingface_hub.constants.HF_HUB_CACHE})"
        if huggingface_hub.is_offline_mode():
            raise UserError(f"{name}: {where} and HF_HUB_OFFLINE=1; run once with network (HF_HUB_OFFLINE=0), or "
                            f"fetch it with `hf download {repo_id}{f' --revision {revision}' if revision else ''}`"
                            ) from None
        raise UserError(f"{name}: {where}, and the Hugging Face Hub cannot be reached; check the network") from None
    except errors.GatedRepoError:
        raise UserError(f"{name}: a gated {what}; accept its terms at https://huggingface.co/{repo_id} and log in "
                        "(`hf auth login` or HF_TOKEN)") from None
    except errors.RepositoryNotFoundError:
        raise UserError(f"{repo_id}: {what} folder not found, and no such {what} on the Hugging Face Hub (a private "
                        "one needs `hf auth login` or HF_TOKEN)") from None
    except errors.RevisionNotFoundError:
        raise UserError(f"{repo_id}: revision {revision or 'main'!r} not found on the Hugging Face Hub") from None
    except errors.HFValidationError as e:
        raise UserError(f"{repo_id}: {what} folder not found, and not a valid Hugging Face Hub id ({e})") from None
    except OSError as e:  # other answers of the Hub (HfHubHTTPError), a cache that cannot be written
        raise UserError(f"{name}: cannot fetch from the Hugging Face Hub ({str(e).splitlines()[0]})") from None
