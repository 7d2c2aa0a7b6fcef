"""Full fine-tuning on the tiny SDXL: the UNet and both text encoders train, split over `fsdp` on a mesh as on SD;
`--format diffusers-pipeline` writes an SDXL folder that diffusers' `StableDiffusionXLPipeline` and our
`load_pipeline` load, conditioning and denoising alike; what full fine-tuning cannot do on SDXL is refused."""
import json
import re
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
from flax import nnx

from conftest import jitted, tiny_config
from nsync_jax.cli import main
from nsync_jax.errors import UserError
from nsync_jax.lora import flat_params
from nsync_jax.pipeline import load_pipeline
from nsync_jax.sdxl import encode_prompt, time_ids
from nsync_jax.train import trainer
from sdxl_fixtures import TEXT_ENCODER_2, sdxl_dir  # noqa: F401 (a fixture)

ROOT = Path(__file__).resolve().parents[1]
ENCODERS = ("text_encoder", "text_encoder_2")
# Plain fine-tuning (Textual Inversion's loss on the weights) of the UNet and both text encoders, at a learning
# rate that keeps the tiny model's outputs in range.
OVERRIDES = dict(method="textual_inversion", trainable="full", full__train_text_encoder=True,
                 placeholder_token="zwx", train__learning_rate=1e-4, train__steps=2, checkpoint__every_steps=2)


def base_weights(folder: Path) -> dict[str, dict[str, np.ndarray]]:
    pipe = load_pipeline(folder, allow_sdxl=True)
    return {name: {path: np.asarray(value) for path, value in
                   flat_params(nnx.state(pipe.modules()[name], nnx.Param)).items()}
            for name in ("unet", *ENCODERS)}


