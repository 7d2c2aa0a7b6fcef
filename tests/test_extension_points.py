"""A method and a trainable added from outside the package: each is one object and one registration line.

The method is a Min-SNR-weighted denoising loss; the trainable is the UNet's normalisation scales and biases
only. Each trains through `trainer.train` (with a built-in partner: the new method on token rows, NSYNC on the
new trainable), resumes bit-identically from a checkpoint, and exports.
"""
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from conftest import tiny_config
from nsync_jax import lora
from nsync_jax.cli import main
from nsync_jax.pipeline import load_pipeline
from nsync_jax.train import methods, trainables, trainer
from nsync_jax.train.methods import Method
from nsync_jax.train.step import denoise, group_keys


class MinSNRDenoising(Method):
    """Textual Inversion's data, a denoising loss weighted by min(SNR(t), 5) / SNR(t) per example."""

    name = "min_snr_denoising"

    def gradients(self, spec, config):
        def loss(trained, frozen, batch, key):
            prediction, target, _, t = denoise(spec, trained, frozen, batch["ids"], batch["mean"], batch["logvar"],
                                               group_keys(key, 1, False), shared=True)
            abar = jnp.asarray(spec.schedule.alphas_cumprod)[t[0]]
            snr = abar / (1 - abar)
            return jnp.mean(jnp.minimum(snr, 5.0) / snr * jnp.mean(jnp.square(prediction - target)[0], (1, 2, 3)))

        def gradients(trained, frozen, batch, key):
            value, grads = jax.value_and_grad(loss)(trained, frozen, batch, key)
            return grads, {}, {"loss": value, "grad_norm": optax.tree.norm(grads)}

        return gradients


def is_norm(path, value) -> bool:
    return isinstance(value, nnx.Param) and any("norm" in str(part) for part in path)


UNET_NORMS = trainables.ModuleWeights("unet_norms", modules=lambda config: ("unet",), selected=is_norm,
                                      sharded=False)


@pytest.fixture
def registered(monkeypatch):
    monkeypatch.setitem(methods.REGISTRY, MinSNRDenoising.name, MinSNRDenoising())
    monkeypatch.setitem(trainables.REGISTRY, UNET_NORMS.name, UNET_NORMS)


def train_straight_and_resumed(config, tmp_path):
    """Four steps in one run, and in two runs (two steps, then resumed to four): what each trained."""
    straight = trainer.train(config, tmp_path / "straight", progress=False)
    config.train.steps = 2
    trainer.train(config, tmp_path / "resumed", progress=False)
    config.train.steps = 4
    resumed = trainer.train(config, tmp_path / "resumed", progress=False)
    return straight, resumed


def test_a_new_method_trains_resumes_and_exports(registered, sd1_dir, style_dir, tmp_path, capsys):
    config = tiny_config(sd1_dir, style_dir, method="min_snr_denoising", data__negatives="", train__steps=4)
    straight, resumed = train_straight_and_resumed(config, tmp_path)
    np.testing.assert_array_equal(straight.trained, resumed.trained)
    assert straight.files == [tmp_path / "straight" / "learned_embeds.safetensors"]

    # The loss logged at step 1 is the method's, on the first step's batch and key, from the initial rows.
    method = methods.get("min_snr_denoising")
    pipe = load_pipeline(sd1_dir)
    graphdefs, frozen, initial = trainables.EMBEDDINGS.split(pipe, config, method, ("text_encoder", "unet"))
    data = method.prepare(pipe, method.read_data(config), config, tmp_path, progress=False)
    spec = trainer.StepSpec(graphdefs, trainer.NoiseSchedule.from_config(pipe.scheduler_config),
                            pipe.vae.config.scaling_factor, jnp.float32, 0)
    _, _, metrics = jax.jit(method.gradients(spec, config))(initial, frozen, data.batch(0),
                                                            jax.random.fold_in(jax.random.key(0), 0))
    logged = json.loads((tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()[0])
    np.testing.assert_allclose(logged["loss"], metrics["loss"], rtol=1e-5)
    assert not np.allclose(straight.trained, initial)

    assert main(["export", "--workdir", str(tmp_path / "resumed"), "--format", "a1111",
                 "--output", str(tmp_path / "style.pt")]) == 0, capsys.readouterr().err
    assert "style.pt (<tiny-style>, 2 vectors), step 4" in capsys.readouterr().out
    sidecar = json.loads((tmp_path / "style.json").read_text())
    assert sidecar["method"] == "min_snr_denoising" and sidecar["step"] == 4


def test_a_new_trainable_trains_resumes_and_exports(registered, sd1_dir, style_dir, tmp_path, capsys):
    config = tiny_config(sd1_dir, style_dir, trainable="unet_norms", placeholder_token="zwx", train__steps=4,
                         nsync__granularity="leaf")
    straight, resumed = train_straight_and_resumed(config, tmp_path)
    assert straight.trained.keys() == {"unet"} and straight.files == []
    trained = straight.trained["unet"]
    assert trained and all("norm" in path for path in trained)
    for path in trained:
        np.testing.assert_array_equal(trained[path], resumed.trained["unet"][path])

    out = tmp_path / "exported"
    assert main(["export", "--workdir", str(tmp_path / "resumed"), "--format", "a1111", "--output",
                 str(tmp_path / "x.pt")]) == 2
    assert "trainable='unet_norms': export it with --format diffusers-pipeline" in capsys.readouterr().err
    assert main(["export", "--workdir", str(tmp_path / "resumed"), "--format", "diffusers-pipeline",
                 "--output", str(out)]) == 0, capsys.readouterr().err
    # The exported UNet holds the trained norms and the base model's other weights.
    flat = lambda module: {".".join(map(str, p)): np.asarray(v[...])
                           for p, v in nnx.to_flat_state(nnx.state(module, nnx.Param))}
    exported, base = flat(load_pipeline(out).unet), flat(load_pipeline(sd1_dir).unet)
    moved = [path for path in trained if not np.array_equal(trained[path], base[path])]
    assert moved
    for path, value in exported.items():
        np.testing.assert_array_equal(value, trained[path] if path in trained else base[path], err_msg=path)
    np.testing.assert_array_equal(exported[moved[0]], lora.flat_params(nnx.state(
        load_pipeline(out).unet, is_norm))[moved[0]])
