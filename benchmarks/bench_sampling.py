"""UNet forward, VAE decode, text-to-image sampling and negative-set generation: nsync-jax against diffusers,
same machine, same run.

Builds a random Stable Diffusion pipeline of the chosen size with diffusers (torch), saves it, loads it
with nsync-jax, and times both on the same inputs. Medians of `--repeats` runs after one warm-up (which
includes JAX's compilation; compile time is reported separately). The VAE decode row decodes one batch of
latents to images on the host: with the UNet row it splits the sampling row's time. The negative set is
`--set-size` captions drawn and written as PNG files (`nsync_jax.negatives.generate_set` against a loop over diffusers'
`StableDiffusionPipeline` in batches of `--batch`, each image saved with PIL). Appends a table to
benchmarks/history/ unless `--no-write`.

  python benchmarks/bench_sampling.py --preset small            # CPU-sized
  python benchmarks/bench_sampling.py --preset sd15 --dtype bfloat16 --resolution 512 --batch 8   # GPU
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
from results_file import publish  # benchmarks/ is on sys.path when run as a script

PRESETS = {
    # SD 1.5's UNet layout with narrower channels: every block type, 2 layers per block, 8 heads.
    "small": dict(unet=dict(block_out_channels=(64, 128, 256, 256), cross_attention_dim=256, attention_head_dim=8,
                            norm_num_groups=32),
                  vae=dict(block_out_channels=[32, 64, 128, 128], norm_num_groups=32, layers_per_block=1),
                  text=dict(hidden_size=256, intermediate_size=1024, num_attention_heads=4, num_hidden_layers=4)),
    # The real SD 1.5 sizes (random weights).
    "sd15": dict(unet=dict(block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
                           norm_num_groups=32),
                 vae=dict(block_out_channels=[128, 256, 512, 512], norm_num_groups=32, layers_per_block=2),
                 text=dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12)),
}


def build_pipeline(preset: str, folder: Path) -> None:
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from conftest import write_tiny_tokenizer  # the tests' offline CLIP BPE tokenizer

    torch.manual_seed(0)
    spec = PRESETS[preset]
    tokenizer = CLIPTokenizer.from_pretrained(write_tiny_tokenizer(folder / "_tokenizer", model_max_length=77))
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), max_position_embeddings=77,
                                                bos_token_id=tokenizer.bos_token_id,
                                                eos_token_id=tokenizer.eos_token_id, **spec["text"]))
    unet = UNet2DConditionModel(
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, layers_per_block=2, **spec["unet"])
    vae = AutoencoderKL(down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                        latent_channels=4, **spec["vae"])
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False)
    StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                            safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(folder / "model")


def pipeline_folder(preset: str, work: Path) -> Path:
    """`work/model`, the random pipeline of `preset`: built there unless an earlier run of any benchmark left
    one of the same preset (a GPU session builds SD 1.5 once for all of them)."""
    marker = work / "preset.txt"
    if not (marker.exists() and marker.read_text() == preset and (work / "model" / "model_index.json").exists()):
        work.mkdir(parents=True, exist_ok=True)
        build_pipeline(preset, work)
        marker.write_text(preset)
    return work / "model"


def timed(fn, repeats: int) -> tuple[float, float]:
    """(first call seconds, median of `repeats` later calls)."""
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return first, statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=PRESETS, default="small")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--batch", type=int, default=1, help="images per call (the UNet sees twice that)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--set-size", type=int, default=16, help="captions in the negative-set row")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--model-dir", type=Path, help="build the random pipeline here, or reuse the one there")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()

    import jax
    import jax.numpy as jnp
    import torch
    from diffusers import StableDiffusionPipeline
    from flax import nnx

    from nsync_jax import negatives
    from nsync_jax.pipeline import load_pipeline
    from nsync_jax.sampling import SampleSettings, decode_latents, generate

    on_gpu = jax.default_backend() == "gpu"
    torch_device = "cuda" if on_gpu and torch.cuda.is_available() else "cpu"
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.float16 if torch_device == "cuda" else torch.float32}[
        args.dtype]
    rows = []

    def measure(what: str, who: str, fn) -> None:
        rows.append((what, who, *timed(fn, args.repeats)))
        print(f"{who}: {what}: first call {rows[-1][2]:.3f} s, median {rows[-1][3]:.4f} s", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folder = pipeline_folder(args.preset, args.model_dir or tmp)
        latent = args.resolution // 8
        prompt = ["a red star and a blue circle in the style of painting"] * args.batch
        rng = np.random.default_rng(0)
        latents = rng.standard_normal((args.batch, 4, latent, latent)).astype(np.float32)
        context = rng.standard_normal((2 * args.batch, 77, PRESETS[args.preset]["unet"]["cross_attention_dim"]))

        # --- diffusers -------------------------------------------------------------------------------
        pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, dtype=torch_dtype).to(torch_device)
        pipe.set_progress_bar_config(disable=True)
        x_t = torch.tensor(np.concatenate([latents, latents]), dtype=torch_dtype, device=torch_device)
        c_t = torch.tensor(context, dtype=torch_dtype, device=torch_device)
        t_t = torch.tensor([500], device=torch_device)

        def torch_unet():
            with torch.no_grad():
                pipe.unet(x_t, t_t, c_t)
            if torch_device == "cuda":
                torch.cuda.synchronize()

        def torch_decode():
            with torch.no_grad():
                z = torch.tensor(latents, dtype=torch_dtype, device=torch_device) / pipe.vae.config.scaling_factor
                pipe.vae.decode(z).sample.float().cpu()

        def torch_sample():
            pipe(prompt, num_inference_steps=args.steps, guidance_scale=7.5, height=args.resolution,
                 width=args.resolution, latents=torch.tensor(latents, dtype=torch_dtype, device=torch_device),
                 output_type="np")

        captions = [f"a picture number {i} in the style of painting" for i in range(args.set_size)]

        def torch_negative_set():
            out = Path(tempfile.mkdtemp(dir=tmp))
            generator = torch.Generator(torch_device).manual_seed(0)
            for first in range(0, len(captions), args.batch):
                images = pipe(captions[first:first + args.batch], num_inference_steps=args.steps, guidance_scale=7.5,
                              height=args.resolution, width=args.resolution, generator=generator).images
                for offset, image in enumerate(images):
                    image.save(out / f"{first + offset}.png")

        set_label = f"negative set: {args.set_size} images, {args.steps} steps, PNGs"
        measure("UNet forward (guided batch)", "diffusers", torch_unet)
        measure("VAE decode (batch)", "diffusers", torch_decode)
        measure(f"sampling {args.steps} steps + decode", "diffusers", torch_sample)
        measure(set_label, "diffusers", torch_negative_set)
        del pipe
        if torch_device == "cuda":
            torch.cuda.empty_cache()  # leaves the GPU's memory to JAX

        # --- nsync-jax -------------------------------------------------------------------------------
        dtype = jnp.dtype(args.dtype)
        ours = load_pipeline(folder, dtype=dtype)
        graphdef, state = nnx.split(ours.unet)
        unet_fn = jax.jit(lambda state, x, t, c: nnx.merge(graphdef, state)(x, t, c))
        x_j = jnp.asarray(np.concatenate([latents, latents]).transpose(0, 2, 3, 1), dtype)
        c_j, t_j = jnp.asarray(context, dtype), jnp.array([500])

        def jax_unet():
            unet_fn(state, x_j, t_j, c_j).block_until_ready()

        vae_graphdef, vae_state = nnx.split(ours.vae)
        decode_fn = jax.jit(lambda state, z: decode_latents(nnx.merge(vae_graphdef, state), z, dtype))
        z_j = jnp.asarray(latents.transpose(0, 2, 3, 1))

        def jax_decode():
            np.asarray(decode_fn(vae_state, z_j))

        settings = SampleSettings(steps=args.steps, guidance=7.5, height=args.resolution, width=args.resolution,
                                  batch_size=args.batch)

        def jax_sample():
            generate(ours, prompt, settings=settings, latents=latents.transpose(0, 2, 3, 1), progress=False)

        def jax_negative_set():
            negatives.generate_set(ours, {str(i): c for i, c in enumerate(captions)}, Path(tempfile.mkdtemp(dir=tmp)),
                                   settings=settings, progress=False)

        measure("UNet forward (guided batch)", "nsync-jax", jax_unet)
        measure("VAE decode (batch)", "nsync-jax", jax_decode)
        measure(f"sampling {args.steps} steps + decode", "nsync-jax", jax_sample)
        measure(set_label, "nsync-jax", jax_negative_set)

    by_key = {(r[0], r[1]): r for r in rows}
    lines = [
        f"\n## {datetime.date.today()} `{' '.join(sys.argv[1:]) or '(defaults)'}`\n",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, JAX backend "
        f"{jax.default_backend()} ({jax.devices()[0].device_kind}); torch device {torch_device}. "
        f"Preset {args.preset}, {args.resolution}x{args.resolution}, batch {args.batch} images "
        f"(UNet batch {2 * args.batch} with guidance), {args.dtype} "
        f"(diffusers {'float16' if torch_dtype == torch.float16 else 'float32'}), PNDM. "
        f"jax {jax.__version__}, torch {torch.__version__}.\n",
        "| what | diffusers median (s) | nsync-jax median (s) | speed-up | nsync-jax first call incl. compile (s) |",
        "|---|---|---|---|---|",
    ]
    for what in dict.fromkeys(r[0] for r in rows):
        _, _, _, torch_median = by_key[(what, "diffusers")]
        _, _, jax_first, jax_median = by_key[(what, "nsync-jax")]
        lines.append(f"| {what} | {torch_median:.4f} | {jax_median:.4f} | {torch_median / jax_median:.2f}x | "
                     f"{jax_first:.2f} |")
    _, _, _, torch_set = by_key[(set_label, "diffusers")]
    _, _, _, jax_set = by_key[(set_label, "nsync-jax")]
    lines.append(f"\nNegative set: diffusers {args.set_size / torch_set:.2f} images/s, nsync-jax "
                 f"{args.set_size / jax_set:.2f} images/s ({torch_set / jax_set:.2f}x).")
    report = "\n".join(lines) + "\n"
    publish(report, write=not args.no_write)


if __name__ == "__main__":
    main()
