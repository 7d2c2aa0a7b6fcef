"""SDXL sampling in the shared loop against diffusers' `StableDiffusionXLPipeline` from the same initial latents, on
the tiny random SDXL of tests/sdxl_fixtures.py; learned SDXL tokens; the CLI on an SDXL folder."""
import jax
import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from nsync_jax.cli import main
from nsync_jax.errors import UserError
from nsync_jax.pipeline import load_pipeline
from nsync_jax.sampling import SampleSettings, generate
from sdxl_fixtures import TEXT_ENCODER_1, TEXT_ENCODER_2, sdxl_dir  # noqa: F401 (a fixture)
from test_sampling import TORCH_SCHEDULERS

PROMPTS = ["a red star in the style of painting", "a photo of a cat"]
HEIGHT, WIDTH = 24, 32  # non-square; latents 12 x 16


@pytest.fixture(scope="module")
def pipe(sdxl_dir):
    return load_pipeline(sdxl_dir, allow_sdxl=True)


@pytest.fixture(scope="module")
def torch_pipe(sdxl_dir):
    from diffusers import StableDiffusionXLPipeline

    torch_pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_dir)
    torch_pipe.set_progress_bar_config(disable=True)
    return torch_pipe


def latents_nchw(count=2, seed=0):
    return np.random.default_rng(seed).standard_normal((count, 4, HEIGHT // 2, WIDTH // 2)).astype(np.float32)


# Each scheduler with and without a negative prompt (without one, diffusers conditions the negative branch on
# zeros: force_zeros_for_empty_prompt); on some, micro-conditioning other than the defaults, guidance rescale and
# clip_skip (options: keyword arguments of both diffusers' pipeline and SampleSettings).
# Each case compiles a loop of its own (5 to 20 s on a CPU): only one runs by default; the CLI test below compares
# Euler without a negative prompt.
@pytest.mark.parametrize("scheduler, negative, options, clip_skip", [
    pytest.param(None, None, {}, 0, marks=pytest.mark.slow),  # the model's Euler
    ("euler", "blue", dict(original_size=(64, 48), crops_coords_top_left=(4, 8), target_size=(48, 64),
                           guidance_rescale=0.7), 0),
    pytest.param("ddim", None, dict(original_size=(96, 128)), 1, marks=pytest.mark.slow),
    pytest.param("ddim", "blue", dict(guidance_rescale=0.3), 0, marks=pytest.mark.slow),
    pytest.param("dpm", None, {}, 0, marks=pytest.mark.slow),
    pytest.param("dpm", "blue", dict(crops_coords_top_left=(16, 0)), 1, marks=pytest.mark.slow),
    pytest.param("pndm", None, {}, 0, marks=pytest.mark.slow),
    pytest.param("pndm", "blue", dict(target_size=(32, 24)), 0, marks=pytest.mark.slow),
])
def test_sampling_matches_diffusers(scheduler, negative, options, clip_skip, pipe, torch_pipe):
    latents = latents_nchw()
    # PNDM over a config that does not say skip_prk_steps: ours runs PLMS (schedulers.py), so the reference does too.
    plms = {"skip_prk_steps": True} if scheduler == "pndm" else {}
    torch_pipe.scheduler = TORCH_SCHEDULERS[scheduler or "euler"].from_config(torch_pipe.scheduler.config, **plms)
    reference = torch_pipe(PROMPTS, negative_prompt=negative and [negative] * 2, num_inference_steps=3,
                           guidance_scale=5.0, height=HEIGHT, width=WIDTH, latents=torch.from_numpy(latents),
                           clip_skip=clip_skip or None, output_type="np", **options).images
    settings = SampleSettings(scheduler=scheduler, steps=3, guidance=5.0, height=HEIGHT, width=WIDTH,
                              clip_skip=clip_skip, batch_size=2, **options)
    ours = generate(pipe, PROMPTS, negative_prompt=negative or "", settings=settings, progress=False,
                    latents=latents.transpose(0, 2, 3, 1))
    assert ours.shape == reference.shape == (2, HEIGHT, WIDTH, 3)
    assert np.abs(ours - reference).max() <= 2 / 255
    # The images must depend on the prompt, or the comparison above proves little.
    assert np.abs(ours[0] - ours[1]).max() > 10 / 255


@pytest.mark.slow
def test_micro_conditioning_and_the_zeroed_negative_change_the_image(pipe):
    """Each setting the comparisons above pass must change the image (not only agree with diffusers' defaults)."""
    def draw(negative="", **micro):
        settings = SampleSettings(steps=2, guidance=5.0, height=HEIGHT, width=WIDTH, batch_size=1, **micro)
        return generate(pipe, PROMPTS[:1], negative_prompt=negative, settings=settings, progress=False,
                        latents=latents_nchw(1).transpose(0, 2, 3, 1))

    default = draw()
    for other in (draw(original_size=(HEIGHT * 4, WIDTH * 4)), draw(crops_coords_top_left=(8, 8)),
                  draw(target_size=(HEIGHT * 2, WIDTH)), draw(negative=" "), draw(guidance_rescale=0.7)):
        assert np.abs(other - default).max() > 1e-3
    np.testing.assert_array_equal(draw(original_size=(HEIGHT, WIDTH), target_size=(HEIGHT, WIDTH)), default)


EIGHT_DEVICES = """
import sys
import jax, numpy as np
from nsync_jax.pipeline import load_pipeline
from nsync_jax.sampling import SampleSettings, generate
model, prompts, out = sys.argv[1], sys.argv[2].split("|"), sys.argv[3]
assert jax.device_count() == 8
settings = SampleSettings(steps=2, guidance=4.0, height=24, width=32, batch_size=1, original_size=(48, 64))
np.save(out, generate(load_pipeline(model, allow_sdxl=True), prompts, seed=3, settings=settings, progress=False))
"""


@pytest.mark.slow
def test_sampling_on_8_devices_draws_the_same_images(sdxl_dir, pipe, tmp_path):
    """The pytree token ids and time_ids split and replicate as SD's arrays do: 8 simulated devices draw what one
    does (3 images: one padded call there, three calls here)."""
    import subprocess
    import sys

    from test_sharding import ROOT, cpu_env

    prompts = [*PROMPTS, "a blue circle"]
    subprocess.run([sys.executable, "-c", EIGHT_DEVICES, str(sdxl_dir), "|".join(prompts), str(tmp_path / "eight.npy")],
                   check=True, env=cpu_env(tmp_path / "cache", 8), cwd=ROOT, timeout=900)
    settings = SampleSettings(steps=2, guidance=4.0, height=HEIGHT, width=WIDTH, batch_size=1, original_size=(48, 64))
    one = generate(pipe, prompts, seed=3, settings=settings, progress=False)
    eight = np.load(tmp_path / "eight.npy")
    assert eight.shape == one.shape == (3, HEIGHT, WIDTH, 3)
    np.testing.assert_allclose(eight, one, atol=2e-5)


@pytest.mark.slow
def test_bfloat16_sampling_decodes_in_float32(sdxl_dir, pipe):
    """force_upcast: a bfloat16 UNet and text encoders, a float32 VAE; the images stay close to float32's."""
    half = load_pipeline(sdxl_dir, dtype=jax.numpy.bfloat16, allow_sdxl=True)
    assert half.vae.decoder.conv_in.kernel[...].dtype == np.float32
    settings = SampleSettings(steps=2, guidance=5.0, height=HEIGHT, width=WIDTH, batch_size=1)
    images = [generate(model, PROMPTS[:1], settings=settings, progress=False,
                       latents=latents_nchw(1).transpose(0, 2, 3, 1)) for model in (half, pipe)]
    assert images[0].dtype == np.float32 and 0 < np.abs(images[0] - images[1]).max() < 0.1


def test_empty_negative_is_zeros_only_where_the_model_asks(sdxl_dir, pipe, tmp_path):
    import json
    import shutil

    zeroed = lambda model, negative: model.sampling_conditioning(SampleSettings(), negative, 16, 16)[0].zero_negative
    assert zeroed(pipe, "") and not zeroed(pipe, "blue")
    folder = tmp_path / "sdxl"
    shutil.copytree(sdxl_dir, folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "force_zeros_for_empty_prompt": False}))
    assert not zeroed(load_pipeline(folder, allow_sdxl=True), "")


