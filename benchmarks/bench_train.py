"""Training steps per second: the fused NSYNC step against its alternatives, same machine, same model, same run.

  * nsync-jax fused NSYNC step: positive, negative and anchor groups in one pass (B triples);
  * nsync-jax NSYNC as three separate gradient passes (the same update, computed the slow way);
  * nsync-jax Textual Inversion step at 3x the batch (the same number of images through the UNet);
  * nsync-jax DreamArtist step on B images (the negative and the positive word's prompts: 2B through the UNet;
    the extension's 3 + 6 vectors, no reconstruction), and Textual Inversion at 2x the batch to compare with;
  * PyTorch, the released NSYNC algorithm on diffusers modules: three forward/backward passes with
    accumulating gradients, the VAE re-encoding every image every step, AdamW on the whole embedding table.

  python benchmarks/bench_train.py --preset tiny
  python benchmarks/bench_train.py --preset small --resolution 128
  python benchmarks/bench_train.py --preset sd15 --resolution 512 --dtype bfloat16 --skip-dreamartist   # GPU

On a GPU the PyTorch run follows diffusers' Textual Inversion script: frozen UNet and VAE in float16 (for
`--dtype bfloat16`), the text encoder in float32, the step under autocast.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from bench_sampling import PRESETS, pipeline_folder  # noqa: E402
from results_file import publish  # benchmarks/ is on sys.path when run as a script

PRESETS = {"tiny": None, **PRESETS}


def median_rate(fn, steps: int, repeats: int) -> float:
    """Median steps/second over `repeats` runs of `steps` steps, after one warm-up step (printed with its time,
    which includes compilation)."""
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(steps):
            fn()
        rates.append(steps / (time.perf_counter() - start))
    print(f"  first step {first:.2f} s, median {statistics.median(rates):.3f} steps/s", flush=True)
    return statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=PRESETS, default="tiny")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--batch", type=int, default=2, help="triples per NSYNC step")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="nsync-jax compute dtype (trainable rows and Adam state stay float32)")
    parser.add_argument("--skip-dreamartist", action="store_true", help="leave out the DreamArtist rows")
    parser.add_argument("--model-dir", type=Path, help="build the random pipeline here, or reuse the one there")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()

    import jax
    import jax.numpy as jnp
    import optax
    import torch
    from flax import nnx

    from conftest import build_tiny_pipeline, write_tiny_tokenizer
    from nsync_jax import tokens
    from nsync_jax.data.style_dataset import StyleDataset
    from nsync_jax.pipeline import load_pipeline
    from nsync_jax.schedulers import NoiseSchedule
    from nsync_jax.train import data as train_data
    from nsync_jax.train import methods, trainables
    from nsync_jax.train.config import default_config
    from nsync_jax.train.step import StepSpec, denoising_losses, group_keys, make_train_step
    from nsync_jax.train.trainer import make_optimizer

    torch.set_num_threads(os.cpu_count())
    on_gpu = jax.default_backend() == "gpu"
    torch_device = "cuda" if on_gpu and torch.cuda.is_available() else "cpu"
    # diffusers' scripts train in float16 where nsync-jax uses bfloat16
    half = torch.float16 if torch_device == "cuda" and args.dtype == "bfloat16" else torch.float32
    dtype = jnp.dtype(args.dtype)
    rows_out = []

    def record(name: str, unet_images: int, fn) -> None:
        print(name, flush=True)
        rows_out.append((name, unet_images, median_rate(fn, args.steps, args.repeats)))

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.preset == "tiny":
            folder = build_tiny_pipeline(tmp / "model", write_tiny_tokenizer(tmp / "tok"), "sd1")
        else:
            folder = pipeline_folder(args.preset, args.model_dir or tmp)
        rng = np.random.default_rng(0)
        count, res, batch = 8, args.resolution, args.batch
        images = rng.uniform(-1, 1, (count, res, res, 3)).astype(np.float32)
        negatives = rng.uniform(-1, 1, (count, res, res, 3)).astype(np.float32)
        token = "<style>"

        # --- nsync-jax ------------------------------------------------------------------------------------
        pipe = load_pipeline(folder, dtype=dtype)
        table = np.asarray(pipe.text_encoder.embeddings.token_embedding.embedding[...], np.float32)
        initial = tokens.initial_rows(table, pipe.tokenizer, "painting", 1)
        tokens.add_placeholder_tokens(pipe.tokenizer, token, 1)
        dataset = StyleDataset(stems=tuple(map(str, range(count))), positives=images, negatives=negatives,
                               captions=("a red star",) * count)
        data = train_data.prepare(pipe, dataset, default_config(), token)
        graphdefs, frozen = {}, {}
        for name in ("text_encoder", "unet"):
            graphdefs[name], frozen[name] = nnx.split(pipe.modules()[name])
        spec = StepSpec(graphdefs, NoiseSchedule.from_config(pipe.scheduler_config),
                        pipe.vae.config.scaling_factor, dtype, 0)
        nsync, textual_inversion = methods.get("nsync"), methods.get("textual_inversion")
        config = default_config()
        config.train.batch_size = batch
        tx_nsync = make_optimizer(config, nsync)
        tx_ti = make_optimizer(config, textual_inversion)

        def step_batches(method, data, config, batch_size):
            """The method's batches of steps 0-3 at `batch_size` (the optimizer's learning rate stays `config`'s)."""
            sized = config.copy_and_resolve_references()
            sized.train.batch_size = batch_size
            return [method.batch(data, sized, i) for i in range(4)]

        def runner(method, tx, batch_size, data=data, initial=initial, config=config):
            step = jax.jit(make_train_step(method.gradients(spec, config), tx,
                                           norm_metric=trainables.EMBEDDINGS.norm_metric), donate_argnums=(0, 1))
            state = {"rows": jnp.asarray(initial), "opt": tx.init(jnp.asarray(initial)), "i": 0}
            batches = step_batches(method, data, config, batch_size)

            def run():
                state["rows"], state["opt"], metrics = step(state["rows"], state["opt"], frozen,
                                                            batches[state["i"] % 4], jax.random.key(state["i"]))
                jax.block_until_ready(metrics)
                state["i"] += 1
            return run

        def separate_runner():
            tx = tx_nsync
            grad = jax.jit(jax.grad(lambda r, ids, mean, logvar, key: denoising_losses(
                spec, r[None], frozen, ids[None], mean[None], logvar[None], key[None]).sum()))
            update = jax.jit(lambda rows, opt, gp, gn, ga: (lambda u, o: (optax.apply_updates(rows, u), o))(
                *tx.update(gp, opt, rows, negative_grads=gn, anchor_grads=ga)))
            state = {"rows": jnp.asarray(initial), "opt": tx.init(jnp.asarray(initial)), "i": 0}
            batches = step_batches(nsync, data, config, batch)

            def run():
                b = batches[state["i"] % 4]
                keys = group_keys(jax.random.key(state["i"]), 3, False)
                g = [grad(state["rows"], b["ids"][k], b["mean"][k], b["logvar"][k], keys[k]) for k in range(3)]
                state["rows"], state["opt"] = update(state["rows"], state["opt"], *g)
                jax.block_until_ready(state["rows"])
                state["i"] += 1
            return run

        # (row, images through the UNet per step, steps/s)
        record("nsync-jax NSYNC fused", 3 * batch, runner(nsync, tx_nsync, batch))
        record("nsync-jax NSYNC three passes", 3 * batch, separate_runner())
        record("nsync-jax Textual Inversion, 3x batch", 3 * batch, runner(textual_inversion, tx_ti, 3 * batch))
        if not args.skip_dreamartist:
            # DreamArtist: the same frozen weights, a tokenizer of its own with `<style>` (3) and `<style>-neg` (6).
            dreamartist = methods.get("dreamartist")
            da_config = default_config()
            da_config.method, da_config.placeholder_token, da_config.num_vectors = "dreamartist", token, 3
            da_pipe = load_pipeline(folder, dtype=dtype)
            da_initial = dreamartist.initial_rows(da_config, table, da_pipe.tokenizer)
            dreamartist.add_words(da_pipe.tokenizer, da_config)
            da_data = train_data.prepare(da_pipe, dataset, da_config, token,
                                         negative_word=dreamartist.negative_word(da_config))
            record("nsync-jax DreamArtist (3 + 6 vectors)", 2 * batch,
                   runner(dreamartist, make_optimizer(da_config, dreamartist), batch, da_data, da_initial, da_config))
            record("nsync-jax Textual Inversion, 2x batch", 2 * batch, runner(textual_inversion, tx_ti, 2 * batch))
        pipe = frozen = None  # frees the JAX models before the PyTorch run

        # --- PyTorch: the released NSYNC algorithm on diffusers modules ---------------------------------------
        from diffusers import StableDiffusionPipeline

        tpipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None).to(torch_device)
        tpipe.unet.to(half)
        tpipe.vae.to(half)
        tpipe.tokenizer.add_tokens(token)
        tpipe.text_encoder.resize_token_embeddings(len(tpipe.tokenizer), mean_resizing=False)
        embedding = tpipe.text_encoder.get_input_embeddings().weight
        for module in (tpipe.vae, tpipe.unet, tpipe.text_encoder):
            module.requires_grad_(False)
        embedding.requires_grad_(True)
        optimizer = torch.optim.AdamW([embedding], lr=1e-3)
        ids = tpipe.tokenizer([f"a red star in the style of {token}"] * batch, padding="max_length",
                              max_length=tpipe.tokenizer.model_max_length, return_tensors="pt").input_ids
        ids = ids.to(torch_device)
        scheduler = tpipe.scheduler
        alphas = torch.tensor(NoiseSchedule.from_config(dict(scheduler.config)).alphas_cumprod, device=torch_device)
        t_images, t_negatives = (torch.from_numpy(x).permute(0, 3, 1, 2).to(torch_device, half)
                                 for x in (images, negatives))

        def torch_loss(pixels):
            latents = tpipe.vae.encode(pixels).latent_dist.sample() * tpipe.vae.config.scaling_factor
            noise = torch.randn_like(latents)
            t = torch.randint(0, len(alphas), (len(latents),), device=torch_device)
            a = alphas[t].view(-1, 1, 1, 1)
            noisy = (a.sqrt() * latents + (1 - a).sqrt() * noise).to(half)
            with torch.autocast(torch_device, dtype=half, enabled=half != torch.float32):
                context = tpipe.text_encoder(ids)[0]
                prediction = tpipe.unet(noisy, t, context.to(half)).sample
            return torch.nn.functional.mse_loss(prediction.float(), noise.float())

        def torch_step():
            index = torch.randint(0, count, (batch,))
            anchor = torch.randint(0, count, (batch,))
            snapshots = []
            for pixels in (t_images[index], t_negatives[index], t_images[anchor]):
                torch_loss(pixels).backward()  # no zero_grad in between, as released
                snapshots.append(embedding.grad.clone())
            g1, g2 = snapshots[0], snapshots[1]
            proj = lambda a, b: (a * b).sum() / (b * b).sum() * b
            embedding.grad = g1 + proj(g1, g1) - proj(g1, g2)
            optimizer.step()
            optimizer.zero_grad()
            if torch_device == "cuda":
                torch.cuda.synchronize()

        record("PyTorch released NSYNC (diffusers modules)", 3 * batch, torch_step)

    rates = {name: rate for name, _, rate in rows_out}
    fused = rates["nsync-jax NSYNC fused"]
    lines = [
        f"\n## {datetime.date.today()} training steps, `bench_train.py {' '.join(sys.argv[1:]) or '(defaults)'}`\n",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, JAX backend "
        f"{jax.default_backend()} ({jax.devices()[0].device_kind}), nsync-jax compute {args.dtype}; torch "
        f"{torch.__version__} on {torch_device}, {str(half).removeprefix('torch.')} UNet and VAE. "
        f"Preset {args.preset}, "
        f"{args.resolution}x{args.resolution}, {args.batch} triples per NSYNC step, {args.batch} images per "
        f"DreamArtist step. Medians of {args.repeats} runs of {args.steps} steps after a warm-up step.\n",
        "| step | UNet images per step | steps/s | fused NSYNC steps/s over this row |",
        "|---|---|---|---|",
    ]
    for name, unet_images, rate in rows_out:
        lines.append(f"| {name} | {unet_images} | {rate:.3f} | {fused / rate:.2f}x |")
    if not args.skip_dreamartist:
        dreamartist_ratio = (rates["nsync-jax DreamArtist (3 + 6 vectors)"]
                             / rates["nsync-jax Textual Inversion, 2x batch"])
        lines.append(f"\nDreamArtist steps/s over Textual Inversion steps/s at the same UNet batch: "
                     f"{dreamartist_ratio:.2f}x")
    report = "\n".join(lines) + "\n"
    publish(report, write=not args.no_write)


if __name__ == "__main__":
    main()
