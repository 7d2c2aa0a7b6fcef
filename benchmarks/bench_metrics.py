"""Feature extraction for the metrics, images/second: the Flax networks `nsync-jax evaluate` runs, against
transformers' PyTorch CLIP image tower on the same machine, in the same run.

Real architectures with random weights (nothing is downloaded): Inception-v3 at 299 px (FID/KID), CLIP
ViT-L/14 at 224 px (CLIP score; CSD is the same tower) and at 336 px (CMMD). Each side runs a jitted (JAX) or
`no_grad` (torch) forward on one batch of preprocessed pixels, float32 at full matmul precision as the metrics
need; medians of `--repeats` timed runs after one warm-up (JAX's compile time reported apart). The torch
Inception-v3 lives in torchvision, which cannot be installed next to this project's torch, so Inception has
no torch column here. Appends a table to benchmarks/history/ unless `--no-write`.

  python benchmarks/bench_metrics.py --batch 8 --repeats 3
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform

import jax
import numpy as np
from flax import nnx

from bench_sampling import timed  # benchmarks/ is on sys.path when run as a script
from results_file import publish

# transformers' CLIPVisionConfig for OpenAI's ViT-L/14 image tower (projection to 768).
VIT_L14 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
               patch_size=14, hidden_act="quick_gelu", projection_dim=768)


def jax_forward(module, forward, batch: np.ndarray, repeats: int) -> tuple[float, float]:
    graphdef, state = nnx.split(module)

    @jax.jit
    def run(state, x):
        with jax.default_matmul_precision("highest"):
            return forward(nnx.merge(graphdef, state), x)

    x = jax.device_put(batch)
    return timed(lambda: jax.block_until_ready(run(state, x)), repeats)


def bench_inception(batch: int, repeats: int) -> dict:
    from nsync_jax.models.inception import InceptionV3

    model = InceptionV3("fid", rngs=nnx.Rngs(0))
    pixels = np.random.default_rng(0).uniform(-1, 1, (batch, 299, 299, 3)).astype(np.float32)
    first, median = jax_forward(model, lambda m, x: m(x), pixels, repeats)
    return {"network": "Inception-v3 (FID), 299 px", "jax": batch / median, "compile": first - median}


def bench_clip(batch: int, size: int, repeats: int) -> dict:
    import torch
    from transformers import CLIPVisionConfig as TorchConfig
    from transformers import CLIPVisionModelWithProjection as TorchModel

    from nsync_jax.models.clip_vision import CLIPVisionConfig, CLIPVisionModelWithProjection

    config = dict(VIT_L14, image_size=size)
    model = CLIPVisionModelWithProjection(CLIPVisionConfig.from_dict(config), rngs=nnx.Rngs(0))
    pixels = np.random.default_rng(0).standard_normal((batch, size, size, 3)).astype(np.float32)
    first, median = jax_forward(model, lambda m, x: m(x).image_embeds, pixels, repeats)
    del model
    torch_model = TorchModel(TorchConfig(**config)).eval()
    torch_pixels = torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy())
    with torch.no_grad():
        _, torch_median = timed(lambda: torch_model(pixel_values=torch_pixels).image_embeds, repeats)
    return {"network": f"CLIP ViT-L/14 image tower, {size} px", "jax": batch / median, "compile": first - median,
            "torch": batch / torch_median}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(os.cpu_count())
    rows = [bench_inception(args.batch, args.repeats)]
    for size in (224, 336):
        rows.append(bench_clip(args.batch, size, args.repeats))
    lines = [f"\n## {datetime.date.today()} metric feature extraction, `bench_metrics.py --batch {args.batch} "
             f"--repeats {args.repeats}`\n",
             f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, JAX backend "
             f"{jax.default_backend()} ({jax.devices()[0].device_kind}), jax {jax.__version__}, torch "
             f"{torch.__version__}. float32, highest matmul precision, random weights, batch {args.batch}; "
             f"medians of {args.repeats} runs after a warm-up.\n",
             "| network | nsync-jax images/s | transformers (torch) images/s | ratio | JAX compile s |",
             "| --- | --- | --- | --- | --- |"]
    for row in rows:
        torch_col = f"{row['torch']:.2f}" if "torch" in row else "n/a (needs torchvision)"
        ratio = f"{row['jax'] / row['torch']:.2f}x" if "torch" in row else "-"
        lines.append(f"| {row['network']} | {row['jax']:.2f} | {torch_col} | {ratio} | {row['compile']:.1f} |")
    report = "\n".join(lines) + "\n"
    publish(report, write=not args.no_write)


if __name__ == "__main__":
    main()