def write_sdxl_embedding(path, pipe, word):
    """An SDXL embedding file whose one vector is, in each encoder, `word`'s own row."""
    rows = {}
    for key, tokenizer, encoder in (("clip_l", pipe.tokenizer, pipe.text_encoder),
                                    ("clip_g", pipe.tokenizer_2, pipe.text_encoder_2)):
        (token_id,) = tokenizer.encode(word, add_special_tokens=False)
        rows[key] = np.asarray(encoder.embeddings.token_embedding.embedding[...])[token_id:token_id + 1]
    save_file(rows, str(path))
    return path


def test_learned_sdxl_token_conditions_as_the_word_it_copies(sdxl_dir, tmp_path):
    """A token whose clip_l and clip_g rows are "cat"'s conditions the UNet as "cat" does, through both
    tokenizers and encoders, the pooled embedding included."""
    pipe = load_pipeline(sdxl_dir, allow_sdxl=True)
    assert pipe.add_embeddings(write_sdxl_embedding(tmp_path / "<kitty>.safetensors", pipe, "cat")) == ["<kitty>"]
    assert [len(rows) for rows in pipe.extra_token_rows] == [1, 1]
    conditioner, extras = pipe.sampling_conditioning(SampleSettings(), "", HEIGHT, WIDTH)
    encoders = {name: pipe.modules()[name] for name in conditioner.encoders}

    encode = jax.jit(lambda ids: conditioner(encoders, pipe.extra_token_rows, ids, extras, negative=False))

    def condition(prompt):
        return encode(pipe.token_ids([prompt]))

    (learned, learned_added), (word, word_added) = condition("a photo of a <kitty>"), condition("a photo of a cat")
    np.testing.assert_allclose(learned, word, atol=1e-6)
    np.testing.assert_allclose(learned_added["text_embeds"], word_added["text_embeds"], atol=1e-6)
    assert np.abs(np.asarray(condition("a photo of a dog")[0]) - np.asarray(word)).max() > 1e-3


