"""Where `evaluate` and `evaluate-edits` find their networks: `--weights DIR`, else the standard releases,
fetched once into the Hugging Face cache and converted once, as clean-fid and torchmetrics do for their users.

`NETWORKS` names each network's file in `--weights DIR` (what `nsync-jax convert-weights` writes) and its
standard source:

- a transformers folder on the Hub (CLIP, DINO) is read from the Hugging Face cache (`HF_HUB_CACHE`) as it is,
  fetched file by file with `huggingface_hub` (`model.safetensors`, else `pytorch_model.bin`; no other formats);
- released PyTorch files (Inception, LPIPS, CSD) are fetched into `$HF_HOME/nsync-jax/downloads/` (URLs, their
  SHA-256 checked: the whole digest where known, else the prefix torch.hub file names carry) or the Hub cache
  (`hf://` files), then converted once into `$HF_HOME/nsync-jax/metric-networks/`.

The cache is read first, so a second run asks no server. Every file is written under a temporary name and
renamed, so a failed or interrupted fetch or conversion leaves nothing under the real name. With
`HF_HUB_OFFLINE=1` only the cache is read; a network it lacks (or cannot fetch, without network) is one
`UserError` naming the file, the commands that fetch it (`nsync-jax convert-weights fetch NAME`, `hf download`
or `curl`) and the `convert-weights` alternative.
"""
from __future__ import annotations

import dataclasses
import hashlib
import http.client
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable

from nsync_jax import convert, sources
from nsync_jax.errors import UserError
from nsync_jax.files import atomic_write

# A Hub folder's weights, preferred first (transformers' names; no TF, Flax or variant files).
HUB_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
CLIP_TOKENIZER = ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")
DOWNLOAD_CHUNK = 1 << 20


@dataclasses.dataclass(frozen=True)
class Release:
    """A released file: an https URL, or `hf://ORG/NAME/FILE` (a file of a Hub repository)."""

    url: str
    sha256: str = ""  # its SHA-256, or a prefix of it; empty where no digest is published

    @property
    def file_name(self) -> str:
        return self.url.rsplit("/", 1)[-1]

    @property
    def hub_file(self) -> tuple[str, str] | None:
        """(repository id, file) of an `hf://` release."""
        if not self.url.startswith("hf://"):
            return None
        org, repo, file = self.url.removeprefix("hf://").split("/", 2)
        return f"{org}/{repo}", file


@dataclasses.dataclass(frozen=True)
class Network:
    file_name: str  # in --weights DIR and in the conversion cache
    how_to_convert: str  # the `convert-weights` alternative, for errors
    hub_folder: str = ""  # a transformers folder on the Hub, read as it is
    hub_extra_files: tuple[str, ...] = ()  # besides config.json and the weights
    releases: tuple[Release, ...] = ()  # files converted into `file_name` by `convert`
    convert: Callable[[list[Path], Path], Path] | None = None  # (release paths, destination) -> destination


def torch_hub_release(url: str) -> Release:
    """A release named as torch.hub names files, `NAME-<first digits of its SHA-256>.pth`, checked against them."""
    return Release(url, url.rsplit("-", 1)[-1].removesuffix(".pth"))


TORCHVISION = "https://download.pytorch.org/models/"
# lpips' linear heads at a fixed commit of richzhang/PerceptualSimilarity (the files the lpips package ships).
LPIPS_HEADS = ("https://raw.githubusercontent.com/richzhang/PerceptualSimilarity/"
               "082bb24f84c091ea94de2867d34c4544f68e0963/lpips/weights/v0.1/")


def _lpips(net: str, backbone: str, heads_sha256: str) -> Network:
    """LPIPS on torchvision's `backbone` file with lpips' heads for `net`."""
    return Network(
        f"lpips-{net}.safetensors",
        f"convert torchvision's {backbone} and lpips' weights/v0.1/{net}.pth with `nsync-jax convert-weights "
        f"lpips-{net} {backbone} DIR/lpips-{net}.safetensors --lpips-heads {net}.pth`",
        releases=(torch_hub_release(TORCHVISION + backbone), Release(f"{LPIPS_HEADS}{net}.pth", heads_sha256)),
        convert=lambda files, dst: convert.convert_lpips(files[0], files[1], dst, net))


