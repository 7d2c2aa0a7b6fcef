"""StyleForge (DreamBooth's dual binding for a style): a StyleRef group ("zwx style") and an Aux group ("style")
run through the same weights, each with its own noise and timesteps, minimising MSE(ref) + lambda MSE(aux); what
is trained is LoRA adapters or the full weights (`trainable`). Here too: its concepts, their StyleRef and Aux
images and prompts, and the examples of each step.

A concept binds its StyleRef images to an identifier prompt ("zwx style") and its Aux images to the class
prompt ("style"), DreamBooth's instance and prior sets. Single-StyleForge (StyleBoost) has one concept, from
`data.images` / `data.aux_images` and `styleforge.instance_prompt` / `class_prompt`; Multi-StyleForge has several
in `styleforge.concepts` (a config dict per concept name, e.g. a style and a people concept).

The data are fed as the released scripts (ShivamShrirao's DreamBooth fork, Multi-StyleBoost's multi_boost.py)
feed them: a concept's StyleRef images are shuffled once and paired with its Aux images by index (pair i =
StyleRef i mod n, Aux i mod m, max(n, m) pairs), the pairs are grouped into batches of `train.batch_size` once
(the released latent cache; the random crop is fixed then too), and a step trains on one such batch. Which batch
each step takes is `styleforge.schedule`:

- "mixed" (the default, as released): every concept's batches in one cache, each epoch a fresh shuffled pass over
  all of them. multi_boost.py iterates loader 1, then loader 2, only while it fills its latent cache; it then
  trains from that cache through a shuffling loader, so its concepts are mixed at random within each epoch.
- "joint": the concepts take turns, concept `step % K` at each step, each over shuffled passes of its batches.
- "staged": the concepts one after the other in the order of their names, each for an equal share of the steps,
  with a fresh optimizer at each concept (as Single-StyleBoost trained people on top of a background
  checkpoint). Older configs called this "sequential"; that name is refused with the new one.

Mirroring (`data.flip`) is drawn per example from (seed, step), like the other methods' batches.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import ml_collections
import numpy as np
import optax

from nsync_jax import distributed, negatives, tokens
from nsync_jax.data.style_dataset import StyleDataset, build_style_dataset, find_style_items
from nsync_jax.errors import UserError
from nsync_jax.sampling import SampleSettings
from nsync_jax.train import data as train_data, trainables
from nsync_jax.train.methods.base import Method
from nsync_jax.train.step import StepSpec, denoising_losses, group_keys

SCHEDULES = ("mixed", "joint", "staged")
# Schedule names of earlier versions -> their names now.
RENAMED_SCHEDULES = {"sequential": "staged"}
CONCEPT_KEYS = ("instance_prompt", "class_prompt", "images", "captions", "aux_images", "aux_captions")
# The only concept of a single-concept run: Aux images it generates go to WORKDIR/aux/style.
SINGLE = "style"


@dataclasses.dataclass(frozen=True)
class Concept:
    name: str
    instance_prompt: str  # "zwx style": bound to the StyleRef images
    class_prompt: str  # "style": bound to the Aux images
    images: str
    captions: str  # "" or a folder of `<stem>.txt` for the StyleRef images
    aux_images: str  # "": generated with the class prompt (styleforge.generate_aux images)
    aux_captions: str


def concepts_from_config(config: ml_collections.ConfigDict) -> list[Concept]:
    """The run's concepts, in the order of their names (the order of a staged run)."""
    sf, data = config.styleforge, config.data
    if not sf.concepts:
        return [Concept(SINGLE, sf.instance_prompt, sf.class_prompt, data.images, data.captions,
                        data.aux_images, data.aux_captions)]
    concepts = []
    for name in sorted(sf.concepts.keys()):
        entry = sf.concepts[name]
        missing = [key for key in CONCEPT_KEYS if key not in entry]
        if missing:
            raise UserError(f"config styleforge.concepts.{name} lacks {', '.join(missing)} (each concept has "
                            f"{', '.join(CONCEPT_KEYS)}; captions may be empty)")
        concepts.append(Concept(name, **{key: entry[key] for key in CONCEPT_KEYS}))
    return concepts


