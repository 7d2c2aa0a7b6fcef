"""`nsync-jax evaluate`: FID, KID, CMMD, CSD and CLIP score between a folder of generated and of real images.

Three protocols, because the papers' scripts differ from the standard tools (../docs/metrics.md):

| metric | `standard` | `nsync` (the NSYNC paper's scripts) | `styleforge` (StyleForge's released scripts) |
| --- | --- | --- | --- |
| FID, KID | FID Inception (pytorch-fid's TF port); clean-fid's input: PIL bicubic on float channels to 299, (x - 128) / 128; plain FID | torchvision's ImageNet Inception; gan-metrics' input: x / 255, bilinear to 299 (torch's, no antialias), 2x - 1; FID is the mean (std) of 10 bootstrap draws; the remainder after batches of 50 is dropped | FID Inception; pytorch-fid's input (gan-metrics' above); plain FID over every image |
| KID | 100 subsets of min(1000, N) | the same (gan-metrics crashes below 1000 images) | the same, the real images first resized to 512 x 512 (Pillow's default, bicubic), as its KID script does |
| CMMD | CLIP ViT-L/14@336 image embeddings, L2-normalised; square centre crop, PIL bicubic to 336; biased MMD^2 x 1000, sigma 10 | the same | the same |
| CSD | CSD style embeddings; torchvision's Resize(224, bicubic) + CenterCrop(224); mean cos to the mean real embedding | the same | the same |
| CLIP | CLIP ViT-L/14 image and caption embeddings, transformers' CLIPImageProcessor; 100 cos, mean clamped at 0 (torchmetrics) | the same | CLIP ViT-B/16; that score per prompt over the prompt's images, prompts over 77 characters skipped, then the mean over prompts |

StyleForge's protocol (ION-dgu/StyleBoost, 68cae57: main.py, cmd_txt2img.py, FID_/KID_score_measurement.py,
CLIP_score.py) draws 2 images for each line P of its prompt.txt with "a photo of zwx style, " + P, DDIM 30 steps,
guidance 7, 512 x 512 and a fixed negative prompt; the CLIP score compares each image with the raw prompt P.
A caption `<stem>.txt` (or line `img_<i>` of a prompt list given to --captions) is the prompt of the images
`<stem>.png` and `<stem>_<k>.png`, as `nsync-jax sample --captions/--prompts-file --num-images` names them; each
caption is one prompt, even where two lines repeat a text (prompt.txt repeats "a girl" and "a man"). Its KID
script runs a modified gan-metrics (torchvision Inception, --dims 768) that is not public: KID here uses the FID
Inception's pool3 features, as its FID does.

Images are decoded on the host with Pillow and converted to RGB (grayscale, palette, RGBA and CMYK files are
converted and counted); resizing that must be bit-compatible with the reference tools stays in Pillow. A file
that cannot be decoded is reported in the output and left out; nothing is dropped silently, and every metric
records how many images it used. Networks run under jit with `highest` matmul precision: the TF32 or bf16
default of GPUs and TPUs moves CMMD, a difference of kernel sums all within 2% of 1.

`--weights DIR` holds converted networks under the names in `metric_networks.NETWORKS` (`nsync-jax
convert-weights` writes them from the files users have); a network it lacks comes from its standard release,
fetched into the Hugging Face cache and converted once (`metric_networks`).
"""
from __future__ import annotations

import dataclasses
import hashlib
import re
from pathlib import Path
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image, UnidentifiedImageError

from nsync_jax import imageio, metrics
from nsync_jax.errors import UserError
from nsync_jax.metric_networks import network_path
from nsync_jax.models.clip_vision import CLIP_MEAN, CLIP_STD

PROTOCOLS = ("standard", "nsync", "styleforge")
# StyleForge's KID script resizes the real images to this square first; its CLIP script skips prompts longer
# than this many characters.
STYLEFORGE_KID_SIZE = 512
STYLEFORGE_MAX_PROMPT_CHARS = 77
# SHA-256 of the released prompt list (ION-dgu/StyleBoost 68cae57, prompt.txt: 1,563 lines, no licence, so not
# shipped here): a result says whether its --captions list is that one.
STYLEFORGE_PROMPTS_SHA256 = "e8ac3773140fb71cf16516c1cd75004c8e66eee3e44513500c2cd663dd0733ea"
METRICS = ("fid", "kid", "cmmd", "csd", "clip")
INCEPTION_SIZE = 299
# gan-metrics-pytorch loads images in batches of 50 and drops the last, incomplete batch.
NSYNC_BATCH = 50

