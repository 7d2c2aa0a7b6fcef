"""The bundled toy-world Stable Diffusion, its pretraining code and the demo built on it."""
import json
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from nsync_jax import export
from nsync_jax.cli import main
from nsync_jax.errors import UserError
from nsync_jax.pipeline import load_pipeline
from nsync_jax.sampling import SampleSettings, generate, initial_latents
from nsync_jax.toyworld import demo, pretrain, world
from nsync_jax.train.config import check_config

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
    assert not (tmp_path / "model").exists() and not (tmp_path / "model.checkpoints").exists()
    config.vae.latent_channels = 8
    config.vae.scale_equivariance = 0.0  # a training setting, not in vae/config.json: read from pretrain.json
    with pytest.raises(UserError, match=r"trained with vae.scale_equivariance=1.0.*trains vae.scale_equivariance=0.0"):
        pretrain.pretrain(config, tmp_path / "model", progress=False)
    config.vae_from = str(tmp_path / "nowhere")
    with pytest.raises(UserError, match="nowhere/pretrain.json: file not found"):
        pretrain.pretrain(config, tmp_path / "model", progress=False)


def test_reused_vae_carries_its_training_curve(tmp_path):
    import shutil

    source = tmp_path / "earlier"
    shutil.copytree(pretrain.BUNDLED_MODEL / "vae", source / "vae")
    shutil.copy(pretrain.BUNDLED_MODEL / "pretrain.json", source)
    rows = [{"stage": "render", "images": 16, "seconds": 0.1}, {"stage": "vae", "step": 50, "loss": 0.8},
            {"stage": "vae", "step": 100, "loss": 0.4}, {"stage": "unet", "step": 50, "loss": 0.1}]
    (source / "pretrain_log.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    _, curve = pretrain.reused_vae(source, pretrain.default_config())
    assert curve == rows[1:3]
    (source / "pretrain_log.jsonl").write_text("{not json\n")
    with pytest.raises(UserError, match=r"earlier/pretrain_log.jsonl: not JSON lines"):
        pretrain.reused_vae(source, pretrain.default_config())


def _fit_quadratic(checkpoints, log, stop_at=None):
    """`pretrain.fit` on a small least-squares problem, 120 steps with EMA; SIGTERM arrives at step `stop_at`."""
    targets = np.random.default_rng(0).normal(size=(16, 4, 3)).astype(np.float32)

    def batch_fn(step):
        if step == stop_at:
            os.kill(os.getpid(), signal.SIGTERM)
        return targets[np.random.default_rng([0, step]).integers(0, 16, 8)]

    def loss_fn(params, batch, key):
        noisy = batch + 0.1 * jax.random.normal(key, batch.shape)
        return jnp.mean(jnp.square(params["w"] - noisy)) + jnp.mean(jnp.square(params["b"]))

    params = {"w": jnp.zeros((4, 3)), "b": jnp.ones((3,))}
    return pretrain.fit("toy", params, loss_fn, batch_fn, steps=120, learning_rate=0.05, warmup=10, seed=3,
                        log=log, ema_decay=0.9, progress=False, checkpoints=checkpoints, checkpoint_every=50)


def test_fit_stopped_by_sigterm_goes_on_from_its_checkpoint_as_if_never_stopped(tmp_path):
    whole_log, resumed_log = [], []
    whole = _fit_quadratic(tmp_path / "whole", whole_log.append)
    with pytest.raises(UserError, match=r"stopped by SIGTERM in stage toy after step 76; .*stopped.*run the same"):
        _fit_quadratic(tmp_path / "stopped", resumed_log.append, stop_at=75)
    assert (tmp_path / "stopped" / "toy" / "checkpoints" / "76").is_dir()
    resumed = _fit_quadratic(tmp_path / "stopped", resumed_log.append)
    for name in ("w", "b"):
        np.testing.assert_array_equal(np.asarray(resumed[name]), np.asarray(whole[name]))
    # The curve is whole too: the rows before the stop come back from the checkpoint, the mean at step 100 still
    # covers steps 51-100, and the seconds go on from the first run's.
    rows = [row for row in resumed_log if row["stage"] == "toy"]
    assert [(r["step"], r["loss"]) for r in rows[1:]] == [(r["step"], r["loss"]) for r in whole_log]
    assert {"stage": "resumed", "resumed": "toy", "step": 76} in resumed_log
    assert rows[-1]["seconds"] >= rows[1]["seconds"]


def test_pretrain_refuses_checkpoints_of_other_settings(tmp_path):
    config = pretrain.default_config()
    checkpoints = tmp_path / "model.checkpoints"
    pretrain.claim_checkpoints(checkpoints, config)
    (checkpoints / "unet" / "checkpoints" / "500").mkdir(parents=True)
    config.cpu_devices = 1  # how batches are split may change between runs
    pretrain.claim_checkpoints(checkpoints, config)
    claimed = config.unet.steps
    config.unet.steps = claimed + 1
    with pytest.raises(UserError, match=r"model.checkpoints: holds checkpoints of an interrupted run with "
                                        rf"unet.steps={claimed}, not {claimed + 1}: rerun with its settings"):
        pretrain.pretrain(config, tmp_path / "model", progress=False)
    assert not (tmp_path / "model").exists()


def test_pretrain_checkpoint_interval_must_be_a_multiple_of_the_curve_interval(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["toyworld", "pretrain", "--output", str(tmp_path / "m"), "--checkpoint-every", "30"])
    assert exit_info.value.code == 2
    assert "--checkpoint-every: must be a multiple of 50, got 30" in capsys.readouterr().err


@pytest.mark.slow
def test_pretrain_writes_a_reproducible_folder_both_loaders_read(tmp_path):
    """The bundled model must be what the default command writes: the same settings give the same bytes."""
    from diffusers import StableDiffusionPipeline

    config = pretrain.default_config()
    config.pool_size, config.vae.steps, config.unet.steps, config.warmup_steps = 16, 3, 3, 1
    folders = [pretrain.pretrain(config, tmp_path / name, progress=False) for name in ("first", "second")]
    assert not (tmp_path / "first.checkpoints").exists()  # removed once the folder is written
    for part, weights_file in export.WEIGHT_FILES.items():
        first, second = (folder / part / weights_file for folder in folders)
        assert first.read_bytes() == second.read_bytes(), part
    assert (folders[0] / "vae" / "config.json").read_text() == (folders[1] / "vae" / "config.json").read_text()
    load_pipeline(folders[0])
    StableDiffusionPipeline.from_pretrained(folders[0], safety_checker=None)


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
    assert main(["demo", "--output", str(tmp_path), "--config.cpu_devices=0"]) == 2
    assert "--config.cpu_devices=0 must be a positive integer" in capsys.readouterr().err


def test_every_benchmark_run_has_a_valid_training_config(tmp_path):
    """Runs that train weights (NSYNC-LoRA, StyleForge) prompt with the rare word their training used."""
    config = demo.default_config()
    scene = world.sample_scenes(0, 1, styles=("halftone",))[0]
    for run in demo.RUNS:
        run_config = demo.training_config(config, run, tmp_path)
        check_config(run_config)
        prompt = demo.test_prompt(run, scene)
        if run_config.get("trainable", "embeddings") == "embeddings":
            assert demo.token(run) in prompt and run_config.placeholder_token == demo.token(run)
        else:
            assert demo.RARE_WORD in prompt and demo.token(run) not in prompt
    styleforge = demo.training_config(config, "styleforge", tmp_path)
    assert styleforge.data.aux_images == str(tmp_path / "aux" / "images")
    assert demo.test_prompt("styleforge", scene) == f"zwx style, {world.content_caption(scene)}"