def check_config(config: ml_collections.ConfigDict) -> None:
    sf, data = config.styleforge, config.data
    if not trainables.get(config.trainable).trains_modules:
        raise UserError(f"config method styleforge fine-tunes weights, not trainable={config.trainable!r}: set "
                        "trainable='full' (as released) or 'lora'")
    for key in ("prepared", "negatives"):
        if data[key]:
            raise UserError(f"config data.{key}={data[key]!r} is not used by method styleforge (it reads "
                            "StyleRef images and Aux images): leave it empty")
    if sf.concepts and data.images:
        raise UserError(f"config data.images={data.images!r} and styleforge.concepts are both set: a "
                        "Multi-StyleForge run gives each concept its own images; leave data.images empty")
    if not sf.concepts and not data.images:
        raise UserError("config data.images (the StyleRef images) is required for method styleforge")
    if sf.schedule in RENAMED_SCHEDULES:
        raise UserError(f"config styleforge.schedule={sf.schedule!r} is now called "
                        f"{RENAMED_SCHEDULES[sf.schedule]!r} (the released scripts' schedule is 'mixed')")
    if sf.schedule not in SCHEDULES:
        raise UserError(f"config styleforge.schedule={sf.schedule!r} must be one of {', '.join(SCHEDULES)}")
    if not sf.prior_loss_weight >= 0:
        raise UserError(f"config styleforge.prior_loss_weight={sf.prior_loss_weight!r} must not be negative")
    if not isinstance(sf.generate_aux, int) or sf.generate_aux < 0:
        raise UserError(f"config styleforge.generate_aux={sf.generate_aux!r} must be a non-negative integer")
    concepts = concepts_from_config(config)
    for concept in concepts:
        where = "styleforge" if concept.name == SINGLE and not sf.concepts else f"styleforge.concepts.{concept.name}"
        for key in ("instance_prompt", "class_prompt"):
            if not getattr(concept, key).strip():
                raise UserError(f"config {where}.{key} must not be empty")
        if not concept.images:
            raise UserError(f"config {where}.images (the StyleRef images) must not be empty")
        if not concept.aux_images and not sf.generate_aux:
            aux_key = "data.aux_images" if where == "styleforge" else f"{where}.aux_images"
            raise UserError(f"config {aux_key} is empty: give the Aux images, or set styleforge.generate_aux to "
                            "draw that many with the class prompt from the base model")
    if sf.schedule == "staged" and config.train.steps < len(concepts):
        raise UserError(f"config train.steps={config.train.steps} is fewer than the {len(concepts)} concepts of "
                        "a staged run")


def prompt(base: str, caption: str, append_caption: bool) -> str:
    return f"{base}, {caption}" if append_caption and caption else base


@dataclasses.dataclass(frozen=True)
class ConceptImages:
    """A concept's decoded images and the prompt of each."""

    name: str
    style_refs: StyleDataset
    style_prompts: list[str]
    aux: StyleDataset
    aux_prompts: list[str]


def read_concept(concept: Concept, aux_folder: Path, config) -> ConceptImages:
    """Validates and decodes a concept's StyleRef and Aux images (Aux from `aux_folder` when the concept names
    none: the generated ones)."""
    data, sf = config.data, config.styleforge

    def load(images, captions):
        items = find_style_items(Path(images), captions=Path(captions) if captions else None, negatives=None,
                                 skip_bad_items=data.skip_bad_items)
        return build_style_dataset(items, data.resolution, data.resize, config.train.seed)

    refs = load(concept.images, concept.captions)
    aux = load(concept.aux_images or aux_folder, concept.aux_captions)
    append = sf.append_captions
    return ConceptImages(concept.name, refs, [prompt(concept.instance_prompt, c, append) for c in refs.captions],
                         aux, [prompt(concept.class_prompt, c, append) for c in aux.captions])


