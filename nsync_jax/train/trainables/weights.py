"""Weights of the modules, a filter over their variables: full fine-tuning and LoRA adapters."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from nsync_jax import distributed, export, lora, tokens
from nsync_jax.errors import UserError
from nsync_jax.train.trainables.base import Trainable, check_sdxl, register
from nsync_jax.train.trainables.embeddings import EMBEDDINGS


@dataclasses.dataclass(frozen=True, eq=False)
class ModuleWeights(Trainable):
    """The variables of the trained modules that `selected` picks (an NNX filter); `modules(config)` names the
    modules trained. `full` is every `nnx.Param`; another filter gives another trainable. On Stable Diffusion XL
    (`for_model`) the second text encoder is trained wherever the first is, and exports are SDXL folders."""

    name: str
    modules: Callable[[Any], tuple[str, ...]]
    selected: Any = nnx.Param
    sharded: bool = True  # split over `fsdp` (a replicated copy when mesh.fsdp is 1); False: small, replicated
    load_dtype: Any = jnp.float32
    sdxl: bool = False  # the variant for a Stable Diffusion XL model
    checkpoint_key = "params"
    norm_metric = "param_norm"
    trains_modules = True
    export_formats = ("diffusers-pipeline",)

    def check_config(self, config, method):
        if config.train.weight_decay_scope != "rows":
            raise UserError(f"config train.weight_decay_scope={config.train.weight_decay_scope!r} applies to token "
                            f"rows (trainable='embeddings'), not trainable={self.name!r}: use 'rows'")
        if method.token_rows_only and not self.learns_words_of(method):
            raise UserError(f"config trainable={self.name!r} is not supported with method {method.name} (it learns "
                            "token rows): use trainable='embeddings'")

    def learns_words_of(self, method) -> bool:
        """Whether this trainable learns `method`'s words along with the module weights."""
        return False

    def for_model(self, sdxl, config, method):
        if not sdxl:
            return self
        check_sdxl(config, method)
        if config.train.max_timestep:  # the previews' base model would share text_encoder_2 with the trained one
            raise UserError(f"config train.max_timestep={config.train.max_timestep} is not supported with "
                            f"trainable={self.name!r} on Stable Diffusion XL yet: use 0")
        return dataclasses.replace(self, sdxl=True)

    def trained_modules(self, config) -> tuple[str, ...]:
        """The modules trained: `modules(config)`, on SDXL with `text_encoder_2` where `text_encoder` is trained
        (as diffusers' SDXL scripts train both encoders with `--train_text_encoder`)."""
        names = self.modules(config)
        return (*names, "text_encoder_2") if self.sdxl and "text_encoder" in names else names

    def prepare(self, module: nnx.Module, name: str, config, key: jax.Array) -> None:
        """Changes a module before it is split (LoRA: puts the adapters on it)."""

    def split(self, pipe, config, method, names):
        trained_names = self.trained_modules(config)
        if self.sdxl:  # the step reads both text encoders (after the others: the others' init keys stay)
            names = tuple(dict.fromkeys((*names, "text_encoder_2")))
        # Initialisation of new variables has its own stream, apart from the steps' fold_in(key(seed), step).
        init_key = jax.random.fold_in(jax.random.key(config.train.seed), 0x4C6F5241)
        graphdefs, frozen, trained = {}, {}, {}
        for index, name in enumerate(names):
            module = pipe.modules()[name]
            if name not in trained_names:
                graphdefs[name], frozen[name] = nnx.split(module)
                continue
            self.prepare(module, name, config, jax.random.fold_in(init_key, index))
            graphdefs[name], trained_state, frozen[name] = nnx.split(module, self.selected, ...)
            trained[name] = lora.flat_params(trained_state)
        return graphdefs, frozen, trained

    def module_states(self, name, trained, frozen):
        if trained is not None and name in trained:
            return lora.nested_params(trained[name]), frozen[name]
        return (frozen[name],)

    def shardings(self, mesh, tree):
        return distributed.frozen_shardings(mesh, tree, self.sharded)

    def show(self, pipe, trained):
        for name, flat in trained.items():
            nnx.update(pipe.modules()[name], lora.nested_params(
                {path: jnp.asarray(distributed.gather_to_host(x)) for path, x in flat.items()}))

    def merge(self, modules, trained, config, source):
        for name, flat in trained.items():
            nnx.update(modules[name], lora.nested_params({k: jnp.asarray(v) for k, v in flat.items()}))

    def metadata(self, config):
        return {"trainable": self.name, "num_vectors": 0}

    def export(self, output, fmt, config, method, trained, metadata, source):
        from nsync_jax.pipeline import load_pipeline

        pipe = load_pipeline(config.model, revision=config.model_revision or None,
                             variant=config.model_variant or None,
                             model_config=config.model_config or None, vae=config.vae or None, allow_sdxl=self.sdxl)
        modules = {name: pipe.modules()[name] for name in trained}
        self.merge(modules, trained, config, source)
        if config.vae:  # the folder carries the VAE the run used (a drop-in: the base's vae/config.json fits)
            modules["vae"] = pipe.vae
        export.write_diffusers_pipeline(output, pipe.folder, modules, variant=config.model_variant or None)
        return f"wrote {output} (base {config.model}, trained {', '.join(trained)}), step {metadata['step']}"


