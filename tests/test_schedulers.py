"""Samplers and the training schedule against diffusers' PyTorch schedulers (float32)."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler,
                       PNDMScheduler)

from nsync_jax.errors import UserError
from nsync_jax.schedulers import NoiseSchedule, add_noise, get_velocity, make_sampler, training_target

SD15 = {"_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
        "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
        "trained_betas": None, "clip_sample": False}
SD2 = dict(SD15, _class_name="DDIMScheduler", prediction_type="v_prediction")
TORCH = {"ddim": DDIMScheduler, "pndm": PNDMScheduler, "euler": EulerDiscreteScheduler,
         "dpm": DPMSolverMultistepScheduler}


def fake_model(sample, t, noise):
    """A deterministic stand-in for the UNet that depends on both the sample and the timestep."""
    return 0.5 * sample + noise * (t / 1000.0)


def trajectories(name, config, steps):
    torch_scheduler = TORCH[name].from_config(config)
    torch_scheduler.set_timesteps(steps)
    sampler = make_sampler(name, config, steps)
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((2, 4, 4, 3)).astype(np.float32)
    noise = rng.standard_normal((2, 4, 4, 3)).astype(np.float32)

    x = torch.from_numpy(latents) * torch_scheduler.init_noise_sigma
    for t in torch_scheduler.timesteps:
        model_in = torch_scheduler.scale_model_input(x, t)
        x = torch_scheduler.step(fake_model(model_in, t.float(), torch.from_numpy(noise)), t, x).prev_sample
    reference = x.numpy()

    timesteps = jnp.asarray(sampler.timesteps)

    def body(carry, i):
        sample, state = carry
        out = fake_model(sampler.scale_model_input(sample, i), timesteps[i].astype(jnp.float32), noise)
        return sampler.step(state, out, i, sample), None

    start = jnp.asarray(latents) * sampler.init_noise_sigma
    (ours, _), _ = jax.jit(lambda s: jax.lax.scan(body, (s, sampler.init_state(s)), jnp.arange(len(timesteps))))(start)
    return torch_scheduler, sampler, np.asarray(ours), reference


CASES = [
    ("pndm", SD15, 10), ("pndm", SD15, 50), ("pndm", dict(SD15, prediction_type="v_prediction"), 7),
    ("pndm", dict(SD15, timestep_spacing="trailing"), 9),
    ("ddim", SD15, 10), ("ddim", SD2, 25), ("ddim", dict(SD2, timestep_spacing="trailing"), 8),
    ("ddim", dict(SD15, timestep_spacing="linspace", clip_sample=True, set_alpha_to_one=True), 6),
    ("ddim", dict(SD15, prediction_type="sample", clip_sample=True, clip_sample_range=2.0), 5),
    ("euler", SD15, 10), ("euler", SD2, 12), ("euler", dict(SD15, timestep_spacing="leading"), 9),
    ("euler", dict(SD15, timestep_spacing="trailing", final_sigmas_type="sigma_min"), 7),
    ("dpm", SD15, 1), ("dpm", SD15, 2), ("dpm", SD15, 3), ("dpm", SD15, 20), ("dpm", SD2, 16),
    ("dpm", dict(SD15, final_sigmas_type="sigma_min"), 16), ("dpm", dict(SD15, timestep_spacing="leading"), 9),
    ("dpm", dict(SD15, timestep_spacing="trailing", solver_order=1), 6),
    ("pndm", dict(SD15, beta_schedule="squaredcos_cap_v2"), 6), ("ddim", dict(SD15, beta_schedule="linear"), 6),
]


@pytest.mark.parametrize("name, config, steps", CASES)
def test_trajectory_matches_diffusers(name, config, steps):
    torch_scheduler, sampler, ours, reference = trajectories(name, config, steps)
    np.testing.assert_allclose(sampler.timesteps, torch_scheduler.timesteps.numpy(), atol=1e-4)
    assert sampler.init_noise_sigma == pytest.approx(float(torch_scheduler.init_noise_sigma), rel=1e-6)
    assert np.abs(ours - reference).max() / np.abs(reference).max() <= 1e-4


def test_training_noise_matches_ddpm():
    for config in (SD15, SD2, dict(SD15, beta_schedule="squaredcos_cap_v2")):
        ddpm = DDPMScheduler.from_config(config)
        schedule = NoiseSchedule.from_config(config)
        np.testing.assert_allclose(schedule.alphas_cumprod, ddpm.alphas_cumprod.numpy(), rtol=1e-4)
        rng = np.random.default_rng(1)
        x0, noise = rng.standard_normal((2, 3, 3, 4)).astype(np.float32), rng.standard_normal((2, 3, 3, 4)).astype(np.float32)
        t = np.array([0, 999])
        torch_args = (torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t))
        np.testing.assert_allclose(add_noise(schedule.alphas_cumprod, x0, noise, t),
                                   ddpm.add_noise(*torch_args).numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(get_velocity(schedule.alphas_cumprod, x0, noise, t),
                                   ddpm.get_velocity(*torch_args).numpy(), rtol=1e-5, atol=1e-6)
    assert training_target(NoiseSchedule.from_config(SD15), x0, noise, t) is noise
    np.testing.assert_allclose(training_target(NoiseSchedule.from_config(SD2), x0, noise, t),
                               get_velocity(NoiseSchedule.from_config(SD2).alphas_cumprod, x0, noise, t))


def test_default_is_the_models_own_scheduler():
    assert type(make_sampler(None, SD15, 5)).__name__ == "PNDMSampler"
    assert type(make_sampler(None, SD2, 5)).__name__ == "DDIMSampler"


@pytest.mark.parametrize("name, config, message", [
    ("ddim", dict(SD2, thresholding=True), "scheduler option thresholding=True is not supported"),
    ("euler", dict(SD15, use_karras_sigmas=True), "use_karras_sigmas=True"),
    ("dpm", dict(SD15, algorithm_type="sde-dpmsolver++"), "algorithm_type='sde-dpmsolver++'"),
    ("pndm", dict(SD15, skip_prk_steps=False), "skip_prk_steps=False"),
    ("ddim", dict(SD15, rescale_betas_zero_snr=True), "rescale_betas_zero_snr=True"),
    ("heun", SD15, "unknown scheduler 'heun'; choose one of ddim, pndm, euler, dpm"),
    (None, dict(SD15, _class_name="LMSDiscreteScheduler"), "'LMSDiscreteScheduler' is not supported"),
])
def test_unsupported_options_are_errors(name, config, message):
    with pytest.raises(UserError, match=re.escape(message)):
        make_sampler(name, config, 10, source="scheduler/scheduler_config.json")
