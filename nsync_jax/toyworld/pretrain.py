"""Pretraining the bundled tiny Stable Diffusion on the toy world, from scratch, on a CPU.

Three stages, each a few lines around one generic fitting loop (`fit`):
  1. an AutoencoderKL learns to compress 64x64 renders of the seen styles (L1 + a tiny KL term + a
     scale-equivariance term that keeps the latents smooth);
  2. the encoder is made deterministic (below); the pool is encoded once; the latent scaling factor is
     1 / std of the latents, as SD's 0.18215 was found;
  3. a CLIP text encoder (the real CLIP BPE vocabulary) and a UNet learn v-prediction (as SD 2 does) together,
     with captions that name the seen style, say "drawing" (a random seen style: the generic style negatives are
     drawn in), leave the style out, or are dropped entirely (so classifier-free guidance works).
Held-out styles are never rendered here. The result is a diffusers-format folder that this project and
diffusers' `StableDiffusionPipeline` both load; `pretrain_log.jsonl` beside the weights keeps the curves.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

from nsync_jax import checkpoints as ckpt, distributed, export, tokens, weights
from nsync_jax.data import latent_cache
from nsync_jax.files import atomic_folder, write_json
from nsync_jax.models.clip_text import CLIPTextConfig, CLIPTextModel
from nsync_jax.models.unet import UNet2DConditionModel, UNetConfig
from nsync_jax.config import bundled_config
from nsync_jax.errors import UserError
from nsync_jax.models.vae import AutoencoderKL, VAEConfig, load_vae, sample_posterior
from nsync_jax.schedulers import NoiseSchedule, add_noise, min_snr_weights, training_target
from nsync_jax.toyworld import world

ASSETS = Path(__file__).parent / "assets"
BUNDLED_MODEL = ASSETS / "sd-toyworld"
CLIP_BPE = ASSETS / "bpe_simple_vocab_16e6.txt.gz"  # from the open-clip-torch wheel (MIT licence)


def default_config() -> ml_collections.ConfigDict:
    """The pretraining recipe: configs/toyworld_pretrain.py."""
    return bundled_config("toyworld_pretrain")


# ------------------------------------------------------------------------------------------------------------
# The model folder's configs: what diffusers and transformers read.
# ------------------------------------------------------------------------------------------------------------

def folder_configs(config: ml_collections.ConfigDict) -> dict[str, dict[str, Any]]:
    vae, text, unet = config.vae, config.text_encoder, config.unet
    return {
        "vae": {"_class_name": "AutoencoderKL", "in_channels": 3, "out_channels": 3,
                "down_block_types": ["DownEncoderBlock2D"] * len(vae.block_out_channels),
                "up_block_types": ["UpDecoderBlock2D"] * len(vae.block_out_channels),
                "block_out_channels": list(vae.block_out_channels), "layers_per_block": vae.layers_per_block,
                "latent_channels": vae.latent_channels, "norm_num_groups": vae.norm_num_groups,
                "mid_block_add_attention": vae.mid_block_add_attention,
                "act_fn": "silu", "sample_size": config.resolution, "scaling_factor": 1.0},
        "text_encoder": {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "vocab_size": 49408,
                         "hidden_size": text.hidden_size, "intermediate_size": 4 * text.hidden_size,
                         "num_hidden_layers": text.num_hidden_layers,
                         "num_attention_heads": text.num_attention_heads,
                         "max_position_embeddings": text.max_length, "hidden_act": "quick_gelu",
                         "layer_norm_eps": 1e-5, "projection_dim": text.hidden_size, "bos_token_id": 49406,
                         "eos_token_id": 49407, "pad_token_id": 49407, "torch_dtype": "float32"},
        "unet": {"_class_name": "UNet2DConditionModel", "sample_size": config.resolution // 2 ** (
                     len(vae.block_out_channels) - 1),
                 "in_channels": vae.latent_channels, "out_channels": vae.latent_channels,
                 "block_out_channels": list(unet.block_out_channels), "layers_per_block": unet.layers_per_block,
                 "down_block_types": [("CrossAttnDownBlock2D" if a else "DownBlock2D") for a in unet.attention],
                 "up_block_types": [("CrossAttnUpBlock2D" if a else "UpBlock2D") for a in unet.attention[::-1]],
                 "attention_head_dim": unet.attention_heads, "cross_attention_dim": text.hidden_size,
                 "norm_num_groups": unet.norm_num_groups, "act_fn": "silu", "flip_sin_to_cos": True,
                 "freq_shift": 0},
        # SD 1.x's schedule and default sampler; v-prediction as SD 2: after 1,500 steps on the simplest scenes
        # an epsilon UNet of this size predicted x0 at t=950 (where sampling starts) with mean squared error 3.0,
        # three times the latents' variance, and v-prediction with 0.41: samples start from the right layout.
        "scheduler": {"_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
                      "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
                      "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
                      "timestep_spacing": "leading", "clip_sample": False, "prediction_type": "v_prediction"},
    }


def build_modules(configs: dict[str, dict], seed: int) -> dict[str, nnx.Module]:
    rngs = nnx.Rngs(seed)
    return {
        "vae": AutoencoderKL(VAEConfig.from_dict(configs["vae"]), rngs=rngs),
        "text_encoder": CLIPTextModel(CLIPTextConfig.from_dict(configs["text_encoder"]), rngs=rngs),
        "unet": UNet2DConditionModel(UNetConfig.from_dict(configs["unet"]), rngs=rngs),
    }


# ------------------------------------------------------------------------------------------------------------
# One fitting loop for every stage: AdamW with warmup and cosine decay, optional EMA, a jitted step that takes
# the trainable state as a donated argument and its randomness from fold_in(key, step). Each batch is split
# over all devices (data parallel, weights replicated): on a CPU, `cpu_devices` simulated devices keep both
# cores busy where one XLA device leaves them half idle on these small convolutions.
# ------------------------------------------------------------------------------------------------------------

LOG_EVERY = 50  # steps per row of the loss curve


def fit(name: str, params, loss_fn: Callable, batch_fn: Callable[[int], Any], *, steps: int, learning_rate: float,
        warmup: int, seed: int, log: Callable[[dict], None], ema_decay: float | None = None, progress: bool = True,
        checkpoints: Path | None = None, checkpoint_every: int = 500):
    """Minimises `loss_fn(params, batch, key)` for `steps` steps; returns the (EMA, when asked) parameters.

    With `checkpoints`, the training state and the curve so far are saved in `checkpoints/name` every
    `checkpoint_every` steps, at the end and on SIGTERM (then `UserError`), and a call finding one there goes on
    from it: batches and noise are functions of the step, so an interrupted run ends as an uninterrupted one."""
    schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, min(warmup, steps // 2), steps,
                                                  end_value=0.1 * learning_rate)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=1e-4))

    def step_fn(state, batch, key):
        loss, grads = jax.value_and_grad(loss_fn)(state["params"], batch, key)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        new = {"params": optax.apply_updates(state["params"], updates), "opt_state": opt_state}
        if ema_decay:
            new["ema"] = jax.tree.map(lambda e, p: ema_decay * e + (1 - ema_decay) * p, state["ema"], new["params"])
        return new, loss

    mesh = distributed.make_mesh()
    step_fn = jax.jit(step_fn, donate_argnums=0)
    # Replicated copies (donation must not delete the arrays of the caller's modules), all placed as the step's
    # outputs will be, so that the second step does not compile again.
    replicated = distributed.replicated(mesh)
    params = jax.device_put(params, replicated, may_alias=False)
    state = {"params": params, "opt_state": jax.device_put(tx.init(params), replicated)}
    if ema_decay:
        state["ema"] = jax.device_put(params, replicated, may_alias=False)

    manager = ckpt.manager(Path(checkpoints) / name / "checkpoints", keep=1) if checkpoints else None
    first, rows, running = 0, [], []
    if manager is not None and manager.latest_step() is not None:
        first = manager.latest_step()
        state, meta = ckpt.restore(manager, first, state)
        rows, running = meta["log"], [np.float32(loss) for loss in meta["running"]]
        for row in rows:
            log(row)
        log({"stage": "resumed", "resumed": name, "step": first})
    # Curve times go on from the restored curve's: they add up the stage's runs.
    start = time.perf_counter() - (rows[-1]["seconds"] if rows else 0.0)
    split = distributed.batch_sharded(mesh)
    key = jax.random.key(seed)
    bar = tqdm(total=steps, initial=first, desc=name, unit="step", disable=not progress)
    done = first
    # Without checkpoints SIGTERM kills as usual.
    with ckpt.stop_on_sigterm(enabled=manager is not None) as stop_requested:
        try:
            for step in range(first, steps):
                batch = jax.tree.map(lambda x: distributed.put(x, split), batch_fn(step))
                state, loss = step_fn(state, batch, jax.random.fold_in(key, step))
                running.append(loss)
                done = step + 1
                if done % LOG_EVERY == 0 or done == steps:
                    mean = float(np.mean(jax.device_get(running)))
                    running = []
                    rows.append({"stage": name, "step": done, "loss": mean,
                                 "seconds": round(time.perf_counter() - start, 1)})
                    log(rows[-1])
                    bar.set_postfix(loss=f"{mean:.4f}")
                bar.update(1)
                if manager is not None and (done % checkpoint_every == 0 or done == steps or stop_requested):
                    # The losses since the last curve row too, so that a resumed run's curve is the same.
                    losses = [float(x) for x in jax.device_get(running)]
                    ckpt.save(manager, done, state, {"step": done, "log": rows, "running": losses})
                if stop_requested:
                    break
        finally:
            bar.close()
            if manager is not None:
                manager.wait_until_finished()
    if stop_requested:
        raise UserError(f"stopped by SIGTERM in stage {name} after step {done}; its checkpoint is in "
                        f"{checkpoints}: run the same command again to go on")
    return state["ema"] if ema_decay else state["params"]


# ------------------------------------------------------------------------------------------------------------
# Data: one pool of seen-style renders and, for each scene, its caption variants as token ids.
# ------------------------------------------------------------------------------------------------------------

def caption_variants(tokenizer, scenes: list[world.Scene]) -> np.ndarray:
    """Token ids `(4, N, tokens)`: own style named, "drawing", no style, empty (the unconditional prompt)."""
    prompts = [
        [world.caption(s) for s in scenes],
        [world.caption(s, world.GENERIC_STYLE) for s in scenes],
        [world.content_caption(s) for s in scenes],
        [""] * len(scenes),
    ]
    return np.stack([tokens.tokenize(tokenizer, p) for p in prompts])


def variant_choice(config, rng: np.random.Generator, size: int) -> np.ndarray:
    mix = config.captions
    named = 1.0 - mix.generic - mix.no_style - mix.drop
    return rng.choice(4, size=size, p=[named, mix.generic, mix.no_style, mix.drop])


def to_signed(images: np.ndarray) -> np.ndarray:
    return images.astype(np.float32) / 127.5 - 1.0


# ------------------------------------------------------------------------------------------------------------
# The stages.
# ------------------------------------------------------------------------------------------------------------

def halve(x: jax.Array) -> jax.Array:
    """2x2 average pooling of `(batch, h, w, c)`."""
    n, h, w, c = x.shape
    return x.reshape(n, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


def train_vae(vae: AutoencoderKL, images: np.ndarray, config, **fit_options) -> AutoencoderKL:
    """Stage 1; `fit_options` go to `fit` (log, progress, checkpoints, checkpoint_every)."""
    graphdef, params = nnx.split(vae)
    c = config.vae

    def loss_fn(params, batch, key):
        model = nnx.merge(graphdef, params)
        mean, logvar = model.encode(batch)
        latents = sample_posterior(mean, logvar, key)
        kl = 0.5 * jnp.mean(jnp.sum(mean ** 2 + jnp.exp(logvar) - 1.0 - logvar, axis=(1, 2, 3)))
        loss = jnp.mean(jnp.abs(model.decode(latents) - batch)) + c.kl_weight * kl
        if c.scale_equivariance:
            pooled = model.decode(halve(latents))
            loss += c.scale_equivariance * jnp.mean(jnp.abs(pooled - halve(batch)))
        return loss

    def batch_fn(step):
        rng = np.random.default_rng([config.seed, 1, step])
        return to_signed(images[rng.integers(0, len(images), c.batch_size)])

    params = fit("vae", params, loss_fn, batch_fn, steps=c.steps, learning_rate=c.learning_rate,
                 warmup=config.warmup_steps, seed=config.seed + 1, **fit_options)
    return nnx.merge(graphdef, params)


def settings(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The config as its JSON record reads back (tuples as lists)."""
    return json.loads(json.dumps(config.to_dict(), default=list))


