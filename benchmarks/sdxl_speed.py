"""Stable Diffusion XL speed: sampling (Euler with guidance, images/s) and the NSYNC training step (steps/s),
nsync-jax against diffusers' `StableDiffusionXLPipeline` and the released SDXL NSYNC loop, same machine, same run.

  * sampling: `--steps` Euler steps with guidance `--guidance` and the VAE decode, `--batch` images a call, from
    the same initial latents; nsync-jax in `--dtype`, diffusers in float16 on a GPU (float32 on a CPU);
  * NSYNC step, `--triples` triples: nsync-jax's fused step as `trainer.train` builds it with
    configs/nsync_sdxl.py (both encoders' rows, variant released, remat), from cached posteriors; against the
    inner step of the released SDXL loop (giddyyupp/NSYNC f12f84f, `src/contrastive_training_sdxl.py`) on diffusers
    modules, written out below as released: every pass tokenizes the prompts with both tokenizers, encodes the
    images with the VAE, adds noise with the pipeline's Euler scheduler, runs both text encoders (penultimate
    states, pooled projection) and the UNet with gradient checkpointing, and backpropagates its own loss into the
    accumulating gradients of both embedding tables (positive, negative, anchor: three passes); then, per encoder,
    the placeholder row's update g_p + proj(g_p, g_p) - proj(g_p, g_p + g_n) (the second snapshot holds the
    accumulated gradient, as released), every other row zeroed, AdamW over both whole tables. Weights in
    bfloat16 on a GPU (the released `torch_dtype`, VAE included), float32 on a CPU.

The random SDXL of `--preset` (sdxl_models.py; `base` is SDXL base's architecture) is built once; the PyTorch rows
run in a child process first, then the nsync-jax rows in this one, so each has the device to itself (JAX is not
started before the child ends). Medians of `--repeats` runs after one warm-up (its time, compilation included,
is reported). Appends its report to benchmarks/history/ unless `--no-write`.

  python benchmarks/sdxl_speed.py --preset base --resolution 1024 --dtype bfloat16        # GPU
  python benchmarks/sdxl_speed.py --preset tiny --resolution 64 --steps 2 --train-steps 1   # CPU
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_sampling import timed  # noqa: E402
from bench_train import median_rate  # noqa: E402
from results_file import publish  # noqa: E402  benchmarks/ is on sys.path when run as a script
from sdxl_models import PRESETS, nsync_config, nsync_step, pipeline_folder, sdxl_trainable  # noqa: E402

PROMPT = "a red star and a blue circle in the style of painting"
TOKEN, INITIALIZER = "<style>", "painting"  # a word of the tests' tokenizer
IMAGES = 4  # training images (and as many negatives) the steps draw from


def first_and_rate(fn, steps: int, repeats: int) -> tuple[float, float]:
    """(seconds of the first call, compilation included; median steps/s after it)."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start, median_rate(fn, steps, repeats)


def inputs(args, folder: Path) -> dict[str, np.ndarray]:
    """The initial latents of the sampling rows (NCHW) and the training images and negatives (NHWC in [-1, 1])."""
    vae = json.loads((folder / "vae" / "config.json").read_text())
    rng = np.random.default_rng(0)
    res = args.resolution
    side = res // 2 ** (len(vae["block_out_channels"]) - 1)
    return {"latents": rng.standard_normal((args.batch, vae["latent_channels"], side, side)).astype(np.float32),
            "images": rng.uniform(-1, 1, (IMAGES, res, res, 3)).astype(np.float32),
            "negatives": rng.uniform(-1, 1, (IMAGES, res, res, 3)).astype(np.float32)}


# ------------------------------------------------------------------------------------------------------------
# PyTorch (the child process).
# ------------------------------------------------------------------------------------------------------------

