"""The toy world's judge: a small CNN that reads a render back into (style, shapes, colours, background).

Style-learning runs on the toy world are scored with it: did a learned token produce the held-out style, and
did the prompt's content survive? It is trained on ground-truth renders of every style, held-out ones
included (the judge must recognise what the diffusion model never saw), some of them passed through the
bundled model's VAE (`vae_round_trip`: every image the judge scores has been decoded by it) and half of the
rest blurred (`soften`); its penultimate features give a world-specific FID/KID.

Train and save the committed copy with `python -m nsync_jax.toyworld.judge --output nsync_jax/toyworld/assets/judge`.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

from nsync_jax import weights
from nsync_jax.errors import UserError
from nsync_jax.files import atomic_write, write_json
from nsync_jax.metrics import frechet_distance, kernel_inception_distance
from nsync_jax.toyworld.world import ALL_STYLES, BACKGROUNDS, COLOURS, SHAPES, Scene, render_batch, sample_scenes

HEADS = ("style", "shape", "colour", "background")
CLASSES = {"style": ALL_STYLES, "shape": SHAPES, "colour": tuple(COLOURS), "background": tuple(BACKGROUNDS)}
MULTI_LABEL = ("shape", "colour")  # sigmoid per class: which are present; the other heads are softmax
ARCHITECTURE_VERSION = 1
IMAGE_SIZE = 64
# (in, out, kernel, stride) per conv: 64 -> 16 -> 16 -> 8 -> 4 -> 4 pixels. The input is RGB, the distance
# from the background colour and the silhouette.
LAYERS = ((5, 48, 8, 4), (48, 64, 3, 1), (64, 128, 3, 2), (128, 128, 3, 2), (128, 128, 3, 1))
# Spectrum bins: radii in cycles per 64 px (a 6 px stripe period is ~10.7), and 8 orientations.
RADII = (1.5, 3, 5, 7, 9, 11, 13, 15, 18, 22, 27, 46)
ORIENTATIONS = 8
SPECTRUM = (len(RADII) - 1) * ORIENTATIONS
FEATURES = 2 * LAYERS[-1][1] + SPECTRUM
EVAL_SEED = 1  # `main` evaluates on these scenes; training uses the `seed` argument (0 by default)
WEIGHTS_FILE, CONFIG_FILE = "judge.safetensors", "judge.json"
ASSET_DIR = Path(__file__).parent / "assets" / "judge"  # the committed judge
_BATCH = 250  # images per forward pass at inference


def _spectrum_bins() -> np.ndarray:
    """(64 * 33, SPECTRUM) averaging matrix from the rfft2 grid of a 64x64 image to (radius, orientation) bins."""
    fy, fx = np.meshgrid(np.fft.fftfreq(IMAGE_SIZE) * IMAGE_SIZE, np.fft.rfftfreq(IMAGE_SIZE) * IMAGE_SIZE,
                         indexing="ij")
    radius = np.digitize(np.hypot(fy, fx), RADII).ravel() - 1
    angle = np.degrees(np.arctan2(fy, fx)).ravel()  # (-90, 90]: a real image's spectrum is symmetric
    orientation = np.clip(((angle + 90) / 180 * ORIENTATIONS).astype(int), 0, ORIENTATIONS - 1)
    bins = np.zeros((radius.size, SPECTRUM), np.float32)
    inside = np.flatnonzero((radius >= 0) & (radius < len(RADII) - 1))
    bins[inside, radius[inside] * ORIENTATIONS + orientation[inside]] = 1
    return bins / np.maximum(bins.sum(0, keepdims=True), 1)


_BINS = _spectrum_bins()


def _box_blur(x: jax.Array, size: int) -> jax.Array:
    """Mean over a size x size window of (N, H, W), zero outside the image."""
    window = jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, size, size), (1, 1, 1), "SAME")
    return window / size**2


def _inputs(images) -> tuple[jax.Array, jax.Array]:
    """The CNN's input channels (N, 64, 64, 5) and the texture spectrum (N, SPECTRUM) of images in [0, 1].

    Whether a beige pixel is a yellow shape's light tint or the background is a global question that a stack
    of local convolutions learns slowly, so the background colour (the median of the image's border) is
    estimated here: each pixel's distance from it, and a silhouette thresholded from that distance, give the
    shapes' outlines whatever their style. Styles are textures: the power spectrum of the luminance's fine
    detail inside the silhouette, pooled into (radius, orientation) bins, separates stripes, dots, checks,
    chevrons and hatching at any position, where a small CNN needs thousands of steps to learn the same.
    """
    x = jnp.asarray(images, jnp.float32)
    if x.shape[1:3] != (IMAGE_SIZE, IMAGE_SIZE):
        x = jax.image.resize(x, (x.shape[0], IMAGE_SIZE, IMAGE_SIZE, x.shape[3]), "linear", antialias=True)
    n = x.shape[0]
    border = jnp.concatenate([x[:, :2].reshape(n, -1, 3), x[:, -2:].reshape(n, -1, 3),
                              x[:, :, :2].reshape(n, -1, 3), x[:, :, -2:].reshape(n, -1, 3)], 1)
    distance = jnp.linalg.norm(x - jnp.median(border, axis=1)[:, None, None, :], axis=-1)
    silhouette = jax.nn.sigmoid((_box_blur(distance, 3) - 0.1) * 40)  # the blur averages grain away
    luminance = x.mean(-1)
    detail = (luminance - _box_blur(luminance, 3)) * silhouette
    power = jnp.abs(jnp.fft.rfft2(detail)) ** 2
    binned = power.reshape(n, -1) @ _BINS
    spectrum = jnp.log(binned / (binned.sum(-1, keepdims=True) + 1e-9) + 1e-6)
    channels = jnp.concatenate([x * 2 - 1, distance[..., None] * 2, silhouette[..., None] * 2 - 1], -1)
    return channels, spectrum


class Judge(nnx.Module):
    """A small CNN (patchify stem, 3x3 convs, GroupNorm + SiLU, average and max pool) plus a texture spectrum.

    The stem's 8x8 patches, 4 px apart, still see the finest textures (1-2 px lines, the 4 px blocks of
    `pixelated`), and working at 16x16 from the first layer on keeps training to minutes on a CPU. Max
    pooling answers "is there a star anywhere" for small shapes where an average would dilute it.
    """

    def __init__(self, rngs: nnx.Rngs):
        self.convs = nnx.List([nnx.Conv(i, o, (k, k), strides=s, padding="SAME", rngs=rngs)
                               for i, o, k, s in LAYERS])
        self.norms = nnx.List([nnx.GroupNorm(o, num_groups=8, rngs=rngs) for _, o, _, _ in LAYERS])
        self.spectrum_norm = nnx.LayerNorm(SPECTRUM, rngs=rngs)
        self.heads = nnx.Dict({head: nnx.Linear(FEATURES, len(CLASSES[head]), rngs=rngs) for head in HEADS})
        self.shape_cells = nnx.Conv(LAYERS[-1][1], len(SHAPES), (1, 1), rngs=rngs)

    def _forward(self, images) -> tuple[jax.Array, jax.Array]:
        x, spectrum = _inputs(images)
        for conv, norm in zip(self.convs, self.norms):
            x = nnx.silu(norm(conv(x)))
        return x, jnp.concatenate([x.mean((1, 2)), x.max((1, 2)), self.spectrum_norm(spectrum)], -1)

    def features(self, images) -> jax.Array:
        """Penultimate features (N, FEATURES) of float images in [0, 1], (N, H, W, 3); resized to 64 if larger."""
        return self._forward(images)[1]

    def __call__(self, images) -> dict[str, jax.Array]:
        feature_map, features = self._forward(images)
        logits = {head: self.heads[head](features) for head in HEADS}
        # Each cell of the 4x4 map also votes for the shapes it sees; a soft maximum over cells lets two
        # shapes in different places both come out, where pooled features blur them together.
        cells = self.shape_cells(feature_map)
        logits["shape"] += jax.nn.logsumexp(cells, axis=(1, 2)) - np.log(cells.shape[1] * cells.shape[2])
        return logits


# ------------------------------------------------------------------------------------------------------------
# Labels and losses
# ------------------------------------------------------------------------------------------------------------

def _labels(scenes: list[Scene]) -> dict[str, np.ndarray]:
    """Targets per head: class indices for softmax heads, multi-hot float32 for multi-label ones."""
    labels = {"style": np.array([ALL_STYLES.index(s.style) for s in scenes], np.int32),
              "background": np.array([CLASSES["background"].index(s.background) for s in scenes], np.int32)}
    for head, attribute in (("shape", "shapes"), ("colour", "colours")):
        hot = np.zeros((len(scenes), len(CLASSES[head])), np.float32)
        for row, scene in enumerate(scenes):
            hot[row, [CLASSES[head].index(name) for name in getattr(scene, attribute)]] = 1
        labels[head] = hot
    return labels


def _losses(logits: dict[str, jax.Array], labels: dict[str, jax.Array]) -> dict[str, jax.Array]:
    losses = {}
    for head in HEADS:
        if head in MULTI_LABEL:
            losses[head] = optax.sigmoid_binary_cross_entropy(logits[head], labels[head]).sum(-1).mean()
        else:
            losses[head] = optax.softmax_cross_entropy_with_integer_labels(logits[head], labels[head]).mean()
    return losses


def soften(images: jax.Array, key: jax.Array, fraction: float = 0.5, sigma=(0.5, 1.5)) -> jax.Array:
    """Gaussian-blurs a random `fraction` of float images (N, H, W, 3), each with its own sigma in px.

    A VAE decoder softens every image the judge is asked about: the bundled model's round trip is closest to
    a blur of sigma 0.8-1.0 px. A judge trained on sharp renders alone reads that softening as `gradient`
    (benchmarks/history/2026-12-03.md), so training shows it both; edges are padded by replication, as a VAE's are not
    darkened.
    """
    n, h, w, _ = images.shape
    pick, spread = jax.random.split(key)
    sigmas = jax.random.uniform(spread, (n,), minval=sigma[0], maxval=sigma[1])
    taps = jnp.arange(-3, 4, dtype=jnp.float32)
    weights = jnp.exp(-0.5 * (taps[None] / sigmas[:, None]) ** 2)
    weights = (weights / weights.sum(-1, keepdims=True))[:, :, None, None, None]  # (n, 7, 1, 1, 1)
    padded = jnp.pad(images, ((0, 0), (3, 3), (3, 3), (0, 0)), mode="edge")
    rows = sum(weights[:, i] * padded[:, i:i + h] for i in range(7))
    blurred = sum(weights[:, i] * rows[:, :, i:i + w] for i in range(7))
    return jnp.where(jax.random.bernoulli(pick, fraction, (n, 1, 1, 1)), blurred, images)


def vae_round_trip(vae, images_uint8, batch_size: int = 250) -> np.ndarray:
    """uint8 images (N, H, W, 3) encoded to their posterior mean by `vae` (an `AutoencoderKL`) and decoded back."""
    from nsync_jax.imageio import to_uint8
    from nsync_jax.sampling import decode_latents
    from nsync_jax.toyworld.pretrain import to_signed

    graphdef, state = nnx.split(vae)

    @jax.jit
    def round_trip(state, images):
        vae = nnx.merge(graphdef, state)
        return decode_latents(vae, vae.encode(images)[0] * vae.config.scaling_factor, jnp.float32)

    images = np.asarray(images_uint8)
    return np.concatenate([to_uint8(round_trip(state, to_signed(images[i:i + batch_size])))
                           for i in range(0, len(images), batch_size)])


def train_judge(seed: int = 0, steps: int = 2500, batch_size: int = 64, progress: bool = True,
                pool_size: int = 16000, learning_rate: float = 2e-3, vae=None,
                round_trip_fraction: float = 1 / 3) -> tuple[Judge, dict]:
    """Trains a judge from scratch on renders of every style; returns it and its training curves.

    Rendering is Python (Pillow, ~2 ms an image), too slow to feed every step fresh scenes, so one call to
    `sample_scenes(seed, pool_size, ALL_STYLES)` is rendered up front and each step draws a random batch
    from it. With `vae`, the pool is also round-tripped through that VAE up front and each image of a
    batch is its round trip with probability `round_trip_fraction`: a VAE adds its own texture to a flat fill
    (the bundled one's reads as grain), and a judge that never saw it calls a decoded flat image grainy.
    Half of the other images are softened (`soften`). The run is a function of `seed`.
    """
    start = time.perf_counter()
    scenes = sample_scenes(seed, pool_size, styles=ALL_STYLES)
    pool = render_batch(scenes, IMAGE_SIZE)
    pool_labels = _labels(scenes)
    render_seconds = time.perf_counter() - start
    round_trips = vae_round_trip(vae, pool) if vae is not None else pool
    fraction = round_trip_fraction if vae is not None else 0.0

    judge = Judge(nnx.Rngs(seed))
    graphdef, params = nnx.split(judge)
    schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, min(100, steps // 10), steps)
    optimizer = optax.adamw(schedule, weight_decay=1e-4)
    opt_state = optimizer.init(params)

    @jax.jit
    def train_step(params, opt_state, images, round_trips, labels, key):
        pick, blur = jax.random.split(key)
        images = soften(images.astype(jnp.float32) / 255, blur)
        use_round_trip = jax.random.bernoulli(pick, fraction, (len(images), 1, 1, 1))
        images = jnp.where(use_round_trip, round_trips.astype(jnp.float32) / 255, images)

        def loss_fn(params):
            losses = _losses(nnx.merge(graphdef, params)(images), labels)
            return sum(losses.values()), losses

        (_, losses), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, losses

    rng, key = np.random.default_rng(seed), jax.random.key(seed)
    curves = {"step": [], **{f"loss_{head}": [] for head in HEADS}, "seconds": []}
    train_start = time.perf_counter()
    for step in tqdm(range(steps), desc="judge", unit="step", disable=not progress):
        batch = rng.integers(0, pool_size, batch_size)
        params, opt_state, losses = train_step(params, opt_state, pool[batch], round_trips[batch],
                                               {head: value[batch] for head, value in pool_labels.items()},
                                               jax.random.fold_in(key, step))
        if step % 25 == 0 or step == steps - 1:
            curves["step"].append(step)
            for head, loss in losses.items():
                curves[f"loss_{head}"].append(float(loss))
            curves["seconds"].append(time.perf_counter() - train_start)
    curves["render_seconds"] = render_seconds
    curves["round_trip_seconds"] = train_start - start - render_seconds
    curves["train_seconds"] = time.perf_counter() - train_start
    return nnx.merge(graphdef, params), curves


# ------------------------------------------------------------------------------------------------------------
# Inference and scores
# ------------------------------------------------------------------------------------------------------------

@jax.jit
def _run(judge: Judge, images):
    return judge(images.astype(jnp.float32) / 255)


@jax.jit
def _run_features(judge: Judge, images):
    return judge.features(images.astype(jnp.float32) / 255)


def _batched(fn, judge: Judge, images_uint8) -> list:
    images = np.asarray(images_uint8)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"expected uint8 images (N, H, W, 3), got {images.dtype} {images.shape}")
    return [jax.device_get(fn(judge, images[i:i + _BATCH])) for i in range(0, len(images), _BATCH)]


def logits(judge: Judge, images_uint8) -> dict[str, np.ndarray]:
    """Logits per head for uint8 images (N, H, W, 3), in batches."""
    parts = _batched(_run, judge, images_uint8)
    return {head: np.concatenate([p[head] for p in parts]) if parts else np.zeros((0, len(CLASSES[head])))
            for head in HEADS}


def features(judge: Judge, images_uint8) -> np.ndarray:
    """Penultimate features (N, FEATURES) float64 of uint8 images, for FID/KID on the toy world."""
    parts = _batched(_run_features, judge, images_uint8)
    return np.concatenate(parts).astype(np.float64) if parts else np.zeros((0, FEATURES))


def predict(judge: Judge, images_uint8) -> list[dict]:
    """Per image: {"style": str, "shapes": set[str], "colours": set[str], "background": str}."""
    out = logits(judge, images_uint8)
    style, background = out["style"].argmax(-1), out["background"].argmax(-1)
    return [{"style": ALL_STYLES[style[i]],
             "shapes": {SHAPES[j] for j in np.flatnonzero(out["shape"][i] > 0)},  # sigmoid > 0.5
             "colours": {CLASSES["colour"][j] for j in np.flatnonzero(out["colour"][i] > 0)},
             "background": CLASSES["background"][background[i]]}
            for i in range(len(style))]


def judge_scores(judge: Judge, images_uint8, scenes: list[Scene], style: str | None = None) -> dict[str, float]:
    """Fractions of images judged right: style (`style` or each scene's own), shape and colour sets (exact),
    background, and content (shapes and colours both right)."""
    if len(images_uint8) != len(scenes):
        raise ValueError(f"{len(images_uint8)} images but {len(scenes)} scenes")
    hits = {"style": [], "shape": [], "colour": [], "background": [], "content": []}
    for p, scene in zip(predict(judge, images_uint8), scenes):
        hits["style"].append(p["style"] == (style or scene.style))
        hits["shape"].append(p["shapes"] == set(scene.shapes))
        hits["colour"].append(p["colours"] == set(scene.colours))
        hits["background"].append(p["background"] == scene.background)
        hits["content"].append(hits["shape"][-1] and hits["colour"][-1])
    return {key: float(np.mean(value)) if value else float("nan") for key, value in hits.items()}


def evaluate_judge(judge: Judge, seed: int, count: int = 1000, vae=None) -> dict[str, float]:
    """Per-head accuracy on `count` fresh ground-truth renders of every style (use a seed training did not);
    with `vae`, also on their round trips through that VAE (keys prefixed `round_trip_`)."""
    scenes = sample_scenes(seed, count, styles=ALL_STYLES)
    images = render_batch(scenes, IMAGE_SIZE)
    scores = judge_scores(judge, images, scenes)
    if vae is not None:
        scores |= {f"round_trip_{k}": v for k, v in judge_scores(judge, vae_round_trip(vae, images),
                                                                   scenes).items()}
    return scores


def world_fid_kid(judge: Judge, images_a, images_b) -> dict[str, float]:
    """FID and KID between two uint8 image sets, in the judge's feature space (the toy world's Inception)."""
    a, b = features(judge, images_a), features(judge, images_b)
    # 50 subsets of at most 100: the settings RESULTS.md's world FID/KID figures were measured with.
    kid, kid_std, _ = kernel_inception_distance(a, b, subset_size=100, num_subsets=50)
    return {"fid": frechet_distance(a, b), "kid": kid, "kid_std": kid_std}


# ------------------------------------------------------------------------------------------------------------
# Files
# ------------------------------------------------------------------------------------------------------------

def _description() -> dict:
    return {"architecture_version": ARCHITECTURE_VERSION, "image_size": IMAGE_SIZE,
            "layers": [list(layer) for layer in LAYERS], "spectrum": [list(RADII), ORIENTATIONS],
            **{f"{head}_classes": list(CLASSES[head]) for head in HEADS}}


def save_judge(judge: Judge, folder, metrics: dict) -> None:
    """Writes folder/judge.safetensors (NNX state, dotted paths, float32) and folder/judge.json, each atomically."""
    from safetensors.numpy import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {".".join(str(p) for p in path): np.asarray(variable[...], np.float32)
               for path, variable in nnx.to_flat_state(nnx.state(judge))}
    atomic_write(folder / WEIGHTS_FILE, lambda tmp: save_file(tensors, str(tmp)))
    write_json(folder / CONFIG_FILE, {**_description(), "metrics": metrics})


def load_judge(folder) -> Judge:
    """Loads a saved judge; a missing or corrupt file, or a judge of other classes, is a `UserError`."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: judge folder not found")
    config_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    config = weights.read_json(config_path)
    for key, expected in _description().items():
        if config.get(key) != expected:
            raise UserError(f"{config_path}: {key} is {config.get(key)!r}, this version of nsync-jax expects "
                            f"{expected!r}; retrain with `python -m nsync_jax.toyworld.judge`")
    if not weights_path.is_file():
        raise UserError(f"{weights_path}: file not found")
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{weights_path}: cannot read safetensors file ({e})") from None
    graphdef, abstract = nnx.split(weights.abstract_module(Judge))
    loaded = []
    for path, variable in nnx.to_flat_state(abstract):
        key = ".".join(str(p) for p in path)
        if key not in tensors:
            raise UserError(f"{weights_path}: missing weight {key!r}")
        if tensors[key].shape != tuple(variable.shape):
            raise UserError(f"{weights_path}: weight {key!r} has shape {tensors[key].shape}, "
                            f"expected {tuple(variable.shape)}")
        loaded.append((path, variable.replace(jnp.asarray(tensors.pop(key), jnp.float32))))
    if tensors:
        raise UserError(f"{weights_path}: unexpected weight {sorted(tensors)[0]!r}")
    return nnx.merge(graphdef, nnx.from_flat_state(loaded))


