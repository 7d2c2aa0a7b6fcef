"""Sharded training: the same embedding on any mesh, with frozen weights split over fsdp, and across processes;
full fine-tuning with its trained weights split over fsdp learns what one device learns.

Meshes need several devices, which a JAX process fixes when it starts: the multi-device runs happen in child
processes with 8 simulated CPU devices (`--xla_force_host_platform_device_count`).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import load_file

from nsync_jax import distributed
from nsync_jax.errors import UserError
from conftest import write_style_dataset

ROOT = Path(__file__).resolve().parents[1]
STEPS, BATCH = 4, 8
# Data parallel, and data x fsdp with the frozen weights split (fsdp's batch split without weight sharding is
# the same program minus the weight placement, so it is not run separately).
MESHES = {"8x1": (8, 1, False), "1x1": (1, 1, False), "4x2-fsdp-weights": (4, 2, True)}

# The start of every child script (8 CPU devices): its spec, and `train_on_mesh(name)`, which trains the config on
# one of the spec's meshes and saves what it learned as NAME.npz: "rows", or "unet/<path>", "text_encoder/<path>".
CHILD_START = """
import json, sys
from pathlib import Path
import jax, numpy as np
from flax import nnx
from nsync_jax import distributed
from nsync_jax.config import load_config
from nsync_jax.pipeline import load_pipeline
from nsync_jax.train import trainer

spec = json.loads(sys.argv[1])
out = Path(spec["out"])
distributed.MIN_SHARDED_SIZE = 256  # the tiny model's weights are small: split most of them

def train_on_mesh(name):
    data, fsdp, shard_weights = spec["meshes"][name]
    config = load_config(spec["config"], spec["overrides"] + [
        f"mesh.data={data}", f"mesh.fsdp={fsdp}", f"mesh.shard_frozen_weights={shard_weights}"])
    learned = trainer.train(config, out / name, progress=False).trained
    arrays = {"rows": learned} if not isinstance(learned, dict) else {
        f"{part}/{path}": value for part, weights in learned.items() for path, value in weights.items()}
    np.savez(out / f"{name}.npz", **arrays)
"""

# Trains the tiny config on each mesh, and samples and writes negatives on 8 devices.
SAMPLE_PROMPTS = ["a red star", "a blue circle", "a cat"]
MESH_RUNS = CHILD_START + f"SAMPLE_PROMPTS = {SAMPLE_PROMPTS!r}\n" + """
mesh = distributed.make_mesh(4, 2)
_, unet_state = nnx.split(load_pipeline(spec["model"]).unet)
shardings = jax.tree.leaves(distributed.frozen_shardings(mesh, unet_state, True))
sharded = sum(distributed.FSDP in str(s.spec) for s in shardings)
(out / "sharded_weights.json").write_text(json.dumps({"sharded": sharded, "total": len(shardings),
                                                      "devices": jax.device_count()}))
from nsync_jax import negatives
from nsync_jax.sampling import SampleSettings, generate
pipe = load_pipeline(spec["model"])
settings = SampleSettings(steps=3, guidance=4.0, batch_size=8)
np.save(out / "samples.npy", generate(pipe, SAMPLE_PROMPTS, settings=settings, progress=False))
prompts = {f"p{i}": p for i, p in enumerate(SAMPLE_PROMPTS)}
negatives.generate_set(pipe, prompts, out / "negatives", settings=settings, images_per_caption=2, progress=False)
for name in spec["meshes"]:
    train_on_mesh(name)
"""

# Full fine-tuning on each mesh, counting the leaves the trainer puts on the devices split over fsdp: the frozen
# weights stay whole (mesh.shard_frozen_weights=False), so those are trained weights.
FULL_RUNS = CHILD_START + """
put_tree, fsdp_split = distributed.put_tree, {}

def counting_put_tree(tree, shardings, **kwargs):
    fsdp_split[mesh_name] += sum(distributed.FSDP in str(s.spec) for s in jax.tree.leaves(shardings))
    return put_tree(tree, shardings, **kwargs)

distributed.put_tree = counting_put_tree
for mesh_name in spec["meshes"]:
    fsdp_split[mesh_name] = 0
    train_on_mesh(mesh_name)
(out / "fsdp_split.json").write_text(json.dumps(fsdp_split))
"""


def overrides(model: Path, data: Path) -> list[str]:
    return [f"model={model}", f"data.images={data / 'images'}", f"data.captions={data / 'captions'}",
            f"data.negatives={data / 'negatives'}", f"train.steps={STEPS}", f"train.batch_size={BATCH}",
            "checkpoint.every_steps=2"]


def cpu_env(cache: Path, devices: int | None = None) -> dict[str, str]:
    """CPU only, `devices` simulated devices, and a compilation cache (the resumed run reuses the first's)."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": str(cache),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
    if devices:
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}".strip()
    return env


