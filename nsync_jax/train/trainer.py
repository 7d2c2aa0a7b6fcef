"""Learning a style: one trainer for every method and trainable, which it is given as values.

Read top to bottom: check the config and read the data, load the frozen model, split off what is trained,
cache the VAE posteriors, build the optimizer and the jitted step, restore a checkpoint if the workdir has one,
loop, write the run's files. The method (`methods/`: Textual Inversion, NSYNC, DreamArtist, StyleForge) gives
the data of each step, the gradient function and the optimizer's transformations; the trainable
(`trainables/`: token rows, LoRA, full weights) gives what is trained, its sharding and its files. Neither
is named here.

Every step is one pure function `train_step(trained, opt_state, frozen, batch, key)` under `jax.jit`
(`step.make_train_step`): the frozen model is an argument, what is trained and its optimizer state are donated,
and the step's randomness is `fold_in(key(seed), step)`. Which examples a step uses is a function of
`(seed, step)` as well, so a run resumed from a checkpoint continues exactly as the uninterrupted run would have.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

from nsync_jax import checkpoints, distributed
from nsync_jax.errors import UserError
from nsync_jax.pipeline import load_pipeline
from nsync_jax.sampling import SampleSettings
from nsync_jax.schedulers import NoiseSchedule
from nsync_jax.sdxl import StableDiffusionXL, time_ids
from nsync_jax.train import methods, outputs, trainables
from nsync_jax.train.config import check_config, with_defaults
from nsync_jax.train.step import StepSpec, make_train_step


@dataclasses.dataclass(frozen=True)
class TrainResult:
    """What a finished run trained and wrote."""

    trained: Any  # float32 numpy: the token rows `(rows, width)`, or `{component: {path: array}}`
    files: list[Path]  # the files for the PyTorch world in the workdir (embeddings, LoRA); none for full weights
    checkpoints: Path
    step: int
    export_formats: tuple[str, ...]  # what `export_run` can write from the checkpoints


def make_optimizer(config, method: methods.Method) -> optax.GradientTransformationExtraArgs:
    """AdamW (torch's defaults, the learning rate scaled by the batch with train.scale_lr) with the method's
    gradient transformations around it."""
    learning_rate = config.train.learning_rate * (config.train.batch_size if config.train.scale_lr else 1)
    adamw = optax.adamw(learning_rate, b1=0.9, b2=0.999, eps=1e-8, weight_decay=config.train.weight_decay)
    return method.optimizer(config, adamw)


def run_metadata(config, method: methods.Method, trainable: trainables.Trainable, step: int) -> dict[str, Any]:
    """What the exported files of a run record (diffusers' and A1111's readers ignore the keys they do not know)."""
    metadata = {"base_model": str(config.model), "token": config.placeholder_token,
                "num_vectors": config.num_vectors, "initializer_token": config.initializer_token, "step": step,
                "method": config.method}
    if config.vae:  # the VAE the run encoded and sampled with, in place of the base model's
        metadata.update(vae=str(config.vae))
    if config.train.max_timestep:  # sample with the base model at and above it (--handoff-timestep)
        metadata.update(handoff_timestep=config.train.max_timestep)
    return {**metadata, **trainable.metadata(config), **method.metadata(config)}


def training_time_ids(config) -> tuple[float, ...]:
    """SDXL's micro-conditioning of the training images, as the released SDXL scripts: squashed to a square of
    `data.resolution`, so original and target size are the resolution and the crop is (0, 0)."""
    size = (config.data.resolution,) * 2
    return tuple(float(x) for x in time_ids(size, (0, 0), size))


# ------------------------------------------------------------------------------------------------------------
# The training loop.
# ------------------------------------------------------------------------------------------------------------

def train(config: ml_collections.ConfigDict, workdir: Path, *, progress: bool = True) -> TrainResult:
    """Trains what `config.trainable` names with `config.method`; resumes from `workdir/checkpoints` if present."""
    check_config(config)
    method, trainable = methods.get(config.method), trainables.get(config.trainable).configured(config)
    workdir = Path(workdir)
    dataset = method.read_data(config)

    # --- the frozen model, what is trained, the data ---
    dtype = jnp.dtype(config.train.dtype)
    pipe = load_pipeline(config.model, dtype=dtype, param_dtype=trainable.load_dtype,
                         revision=config.model_revision or None, variant=config.model_variant or None,
                         model_config=config.model_config or None,
                         vae=config.vae or None, allow_sdxl=True)
    sdxl = isinstance(pipe, StableDiffusionXL)
    trainable = trainable.for_model(sdxl, config, method)
    table_rows = pipe.text_encoder.embeddings.token_embedding.embedding.shape[0]
    if len(pipe.tokenizer) != table_rows:
        raise UserError(f"{config.model}: tokenizer has {len(pipe.tokenizer)} tokens, the text encoder "
                        f"{table_rows} embedding rows")
    graphdefs, frozen, initial = trainable.split(pipe, config, method, method.frozen_modules(config))
    data = method.prepare(pipe, dataset, config, workdir, progress)
    workdir.mkdir(parents=True, exist_ok=True)  # only after the data and the model passed their checks
    with checkpoints.workdir_lock(workdir, "training run"):  # one run per workdir

        # --- mesh, shardings and the jitted step ---
        mesh = distributed.make_mesh(config.mesh.data, config.mesh.fsdp)
        accum = config.train.grad_accum_steps
        if config.train.batch_size % (accum * distributed.batch_size_of(mesh)):
            raise UserError(f"config train.batch_size={config.train.batch_size} must be a multiple of the "
                            f"{distributed.batch_size_of(mesh)} devices of the mesh times "
                            f"train.grad_accum_steps={accum}")
        whole = distributed.replicated(mesh)
        batch_sharding = distributed.batch_sharded(mesh, batch_axis=1)  # batch arrays are (groups, batch, ...)
        frozen_sharding = distributed.frozen_shardings(mesh, frozen, config.mesh.shard_frozen_weights)
        frozen = distributed.put_tree(frozen, frozen_sharding)
        schedule = NoiseSchedule.from_config(pipe.scheduler_config, pipe.folder / "scheduler" / "scheduler_config.json")
        if config.train.max_timestep > schedule.num_train_timesteps:
            raise UserError(f"config train.max_timestep={config.train.max_timestep} is above the model's "
                            f"{schedule.num_train_timesteps} training timesteps")
        spec = StepSpec(graphdefs=graphdefs, schedule=schedule, scaling_factor=pipe.vae.config.scaling_factor,
                        compute_dtype=dtype, clip_skip=config.clip_skip, trainable=trainable, remat=config.train.remat,
                        max_timestep=config.train.max_timestep, time_ids=training_time_ids(config) if sdxl else ())
        tx = make_optimizer(config, method)
        trained_sharding = trainable.shardings(mesh, initial)
        opt_sharding = trainable.shardings(mesh, jax.eval_shape(tx.init, initial))
        trained = distributed.put_tree(initial, trained_sharding, copy=True)  # donated: not the modules' arrays
        step_fn = jax.jit(make_train_step(method.gradients(spec, config), tx, norm_metric=trainable.norm_metric,
                                          skip_nonfinite=config.train.nonfinite == "skip", grad_accum_steps=accum),
                          in_shardings=(trained_sharding, opt_sharding, frozen_sharding, batch_sharding, whole),
                          out_shardings=(trained_sharding, opt_sharding, whole), donate_argnums=(0, 1))
        init_opt_state = jax.jit(tx.init, out_shardings=opt_sharding)
        opt_state = init_opt_state(trained)

        # --- resume ---
        manager = checkpoints.manager(workdir / "checkpoints", keep=config.checkpoint.keep)
        start = 0
        if manager.latest_step() is not None:
            start = manager.latest_step()
            restored, _ = checkpoints.restore(manager, start,
                                              {trainable.checkpoint_key: trained, "opt_state": opt_state})
            trained, opt_state = restored[trainable.checkpoint_key], restored["opt_state"]

        # --- loop ---
        key = jax.random.key(config.train.seed)
        main = distributed.is_main_process()  # only process 0 writes metrics and exports; checkpoints are collective
        metrics_log = outputs.MetricsLog(workdir, enabled=main)
        preview = Preview(pipe, config, method, trainable, data.preview_prompts) if config.train.sample_every_steps \
            else None
        bar = tqdm(total=config.train.steps, initial=start, unit="step", disable=not (progress and main))
        last_time, last_step = time.perf_counter(), start
        with checkpoints.stop_on_sigterm() as stop_requested:
            try:
                for step in range(start, config.train.steps):
                    if step in data.optimizer_restarts:
                        opt_state = init_opt_state(trained)
                    batch = {k: distributed.put(v, batch_sharding) for k, v in data.batch(step).items()}
                    if step == start:
                        step_fn = distributed.compile_together(step_fn, trained, opt_state, frozen, batch, key,
                                                               name="train_step")
                    new_trained, new_opt_state, metrics = step_fn(trained, opt_state, frozen, batch,
                                                                  jax.random.fold_in(key, step))
                    metrics = {k: float(distributed.to_host(v)) for k, v in metrics.items()}
                    finite = all(np.isfinite(v) for v in metrics.values())
                    if not finite and config.train.nonfinite == "stop":
                        raise UserError(f"non-finite loss or gradient at step {step + 1} ({metrics}); the last good "
                                        f"checkpoint is step {manager.latest_step()} (train.nonfinite=skip skips such "
                                        "steps instead)")
                    trained, opt_state = new_trained, new_opt_state  # a non-finite step left them unchanged (skip)
                    metrics["skipped"] = int(not finite)
                    done = step + 1
                    bar.update(1)
                    if done % config.train.log_every_steps == 0 or done == config.train.steps:
                        now = time.perf_counter()
                        metrics.update(step=done, steps_per_sec=(done - last_step) / (now - last_time))
                        last_time, last_step = now, done
                        metrics_log.write(metrics)
                        bar.set_postfix(loss=f"{metrics['loss']:.4f}")
                    if preview and done % config.train.sample_every_steps == 0:
                        preview.draw(trained, workdir / "samples" / f"step_{done:06d}.png" if main else None)
                    stopping = distributed.any_process(bool(stop_requested))
                    if done % config.checkpoint.every_steps == 0 or done == config.train.steps or stopping:
                        checkpoints.save(manager, done, {trainable.checkpoint_key: trained, "opt_state": opt_state},
                                         {"step": done, "config": config.to_dict(), "sdxl": sdxl})
                    if stopping:
                        stop_requested.append(True)
                        break
            finally:
                manager.wait_until_finished()
                metrics_log.close()
                bar.close()

        if stop_requested:
            raise UserError(f"stopped by SIGTERM after step {manager.latest_step()}; the checkpoint is saved in "
                            f"{workdir / 'checkpoints'}: run the same command again to resume")
        final = trainable.to_host(trained)
        files = []
        if main:
            metadata = run_metadata(config, method, trainable, config.train.steps)
            files = trainable.write_outputs(workdir, config, method, final, metadata)
        return TrainResult(final, files, workdir / "checkpoints", config.train.steps, trainable.export_formats)


class Preview:
    """Sample grids of the first `sample.count` training prompts, drawn with what is trained so far; the same
    noise every time, so grids of successive steps differ only by what was learned."""

    def __init__(self, pipe, config, method: methods.Method, trainable: trainables.Trainable, prompts: list[str]):
        sample = config.sample
        self.pipe, self.trainable, self.seed = pipe, trainable, sample.seed
        self.prompts = prompts[:sample.count]
        self.negative_prompt = method.preview_negative_prompt(config)
        # Weights trained below train.max_timestep are previewed as they will be sampled: the base model (a copy
        # taken before any step) draws the timesteps above it. Token rows need no copy: the base is the same model.
        handoff = config.train.max_timestep if trainable.trains_modules else 0
        self.base = (dataclasses.replace(pipe, text_encoder=nnx.clone(pipe.text_encoder), unet=nnx.clone(pipe.unet))
                     if handoff else None)
        self.settings = SampleSettings(scheduler=sample.scheduler, steps=sample.steps, guidance=sample.guidance,
                                       height=config.data.resolution, width=config.data.resolution,
                                       clip_skip=config.clip_skip,
                                       batch_size=-(-len(self.prompts) // jax.device_count()),  # per device
                                       handoff_timestep=handoff)

    def draw(self, trained, path: Path | None) -> None:
        """Every process draws (sampling is a collective over the mesh); process 0 writes `path`."""
        self.trainable.show(self.pipe, trained)
        outputs.write_sample_grid(path, self.pipe, self.prompts, self.settings, self.seed, self.negative_prompt,
                                  base=self.base)


# ------------------------------------------------------------------------------------------------------------
# Exporting a checkpoint.
# ------------------------------------------------------------------------------------------------------------

def export_run(workdir: Path, output: Path, fmt: str, step: int | None = None) -> str:
    """Writes a checkpoint of a run (the latest when `step` is None) in format `fmt` (the trainable's
    `export_formats`: embeddings for diffusers or A1111, LoRA files, a diffusers pipeline folder); returns a line
    saying what it wrote."""
    workdir = Path(workdir)
    state, meta = checkpoints.read(workdir / "checkpoints", step)
    config = with_defaults(meta["config"])
    method, trainable = methods.get(config.method), trainables.get(config.trainable).configured(config)
    trainable = trainable.for_model(meta.get("sdxl", False), config, method)
    if fmt not in trainable.export_formats:
        raise UserError(f"{workdir}: the run trained trainable={trainable.name!r}: export it with --format "
                        f"{' or '.join(trainable.export_formats)}, not {fmt}")
    trained = state[trainable.checkpoint_key]
    return trainable.export(Path(output), fmt, config, method, trained,
                            run_metadata(config, method, trainable, meta["step"]), source=workdir)
