"""Tokenizer and learned tokens (Textual Inversion / NSYNC pseudo-words).

A learned token of n vectors is n tokenizer entries named as diffusers names them, `<tok>`, `<tok>_1`, ...,
`<tok>_{n-1}`; a prompt mentioning `<tok>` is expanded to all of them. Their embedding rows live outside the
frozen table: ids `>= len(table)` index `new_rows`, so a gradient reaches only the learned rows and the
optimizer state is O(n x width) rather than the whole vocabulary.
"""
from __future__ import annotations

import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from nsync_jax import weights
from nsync_jax.errors import UserError


def load_tokenizer(folder: Path):
    """transformers' `CLIPTokenizer` from a diffusers `tokenizer/` folder."""
    from transformers import CLIPTokenizer

    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: tokenizer folder not found")
    try:
        # transformers 5 silently ignores vocab_file=/merges_file= keywords: from_pretrained reads the folder.
        return CLIPTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError, TypeError) as e:
        raise UserError(f"{folder}: cannot load the tokenizer ({type(e).__name__}: {e})") from None


def vector_names(token: str, num_vectors: int) -> list[str]:
    """diffusers' names for the vectors of a multi-vector token."""
    return [token] + [f"{token}_{i}" for i in range(1, num_vectors)]


def add_placeholder_tokens(tokenizer, token: str, num_vectors: int) -> list[int]:
    """Adds `token` (and `token_1`...) to the tokenizer; returns their ids, consecutive from `len(tokenizer)`."""
    names = vector_names(token, num_vectors)
    vocabulary = tokenizer.get_vocab()
    for name in names:
        if name in vocabulary:
            raise UserError(f"token {name!r} is already in the tokenizer: choose another placeholder name")
    added = tokenizer.add_tokens(names)
    if added != len(names):
        raise UserError(f"could not add token {token!r} to the tokenizer")
    ids = tokenizer.convert_tokens_to_ids(names)
    if ids != list(range(ids[0], ids[0] + len(ids))):
        raise UserError(f"token {token!r} did not get consecutive ids: {ids}")
    return ids


def expand_placeholders(prompt: str, tokenizer) -> str:
    """Writes `<tok>` as `<tok> <tok>_1 ...` for every multi-vector token the tokenizer has been given."""
    added = set(tokenizer.get_added_vocab())
    for name in sorted(added, key=len, reverse=True):
        if name + "_1" not in added or re.search(r"_\d+$", name):
            continue
        count = 1
        while f"{name}_{count}" in added:
            count += 1
        pattern = re.escape(name) + r"(?!_\d)"
        prompt = re.sub(pattern, lambda _: " ".join(vector_names(name, count)), prompt)
    return prompt


def tokenize(tokenizer, prompts: list[str]) -> np.ndarray:
    """Token ids `(batch, model_max_length)` int32, padded and truncated as diffusers' pipeline does."""
    ids = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="np").input_ids
    return ids.astype(np.int32)


def embed_tokens(table: jax.Array, new_rows: jax.Array, ids: jax.Array) -> jax.Array:
    """Embeddings `(*ids.shape, width)` where ids `>= len(table)` select `new_rows`.

    Only the rows the ids use receive gradient; the frozen table is never concatenated or copied.
    """
    vocab = table.shape[0]
    frozen = jnp.take(table, jnp.minimum(ids, vocab - 1), axis=0)
    if new_rows.shape[0] == 0:
        return frozen
    learned = jnp.take(new_rows, jnp.clip(ids - vocab, 0, new_rows.shape[0] - 1), axis=0)
    return jnp.where((ids >= vocab)[..., None], learned.astype(frozen.dtype), frozen)


def initial_rows(table: np.ndarray, tokenizer, initializer_token: str, num_vectors: int) -> np.ndarray:
    """`num_vectors` copies of the initializer word's embedding row, float32 `(num_vectors, width)`."""
    ids = tokenizer.encode(initializer_token, add_special_tokens=False)
    if len(ids) != 1:
        raise UserError(f"initializer token {initializer_token!r} is {len(ids)} tokens; it must be exactly one")
    return np.repeat(np.asarray(table[ids[0]], np.float32)[None], num_vectors, axis=0)


def load_learned_embeddings(path: Path) -> dict[str, np.ndarray]:
    """Token name -> rows `(num_vectors, width)` float32, from the embedding files users have:

    * diffusers `learned_embeds.safetensors` / `.bin`: `{token: (width,) or (n, width)}`;
    * A1111 `.pt`: `{"string_to_param": {"*": (n, width)}, ...}`, the token being the file stem;
    * A1111 `.safetensors`: `{"emb_params": (n, width)}`, the token being the file stem.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: embedding file not found")
    raw = weights.read_state_dict(path) if path.suffix == ".safetensors" else weights.read_torch_pickle(path)
    if "string_to_param" in raw:
        raw = {"emb_params": next(iter(raw["string_to_param"].values()), None)}
    if "emb_params" in raw:
        raw = {path.stem: raw["emb_params"]}
    embeddings = {}
    for name, value in raw.items():
        array = _as_numpy(value)
        if array is None or array.ndim not in (1, 2) or not np.issubdtype(array.dtype, np.floating):
            raise UserError(f"{path}: entry {name!r} is not an embedding (expected a (width,) or (n, width) "
                            "float array)")
        embeddings[name] = np.atleast_2d(array.astype(np.float32))
    if not embeddings:
        raise UserError(f"{path}: no embeddings found")
    return embeddings


def _as_numpy(value) -> np.ndarray | None:
    if isinstance(value, np.ndarray):
        return value
    if hasattr(value, "detach"):
        return weights.tensor_to_numpy(value)
    return None
