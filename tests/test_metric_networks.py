"""Metric networks from their standard releases (`nsync_jax.metric_networks`): fetched into the Hugging Face
cache and converted once, then read from there. Nothing is downloaded: release URLs are pointed at `file://`
copies written here in the real files' layouts (read by the real downloader), and `hf_hub_download` fetches from
a folder standing in for the Hub into a real cache layout."""
import dataclasses
import hashlib
import io
import re
import shutil
import urllib.error
import urllib.request
from pathlib import Path

import huggingface_hub
import numpy as np
import pytest
from huggingface_hub import errors
from safetensors.numpy import load_file
from transformers import ViTConfig, ViTModel

from nsync_jax.cli import main
from nsync_jax.errors import UserError
from nsync_jax.metric_networks import NETWORKS, Release, network_path
from nsync_jax.models.clip_vision import load_csd
from nsync_jax.models.inception import load_inception
from nsync_jax.models.lpips import load_lpips
from nsync_jax.models.vit import load_vit

torch = pytest.importorskip("torch")


@pytest.fixture
def online(empty_hf_cache, monkeypatch) -> Path:
    """The empty Hugging Face home, HF_HUB_OFFLINE unset."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    return empty_hf_cache


@pytest.fixture(scope="module")
def releases(tmp_path_factory) -> Path:
    """Random weights in the layouts of pytorch-fid's Inception, torchvision's AlexNet and lpips' heads."""
    from test_edit_metrics import lpips_files
    from test_inception import torch_state

    folder = tmp_path_factory.mktemp("releases")
    state = torch_state("fid")
    torch.save({k: torch.from_numpy(v) for k, v in state.items()}, folder / "pt_inception-2015-12-05-6726825d.pth")
    lpips_files("alex", folder)
    (folder / "alex-backbone.pth").rename(folder / "alexnet-owt-7be5be79.pth")
    return folder


def serve(monkeypatch, name: str, *files: Path, sha256: str | None = None) -> None:
    """Points network `name`'s releases at `files` (file:// URLs, with their digests unless `sha256` is given)."""
    releases = tuple(Release(f.as_uri(), sha256 or hashlib.sha256(f.read_bytes()).hexdigest()) for f in files)
    monkeypatch.setitem(NETWORKS, name, dataclasses.replace(NETWORKS[name], releases=releases))


def count_downloads(monkeypatch) -> list[str]:
    urls, real = [], urllib.request.urlopen
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, **kw: urls.append(url) or real(url, **kw))
    return urls


def no_network(*args, **kwargs):
    raise AssertionError("fetched although the cache holds it")


def cache_files(home: Path) -> list[str]:
    return sorted(p.relative_to(home).as_posix() for p in home.rglob("*") if p.is_file())


def one_line_error(call) -> str:
    with pytest.raises(UserError) as error:
        call()
    assert "\n" not in str(error.value)
    return str(error.value)


def test_every_network_has_a_checked_source():
    for name, network in NETWORKS.items():
        assert bool(network.hub_folder) != bool(network.releases), name
        for release in network.releases:  # a URL's digest (a Hub file's is checked by huggingface_hub)
            assert release.hub_file or re.fullmatch("[0-9a-f]{8}|[0-9a-f]{64}", release.sha256), release.url
    assert [r.sha256 for r in NETWORKS["lpips-vgg"].releases][0] == "397923af"  # torch.hub's name convention


def test_a_release_is_downloaded_and_converted_once_then_read_from_the_cache(online, releases, monkeypatch,
                                                                            tmp_path):
    fid = releases / "pt_inception-2015-12-05-6726825d.pth"
    serve(monkeypatch, "inception-fid", fid)
    urls = count_downloads(monkeypatch)
    assert "weights: --weights folder not found" in one_line_error(lambda: network_path(tmp_path / "weights",
                                                                                            "inception-fid"))
    (tmp_path / "weights").mkdir()
    path = network_path(tmp_path / "weights", "inception-fid")  # a --weights folder without it
    assert path == online / "nsync-jax" / "metric-networks" / "inception-fid.safetensors"
    assert urls == [fid.as_uri()]
    assert cache_files(online) == ["nsync-jax/downloads/pt_inception-2015-12-05-6726825d.pth",
                                   "nsync-jax/metric-networks/inception-fid.safetensors"]  # no temporaries
    state = torch.load(fid)
    assert all(np.array_equal(v, state[k].numpy()) for k, v in load_file(path).items())
    load_inception(path, "fid")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    assert network_path(None, "inception-fid") == path
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert network_path(None, "inception-fid") == path
    path.unlink()  # converted again from the kept download, without fetching it
    assert network_path(None, "inception-fid") == path
    # A --weights folder that has the network wins, as before.
    shutil.copy(path, tmp_path / "weights" / "inception-fid.safetensors")
    assert network_path(tmp_path / "weights", "inception-fid") == tmp_path / "weights" / "inception-fid.safetensors"


