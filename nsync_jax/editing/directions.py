"""Editing directions in the text encoder's output space, as pix2pix-zero computes them.

A concept's embedding is the mean text-encoder output, over every position (padding included), of a bank of
sentences that mention it; the direction from a source concept to a target one is the difference of the two
means, added to every position of the caption's embedding. A bank is `<word>.txt` (one sentence per line) in
a folder of banks, or is built from `TEMPLATES`. Each bank's mean is cached in a `.npy` file whose name holds
a hash of the sentences and of the text encoder's files, so a bank is encoded once per model.

With a target sentence instead of a word pair, the direction is that sentence's embedding minus the caption's.
"""
from __future__ import annotations

import functools
import hashlib
import json
import warnings
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nsync_jax import files, tokens
from nsync_jax.errors import UserError
from nsync_jax.pipeline import StableDiffusion, encode_text

# Sentences around a word when no bank is given; pix2pix-zero's banks hold ~1000 sentences written by a
# language model, which these only approximate.
TEMPLATES = (
    "a photo of a {}.", "a picture of a {}.", "a painting of a {}.", "a drawing of a {}.", "a sketch of a {}.",
    "a close-up photo of a {}.", "a blurry photo of a {}.", "a bright photo of a {}.", "a dark photo of a {}.",
    "a black and white photo of a {}.", "a photo of a small {}.", "a photo of a large {}.", "a cropped photo of a {}.",
    "a rendering of a {}.", "a cartoon of a {}.", "a {} in a field.", "a {} on the street.", "a {} in the snow.",
    "a {} indoors.", "a {} at night.", "a {} in the sunlight.", "a {} next to a tree.", "there is a {} in the picture.",
    "a good photo of the {}.",
)
ENCODE_BATCH = 32  # sentences per text-encoder call (a fixed shape: one compilation per model)


@functools.lru_cache(maxsize=4)
def _compiled_encoder(graphdef):
    return jax.jit(lambda state, rows, ids: encode_text(nnx.merge(graphdef, state), rows, ids).astype(jnp.float32))


def encode_prompts(pipe: StableDiffusion, prompts: Sequence[str]) -> np.ndarray:
    """The text encoder's outputs `(len(prompts), tokens, width)` float32, padded and truncated as sampling does."""
    graphdef, state = nnx.split(pipe.text_encoder)
    encode = _compiled_encoder(graphdef)
    ids = tokens.tokenize(pipe.tokenizer, [tokens.expand_placeholders(p, pipe.tokenizer) for p in prompts])
    outputs = []
    for first in range(0, len(ids), ENCODE_BATCH):
        batch = ids[first:first + ENCODE_BATCH]
        padded = np.concatenate([batch, np.repeat(batch[-1:], ENCODE_BATCH - len(batch), axis=0)])
        outputs.append(np.asarray(encode(state, pipe.extra_token_rows, padded))[:len(batch)])
    return np.concatenate(outputs)


def check_word(word: str, flag: str) -> str:
    """The word itself, or an error naming `flag` when it cannot name a bank."""
    word = word.strip()
    if not word or any(c in word for c in "/\\\n"):
        raise UserError(f"{flag} {word!r}: a concept must be a non-empty word or phrase without slashes")
    return word


def read_bank(folder: Path, word: str) -> tuple[list[str], Path]:
    """The sentences of `folder/<word>.txt`, one per non-empty line."""
    path = Path(folder) / f"{word}.txt"
    if not path.is_file():
        raise UserError(f"{path}: no sentence bank for {word!r} (one sentence per line); add it, or leave out "
                        "--directions to build banks from templates")
    try:
        sentences = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read the sentence bank ({type(e).__name__}: {e})") from None
    if not sentences:
        raise UserError(f"{path}: the sentence bank for {word!r} is empty")
    return sentences, path


def template_bank(word: str) -> list[str]:
    return [template.format(word) for template in TEMPLATES]


def _model_fingerprint(pipe: StableDiffusion) -> dict:
    """What the text encoder's outputs depend on: its files (by name, size and time), dtype and learned rows."""
    stats = sorted((str(p.relative_to(pipe.folder)), p.stat().st_size, p.stat().st_mtime_ns)
                   for part in ("text_encoder", "tokenizer") for p in (pipe.folder / part).iterdir() if p.is_file())
    dtype = str(pipe.text_encoder.embeddings.token_embedding.embedding[...].dtype)
    return {"folder": str(pipe.folder.resolve()), "files": stats, "dtype": dtype,
            "learned_rows": hashlib.sha256(np.ascontiguousarray(pipe.extra_token_rows).tobytes()).hexdigest()}


def mean_embedding(pipe: StableDiffusion, sentences: Sequence[str], cache: Path) -> np.ndarray:
    """The mean text-encoder output `(tokens, width)` of `sentences`, read from or written to `cache`."""
    if cache.is_file():
        return np.load(cache)
    mean = encode_prompts(pipe, sentences).astype(np.float64).mean(axis=0).astype(np.float32)
    try:
        files.atomic_write(cache, lambda tmp: _save_npy(tmp, mean))
    except OSError as e:
        warnings.warn(f"{cache}: cannot cache the embedding ({e}); it will be encoded again next time")
    return mean


def _save_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as f:  # a file object: np.save would add ".npy" to the temporary name
        np.save(f, array)


def concept_embedding(pipe: StableDiffusion, word: str, *, banks: Path | None, cache_dir: Path
                      ) -> tuple[np.ndarray, dict]:
    """The mean embedding of `word`'s bank (from `banks`, else from the templates) and where it came from."""
    sentences, bank = read_bank(banks, word) if banks is not None else (template_bank(word), None)
    key = hashlib.sha256(json.dumps([_model_fingerprint(pipe), sentences]).encode()).hexdigest()[:16]
    cache = Path(cache_dir) / f"{word}.{key}.npy"
    embedding = mean_embedding(pipe, sentences, cache)
    source = {"word": word, "bank": str(bank) if bank else "templates", "sentences": len(sentences),
              "cache": str(cache)}
    return embedding, source


def word_direction(pipe: StableDiffusion, source: str, target: str, *, banks: Path | None, cache_dir: Path
                   ) -> tuple[np.ndarray, dict]:
    """pix2pix-zero's direction `(tokens, width)` from `source` to `target`, and its provenance."""
    source_embedding, source_info = concept_embedding(pipe, source, banks=banks, cache_dir=cache_dir)
    target_embedding, target_info = concept_embedding(pipe, target, banks=banks, cache_dir=cache_dir)
    return target_embedding - source_embedding, {"kind": "sentence banks", "source": source_info,
                                                 "target": target_info}


def word_token_mask(tokenizer, prompt: str, words: Sequence[str]) -> np.ndarray:
    """`(tokens,)` bool: the positions of the prompt's tokens that spell any of `words` (whole BPE words)."""
    ids = tokens.tokenize(tokenizer, [prompt])[0]
    mask = np.zeros(len(ids), bool)
    for word in words:
        word_ids = tokenizer(word, add_special_tokens=False).input_ids
        for start in range(1, len(ids) - len(word_ids) + 1):
            if word_ids and list(ids[start:start + len(word_ids)]) == word_ids:
                mask[start:start + len(word_ids)] = True
    return mask