def relative_difference(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def perturbed(weights: dict[str, dict[str, np.ndarray]], seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
    """Weights as a run might have learned them: each moved by 5% of its own scale, at random."""
    rng = np.random.default_rng(seed)
    return {name: {path: (value + 0.05 * (np.abs(value).mean() + 1e-3) * rng.standard_normal(value.shape)
                          ).astype(np.float32) for path, value in flat.items()} for name, flat in weights.items()}


def test_exported_folder_loads_in_diffusers_and_conditions_and_denoises_as_ours(sdxl_dir, style_dir, tmp_path):
    """`trainable=full`'s export on SDXL (what `nsync-jax export --format diffusers-pipeline` runs), of weights of
    the UNet and both encoders: prompts -> both encoders -> UNet with the pooled embedding and micro-conditioning,
    diffusers' chain on the folder against ours."""
    from diffusers import StableDiffusionXLPipeline

    from nsync_jax.train import methods, trainables

    config = tiny_config(sdxl_dir, style_dir, **OVERRIDES)
    method = methods.get(config.method)
    trainable = trainables.get("full").for_model(True, config, method)
    learned = perturbed(base_weights(sdxl_dir))
    folder = tmp_path / "pipeline"
    line = trainable.export(folder, "diffusers-pipeline", config, method, learned, {"step": 2}, source=tmp_path)
    assert "trained unet, text_encoder, text_encoder_2" in line
    assert all((folder / part).is_dir() for part in ("text_encoder_2", "tokenizer_2", "unet", "vae", "scheduler"))
    assert_folder_holds(folder, learned)  # exactly: float32 files

    reference = StableDiffusionXLPipeline.from_pretrained(folder)
    pipe = load_pipeline(folder, allow_sdxl=True)
    prompts, size = ["a red star painting", "a cat"], (48, 64)
    latents = torch.randn(2, 4, 6, 8, generator=torch.Generator().manual_seed(0))

    def torch_unet(unet, embeds, pooled):
        torch_time_ids = reference._get_add_time_ids(size, (0, 0), size, dtype=torch.float32,
                                                     text_encoder_projection_dim=TEXT_ENCODER_2["projection_dim"])
        with torch.no_grad():
            return unet(latents, 500, embeds, added_cond_kwargs=dict(
                text_embeds=pooled, time_ids=torch_time_ids.repeat(2, 1))).sample.numpy()

    with torch.no_grad():
        embeds, _, pooled, _ = reference.encode_prompt(prompts, device="cpu", do_classifier_free_guidance=False)
    expected = torch_unet(reference.unet, embeds, pooled)
    graphdef, state = nnx.split((pipe.text_encoder, pipe.text_encoder_2))
    encode = jax.jit(lambda state, ids, ids_2: encode_prompt(*nnx.merge(graphdef, state), ids, ids_2))
    ours_embeds, ours_pooled = encode(state, *pipe.tokenize(prompts))
    for ours, want in ((ours_embeds, embeds), (ours_pooled, pooled)):
        assert np.abs(np.asarray(ours) - want.numpy()).max() / np.abs(want.numpy()).max() <= 1e-4
    added_cond = {"text_embeds": ours_pooled, "time_ids": np.broadcast_to(time_ids(size, (0, 0), size), (2, 6))}
    ours = jitted(pipe.unet)(latents.numpy().transpose(0, 2, 3, 1), np.array([500, 500]), ours_embeds, added_cond)
    ours = np.asarray(ours).transpose(0, 3, 1, 2)
    assert np.abs(ours - expected).max() / np.abs(expected).max() <= 1e-4
    # ... and the base model's UNet predicts otherwise: the folder holds the new weights.
    before = torch_unet(StableDiffusionXLPipeline.from_pretrained(sdxl_dir).unet, embeds, pooled)
    assert np.abs(before - expected).max() > 1e-2 * np.abs(expected).max()


# A compiled full step of the UNet and both encoders (about 2 minutes on 2 busy cores): `-m slow`.
@pytest.mark.slow
def test_trains_the_unet_and_both_text_encoders_and_exports_them(sdxl_dir, style_dir, tmp_path):
    workdir = tmp_path / "work"
    learned = trainer.train(tiny_config(sdxl_dir, style_dir, **OVERRIDES), workdir, progress=False).trained
    base = base_weights(sdxl_dir)
    assert set(learned) == {"unet", *ENCODERS}
    for name, weights in learned.items():
        assert weights.keys() == base[name].keys(), name  # every parameter, text_projection included
        moved = sum(relative_difference(weights[path], base[name][path]) > 1e-6 for path in weights)
        assert moved >= len(weights) // 2, (name, moved, len(weights))
    assert main(["export", "--workdir", str(workdir), "--output", str(tmp_path / "pipeline"),
                 "--format", "diffusers-pipeline"]) == 0
    assert_folder_holds(tmp_path / "pipeline", learned)


def assert_folder_holds(folder: Path, learned: dict[str, dict[str, np.ndarray]]) -> None:
    """Our `load_pipeline` reads the trained weights back from the exported SDXL folder, exactly."""
    for name, weights in base_weights(folder).items():
        assert weights.keys() == learned[name].keys(), name
        for path, value in weights.items():
            np.testing.assert_array_equal(value, learned[name][path], err_msg=f"{name}/{path}")


@pytest.mark.parametrize("override, message", [
    (dict(method="dreamartist", data__negatives=""), "config trainable='full' is not supported with method "
                                                     "dreamartist"),
    (dict(train__max_timestep=500), "config train.max_timestep=500 is not supported with trainable='full' on "
                                    "Stable Diffusion XL yet: use 0"),
])
def test_what_full_fine_tuning_cannot_do_on_sdxl_is_refused(sdxl_dir, style_dir, tmp_path, override, message):
    with pytest.raises(UserError, match=re.escape(message)):
        trainer.train(tiny_config(sdxl_dir, style_dir, **{**OVERRIDES, **override}), tmp_path / "work",
                      progress=False)
    assert not (tmp_path / "work").exists()


# Two compiled full steps in a child process with 8 simulated devices (3 to 4 minutes on 2 busy cores): `-m slow`.
@pytest.mark.slow
def test_fsdp_splits_the_trained_weights_and_learns_what_one_device_learns(sdxl_dir, style_dir, tmp_path):
    from test_sharding import FULL_RUNS, run_child

    out = tmp_path / "full"
    out.mkdir()
    # Adam moves every weight by about the learning rate per step, also where the gradient is only rounding noise:
    # a small rate keeps such elements' share of the difference under the tolerance (as on SD, test_sharding).
    overrides = {**OVERRIDES, "train__learning_rate": 2e-5}
    flags = [f"{key.replace('__', '.')}={value}" for key, value in overrides.items()]
    run_child(FULL_RUNS, {"out": str(out), "model": str(sdxl_dir), "config": str(ROOT / "configs" / "tiny.py"),
                          "meshes": {"1x1": (1, 1, False), "1x2": (1, 2, False)},
                          "overrides": [f"model={sdxl_dir}", f"data.images={style_dir / 'images'}",
                                        f"data.captions={style_dir / 'captions'}", *flags]})
    one, two = (dict(np.load(out / f"{name}.npz")) for name in ("1x1", "1x2"))
    assert one.keys() == two.keys() and {k.split("/")[0] for k in one} == {"unet", *ENCODERS}
    fsdp_split = json.loads((out / "fsdp_split.json").read_text())
    assert fsdp_split["1x1"] == 0 and fsdp_split["1x2"] >= len(one) // 4, (fsdp_split, len(one))
    # Key biases have a true gradient of 0 (softmax ignores them): rounding noise that Adam scales differently.
    compared = [k for k in one if not k.endswith(".self_attn.k_proj.bias")]
    worst = max(compared, key=lambda k: relative_difference(two[k], one[k]))
    assert relative_difference(two[worst], one[worst]) <= 1e-5, worst
    # ... and the weights moved from the base model by more than 10x that, so agreeing is not trivial.
    base = {f"{name}/{path}": value for name, flat in base_weights(sdxl_dir).items() for path, value in flat.items()}
    assert base.keys() == one.keys()
    assert np.median([relative_difference(one[k], base[k]) for k in compared]) > 1e-4
    # The sharded run's checkpoint exports as any other: the folder holds what it learned.
    assert main(["export", "--workdir", str(out / "1x2"), "--output", str(tmp_path / "pipeline"),
                 "--format", "diffusers-pipeline"]) == 0
    learned = {}
    for key, value in two.items():
        name, path = key.split("/", 1)
        learned.setdefault(name, {})[path] = value
    assert_folder_holds(tmp_path / "pipeline", learned)