def first_difference(recorded: dict, wanted: dict, prefix: str = "") -> tuple[str, Any, Any] | None:
    """The first dotted key (in `wanted`'s order) whose value differs: (key, recorded value, wanted value)."""
    for key, value in wanted.items():
        old = recorded.get(key)
        if isinstance(value, dict) and isinstance(old, dict):
            found = first_difference(old, value, f"{prefix}{key}.")
            if found:
                return found
        elif old != value:
            return f"{prefix}{key}", old, value
    return None


def reused_vae(folder: Path, config: ml_collections.ConfigDict) -> tuple[AutoencoderKL, list[dict]]:
    """The VAE of an earlier pretraining output, refused unless it was trained with the same `vae` settings
    (architecture and training alike, as its pretrain.json records them), and its training curve (the VAE rows
    of its pretrain_log.jsonl), which the new folder's log carries on so that the curve stays beside the VAE."""
    folder = Path(folder)
    recorded = weights.read_json(folder / "pretrain.json").get("config", {}).get("vae", {})
    differs = first_difference(recorded, settings(config.vae), "vae.")
    if differs:
        key, old, new = differs
        raise UserError(f"--config.vae_from={folder}: its VAE was trained with {key}={old!r}, "
                        f"this configuration trains {key}={new!r}")
    log = folder / "pretrain_log.jsonl"
    try:
        rows = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    except json.JSONDecodeError as error:
        raise UserError(f"{log}: not JSON lines ({error})") from None
    return load_vae(folder / "vae"), [row for row in rows if row.get("stage") == "vae" and "step" in row]


