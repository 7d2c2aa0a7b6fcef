"""The bundled toy-world Stable Diffusion, its pretraining code and the demo built on it."""
import json

import numpy as np
import pytest
import torch

from nsync_jax.cli import main
from nsync_jax.errors import UserError
from nsync_jax.pipeline import load_pipeline
from nsync_jax.sampling import SampleSettings, generate, initial_latents
from nsync_jax.toyworld import demo, pretrain, world
from nsync_jax.train import trainer

PROMPTS = ["a red star on a white background in the style of striped", "a blue circle on a gray background"]


def test_bundled_model_gives_the_same_image_in_diffusers():
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    ours = load_pipeline(pretrain.BUNDLED_MODEL)
    size = ours.default_resolution
    latents = initial_latents(3, range(len(PROMPTS)), (size // ours.vae_scale_factor,) * 2
                              + (ours.unet.config.in_channels,))
    settings = SampleSettings(scheduler="ddim", steps=8, guidance=4.0)
    images = generate(ours, PROMPTS, settings=settings, latents=latents, progress=False)

    pipe = StableDiffusionPipeline.from_pretrained(pretrain.BUNDLED_MODEL, safety_checker=None)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    reference = pipe(PROMPTS, num_inference_steps=8, guidance_scale=4.0, height=size, width=size,
                     latents=torch.from_numpy(latents.transpose(0, 3, 1, 2).copy()), output_type="np").images
    assert images.shape == reference.shape == (2, size, size, 3)
    assert np.abs(images - reference).max() < 2 / 255


def test_bundled_model_folder_records_how_it_was_made():
    summary = json.loads((pretrain.BUNDLED_MODEL / "pretrain.json").read_text())
    # `nsync-jax toyworld pretrain` with no overrides (but for the VAE it reused, if any) made the committed model.
    recorded, default = summary["config"], json.loads(json.dumps(pretrain.default_config().to_dict(), default=list))
    assert {**recorded, "vae_from": ""} == default
    curves = [json.loads(line) for line in (pretrain.BUNDLED_MODEL / "pretrain_log.jsonl").read_text().splitlines()]
    unet = [row["loss"] for row in curves if row["stage"] == "unet"]
    assert unet[-1] < unet[0]  # the denoiser learned something
    total = sum(p.stat().st_size for p in pretrain.BUNDLED_MODEL.rglob("*") if p.is_file())
    assert total < 40 * 2 ** 20


def test_deterministic_encoder_gives_the_posterior_mean_in_diffusers_too(tmp_path):
    from diffusers import AutoencoderKL as TorchAutoencoderKL

    config = pretrain.default_config()
    configs = pretrain.folder_configs(config)
    vae = pretrain.build_modules(configs, seed=0)["vae"]
    images = world.render_batch(world.sample_scenes(0, 2), config.resolution).astype(np.float32) / 127.5 - 1
    wide_mean, wide_logvar = vae.encode(images)
    assert float(wide_logvar.max()) > -5  # a random encoder's posterior is wide
    pretrain.make_deterministic(vae)
    mean, logvar = vae.encode(images)
    np.testing.assert_array_equal(np.asarray(mean), np.asarray(wide_mean))  # only the variance changed
    assert float(logvar.max()) == -30.0

    pretrain.write_model_folder(tmp_path / "model", configs, {"vae": vae}, pretrain.BUNDLED_MODEL / "tokenizer", {})
    torch_vae = TorchAutoencoderKL.from_pretrained(tmp_path / "model" / "vae").eval()
    with torch.no_grad():
        sample = torch_vae.encode(torch.from_numpy(images.transpose(0, 3, 1, 2))).latent_dist.sample()
    np.testing.assert_allclose(sample.numpy().transpose(0, 2, 3, 1), np.asarray(mean), atol=1e-4)


def test_pretrain_refuses_to_reuse_a_vae_trained_with_other_settings(tmp_path):
    config = pretrain.default_config()
    config.vae.latent_channels = 4
    config.vae_from, config.pool_size = str(pretrain.BUNDLED_MODEL), 16
    with pytest.raises(UserError, match=r"vae_from=.*trained with vae.latent_channels=8.*trains vae.latent_channels=4"):
        pretrain.pretrain(config, tmp_path / "model", progress=False)
    assert not (tmp_path / "model").exists()
    config.vae.latent_channels = 8
    config.vae.scale_equivariance = 0.0  # a training setting, not in vae/config.json: read from pretrain.json
    with pytest.raises(UserError, match=r"trained with vae.scale_equivariance=1.0.*trains vae.scale_equivariance=0.0"):
        pretrain.pretrain(config, tmp_path / "model", progress=False)
    config.vae_from = str(tmp_path / "nowhere")
    with pytest.raises(UserError, match="nowhere/pretrain.json: file not found"):
        pretrain.pretrain(config, tmp_path / "model", progress=False)


@pytest.mark.slow
def test_pretrain_writes_a_folder_both_loaders_read(tmp_path):
    from diffusers import StableDiffusionPipeline

    config = pretrain.default_config()
    config.pool_size, config.vae.steps, config.unet.steps, config.warmup_steps = 16, 2, 2, 1
    folder = pretrain.pretrain(config, tmp_path / "model", progress=False)
    load_pipeline(folder)
    StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)


