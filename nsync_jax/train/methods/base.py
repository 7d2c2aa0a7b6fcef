"""What a training method is to the trainer: one object with a small, fixed interface, found by name.

A method says which settings it checks, which words it adds to the tokenizer and what their rows start as, how
it reads and prepares its data (the groups each step's batch holds), its gradient function over the shared
forward pass (`step.denoise`), the gradient transformations around the optimizer, and what its exported files
record. The base class is Textual Inversion's behaviour wherever a method has nothing of its own to say.
"""
from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np
import optax

from nsync_jax import export, tokens
from nsync_jax.errors import UserError
from nsync_jax.train.registry import Registry
from nsync_jax.train import data as train_data
from nsync_jax.train.step import Gradients, StepSpec


@dataclasses.dataclass(frozen=True)
class Word:
    """A word the run learns: its file suffix (`<name><suffix>.<ext>`), its token and its number of rows."""

    suffix: str
    token: str
    count: int


class Method:
    name: str
    # True: the method's words are token rows it always learns, so module weights (trainable lora or full) can
    # only be trained along with them: with trainable lora where `lora_branches` is set.
    token_rows_only = False
    # The branches of a fused prediction, in the order of a step's groups, as (name, file suffix): with trainable
    # lora each has adapters of its own, written to `lora<suffix>.safetensors` (DreamArtist++).
    lora_branches: tuple[tuple[str, str], ...] = ()
    contrastive = False  # True: a step also draws each positive's negative and an anchor (NSYNC's groups)
    # True: runs on Stable Diffusion XL (token rows of both encoders, `trainables.SDXLEmbeddings`, or module weights
    # with `trainables.ModuleWeights.for_model`): its data and gradients have nothing SD 1.x/2.x-specific.
    supports_sdxl = False

    def check_config(self, config: ml_collections.ConfigDict) -> None:
        """Raises UserError naming the first of this method's settings that is invalid."""

    # --- words and their rows (the embeddings trainable) ---

    def words(self, config) -> list[Word]:
        """The words a run learns, in the order of the trained row matrix."""
        return [Word("", config.placeholder_token, config.num_vectors)]

    def add_words(self, tokenizer, config) -> None:
        """Adds every learned word to the tokenizer, with consecutive ids from `len(tokenizer)`: row i of the
        trained matrix is token id `len(table) + i`."""
        for word in self.words(config):
            tokens.add_placeholder_tokens(tokenizer, word.token, word.count)

    def initial_rows(self, config, table: np.ndarray, tokenizer) -> np.ndarray:
        """The token rows before training: an embedding file's (to continue or fine-tune a learned token), or
        copies of the initializer word's row."""
        if not config.initializer_embedding:
            return tokens.initial_rows(table, tokenizer, config.initializer_token, config.num_vectors)
        path = Path(config.initializer_embedding)
        learned = tokens.load_learned_embeddings(path)
        if len(learned) != 1:
            raise UserError(f"{path}: holds {len(learned)} tokens; config initializer_embedding needs a file with one")
        rows = next(iter(learned.values()))
        if rows.shape != (config.num_vectors, table.shape[1]):
            raise UserError(f"{path}: embedding of shape {rows.shape}, the run needs (num_vectors, width) = "
                            f"({config.num_vectors}, {table.shape[1]})")
        return rows

    def write_words(self, path: Path, config, rows, metadata: dict, fmt: str) -> list[Path]:
        """Writes each learned word in its own file: the first at `path`, the others at `<stem><suffix>.<ext>`
        next to it. Returns the files written. `rows`: the trained matrix, or on SDXL each encoder's
        `{"text_encoder": ..., "text_encoder_2": ...}`, written as one clip_l/clip_g file per word in either
        format (the file's name is the word)."""
        written, first = [], 0
        for word in self.words(config):
            target = export.sibling_path(Path(path), word.suffix)
            select = lambda x, first=first, count=word.count: x[first:first + count]
            word_metadata = dict(metadata, token=word.token, num_vectors=word.count)
            if isinstance(rows, dict):
                export.write_sdxl_embeddings(target, select(rows["text_encoder"]), select(rows["text_encoder_2"]),
                                             metadata=word_metadata)
            else:
                export.write_embeddings(target, word.token, select(rows), fmt=fmt, metadata=word_metadata)
            written.append(target)
            first += word.count
        return written

    # --- data ---

    def frozen_modules(self, config) -> tuple[str, ...]:
        """The modules the step reads."""
        return ("text_encoder", "unet")

    def read_data(self, config) -> Any:
        """Reads and validates the data files before the model is loaded (errors come before slow work)."""
        return train_data.read_style_dataset(config)

    def prepare(self, pipe, dataset, config, workdir: Path, progress: bool) -> train_data.TrainingData:
        """Prompt ids and cached posteriors, and the batch of each step."""
        prepared = train_data.prepare(pipe, dataset, config, config.placeholder_token)
        return train_data.TrainingData(functools.partial(self.batch, prepared, config), prepared.prompts)

    def batch(self, prepared: train_data.PreparedData, config, step: int) -> dict[str, np.ndarray]:
        """The examples of step `step`: the positives (for a contrastive method also their negatives and the
        anchors), a function of (train.seed, step)."""
        return train_data.style_batch(prepared, train_data.draw_examples(
            prepared, config.train.batch_size, config.train.seed, step, contrastive=self.contrastive,
            flip=config.data.flip))

    # --- the update ---

    def gradients(self, spec: StepSpec, config) -> Gradients:
        """`gradients(trained, frozen, batch, key) -> (gradients, extra optimizer arguments, metrics)`."""
        raise NotImplementedError

    def optimizer(self, config, adamw: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
        """The optimizer with this method's gradient transformations around `adamw`."""
        return optax.with_extra_args_support(adamw)

    # --- outputs ---

    def metadata(self, config) -> dict[str, Any]:
        """What exported files record about this method's run."""
        return {}

    def preview_negative_prompt(self, config) -> str:
        """The negative prompt of the sample grids."""
        return ""


REGISTRY: Registry[Method] = Registry("method")
register, get = REGISTRY.register, REGISTRY.find