def peer_rows(args, folder: Path) -> dict:
    import torch
    from diffusers import StableDiffusionXLPipeline

    torch.set_num_threads(os.cpu_count())
    device = "cuda" if torch.cuda.is_available() else "cpu"
    sync = torch.cuda.synchronize if device == "cuda" else lambda: None
    data, rows = inputs(args, folder), {"device": device, "torch": torch.__version__}

    if "sampling" in args.parts:
        half = torch.float16 if device == "cuda" else torch.float32
        pipe = StableDiffusionXLPipeline.from_pretrained(folder, dtype=half).to(device)
        pipe.set_progress_bar_config(disable=True)
        latents = torch.tensor(data["latents"], dtype=half, device=device)

        def sample():
            pipe([PROMPT] * args.batch, num_inference_steps=args.steps, guidance_scale=args.guidance,
                 height=args.resolution, width=args.resolution, latents=latents, output_type="np")
        rows["sampling"] = timed(sample, args.repeats)
        rows["sampling_dtype"] = str(half).removeprefix("torch.")
        del pipe
        if device == "cuda":
            torch.cuda.empty_cache()

    if "train" in args.parts:
        weight_dtype = torch.bfloat16 if device == "cuda" else torch.float32
        step = released_nsync_step(folder, data, args, device, weight_dtype, sync)
        rows["train"] = first_and_rate(step, args.train_steps, args.repeats)
        rows["train_dtype"] = str(weight_dtype).removeprefix("torch.")
    return rows


def released_nsync_step(folder: Path, data: dict, args, device: str, weight_dtype, sync):
    """One step of the released SDXL NSYNC loop (v4.2: positive, negative, anchor) as a function of no arguments."""
    import torch
    import torch.nn.functional as F
    from diffusers import StableDiffusionXLPipeline

    base = StableDiffusionXLPipeline.from_pretrained(folder, dtype=weight_dtype)
    tok1, tok2, te1, te2 = base.tokenizer, base.tokenizer_2, base.text_encoder, base.text_encoder_2
    unet, vae, scheduler = base.unet, base.vae, base.scheduler
    placeholder_ids = []
    for tokenizer, encoder in ((tok1, te1), (tok2, te2)):
        tokenizer.add_tokens(TOKEN)
        (initializer_id,) = tokenizer.encode(INITIALIZER, add_special_tokens=False)
        placeholder_ids.append(tokenizer.convert_tokens_to_ids(TOKEN))
        encoder.resize_token_embeddings(len(tokenizer))
        table = encoder.get_input_embeddings().weight.data
        table[placeholder_ids[-1]] = table[initializer_id]
    for module in (vae, unet, te1, te2):
        module.requires_grad_(False)
        module.to(device)
    tables = [encoder.get_input_embeddings() for encoder in (te1, te2)]
    for table in tables:
        table.requires_grad_(True)
    te1.gradient_checkpointing_enable()  # the released hyperparameters: gradient_checkpointing True
    te2.gradient_checkpointing_enable()
    unet.enable_gradient_checkpointing()
    optimizer = torch.optim.AdamW([p for table in tables for p in table.parameters()], lr=1e-3)
    vae.to(dtype=weight_dtype).eval()
    unet.to(dtype=weight_dtype).train()
    te1.train()
    te2.train()
    res = args.resolution
    time_ids = torch.tensor([[res, res, 0, 0, res, res]], device=device, dtype=weight_dtype)
    pixels = {name: torch.from_numpy(data[name]).permute(0, 3, 1, 2).to(device) for name in ("images", "negatives")}
    prompts = [f"a red star in the style of {TOKEN}"] * args.triples
    autocast = torch.autocast(device, dtype=weight_dtype, enabled=weight_dtype != torch.float32)

    def pred_noise(pixel_values):
        latents = vae.encode(pixel_values.to(dtype=weight_dtype)).latent_dist.sample().detach()
        latents = latents * vae.config.scaling_factor
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(latents),), device=device).long()
        noisy = scheduler.add_noise(latents, noise, timesteps)
        with autocast:  # accelerate's mixed_precision="bf16" wraps the prepared text encoders' forward
            ids1 = tok1(prompts, padding="max_length", max_length=tok1.model_max_length, truncation=True,
                        return_tensors="pt").input_ids.to(device)
            hidden1 = te1(ids1, output_hidden_states=True).hidden_states[-2]
            ids2 = tok2(prompts, padding="max_length", max_length=tok2.model_max_length, truncation=True,
                        return_tensors="pt").input_ids.to(device)
            out2 = te2(ids2, output_hidden_states=True)
        embeds = torch.cat([hidden1, out2.hidden_states[-2]], dim=-1).to(dtype=weight_dtype)
        cond = {"text_embeds": out2.text_embeds.to(dtype=weight_dtype), "time_ids": time_ids.repeat(len(latents), 1)}
        prediction = unet(noisy, timesteps, embeds, added_cond_kwargs=cond).sample
        return F.mse_loss(prediction, noise, reduction="none").mean([1, 2, 3]).mean()

    def projection(a, b):
        return torch.dot(a.view(-1), b.view(-1)) / torch.dot(b.view(-1), b.view(-1)) * b

    def step():
        index, anchor = torch.randint(0, IMAGES, (args.triples,)), torch.randint(0, IMAGES, (args.triples,))
        snapshots = []
        for batch in (pixels["images"][index], pixels["negatives"][index], pixels["images"][anchor]):
            pred_noise(batch).backward()  # no zero_grad in between, as released
            snapshots.append([table.weight.grad.clone() for table in tables])
        for k, (table, placeholder) in enumerate(zip(tables, placeholder_ids)):
            grads = table.weight.grad
            row = torch.arange(len(grads), device=device) == placeholder
            g_pos, g_neg = snapshots[0][k][row], snapshots[1][k][row]
            grads.data[row] = snapshots[0][k].data[row] + projection(g_pos, g_pos) - projection(g_pos, g_neg)
            grads.data[~row, :] = grads.data[~row, :].fill_(0)
        optimizer.step()
        optimizer.zero_grad()
        sync()
    return step