def test_demo_short_run_writes_every_artefact(tmp_path):
    out = tmp_path / "demo"
    code = main(["demo", "--output", str(out), "--config.train_images=3", "--config.test_images=3",
                 "--config.train.steps=2", "--config.train.batch_size=1", "--config.sample.steps=2"])
    assert code == 0
    for name in ("report.md", "report.json", "grid.png", "embeddings/textual_inversion.safetensors",
                 "embeddings/nsync.safetensors", "data/negatives/toy_002.png", "samples/nsync/test_002.png",
                 "samples/base/test_000.png", "data/captions/toy_000.txt", "runs/nsync_lora/lora.safetensors",
                 "samples/nsync_lora/test_002.png"):
        assert (out / name).is_file(), name
    report = json.loads((out / "report.json").read_text())
    assert set(report["scores"]) == {"real", "base", "textual_inversion", "nsync", "nsync_lora"}
    # The real renders are the held-out style itself: the judge must see it.
    assert report["scores"]["real"]["style"] >= 2 / 3
    # The LoRA was trained below timestep 600: its file says where to hand over to the base model.
    from safetensors import safe_open

    with safe_open(out / "runs" / "nsync_lora" / "lora.safetensors", "np") as lora_file:
        assert json.loads(lora_file.metadata()["nsync_jax"])["handoff_timestep"] == 600


def test_demo_rejects_a_style_that_does_not_exist(tmp_path, capsys):
    assert main(["demo", "--output", str(tmp_path), "--config.style=wobbly"]) == 2
    assert "--config.style='wobbly'" in capsys.readouterr().err


def test_every_benchmark_run_has_a_valid_training_config(tmp_path):
    """Runs that train weights (NSYNC-LoRA, StyleForge) prompt with the rare word their training used."""
    config = demo.default_config()
    scene = world.sample_scenes(0, 1, styles=("halftone",))[0]
    for run in demo.RUNS:
        run_config = demo.training_config(config, run, tmp_path)
        trainer.check_config(run_config)
        prompt = demo.test_prompt(run, scene)
        if run_config.get("trainable", "embeddings") == "embeddings":
            assert demo.token(run) in prompt and run_config.placeholder_token == demo.token(run)
        else:
            assert demo.RARE_WORD in prompt and demo.token(run) not in prompt
    styleforge = demo.training_config(config, "styleforge", tmp_path)
    assert styleforge.data.aux_images == str(tmp_path / "aux" / "images")
    assert demo.test_prompt("styleforge", scene) == f"zwx style, {world.content_caption(scene)}"
