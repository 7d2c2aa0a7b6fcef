"""Samplers and the training schedule against diffusers' PyTorch schedulers, both in float32."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler,
                       PNDMScheduler)

from nsync_jax.errors import UserError
from nsync_jax.schedulers import (NoiseSchedule, add_noise, get_velocity, make_sampler, predicted_original,
                                  training_target)

SD15 = {"_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
        "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
        "trained_betas": None, "clip_sample": False}
SD2 = dict(SD15, _class_name="DDIMScheduler", prediction_type="v_prediction")
TORCH = {"ddim": DDIMScheduler, "pndm": PNDMScheduler, "euler": EulerDiscreteScheduler,
         "dpm": DPMSolverMultistepScheduler}


def relative_error(ours, reference) -> float:
    return float(np.abs(np.asarray(ours) - reference).max() / np.abs(reference).max())


def fake_model(sample, t, noise):
    """A deterministic stand-in for the UNet that depends on both the sample and the timestep."""
    return 0.5 * sample + noise * (t / 1000.0)


def trajectories(name, config, steps, *, reference_config=None):
    """Runs diffusers' scheduler and ours (jitted, one `lax.scan`) from the same latents and fake model."""
    torch_scheduler = TORCH[name].from_config(reference_config or config)
    torch_scheduler.set_timesteps(steps)
    sampler = make_sampler(name, config, steps)
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((2, 4, 4, 3)).astype(np.float32)
    noise = rng.standard_normal((2, 4, 4, 3)).astype(np.float32)

    x = torch.from_numpy(latents) * torch_scheduler.init_noise_sigma
    for t in torch_scheduler.timesteps:
        model_input = torch_scheduler.scale_model_input(x, t)
        x = torch_scheduler.step(fake_model(model_input, t.float(), torch.from_numpy(noise)), t, x).prev_sample

    timesteps = jnp.asarray(sampler.timesteps)

    def body(carry, i):
        sample, state = carry
        output = fake_model(sampler.scale_model_input(sample, i), timesteps[i].astype(jnp.float32), noise)
        return sampler.step(state, output, i, sample), None

    @jax.jit
    def run(start):
        (sample, _), _ = jax.lax.scan(body, (start, sampler.init_state(start)), jnp.arange(len(timesteps)))
        return sample

    ours = run(jnp.asarray(latents) * sampler.init_noise_sigma)
    return torch_scheduler, sampler, np.asarray(ours), x.numpy()


COSINE = dict(SD15, beta_schedule="squaredcos_cap_v2")
TRAINED = dict(SD15, trained_betas=np.linspace(0.0001, 0.02, 1000).tolist())
CASES = [
    # PNDM: the first two calls are special, and with one step there is a single call.
    ("pndm", SD15, 1), ("pndm", SD15, 2), ("pndm", SD15, 3), ("pndm", SD15, 10), ("pndm", SD15, 50),
    ("pndm", dict(SD15, prediction_type="v_prediction"), 7), ("pndm", dict(SD15, timestep_spacing="trailing"), 9),
    ("pndm", dict(SD15, timestep_spacing="linspace", set_alpha_to_one=True), 6), ("pndm", COSINE, 6),
    ("ddim", SD15, 10), ("ddim", SD2, 25), ("ddim", dict(SD2, timestep_spacing="trailing"), 8),
    ("ddim", dict(SD15, timestep_spacing="linspace", clip_sample=True, set_alpha_to_one=True), 6),
    ("ddim", dict(SD15, prediction_type="sample", clip_sample=True, clip_sample_range=2.0), 5),
    ("ddim", dict(SD15, beta_schedule="linear"), 6), ("ddim", TRAINED, 4), ("ddim", SD2, 1),
    ("euler", SD15, 10), ("euler", SD2, 12), ("euler", dict(SD15, timestep_spacing="leading"), 9),
    ("euler", dict(SD15, timestep_spacing="trailing", final_sigmas_type="sigma_min"), 7),
    ("euler", dict(SD15, prediction_type="sample"), 5), ("euler", dict(SD2, timestep_type="continuous"), 6),
    ("euler", dict(SD15, beta_schedule="linear"), 1),
    # DPM-Solver: first order at the first step and (below 15 steps, or with a zero final sigma) the last.
    ("dpm", SD15, 1), ("dpm", SD15, 2), ("dpm", SD15, 3), ("dpm", SD15, 20), ("dpm", SD2, 16),
    ("dpm", dict(SD15, final_sigmas_type="sigma_min"), 16), ("dpm", dict(SD15, final_sigmas_type="sigma_min"), 3),
    ("dpm", dict(SD15, final_sigmas_type="sigma_min", lower_order_final=False), 1),
    ("dpm", dict(SD15, final_sigmas_type="sigma_min", euler_at_final=True), 16),
    ("dpm", dict(SD15, timestep_spacing="leading"), 9), ("dpm", dict(SD15, prediction_type="sample"), 5),
    ("dpm", dict(SD15, timestep_spacing="trailing", solver_order=1), 6),
    ("dpm", dict(SD2, solver_type="heun", final_sigmas_type="sigma_min"), 16),
    ("dpm", dict(SD15, solver_type="bh2"), 5),  # a UniPC config: diffusers maps bh2 to midpoint
    ("dpm", dict(COSINE, lambda_min_clipped=-5.1), 10), ("dpm", dict(COSINE, timestep_spacing="trailing"), 4),
]


