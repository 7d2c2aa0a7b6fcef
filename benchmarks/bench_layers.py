"""Single layers, XLA against torch on CPU: where the UNet's time goes (3x3 conv, 32-group GroupNorm).

  python benchmarks/bench_layers.py
"""
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch


def median_ms(fn, repeats: int = 10) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def group_norm(x, groups: int = 32):
    batch, height, width, channels = x.shape
    grouped = x.reshape(batch, height, width, groups, channels // groups)
    mean = grouped.mean((1, 2, 4), keepdims=True)
    var = grouped.var((1, 2, 4), keepdims=True)
    return ((grouped - mean) / jnp.sqrt(var + 1e-5)).reshape(x.shape)


def main() -> None:
    conv = jax.jit(lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                                              dimension_numbers=("NHWC", "HWIO", "NHWC")))
    norm = jax.jit(group_norm)
    for channels, size in [(64, 32), (128, 16), (256, 8)]:
        rng = np.random.default_rng(0)
        x = rng.standard_normal((2, size, size, channels)).astype(np.float32)
        w = rng.standard_normal((3, 3, channels, channels)).astype(np.float32)
        xj, wj = jnp.asarray(x), jnp.asarray(w)
        xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
        wt = torch.from_numpy(w.transpose(3, 2, 0, 1).copy())
        with torch.no_grad():
            conv_torch = median_ms(lambda: torch.nn.functional.conv2d(xt, wt, padding=1))
            norm_torch = median_ms(lambda: torch.nn.functional.group_norm(xt, 32))
        conv_jax = median_ms(lambda: conv(xj, wj).block_until_ready())
        norm_jax = median_ms(lambda: norm(xj).block_until_ready())
        print(f"{channels} channels at {size}x{size}, batch 2: conv XLA {conv_jax:.2f} ms, torch {conv_torch:.2f} ms;"
              f" GroupNorm XLA {norm_jax:.2f} ms, torch {norm_torch:.2f} ms")


if __name__ == "__main__":
    main()
