"""StyleForge on the one trainer: the dual-binding loss, its data (concepts, schedules, random crops, generated
Aux images) and a run end to end."""
import functools
import io
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from safetensors import safe_open

from conftest import jitted, tiny_config
from nsync_jax import tokens
from nsync_jax.data.style_dataset import decode_image
from nsync_jax.errors import UserError
from nsync_jax.models.vae import sample_posterior
from nsync_jax.pipeline import load_pipeline
from nsync_jax.schedulers import add_noise, training_target
from nsync_jax.schedulers import NoiseSchedule
from nsync_jax.train import methods, trainables, trainer
from nsync_jax.train.config import check_config
from nsync_jax.train.methods import styleforge
from nsync_jax.train.step import StepSpec


@pytest.fixture(scope="module")
def aux_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("aux")
    rng = np.random.default_rng(1)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (36, 30, 3), dtype=np.uint8)).save(root / f"person{i}.png")
    return root


def styleforge_config(model, style, aux, **overrides):
    settings = dict(method="styleforge", trainable="lora", lora__rank=2, lora__alpha=2.0, data__negatives="",
                    data__captions="", data__aux_images=str(aux), data__flip=False, data__resize="random_crop",
                    train__scale_lr=False)
    return tiny_config(model, style, **{**settings, **overrides})


def test_loss_is_instance_mse_plus_weighted_prior_mse(sd1_dir, style_dir, aux_dir, tmp_path):
    config = styleforge_config(sd1_dir, style_dir, aux_dir, trainable="full", full__train_text_encoder=True)
    pipe = load_pipeline(sd1_dir)
    data = styleforge.prepare_concepts(pipe, config, tmp_path, progress=False)
    batch = styleforge.step_batch(data, "joint", 10, 2, seed=0, step=3, flip=False)
    trainable = trainables.get("full")
    graphdefs, frozen, trained = trainable.split(pipe, config, methods.get("styleforge"), ("text_encoder", "unet"))
    schedule = NoiseSchedule.from_config(pipe.scheduler_config)
    spec = StepSpec(graphdefs, schedule, pipe.vae.config.scaling_factor, jnp.float32, 0, trainable=trainable)
    key = jax.random.key(7)
    loss, parts = jax.jit(functools.partial(styleforge.styleforge_losses, spec, 0.5))(trained, frozen, batch, key)

    # Directly: each group through the text encoder and UNet on its own, with its own latent sample, noise and
    # timesteps, and the mean squared error over its elements.
    direct, text_encoder, unet = [], jitted(pipe.text_encoder), jitted(pipe.unet)
    for group in range(2):
        k_latent, k_noise, k_time = jax.random.split(jax.random.fold_in(key, group), 3)
        latents = sample_posterior(batch["mean"][group], batch["logvar"][group], k_latent)
        latents = latents * pipe.vae.config.scaling_factor
        noise = jax.random.normal(k_noise, latents.shape)
        t = jax.random.randint(k_time, (2,), 0, schedule.num_train_timesteps)
        context = text_encoder(jnp.asarray(batch["ids"][group]))
        prediction = unet(add_noise(schedule.alphas_cumprod, latents, noise, t), t, context)
        direct.append(float(jnp.mean(jnp.square(prediction - training_target(schedule, latents, noise, t)))))
    np.testing.assert_allclose([parts["loss_instance"], parts["loss_prior"]], direct, rtol=1e-5)
    np.testing.assert_allclose(loss, direct[0] + 0.5 * direct[1], rtol=1e-5)
    # The two groups are different examples with their own prompts.
    np.testing.assert_array_equal(batch["ids"][:, 0], tokens.tokenize(pipe.tokenizer, ["zwx style", "style"]))


def test_concept_schedules_and_optimizer_restarts():
    joint = [styleforge.concept_of_step(s, 9, 2, "joint") for s in range(9)]
    assert joint == [0, 1, 0, 1, 0, 1, 0, 1, 0]
    sequential = [styleforge.concept_of_step(s, 9, 3, "sequential") for s in range(9)]
    assert sequential == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert styleforge.optimizer_restarts(9, 3, "sequential") == {3, 6}
    assert styleforge.optimizer_restarts(9, 3, "joint") == set()