@pytest.fixture(scope="module")
def style_data(tmp_path_factory):
    return write_style_dataset(tmp_path_factory.mktemp("style"), count=6)


def run_child(script: str, spec: dict) -> None:
    subprocess.run([sys.executable, "-c", script, json.dumps(spec)], check=True,
                   env=cpu_env(Path(spec["out"]) / "cache", 8), cwd=ROOT, timeout=900)


@pytest.fixture(scope="module")
def mesh_runs(sd2_dir, style_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("meshes")
    run_child(MESH_RUNS, {"out": str(out), "model": str(sd2_dir), "config": str(ROOT / "configs" / "tiny.py"),
                          "overrides": overrides(sd2_dir, style_data), "meshes": MESHES})
    return out


def learned_rows(folder: Path, name: str) -> np.ndarray:
    return np.load(folder / f"{name}.npz")["rows"]


def relative_difference(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_every_mesh_learns_the_same_embedding(mesh_runs, sd2_dir):
    info = json.loads((mesh_runs / "sharded_weights.json").read_text())
    assert info["devices"] == 8
    assert info["sharded"] >= info["total"] // 4, info  # fsdp really splits the weights
    rows = {name: learned_rows(mesh_runs, name) for name in MESHES}
    initial = rows["1x1"]
    for name, learned in rows.items():
        assert relative_difference(learned, rows["1x1"]) <= 1e-5, name
    # ... and the runs did learn something, so agreeing is not trivial.
    from nsync_jax.pipeline import load_pipeline

    pipe = load_pipeline(sd2_dir)
    start = np.asarray(pipe.text_encoder.embeddings.token_embedding.embedding[...])[
        pipe.tokenizer.convert_tokens_to_ids("painting</w>")]
    assert relative_difference(initial, np.broadcast_to(start, initial.shape)) > 1e-3


FULL_MESHES = {"1x1": (1, 1, False), "4x2": (4, 2, False)}
# A bias added to every key shifts each row of attention logits by a constant, which softmax ignores: the true
# gradient of the text encoder's key biases is 0, the computed one rounding noise that Adam scales up into steps
# that differ between meshes. Their values are not compared.
ZERO_GRADIENT_SUFFIX = ".self_attn.k_proj.bias"


# About 2.5 minutes on 2 busy cores (the full step, UNet and text encoder, compiled for each mesh): `-m slow`.
@pytest.mark.slow
def test_full_fine_tuning_with_fsdp_split_weights_learns_what_one_device_learns(sd2_dir, style_data, tmp_path):
    out = tmp_path / "full"
    out.mkdir()
    # Adam moves every weight by about the learning rate (8 x 2e-5 here) per step, also where the gradient is
    # only rounding noise: a small rate keeps such elements' share of the difference under the tolerance.
    run_child(FULL_RUNS, {"out": str(out), "model": str(sd2_dir), "config": str(ROOT / "configs" / "tiny.py"),
                          "meshes": FULL_MESHES, "overrides": overrides(sd2_dir, style_data) + [
                              "trainable=full", "full.train_text_encoder=True", "method=textual_inversion",
                              "placeholder_token=zwx", "train.steps=3", "train.learning_rate=2e-5",
                              "checkpoint.every_steps=3"]})
    one, eight = (dict(np.load(out / f"{name}.npz")) for name in FULL_MESHES)
    assert one.keys() == eight.keys() and {k.split("/")[0] for k in one} == {"unet", "text_encoder"}
    fsdp_split = json.loads((out / "fsdp_split.json").read_text())
    assert fsdp_split["1x1"] == 0 and fsdp_split["4x2"] >= len(one) // 4, (fsdp_split, len(one))
    compared = [k for k in one if not k.endswith(ZERO_GRADIENT_SUFFIX)]
    assert len(compared) == len(one) - 3  # one key bias per layer of the tiny text encoder
    worst = max(compared, key=lambda k: relative_difference(eight[k], one[k]))
    assert relative_difference(eight[worst], one[worst]) <= 1e-5, worst
    # ... and every compared weight moved from the base model by 10x that, so agreeing is not trivial.
    from flax import nnx

    from nsync_jax.lora import flat_params
    from nsync_jax.pipeline import load_pipeline

    pipe = load_pipeline(sd2_dir)
    base = {f"{name}/{path}": np.asarray(value) for name in ("unet", "text_encoder")
            for path, value in flat_params(nnx.state(pipe.modules()[name], nnx.Param)).items()}
    assert base.keys() == one.keys()
    least = min(compared, key=lambda k: relative_difference(one[k], base[k]))
    assert relative_difference(one[least], base[least]) > 1e-4, least


def test_sampling_on_8_devices_draws_the_same_images(mesh_runs, sd2_dir):
    from nsync_jax.pipeline import load_pipeline
    from nsync_jax.sampling import SampleSettings, generate

    one_device = generate(load_pipeline(sd2_dir), SAMPLE_PROMPTS, progress=False,
                          settings=SampleSettings(steps=3, guidance=4.0, batch_size=2))
    eight = np.load(mesh_runs / "samples.npy")
    assert eight.shape == one_device.shape and len(eight) == 3
    np.testing.assert_allclose(eight, one_device, atol=2e-5)


def test_negative_set_on_8_devices_is_the_same_files(mesh_runs, sd2_dir, tmp_path):
    from nsync_jax import negatives
    from nsync_jax.pipeline import load_pipeline
    from nsync_jax.sampling import SampleSettings

    prompts = {f"p{i}": p for i, p in enumerate(SAMPLE_PROMPTS)}
    negatives.generate_set(load_pipeline(sd2_dir), prompts, tmp_path, images_per_caption=2, progress=False,
                           settings=SampleSettings(steps=3, guidance=4.0, batch_size=2))
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted(p.name for p in (mesh_runs / "negatives").iterdir()) and len(names) == 7
    # The same noise and prompts on 1 and 8 devices; the float images agree to ~1e-5 (see the test above), so
    # a pixel can only land on the other side of a rounding boundary: at most one grey level, very rarely.
    for name in names:
        if name.endswith(".png"):
            one = np.asarray(Image.open(tmp_path / name), np.int16)
            eight = np.asarray(Image.open(mesh_runs / "negatives" / name), np.int16)
            assert np.abs(one - eight).max() <= 1 and np.mean(one != eight) < 0.01, name


# About 2 minutes on 2 cores (two launches of two processes, each compiling): run with `-m slow`.
@pytest.mark.slow
def test_two_processes_train_resume_export_like_one(mesh_runs, sd2_dir, style_data, tmp_path):
    workdir = tmp_path / "run"
    command = [str(ROOT / "launch" / "local.sh"), "2", "4", sys.executable, "-m", "nsync_jax.cli", "train",
               "--config", str(ROOT / "configs" / "tiny.py"), "--workdir", str(workdir)]
    flags = [f"--config.{o}" for o in overrides(sd2_dir, style_data)]
    first = [f if not f.startswith("--config.train.steps=") else "--config.train.steps=2" for f in flags]
    env = cpu_env(tmp_path / "cache")
    for stage_flags in (first, flags):  # two steps, then resume from that checkpoint to the end
        result = subprocess.run(command + stage_flags, env=env, cwd=ROOT, capture_output=True, text=True,
                                timeout=600)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [2, 4]
    metrics = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]  # one writer: process 0

    exported = tmp_path / "exported.safetensors"
    subprocess.run([sys.executable, "-m", "nsync_jax.cli", "export", "--workdir", str(workdir), "--output",
                    str(exported)], check=True, cwd=ROOT, env=env, timeout=300)
    single = learned_rows(mesh_runs, "8x1")
    for path in (exported, workdir / "learned_embeds.safetensors"):
        assert relative_difference(load_file(path)["<tiny-style>"], single) <= 1e-5, path


def test_mesh_sizes_are_checked():
    assert dict(distributed.make_mesh().shape) == {"data": 1, "fsdp": 1}
    for data, fsdp, message in ((2, 1, "mesh.data=2 x mesh.fsdp=1 needs 2 devices, this run has 1"),
                                (-1, -1, "both be -1"), (0, 1, "mesh.data=0")):
        with pytest.raises(UserError, match=message):
            distributed.make_mesh(data, fsdp)


def test_put_keeps_device_arrays_on_device_and_copies_what_is_donated():
    whole = distributed.replicated(distributed.make_mesh())
    weights = jnp.arange(6.0)
    placed = distributed.put(weights, whole)
    assert placed.unsafe_buffer_pointer() == weights.unsafe_buffer_pointer()  # no round trip through the host
    donated = distributed.put(weights, whole, copy=True)
    jax.jit(lambda x: x + 1, donate_argnums=0)(donated)
    assert donated.is_deleted() and not weights.is_deleted()
    np.testing.assert_array_equal(distributed.put(np.arange(3.0), whole), np.arange(3.0))


def test_process_flags_are_checked():
    distributed.initialize()  # one process and no cluster: nothing to join
    with pytest.raises(UserError, match="--process-id must be in"):
        distributed.initialize("127.0.0.1:1", 2, 5)
    with pytest.raises(UserError, match="must be given together"):
        distributed.initialize("127.0.0.1:1", None, None)