def claim_checkpoints(folder: Path, config: ml_collections.ConfigDict) -> None:
    """Records the run's settings in `folder`, where its checkpoints go; a folder an interrupted run of other
    settings left is refused (going on from it would splice two runs). `cpu_devices` may change: it splits
    each batch, it does not change what is trained."""
    wanted = settings(config)
    del wanted["cpu_devices"]
    record = folder / "config.json"
    if record.exists() and any(step.name.isdigit() for step in folder.glob("*/checkpoints/*")):
        differs = first_difference(weights.read_json(record), wanted)
        if differs:
            key, old, new = differs
            raise UserError(f"{folder}: holds checkpoints of an interrupted run with {key}={old!r}, not {new!r}: "
                            f"rerun with its settings to go on from them, or delete the folder to start over")
    write_json(record, wanted)


def make_deterministic(vae: AutoencoderKL) -> None:
    """Pins the encoder's log-variance output at -30 (diffusers' clamp, std 3e-7): a posterior sample is its mean.

    The trained posterior is wide (std 0.2-0.7 per channel against latent stds of 0.3-1.2): the decoder learned
    to ignore that noise, but a UNet trained on posterior samples must model it as data (the same 1,500 steps
    ended at loss 0.16 on samples, 0.044 on means). Pinned here, every later user of the folder (this
    project's trainer, diffusers' `latent_dist.sample()`) encodes an image to the latents the UNet learned."""
    channels = vae.config.latent_channels
    vae.quant_conv.kernel[..., channels:] = 0.0
    vae.quant_conv.bias[channels:] = -30.0


