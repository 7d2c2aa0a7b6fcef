"""Tokenizer and learned tokens (Textual Inversion / NSYNC pseudo-words).

A learned token of n vectors is n tokenizer entries named as diffusers names them, `<tok>`, `<tok>_1`, ...,
`<tok>_{n-1}`; a prompt mentioning `<tok>` is expanded to all of them. Their embedding rows live outside the
frozen table: ids `>= len(table)` index `new_rows`, so a gradient reaches only the learned rows and the
optimizer state is O(n x width) rather than the whole vocabulary. This needs the tokenizer's ids to run
on from the table: `len(tokenizer) == len(table)` before any token is added (true of every SD folder).
"""
from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from nsync_jax import weights
from nsync_jax.errors import UserError
from nsync_jax.files import write_text


def load_tokenizer(folder: Path):
    """transformers' `CLIPTokenizer` from a diffusers `tokenizer/` folder (tokenizer.json or vocab+merges)."""
    from transformers import CLIPTokenizer

    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: tokenizer folder not found")
    # from_pretrained builds an empty tokenizer from a folder without these files, without complaint.
    if not (folder / "tokenizer.json").is_file() and not all((folder / n).is_file()
                                                              for n in ("vocab.json", "merges.txt")):
        raise UserError(f"{folder}: not a CLIP tokenizer folder (needs tokenizer.json, or vocab.json and "
                        "merges.txt)")
    try:
        # transformers 5 silently ignores CLIPTokenizer(vocab_file=..., merges_file=...): read the folder.
        return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:  # the Rust `tokenizers` raises a bare Exception for malformed vocab or merges
        raise UserError(f"{folder}: cannot load the tokenizer ({type(e).__name__}: {e})") from None


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable character table (the base of the BPE vocabulary)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars)))


def clip_bpe_merges(path: Path) -> list[tuple[str, str]]:
    """The 48,894 merges of OpenAI CLIP's `bpe_simple_vocab_16e6.txt.gz` (as CLIP's own tokenizer reads it)."""
    try:
        lines = gzip.open(path, "rt", encoding="utf-8").read().split("\n")
    except OSError as e:
        raise UserError(f"{path}: cannot read the CLIP BPE file ({e})") from None
    return [tuple(line.split()) for line in lines[1:49152 - 256 - 2 + 1]]


def write_clip_tokenizer(folder: Path, merges: list[tuple[str, str]], model_max_length: int = 77) -> Path:
    """Writes a transformers `CLIPTokenizer` folder whose vocabulary is built from `merges` as CLIP builds it.

    With CLIP's own merges this is the 49,408-token vocabulary of every Stable Diffusion 1.x tokenizer.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    base = list(bytes_to_unicode().values())
    vocab = base + [c + "</w>" for c in base]
    vocab += list(dict.fromkeys("".join(merge) for merge in merges if "".join(merge) not in vocab))
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
               "pad_token": "<|endoftext|>"}
    files = {
        "vocab.json": json.dumps({token: i for i, token in enumerate(vocab)}, ensure_ascii=False),
        "merges.txt": "#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n",
        "special_tokens_map.json": json.dumps(special),
        "tokenizer_config.json": json.dumps({"model_max_length": model_max_length,
                                             "tokenizer_class": "CLIPTokenizer", "do_lower_case": True, **special}),
    }
    for name, text in files.items():
        write_text(folder / name, text)
    return folder


def tokenize(tokenizer, prompts: list[str]) -> np.ndarray:
    """Token ids `(batch, model_max_length)` int32, padded and truncated as diffusers' pipeline does."""
    ids = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="np").input_ids
    return ids.astype(np.int32)


def vector_names(token: str, num_vectors: int) -> list[str]:
    """diffusers' tokenizer entries for the vectors of a multi-vector token: `tok, tok_1, ..., tok_{n-1}`."""
    return [token] + [f"{token}_{i}" for i in range(1, num_vectors)]


def _check_new_names(tokenizer, names: list[str]) -> None:
    # CLIP lower-cases prompts and added tokens alike, so `<Style>` would shadow an existing `<style>`.
    existing = {name.lower() for name in tokenizer.get_vocab()}
    seen = set()
    for name in names:
        if name.lower() in existing or name.lower() in seen:
            raise UserError(f"token {name!r} is already in the tokenizer: choose another placeholder name")
        seen.add(name.lower())


