"""The SDXL benchmarks (benchmarks/sdxl_memory.py, sdxl_speed.py) on the tiny SDXL: the parameter counts match
diffusers'/transformers' modules, XLA plans the NSYNC step, and every row of the speed report is timed for both
sides (the GPU rows of benchmarks/gpu.sh run the same code at SDXL base's size)."""
import argparse
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
import sdxl_memory  # noqa: E402
import sdxl_speed  # noqa: E402

from sdxl_fixtures import sdxl_dir  # noqa: E402,F401 (a fixture)


def test_parameter_counts_are_those_of_the_torch_modules(sdxl_dir):
    from diffusers import StableDiffusionXLPipeline

    reference = StableDiffusionXLPipeline.from_pretrained(sdxl_dir)
    counts = sdxl_memory.parameter_counts(sdxl_memory.abstract_sdxl(sdxl_dir, jnp.float32))
    assert counts == {name: sum(p.numel() for p in getattr(reference, name).parameters())
                      for name in ("text_encoder", "text_encoder_2", "unet", "vae")}


def test_nsync_step_plan_holds_the_frozen_weights_and_the_activations(sdxl_dir):
    plan = sdxl_memory.nsync_step_plan(sdxl_dir, 2, False, 32, "float32")
    # The frozen UNet and both encoders are the step's arguments (whatever jit prunes as unused aside).
    assert 0.9 * plan["frozen"] <= plan["argument"] <= plan["frozen"] + 2**20
    # At least the UNet's input and output of each of the 3 groups x 2 triples stay live for the backward pass.
    assert plan["temp"] > 2 * 3 * 2 * 16 * 16 * 4 * 4
    line = sdxl_memory.report(argparse.Namespace(model=sdxl_dir, resolution=32, dtype="float32", mesh_remat=False),
                              dict.fromkeys(("text_encoder", "text_encoder_2", "unet", "vae"), 10), [plan], [])
    assert "| 2 | False |" in line


# Both sides' sampling loops compile (about 20 s): with -m slow.
@pytest.mark.slow
def test_sampling_rows_time_both_sides(sdxl_dir):
    """In this process (the training rows, with the script's child process: `test_scripts_run_end_to_end`)."""
    args = argparse.Namespace(resolution=32, parts=["sampling"], batch=1, steps=1, guidance=5.0, repeats=1,
                              dtype="float32", preset="tiny")
    peer, ours = sdxl_speed.peer_rows(args, sdxl_dir), sdxl_speed.our_rows(args, sdxl_dir)
    assert min(*peer["sampling"], *ours["sampling"]) > 0
    report = sdxl_speed.report(args, peer, ours)
    assert "| sampling, 1 Euler steps, guidance 5.0, decode, batch 1 | diffusers StableDiffusionXLPipeline" in report


# Child processes, one compiling for 8 simulated devices, two importing torch and JAX: with `-m slow`.
@pytest.mark.slow
def test_scripts_run_end_to_end(sdxl_dir, tmp_path):
    replicated, split = sdxl_memory.run_mesh_child(argparse.Namespace(
        model=sdxl_dir, resolution=32, dtype="float32", meshes=["8x1", "1x8"], mesh_remat=False))
    assert split["frozen"] < replicated["frozen"] and int(split["frozen_split"].split("/")[0]) > 0
    run = lambda script, *args: subprocess.run([sys.executable, str(BENCHMARKS / script), *args, "--no-write"],
                                               check=True, capture_output=True, text=True).stdout
    speed = run("sdxl_speed.py", "--preset", "tiny", "--resolution", "32", "--steps", "1", "--train-steps", "1",
                "--repeats", "1", "--model-dir", str(tmp_path))
    assert "| sampling, 1 Euler steps" in speed
    assert "| NSYNC step, 2 triples (3 groups), remat True | released SDXL loop" in speed