def encode_pool(vae: AutoencoderKL, images: np.ndarray) -> np.ndarray:
    """Posterior moments `(N, h, w, 2c)` of every pool image (uint8, converted a batch at a time)."""
    return latent_cache.posterior_moments(vae, images, batch_size=256, to_pixels=to_signed)


def train_denoiser(text_encoder: CLIPTextModel, unet: UNet2DConditionModel, latents: np.ndarray, ids: np.ndarray,
                   scaling_factor: float, schedule: NoiseSchedule, config, **fit_options):
    """Stage 3; `fit_options` go to `fit` (log, progress, checkpoints, checkpoint_every)."""
    graphdefs, params = {}, {}
    for name, module in (("text_encoder", text_encoder), ("unet", unet)):
        graphdefs[name], params[name] = nnx.split(module)
    c = config.unet

    def loss_fn(params, batch, key):
        k_noise, k_time = jax.random.split(key)
        latents = batch["latents"] * scaling_factor
        noise = jax.random.normal(k_noise, latents.shape)
        t = jax.random.randint(k_time, (latents.shape[0],), 0, schedule.num_train_timesteps)
        context = nnx.merge(graphdefs["text_encoder"], params["text_encoder"])(batch["ids"])
        prediction = nnx.merge(graphdefs["unet"], params["unet"])(
            add_noise(schedule.alphas_cumprod, latents, noise, t), t, context)
        error = jnp.mean(jnp.square(prediction - training_target(schedule, latents, noise, t)), axis=(1, 2, 3))
        return jnp.mean(error * min_snr_weights(schedule, t, c.snr_gamma)) if c.snr_gamma else jnp.mean(error)

    def batch_fn(step):
        rng = np.random.default_rng([config.seed, 2, step])
        index = rng.integers(0, len(latents), c.batch_size)
        variant = variant_choice(config, rng, c.batch_size)
        return {"latents": latents[index], "ids": ids[variant, index]}

    params = fit("unet", params, loss_fn, batch_fn, steps=c.steps, learning_rate=c.learning_rate,
                 warmup=config.warmup_steps, seed=config.seed + 2, ema_decay=c.ema_decay, **fit_options)
    return (nnx.merge(graphdefs["text_encoder"], params["text_encoder"]),
            nnx.merge(graphdefs["unet"], params["unet"]))