def add_placeholder_tokens(tokenizer, token: str, num_vectors: int) -> list[int]:
    """Adds `token`, `token_1`, ... to the tokenizer; returns their ids, consecutive from the old `len(tokenizer)`."""
    if num_vectors < 1:
        raise UserError(f"token {token!r}: the number of vectors must be at least 1, got {num_vectors}")
    names = vector_names(token, num_vectors)
    _check_new_names(tokenizer, names)
    first = len(tokenizer)
    tokenizer.add_tokens(names)
    ids = tokenizer.convert_tokens_to_ids(names)
    if ids != list(range(first, first + num_vectors)):
        raise UserError(f"token {token!r} got ids {ids}, but the tokenizer had {first} entries: its vocabulary "
                        "ids have gaps, so new ids would not match new embedding rows")
    return ids


def expand_placeholders(prompt: str, tokenizer) -> str:
    """Writes each multi-vector token `<tok>` of the tokenizer as `<tok> <tok>_1 ...` (diffusers'
    `maybe_convert_prompt`), case-insensitively as the tokenizer matches; explicit `<tok>_i` stay as written."""
    added = {name.lower(): name for name in tokenizer.get_added_vocab()}
    counts = {}
    for lower, name in added.items():
        count = 1
        while f"{lower}_{count}" in added:
            count += 1
        if count > 1:
            counts[lower] = (name, count)
    if not counts:
        return prompt
    # One pass over an alternation, longest first, so that no replacement is itself replaced again.
    alternatives = "|".join(re.escape(lower) for lower in sorted(counts, key=len, reverse=True))
    pattern = re.compile(f"(?:{alternatives})(?!_\\d)", re.IGNORECASE)
    return pattern.sub(lambda m: " ".join(vector_names(*counts[m.group(0).lower()])), prompt)


def embed_tokens(table: jax.Array, new_rows: jax.Array, ids: jax.Array, table_scale=None) -> jax.Array:
    """Embeddings `(*ids.shape, width)`: ids `< len(table)` select `table` (times `table_scale` when given), the
    others `new_rows[id - len(table)]`.

    Only the rows the ids use receive gradient, and the frozen table is never concatenated or copied.
    Ids past the new rows are clamped to the last one (an index error cannot be raised under jit).
    """
    vocab = table.shape[0]
    frozen = jnp.take(table, jnp.minimum(ids, vocab - 1), axis=0)
    if table_scale is not None:
        frozen = frozen * jnp.asarray(table_scale, frozen.dtype)
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

    `.bin`/`.pt` files need PyTorch (the `torch` extra).
    """
    path = Path(path)
    raw = _read_embedding_file(path)
    if "string_to_param" in raw:
        params = raw["string_to_param"]
        if not isinstance(params, dict) or len(params) != 1:
            raise UserError(f"{path}: 'string_to_param' must hold exactly one embedding")
        raw = {"emb_params": next(iter(params.values()))}
    if "emb_params" in raw:
        raw = {path.stem: raw["emb_params"]}
    if {"clip_l", "clip_g"} <= set(raw):
        raise UserError(f"{path}: an SDXL embedding (clip_l/clip_g), but the model is Stable Diffusion 1.x/2.x")
    if not raw:
        raise UserError(f"{path}: no embeddings found")
    return {str(name): _embedding_rows(value, name, path) for name, value in raw.items()}


# The released SDXL NSYNC and Textual Inversion scripts save one file per text encoder:
# `learned_embeds1-step-N.bin` and `learned_embeds2-step-N.bin`, `{token: row}` each.
RELEASED_SDXL_PAIR = ("learned_embeds1", "learned_embeds2")


def load_sdxl_embeddings(path: Path) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """An SDXL embedding file as A1111, ComfyUI and Civitai share it (`clip_l` `(n, 768)`, `clip_g` `(n, 1280)`):
    `({token: clip_l rows}, {token: clip_g rows})` float32, the token being the file stem. Or either file of the
    released SDXL scripts' pair (`RELEASED_SDXL_PAIR`), the token being their key."""
    path = Path(path)
    if path.name.startswith(RELEASED_SDXL_PAIR):
        return _load_released_sdxl_pair(path)
    raw = _read_embedding_file(path)
    if not {"clip_l", "clip_g"} <= set(raw):
        raise UserError(f"{path}: not an SDXL embedding (it has no clip_l and clip_g entries; an SD 1.x/2.x "
                        "embedding does not fit SDXL's two text encoders)")
    rows = [_embedding_rows(raw[name], name, path) for name in ("clip_l", "clip_g")]
    if len(rows[0]) != len(rows[1]):
        raise UserError(f"{path}: clip_l has {len(rows[0])} vectors but clip_g {len(rows[1])}; they must match")
    return {path.stem: rows[0]}, {path.stem: rows[1]}