@pytest.mark.parametrize("name, config, steps", CASES)
def test_trajectory_matches_diffusers(name, config, steps):
    torch_scheduler, sampler, ours, reference = trajectories(name, config, steps)
    np.testing.assert_allclose(sampler.timesteps, torch_scheduler.timesteps.numpy(), rtol=1e-6)
    assert sampler.timesteps.dtype.kind == ("f" if name == "euler" else "i")
    assert sampler.init_noise_sigma == pytest.approx(float(torch_scheduler.init_noise_sigma), rel=1e-6)
    assert relative_error(ours, reference) <= 1e-4


def test_pndm_by_name_defaults_to_plms():
    config = {key: value for key, value in SD15.items() if key != "skip_prk_steps"}
    _, sampler, ours, reference = trajectories("pndm", config, 5, reference_config=dict(config, skip_prk_steps=True))
    assert len(sampler.timesteps) == 6 and relative_error(ours, reference) <= 1e-4
    # The model's own PNDMScheduler without the key means diffusers' Runge-Kutta warm-up, which is refused.
    with pytest.raises(UserError, match=re.escape("scheduler option skip_prk_steps=False is not supported")):
        make_sampler(None, config, 5)


def test_options_of_other_scheduler_classes_are_ignored():
    # As diffusers' from_config: DDIM knows no Karras sigmas, PNDM and Euler no thresholding.
    make_sampler("ddim", dict(SD15, use_karras_sigmas=True), 5)
    make_sampler("pndm", dict(SD15, thresholding=True, rescale_betas_zero_snr=True), 5)
    make_sampler("euler", dict(SD15, thresholding=True, sigma_min=0.1, sigma_max=10.0), 5)
    make_sampler("dpm", dict(SD15, clip_sample=True, interpolation_type="log_linear"), 5)


def test_default_is_the_models_own_scheduler():
    assert type(make_sampler(None, SD15, 5)).__name__ == "PNDMSampler"
    assert type(make_sampler(None, SD2, 5)).__name__ == "DDIMSampler"
    assert type(make_sampler(None, dict(SD15, _class_name="EulerDiscreteScheduler"), 5)).__name__ == "EulerSampler"
    assert type(make_sampler(None, dict(SD15, _class_name="DPMSolverMultistepScheduler"), 5)).__name__ == \
        "DPMSolverSampler"


@pytest.mark.parametrize("name, config, steps, message", [
    ("ddim", dict(SD2, thresholding=True), 10, "scheduler option thresholding=True is not supported"),
    ("ddim", dict(SD15, rescale_betas_zero_snr=True), 10, "rescale_betas_zero_snr=True"),
    ("ddim", dict(SD15, beta_schedule="sigmoid"), 10,
     "beta_schedule='sigmoid' is not supported (supported: 'linear', 'scaled_linear', 'squaredcos_cap_v2')"),
    ("pndm", dict(SD15, skip_prk_steps=False), 10, "skip_prk_steps=False"),
    ("pndm", dict(SD15, prediction_type="sample"), 10, "prediction_type='sample'"),
    ("euler", dict(SD15, use_karras_sigmas=True), 10, "use_karras_sigmas=True"),
    ("euler", dict(SD15, interpolation_type="log_linear"), 10, "interpolation_type='log_linear'"),
    ("dpm", dict(SD15, algorithm_type="sde-dpmsolver++"), 10, "algorithm_type='sde-dpmsolver++'"),
    ("dpm", dict(SD15, solver_order=3), 10, "solver_order=3"),
    ("dpm", dict(SD15, variance_type="learned_range"), 10, "variance_type='learned_range'"),
    ("dpm", dict(SD15, use_lu_lambdas=True), 10, "use_lu_lambdas=True"),
    ("ddim", dict(SD15, trained_betas=[0.01] * 10), 10, "trained_betas has 10 values but num_train_timesteps is 1000"),
    ("heun", SD15, 10, "unknown scheduler 'heun'; choose one of ddim, pndm, euler, dpm"),
    (None, dict(SD15, _class_name="LMSDiscreteScheduler"), 10, "'LMSDiscreteScheduler' is not supported"),
    ("euler", SD15, 0, "the number of steps must be between 1 and num_train_timesteps=1000"),
    ("ddim", SD15, 1001, "got 1001"),
    ("ddim", SD15, 1000, "reach timestep 1000, past num_train_timesteps=1000"),  # steps_offset 1
    ("dpm", dict(SD15, timestep_spacing="linspace"), 1000, "repeat a timestep"),
])
def test_unsupported_settings_are_user_errors(name, config, steps, message):
    with pytest.raises(UserError, match=re.escape(message)) as error:
        make_sampler(name, config, steps, source="scheduler/scheduler_config.json")
    if name in (None, "ddim", "pndm", "euler", "dpm") and steps == 10:
        assert str(error.value).startswith("scheduler/scheduler_config.json: ")


