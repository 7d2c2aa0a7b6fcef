"""Token rows: the trainables of Textual Inversion, NSYNC and DreamArtist words (SD and SDXL)."""
from __future__ import annotations

from pathlib import Path

import jax
import numpy as np

from nsync_jax import distributed, export, tokens
from nsync_jax.errors import UserError
from nsync_jax.train.trainables.base import Trainable, check_sdxl, register, split_frozen


class Embeddings(Trainable):
    name = "embeddings"
    checkpoint_key = "rows"
    norm_metric = "row_norm"
    trains_modules = False
    export_formats = export.FORMATS

    def split(self, pipe, config, method, names):
        rows = self.add_words(pipe.text_encoder, pipe.tokenizer, config, method)
        return *split_frozen(pipe, names), rows

    @staticmethod
    def add_words(text_encoder, tokenizer, config, method) -> np.ndarray:
        """The initial rows of the method's words for one text encoder, the words added to its tokenizer."""
        table = np.asarray(text_encoder.embeddings.token_embedding.embedding[...], np.float32)
        rows = method.initial_rows(config, table, tokenizer)
        method.add_words(tokenizer, config)  # row i is token id len(table) + i
        return rows

    def configured(self, config):
        return DECAYED_TABLE if config.train.weight_decay_scope == "table" else self

    def for_model(self, sdxl, config, method):
        if not sdxl:
            return self
        check_sdxl(config, method)
        if config.initializer_embedding:
            raise UserError("config initializer_embedding is not supported on Stable Diffusion XL yet: use "
                            "initializer_token")
        return SDXL_EMBEDDINGS

    def embed(self, trained, table, ids):
        return tokens.embed_tokens(table, trained, ids)

    def to_host(self, trained):  # replicated: every process has it, no gathering
        return distributed.to_host(trained).astype(np.float32)

    def show(self, pipe, trained):
        pipe.extra_token_rows = distributed.to_host(trained).astype(np.float32)

    def write_outputs(self, workdir, config, method, trained, metadata):
        return method.write_words(workdir / "learned_embeds.safetensors", config, trained, metadata, "diffusers")

    def export(self, output, fmt, config, method, trained, metadata, source):
        paths = method.write_words(output, config, trained, metadata, fmt)
        written = [self.describe(path, word) for path, word in zip(paths, method.words(config))]
        return f"wrote {', '.join(written)}, step {metadata['step']}"

    @staticmethod
    def describe(path: Path, word) -> str:
        """What an exported file of `word` (`methods.Word`) holds, for the export's line."""
        return f"{path} ({word.token}, {word.count} vectors)"


class DecayedTableEmbeddings(Embeddings):
    """Token rows trained as the released NSYNC and Textual Inversion scripts train them
    (`train.weight_decay_scope="table"`): their AdamW holds the whole embedding table, so its decoupled weight
    decay shrinks every vocabulary row too. Rows without gradient keep zero Adam moments, so each shrinks by
    (1 - lr wd) a step; what is trained carries that factor as a scalar `table_scale` (its gradient stopped),
    which the same AdamW shrinks the same way, and the step scales the table's rows by it. Files hold the token
    rows, used with the original table at inference as the released code does; their metadata say so."""

    def split(self, pipe, config, method, names):
        graphdefs, frozen, rows = super().split(pipe, config, method, names)
        return graphdefs, frozen, {"rows": rows, "table_scale": np.ones((), np.float32)}

    def embed(self, trained, table, ids):
        return tokens.embed_tokens(table, trained["rows"], ids, jax.lax.stop_gradient(trained["table_scale"]))

    def to_host(self, trained):
        return jax.tree.map(super().to_host, trained)

    def show(self, pipe, trained):
        super().show(pipe, trained["rows"])

    def for_model(self, sdxl, config, method):
        if sdxl:
            raise UserError("config train.weight_decay_scope='table' is not supported on Stable Diffusion XL yet: "
                            "use 'rows'")
        return self

    def metadata(self, config):
        return {"weight_decay_scope": "table"}

    def write_outputs(self, workdir, config, method, trained, metadata):
        return super().write_outputs(workdir, config, method, trained["rows"],
                                     dict(metadata, table_scale=float(trained["table_scale"])))

    def export(self, output, fmt, config, method, trained, metadata, source):
        scale = float(trained["table_scale"])
        line = super().export(output, fmt, config, method, trained["rows"], dict(metadata, table_scale=scale), source)
        return (f"{line}; in training the rest of the vocabulary was decayed to {scale:.4f} of its values "
                "(weight_decay_scope='table'): the files hold the token rows, for the original table")


class SDXLEmbeddings(Embeddings):
    """Token rows on Stable Diffusion XL, as the released SDXL NSYNC and Textual Inversion scripts train them: the
    method's words in both tokenizers and rows for both text encoders, `{"text_encoder": (n, 768),
    "text_encoder_2": (n, 1280)}`, each started from the initializer word's row in its own encoder. NSYNC's
    `granularity="leaf"` projects each encoder's rows on their own (as released). Files: per word one safetensors
    with `clip_l` and `clip_g` (A1111, ComfyUI, Civitai; diffusers loads each half into its encoder), named as the
    word is called at sampling, for both `--format diffusers` and `a1111`."""

    def split(self, pipe, config, method, names):
        rows = {name: self.add_words(getattr(pipe, name), getattr(pipe, tokenizer), config, method)
                for name, tokenizer in (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"))}
        return *split_frozen(pipe, dict.fromkeys((*names, "text_encoder_2"))), rows

    def encoder_rows(self, trained, name):
        return trained[name]

    def to_host(self, trained):
        return jax.tree.map(super().to_host, trained)

    def show(self, pipe, trained):
        pipe.extra_token_rows = tuple(self.to_host(trained[name]) for name in ("text_encoder", "text_encoder_2"))

    @staticmethod
    def describe(path, word):
        return (f"{path} (SDXL clip_l/clip_g, {word.count} vectors; the token is the file name: "
                f"{Path(path).stem})")


EMBEDDINGS = register(Embeddings())
DECAYED_TABLE = DecayedTableEmbeddings()  # `embeddings` with train.weight_decay_scope="table"
SDXL_EMBEDDINGS = SDXLEmbeddings()  # `embeddings` on Stable Diffusion XL