# ------------------------------------------------------------------------------------------------------------
# Writing the diffusers folder (all parts into a temporary folder, then one rename).
# ------------------------------------------------------------------------------------------------------------

def write_model_folder(output: Path, configs: dict[str, dict], modules: dict[str, nnx.Module], tokenizer_folder: Path,
                       extra_files: dict[str, str]) -> Path:
    output = Path(output)
    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1",
             "feature_extractor": [None, None], "safety_checker": [None, None], "requires_safety_checker": False,
             "image_encoder": [None, None],
             "scheduler": ["diffusers", configs["scheduler"]["_class_name"]],
             "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}
    with atomic_folder(output, replace=True) as temporary:  # a rerun replaces the model folder
        (temporary / "model_index.json").write_text(json.dumps(index, indent=2))
        (temporary / "scheduler").mkdir()
        (temporary / "scheduler" / "scheduler_config.json").write_text(json.dumps(configs["scheduler"], indent=2))
        shutil.copytree(tokenizer_folder, temporary / "tokenizer")
        for name, module in modules.items():
            (temporary / name).mkdir()
            (temporary / name / "config.json").write_text(json.dumps(configs[name], indent=2))
            export.write_module_weights(temporary / name, name, module)
        for name, text in extra_files.items():
            (temporary / name).write_text(text)
    return output


# ------------------------------------------------------------------------------------------------------------
# The whole job.
# ------------------------------------------------------------------------------------------------------------