def _unet_and(config_flag: Callable[[Any], bool]) -> Callable[[Any], tuple[str, ...]]:
    return lambda config: ("unet",) + (("text_encoder",) if config_flag(config) else ())


@dataclasses.dataclass(frozen=True, eq=False)
class LoRA(ModuleWeights):
    """Low-rank adapters (`lora.add_lora`) on `lora.targets` of the UNet, and on the text encoder's attention
    projections with `lora.text_encoder` (on SDXL both encoders', as diffusers' SDXL LoRA script with
    `--train_text_encoder`); small, so replicated. Files: `lora.lora_state_dict`'s layouts, SDXL's included."""

    name: str = "lora"
    modules: Callable = _unet_and(lambda config: config.lora.text_encoder)
    selected: Any = nnx.LoRAParam
    sharded: bool = False
    load_dtype: Any = None
    export_formats = (*export.LORA_FORMATS, "diffusers-pipeline")

    def configured(self, config):
        from nsync_jax.train import methods  # here: the methods import the step, which imports this module

        branches = methods.get(config.method).lora_branches
        return BranchedLoRA(branches=branches) if branches else self

    def learns_words_of(self, method):
        return bool(method.lora_branches)

    def check_config(self, config, method):
        super().check_config(config, method)
        settings = config.lora
        if not isinstance(settings.rank, int) or settings.rank < 1:
            raise UserError(f"config lora.rank={settings.rank!r} must be a positive integer")
        if not 0.0 <= settings.relative_rank < 1.0:
            raise UserError(f"config lora.relative_rank={settings.relative_rank!r} must be in [0, 1) (0: lora.rank)")
        if not settings.alpha > 0:
            raise UserError(f"config lora.alpha={settings.alpha!r} must be positive")
        if not settings.targets:
            raise UserError("config lora.targets must name at least one UNet linear layer (e.g. to_q)")
        if settings.text_encoder and not settings.text_encoder_targets:
            raise UserError("config lora.text_encoder_targets must name at least one text encoder linear layer (e.g. "
                            "q_proj) with lora.text_encoder=True")
        if not isinstance(settings.text_encoder_rank, int) or settings.text_encoder_rank < 0:
            raise UserError(f"config lora.text_encoder_rank={settings.text_encoder_rank!r} must be a non-negative "
                            "integer (0: the UNet's rank)")

    def prepare(self, module, name, config, key):
        settings = config.lora
        if name == "unet":
            setting, rank = "targets", lora_rank(config)
        else:
            setting, rank = "text_encoder_targets", settings.text_encoder_rank or lora_rank(config)
        lora.add_lora(module, tuple(settings[setting]), rank=rank, alpha=settings.alpha, key=key,
                      setting="lora." + setting)

    def merge(self, modules, trained, config, source):
        """The adapters folded into the plain weights, as diffusers' fuse_lora."""
        deltas = lora.read_lora_state(lora.lora_state_dict(trained, config.lora.alpha), source=source)
        lora.merge_lora(modules, deltas, source=source)

    def metadata(self, config):
        return {**super().metadata(config), "lora_rank": lora_rank(config), "lora_alpha": config.lora.alpha,
                "lora_text_encoder": config.lora.text_encoder}

    def write_outputs(self, workdir, config, method, trained, metadata):
        path = workdir / "lora.safetensors"
        lora.write_lora_file(path, trained, config.lora.alpha, metadata=metadata)
        return [path]

    def export(self, output, fmt, config, method, trained, metadata, source):
        if fmt not in export.LORA_FORMATS:
            return super().export(output, fmt, config, method, trained, metadata, source)
        layout = export.LORA_FORMATS[fmt]
        lora.write_lora_file(output, trained, config.lora.alpha, metadata=metadata, layout=layout,
                             sdxl_layers_per_block=self.sdxl_layers_per_block(config) if layout == "kohya" else None)
        return f"wrote {output} (LoRA rank {lora_rank(config)}, {', '.join(trained)}), step {metadata['step']}"

    def sdxl_layers_per_block(self, config) -> tuple[int, ...] | None:
        """The `layers_per_block` of an SDXL base model's UNet, by which kohya's SDXL files number its layers (from
        its unet/config.json, no weights read); None on SD 1.x/2.x."""
        if not self.sdxl:
            return None
        from nsync_jax import sources, weights
        from nsync_jax.models.unet import UNetConfig

        folder = sources.resolve_model(config.model, revision=config.model_revision or None,
                                       variant=config.model_variant or None, model_config=config.model_config or None)
        path = folder / "unet" / "config.json"
        return UNetConfig.from_dict(weights.read_json(path), path).layers_per_block


