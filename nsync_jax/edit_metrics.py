"""`nsync-jax evaluate-edits`: pix2pix-zero's editing metrics between originals and their edits.

pix2pix-zero (Parmar et al. 2023) reports three numbers and released no evaluation code, so each follows the
work it cites or the common tool (../docs/methods.md §4.4):

| metric | what | network (`--weights DIR`) |
| --- | --- | --- |
| `clip_accuracy` | share of edits whose CLIP image embedding is closer (cosine) to the target text than to the source text; a tie counts as a miss | CLIP ViT-L/14 (`evaluate`'s `clip` folder), CLIPImageProcessor's input |
| `clip_score` | 100 cos(edit, target text), mean clamped at 0 (torchmetrics' CLIPScore, `metrics.clip_score`) | the same |
| `background_lpips` | LPIPS v0.1 (lpips' default AlexNet, or VGG) between original and edit at their own size, in [-1, 1]; with `masks`, foreground pixels (mask >= 128) are set to black in both first (PIE-Bench's masked LPIPS); without, the whole image | `lpips-alex.safetensors` / `lpips-vgg.safetensors` |
| `structure_distance` | Splice's (Tumanyan et al. 2022) and plug-and-play's: MSE between the cosine self-similarity matrices of the last layer's keys (all tokens, class token included) of DINO ViT-B/8, images resized to 224 x 224 and ImageNet-normalised | `dino-vitb8` (transformers ViTModel) |

Deviations, named: Splice resizes the shorter side to 224 keeping the aspect (DINO then interpolates its
positions); here every image is resized to the square the ViT was trained at (the same for the square images
`edit` writes). Resizing uses Pillow's antialiased bilinear, as torchvision's `Resize` on PIL images does.
The Hub's `facebook/dino-vitb8` config says layer norm epsilon 1e-12 where DINO's code (Splice's
`torch.hub` network) uses 1e-6; `convert-weights dino-vit` of DINO's own file keeps 1e-6, a copied Hub folder
runs as its config says (the two differ by about 1e-6 of the normalised activations where their variance is
near 1).

Pairs are matched by file stem: every edit needs an original (and a mask and prompts, where those are
given); originals without an edit are counted and left out. Each metric reports its mean over pairs, its std
over pairs and the count; `per_image` holds every pair's values.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from PIL import Image

from nsync_jax import evaluate, imageio
from nsync_jax.errors import UserError
from nsync_jax.metric_networks import network_path

EDIT_METRICS = ("clip_accuracy", "clip_score", "background_lpips", "structure_distance")
LPIPS_NETS = ("alex", "vgg")


@dataclasses.dataclass
class EditEvaluation:
    weights: Path | None  # None: every network from the cache of standard releases
    metrics: tuple[str, ...] = EDIT_METRICS
    lpips_net: str = "alex"
    batch_size: int = 8


# ------------------------------------------------------------------------------------------------------------
# Per-pair values
# ------------------------------------------------------------------------------------------------------------

def clip_embeddings(weights_dir: Path | None, edits: list[np.ndarray], targets: list[str], sources: list[str] | None,
                    batch_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """CLIP's embeddings of the edits, their target texts and their source texts (None without sources)."""
    image, text = evaluate.clip_embeddings(weights_dir, edits, targets + (sources or []), batch_size)
    return image, text[:len(edits)], (text[len(edits):] if sources is not None else None)