@dataclasses.dataclass
class ConceptData:
    """A concept ready for training: prompt ids `(N, tokens)` and cached VAE posterior moments
    `(N, 2, h, w, 2c)` (each image and its mirror image) of its StyleRef and Aux images."""

    style_prompts: list[str]  # also the prompts of the sample grids
    style_ids: np.ndarray
    style_refs: np.ndarray
    aux_ids: np.ndarray
    aux: np.ndarray


def released_pairs(refs: int, aux: int, seed: int, concept: int) -> np.ndarray:
    """The (StyleRef, Aux) index pairs `(max(refs, aux), 2)` of a concept, fixed once as the released
    DreamBooth dataset fixes them: its StyleRef images shuffled once, pair i = (ref i mod refs, aux i mod aux)."""
    order = np.random.default_rng([seed, concept]).permutation(refs)
    i = np.arange(max(refs, aux))
    return np.stack([order[i % refs], i % aux], axis=1)


def cached_batches(pairs: np.ndarray, batch_size: int, seed: int, concept: int) -> list[np.ndarray]:
    """A concept's pairs grouped into batches `(batch, 2)` once, as the released latent cache groups them (its
    loader shuffles the pairs while caching). A last, short batch is filled from the first pairs of the same
    order, so that every step has one shape (exact at the released batch size of 1)."""
    order = np.random.default_rng([seed, concept, 1]).permutation(len(pairs))
    count = -(-len(order) // batch_size)
    order = np.resize(order, count * batch_size)
    return [pairs[order[b * batch_size:(b + 1) * batch_size]] for b in range(count)]


def nth_in_passes(count: int, n: int, key: list[int]) -> int:
    """The n-th item of successive passes over `count` items, each pass a fresh permutation (a shuffling
    loader's epochs)."""
    return int(np.random.default_rng([*key, n // count]).permutation(count)[n % count])


def step_source(step: int, steps: int, sizes: list[int], schedule: str, seed: int) -> tuple[int, int]:
    """(concept, batch) of a step, given each concept's number of cached batches `sizes`."""
    count = len(sizes)
    if schedule == "mixed":  # one shuffled cache of every concept's batches
        flat = nth_in_passes(sum(sizes), step, [seed])
        concept = int(np.searchsorted(np.cumsum(sizes), flat, side="right"))
        return concept, flat - sum(sizes[:concept])
    if schedule == "joint":
        concept, n = step % count, step // count
    else:  # staged
        concept = step * count // steps
        n = step - -(-concept * steps // count)  # steps since the concept's first, ceil(concept * steps / K)
    return concept, nth_in_passes(sizes[concept], n, [seed, concept])


def optimizer_restarts(steps: int, count: int, schedule: str) -> set[int]:
    """Steps at which a staged run starts its next concept (with a fresh optimizer state)."""
    if schedule != "staged":
        return set()
    return {s for s in range(1, steps) if s * count // steps != (s - 1) * count // steps}


def step_batch(concepts: list[ConceptData], schedule: str, steps: int, batch_size: int, seed: int, step: int,
               flip: bool) -> dict[str, np.ndarray]:
    """The examples of one step: one cached batch of `batch_size` (StyleRef, Aux) pairs of the step's concept,
    as two groups `(2, batch, ...)` (the StyleRef examples, then their Aux partners); mirrored at random per
    example when `flip`."""
    batches = [cached_batches(released_pairs(len(c.style_refs), len(c.aux), seed, k), batch_size, seed, k)
               for k, c in enumerate(concepts)]
    k, b = step_source(step, steps, [len(x) for x in batches], schedule, seed)
    concept, picks = concepts[k], batches[k][b].T
    rng = np.random.default_rng([seed, step])
    flips = rng.integers(0, 2, (2, batch_size)) if flip else np.zeros((2, batch_size), int)
    groups = [(concept.style_ids, concept.style_refs), (concept.aux_ids, concept.aux)]
    moments = np.stack([m[i, f] for (_, m), i, f in zip(groups, picks, flips)])
    mean, logvar = np.split(moments, 2, axis=-1)
    return {"ids": np.stack([ids[i] for (ids, _), i in zip(groups, picks)]), "mean": mean, "logvar": logvar}


# ------------------------------------------------------------------------------------------------------------
# The method.
# ------------------------------------------------------------------------------------------------------------

def styleforge_losses(spec: StepSpec, prior_loss_weight: float, params, frozen, batch, key):
    """MSE(ref) + lambda MSE(aux) and its parts. batch: ids, mean, logvar `(2, batch, ...)`, the StyleRef
    group then the Aux group; each group draws its own latent sample, noise and timesteps."""
    losses = denoising_losses(spec, params, frozen, batch["ids"], batch["mean"], batch["logvar"],
                              group_keys(key, 2, share_noise=False), shared=True)
    return losses[0] + prior_loss_weight * losses[1], {"loss_instance": losses[0], "loss_prior": losses[1]}


def styleforge_gradients(spec: StepSpec, prior_loss_weight: float, params, frozen, batch, key):
    """The gradient of StyleForge's loss, no extra optimizer arguments, and metrics."""
    (loss, parts), grads = jax.value_and_grad(styleforge_losses, argnums=2, has_aux=True)(
        spec, prior_loss_weight, params, frozen, batch, key)
    return grads, {}, {"loss": loss, **parts, "grad_norm": optax.tree.norm(grads)}


def prepare_concepts(pipe, config, workdir: Path, progress: bool) -> list[ConceptData]:
    """Each concept's prompt ids and cached posteriors. Aux images a concept does not give are drawn first with
    its class prompt into WORKDIR/aux/<concept> (resumable: a rerun keeps the images drawn)."""
    ids = lambda prompts: tokens.tokenize(pipe.tokenizer, prompts)
    prepared = []
    for concept in concepts_from_config(config):
        aux_folder = workdir / "aux" / concept.name
        if not concept.aux_images:
            sample, resolution = config.sample, config.data.resolution
            settings = SampleSettings(scheduler=sample.scheduler, steps=sample.steps, guidance=sample.guidance,
                                      height=resolution, width=resolution, clip_skip=config.clip_skip)
            negatives.generate_set(pipe, {"aux": concept.class_prompt}, aux_folder, settings=settings,
                                   seed=config.train.seed, images_per_caption=config.styleforge.generate_aux,
                                   model_name=str(config.model), progress=progress)
            distributed.barrier("styleforge_aux")  # process 0 wrote the files the others read next
        images = read_concept(concept, aux_folder, config)
        prepared.append(ConceptData(
            style_prompts=images.style_prompts, style_ids=ids(images.style_prompts),
            style_refs=train_data.image_latents(pipe, images.style_refs.positives, config),
            aux_ids=ids(images.aux_prompts), aux=train_data.image_latents(pipe, images.aux.positives, config)))
    return prepared


class StyleForge(Method):
    name = "styleforge"

    def check_config(self, config):
        check_config(config)

    def read_data(self, config):
        return None  # each concept's folders are read once the model is loaded (it may draw Aux images)

    def prepare(self, pipe, dataset, config, workdir, progress):
        concepts = prepare_concepts(pipe, config, workdir, progress)
        sf, train = config.styleforge, config.train

        def batch(step):
            return step_batch(concepts, sf.schedule, train.steps, train.batch_size, train.seed, step, config.data.flip)

        # A staged Multi-StyleForge run starts each concept with a fresh optimizer state.
        return train_data.TrainingData(batch, concepts[0].style_prompts,
                                       frozenset(optimizer_restarts(train.steps, len(concepts), sf.schedule)))

    def gradients(self, spec, config):
        weight = config.styleforge.prior_loss_weight
        return lambda params, frozen, batch, key: styleforge_gradients(spec, weight, params, frozen, batch, key)

    def metadata(self, config):  # what to prompt with: the identifiers, not placeholder_token
        return {"token": None, "prompts": {c.name: c.instance_prompt for c in concepts_from_config(config)}}
