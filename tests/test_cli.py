"""The `nsync-jax` command: its help, and `sample` (files written, parity with diffusers through the CLI,
one-line errors)."""
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from nsync_jax.cli import main


def run_cli(capsys, *args):
    code = main(["sample", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.err


def test_help_opens_with_what_the_tool_does():
    """`python -m nsync_jax.cli` is the `nsync-jax` command; its help starts with what it does for a user and lists
    every command with a line of its own."""
    from nsync_jax.cli import COMMANDS, DESCRIPTION

    result = subprocess.run([sys.executable, "-m", "nsync_jax.cli", "--help"], capture_output=True, text=True,
                            check=True)
    usage, description, commands = result.stdout.split("\n\n")[:3]
    assert usage.startswith("usage: nsync-jax") and description == DESCRIPTION
    for name in ("sample", "negatives", "caption", "data", "train", "export", "evaluate", "convert-weights", "demo",
                 "toyworld", "edit", "evaluate-edits"):
        assert f"\n    {name} " in commands
    assert len(COMMANDS) == 12


def test_sample_writes_pngs_matching_diffusers(sd1_dir, tmp_path, capsys):
    from diffusers import StableDiffusionPipeline

    latents = np.random.default_rng(1).standard_normal((3, 4, 16, 16)).astype(np.float32)
    np.save(tmp_path / "latents.npy", latents)
    code, err = run_cli(capsys, "--model", sd1_dir, "--prompt", "a red star", "--prompt", "a blue circle",
                        "--num-images", 1, "--steps", 4, "--height", 32, "--width", 32, "--seed", 0,
                        "--output", tmp_path / "out", "--batch-size", 1, "--latents", tmp_path / "latents.npy")
    assert code == 2 and "latents have shape (3, 4, 16, 16), expected (2, 4, 16, 16)" in err
    np.save(tmp_path / "latents.npy", latents[:2])
    code, err = run_cli(capsys, "--model", sd1_dir, "--prompt", "a red star", "--prompt", "a blue circle",
                        "--steps", 4, "--height", 32, "--width", 32, "--output", tmp_path / "out",
                        "--latents", tmp_path / "latents.npy")
    assert code == 0, err
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert files == ["000000.png", "000001.png"]
    pipe = StableDiffusionPipeline.from_pretrained(sd1_dir, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    reference = pipe(["a red star", "a blue circle"], num_inference_steps=4, height=32, width=32,
                     latents=torch.from_numpy(latents[:2]), output_type="pil").images
    for name, expected in zip(files, reference):
        ours = np.asarray(Image.open(tmp_path / "out" / name), np.int16)
        assert np.abs(ours - np.asarray(expected, np.int16)).max() <= 2


def test_sample_is_reproducible_from_seed(sd1_dir, tmp_path, capsys):
    for name in ("a", "b"):
        code, err = run_cli(capsys, "--model", sd1_dir, "--prompt", "a cat", "--num-images", 2, "--steps", 2,
                            "--height", 32, "--width", 32, "--seed", 5, "--output", tmp_path / name)
        assert code == 0, err
    for index in ("000000.png", "000001.png"):
        np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "a" / index)),
                                      np.asarray(Image.open(tmp_path / "b" / index)))
    assert not np.array_equal(np.asarray(Image.open(tmp_path / "a" / "000000.png")),
                              np.asarray(Image.open(tmp_path / "a" / "000001.png")))