@pytest.mark.parametrize("config", [SD15, SD2, COSINE, TRAINED, dict(SD15, beta_schedule="linear"),
                                    dict(SD15, prediction_type="sample")])
def test_training_noise_matches_ddpm(config):
    ddpm = DDPMScheduler.from_config(config)
    schedule = NoiseSchedule.from_config(config)
    assert schedule.alphas_cumprod.dtype == np.float32 and schedule.num_train_timesteps == 1000
    np.testing.assert_allclose(schedule.alphas_cumprod, ddpm.alphas_cumprod.numpy(), rtol=1e-5)
    rng = np.random.default_rng(1)
    t = np.array([0, 421, 999])
    for shape in ((3, 4, 4, 2), (3, 5)):  # NHWC latents, and any other trailing dimensions
        x0, noise = (rng.standard_normal(shape).astype(np.float32) for _ in range(2))
        torch_args = (torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t))
        np.testing.assert_allclose(add_noise(schedule.alphas_cumprod, x0, noise, t),
                                   ddpm.add_noise(*torch_args).numpy(), rtol=1e-5, atol=1e-6)
        velocity = ddpm.get_velocity(*torch_args).numpy()
        np.testing.assert_allclose(get_velocity(schedule.alphas_cumprod, x0, noise, t), velocity, rtol=1e-5,
                                   atol=1e-6)
        expected = {"epsilon": noise, "v_prediction": velocity, "sample": x0}[ddpm.config.prediction_type]
        np.testing.assert_allclose(training_target(schedule, x0, noise, t), expected, rtol=1e-5, atol=1e-6)
        # The exact target gives back x_0 (DreamArtist's reconstruction loss decodes this estimate), where
        # float32 can: not at the cosine schedule's last step, where abar is 2e-9.
        noisy = add_noise(schedule.alphas_cumprod, x0, noise, t)
        keep = schedule.alphas_cumprod[t] > 1e-3
        np.testing.assert_allclose(np.asarray(predicted_original(schedule, noisy, expected, t))[keep], x0[keep],
                                   rtol=1e-4, atol=1e-4)


def test_training_noise_under_jit():
    schedule = NoiseSchedule.from_config(SD2)
    x0, noise = jnp.ones((2, 4, 4, 3), jnp.bfloat16), jnp.full((2, 4, 4, 3), 0.5, jnp.bfloat16)
    t = jnp.array([10, 900])
    noisy = jax.jit(lambda x, n, t: add_noise(schedule.alphas_cumprod, x, n, t))(x0, noise, t)
    target = jax.jit(lambda x, n, t: training_target(schedule, x, n, t))(x0, noise, t)
    assert noisy.dtype == target.dtype == jnp.bfloat16 and noisy.shape == target.shape == (2, 4, 4, 3)
    np.testing.assert_allclose(noisy.astype(jnp.float32), add_noise(schedule.alphas_cumprod, x0.astype(jnp.float32),
                                                                    noise.astype(jnp.float32), t), rtol=1e-2)


@pytest.mark.parametrize("config, message", [
    (dict(SD15, variance_type="learned_range"), "variance_type='learned_range' is not supported"),
    (dict(SD15, rescale_betas_zero_snr=True), "rescale_betas_zero_snr=True is not supported"),
])
def test_training_schedule_refuses_what_it_cannot_train(config, message):
    with pytest.raises(UserError, match=re.escape(f"model/scheduler_config.json: scheduler option {message}")):
        NoiseSchedule.from_config(config, source="model/scheduler_config.json")


@pytest.mark.parametrize("name", ["ddim", "pndm", "euler", "dpm"])
def test_step_keeps_the_sample_dtype(name):
    sampler = make_sampler(name, SD15, 4)
    sample = jnp.ones((1, 2, 2, 4), jnp.bfloat16)
    state = sampler.init_state(sample)
    for i in range(len(sampler.timesteps)):
        sample, state = jax.jit(sampler.step)(state, sampler.scale_model_input(sample, i) * 0.1, jnp.int32(i), sample)
    assert sample.dtype == jnp.bfloat16 and bool(jnp.isfinite(sample.astype(jnp.float32)).all())