def test_embedding_files_of_the_wrong_family_are_refused(pipe, sd1_dir, tmp_path):
    sd1_file = tmp_path / "style.safetensors"
    save_file({"emb_params": np.zeros((1, TEXT_ENCODER_1["hidden_size"]), np.float32)}, str(sd1_file))
    with pytest.raises(UserError, match=f"{sd1_file}: not an SDXL embedding"):
        pipe.add_embeddings(sd1_file)
    swapped = tmp_path / "swapped.safetensors"
    save_file({"clip_l": np.zeros((1, TEXT_ENCODER_2["hidden_size"]), np.float32),
               "clip_g": np.zeros((1, TEXT_ENCODER_1["hidden_size"]), np.float32)}, str(swapped))
    with pytest.raises(UserError, match=f"{swapped}: embedding 'swapped' has width 40, but the text encoder's is 24"):
        pipe.add_embeddings(swapped)
    assert "swapped" not in pipe.tokenizer.get_vocab() and "swapped" not in pipe.tokenizer_2.get_vocab()
    with pytest.raises(UserError, match=f"{swapped}: an SDXL embedding"):
        load_pipeline(sd1_dir).add_embeddings(swapped)


def run_cli(capsys, *args):
    code = main([*map(str, args)])
    return code, capsys.readouterr().err