def _load_released_sdxl_pair(path: Path) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Both files of the released scripts' pair named by either (`learned_embeds1-step-8000.bin` reads
    `learned_embeds2-step-8000.bin` next to it, and the reverse)."""
    suffix = path.name[len(RELEASED_SDXL_PAIR[0]):]
    files = [path.with_name(stem + suffix) for stem in RELEASED_SDXL_PAIR]
    for file in files:
        if not file.is_file():
            raise UserError(f"{file}: not found; the released SDXL scripts' {' and '.join(RELEASED_SDXL_PAIR)} files "
                            "hold one text encoder's rows each and are read together")
    pair = [load_learned_embeddings(file) for file in files]
    if set(pair[0]) != set(pair[1]):
        raise UserError(f"{files[1]}: holds tokens {sorted(pair[1])}, but {files[0].name} {sorted(pair[0])}")
    return pair[0], pair[1]


def _read_embedding_file(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"{path}: embedding file not found")
    if path.suffix == ".safetensors":
        return weights.read_state_dict(path)
    if path.suffix in (".bin", ".pt"):
        return weights.read_torch_pickle(path)
    raise UserError(f"{path}: unknown embedding file type (expected .safetensors, .bin or .pt)")


def _embedding_rows(value, name: str, path: Path) -> np.ndarray:
    """One entry of an embedding file as float32 rows `(n, width)`, refused unless it is one."""
    array = weights.tensor_to_numpy(value) if hasattr(value, "detach") else value
    floating = isinstance(array, np.ndarray) and (array.dtype.kind == "f" or array.dtype.name == "bfloat16")
    if not floating or array.ndim not in (1, 2) or array.size == 0:
        raise UserError(f"{path}: entry {name!r} is not an embedding (expected a float array of shape "
                        "(width,) or (n, width))")
    return np.atleast_2d(array.astype(np.float32))


def check_embedding_widths(embeddings: dict[str, np.ndarray], width: int, *, source: Path | str) -> None:
    for name, rows in embeddings.items():
        if rows.shape[-1] != width:
            raise UserError(f"{source}: embedding {name!r} has width {rows.shape[-1]}, but the text encoder's "
                            f"is {width} (an embedding for another model family?)")


def append_learned_rows(tokenizer, table: np.ndarray, extra_rows: np.ndarray, embeddings: dict[str, np.ndarray], *,
                        source: Path | str) -> np.ndarray:
    """`apply_learned_embeddings` for a model whose learned rows are kept apart from its frozen `table`: returns
    `extra_rows` with the rows of `embeddings` appended (float32)."""
    table = np.asarray(table, np.float32)
    extended = apply_learned_embeddings(tokenizer, np.concatenate([table, extra_rows]), embeddings, source=source)
    return extended[len(table):]


def apply_learned_embeddings(tokenizer, table: np.ndarray, embeddings: dict[str, np.ndarray], *,
                             source: Path | str) -> np.ndarray:
    """Adds the tokens of `embeddings` (from `load_learned_embeddings(source)`) to the tokenizer, all or none.

    Args:
      table: the embedding rows `(V, width)` for ids `0..V-1`, `V == len(tokenizer)`.
    Returns:
      The table with the new rows appended, `(V + total vectors, width)`, in `table`'s dtype.
    """
    table = np.asarray(table)
    if len(tokenizer) != table.shape[0]:
        raise UserError(f"{source}: the tokenizer has {len(tokenizer)} tokens but the embedding table "
                        f"{table.shape[0]} rows, so new token ids would not match new rows")
    check_embedding_widths(embeddings, table.shape[1], source=source)
    _check_new_names(tokenizer, [n for name, rows in embeddings.items() for n in vector_names(name, len(rows))])
    for name, rows in embeddings.items():
        add_placeholder_tokens(tokenizer, name, len(rows))
    return np.concatenate([table, *(rows.astype(table.dtype) for rows in embeddings.values())])
