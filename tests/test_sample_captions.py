"""`nsync-jax sample --captions/--prompts-file`: the released test-image protocols (`gen_imgs.py`, img2txt2img,
and `gen_imgs_random_prompts.py`) as caption-matched sets: `<stem>.png` per caption, redraws of only the missing
or damaged files, the same bytes on 1 and 8 devices, and the flags' one-line errors."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from nsync_jax.cli import main
from nsync_jax.imageio import read_prompt_list
from nsync_jax.negatives import choose_prompts

CAPTIONS = {"harbour": "a harbour", "cat": "a cat", "star": "a red star"}
SMALL = ["--steps", "2", "--height", "32", "--batch-size", "2"]


@pytest.fixture(scope="module")
def embeddings(tmp_path_factory):
    from safetensors.numpy import save_file

    folder = tmp_path_factory.mktemp("embeddings")
    for name, seed in (("style", 2), ("other", 3)):
        rows = np.random.default_rng(seed).standard_normal((2, 32)).astype(np.float32)
        save_file({"<style>": rows}, folder / f"{name}.safetensors")
    return folder


@pytest.fixture(scope="module")
def captions(tmp_path_factory):
    folder = tmp_path_factory.mktemp("captions")
    for stem, text in CAPTIONS.items():
        (folder / f"{stem}.txt").write_text(text + "\n")
    return folder


def sample(capsys, *args):
    code = main(["sample", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


@pytest.fixture(scope="module")
def drawn(sd1_dir, captions, embeddings, tmp_path_factory):
    """The sample arguments of the captions' set and the folder they drew it into, on one device."""
    args = ["--model", sd1_dir, "--captions", captions, "--embeddings", embeddings / "style.safetensors",
            "--template", "{caption} in the style of <style>", "--save-size", 16, *SMALL]
    out = tmp_path_factory.mktemp("drawn") / "one"
    assert main(["sample", *map(str, args), "--output", str(out)]) == 0
    return args, out


def test_captions_draw_one_image_per_caption_and_redraw_only_what_is_missing(drawn, embeddings, tmp_path, capsys):
    args, first = drawn
    assert sorted(p.name for p in first.iterdir() if not p.name.startswith(".")) == [
        "cat.png", "harbour.png", "manifest.json", "star.png"]
    manifest = json.loads((first / "manifest.json").read_text())
    assert manifest["files"]["cat.png"] == "a cat in the style of <style>"
    assert manifest["resolution"] == 32 and manifest["save_size"] == 16
    assert Image.open(first / "cat.png").size == (16, 16)

    # A rerun draws the deleted and the truncated file again, the same bytes, and leaves the third untouched.
    out = tmp_path / "out"
    shutil.copytree(first, out)
    stamp = (out / "harbour.png").stat().st_mtime_ns
    (out / "cat.png").unlink()
    (out / "star.png").write_bytes((out / "star.png").read_bytes()[:50])
    code, text = sample(capsys, *args, "--output", out)
    assert code == 0 and "drew 2 images, kept 1" in text, text
    assert (out / "harbour.png").stat().st_mtime_ns == stamp
    assert same_bytes(out, first)
    code, text = sample(capsys, *args, "--output", out)
    assert code == 0 and "drew 0 images, kept 3" in text, text
    # Other embeddings are another set: they may not complete this one.
    (out / "cat.png").unlink()
    code, text = sample(capsys, *args[:4], "--embeddings", embeddings / "other.safetensors", *args[6:],
                        "--output", out)
    assert code == 2 and "other settings (learned_rows)" in text, text