# ------------------------------------------------------------------------------------------------------------
# nsync-jax (this process, after the child).
# ------------------------------------------------------------------------------------------------------------

def our_rows(args, folder: Path) -> dict:
    import jax
    import jax.numpy as jnp

    from nsync_jax.data.style_dataset import StyleDataset
    from nsync_jax.pipeline import load_pipeline
    from nsync_jax.sampling import SampleSettings, generate

    dtype = jnp.dtype(args.dtype)
    data, rows = inputs(args, folder), {"device": f"{jax.default_backend()} ({jax.devices()[0].device_kind})",
                                "jax": jax.__version__}
    pipe = load_pipeline(folder, dtype=dtype, allow_sdxl=True)
    if "sampling" in args.parts:
        settings = SampleSettings(steps=args.steps, guidance=args.guidance, height=args.resolution,
                                  width=args.resolution, batch_size=args.batch)
        latents = data["latents"].transpose(0, 2, 3, 1)
        rows["sampling"] = timed(lambda: generate(pipe, [PROMPT] * args.batch, settings=settings, latents=latents,
                                                  progress=False), args.repeats)

    if "train" in args.parts:
        config = nsync_config(args.triples, args.resolution, dtype=args.dtype)
        config.placeholder_token, config.initializer_token = TOKEN, INITIALIZER
        method, trainable = sdxl_trainable(config)
        graphdefs, frozen, initial = trainable.split(pipe, config, method, method.frozen_modules(config))
        step_fn, tx = nsync_step(config, graphdefs, pipe.scheduler_config, pipe.vae.config.scaling_factor)
        dataset = StyleDataset(stems=tuple(map(str, range(IMAGES))), positives=data["images"],
                               negatives=data["negatives"], captions=("a red star",) * IMAGES)
        training = method.prepare(pipe, dataset, config, None, False)
        batches = [training.batch(i) for i in range(4)]
        step = jax.jit(step_fn, donate_argnums=(0, 1))
        state = {"rows": jax.tree.map(jnp.asarray, initial), "i": 0}
        state["opt"] = tx.init(state["rows"])

        def run():
            state["rows"], state["opt"], metrics = step(state["rows"], state["opt"], frozen,
                                                        batches[state["i"] % 4], jax.random.key(state["i"]))
            jax.block_until_ready(metrics)
            state["i"] += 1
        rows["train"] = first_and_rate(run, args.train_steps, args.repeats)
        rows["remat"] = bool(config.train.remat)
    return rows