NETWORKS = {
    "inception-fid": Network(
        "inception-fid.safetensors",
        "convert pytorch-fid's pt_inception-2015-12-05-6726825d.pth with "
        "`nsync-jax convert-weights inception-fid FILE.pth DIR/inception-fid.safetensors`",
        releases=(torch_hub_release("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                                    "pt_inception-2015-12-05-6726825d.pth"),),
        convert=lambda files, dst: convert.convert_inception(files[0], dst, "fid")),
    "inception-torchvision": Network(
        "inception-torchvision.safetensors",
        "convert torchvision's inception_v3_google-0cc3c7bd.pth with `nsync-jax convert-weights "
        "inception-torchvision FILE.pth DIR/inception-torchvision.safetensors`",
        releases=(torch_hub_release(TORCHVISION + "inception_v3_google-0cc3c7bd.pth"),),
        convert=lambda files, dst: convert.convert_inception(files[0], dst, "torchvision")),
    "clip-336": Network(
        "clip-vit-large-patch14-336",
        "copy the transformers folder openai/clip-vit-large-patch14-336 there, or convert OpenAI's "
        "ViT-L-14-336px.pt with `nsync-jax convert-weights openai-clip FILE.pt DIR/clip-vit-large-patch14-336`",
        hub_folder="openai/clip-vit-large-patch14-336"),
    "clip": Network(
        "clip-vit-large-patch14",
        "copy the transformers folder openai/clip-vit-large-patch14 (with its tokenizer files) there",
        hub_folder="openai/clip-vit-large-patch14", hub_extra_files=CLIP_TOKENIZER),
    "clip-b16": Network(
        "clip-vit-base-patch16",
        "copy the transformers folder openai/clip-vit-base-patch16 (with its tokenizer files) there",
        hub_folder="openai/clip-vit-base-patch16", hub_extra_files=CLIP_TOKENIZER),
    "csd": Network(
        "csd",
        "convert the CSD checkpoint (tomg-group-umd/CSD-ViT-L pytorch_model.bin) with "
        "`nsync-jax convert-weights csd FILE DIR/csd`",
        releases=(Release("hf://tomg-group-umd/CSD-ViT-L/pytorch_model.bin"),),
        convert=lambda files, dst: convert.convert_csd(files[0], dst)),
    # `evaluate-edits` (nsync_jax.edit_metrics)
    "dino": Network(
        "dino-vitb8",
        "copy the transformers folder facebook/dino-vitb8 there, or convert DINO's dino_vitbase8_pretrain.pth "
        "with `nsync-jax convert-weights dino-vit FILE.pth DIR/dino-vitb8`",
        hub_folder="facebook/dino-vitb8"),
    "lpips-alex": _lpips("alex", "alexnet-owt-7be5be79.pth",
                         "df73285e35b22355a2df87cdb6b70b343713b667eddbda73e1977e0c860835c0"),
    "lpips-vgg": _lpips("vgg", "vgg16-397923af.pth",
                        "a78928a0af1e5f0fcb1f3b9e8f8c3a2a5a3de244d830ad5c1feddc79b8432868"),
}


OFFLINE = "is not cached while HF_HUB_OFFLINE=1"


class _Unavailable(Exception):
    """A release neither cached nor fetchable; args: what (a file or repository), the command that fetches it,
    and why (the end of a sentence)."""


def network_path(weights_dir: Path | None, name: str) -> Path:
    """The file or folder of network `name` (a key of `NETWORKS`): `weights_dir`'s where it has one, else the
    cached (fetched and converted on first use) standard release."""
    network = NETWORKS[name]
    if weights_dir is not None:
        if not Path(weights_dir).is_dir():  # a mistyped folder would otherwise fetch every network
            raise UserError(f"{weights_dir}: --weights folder not found")
        if (Path(weights_dir) / network.file_name).exists():
            return Path(weights_dir) / network.file_name
    try:
        if network.hub_folder:
            wanted = [("config.json",), *((f,) for f in network.hub_extra_files), HUB_WEIGHTS]
            return _hub_files(network.hub_folder, wanted)[0].parent  # the snapshot folder holds all its files
        converted = cache_root() / "metric-networks" / network.file_name
        if not converted.exists():
            files = [_release_file(release) for release in network.releases]
            print(f"converting the {name} network into {converted}", file=sys.stderr)
            network.convert(files, converted)
        return converted
    except _Unavailable as e:
        what, command, problem = e.args
        missing = f"{Path(weights_dir) / network.file_name}: not found" if weights_dir is not None else "no --weights"
        raise UserError(f"{missing}, and the {name} network's release ({what}) {problem}; fetch it (with network, "
                        f"the same HF_HOME) with `nsync-jax convert-weights fetch {name}` or `{command}`, or "
                        f"{network.how_to_convert}") from None


def cache_root() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HOME) / "nsync-jax"


def _offline() -> bool:
    import huggingface_hub

    return huggingface_hub.is_offline_mode()


def _hub_file(repo_id: str, names: tuple[str, ...], local_only: bool) -> Path:
    """The first of `names` that repository `repo_id` has, from the Hugging Face cache (`local_only`) or the Hub."""
    import huggingface_hub
    from huggingface_hub import errors

    *preferred, last = names
    for name in preferred:
        try:
            return Path(huggingface_hub.hf_hub_download(repo_id, name, local_files_only=local_only))
        except errors.EntryNotFoundError:  # also LocalEntryNotFoundError: not in the cache
            pass
    return Path(huggingface_hub.hf_hub_download(repo_id, last, local_files_only=local_only))


def _hub_files(repo_id: str, wanted: list[tuple[str, ...]]) -> list[Path]:
    """One file for each tuple of alternatives in `wanted`: from the Hugging Face cache, else from the Hub."""
    from huggingface_hub import errors

    try:
        return [_hub_file(repo_id, names, True) for names in wanted]
    except errors.LocalEntryNotFoundError:
        pass
    command = " ".join(["hf download", repo_id, *(names[0] for names in wanted)])
    if _offline():
        raise _Unavailable(repo_id, command, OFFLINE)
    with sources.hub_errors(repo_id, None, what="metric network"):
        try:
            return [_hub_file(repo_id, names, False) for names in wanted]
        except errors.LocalEntryNotFoundError:  # what huggingface_hub raises when the Hub cannot be reached
            raise _Unavailable(repo_id, command, "is not cached and the Hugging Face Hub cannot be reached") from None


def _release_file(release: Release) -> Path:
    """The local copy of a released file: fetched once, its digest checked."""
    if release.hub_file:
        repo_id, file = release.hub_file
        return _hub_files(repo_id, [(file,)])[0]
    path = cache_root() / "downloads" / release.file_name
    if path.is_file():
        return path
    command = f"curl -L -o {path} {release.url}"
    if _offline():
        raise _Unavailable(str(path), command, OFFLINE)
    print(f"downloading {release.url} into {path}", file=sys.stderr)
    try:
        download(release, path)
    except (OSError, http.client.HTTPException) as e:  # URLError is an OSError; IncompleteRead is not
        reason = e.reason if isinstance(e, urllib.error.URLError) else f"{type(e).__name__}: {e}"
        raise _Unavailable(str(path), command, f"is not cached and cannot be downloaded ({reason})") from None
    return path


def download(release: Release, path: Path) -> None:
    """Fetches `release.url` into `path` (under a temporary name, renamed once complete and its digest checked)."""
    def write(temporary: Path) -> None:
        digest = hashlib.sha256()
        with urllib.request.urlopen(release.url, timeout=60) as response, open(temporary, "wb") as out:
            expected = response.headers.get("Content-Length")
            while chunk := response.read(DOWNLOAD_CHUNK):
                digest.update(chunk)
                out.write(chunk)
        size = temporary.stat().st_size
        if expected is not None and size != int(expected):
            raise UserError(f"{release.url}: download truncated ({size} of {expected} bytes); run again")
        if not digest.hexdigest().startswith(release.sha256):
            raise UserError(f"{release.url}: SHA-256 {digest.hexdigest()} does not match the release's "
                            f"{release.sha256}; nothing was kept")

    atomic_write(path, write)