def test_user_errors_are_one_line(sd1_dir, tmp_path, capsys):
    base = ["--prompt", "a cat", "--steps", "2", "--output", str(tmp_path / "out")]
    code, err = run_cli(capsys, "--model", tmp_path / "nowhere", *base)
    assert code == 2 and err.strip().count("\n") == 0 and "nowhere: model folder not found" in err

    code, err = run_cli(capsys, "--model", sd1_dir, "--height", 30, *base)
    assert code == 2 and "--height must be divisible by 8, got 30" in err

    code, err = run_cli(capsys, "--model", sd1_dir, "--handoff-timestep", 500, *base)
    assert code == 2 and "--handoff-timestep needs --lora" in err

    broken = tmp_path / "broken"
    shutil.copytree(sd1_dir, broken)
    shutil.rmtree(broken / "vae")
    code, err = run_cli(capsys, "--model", broken, *base)
    assert code == 2 and "subfolder vae/ missing" in err

    with pytest.raises(SystemExit) as exit_info:
        main(["sample", "--model", str(sd1_dir), "--scheduler", "heun", *base])
    assert exit_info.value.code == 2 and "--scheduler: invalid choice: 'heun'" in capsys.readouterr().err

    config = json.loads((sd1_dir / "scheduler" / "scheduler_config.json").read_text())
    shutil.rmtree(broken)
    shutil.copytree(sd1_dir, broken)
    config["skip_prk_steps"] = False
    (broken / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
    code, err = run_cli(capsys, "--model", broken, *base)
    assert code == 2 and "scheduler_config.json: scheduler option skip_prk_steps=False is not supported" in err


def test_sample_with_learned_embeddings_matches_diffusers(sd1_dir, tmp_path, capsys):
    from diffusers import StableDiffusionPipeline
    from safetensors.numpy import save_file

    rows = np.random.default_rng(2).standard_normal((2, 32)).astype(np.float32)
    save_file({"<style>": rows}, tmp_path / "learned_embeds.safetensors")
    latents = np.random.default_rng(3).standard_normal((1, 4, 16, 16)).astype(np.float32)
    np.save(tmp_path / "latents.npy", latents)
    prompt = "a cat in the style of <style>"
    code, err = run_cli(capsys, "--model", sd1_dir, "--prompt", prompt, "--steps", 3, "--height", 32,
                        "--width", 32, "--embeddings", tmp_path / "learned_embeds.safetensors",
                        "--latents", tmp_path / "latents.npy", "--output", tmp_path / "out")
    assert code == 0, err
    pipe = StableDiffusionPipeline.from_pretrained(sd1_dir, safety_checker=None)
    pipe.load_textual_inversion(str(tmp_path / "learned_embeds.safetensors"))
    pipe.set_progress_bar_config(disable=True)
    expected = pipe(prompt, num_inference_steps=3, height=32, width=32, latents=torch.from_numpy(latents),
                    output_type="pil").images[0]
    ours = np.asarray(Image.open(tmp_path / "out" / "000000.png"), np.int16)
    assert np.abs(ours - np.asarray(expected, np.int16)).max() <= 2


def test_sample_hands_off_where_the_lora_files_say(tmp_path, sd1_dir, capsys):
    """Without --handoff-timestep, `sample` uses the handoff_timestep a LoRA's header records (its training's
    train.max_timestep); files that disagree need the flag, files from other tools record none."""
    from safetensors.numpy import save_file

    from nsync_jax.lora import recorded_handoff, write_lora_file

    adapter = {"unet": {"a.lora_down": np.ones((4, 2), np.float32), "a.lora_up": np.ones((2, 4), np.float32)}}
    files = {}
    for name, metadata in (("low", {"handoff_timestep": 600}), ("also_low", {"handoff_timestep": 600}),
                           ("everywhere", {"method": "nsync"}), ("higher", {"handoff_timestep": 800})):
        files[name] = tmp_path / f"{name}.safetensors"
        write_lora_file(files[name], adapter, 1.0, metadata=metadata)
    save_file({"x.lora_A.weight": np.ones((2, 4), np.float32)}, tmp_path / "other_tool.safetensors")

    assert recorded_handoff([files["low"], files["also_low"]]) == 600
    assert recorded_handoff([files["everywhere"]]) == 0
    assert recorded_handoff([tmp_path / "other_tool.safetensors"]) == 0
    assert recorded_handoff([]) == 0
    code, err = run_cli(capsys, "--model", sd1_dir, "--prompt", "a cat", "--output", tmp_path / "out",
                        "--lora", files["low"], "--lora", files["higher"])
    assert code == 2 and err.strip().count("\n") == 0
    assert "record different handoff timesteps" in err and "higher.safetensors: 800" in err
    (tmp_path / "broken.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}")
    code, err = run_cli(capsys, "--model", sd1_dir, "--prompt", "a cat", "--output", tmp_path / "out",
                        "--lora", tmp_path / "broken.safetensors")
    assert code == 2 and "broken.safetensors: cannot read safetensors header" in err