def _portable_path(path) -> str:
    """`path` as judge.json records it: relative to the checkout when it lies in this package (the bundled VAE),
    so the committed file names no machine's folders; absolute otherwise."""
    path, root = Path(path).resolve(), Path(__file__).resolve().parents[2]
    return str(path.relative_to(root)) if path.is_relative_to(root / "nsync_jax") else str(path)


def main(argv=None) -> None:
    from nsync_jax.models.vae import load_vae
    from nsync_jax.toyworld.pretrain import BUNDLED_MODEL

    parser = argparse.ArgumentParser(description="Train the toy world's judge, evaluate it on fresh renders, save it.")
    parser.add_argument("--output", required=True, help="folder for judge.safetensors and judge.json")
    parser.add_argument("--vae", default=str(BUNDLED_MODEL / "vae"),
                        help="VAE folder whose round trips the judge also trains on (default: the bundled "
                             "model's; '' for none)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=2500)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--pool-size", type=int, default=16000)
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--eval-count", type=int, default=1000)
    args = parser.parse_args(argv)
    if args.seed == EVAL_SEED:
        parser.error(f"--seed {EVAL_SEED} is the evaluation seed")
    vae = load_vae(Path(args.vae)) if args.vae else None  # a bad folder fails now, not after minutes of rendering
    judge, curves = train_judge(args.seed, args.steps, args.batch_size, pool_size=args.pool_size,
                                learning_rate=args.learning_rate, vae=vae)
    accuracy = evaluate_judge(judge, EVAL_SEED, args.eval_count, vae=vae)
    metrics = {"accuracy": accuracy, "eval_seed": EVAL_SEED, "eval_count": args.eval_count,
               "vae": _portable_path(args.vae) if args.vae else "",
               "train_seed": args.seed, "steps": args.steps, "batch_size": args.batch_size,
               "pool_size": args.pool_size, "learning_rate": args.learning_rate,
               "render_seconds": round(curves["render_seconds"], 1),
               "round_trip_seconds": round(curves["round_trip_seconds"], 1),
               "train_seconds": round(curves["train_seconds"], 1)}
    print(json.dumps(metrics, indent=2))
    save_judge(judge, args.output, metrics)
    print(f"saved {Path(args.output) / WEIGHTS_FILE}")


if __name__ == "__main__":
    main()