# ------------------------------------------------------------------------------------------------------------
# Report.
# ------------------------------------------------------------------------------------------------------------

def report(args, peer: dict, ours: dict) -> str:
    lines = [
        f"\n## {datetime.date.today()} SDXL speed, `sdxl_speed.py {' '.join(sys.argv[1:]) or '(defaults)'}`\n",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; nsync-jax on "
        f"{ours['device']} (jax {ours['jax']}, {args.dtype}); PyTorch on {peer['device']} (torch {peer['torch']}). "
        f"Preset {args.preset} (random weights), {args.resolution}x{args.resolution}. Medians of {args.repeats} "
        "runs after a warm-up.\n",
        "| what | PyTorch peer | peer | nsync-jax | nsync-jax over peer | first call: nsync-jax / peer (s) |",
        "|---|---|---|---|---|---|",
    ]
    if "sampling" in args.parts:
        (peer_first, peer_s), (our_first, our_s) = peer["sampling"], ours["sampling"]
        lines.append(
            f"| sampling, {args.steps} Euler steps, guidance {args.guidance}, decode, batch {args.batch} | "
            f"diffusers StableDiffusionXLPipeline, {peer['sampling_dtype']} | {args.batch / peer_s:.3f} images/s "
            f"({peer_s:.3f} s) | {args.batch / our_s:.3f} images/s ({our_s:.3f} s) | {peer_s / our_s:.2f}x | "
            f"{our_first:.1f} / {peer_first:.1f} |")
    if "train" in args.parts:
        (peer_first, peer_rate), (our_first, our_rate) = peer["train"], ours["train"]
        lines.append(
            f"| NSYNC step, {args.triples} triples (3 groups), remat {ours['remat']} | released SDXL loop "
            f"(diffusers modules, {peer['train_dtype']}, gradient checkpointing) | {peer_rate:.3f} steps/s | "
            f"{our_rate:.3f} steps/s | {our_rate / peer_rate:.2f}x | {our_first:.1f} / {peer_first:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=PRESETS, default="tiny")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--parts", nargs="+", choices=("sampling", "train"), default=["sampling", "train"])
    parser.add_argument("--batch", type=int, default=1, help="images a sampling call")
    parser.add_argument("--steps", type=int, default=30, help="Euler steps a sampling call")
    parser.add_argument("--guidance", type=float, default=5.0, help="SDXL's default")
    parser.add_argument("--triples", type=int, default=2, help="triples an NSYNC step")
    parser.add_argument("--train-steps", type=int, default=3, help="NSYNC steps a timed run")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="nsync-jax's dtype")
    parser.add_argument("--model-dir", type=Path, help="build the random SDXL here, or reuse the one there")
    parser.add_argument("--peer-child", type=Path, help=argparse.SUPPRESS)  # the PyTorch rows, to this JSON file
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()

    if args.peer_child:
        rows = peer_rows(args, pipeline_folder(args.preset, args.model_dir))
        args.peer_child.write_text(json.dumps(rows))
        return
    with tempfile.TemporaryDirectory() as tmp:
        work = args.model_dir or Path(tmp)
        result = Path(tmp) / "peer.json"
        # The child sees no JAX device, so it cannot take the accelerator's memory from JAX or torch.
        subprocess.run([sys.executable, __file__, *sys.argv[1:], "--model-dir", str(work), "--peer-child",
                        str(result)], env={**os.environ, "JAX_PLATFORMS": "cpu"}, check=True)
        peer = json.loads(result.read_text())
        ours = our_rows(args, work / "model")
    publish(report(args, peer, ours), write=not args.no_write)


if __name__ == "__main__":
    main()