# ------------------------------------------------------------------------------------------------------------
# Image folders
# ------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class ImageFolder:
    """The decodable images of a folder, and what happened to the others."""

    folder: Path
    stems: list[str]
    images: list[np.ndarray]  # (height, width, 3) uint8 RGB
    converted: dict[str, int]  # original mode -> number of files converted to RGB
    unreadable: list[dict[str, str]]  # {"file", "error"}

    def report(self) -> dict:
        return {"folder": str(self.folder), "images": len(self.images), "converted_to_rgb": self.converted,
                "unreadable": self.unreadable}


def read_image_folder(folder: Path) -> ImageFolder:
    """Every image file of `folder` (`imageio.image_files`: by suffix, sorted by name), decoded to RGB uint8."""
    folder = Path(folder)
    result = ImageFolder(folder, [], [], {}, [])
    for path in imageio.image_files(folder):
        try:
            with Image.open(path) as image:
                image.load()
                if image.mode != "RGB":
                    result.converted[image.mode] = result.converted.get(image.mode, 0) + 1
                    image = image.convert("RGB")
                result.images.append(np.asarray(image, np.uint8))
                result.stems.append(path.stem)
        except (OSError, UnidentifiedImageError, ValueError) as e:
            result.unreadable.append({"file": path.name, "error": f"{type(e).__name__}: {e}"})
    if len(result.images) < 2:
        raise UserError(f"{folder}: {len(result.images)} readable images; the metrics need at least 2")
    return result


# ------------------------------------------------------------------------------------------------------------
# Preprocessing (host, numpy/Pillow): each reference tool's resize, crop and scaling
# ------------------------------------------------------------------------------------------------------------

def clean_fid_input(image: np.ndarray, size: int = INCEPTION_SIZE) -> np.ndarray:
    """clean-fid's "clean" mode: PIL bicubic per channel on float32 ('F' images), clipped, then (x - 128) / 128."""
    channels = [np.asarray(Image.fromarray(image[..., c].astype(np.float32)).resize(
        (size, size), Image.Resampling.BICUBIC)) for c in range(3)]
    return (np.clip(np.stack(channels, -1), 0, 255) - 128) / 128


def gan_metrics_input(image: np.ndarray, size: int = INCEPTION_SIZE) -> np.ndarray:
    """gan-metrics' (and pytorch-fid's): x / 255, torch's bilinear (align_corners=False, no antialias), 2x - 1."""
    resized = jax.image.resize(jnp.asarray(image, jnp.float32) / 255, (size, size, 3), "bilinear", antialias=False)
    return np.asarray(resized) * 2 - 1


def _clip_normalise(image: Image.Image) -> np.ndarray:
    return (np.asarray(image, np.float32) / 255 - np.float32(CLIP_MEAN)) / np.float32(CLIP_STD)


def cmmd_input(image: np.ndarray, size: int) -> np.ndarray:
    """The CMMD pipeline's: centre crop to a square, PIL bicubic to `size` on uint8, /255, CLIP normalisation."""
    height, width = image.shape[:2]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    square = Image.fromarray(image[top:top + side, left:left + side])
    return _clip_normalise(square.resize((size, size), Image.Resampling.BICUBIC))


