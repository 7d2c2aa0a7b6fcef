"""Noise schedules and samplers, configured from diffusers' `scheduler_config.json`.

Everything that depends only on the step (timesteps, alphas, sigmas, multistep weights) is computed once on
the host, in float64 from diffusers' float32 `alphas_cumprod`, laid out exactly as diffusers 0.42 lays it out,
and becomes a small per-step float32 table. The arithmetic that touches the latents is a pure JAX function of
`(state, model_output, step_index, sample)` that reads row `step_index` of those tables, so a whole sampling
loop is one `lax.scan` with `step_index` traced and no Python branching on it. diffusers' Python-side
bookkeeping (PNDM's call counter and output list, DPM-Solver's order switching) is replayed on the host into
those tables.

Samplers (`make_sampler` names): `ddim` (DDIMScheduler with eta 0), `pndm` (PNDMScheduler's PLMS, SD 1.5's
default), `euler` (EulerDiscreteScheduler without churn) and `dpm` (DPMSolverMultistepScheduler's
DPM-Solver++ of order 2). Each reads the options its diffusers class knows, with that class's defaults, and
ignores the rest, as `XScheduler.from_config(config)` does; an option it knows but does not implement for the
value given is a `UserError`. `NoiseSchedule` is the forward process for training, as DDPMScheduler reads it.

One module of ~540 lines on purpose: the four samplers share the host-side tables, the config reading and the
step-function shape, and each is a small subclass next to the others, as diffusers' scheduler files are read
side by side when checking parity.
"""
from __future__ import annotations

import abc
import dataclasses
import math
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from nsync_jax.errors import UserError

# ----------------------------------------------------------------------------------------------------------
# Options. Each scheduler class maps the config keys it knows to (default, supported values); None accepts
# any value. Keys with no effect on deterministic sampling (thresholding parameters, sigma_min/sigma_max
# without Karras sigmas, flow_shift, ...) are left out, so they are ignored like unknown keys.
# ----------------------------------------------------------------------------------------------------------

_Options = dict[str, tuple[Any, tuple | None]]