def check_config(config: ml_collections.ConfigDict) -> None:
    if not isinstance(config.cpu_devices, int) or config.cpu_devices < 1:
        raise UserError(f"--config.cpu_devices={config.cpu_devices!r} must be a positive integer")
    for stage in ("vae", "unet"):
        if config[stage].batch_size % jax.device_count():
            raise UserError(f"--config.{stage}.batch_size={config[stage].batch_size} must be a multiple of the "
                            f"{jax.device_count()} devices it is split over")


def pretrain(config: ml_collections.ConfigDict, output: Path, *, progress: bool = True,
             checkpoint_every: int = 500) -> Path:
    """Writes the model folder `output`. Training state is checkpointed in its sibling `NAME.checkpoints` (every
    `checkpoint_every` steps; removed once the folder is written): a killed run, rerun, goes on from there."""
    output = Path(output)
    check_config(config)
    started = time.perf_counter()
    configs = folder_configs(config)
    modules = build_modules(configs, config.seed)
    reused, reused_curve = reused_vae(Path(config.vae_from), config) if config.vae_from else (None, [])
    # Claimed once the settings are known to be good, so that a mistyped run leaves no folder behind.
    checkpoints = output.with_name(output.name + ".checkpoints")
    # One run per output: the lock lives in the checkpoints folder, and is given back before that is removed.
    with ckpt.workdir_lock(checkpoints, "toy-world pretraining run"):
        claim_checkpoints(checkpoints, config)
        curves: list[dict] = []
        fit_options = dict(log=curves.append, progress=progress, checkpoints=checkpoints,
                           checkpoint_every=checkpoint_every)

        tokenizer_folder = output.with_name(output.name + ".tokenizer.tmp")
        tokens.write_clip_tokenizer(tokenizer_folder, tokens.clip_bpe_merges(CLIP_BPE),
                                    model_max_length=config.text_encoder.max_length)
        tokenizer = tokens.load_tokenizer(tokenizer_folder)

        scenes = world.sample_scenes(config.seed, config.pool_size, styles=world.SEEN_STYLES,
                                     two_shape_share=config.two_shape_share)
        images = world.render_batch(scenes, size=config.resolution)
        curves.append({"stage": "render", "images": len(images), "seconds": round(time.perf_counter() - started, 1)})

        if reused is not None:
            vae = reused
            curves += [{"stage": "vae", "reused": str(config.vae_from)}, *reused_curve]
        else:
            vae = train_vae(modules["vae"], images, config, **fit_options)
        make_deterministic(vae)
        latents = np.split(encode_pool(vae, images), 2, axis=-1)[0]  # the pinned posterior's means
        scaling_factor = float(1.0 / latents.std())
        configs["vae"]["scaling_factor"] = scaling_factor
        vae.config = VAEConfig.from_dict(configs["vae"])

        schedule = NoiseSchedule.from_config(configs["scheduler"])
        text_encoder, unet = train_denoiser(modules["text_encoder"], modules["unet"], latents,
                                            caption_variants(tokenizer, scenes), scaling_factor, schedule, config,
                                            **fit_options)
        curves.append({"stage": "done", "seconds": round(time.perf_counter() - started, 1)})
        log_text = "".join(json.dumps(row) + "\n" for row in curves)
        summary = {"config": config.to_dict(), "scaling_factor": scaling_factor, "jax": jax.__version__,
                   "devices": [str(d) for d in jax.devices()], "seconds": round(time.perf_counter() - started, 1),
                   # Where this run went on from an interrupted one's checkpoints (`seconds` is this run's alone).
                   "resumed_at": {row["resumed"]: row["step"] for row in curves if row["stage"] == "resumed"}}
        write_model_folder(output, configs, {"vae": vae, "text_encoder": text_encoder, "unet": unet},
                           tokenizer_folder, {"pretrain_log.jsonl": log_text,
                                              "pretrain.json": json.dumps(summary, indent=2, default=list)})
        shutil.rmtree(tokenizer_folder, ignore_errors=True)
    shutil.rmtree(checkpoints, ignore_errors=True)
    return output
