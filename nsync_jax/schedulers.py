"""Noise schedules and samplers, configured from diffusers' `scheduler_config.json`.

Everything that depends only on the step number (timesteps, alphas, sigmas, multistep weights) is computed
once on the host in float64, exactly as diffusers lays it out, and becomes a small per-step table. The
per-step arithmetic that touches the latents is a pure JAX function of `(state, model_output, step_index,
sample)`, so a whole sampling loop is one `lax.scan` with `step_index` traced.

Samplers (`make_sampler` names): `ddim` (DDIMScheduler, eta 0), `pndm` (PNDMScheduler's PLMS, SD 1.5's
default), `euler` (EulerDiscreteScheduler, no churn) and `dpm` (DPMSolverMultistepScheduler's DPM-Solver++
2M). Options a sampler knows but this code does not implement for the value given are errors; options that
belong to other scheduler classes are ignored, as diffusers' `from_config` ignores them.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from nsync_jax.errors import UserError

# ----------------------------------------------------------------------------------------------------------
# The training schedule (shared by every sampler and by the DDPM training loss).
# ----------------------------------------------------------------------------------------------------------

_BASE_DEFAULTS = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                      trained_betas=None, prediction_type="epsilon", steps_offset=0, timestep_spacing="leading")


def _betas(cfg: dict) -> np.ndarray:
    steps = cfg["num_train_timesteps"]
    if cfg["trained_betas"] is not None:
        return np.asarray(cfg["trained_betas"], np.float64)
    schedule = cfg["beta_schedule"]
    if schedule == "linear":
        return np.linspace(cfg["beta_start"], cfg["beta_end"], steps, dtype=np.float64)
    if schedule == "scaled_linear":
        return np.linspace(cfg["beta_start"] ** 0.5, cfg["beta_end"] ** 0.5, steps, dtype=np.float64) ** 2
    # squaredcos_cap_v2: the cosine alpha-bar schedule, each beta capped at 0.999.
    alpha_bar = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    return np.array([min(1 - alpha_bar((i + 1) / steps) / alpha_bar(i / steps), 0.999) for i in range(steps)])


@dataclasses.dataclass(frozen=True)
class NoiseSchedule:
    """The forward (noising) process a model was trained with."""

    num_train_timesteps: int
    prediction_type: str
    alphas_cumprod: np.ndarray  # (num_train_timesteps,) float32

    @classmethod
    def from_config(cls, config: dict[str, Any], source: Path | str = "scheduler_config.json") -> "NoiseSchedule":
        cfg = _resolve(config, _DDIM_OPTIONS, source)
        return cls(cfg["num_train_timesteps"], cfg["prediction_type"],
                   np.cumprod(1 - _betas(cfg)).astype(np.float32))


def _broadcast(values: jax.Array, like: jax.Array) -> jax.Array:
    return values.reshape(values.shape + (1,) * (like.ndim - values.ndim))


def add_noise(alphas_cumprod, original: jax.Array, noise: jax.Array, timesteps: jax.Array) -> jax.Array:
    """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise; `timesteps` has shape `(batch,)`."""
    abar = _broadcast(jnp.asarray(alphas_cumprod)[timesteps], original)
    return jnp.sqrt(abar) * original + jnp.sqrt(1 - abar) * noise


def get_velocity(alphas_cumprod, sample: jax.Array, noise: jax.Array, timesteps: jax.Array) -> jax.Array:
    """The v-prediction target sqrt(abar_t) noise - sqrt(1 - abar_t) x_0."""
    abar = _broadcast(jnp.asarray(alphas_cumprod)[timesteps], sample)
    return jnp.sqrt(abar) * noise - jnp.sqrt(1 - abar) * sample


def training_target(schedule: NoiseSchedule, latents: jax.Array, noise: jax.Array, timesteps: jax.Array):
    """What the UNet is trained to predict for these clean latents, noise and timesteps."""
    if schedule.prediction_type == "epsilon":
        return noise
    if schedule.prediction_type == "v_prediction":
        return get_velocity(schedule.alphas_cumprod, latents, noise, timesteps)
    return latents


# ----------------------------------------------------------------------------------------------------------
# Config handling: each sampler lists the diffusers options it knows, with defaults and what it supports.
# ----------------------------------------------------------------------------------------------------------

_any = lambda v: True
_spacing = lambda v: v in ("leading", "trailing", "linspace")
_COMMON = {
    "num_train_timesteps": (1000, lambda v: isinstance(v, int) and v > 0),
    "beta_start": (0.0001, _any),
    "beta_end": (0.02, _any),
    "beta_schedule": ("linear", lambda v: v in ("linear", "scaled_linear", "squaredcos_cap_v2")),
    "trained_betas": (None, _any),
    "steps_offset": (0, lambda v: isinstance(v, int)),
    "rescale_betas_zero_snr": (False, lambda v: v is False),
}
_DDIM_OPTIONS = {**_COMMON, "prediction_type": ("epsilon", lambda v: v in ("epsilon", "v_prediction", "sample")),
                 "timestep_spacing": ("leading", _spacing), "set_alpha_to_one": (True, _any),
                 "clip_sample": (True, _any), "clip_sample_range": (1.0, _any), "thresholding": (False, lambda v: not v)}
_PNDM_OPTIONS = {**_COMMON, "prediction_type": ("epsilon", lambda v: v in ("epsilon", "v_prediction")),
                 "timestep_spacing": ("leading", _spacing), "set_alpha_to_one": (False, _any),
                 # PRK warm-up steps are not implemented; every SD checkpoint sets skip_prk_steps.
                 "skip_prk_steps": (True, lambda v: v is True)}
_EULER_OPTIONS = {**_COMMON, "prediction_type": ("epsilon", lambda v: v in ("epsilon", "v_prediction", "sample")),
                  "timestep_spacing": ("linspace", _spacing),
                  "interpolation_type": ("linear", lambda v: v == "linear"),
                  "use_karras_sigmas": (False, lambda v: not v), "use_exponential_sigmas": (False, lambda v: not v),
                  "use_beta_sigmas": (False, lambda v: not v), "sigma_min": (None, lambda v: v is None),
                  "sigma_max": (None, lambda v: v is None), "timestep_type": ("discrete", lambda v: v == "discrete"),
                  "final_sigmas_type": ("zero", lambda v: v in ("zero", "sigma_min"))}
_DPM_OPTIONS = {**_COMMON, "prediction_type": ("epsilon", lambda v: v in ("epsilon", "v_prediction", "sample")),
                "timestep_spacing": ("linspace", _spacing),
                "solver_order": (2, lambda v: v in (1, 2)),
                "algorithm_type": ("dpmsolver++", lambda v: v == "dpmsolver++"),
                "solver_type": ("midpoint", lambda v: v == "midpoint"),
                "lower_order_final": (True, _any), "euler_at_final": (False, _any),
                "final_sigmas_type": ("zero", lambda v: v in ("zero", "sigma_min")),
                "lambda_min_clipped": (-math.inf, _any), "thresholding": (False, lambda v: not v),
                "variance_type": (None, lambda v: v is None),
                "use_karras_sigmas": (False, lambda v: not v), "use_exponential_sigmas": (False, lambda v: not v),
                "use_beta_sigmas": (False, lambda v: not v), "use_lu_lambdas": (False, lambda v: not v),
                "use_flow_sigmas": (False, lambda v: not v), "use_dynamic_shifting": (False, lambda v: not v)}


def _resolve(config: dict[str, Any], options: dict[str, tuple[Any, Callable]], source) -> dict[str, Any]:
    """The sampler's options from `config` (defaults for missing ones), refusing values it cannot honour."""
    resolved = {}
    for key, (default, supported) in options.items():
        value = config.get(key, default)
        if not supported(value):
            raise UserError(f"{source}: scheduler option {key}={value!r} is not supported")
        resolved[key] = value
    return resolved


