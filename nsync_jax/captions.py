"""Captioning a folder of images with a local transformers image-to-text model (BLIP, BLIP-2, LLaVA-style).

NSYNC needs a caption per training image, both to prompt the token (`<caption> in the style of <token>`) and
to draw the caption-matched negatives. The captioner is a PyTorch model (transformers ships no Flax models
any more), run on the CPU build of torch this project pins; it is a one-off step over tens of images.
Captions are written as `<stem>.txt`, each atomically; existing ones are kept unless `overwrite`, and are read
first by `imageio.read_caption`'s rule (an empty or undecodable one is the error every command gives for it).
"""
from __future__ import annotations

from pathlib import Path

from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from nsync_jax import files, imageio
from nsync_jax.data.style_dataset import images_by_stem
from nsync_jax.errors import UserError


def load_captioner(folder: Path):
    """The processor and model of a transformers image-to-text folder, or a one-line error naming it."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise UserError(f"{folder}: not a transformers model folder (no config.json)")
    try:
        processor = AutoProcessor.from_pretrained(str(folder), local_files_only=True)
        model = AutoModelForImageTextToText.from_pretrained(str(folder), local_files_only=True).eval()
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"{folder}: cannot load an image-to-text model ({type(e).__name__}: {e})") from None
    return processor, model


def read_images(folder: Path) -> dict[str, Image.Image]:
    """Every image of `folder` by stem, all decoded before any caption is written."""
    images, unreadable = {}, []
    for stem, path in images_by_stem(Path(folder), "images").items():
        try:
            with Image.open(path) as image:
                images[stem] = image.convert("RGB")
        except (OSError, UnidentifiedImageError):
            unreadable.append(str(path))
    if unreadable:
        raise UserError(f"cannot read {len(unreadable)} image(s): {', '.join(unreadable)}")
    return images


def clean_caption(text: str, prompt: str, max_words: int) -> str:
    """One line, without the prompt the model may repeat, at most `max_words` words."""
    text = " ".join(text.split())
    if prompt and text.lower().startswith(prompt.lower()):
        text = text[len(prompt):].strip()
    return " ".join(text.split()[:max_words])


def caption_images(processor, captioner, images: list[Image.Image], *, prompt: str = "", max_words: int = 25
                   ) -> list[str]:
    """One cleaned caption per image (greedy decoding, in one batch); a caption may come out empty."""
    import torch

    inputs = processor(images=images, text=[prompt] * len(images) if prompt else None, return_tensors="pt")
    with torch.no_grad():
        ids = captioner.generate(**inputs, max_new_tokens=2 * max_words + 8, min_new_tokens=1, do_sample=False)
    return [clean_caption(text, prompt, max_words) for text in processor.batch_decode(ids, skip_special_tokens=True)]


def caption_folder(images: Path, output: Path, model: Path, *, prompt: str = "", max_words: int = 25,
                   overwrite: bool = False, batch_size: int = 8, progress: bool = True) -> dict[str, int]:
    """Writes `output/<stem>.txt` for every image without one (all when `overwrite`); returns the counts."""
    output = Path(output)
    pictures = read_images(images)
    kept = {stem for stem in pictures if not overwrite and imageio.caption_path(output, stem).is_file()}
    for stem in sorted(kept):  # a caption kept must be one that training and `negatives` read
        imageio.read_caption(imageio.caption_path(output, stem))
    todo = [stem for stem in pictures if stem not in kept]
    if not todo:
        return {"written": 0, "kept": len(pictures)}
    processor, captioner = load_captioner(model)
    output.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=len(todo), unit="img", disable=not progress)
    for first in range(0, len(todo), batch_size):
        stems = todo[first:first + batch_size]
        batch = [pictures[stem] for stem in stems]
        for stem, caption in zip(stems, caption_images(processor, captioner, batch, prompt=prompt,
                                                       max_words=max_words)):
            if not caption:
                raise UserError(f"{model}: produced an empty caption for {Path(images) / stem} "
                                "(try another --prompt or captioner)")
            files.write_text(imageio.caption_path(output, stem), caption + "\n")
        bar.update(len(stems))
    bar.close()
    return {"written": len(todo), "kept": len(pictures) - len(todo)}