def lora_rank(config) -> int | float:
    """`lora.rank`, or where it is set `lora.relative_rank` (a fraction of each layer's output width)."""
    return config.lora.relative_rank or config.lora.rank


@dataclasses.dataclass(frozen=True, eq=False)
class BranchedLoRA(LoRA):
    """Trainable lora with a method that fuses branches (`Method.lora_branches`, DreamArtist++ as HCP-Diffusion
    trains it): the method's words (token rows) and, per branch, adapters of its own on the same layers. What
    is trained is `{"rows": (rows, width), <branch>: {component: {path: array}}}`; group i of a step reads the
    rows and branch i's adapters (`branch_params`). Files: the words as `embeddings` writes them, and each
    branch's adapters as a LoRA file `<stem><suffix>.safetensors`."""

    branches: tuple[tuple[str, str], ...] = ()  # (name, file suffix) in the order of a step's groups
    export_formats = (*export.FORMATS, *export.LORA_FORMATS)

    def configured(self, config):
        return self

    def for_model(self, sdxl, config, method):
        if sdxl:  # its words' rows would need both SDXL encoders' (as `SDXLEmbeddings`)
            raise UserError(f"config trainable='lora' with method={method.name!r} (adapters per branch and learned "
                            "words, DreamArtist++) is not supported on Stable Diffusion XL yet")
        return self

    @property
    def main_branch(self) -> str:
        """The branch whose files have no suffix (the positive one): previews draw with its adapters."""
        return next(name for name, suffix in self.branches if not suffix)

    def split(self, pipe, config, method, names):
        _, _, rows = EMBEDDINGS.split(pipe, config, method, ())  # the initial rows; adds the words to the tokenizer
        graphdefs, frozen, adapters = super().split(pipe, config, method, names)
        # The first branch has the adapters `add_lora` drew; each other branch a set drawn alike, its own stream.
        key = jax.random.fold_in(jax.random.key(config.train.seed), 0x4272616E)
        trained = {"rows": rows}
        for index, (name, _) in enumerate(self.branches):
            trained[name] = adapters if index == 0 else lora.fresh_adapters(adapters, jax.random.fold_in(key, index))
        return graphdefs, frozen, trained

    def branch_params(self, trained, count):
        rows = trained["rows"]
        return {"rows": jnp.broadcast_to(rows, (count, *rows.shape)),
                "adapters": jax.tree.map(lambda *x: jnp.stack(x), *(trained[name] for name, _ in self.branches))}

    def module_states(self, name, trained, frozen):  # `trained`: one branch's copy, from `branch_params`
        if trained is not None and name in trained["adapters"]:
            return lora.nested_params(trained["adapters"][name]), frozen[name]
        return (frozen[name],)

    def embed(self, trained, table, ids):
        return tokens.embed_tokens(table, trained["rows"], ids)

    def show(self, pipe, trained):
        EMBEDDINGS.show(pipe, trained["rows"])
        super().show(pipe, trained[self.main_branch])

    def metadata(self, config):
        return {**super().metadata(config), "num_vectors": config.num_vectors}

    def write_adapters(self, path: Path, config, trained, metadata: dict, layout: str) -> list[Path]:
        """Each branch's adapters as a LoRA file in `layout`: `path` for the main branch, `<stem><suffix>` next to
        it for the others. Returns the files written."""
        written = []
        for name, suffix in self.branches:
            target = export.sibling_path(Path(path), suffix)
            lora.write_lora_file(target, trained[name], config.lora.alpha, metadata=dict(metadata, lora_branch=name),
                                 layout=layout)
            written.append(target)
        return written

    def write_outputs(self, workdir, config, method, trained, metadata):
        words = EMBEDDINGS.write_outputs(workdir, config, method, trained["rows"], metadata)
        return words + self.write_adapters(workdir / "lora.safetensors", config, trained, metadata, "diffusers")

    def export(self, output, fmt, config, method, trained, metadata, source):
        if fmt in export.FORMATS:
            return EMBEDDINGS.export(output, fmt, config, method, trained["rows"], metadata, source)
        paths = self.write_adapters(output, config, trained, metadata, export.LORA_FORMATS[fmt])
        written = ", ".join(f"{path} ({name} branch)" for path, (name, _) in zip(paths, self.branches))
        components = ", ".join(trained[self.main_branch])
        return f"wrote {written} (LoRA rank {lora_rank(config)}, {components}), step {metadata['step']}"


LORA = register(LoRA())
FULL = register(ModuleWeights("full", _unet_and(lambda config: config.full.train_text_encoder)))