def test_two_releases_make_one_network(online, releases, monkeypatch):
    serve(monkeypatch, "lpips-alex", releases / "alexnet-owt-7be5be79.pth", releases / "alex.pth")
    urls = count_downloads(monkeypatch)
    load_lpips(network_path(None, "lpips-alex"), "alex")
    assert len(urls) == 2


def test_a_bad_download_leaves_nothing_and_says_so_in_one_line(online, releases, monkeypatch):
    fid = releases / "pt_inception-2015-12-05-6726825d.pth"
    serve(monkeypatch, "inception-fid", fid, sha256="6726825d")  # the real file's prefix: not this file's
    error = one_line_error(lambda: network_path(None, "inception-fid"))
    assert f"{fid.as_uri()}: SHA-256 {hashlib.sha256(fid.read_bytes()).hexdigest()} does not match" in error
    assert cache_files(online) == []

    data = fid.read_bytes()

    class Truncated(io.BytesIO):  # the server closed the connection early
        headers = {"Content-Length": str(len(data))}

    serve(monkeypatch, "inception-fid", fid)
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, **kw: Truncated(data[:1000]))
    error = one_line_error(lambda: network_path(None, "inception-fid"))
    assert f"download truncated (1000 of {len(data)} bytes)" in error
    assert cache_files(online) == []

    def unreachable(url, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(urllib.request, "urlopen", unreachable)
    error = one_line_error(lambda: network_path(None, "inception-fid"))
    downloaded = online / "nsync-jax" / "downloads" / fid.name
    assert error.startswith(f"no --weights, and the inception-fid network's release ({downloaded}) is not cached "
                            "and cannot be downloaded (Name or service not known); fetch it (with network, the same "
                            "HF_HOME) with `nsync-jax convert-weights fetch inception-fid` or `curl -L -o "
                            f"{downloaded} {fid.as_uri()}`, or convert pytorch-fid's")
    assert cache_files(online) == []


# ------------------------------------------------------------------------------------------------ the Hub

def add_file(cache: Path, repo_id: str, name: str, data: bytes, commit: str = "0" * 40) -> None:
    """Stores `name` of `repo_id` as `huggingface_hub` does: a blob, a snapshot link, refs/main."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
    blob.parent.mkdir(parents=True, exist_ok=True)
    blob.write_bytes(data)
    link = repo / "snapshots" / commit / name
    link.parent.mkdir(parents=True, exist_ok=True)
    link.unlink(missing_ok=True)
    link.symlink_to(blob)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)


def serve_hub(monkeypatch, hub: Path | None) -> list[tuple[str, str]]:
    """`hf_hub_download` that fetches from `hub/<repo id>/` into the cache (and fails the test if `hub` is None);
    returns the files fetched."""
    fetched, real = [], huggingface_hub.hf_hub_download

    def download(repo_id, filename, *, local_files_only=False, **kwargs):
        if not local_files_only:
            if hub is None:
                no_network()
            source = hub / repo_id / filename
            if not source.is_file():
                raise errors.EntryNotFoundError(f"{filename} not in {repo_id}")
            fetched.append((repo_id, filename))
            add_file(Path(huggingface_hub.constants.HF_HUB_CACHE), repo_id, filename, source.read_bytes())
        return real(repo_id, filename, local_files_only=True, **kwargs)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    return fetched


@pytest.fixture(scope="module")
def hub(tmp_path_factory) -> Path:
    """facebook/dino-vitb8 (a tiny random ViT, safetensors and .bin), openai/clip-vit-large-patch14-336 with only
    a .bin, and tomg-group-umd/CSD-ViT-L's checkpoint (a tiny one in CSD's layout)."""
    from test_clip_vision import csd_checkpoint

    folder = tmp_path_factory.mktemp("hub")
    torch.manual_seed(0)
    dino = ViTModel(ViTConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4,
                              patch_size=4, image_size=16), add_pooling_layer=False)
    dino.save_pretrained(folder / "facebook" / "dino-vitb8")
    torch.save(dino.state_dict(), folder / "facebook" / "dino-vitb8" / "pytorch_model.bin")
    only_bin = folder / "openai" / "clip-vit-large-patch14-336"
    only_bin.mkdir(parents=True)
    shutil.copy(folder / "facebook" / "dino-vitb8" / "config.json", only_bin)
    shutil.copy(folder / "facebook" / "dino-vitb8" / "pytorch_model.bin", only_bin)
    (folder / "tomg-group-umd" / "CSD-ViT-L").mkdir(parents=True)
    fixture = np.load(Path(__file__).parent / "fixtures" / "openai_clip_tiny.npz")
    csd_checkpoint(fixture, folder / "tomg-group-umd" / "CSD-ViT-L" / "pytorch_model.bin")
    return folder


def test_a_hub_network_is_fetched_file_by_file_then_read_from_the_cache(online, hub, monkeypatch):
    fetched = serve_hub(monkeypatch, hub)
    folder = network_path(None, "dino")
    assert fetched == [("facebook/dino-vitb8", "config.json"), ("facebook/dino-vitb8", "model.safetensors")]
    load_vit(folder)
    # A repository without model.safetensors gives its .bin.
    clip_336 = network_path(None, "clip-336")
    assert (clip_336 / "pytorch_model.bin").is_file() and not (clip_336 / "model.safetensors").exists()
    assert fetched[2:] == [("openai/clip-vit-large-patch14-336", "config.json"),
                           ("openai/clip-vit-large-patch14-336", "pytorch_model.bin")]
    # A Hub release file (hf://) is fetched into the Hub cache and converted into ours.
    csd = network_path(None, "csd")
    assert fetched[4:] == [("tomg-group-umd/CSD-ViT-L", "pytorch_model.bin")]
    assert csd == online / "nsync-jax" / "metric-networks" / "csd"
    load_csd(csd)

    serve_hub(monkeypatch, None)  # fetching anything fails the test
    assert [network_path(None, name) for name in ("dino", "clip-336", "csd")] == [folder, clip_336, csd]


def test_an_unreachable_hub_is_one_line_naming_the_commands(online, monkeypatch):
    def unreachable(repo_id, filename, **kwargs):
        raise errors.LocalEntryNotFoundError("cannot reach the Hub, and the file is not cached")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", unreachable)
    error = one_line_error(lambda: network_path(None, "dino"))
    assert error.startswith("no --weights, and the dino network's release (facebook/dino-vitb8) is not cached and "
                            "the Hugging Face Hub cannot be reached; fetch it (with network, the same HF_HOME) with "
                            "`nsync-jax convert-weights fetch dino` or `hf download facebook/dino-vitb8 config.json "
                            "model.safetensors`, or copy the transformers folder facebook/dino-vitb8")


def test_offline_and_not_cached_is_one_line_naming_the_file_and_the_commands(empty_hf_cache, tmp_path):
    weights = tmp_path / "weights"
    weights.mkdir()
    release = NETWORKS["inception-fid"].releases[0]
    error = one_line_error(lambda: network_path(weights, "inception-fid"))
    assert error.startswith(f"{weights / 'inception-fid.safetensors'}: not found, and the inception-fid network's "
                            f"release ({empty_hf_cache / 'nsync-jax' / 'downloads' / release.file_name}) is not "
                            "cached while HF_HUB_OFFLINE=1")
    assert "`nsync-jax convert-weights fetch inception-fid`" in error
    assert f"`curl -L -o {empty_hf_cache}/nsync-jax/downloads/{release.file_name} {release.url}`" in error
    assert "`nsync-jax convert-weights inception-fid FILE.pth DIR/inception-fid.safetensors`" in error
    error = one_line_error(lambda: network_path(None, "clip"))
    assert error.startswith("no --weights, and the clip network's release (openai/clip-vit-large-patch14) is not "
                            "cached while HF_HUB_OFFLINE=1")
    assert ("`hf download openai/clip-vit-large-patch14 config.json vocab.json merges.txt tokenizer_config.json "
            "special_tokens_map.json model.safetensors`") in error
    assert "`hf download tomg-group-umd/CSD-ViT-L pytorch_model.bin`" in one_line_error(
        lambda: network_path(None, "csd"))


def test_fetch_command(online, releases, monkeypatch, tmp_path, capsys):
    serve(monkeypatch, "inception-fid", releases / "pt_inception-2015-12-05-6726825d.pth")
    assert main(["convert-weights", "fetch", "inception-fid"]) == 0
    out = capsys.readouterr()
    converted = online / "nsync-jax" / "metric-networks" / "inception-fid.safetensors"
    assert out.out == f"inception-fid: {converted}\n"
    assert "downloading file://" in out.err and f"converting the inception-fid network into {converted}" in out.err
    for argv, message in ((["fetch", "fid"], "convert-weights fetch fid: not a network (one of inception-fid, "),
                          (["fetch", "inception-fid", str(tmp_path)], "convert-weights fetch: "),
                          (["inception-fid", "x.pth"], "convert-weights inception-fid: the destination is required")):
        assert main(["convert-weights", *argv]) == 2
        assert message in capsys.readouterr().err


def test_evaluate_commands_without_weights_read_the_cache(empty_hf_cache, tmp_path, capsys):
    from PIL import Image

    for folder in ("real", "generated"):
        (tmp_path / folder).mkdir()
        for i in range(2):
            Image.new("RGB", (8, 8), (60 * i, 0, 0)).save(tmp_path / folder / f"{i}.png")
    images = ["--output", str(tmp_path / "out.json")]
    assert main(["evaluate", "--real", str(tmp_path / "real"), "--generated", str(tmp_path / "generated"),
                 "--metrics", "fid", *images]) == 2
    assert "no --weights, and the inception-fid network's release" in capsys.readouterr().err
    assert main(["evaluate-edits", "--originals", str(tmp_path / "real"), "--edits", str(tmp_path / "generated"),
                 "--metrics", "structure_distance", *images]) == 2
    assert "no --weights, and the dino network's release (facebook/dino-vitb8)" in capsys.readouterr().err