def test_sample_cli_draws_as_generate_and_refuses_what_sdxl_lacks(sdxl_dir, sd1_dir, pipe, torch_pipe, tmp_path,
                                                                  capsys):
    from PIL import Image

    latents = latents_nchw(1, seed=5)
    np.save(tmp_path / "latents.npy", latents)
    common = ("--steps", 2, "--guidance", 4.0, "--height", HEIGHT, "--width", WIDTH, "--batch-size", 1)
    code, err = run_cli(capsys, "sample", "--model", sdxl_dir, "--prompt", PROMPTS[0], *common,
                        "--original-size", 48, 64, "--crops-coords-top-left", 2, 4, "--target-size", 24, 32,
                        "--latents", tmp_path / "latents.npy", "--output", tmp_path / "out")
    assert code == 0, err
    torch_pipe.scheduler = TORCH_SCHEDULERS["euler"].from_config(torch_pipe.scheduler.config)
    reference = torch_pipe(PROMPTS[0], num_inference_steps=2, guidance_scale=4.0, height=HEIGHT, width=WIDTH,
                           latents=torch.from_numpy(latents), original_size=(48, 64), crops_coords_top_left=(2, 4),
                           target_size=(24, 32), output_type="np").images[0]
    drawn = np.asarray(Image.open(tmp_path / "out" / "000000.png"), np.float32) / 255
    assert np.abs(drawn - np.round(reference * 255) / 255).max() <= 2 / 255  # both as 8-bit images
    # --vae: a model folder's VAE decodes; its own here, so the same bytes.
    code, err = run_cli(capsys, "sample", "--model", sdxl_dir, "--prompt", PROMPTS[0], *common,
                        "--original-size", 48, 64, "--crops-coords-top-left", 2, 4, "--target-size", 24, 32,
                        "--latents", tmp_path / "latents.npy", "--vae", sdxl_dir, "--output", tmp_path / "vae")
    assert code == 0, err
    assert (tmp_path / "vae" / "000000.png").read_bytes() == (tmp_path / "out" / "000000.png").read_bytes()

    save_file({"lora_unet_x.alpha": np.ones((), np.float32)}, str(tmp_path / "lora.safetensors"))
    for model, flags, message in (
            (sdxl_dir, ("--lora", tmp_path / "lora.safetensors"),
             "lora.safetensors: unexpected key 'lora_unet_x.alpha'"),
            (sd1_dir, ("--original-size", 64, 64), "--original-size is SDXL's micro-conditioning; .* 1.x/2.x"),
            (sdxl_dir, ("--guidance", 1.0, "--guidance-rescale", 0.7), "--guidance-rescale must be in [0, 1] and "
                                                                       "needs --guidance above 1")):
        code, err = run_cli(capsys, "sample", "--model", model, "--prompt", "a cat", *common, *flags,
                            "--output", tmp_path / "refused")
        assert code == 2 and len(err.strip().splitlines()) == 1 and message.split(" .* ")[0] in err, err


def test_negatives_on_sdxl_writes_what_sample_captions_writes(sdxl_dir, tmp_path, capsys):
    captions = tmp_path / "captions"
    captions.mkdir()
    for stem, text in (("cat", "a cat"), ("star", "a red star")):
        (captions / f"{stem}.txt").write_text(text)
    common = ("--model", sdxl_dir, "--captions", captions, "--steps", 2, "--guidance", 4.0, "--batch-size", 2)
    code, err = run_cli(capsys, "negatives", *common, "--resolution", 16, "--template", "{caption}",
                        "--output", tmp_path / "negatives")
    assert code == 0, err
    code, err = run_cli(capsys, "sample", *common, "--height", 16, "--output", tmp_path / "sampled")
    assert code == 0, err
    for stem in ("cat", "star"):
        negative, sampled = (tmp_path / folder / f"{stem}.png" for folder in ("negatives", "sampled"))
        assert negative.read_bytes() == sampled.read_bytes()
