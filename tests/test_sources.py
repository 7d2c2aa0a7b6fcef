"""Naming a model: a diffusers folder, or a Hugging Face Hub id (revision, variant) read from the Hugging Face
cache. The cache is built here in `huggingface_hub`'s own layout (`models--org--name/refs/main`, snapshot files
linked into `blobs/`) from the tiny test model, with `HF_HUB_OFFLINE=1`: nothing is downloaded."""
import hashlib
import os
import re
import shutil
from pathlib import Path

import huggingface_hub
import numpy as np
import pytest
from huggingface_hub.utils import filter_repo_objects
from PIL import Image
from safetensors.numpy import load_file, save_file

from conftest import CONFIG, assert_token_encodes_as_in_diffusers
from nsync_jax import export, sources
from nsync_jax.cli import main
from nsync_jax.errors import UserError
from nsync_jax.pipeline import load_pipeline
from nsync_jax.weights import module_state_dict
from sdxl_fixtures import sdxl_dir  # noqa: F401 (a fixture)

COMMIT = "0123456789abcdef0123456789abcdef01234567"
UNET_FP16 = "unet/diffusion_pytorch_model.fp16.safetensors"


def add_to_cache(cache: Path, repo_id: str, model: Path, commit: str = COMMIT, ref: str = "main") -> Path:
    """Puts the files of folder `model` into the Hugging Face cache `cache` as snapshot `commit` of `repo_id`
    (`ref` pointing to it), laid out as `huggingface_hub` lays out what it downloads; returns the snapshot."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    for file in sorted(p for p in model.rglob("*") if p.is_file()):
        data = file.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / file.relative_to(model)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture(scope="module")
def tiny_repo(sd1_dir, tmp_path_factory) -> Path:
    """The tiny SD 1.x folder with an fp16 variant of the UNet, its weights perturbed so that it differs."""
    folder = tmp_path_factory.mktemp("repo") / "tiny-sd"
    shutil.copytree(sd1_dir, folder)
    state = load_file(str(folder / "unet" / "diffusion_pytorch_model.safetensors"))
    rng = np.random.default_rng(0)
    save_file({k: (v + 0.05 * rng.standard_normal(v.shape)).astype(np.float16) for k, v in state.items()},
              str(folder / UNET_FP16), metadata={"format": "pt"})
    return folder


@pytest.fixture
def hub(tiny_repo, tmp_path, monkeypatch) -> Path:
    """An offline Hugging Face cache holding `org/tiny-sd` (the tiny model at `main`); returns the cache."""
    cache = tmp_path / "hf-cache"
    add_to_cache(cache, "org/tiny-sd", tiny_repo)
    # huggingface_hub reads the environment into `constants` when imported: set both.
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return cache


def states(pipe) -> dict[str, dict[str, np.ndarray]]:
    return {name: module_state_dict(module) for name, module in pipe.modules().items()}


def assert_same_states(a, b):
    for name in a:
        assert a[name].keys() == b[name].keys()
        for key in a[name]:
            np.testing.assert_array_equal(a[name][key], b[name][key], err_msg=f"{name} {key}")


def test_weight_choice_takes_safetensors_and_only_the_asked_variant():
    repo = ["model_index.json", "safety_checker/model.safetensors", "feature_extractor/preprocessor_config.json"]
    for part, stem in (("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model")):
        repo += [f"{part}/config.json"] + [f"{part}/{stem}{v}.{e}" for v in ("", ".fp16", ".ema") for e in
                                           ("bin", "safetensors")]
    # A sharded text encoder: the plain one in safetensors and .bin, the fp16 one in safetensors only.
    repo += ["text_encoder/config.json", "text_encoder/model.safetensors.index.json",
             "text_encoder/model-00001-of-00002.safetensors", "text_encoder/model-00002-of-00002.safetensors",
             "text_encoder/pytorch_model.bin.index.json", "text_encoder/pytorch_model-00001-of-00002.bin",
             "text_encoder/model.safetensors.index.fp16.json", "text_encoder/model.fp16-00001-of-00001.safetensors"]

    def fetched(variant):
        patterns = [*sources.CONFIG_FILES, *sources.weight_patterns(repo, variant, source="org/sd")]
        return sorted(filter_repo_objects(repo, allow_patterns=patterns))

    assert fetched(None) == ["model_index.json", "text_encoder/config.json",
                             "text_encoder/model-00001-of-00002.safetensors",
                             "text_encoder/model-00002-of-00002.safetensors",
                             "text_encoder/model.safetensors.index.json", "unet/config.json",
                             "unet/diffusion_pytorch_model.safetensors", "vae/config.json",
                             "vae/diffusion_pytorch_model.safetensors"]
    assert fetched("fp16") == ["model_index.json", "text_encoder/config.json",
                               "text_encoder/model.fp16-00001-of-00001.safetensors",
                               "text_encoder/model.safetensors.index.fp16.json", "unet/config.json",
                               "unet/diffusion_pytorch_model.fp16.safetensors", "vae/config.json",
                               "vae/diffusion_pytorch_model.fp16.safetensors"]
    # A repository with .bin files only: those are read.
    assert sources.weight_patterns(["unet/diffusion_pytorch_model.bin"], source="x") == [
        "unet/diffusion_pytorch_model.bin"]
    with pytest.raises(UserError, match=r"^org/sd: no weight files of variant 'bf16' \(such as "
                                        r"unet/diffusion_pytorch_model.bf16.safetensors\); variants there: ema, fp16$"):
        sources.weight_patterns(repo, "bf16", source="org/sd")


def test_hub_id_loads_the_cached_snapshot_and_its_variant(hub, tiny_repo):
    local = load_pipeline(tiny_repo)
    from_hub = load_pipeline("org/tiny-sd")
    assert from_hub.folder == hub / "models--org--tiny-sd" / "snapshots" / COMMIT
    assert_same_states(states(from_hub), states(local))
    assert load_pipeline("org/tiny-sd", revision=COMMIT).folder == from_hub.folder

    fp16 = load_pipeline("org/tiny-sd", variant="fp16")
    expected = {k: v.astype(np.float32) for k, v in load_file(str(tiny_repo / UNET_FP16)).items()}
    assert_same_states({"unet": module_state_dict(fp16.unet)}, {"unet": expected})
    # The models without fp16 files keep their plain weights, as in diffusers.
    assert_same_states({n: states(fp16)[n] for n in ("vae", "text_encoder")},
                       {n: states(local)[n] for n in ("vae", "text_encoder")})
    # A local folder with a variant reads the variant's files too.
    assert_same_states({"unet": module_state_dict(load_pipeline(tiny_repo, variant="fp16").unet)}, {"unet": expected})


def test_sample_with_a_hub_id_draws_the_folder_images(hub, tiny_repo, tmp_path, capsys):
    args = ["--prompt", "a red star", "--steps", "2", "--height", "32", "--width", "32", "--seed", "3"]
    for name, model in (("folder", str(tiny_repo)), ("hub", "org/tiny-sd")):
        assert main(["sample", "--model", model, *args, "--output", str(tmp_path / name)]) == 0, \
            capsys.readouterr().err
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "folder" / "000000.png")),
                                  np.asarray(Image.open(tmp_path / "hub" / "000000.png")))


def test_an_sdxl_hub_id_fetches_both_text_encoders_and_tokenizers(sdxl_dir):
    repo = sources.files_under(sdxl_dir)
    patterns = [*sources.CONFIG_FILES, *sources.weight_patterns(repo, source="org/sdxl")]
    assert sorted(filter_repo_objects(repo, allow_patterns=patterns)) == sorted(repo)  # everything load_sdxl reads
    assert any(f.startswith("text_encoder_2/model") for f in repo) and any(f.startswith("tokenizer_2/") for f in repo)


def test_train_on_a_hub_id_exports_a_token_diffusers_loads_into_that_model(hub, tiny_repo, style_dir, tmp_path,
                                                                           capsys):
    from diffusers import StableDiffusionPipeline

    work = tmp_path / "work"
    assert main(["train", "--config", str(CONFIG), "--workdir", str(work), "--config.model=org/tiny-sd",
                 f"--config.data.images={style_dir / 'images'}", f"--config.data.captions={style_dir / 'captions'}",
                 f"--config.data.negatives={style_dir / 'negatives'}", "--config.train.steps=2"]) == 0, \
        capsys.readouterr().err
    token = tmp_path / "style.safetensors"
    assert main(["export", "--workdir", str(work), "--step", "2", "--output", str(token)]) == 0
    reference = StableDiffusionPipeline.from_pretrained("org/tiny-sd", local_files_only=True)
    assert_token_encodes_as_in_diffusers(load_pipeline("org/tiny-sd"), reference, token,
                                         "a cat in the style of <tiny-style>")


def test_model_errors_are_one_line(hub, tiny_repo, tmp_path, capsys):
    checkpoint = tmp_path / "anime.safetensors"
    checkpoint.write_bytes(b"")

    def error(*flags) -> str:
        code = main(["sample", *flags, "--prompt", "a cat", "--output", str(tmp_path / "out")])
        err = capsys.readouterr().err
        assert code == 2 and err.strip().count("\n") == 0, err
        return err

    err = error("--model", "org/missing")
    assert "org/missing: not in the Hugging Face cache" in err and "HF_HUB_OFFLINE=1" in err
    assert "hf download org/missing" in err
    err = error("--model", "org/tiny-sd", "--revision", "v2")
    assert "org/tiny-sd (revision v2): not in the Hugging Face cache" in err and "--revision v2" in err
    assert f"{checkpoint}: not a readable safetensors file, truncated or corrupt" in error("--model", str(checkpoint))
    assert f"{tiny_repo}: a revision (main) picks a version of a Hugging Face Hub model" in error(
        "--model", str(tiny_repo), "--revision", "main")
    assert "org/tiny-sd: no weight files of variant 'bf16'" in error("--model", "org/tiny-sd", "--variant", "bf16")
    assert "nowhere: model folder not found" in error("--model", str(tmp_path / "nowhere"))


def test_cached_listing_chooses_the_files_and_a_missing_one_is_named(hub, tiny_repo):
    """A cache filled by `snapshot_download` also holds the repository's file listing: the weights are chosen from
    it (a listed .bin is not wanted), and a chosen file that is not cached is an error, offline."""
    from huggingface_hub._tree_cache import TreeCacheEntry, write_tree_cache

    snapshot = add_to_cache(hub, "org/listed", tiny_repo)
    listing = sources.files_under(snapshot) + ["unet/diffusion_pytorch_model.bin"]
    write_tree_cache(str(snapshot.parent.parent), COMMIT,
                     {path: TreeCacheEntry(size=1, blob_id="0" * 40) for path in listing})
    assert sources.resolve_model("org/listed") == snapshot
    write_tree_cache(str(snapshot.parent.parent), COMMIT,
                     {path: TreeCacheEntry(size=1, blob_id="0" * 40)
                      for path in listing + ["vae/diffusion_pytorch_model.fp16.safetensors"]})
    with pytest.raises(UserError, match=r"^org/listed: the cached snapshot lacks files this model needs; run once "
                                        r"with network \(HF_HUB_OFFLINE=0\)"):
        sources.resolve_model("org/listed", variant="fp16")


def test_exported_pipeline_from_a_hub_snapshot_holds_files_not_links(hub, tmp_path):
    pipe = load_pipeline("org/tiny-sd", variant="fp16")
    export.write_diffusers_pipeline(tmp_path / "out", pipe.folder, {"unet": pipe.unet}, variant="fp16")
    files = [p for p in (tmp_path / "out").rglob("*") if p.is_file()]
    assert files and not any(p.is_symlink() for p in (tmp_path / "out").rglob("*"))
    assert not any(".fp16." in p.name for p in files)
    assert_same_states(states(load_pipeline(tmp_path / "out")), states(pipe))


def hub_answer(status: int, error_code: str | None = None) -> Exception:
    """The exception `huggingface_hub` raises for a Hub answer with this status and X-Error-Code."""
    import httpx2
    from huggingface_hub.utils import hf_raise_for_status

    request = httpx2.Request("GET", "https://huggingface.co/api/models/org/name/revision/main")
    try:
        hf_raise_for_status(httpx2.Response(status, headers={"X-Error-Code": error_code} if error_code else {},
                                            request=request))
    except Exception as e:  # noqa: BLE001 - the exception is the answer
        return e
    raise AssertionError(f"status {status} raised nothing")


@pytest.mark.parametrize("answer, flags, message", [
    ((401, "GatedRepo"), [], "org/name: a gated model; accept its terms at https://huggingface.co/org/name and log "
                             "in (`hf auth login` or HF_TOKEN)"),
    ((404, "RepoNotFound"), [], "org/name: model folder not found, and no such model on the Hugging Face Hub"),
    ((404, "RevisionNotFound"), ["--revision", "v9"], "org/name: revision 'v9' not found on the Hugging Face Hub"),
    ((500, None), [], "org/name: cannot fetch from the Hugging Face Hub (Server error '500 Internal Server Error'"),
])
def test_hub_answers_are_one_line_naming_what_was_asked(answer, flags, message, tmp_path, monkeypatch, capsys):
    def refused(*args, **kwargs):
        raise hub_answer(*answer)

    monkeypatch.setattr(huggingface_hub, "is_offline_mode", lambda: False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", refused)
    assert main(["sample", "--model", "org/name", *flags, "--prompt", "a cat", "--output", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.strip().count("\n") == 0, err
    # A single file's --model-config that is a Hub id is fetched (its configs only) and refused the same way.
    checkpoint = tmp_path / "model.safetensors"
    save_file({sources.single_file.UNET_KEY: np.zeros((1, 4, 1, 1), np.float32)}, str(checkpoint))
    if not flags:
        with pytest.raises(UserError, match=f"^{re.escape(message)}"):
            sources.resolve_model(checkpoint, model_config="org/name")
        # A replacement VAE's Hub id: the same answers, naming a VAE.
        with pytest.raises(UserError, match=f"^{re.escape(message.replace('model', 'VAE'))}"):
            sources.resolve_vae("org/name")