def clip_input(image: np.ndarray, size: int, crop_rounding: str = "floor") -> np.ndarray:
    """Shorter side to `size` (PIL bicubic), centre crop, /255, CLIP normalisation.

    transformers' CLIPImageProcessor and torchvision's Resize + CenterCrop (CSD's pipeline) differ only in
    the crop offset: floor((h - size) / 2) (`"floor"`) against round-half-even (`"round"`).
    """
    height, width = image.shape[:2]
    short, long = min(height, width), max(height, width)
    long = int(size * long / short)
    new_h, new_w = (size, long) if height <= width else (long, size)
    resized = Image.fromarray(image).resize((new_w, new_h), Image.Resampling.BICUBIC)
    offset = (lambda extra: extra // 2) if crop_rounding == "floor" else (lambda extra: int(round(extra / 2)))
    top, left = offset(new_h - size), offset(new_w - size)
    return _clip_normalise(resized.crop((left, top, left + size, top + size)))


# ------------------------------------------------------------------------------------------------------------
# Feature extraction: one jitted forward per network, fixed batch shape, frozen weights as an argument
# ------------------------------------------------------------------------------------------------------------

def batched_features(module: nnx.Module, forward: Callable, inputs: Iterator[np.ndarray], count: int,
                     batch_size: int) -> np.ndarray:
    """`forward(module, batch)` over `count` preprocessed inputs, in batches padded to one compiled shape."""
    graphdef, state = nnx.split(module)

    @jax.jit
    def run(state, batch):
        with jax.default_matmul_precision("highest"):
            return forward(nnx.merge(graphdef, state), batch)

    out = []
    pending = []
    for i, x in enumerate(inputs):
        pending.append(x)
        if len(pending) == batch_size or i == count - 1:
            batch = np.stack(pending + [np.zeros_like(pending[0])] * (batch_size - len(pending)))
            out.append(np.asarray(run(state, batch), np.float64)[:len(pending)])
            pending = []
    return np.concatenate(out)


@dataclasses.dataclass
class Evaluation:
    protocol: str
    metrics: tuple[str, ...]
    weights: Path | None  # None: every network from the cache of standard releases
    batch_size: int = 50
    seed: int = 0
    kid_subset_size: int = 1000
    kid_subsets: int = 100


def _inception_features(ev: Evaluation, folders: list[ImageFolder]) -> list[np.ndarray]:
    from nsync_jax.models.inception import load_inception

    variant = "torchvision" if ev.protocol == "nsync" else "fid"
    model = load_inception(network_path(ev.weights, f"inception-{variant}"), variant)
    prepare = clean_fid_input if ev.protocol == "standard" else gan_metrics_input
    sets = [folder.images for folder in folders]
    if ev.protocol == "nsync":
        sets = [images[:len(images) // NSYNC_BATCH * NSYNC_BATCH] or images for images in sets]
    counts = [len(images) for images in sets]  # all sets in one pass: one compiled forward
    features = batched_features(model, lambda m, x: m(x), (prepare(i) for images in sets for i in images),
                                sum(counts), ev.batch_size)
    return np.split(features, np.cumsum(counts)[:-1])


def _clip_image_features(ev: Evaluation, folders: list[ImageFolder], name: str, prepare) -> list[np.ndarray]:
    from nsync_jax.models.clip_vision import l2_normalize, load_clip_vision

    model = load_clip_vision(network_path(ev.weights, name))
    size = model.config.image_size
    return [batched_features(model, lambda m, x: l2_normalize(m(x).image_embeds),
                             (prepare(i, size) for i in f.images), len(f.images), ev.batch_size)
            for f in folders]


def _csd_features(ev: Evaluation, folders: list[ImageFolder]) -> list[np.ndarray]:
    from nsync_jax.models.clip_vision import load_csd

    model = load_csd(network_path(ev.weights, "csd"))
    size = model.config.image_size
    return [batched_features(model, lambda m, x: m(x), (clip_input(i, size, "round") for i in f.images),
                             len(f.images), ev.batch_size) for f in folders]


def clip_embeddings(weights_dir: Path | None, images: list[np.ndarray], texts: list[str], batch_size: int,
                    name: str = "clip") -> tuple[np.ndarray, np.ndarray]:
    """CLIP's (`metric_networks.NETWORKS[name]`, ViT-L/14 by default) unnormalised image `(len(images), d)` and
    text `(len(texts), d)` embeddings; images preprocessed as CLIPImageProcessor does."""
    from nsync_jax.models.clip_vision import load_clip_model
    from nsync_jax.tokens import load_tokenizer

    folder = network_path(weights_dir, name)
    model = load_clip_model(folder)
    tokenizer = load_tokenizer(folder)
    size = model.config.vision.image_size
    image = batched_features(model, lambda m, x: m.image_features(x), (clip_input(i, size) for i in images),
                             len(images), batch_size)
    # Truncation keeps the end-of-text token in the last position (OpenAI's `clip.tokenize(truncate=True)`).
    ids = tokenizer(texts, padding="max_length", truncation=True, max_length=tokenizer.model_max_length,
                    return_tensors="np").input_ids
    return image, batched_features(model, lambda m, x: m.text_features(x), iter(ids), len(ids), batch_size)


def image_prompts(captions: Path, stems: list[str]) -> tuple[dict[str, str], dict[str, str]]:
    """The prompt of each generated image: `({image stem: prompt stem}, {prompt stem: prompt})`. Image `<stem>`
    or `<stem>_<k>` (`sample --num-images`) has the caption `<stem>.txt` of the folder `captions`, or line
    `<stem>` (`img_<i>`) of the prompt list file `captions` (`sample --prompts-file`)."""
    prompts = imageio.read_prompt_list(captions) if Path(captions).is_file() else imageio.read_captions(captions)
    owners = {stem: stem if stem in prompts else re.sub(r"_\d+$", "", stem) for stem in stems}
    missing = [stem for stem, owner in owners.items() if owner not in prompts]
    if missing:
        raise UserError(f"{captions}: no caption for image {missing[0]!r} ({len(missing)} missing)")
    return owners, prompts


def _clip_score(ev: Evaluation, generated: ImageFolder, captions_dir: Path | None) -> dict:
    if captions_dir is None:
        raise UserError("--captions: the clip metric needs a caption (<stem>.txt) for each generated image")
    if ev.protocol == "styleforge":
        return _clip_score_per_prompt(ev, generated, captions_dir)
    captions = imageio.read_captions(captions_dir, generated.stems)
    image, text = clip_embeddings(ev.weights, generated.images, [captions[s] for s in generated.stems],
                                  ev.batch_size)
    score = metrics.clip_score(image, text)
    return {"value": score.value, "std": score.std, "images": len(image),
            "definition": "100 * cos(image, caption), mean clamped at 0 (torchmetrics CLIPScore)"}


def _clip_score_per_prompt(ev: Evaluation, generated: ImageFolder, captions: Path) -> dict:
    """StyleForge's CLIP score: torchmetrics' score with ViT-B/16 over each prompt's images, then the mean over
    the prompts of at most `STYLEFORGE_MAX_PROMPT_CHARS` characters."""
    owners, prompts = image_prompts(captions, generated.stems)
    groups: dict[str, list[int]] = {}
    for i, stem in enumerate(generated.stems):
        groups.setdefault(owners[stem], []).append(i)
    kept = {owner: images for owner, images in groups.items() if len(prompts[owner]) <= STYLEFORGE_MAX_PROMPT_CHARS}
    if not kept:
        raise UserError(f"{captions}: every prompt of the generated images is longer than "
                        f"{STYLEFORGE_MAX_PROMPT_CHARS} characters; the styleforge CLIP score skips those")
    order = [i for images in kept.values() for i in images]
    image, text = clip_embeddings(ev.weights, [generated.images[i] for i in order],
                                  [prompts[owner] for owner, images in kept.items() for _ in images],
                                  ev.batch_size, name="clip-b16")
    ends = np.cumsum([len(images) for images in kept.values()])
    per_prompt = [metrics.clip_score(image[end - len(images):end], text[end - len(images):end]).value
                  for end, images in zip(ends, kept.values())]
    released = (Path(captions).is_file()
                and hashlib.sha256(Path(captions).read_bytes()).hexdigest() == STYLEFORGE_PROMPTS_SHA256)
    return {"value": float(np.mean(per_prompt)), "std": float(np.std(per_prompt)), "images": len(order),
            "prompts": len(kept), "prompts_skipped": len(groups) - len(kept), "released_prompt_list": released,
            "definition": "per prompt: 100 * cos(image, raw prompt) with CLIP ViT-B/16, mean over its images "
                          f"clamped at 0 (torchmetrics clip_score); mean over prompts of at most "
                          f"{STYLEFORGE_MAX_PROMPT_CHARS} characters (StyleForge's CLIP_score.py)"}


def resized_square(folder: ImageFolder, size: int) -> ImageFolder:
    """The folder's images resized to `size` x `size` with Pillow's default filter for RGB (bicubic)."""
    return dataclasses.replace(folder, images=[np.asarray(Image.fromarray(i).resize((size, size),
                                                                                     Image.Resampling.BICUBIC))
                                               for i in folder.images])


def evaluate(ev: Evaluation, real_dir: Path, generated_dir: Path, captions_dir: Path | None = None) -> dict:
    """Every metric in `ev.metrics` between the two folders, as a JSON-ready dict."""
    if ev.protocol not in PROTOCOLS:
        raise UserError(f"--protocol {ev.protocol!r}: expected one of {', '.join(PROTOCOLS)}")
    unknown = [m for m in ev.metrics if m not in METRICS]
    if unknown or not ev.metrics:
        raise UserError(f"--metrics: unknown metric {unknown[0] if unknown else '(none)'!r}; "
                        f"choose from {','.join(METRICS)}")
    real, generated = read_image_folder(real_dir), read_image_folder(generated_dir)
    results: dict[str, dict] = {}
    if {"fid", "kid"} & set(ev.metrics):
        kid_real = ([resized_square(real, STYLEFORGE_KID_SIZE)]  # StyleForge's KID script resizes them first
                    if ev.protocol == "styleforge" and "kid" in ev.metrics else [])
        real_f, gen_f, *kid_real_f = _inception_features(ev, [real, generated, *kid_real])
        counts = {"images_real": len(real_f), "images_generated": len(gen_f)}
        if "fid" in ev.metrics:
            if ev.protocol == "nsync":
                fid = metrics.bootstrap_frechet_distance(real_f, gen_f, seed=ev.seed)
                results["fid"] = {"value": fid.value, "std": fid.std, "bootstrap_draws": fid.subset_size, **counts}
            else:
                results["fid"] = {"value": metrics.frechet_distance(real_f, gen_f), **counts}
        if "kid" in ev.metrics:
            kid = metrics.kernel_inception_distance(kid_real_f[0] if kid_real_f else real_f, gen_f,
                                                    ev.kid_subset_size, ev.kid_subsets, ev.seed)
            results["kid"] = {"value": kid.value, "std": kid.std, "value_x1000": 1000 * kid.value,
                              "subset_size": kid.subset_size, "subsets": ev.kid_subsets, **counts}
    if "cmmd" in ev.metrics:
        real_f, gen_f = _clip_image_features(ev, [real, generated], "clip-336", cmmd_input)
        results["cmmd"] = {"value": metrics.cmmd(real_f, gen_f).value,
                           "value_unbiased": metrics.cmmd(real_f, gen_f, biased=False).value,
                           "images_real": len(real_f), "images_generated": len(gen_f)}
    if "csd" in ev.metrics:
        real_f, gen_f = _csd_features(ev, [real, generated])
        csd = metrics.csd_score(gen_f, real_f)
        results["csd"] = {"value": csd.value, "std": csd.std, "images_real": len(real_f),
                          "images_generated": len(gen_f)}
    if "clip" in ev.metrics:
        results["clip"] = _clip_score(ev, generated, captions_dir)
    return {"protocol": ev.protocol, "real": real.report(), "generated": generated.report(),
            "settings": {"seed": ev.seed, "kid_subset_size": ev.kid_subset_size, "kid_subsets": ev.kid_subsets,
                         "weights": None if ev.weights is None else str(ev.weights)},
            "metrics": {m: results[m] for m in ev.metrics}}


def table(result: dict) -> str:
    """The scores as a small text table."""
    rows = [f"{'metric':<6} {'value':>12} {'std':>10}  images (real / generated)"]
    for name, m in result["metrics"].items():
        std = f"{m['std']:.4g}" if m.get("std") is not None else "-"
        images = f"{m.get('images_real', '-')} / {m.get('images_generated', m.get('images', '-'))}"
        rows.append(f"{name:<6} {m['value']:>12.6g} {std:>10}  {images}")
    for side in ("real", "generated"):
        for bad in result[side]["unreadable"]:
            rows.append(f"unreadable {side} image {bad['file']}: {bad['error']}")
    return "\n".join(rows)