def test_the_manifest_holds_the_lora_files_drawn_with(sd1_dir, captions, tmp_path, capsys):
    from safetensors.numpy import save_file

    module = "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_k"  # cross-attention: 32 in, 16 out
    rng = np.random.default_rng(4)
    save_file({f"{module}.lora_A.weight": rng.standard_normal((2, 32), np.float32),
               f"{module}.lora_B.weight": rng.standard_normal((16, 2), np.float32)}, tmp_path / "style.safetensors")
    args = ["--model", sd1_dir, "--captions", captions, "--lora", tmp_path / "style.safetensors", *SMALL,
            "--output", tmp_path / "out"]
    code, text = sample(capsys, *args)
    assert code == 0, text
    weights = json.loads((tmp_path / "out" / "manifest.json").read_text())["weights"]
    assert weights["lora_scale"] == 1.0 and [entry["file"] for entry in weights["lora"]] == ["style.safetensors"]
    (tmp_path / "out" / "cat.png").unlink()
    code, text = sample(capsys, *args, "--lora-scale", 0.5)
    assert code == 2 and "other settings (weights)" in text, text


@pytest.mark.slow  # 12 to 50 s on 2 busy CPU cores: a process of its own compiles the set for 8 devices
def test_eight_devices_draw_the_same_bytes_as_one(drawn, tmp_path):
    args, first = drawn
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8".strip()}
    subprocess.run([sys.executable, "-m", "nsync_jax.cli", "sample", *map(str, args), "--output", str(tmp_path)],
                   check=True, env=env, cwd=Path(__file__).resolve().parents[1], timeout=600, capture_output=True)
    assert same_bytes(tmp_path, first)


def same_bytes(folder, other):
    return all((folder / f"{stem}.png").read_bytes() == (other / f"{stem}.png").read_bytes() for stem in CAPTIONS)


def test_prompt_list_draws_lines_by_number(sd1_dir, embeddings, tmp_path, capsys):
    prompts = tmp_path / "paintings.txt"
    prompts.write_text("a harbor\n\na lake\na  rainy street\na still life\n")
    every = read_prompt_list(prompts)
    assert every == {"img_0": "a harbor", "img_2": "a lake", "img_3": "a rainy street", "img_4": "a still life"}
    chosen = choose_prompts(every, 2, 3, prompts)
    assert len(chosen) == 2 and chosen.items() <= every.items() and chosen == choose_prompts(every, 2, 3, prompts)
    assert {frozenset(choose_prompts(every, 2, seed, prompts)) for seed in range(8)} != {frozenset(chosen)}

    out = tmp_path / "out"
    code, text = sample(capsys, "--model", sd1_dir, "--prompts-file", prompts, "--num-prompts", 2, "--seed", 3,
                        "--embeddings", embeddings / "style.safetensors", "--template",
                        "<style>, {caption}", *SMALL, "--output", out)
    assert code == 0 and "drew 2 images, kept 0" in text, text
    files = json.loads((out / "manifest.json").read_text())["files"]
    assert files == {f"{stem}.png": f"<style>, {line}" for stem, line in chosen.items()}


@pytest.mark.parametrize("flags, message", [
    (["--prompt", "a cat", "--captions", "@captions"],
     "give one of --prompt, --captions and --prompts-file, got --prompt and --captions"),
    ([], "give one of --prompt, --captions and --prompts-file, got none"),
    (["--prompt", "a cat", "--template", "{caption}"], "--prompt does not take --template"),
    (["--captions", "@captions", "--num-prompts", "2"], "--captions does not take --num-prompts"),
    (["--captions", "@captions", "--latents", "x.npy"], "--captions does not take --latents"),
    (["--captions", "@captions", "--height", "32", "--width", "64"], "--captions draws square images"),
    (["--captions", "@captions", "--template", "{caption} {style_phrase}"],
     "--template '{caption} {style_phrase}': needs {caption} and may use only {caption}"),
    (["--prompts-file", "@prompts", "--num-prompts", "3"], "--num-prompts 3: @prompts has only 2 prompts"),
    (["--prompts-file", "@captions/missing.txt"], "missing.txt: cannot read the prompt list"),
])
def test_flag_errors_are_one_line(sd1_dir, captions, tmp_path, capsys, flags, message):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\na dog\n")
    fill = lambda text: text.replace("@captions", str(captions)).replace("@prompts", str(prompts))
    code, text = sample(capsys, "--model", sd1_dir, *map(fill, flags), "--output", tmp_path / "out")
    assert code == 2 and text.startswith("nsync-jax: error: ") and fill(message) in text, text
    assert len(text.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