def cosine(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Row-wise cosine of two `(N, d)` arrays."""
    unit = lambda v: v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-12)
    return (unit(x) * unit(y)).sum(-1)


def _lpips_input(image: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    if mask is not None:
        image = np.where(mask[..., None], 0, image)
    return image.astype(np.float32) / 127.5 - 1


def lpips_values(weights_dir: Path | None, net: str, originals: list[np.ndarray], edits: list[np.ndarray],
                 masks: list[np.ndarray | None], batch_size: int) -> np.ndarray:
    """LPIPS per (original, edit) pair, foreground (True in `masks`) blacked out in both where a mask is given."""
    from nsync_jax.models.lpips import load_lpips

    model = load_lpips(network_path(weights_dir, f"lpips-{net}"), net)
    values = np.zeros(len(edits))
    # One compiled shape per image size.
    for shape in dict.fromkeys(e.shape for e in edits):
        group = [i for i, e in enumerate(edits) if e.shape == shape]
        pairs = (np.stack([_lpips_input(originals[i], masks[i]), _lpips_input(edits[i], masks[i])]) for i in group)
        values[group] = evaluate.batched_features(model, lambda m, x: m(x[:, 0], x[:, 1]), pairs, len(group),
                                                  batch_size)
    return values


def dino_input(image: np.ndarray, size: int) -> np.ndarray:
    """Pillow bilinear (antialiased) to `size` x `size`, /255, ImageNet normalisation."""
    from nsync_jax.models.vit import IMAGENET_MEAN, IMAGENET_STD

    resized = np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BILINEAR), np.float32)
    return (resized / 255 - np.float32(IMAGENET_MEAN)) / np.float32(IMAGENET_STD)


def self_similarity(keys: jnp.ndarray) -> jnp.ndarray:
    """Cosine similarity of every pair of tokens, `(..., tokens, hidden)` -> `(..., tokens, tokens)`; the norm
    product is clamped at 1e-8, as Splice's `attn_cosine_sim`."""
    norms = jnp.linalg.norm(keys, axis=-1, keepdims=True)
    return keys @ jnp.swapaxes(keys, -1, -2) / jnp.maximum(norms * jnp.swapaxes(norms, -1, -2), 1e-8)


def structure_values(weights_dir: Path | None, originals: list[np.ndarray], edits: list[np.ndarray],
                     batch_size: int) -> np.ndarray:
    """Splice's structure distance per pair: the mean squared difference of the two self-similarity matrices."""
    from nsync_jax.models.vit import load_vit

    model = load_vit(network_path(weights_dir, "dino"))
    size = model.config.image_size

    def forward(m, x):
        similarity = self_similarity(m.last_layer_keys(x.reshape(-1, *x.shape[2:]))).reshape(*x.shape[:2], -1)
        return ((similarity[:, 0] - similarity[:, 1]) ** 2).mean(-1)

    pairs = (np.stack([dino_input(o, size), dino_input(e, size)]) for o, e in zip(originals, edits))
    return evaluate.batched_features(model, forward, pairs, len(edits), batch_size)


# ------------------------------------------------------------------------------------------------------------
# Folders, pairing, the command
# ------------------------------------------------------------------------------------------------------------

def _texts(value: str | Path | None, stems: list[str], flag: str) -> list[str] | None:
    """One text for every edit (a string), or `<stem>.txt` per edit (a folder)."""
    if value is None:
        return None
    if isinstance(value, Path):
        texts = imageio.read_captions(value, stems)
        return [texts[s] for s in stems]
    return [imageio.caption_text(value, flag)] * len(stems)


def _masks(masks_dir: Path | None, stems: list[str], edits: list[np.ndarray]) -> list[np.ndarray | None]:
    """Foreground masks (white, >= 128 in the channel mean) of each edit, the edit's size; None without a folder."""
    if masks_dir is None:
        return [None] * len(stems)
    folder = evaluate.read_image_folder(masks_dir)
    found = dict(zip(folder.stems, folder.images))
    masks = []
    for stem, edit in zip(stems, edits):
        if stem not in found:
            raise UserError(f"{masks_dir}: no mask for edit {stem!r} (masks are matched by file stem)")
        if found[stem].shape != edit.shape:
            raise UserError(f"{masks_dir}: mask {stem!r} is {found[stem].shape[1]}x{found[stem].shape[0]}, its edit "
                            f"{edit.shape[1]}x{edit.shape[0]}")
        masks.append(found[stem].mean(-1) >= 128)
    return masks


def pair_metrics(ev: EditEvaluation, originals: list[np.ndarray], edits: list[np.ndarray], *,
                 sources: list[str] | None = None, targets: list[str] | None = None,
                 masks: list[np.ndarray | None] | None = None) -> dict[str, np.ndarray]:
    """Each metric of `ev.metrics`, per (original, edit) pair of uint8 RGB images: `{metric: (pairs,)}`.

    `sources`/`targets`: one text per edit (CLIP accuracy needs both, CLIP score the targets); `masks`: bool
    foregrounds of the edits' size, or None per pair (background LPIPS then covers the whole image).
    """
    unknown = [m for m in ev.metrics if m not in EDIT_METRICS]
    if unknown or not ev.metrics:
        raise UserError(f"--metrics: unknown metric {unknown[0] if unknown else '(none)'!r}; "
                        f"choose from {','.join(EDIT_METRICS)}")
    if ev.lpips_net not in LPIPS_NETS:
        raise UserError(f"--lpips-net {ev.lpips_net!r}: expected one of {', '.join(LPIPS_NETS)}")
    values = {}
    if {"clip_accuracy", "clip_score"} & set(ev.metrics):
        wants_source = "clip_accuracy" in ev.metrics
        if targets is None or (wants_source and sources is None):
            flag = "target" if targets is None else "source"
            raise UserError(f"--{flag}: the CLIP metrics need each edit's target text (and, for clip_accuracy, its "
                            f"source text): give --{flag} TEXT or --{flag}-prompts DIR, or leave them out of --metrics")
        image, target_text, source_text = clip_embeddings(ev.weights, edits, targets,
                                                          sources if wants_source else None, ev.batch_size)
        to_target = cosine(image, target_text)
        if wants_source:
            values["clip_accuracy"] = to_target > cosine(image, source_text)
        values["clip_score"] = 100 * to_target
    if "background_lpips" in ev.metrics:
        values["background_lpips"] = lpips_values(ev.weights, ev.lpips_net, originals, edits,
                                                  masks or [None] * len(edits), ev.batch_size)
    if "structure_distance" in ev.metrics:
        values["structure_distance"] = structure_values(ev.weights, originals, edits, ev.batch_size)
    return {m: values[m] for m in ev.metrics}


def summarise(name: str, values: np.ndarray) -> dict:
    """Mean, std and count over pairs; CLIP score's mean is clamped at 0, as torchmetrics' (`metrics.clip_score`)."""
    mean = float(np.mean(values))
    return {"value": max(mean, 0.0) if name == "clip_score" else mean, "std": float(np.std(values)),
            "pairs": len(values)}


def evaluate_edits(ev: EditEvaluation, originals_dir: Path, edits_dir: Path, *, source: str | Path | None = None,
                   target: str | Path | None = None, masks_dir: Path | None = None) -> dict:
    """Every metric of `ev.metrics` over the (original, edit) pairs of two folders, as a JSON-ready dict.

    `source`/`target`: one text for all edits, or a folder of `<stem>.txt` (a `Path`); CLIP accuracy needs
    both, CLIP score the target. `masks_dir`: foreground masks `<stem>.<image suffix>` for background LPIPS.
    An input no requested metric reads is an error.
    """
    for given, flag, readers in ((source, "--source", {"clip_accuracy"}),
                                 (target, "--target", {"clip_accuracy", "clip_score"}),
                                 (masks_dir, "--masks", {"background_lpips"})):
        if given is not None and not readers & set(ev.metrics):
            raise UserError(f"{flag}: not used by --metrics {','.join(ev.metrics)} "
                            f"(only by {','.join(sorted(readers))})")
    originals, edits = evaluate.read_image_folder(originals_dir), evaluate.read_image_folder(edits_dir)
    by_stem = dict(zip(originals.stems, originals.images))
    missing = [s for s in edits.stems if s not in by_stem]
    if missing:
        raise UserError(f"{originals_dir}: no original for edit {missing[0]!r} ({len(missing)} missing; pairs are "
                        "matched by file stem)")
    stems = edits.stems
    original_images = [by_stem[s] for s in stems]
    if "background_lpips" in ev.metrics:
        for original, edit, stem in zip(original_images, edits.images, stems):
            if original.shape != edit.shape:
                raise UserError(f"{edits_dir}: edit {stem!r} is {edit.shape[1]}x{edit.shape[0]}, its original "
                                f"{original.shape[1]}x{original.shape[0]}; LPIPS compares images of one size")
    values = pair_metrics(ev, original_images, edits.images, sources=_texts(source, stems, "--source"),
                          targets=_texts(target, stems, "--target"), masks=_masks(masks_dir, stems, edits.images))
    region = "outside the masks' foreground" if masks_dir is not None else "the whole image (no masks)"
    definitions = {
        "clip_accuracy": "share of edits closer in CLIP to the target text than to the source text (ties miss)",
        "clip_score": "100 * cos(edit, target text), mean clamped at 0 (torchmetrics CLIPScore)",
        "background_lpips": f"LPIPS v0.1 ({ev.lpips_net}), {region}",
        "structure_distance": "MSE of the self-similarity of DINO-ViT's last-layer keys (Splice)"}
    return {"originals": originals.report(), "edits": edits.report(), "pairs": len(stems),
            "originals_without_edit": len(originals.stems) - len(stems),
            "settings": {"weights": None if ev.weights is None else str(ev.weights), "lpips_net": ev.lpips_net,
                         "masks": None if masks_dir is None else str(masks_dir)},
            "metrics": {m: {**summarise(m, v), "definition": definitions[m]} for m, v in values.items()},
            "per_image": {stem: {m: v[i].item() for m, v in values.items()} for i, stem in enumerate(stems)}}


def table(result: dict) -> str:
    """The scores as a small text table."""
    rows = [f"{'metric':<20} {'value':>12} {'std':>10}  pairs"]
    for name, m in result["metrics"].items():
        rows.append(f"{name:<20} {m['value']:>12.6g} {m['std']:>10.4g}  {m['pairs']}")
    for side in ("originals", "edits"):
        for bad in result[side]["unreadable"]:
            rows.append(f"unreadable {side[:-1]} {bad['file']}: {bad['error']}")
    return "\n".join(rows)
