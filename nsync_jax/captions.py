"""Captioning a folder of images with a local transformers image-text-to-text model: a captioner (BLIP, BLIP-2,
GIT) continues `prompt`; a chat model (LLaVA, InternVL, Qwen2-VL: a processor with a chat template) answers it as
a question, by default the question the released NSYNC code asks InternVL2-2B (`PROMPT_PRESETS["nsync"]`).

NSYNC needs a caption per training image, both to prompt the token (`<caption> in the style of <token>`) and
to draw the caption-matched negatives. The captioner is a PyTorch model (transformers ships no Flax models
any more), run on the CPU build of torch this project pins; it is a one-off step over tens of images.
Captions are written as `<stem>.txt`, each atomically; existing ones are kept unless `overwrite`, and are read
first by `imageio.read_caption`'s rule (an empty or undecodable one is the error every command gives for it).

Models load through `AutoModelForImageTextToText`, never with custom code: InternVL2's own checkpoints
(`trust_remote_code`) are refused in one line pointing to their `-hf` conversions, which transformers reads.
"""
from __future__ import annotations

import json
from pathlib import Path

from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from nsync_jax import files, imageio
from nsync_jax.data.style_dataset import images_by_stem
from nsync_jax.errors import UserError


# The question the released code asks InternVL2-2B (`src/img2txt_internvl.py`), verbatim: an experimental setting.
PROMPT_PRESETS = {"nsync": "Describe the visual features of image briefly, with no more than 25 words. Write it in "
                           "prompt format so that I set it as a prompt."}


def check_captioner_type(folder: Path) -> None:
    """A one-line error unless `folder/config.json` names a model type transformers' image-text-to-text
    interface loads (custom-code models, such as InternVL2's own checkpoints, are not run)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES as SUPPORTED

    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{folder / 'config.json'}: unreadable ({type(e).__name__}: {e})") from None
    model_type = config.get("model_type")
    if model_type in SUPPORTED:
        return
    kind = ", ".join(config.get("architectures") or [])
    if "auto_map" in config:
        kind += ", custom code (auto_map) that is not run"
    raise UserError(f"{folder}: model_type {model_type!r} ({kind}) is not one transformers' "
                    "AutoModelForImageTextToText loads; InternVL2/2.5/3 load from their -hf "
                    "conversions (model_type 'internvl', e.g. OpenGVLab/InternVL3-1B-hf); supported model types: "
                    f"{', '.join(sorted(SUPPORTED))}")


def load_captioner(folder: Path):
    """The processor and model of a transformers image-text-to-text folder, or a one-line error naming it."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise UserError(f"{folder}: not a transformers model folder (no config.json)")
    check_captioner_type(folder)
    try:
        processor = AutoProcessor.from_pretrained(str(folder), local_files_only=True)
        model = AutoModelForImageTextToText.from_pretrained(str(folder), local_files_only=True).eval()
    except (OSError, ValueError, KeyError) as e:  # e.g. InternVL's processor "requires `torchvision`"
        message = " ".join(str(e).split())
        raise UserError(f"{folder}: cannot load an image-to-text model ({type(e).__name__}: {message})") from None
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
    """One cleaned caption per image (greedy decoding, in one batch); a caption may come out empty. A chat model
    answers `prompt` (default: the NSYNC question), a captioner continues it."""
    import torch

    chat = bool(getattr(processor, "chat_template", None))
    if chat:
        question = [{"role": "user", "content": [{"type": "image"},
                                                 {"type": "text", "text": prompt or PROMPT_PRESETS["nsync"]}]}]
        text = processor.apply_chat_template(question, add_generation_prompt=True)
        # Left padding: a decoder-only model continues every row from its last token.
        inputs = processor(images=images, text=[text] * len(images), padding=True, padding_side="left",
                           return_tensors="pt")
    else:
        inputs = processor(images=images, text=[prompt] * len(images) if prompt else None, return_tensors="pt")
    with torch.no_grad():
        ids = captioner.generate(**inputs, max_new_tokens=2 * max_words + 8, min_new_tokens=1, do_sample=False)
    if chat:  # the answer is what follows the question
        ids, prompt = ids[:, inputs["input_ids"].shape[1]:], ""
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