def _spaced(spacing: str, train_steps: int, steps: int, offset: int, *, round_linspace: bool = True) -> np.ndarray:
    """diffusers' inference timesteps, high to low, for DDIM, PNDM and Euler."""
    if spacing == "linspace":
        values = np.linspace(0, train_steps - 1, steps)
        return (values.round() if round_linspace else values)[::-1]
    if spacing == "leading":
        return (np.arange(steps) * (train_steps // steps)).round()[::-1] + offset
    return np.round(np.arange(train_steps, 0, -train_steps / steps)) - 1


# ----------------------------------------------------------------------------------------------------------
# Samplers.
# ----------------------------------------------------------------------------------------------------------

class Sampler:
    """Interface of every sampler; `step_index` indexes `timesteps` and may be traced.

    Attributes:
      timesteps: the model timestep of each model call, in call order (numpy).
      init_noise_sigma: the scale of the initial noise.
    """

    timesteps: np.ndarray
    init_noise_sigma: float = 1.0

    def init_state(self, sample: jax.Array):
        return ()

    def scale_model_input(self, sample: jax.Array, step_index) -> jax.Array:
        return sample

    def step(self, state, model_output: jax.Array, step_index, sample: jax.Array):
        """Returns `(previous_sample, new_state)`."""
        raise NotImplementedError


def _table(values) -> jax.Array:
    return jnp.asarray(np.asarray(values, np.float32))


def _split_prediction(prediction_type: str, model_output, sample, alpha_bar):
    """(predicted x_0, predicted noise) from a model output, as DDIM computes them."""
    a, b = jnp.sqrt(alpha_bar), jnp.sqrt(1 - alpha_bar)
    if prediction_type == "epsilon":
        return (sample - b * model_output) / a, model_output
    if prediction_type == "v_prediction":
        return a * sample - b * model_output, a * model_output + b * sample
    return model_output, (sample - a * model_output) / b


class DDIMSampler(Sampler):
    def __init__(self, config: dict, steps: int, source):
        cfg = _resolve(config, _DDIM_OPTIONS, source)
        train_steps = cfg["num_train_timesteps"]
        alphas_cumprod = np.cumprod(1 - _betas(cfg))
        self.timesteps = _spaced(cfg["timestep_spacing"], train_steps, steps, cfg["steps_offset"]).astype(np.int32)
        previous = self.timesteps - train_steps // steps
        final = 1.0 if cfg["set_alpha_to_one"] else alphas_cumprod[0]
        self.alpha_bar = alphas_cumprod[self.timesteps]
        self.alpha_bar_prev = np.where(previous >= 0, alphas_cumprod[np.maximum(previous, 0)], final)
        self.prediction_type = cfg["prediction_type"]
        self.clip_range = cfg["clip_sample_range"] if cfg["clip_sample"] else None

    def step(self, state, model_output, step_index, sample):
        alpha_bar, alpha_bar_prev = _table(self.alpha_bar)[step_index], _table(self.alpha_bar_prev)[step_index]
        x0, eps = _split_prediction(self.prediction_type, model_output, sample, alpha_bar)
        if self.clip_range is not None:
            x0 = jnp.clip(x0, -self.clip_range, self.clip_range)
        return jnp.sqrt(alpha_bar_prev) * x0 + jnp.sqrt(1 - alpha_bar_prev) * eps, state


# PLMS weights on (model_output, e[-1], e[-2], e[-3], e[-4]) by step: diffusers' warm-up uses the first output
# alone, then averages it with the second (restarting from the first sample), then Adams-Bashforth 2, 3, 4.
_PLMS_WEIGHTS = np.array([
    [0, 1, 0, 0, 0],
    [0.5, 0.5, 0, 0, 0],
    [0, 3 / 2, -1 / 2, 0, 0],
    [0, 23 / 12, -16 / 12, 5 / 12, 0],
    [0, 55 / 24, -59 / 24, 37 / 24, -9 / 24],
])


class PNDMSampler(Sampler):
    """PNDM with `skip_prk_steps`: linear multistep (PLMS) from the first step, SD 1.5's default sampler."""

    def __init__(self, config: dict, steps: int, source):
        cfg = _resolve(config, _PNDM_OPTIONS, source)
        train_steps = cfg["num_train_timesteps"]
        alphas_cumprod = np.cumprod(1 - _betas(cfg))
        base = _spaced(cfg["timestep_spacing"], train_steps, steps, cfg["steps_offset"])[::-1].astype(np.int64)
        # The first timestep is visited twice (the warm-up's two model calls), hence steps + 1 calls.
        self.timesteps = np.concatenate([base[:-1], base[-2:-1], base[-1:]])[::-1].astype(np.int32)
        ratio = train_steps // steps
        current = self.timesteps.astype(np.int64)
        previous = current - ratio
        # The warm-up's second call steps again from the first timestep.
        current[1], previous[1] = current[1] + ratio, current[1]
        final = 1.0 if cfg["set_alpha_to_one"] else alphas_cumprod[0]
        self.alpha_bar = alphas_cumprod[current]
        self.alpha_bar_prev = np.where(previous >= 0, alphas_cumprod[np.maximum(previous, 0)], final)
        self.weights = _PLMS_WEIGHTS[np.minimum(np.arange(len(self.timesteps)), 4)]
        self.prediction_type = cfg["prediction_type"]

    def init_state(self, sample):
        # The last four model outputs (newest last) and the sample of the first step.
        return jnp.zeros((4, *sample.shape), sample.dtype), sample

    def step(self, state, model_output, step_index, sample):
        outputs, first_sample = state
        # Every call but the second adds its output to the history.
        outputs = jnp.where(step_index == 1, outputs, jnp.concatenate([outputs[1:], model_output[None]]))
        w = _table(self.weights)[step_index]
        combined = w[0] * model_output + sum(w[k] * outputs[4 - k] for k in range(1, 5))
        first_sample = jnp.where(step_index == 0, sample, first_sample)
        sample = jnp.where(step_index == 1, first_sample, sample)
        alpha_bar, alpha_bar_prev = _table(self.alpha_bar)[step_index], _table(self.alpha_bar_prev)[step_index]
        if self.prediction_type == "v_prediction":
            combined = jnp.sqrt(alpha_bar) * combined + jnp.sqrt(1 - alpha_bar) * sample
        denominator = alpha_bar * jnp.sqrt(1 - alpha_bar_prev) + jnp.sqrt(alpha_bar * (1 - alpha_bar) * alpha_bar_prev)
        previous = (jnp.sqrt(alpha_bar_prev / alpha_bar) * sample
                    - (alpha_bar_prev - alpha_bar) * combined / denominator)
        return previous, (outputs, first_sample)


def _sigmas(alphas_cumprod: np.ndarray) -> np.ndarray:
    return np.sqrt((1 - alphas_cumprod) / alphas_cumprod)


class EulerSampler(Sampler):
    """Euler's method on the probability-flow ODE in sigma space (deterministic: no churn)."""

    def __init__(self, config: dict, steps: int, source):
        cfg = _resolve(config, _EULER_OPTIONS, source)
        alphas_cumprod = np.cumprod(1 - _betas(cfg))
        timesteps = _spaced(cfg["timestep_spacing"], cfg["num_train_timesteps"], steps, cfg["steps_offset"],
                            round_linspace=False).astype(np.float32)
        all_sigmas = _sigmas(alphas_cumprod)
        last = all_sigmas[0] if cfg["final_sigmas_type"] == "sigma_min" else 0.0
        self.sigmas = np.concatenate([np.interp(timesteps, np.arange(len(all_sigmas)), all_sigmas), [last]])
        self.sigmas = self.sigmas.astype(np.float32).astype(np.float64)
        self.timesteps = timesteps
        top = float(self.sigmas.max())
        self.init_noise_sigma = top if cfg["timestep_spacing"] in ("linspace", "trailing") else (top**2 + 1) ** 0.5
        self.prediction_type = cfg["prediction_type"]

    def scale_model_input(self, sample, step_index):
        return sample / jnp.sqrt(_table(self.sigmas)[step_index] ** 2 + 1)

    def step(self, state, model_output, step_index, sample):
        sigma, sigma_next = _table(self.sigmas)[step_index], _table(self.sigmas)[step_index + 1]
        if self.prediction_type == "epsilon":
            x0 = sample - sigma * model_output
        elif self.prediction_type == "v_prediction":
            x0 = model_output * (-sigma / jnp.sqrt(sigma**2 + 1)) + sample / (sigma**2 + 1)
        else:
            x0 = model_output
        return sample + (sample - x0) / sigma * (sigma_next - sigma), state


class DPMSolverSampler(Sampler):
    """DPM-Solver++ (2M): a second-order multistep solver on the data prediction, first order at the ends."""

    def __init__(self, config: dict, steps: int, source):
        cfg = _resolve(config, _DPM_OPTIONS, source)
        train_steps = cfg["num_train_timesteps"]
        alphas_cumprod = np.cumprod(1 - _betas(cfg))
        log_snr = 0.5 * (np.log(alphas_cumprod) - np.log(1 - alphas_cumprod))
        last = train_steps - int(np.searchsorted(log_snr[::-1], cfg["lambda_min_clipped"]))
        spacing = cfg["timestep_spacing"]
        if spacing == "linspace":
            timesteps = np.linspace(0, last - 1, steps + 1).round()[::-1][:-1]
        elif spacing == "leading":
            timesteps = (np.arange(steps + 1) * (last // (steps + 1))).round()[::-1][:-1] + cfg["steps_offset"]
        else:
            timesteps = np.arange(last, 0, -train_steps / steps).round() - 1
        self.timesteps = timesteps.astype(np.int32)
        all_sigmas = _sigmas(alphas_cumprod)
        final = all_sigmas[0] if cfg["final_sigmas_type"] == "sigma_min" else 0.0
        sigmas = np.concatenate([np.interp(self.timesteps, np.arange(len(all_sigmas)), all_sigmas), [final]])
        sigmas = sigmas.astype(np.float32).astype(np.float64)
        alpha = 1 / np.sqrt(sigmas**2 + 1)
        sigma = sigmas * alpha
        with np.errstate(divide="ignore"):
            lam = np.log(alpha) - np.log(sigma)  # +inf at a final sigma of zero
        n = len(self.timesteps)
        first_order = np.zeros(n, bool)
        first_order[0] = True
        first_order[-1] = (cfg["euler_at_final"] or (cfg["lower_order_final"] and n < 15)
                           or cfg["final_sigmas_type"] == "zero")
        if cfg["solver_order"] == 1:
            first_order[:] = True
        h = lam[1:] - lam[:-1]
        expm = np.exp(-h) - 1
        # x_next = (sigma_next / sigma) x - alpha_next (e^-h - 1) (D0 + D1 / 2), D1 = (m0 - m1) h / h_prev.
        self.sample_coeff = sigma[1:] / sigma[:-1]
        self.x0_coeff = -alpha[1:] * expm
        h_prev = np.concatenate([[np.nan], h[:-1]])
        with np.errstate(invalid="ignore", divide="ignore"):
            self.difference_coeff = np.where(first_order, 0.0, -0.5 * alpha[1:] * expm * h / h_prev)
        self.alpha, self.sigma = alpha[:-1], sigma[:-1]
        self.prediction_type = cfg["prediction_type"]

    def init_state(self, sample):
        return jnp.zeros_like(sample)  # the previous step's data prediction

    def step(self, state, model_output, step_index, sample):
        alpha, sigma = _table(self.alpha)[step_index], _table(self.sigma)[step_index]
        if self.prediction_type == "epsilon":
            x0 = (sample - sigma * model_output) / alpha
        elif self.prediction_type == "v_prediction":
            x0 = alpha * sample - sigma * model_output
        else:
            x0 = model_output
        previous = (_table(self.sample_coeff)[step_index] * sample + _table(self.x0_coeff)[step_index] * x0
                    + _table(self.difference_coeff)[step_index] * (x0 - state))
        return previous, x0


SAMPLERS: dict[str, type[Sampler]] = {"ddim": DDIMSampler, "pndm": PNDMSampler, "euler": EulerSampler,
                                      "dpm": DPMSolverSampler}
_CLASS_NAMES = {"DDIMScheduler": "ddim", "PNDMScheduler": "pndm", "EulerDiscreteScheduler": "euler",
                "DPMSolverMultistepScheduler": "dpm"}


def make_sampler(name: str | None, config: dict[str, Any], num_inference_steps: int, *,
                 source: Path | str = "scheduler_config.json") -> Sampler:
    """The sampler `name` (one of `SAMPLERS`; None: the config's own `_class_name`) for `num_inference_steps`.

    A sampler chosen by name reads the options it knows from the model's config, as
    `XScheduler.from_config(config)` does in diffusers. One difference: `pndm` chosen by name uses PLMS even
    when the config does not say `skip_prk_steps` (every SD checkpoint does).
    """
    if name is None:
        class_name = config.get("_class_name")
        if class_name not in _CLASS_NAMES:
            raise UserError(f"{source}: scheduler {class_name!r} is not supported; choose one of "
                            f"{', '.join(SAMPLERS)} by name")
        name = _CLASS_NAMES[class_name]
    if name not in SAMPLERS:
        raise UserError(f"unknown scheduler {name!r}; choose one of {', '.join(SAMPLERS)}")
    if num_inference_steps < 1:
        raise UserError(f"the number of steps must be at least 1, got {num_inference_steps}")
    return SAMPLERS[name](config, num_inference_steps, source)