_OFF = (False, None)
_SPACINGS = ("leading", "trailing", "linspace")
_ALL_PREDICTIONS = ("epsilon", "v_prediction", "sample")
_BETAS: _Options = {
    "num_train_timesteps": (1000, None), "beta_start": (0.0001, None), "beta_end": (0.02, None),
    "beta_schedule": ("linear", ("linear", "scaled_linear", "squaredcos_cap_v2")), "trained_betas": (None, None),
    "rescale_betas_zero_snr": (False, _OFF),
}
_DDPM_OPTIONS: _Options = {
    **_BETAS, "prediction_type": ("epsilon", _ALL_PREDICTIONS),
    # A learned variance needs its own loss term; the fixed variances only matter to DDPM sampling.
    "variance_type": ("fixed_small", ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log")),
}
_DDIM_OPTIONS: _Options = {
    **_BETAS, "prediction_type": ("epsilon", _ALL_PREDICTIONS), "timestep_spacing": ("leading", _SPACINGS),
    "steps_offset": (0, None), "set_alpha_to_one": (True, None), "clip_sample": (True, None),
    "clip_sample_range": (1.0, None), "thresholding": (False, _OFF),
}
_PNDM_OPTIONS: _Options = {  # PNDMScheduler has no rescale_betas_zero_snr: from_config ignores it
    **{key: spec for key, spec in _BETAS.items() if key != "rescale_betas_zero_snr"},
    "prediction_type": ("epsilon", ("epsilon", "v_prediction")), "timestep_spacing": ("leading", _SPACINGS),
    "steps_offset": (0, None), "set_alpha_to_one": (False, None),
    "skip_prk_steps": (False, (True,)),  # the Runge-Kutta warm-up is not implemented, only PLMS
}
_EULER_OPTIONS: _Options = {
    **_BETAS, "prediction_type": ("epsilon", _ALL_PREDICTIONS), "timestep_spacing": ("linspace", _SPACINGS),
    "steps_offset": (0, None), "interpolation_type": ("linear", ("linear",)),
    "use_karras_sigmas": (False, _OFF), "use_exponential_sigmas": (False, _OFF), "use_beta_sigmas": (False, _OFF),
    "timestep_type": ("discrete", ("discrete", "continuous")), "final_sigmas_type": ("zero", ("zero", "sigma_min")),
}
_DPM_OPTIONS: _Options = {
    **_BETAS, "prediction_type": ("epsilon", _ALL_PREDICTIONS), "timestep_spacing": ("linspace", _SPACINGS),
    "steps_offset": (0, None), "solver_order": (2, (1, 2)), "algorithm_type": ("dpmsolver++", ("dpmsolver++",)),
    # diffusers maps DEIS's and UniPC's solver types to midpoint.
    "solver_type": ("midpoint", ("midpoint", "heun", "logrho", "bh1", "bh2")),
    "lower_order_final": (True, None), "euler_at_final": (False, None),
    "final_sigmas_type": ("zero", ("zero", "sigma_min")), "lambda_min_clipped": (-math.inf, None),
    "thresholding": (False, _OFF), "variance_type": (None, (None,)),
    "use_karras_sigmas": (False, _OFF), "use_exponential_sigmas": (False, _OFF), "use_beta_sigmas": (False, _OFF),
    "use_lu_lambdas": (False, _OFF), "use_flow_sigmas": (False, _OFF),
}


def _resolve(config: dict[str, Any], options: _Options, source: Path | str) -> dict[str, Any]:
    """The options of one scheduler class from `config` (its defaults for missing keys), refusing values it
    cannot honour."""
    resolved = {}
    for key, (default, supported) in options.items():
        value = config.get(key, default)
        if supported is not None and value not in supported:
            raise UserError(f"{source}: scheduler option {key}={value!r} is not supported "
                            f"(supported: {', '.join(map(repr, supported))})")
        resolved[key] = value
    return resolved


# ----------------------------------------------------------------------------------------------------------
# The training schedule (every sampler's alphas and the DDPM training loss).
# ----------------------------------------------------------------------------------------------------------

def _alphas_cumprod(cfg: dict[str, Any], source: Path | str) -> np.ndarray:
    """abar_t for t = 0 .. num_train_timesteps - 1 (float64 values of a float32 table).

    Rounded as diffusers rounds it: float32 betas and a float32 running product. With a float64 table, the
    sigmas near t = 0 (where 1 - abar is a few betas) would differ from diffusers' by up to 3e-4 relative.
    """
    steps = cfg["num_train_timesteps"]
    if cfg["trained_betas"] is not None:
        betas = np.asarray(cfg["trained_betas"], np.float32)
        if betas.shape != (steps,):
            raise UserError(f"{source}: trained_betas has {betas.size} values but num_train_timesteps is {steps}")
    elif cfg["beta_schedule"] == "linear":
        betas = np.linspace(cfg["beta_start"], cfg["beta_end"], steps, dtype=np.float32)
    elif cfg["beta_schedule"] == "scaled_linear":
        betas = np.linspace(cfg["beta_start"] ** 0.5, cfg["beta_end"] ** 0.5, steps, dtype=np.float32) ** 2
    else:  # squaredcos_cap_v2: the cosine alpha-bar of improved DDPM, each beta capped at 0.999
        alpha_bar = np.cos((np.arange(steps + 1) / steps + 0.008) / 1.008 * np.pi / 2) ** 2
        betas = np.minimum(1 - alpha_bar[1:] / alpha_bar[:-1], 0.999).astype(np.float32)
    return np.cumprod(1 - betas, dtype=np.float32).astype(np.float64)


# eq=False: hashing by identity, as a numpy field can be neither hashed nor compared to one bool.
@dataclasses.dataclass(frozen=True, eq=False)
class NoiseSchedule:
    """The forward (noising) process a model was trained with."""

    num_train_timesteps: int
    prediction_type: str  # "epsilon", "v_prediction" or "sample"
    alphas_cumprod: np.ndarray  # (num_train_timesteps,) float32

    @classmethod
    def from_config(cls, config: dict[str, Any], source: Path | str = "scheduler_config.json") -> NoiseSchedule:
        """The schedule `DDPMScheduler.from_config(config)` would train with."""
        cfg = _resolve(config, _DDPM_OPTIONS, source)
        return cls(cfg["num_train_timesteps"], cfg["prediction_type"],
                   _alphas_cumprod(cfg, source).astype(np.float32))


def _per_example(values: jax.Array, like: jax.Array) -> jax.Array:
    """`(batch,)` values shaped to broadcast against `like` `(batch, ...)`, in its dtype."""
    return values.reshape(values.shape + (1,) * (like.ndim - values.ndim)).astype(like.dtype)


def add_noise(alphas_cumprod, original: jax.Array, noise: jax.Array, timesteps: jax.Array) -> jax.Array:
    """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise, for `timesteps` of shape `(batch,)`."""
    abar = jnp.asarray(alphas_cumprod, jnp.float32)[timesteps]
    return _per_example(jnp.sqrt(abar), original) * original + _per_example(jnp.sqrt(1 - abar), original) * noise


def get_velocity(alphas_cumprod, sample: jax.Array, noise: jax.Array, timesteps: jax.Array) -> jax.Array:
    """The v-prediction target sqrt(abar_t) noise - sqrt(1 - abar_t) x_0, for `timesteps` of shape `(batch,)`."""
    abar = jnp.asarray(alphas_cumprod, jnp.float32)[timesteps]
    return _per_example(jnp.sqrt(abar), sample) * noise - _per_example(jnp.sqrt(1 - abar), sample) * sample


def training_target(schedule: NoiseSchedule, latents: jax.Array, noise: jax.Array, timesteps: jax.Array) -> jax.Array:
    """What the UNet learns to predict from `add_noise(..., latents, noise, timesteps)`."""
    if schedule.prediction_type == "epsilon":
        return noise
    if schedule.prediction_type == "v_prediction":
        return get_velocity(schedule.alphas_cumprod, latents, noise, timesteps)
    return latents


def predicted_original(schedule: NoiseSchedule, noisy: jax.Array, prediction: jax.Array,
                       timesteps: jax.Array) -> jax.Array:
    """The x_0 a model output implies for `noisy = add_noise(..., timesteps)` (the x_0 estimate of DDIM), for
    `timesteps` of shape `(batch,)`; differentiable in `prediction` (training losses on the estimate)."""
    abar = jnp.asarray(schedule.alphas_cumprod, jnp.float32)[timesteps]
    alpha, sigma = _per_example(jnp.sqrt(abar), noisy), _per_example(jnp.sqrt(1 - abar), noisy)
    if schedule.prediction_type == "epsilon":
        return (noisy - sigma * prediction) / alpha
    if schedule.prediction_type == "v_prediction":  # v = alpha noise - sigma x_0
        return alpha * noisy - sigma * prediction
    return prediction


def min_snr_weights(schedule: NoiseSchedule, timesteps: jax.Array, gamma: float) -> jax.Array:
    """Per-example loss weights of Min-SNR-gamma (arXiv 2303.09556), as diffusers' `--snr_gamma` computes them.

    High-SNR (low-noise) timesteps dominate an unweighted loss while teaching little; capping their weight at
    `gamma` makes training converge several times faster. The weight is relative to each target's own scale."""
    abar = jnp.asarray(schedule.alphas_cumprod, jnp.float32)[timesteps]
    snr = abar / (1 - abar)
    capped = jnp.minimum(snr, gamma)
    if schedule.prediction_type == "epsilon":
        return capped / snr
    if schedule.prediction_type == "v_prediction":
        return capped / (snr + 1)
    return capped

# ----------------------------------------------------------------------------------------------------------
# Host-side helpers shared by the samplers.
# ----------------------------------------------------------------------------------------------------------

def _check_steps(steps: int, cfg: dict[str, Any], source: Path | str) -> None:
    if not 1 <= steps <= cfg["num_train_timesteps"]:
        raise UserError(f"the number of steps must be between 1 and num_train_timesteps="
                        f"{cfg['num_train_timesteps']} of {source}, got {steps}")


def _timestep_grid(spacing: str, count: int, train_steps: int, offset: int, *, trailing_ratio: float | None = None,
                   round_linspace: bool = True) -> np.ndarray:
    """diffusers' `count` inference timesteps, high to low, float64 (Table 2 of arXiv 2305.08891).

    `train_steps` is the top of the range (DPM-Solver's clipped one); `trailing_ratio` the trailing stride when
    it is not `train_steps / count`. Only "leading" adds `steps_offset`, as in diffusers.
    """
    if spacing == "linspace":
        grid = np.linspace(0, train_steps - 1, count)[::-1]
        return grid.round() if round_linspace else grid
    if spacing == "leading":
        return (np.arange(count) * (train_steps // count))[::-1] + float(offset)
    return np.arange(train_steps, 0, -(trailing_ratio or train_steps / count)).round() - 1


def _check_timesteps(timesteps: np.ndarray, steps: int, cfg: dict[str, Any], source: Path | str) -> None:
    if timesteps.max() > cfg["num_train_timesteps"] - 1:
        raise UserError(f"{source}: {steps} steps with timestep_spacing={cfg['timestep_spacing']!r} and steps_offset="
                        f"{cfg['steps_offset']} reach timestep {timesteps.max():g}, past num_train_timesteps="
                        f"{cfg['num_train_timesteps']}")


def _x0_and_eps(prediction_type: str, alpha: np.ndarray, sigma: np.ndarray) -> tuple[np.ndarray, ...]:
    """For samples x = alpha x_0 + sigma noise: the coefficients on (x, model output) of the predicted x_0,
    then those of the predicted noise."""
    ones, zeros = np.ones_like(alpha), np.zeros_like(alpha)
    if prediction_type == "epsilon":
        return 1 / alpha, -sigma / alpha, zeros, ones
    if prediction_type == "v_prediction":  # v = alpha noise - sigma x_0
        return alpha, -sigma, sigma, alpha
    return zeros, ones, 1 / sigma, -alpha / sigma


def _previous_alphas_cumprod(alphas_cumprod: np.ndarray, previous: np.ndarray, set_alpha_to_one: bool) -> np.ndarray:
    """abar at each step's previous timestep; a negative one (past the end) is 1 or abar_0, per the config."""
    final = 1.0 if set_alpha_to_one else alphas_cumprod[0]
    return np.where(previous >= 0, alphas_cumprod[np.maximum(previous, 0)], final)


def _row(table: np.ndarray, step_index: jax.Array | int) -> jax.Array:
    return jnp.asarray(table)[step_index]


def _f32(*arrays) -> tuple[np.ndarray, ...]:
    return tuple(np.asarray(a, np.float32) for a in arrays)


# ----------------------------------------------------------------------------------------------------------
# Samplers.
# ----------------------------------------------------------------------------------------------------------

class Sampler(abc.ABC):
    """A deterministic sampler; `step_index` indexes `timesteps` and may be a traced int32 scalar.

    Attributes:
      timesteps: the model's timestep at each model call, in call order: diffusers' `timesteps` (numpy int32;
        float32 for Euler, whose timesteps are fractional).
      init_noise_sigma: the scale of the initial noise.
    """

    timesteps: np.ndarray
    init_noise_sigma: float = 1.0

    def init_state(self, sample: jax.Array) -> Any:
        """The multistep history before the first step (a pytree of arrays)."""
        return ()

    def scale_model_input(self, sample: jax.Array, step_index: jax.Array | int) -> jax.Array:
        """The UNet's input at step `step_index`."""
        return sample

    @abc.abstractmethod
    def step(self, state: Any, model_output: jax.Array, step_index: jax.Array | int,
             sample: jax.Array) -> tuple[jax.Array, Any]:
        """One denoising step: `(previous_sample, new_state)`."""


class DDIMSampler(Sampler):
    """DDIMScheduler with eta 0: x_prev = sqrt(abar_prev) x_0 + sqrt(1 - abar_prev) noise."""

    def __init__(self, config: dict[str, Any], num_inference_steps: int, *,
                 source: Path | str = "scheduler_config.json"):
        cfg = _resolve(config, _DDIM_OPTIONS, source)
        _check_steps(num_inference_steps, cfg, source)
        alphas_cumprod = _alphas_cumprod(cfg, source)
        train_steps = cfg["num_train_timesteps"]
        timesteps = _timestep_grid(cfg["timestep_spacing"], num_inference_steps, train_steps, cfg["steps_offset"])
        _check_timesteps(timesteps, num_inference_steps, cfg, source)
        self.timesteps = timesteps.astype(np.int32)
        abar = alphas_cumprod[self.timesteps]
        # diffusers steps back by train_steps // steps whatever the spacing.
        abar_prev = _previous_alphas_cumprod(alphas_cumprod, self.timesteps - train_steps // num_inference_steps,
                                             cfg["set_alpha_to_one"])
        self.x0_sample, self.x0_output, self.eps_sample, self.eps_output = _f32(
            *_x0_and_eps(cfg["prediction_type"], np.sqrt(abar), np.sqrt(1 - abar)))
        self.x0_scale, self.eps_scale = _f32(np.sqrt(abar_prev), np.sqrt(1 - abar_prev))
        self.clip_range = cfg["clip_sample_range"] if cfg["clip_sample"] else None

    def step(self, state, model_output, step_index, sample):
        x0 = _row(self.x0_sample, step_index) * sample + _row(self.x0_output, step_index) * model_output
        # The noise comes from the unclipped x_0 (diffusers' use_clipped_model_output=False).
        eps = _row(self.eps_sample, step_index) * sample + _row(self.eps_output, step_index) * model_output
        if self.clip_range is not None:
            x0 = jnp.clip(x0, -self.clip_range, self.clip_range)
        previous = _row(self.x0_scale, step_index) * x0 + _row(self.eps_scale, step_index) * eps
        return previous.astype(sample.dtype), state


class DDIMInverseSampler:
    """diffusers' `DDIMInverseScheduler` (eta 0), for DDIM inversion: step i evaluates the model at
    `timesteps[i]` (ascending) on a sample at the noise level of DDIM's previous timestep t - T/steps, and
    moves the sample to the level of t: `DDIMSampler`'s step at t, run backwards, so DDIM sampling from the
    inverted noise reconstructs the image up to the model's error. Same config (checked the same way) and
    steps as `DDIMSampler`; `step` is pure and traceable with a traced `step_index`.
    """

    def __init__(self, config: dict[str, Any], num_inference_steps: int, *,
                 source: Path | str = "scheduler_config.json"):
        forward = DDIMSampler(config, num_inference_steps, source=source)
        cfg = _resolve(config, _DDIM_OPTIONS, source)
        alphas_cumprod = _alphas_cumprod(cfg, source)
        self.timesteps = forward.timesteps[::-1].copy()
        # Before the first timestep the level is 1 or abar_0 (`set_alpha_to_one`), as in DDIM.
        abar_from = _previous_alphas_cumprod(
            alphas_cumprod, self.timesteps - cfg["num_train_timesteps"] // num_inference_steps, cfg["set_alpha_to_one"])
        abar_to = alphas_cumprod[self.timesteps]
        self.x0_sample, self.x0_output, self.eps_sample, self.eps_output = _f32(
            *_x0_and_eps(cfg["prediction_type"], np.sqrt(abar_from), np.sqrt(1 - abar_from)))
        self.x0_scale, self.eps_scale = _f32(np.sqrt(abar_to), np.sqrt(1 - abar_to))
        self.clip_range = forward.clip_range

    def epsilon(self, model_output: jax.Array, step_index, sample: jax.Array) -> jax.Array:
        """The noise a model output implies at step `step_index`."""
        return _row(self.eps_sample, step_index) * sample + _row(self.eps_output, step_index) * model_output

    def step(self, model_output: jax.Array, step_index, sample: jax.Array) -> jax.Array:
        """The sample one step noisier."""
        x0 = _row(self.x0_sample, step_index) * sample + _row(self.x0_output, step_index) * model_output
        if self.clip_range is not None:
            x0 = jnp.clip(x0, -self.clip_range, self.clip_range)
        eps = self.epsilon(model_output, step_index, sample)
        return (_row(self.x0_scale, step_index) * x0 + _row(self.eps_scale, step_index) * eps).astype(sample.dtype)


# Adams-Bashforth weights on the stored outputs, oldest first, by how many are stored.
_ADAMS_BASHFORTH = {1: [1.0], 2: [-1 / 2, 3 / 2], 3: [5 / 12, -16 / 12, 23 / 12],
                    4: [-9 / 24, 37 / 24, -59 / 24, 55 / 24]}


class PNDMSampler(Sampler):
    """PNDMScheduler with `skip_prk_steps` (PLMS): a 4th-order linear multistep method on the noise prediction.

    diffusers' warm-up, replayed here: call 0 steps with its own output; call 1 (the same timestep as call 2)
    averages its output with call 0's and redoes call 0's step from call 0's sample, and is not stored; then
    Adams-Bashforth of order 2, 3 and 4 on the last stored outputs. Hence `timesteps` has steps + 1 entries.
    """

    def __init__(self, config: dict[str, Any], num_inference_steps: int, *,
                 source: Path | str = "scheduler_config.json"):
        cfg = _resolve(config, _PNDM_OPTIONS, source)
        _check_steps(num_inference_steps, cfg, source)
        alphas_cumprod = _alphas_cumprod(cfg, source)
        ratio = cfg["num_train_timesteps"] // num_inference_steps
        grid = _timestep_grid(cfg["timestep_spacing"], num_inference_steps, cfg["num_train_timesteps"],
                              cfg["steps_offset"])
        _check_timesteps(grid, num_inference_steps, cfg, source)
        grid = grid.astype(np.int32)
        self.timesteps = np.concatenate([grid[:1], grid[1:2], grid[1:]])

        calls = len(self.timesteps)
        current = self.timesteps.astype(np.int64)
        previous = current - ratio  # diffusers steps back by train_steps // steps whatever the spacing
        self.store = np.arange(calls) != 1  # call 1's output is averaged in, never stored
        weights = np.zeros((calls, 5))  # on (model_output, stored[0], ..., stored[3]), oldest stored first
        for call in range(calls):
            if call == 1:  # call 0's step again, from call 0's sample, with the mean of both outputs
                current[1], previous[1] = current[1] + ratio, current[1]
                weights[1, [0, 4]] = 0.5
            else:
                stored = 1 if call == 0 else min(call, 4)
                weights[call, 5 - stored:] = _ADAMS_BASHFORTH[stored]
        abar = alphas_cumprod[current]
        abar_prev = _previous_alphas_cumprod(alphas_cumprod, previous, cfg["set_alpha_to_one"])
        _, _, eps_sample, eps_output = _x0_and_eps(cfg["prediction_type"], np.sqrt(abar), np.sqrt(1 - abar))
        # Formula (9) of the PNDM paper (arXiv 2202.09778), as diffusers' _get_prev_sample writes it.
        sample_coeff = np.sqrt(abar_prev / abar)
        eps_coeff = -(abar_prev - abar) / (abar * np.sqrt(1 - abar_prev) + np.sqrt(abar * (1 - abar) * abar_prev))
        self.weights, self.eps_sample, self.eps_output, self.sample_coeff, self.eps_coeff = _f32(
            weights, eps_sample, eps_output, sample_coeff, eps_coeff)

    def init_state(self, sample):
        # The last four stored model outputs, oldest first, and call 0's sample (which call 1 steps from again).
        return jnp.zeros((4, *sample.shape), sample.dtype), jnp.zeros_like(sample)

    def step(self, state, model_output, step_index, sample):
        stored, first_sample = state
        stored = jnp.where(_row(self.store, step_index), jnp.concatenate([stored[1:], model_output[None]]), stored)
        weights = _row(self.weights, step_index)
        combined = weights[0] * model_output + sum(weights[k + 1] * stored[k] for k in range(4))
        first_sample = jnp.where(step_index == 0, sample, first_sample)
        sample_in = jnp.where(step_index == 1, first_sample, sample)
        eps = _row(self.eps_sample, step_index) * sample_in + _row(self.eps_output, step_index) * combined
        previous = _row(self.sample_coeff, step_index) * sample_in + _row(self.eps_coeff, step_index) * eps
        return previous.astype(sample.dtype), (stored, first_sample)


def _sigmas(alphas_cumprod: np.ndarray) -> np.ndarray:
    """The variance-exploding noise levels sqrt((1 - abar) / abar) of every training timestep."""
    return np.sqrt((1 - alphas_cumprod) / alphas_cumprod)


def _step_sigmas(timesteps: np.ndarray, alphas_cumprod: np.ndarray, final_sigmas_type: str) -> np.ndarray:
    """diffusers' float32 sigmas: interpolated at `timesteps`, then the final one (0 or the smallest)."""
    all_sigmas = _sigmas(alphas_cumprod)
    final = all_sigmas[0] if final_sigmas_type == "sigma_min" else 0.0
    return np.append(np.interp(timesteps, np.arange(len(all_sigmas)), all_sigmas), final).astype(np.float32)


class EulerSampler(Sampler):
    """EulerDiscreteScheduler without churn: Euler's method on the probability-flow ODE in sigma, on latents
    scaled by sqrt(sigma^2 + 1) (so `init_noise_sigma` > 1). Timesteps are fractional (float32)."""

    def __init__(self, config: dict[str, Any], num_inference_steps: int, *,
                 source: Path | str = "scheduler_config.json"):
        cfg = _resolve(config, _EULER_OPTIONS, source)
        _check_steps(num_inference_steps, cfg, source)
        alphas_cumprod = _alphas_cumprod(cfg, source)
        timesteps = _timestep_grid(cfg["timestep_spacing"], num_inference_steps, cfg["num_train_timesteps"],
                                   cfg["steps_offset"], round_linspace=False).astype(np.float32)
        _check_timesteps(timesteps, num_inference_steps, cfg, source)
        sigmas = _step_sigmas(timesteps, alphas_cumprod, cfg["final_sigmas_type"])
        if cfg["timestep_type"] == "continuous" and cfg["prediction_type"] == "v_prediction":
            timesteps = (0.25 * np.log(sigmas[:-1])).astype(np.float32)  # diffusers' EDM-style conditioning
        self.timesteps = timesteps
        top = float(sigmas.max())
        self.init_noise_sigma = top if cfg["timestep_spacing"] in ("linspace", "trailing") else math.sqrt(top**2 + 1)

        sigma, sigma_next = sigmas[:-1].astype(np.float64), sigmas[1:].astype(np.float64)
        alpha = 1 / np.sqrt(sigma**2 + 1)  # the scaled latents are alpha x = alpha x_0 + sigma alpha noise
        x0_sample, x0_output, _, _ = _x0_and_eps(cfg["prediction_type"], alpha, sigma * alpha)
        self.input_scale, self.x0_sample, self.x0_output, self.dt_over_sigma = _f32(
            alpha, x0_sample * alpha, x0_output, (sigma_next - sigma) / sigma)

    def scale_model_input(self, sample, step_index):
        return (sample * _row(self.input_scale, step_index)).astype(sample.dtype)

    def step(self, state, model_output, step_index, sample):
        x0 = _row(self.x0_sample, step_index) * sample + _row(self.x0_output, step_index) * model_output
        previous = sample + (sample - x0) * _row(self.dt_over_sigma, step_index)
        return previous.astype(sample.dtype), state


class DPMSolverSampler(Sampler):
    """DPMSolverMultistepScheduler's DPM-Solver++ (arXiv 2211.01095): a multistep solver on the data
    prediction, order 2 (midpoint or Heun) except where diffusers drops to order 1 (the first step, and the
    last one with a zero final sigma, with euler_at_final, or with lower_order_final below 15 steps)."""

    def __init__(self, config: dict[str, Any], num_inference_steps: int, *,
                 source: Path | str = "scheduler_config.json"):
        cfg = _resolve(config, _DPM_OPTIONS, source)
        _check_steps(num_inference_steps, cfg, source)
        alphas_cumprod = _alphas_cumprod(cfg, source)
        train_steps, spacing = cfg["num_train_timesteps"], cfg["timestep_spacing"]
        # Timesteps whose log-SNR is below lambda_min_clipped are never visited (for the cosine schedule).
        log_snr = 0.5 * (np.log(alphas_cumprod) - np.log(1 - alphas_cumprod))
        last = train_steps - int(np.searchsorted(log_snr[::-1], cfg["lambda_min_clipped"]))
        if spacing == "trailing":
            grid = _timestep_grid(spacing, num_inference_steps, last, 0,
                                  trailing_ratio=train_steps / num_inference_steps)
        else:  # one more point than steps, dropping the final timestep 0
            grid = _timestep_grid(spacing, num_inference_steps + 1, last, cfg["steps_offset"])[:-1]
        _check_timesteps(grid, num_inference_steps, cfg, source)
        if len(np.unique(grid)) < len(grid):  # diffusers finds its step by timestep, and repeats would skip
            raise UserError(f"{source}: {num_inference_steps} steps with timestep_spacing={spacing!r} repeat a "
                            "timestep in DPM-Solver; use fewer steps")
        self.timesteps = grid.astype(np.int32)

        sigmas = _step_sigmas(self.timesteps, alphas_cumprod, cfg["final_sigmas_type"]).astype(np.float64)
        alpha = 1 / np.sqrt(sigmas**2 + 1)
        sigma = sigmas * alpha
        with np.errstate(divide="ignore", invalid="ignore"):  # a zero final sigma: lambda = inf, h = inf
            lam = np.log(alpha) - np.log(sigma)
            h = lam[1:] - lam[:-1]
            expm1 = np.exp(-h) - 1
            h_ratio = h / np.concatenate([[np.nan], h[:-1]])  # h / h_prev, the 1 / r0 of diffusers
            if cfg["solver_type"] == "heun":
                difference = alpha[1:] * (expm1 / h + 1) * h_ratio
            else:
                difference = -0.5 * alpha[1:] * expm1 * h_ratio
        steps = len(self.timesteps)
        first_order = np.arange(steps) == 0
        first_order[-1] |= (cfg["euler_at_final"] or (cfg["lower_order_final"] and steps < 15)
                            or cfg["final_sigmas_type"] == "zero")
        if cfg["solver_order"] == 1:
            first_order[:] = True
        # x_next = (sigma_next / sigma) x - alpha_next (e^-h - 1) D0 + c D1, with D0 = x_0 and
        # D1 = (x_0 - previous x_0) h / h_prev, c per solver type; first order drops the D1 term.
        x0_sample, x0_output, _, _ = _x0_and_eps(cfg["prediction_type"], alpha[:-1], sigma[:-1])
        self.x0_sample, self.x0_output, self.sample_coeff, self.x0_coeff, self.difference_coeff = _f32(
            x0_sample, x0_output, sigma[1:] / sigma[:-1], -alpha[1:] * expm1, np.where(first_order, 0.0, difference))

    def init_state(self, sample):
        return jnp.zeros_like(sample)  # the previous step's predicted x_0

    def step(self, state, model_output, step_index, sample):
        x0 = _row(self.x0_sample, step_index) * sample + _row(self.x0_output, step_index) * model_output
        previous = (_row(self.sample_coeff, step_index) * sample + _row(self.x0_coeff, step_index) * x0
                    + _row(self.difference_coeff, step_index) * (x0 - state))
        return previous.astype(sample.dtype), x0.astype(sample.dtype)


SAMPLERS: dict[str, type[Sampler]] = {"ddim": DDIMSampler, "pndm": PNDMSampler, "euler": EulerSampler,
                                      "dpm": DPMSolverSampler}
_CLASS_NAMES = {"DDIMScheduler": "ddim", "PNDMScheduler": "pndm", "EulerDiscreteScheduler": "euler",
                "DPMSolverMultistepScheduler": "dpm"}


def make_sampler(name: str | None, config: dict[str, Any], num_inference_steps: int, *,
                 source: Path | str = "scheduler_config.json") -> Sampler:
    """The sampler `name` (a key of `SAMPLERS`; None: the config's own `_class_name`) for `num_inference_steps`.

    A sampler chosen by name reads the options its diffusers class knows from the model's config, as
    `XScheduler.from_config(config)` does. One deliberate difference: `pndm` chosen by name uses PLMS when the
    config does not say `skip_prk_steps` (PNDMScheduler's default is the unimplemented Runge-Kutta warm-up;
    every SD checkpoint sets the key), while a config whose own PNDMScheduler lacks it is refused.
    """
    if name is None:
        class_name = config.get("_class_name")
        if class_name not in _CLASS_NAMES:
            raise UserError(f"{source}: scheduler {class_name!r} is not supported; choose one of "
                            f"{', '.join(SAMPLERS)} by name")
        name = _CLASS_NAMES[class_name]
    elif name == "pndm":
        config = {"skip_prk_steps": True, **config}
    if name not in SAMPLERS:
        raise UserError(f"unknown scheduler {name!r}; choose one of {', '.join(SAMPLERS)}")
    return SAMPLERS[name](config, num_inference_steps, source=source)