def test_random_crop_is_the_short_side_resize_cropped_per_seed():
    pixels = (np.indices((24, 40)).sum(0) * 5 % 256).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(np.stack([pixels] * 3, -1)).save(buffer, format="PNG")
    resized = np.asarray(Image.fromarray(np.stack([pixels] * 3, -1)).resize((20, 12), Image.Resampling.BILINEAR),
                         np.float32) / 127.5 - 1
    crops = [decode_image(buffer.getvalue(), 12, "random_crop", crop_seed=[seed]) for seed in range(6)]
    offsets = set()
    for crop in crops:
        assert crop.shape == (12, 12, 3)
        left = next(x for x in range(9) if np.array_equal(resized[:, x:x + 12], crop))
        offsets.add(left)
    assert len(offsets) > 1  # the offset depends on the seed ...
    np.testing.assert_array_equal(crops[0], decode_image(buffer.getvalue(), 12, "random_crop", crop_seed=[0]))


@pytest.mark.parametrize("change, message", [
    ({"trainable": "embeddings"}, "trainable='full'"),
    ({"data__negatives": "negs"}, "data.negatives"),
    ({"data__aux_images": ""}, "data.aux_images is empty"),
    ({"styleforge__schedule": "interleaved"}, "styleforge.schedule"),
    ({"styleforge__prior_loss_weight": -1.0}, "prior_loss_weight"),
])
def test_config_errors_name_the_key(sd1_dir, style_dir, aux_dir, change, message):
    config = styleforge_config(sd1_dir, style_dir, aux_dir, **change)
    with pytest.raises(UserError, match=message):
        check_config(config)


def test_multi_concept_run_with_generated_aux_images(sd1_dir, style_dir, aux_dir, tmp_path):
    """Two concepts trained jointly (LoRA, two steps of two microbatches): one with its Aux images, one whose
    Aux images are drawn with its class prompt first; both concepts' prompts reach the step and the metrics
    hold both losses."""
    import ml_collections

    config = styleforge_config(sd1_dir, style_dir, aux_dir, data__images="", data__aux_images="",
                               train__steps=2, styleforge__generate_aux=2, sample__steps=2, sample__count=2,
                               train__sample_every_steps=2, train__grad_accum_steps=2)
    config.styleforge.concepts = ml_collections.ConfigDict({
        "a_style": {"instance_prompt": "zwx style", "class_prompt": "style", "images": str(style_dir / "images"),
                    "captions": str(style_dir / "captions"), "aux_images": str(aux_dir), "aux_captions": ""},
        "b_people": {"instance_prompt": "a ukj person", "class_prompt": "a person",
                     "images": str(aux_dir), "captions": "", "aux_images": "", "aux_captions": ""}})
    config.styleforge.append_captions = True
    trained = trainer.train(config, tmp_path / "work", progress=False).trained

    drawn = sorted(p.name for p in (tmp_path / "work" / "aux" / "b_people").glob("*.png"))
    assert drawn == ["aux_0.png", "aux_1.png"]
    manifest = json.loads((tmp_path / "work" / "aux" / "b_people" / "manifest.json").read_text())
    assert set(manifest["files"].values()) == {"a person"}
    assert not (tmp_path / "work" / "aux" / "a_style").exists()  # it has its own Aux images
    logged = [json.loads(line) for line in (tmp_path / "work" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in logged] == [1, 2]
    assert all(m["loss_instance"] > 0 and m["loss_prior"] > 0 for m in logged)
    assert any(np.any(v) for k, v in trained["unet"].items() if k.endswith("lora_up"))
    assert Image.open(tmp_path / "work" / "samples" / "step_000002.png").size == (2 * 32, 32)
    with safe_open(tmp_path / "work" / "lora.safetensors", "np") as exported:  # says what to prompt with
        assert json.loads(exported.metadata()["nsync_jax"])["prompts"] == {"a_style": "zwx style",
                                                                           "b_people": "a ukj person"}

    pipe = load_pipeline(sd1_dir)
    data = styleforge.prepare_concepts(pipe, config, tmp_path / "work", progress=False)
    captions = [(style_dir / "captions" / f"item{i}.txt").read_text() for i in range(4)]
    np.testing.assert_array_equal(data[0].style_ids, tokens.tokenize(pipe.tokenizer,
                                                                     [f"zwx style, {c}" for c in captions]))
    np.testing.assert_array_equal(data[1].style_ids, tokens.tokenize(pipe.tokenizer, ["a ukj person"] * 3))
    np.testing.assert_array_equal(data[1].aux_ids, tokens.tokenize(pipe.tokenizer, ["a person"] * 2))

    # The sample grids draw with the adapters as trained so far.
    lora_trainable = trainables.get("lora")
    lora_trainable.split(pipe, config, methods.get("styleforge"), ("text_encoder", "unet"))  # untrained adapters
    lora_trainable.show(pipe, jax.tree.map(jnp.asarray, trained))
    adapter = pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
    key = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_up"
    np.testing.assert_array_equal(np.asarray(adapter.lora_up[...]), trained["unet"][key])
