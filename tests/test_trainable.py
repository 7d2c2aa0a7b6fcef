"""What is trained is a config choice (trainable = embeddings, lora or full) on the one trainer: LoRA starts at
the base model and trains only its adapters, full fine-tuning only the chosen modules, both resume exactly,
and their exports load in diffusers (load_lora_weights, StableDiffusionPipeline) and in `sample`, which draw
the same images from the same latents; LoRA also in kohya's layout."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file

from conftest import jitted, tiny_config
from nsync_jax import lora, tokens
from nsync_jax.cli import main
from nsync_jax.imageio import to_uint8
from nsync_jax.pipeline import encode_text, load_pipeline
from nsync_jax.sampling import initial_latents
from nsync_jax import checkpoints
from nsync_jax.schedulers import NoiseSchedule
from nsync_jax.train import methods, step as train_step, trainables, trainer

PROMPT = "a cat in the style of zwx"
# Images of both samplers: the model's own scheduler (PNDM for the tiny SD1), guidance 7.5 (the default of
# both), 32x32 pixels, that is 16x16x4 latents with the tiny VAE.
SAMPLE_STEPS, SAMPLE_SIZE, LATENT_SHAPE = 4, 32, (16, 16, 4)


def lora_config(model, data, **overrides):
    return tiny_config(model, data, trainable="lora", placeholder_token="zwx", lora__rank=2, lora__alpha=4.0,
                       **overrides)


def assert_same_safetensors(a, b):
    from safetensors import safe_open

    with safe_open(a, "np") as fa, safe_open(b, "np") as fb:
        assert fa.metadata() == fb.metadata()
        assert sorted(fa.keys()) == sorted(fb.keys())
        for key in fa.keys():
            np.testing.assert_array_equal(fa.get_tensor(key), fb.get_tensor(key), err_msg=key)


def unet_inputs(seed=0):
    rng = np.random.default_rng(seed)
    return (jnp.asarray(rng.standard_normal((2, 8, 8, 4)), jnp.float32), jnp.array([3, 901]),
            jnp.asarray(rng.standard_normal((2, 16, 32)), jnp.float32))


def flat_state(module):
    return {".".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(module, nnx.Param))}


def first_step(pipe, config):
    """One jitted step as `trainer.train` builds it: (trained before, trained after, frozen states)."""
    method, trainable = methods.get(config.method), trainables.get(config.trainable)
    graphdefs, frozen, trained = trainable.split(pipe, config, method, ("text_encoder", "unet"))
    data = method.prepare(pipe, method.read_data(config), config, workdir=None, progress=False)
    spec = train_step.StepSpec(graphdefs, NoiseSchedule.from_config(pipe.scheduler_config),
                               pipe.vae.config.scaling_factor, jnp.float32, 0, trainable=trainable)
    tx = trainer.make_optimizer(config, method)
    step = jax.jit(train_step.make_train_step(method.gradients(spec, config), tx, norm_metric=trainable.norm_metric))
    batch = data.batch(0)
    before = jax.tree.map(np.asarray, trained)
    after, _, metrics = step(trained, tx.init(trained), frozen, batch, jax.random.key(0))
    assert np.isfinite(metrics["loss"])
    return before, jax.tree.map(np.asarray, after), frozen


def test_lora_starts_at_the_base_model_and_a_step_trains_only_adapters(sd1_dir, style_dir):
    pipe = load_pipeline(sd1_dir)
    base_unet = flat_state(pipe.unet)
    base_text = flat_state(pipe.text_encoder)
    inputs = unet_inputs()
    base_output = np.asarray(jitted(pipe.unet)(*inputs))

    config = lora_config(sd1_dir, style_dir, lora__text_encoder=True)
    before, after, frozen = first_step(pipe, config)
    # Adapters sit next to the base weights, which keep their paths and values.
    assert isinstance(pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_out[0], lora.LoRALinear)
    for module, base in ((pipe.unet, base_unet), (pipe.text_encoder, base_text)):
        plain = {k: v for k, v in flat_state(module).items() if ".lora_" not in k}
        assert plain.keys() == base.keys() and all(np.array_equal(plain[k], base[k]) for k in base)
    for name in ("unet", "text_encoder"):
        frozen_flat = lora.flat_params(frozen[name])
        assert all(np.array_equal(frozen_flat[k], v) for k, v in (base_unet if name == "unet" else base_text).items())
    # 4 projections per attention: SD1 tiny has 2 + 2 down, 1 mid, 3 + 3 up transformer blocks, 2 attentions each.
    assert len(after["unet"]) == 2 * 4 * 2 * 11 and len(after["text_encoder"]) == 2 * 4 * 3
    assert all(k.endswith((".lora_down", ".lora_up")) for part in after.values() for k in part)
    for part in ("unet", "text_encoder"):
        ups = [k for k in before[part] if k.endswith("lora_up")]
        assert all(not before[part][k].any() for k in ups)  # zero at the start
        assert all(after[part][k].any() for k in ups)  # trained by the step
    # At step 0 (up = 0) the adapted UNet is the base UNet exactly.
    assert np.array_equal(np.asarray(jitted(pipe.unet)(*inputs)), base_output)


def test_full_step_trains_only_the_chosen_modules(sd1_dir, style_dir):
    pipe = load_pipeline(sd1_dir)
    base_text = flat_state(pipe.text_encoder)
    config = tiny_config(sd1_dir, style_dir, trainable="full", placeholder_token="zwx", method="textual_inversion",
                         full__train_text_encoder=False)
    before, after, frozen = first_step(pipe, config)
    assert list(after) == ["unet"] and "vae" not in frozen
    assert before["unet"].keys() == flat_state(pipe.unet).keys()
    changed = [k for k in before["unet"] if not np.array_equal(before["unet"][k], after["unet"][k])]
    assert len(changed) > 0.9 * len(before["unet"])
    frozen_text = lora.flat_params(frozen["text_encoder"])
    assert frozen_text.keys() == base_text.keys()
    assert all(np.array_equal(frozen_text[k], v) for k, v in base_text.items())


# Each run compiles its step anew (about 50-70 s on 2 CPU cores), so both cases run with `-m slow`; the default run
# resumes a new trainable bit-identically in tests/test_extension_points.py.
@pytest.mark.parametrize("kind", [pytest.param("lora", marks=pytest.mark.slow),
                                  pytest.param("full", marks=pytest.mark.slow)])
def test_resume_is_bit_identical(sd1_dir, style_dir, tmp_path, kind):
    if kind == "lora":  # NSYNC-LoRA, with adapters on the text encoder too
        config = lora_config(sd1_dir, style_dir, lora__text_encoder=True)
    else:
        config = tiny_config(sd1_dir, style_dir, trainable="full", placeholder_token="zwx",
                             method="textual_inversion", nsync__granularity="leaf")
    config.train.steps = 4
    straight = trainer.train(config, tmp_path / "straight", progress=False).trained
    config.train.steps = 2
    trainer.train(config, tmp_path / "resumed", progress=False)
    config.train.steps = 4
    resumed = trainer.train(config, tmp_path / "resumed", progress=False).trained
    assert straight.keys() == resumed.keys() == {"unet", "text_encoder"}
    for part in straight:
        assert all(np.array_equal(straight[part][k], resumed[part][k]) for k in straight[part])
    # Checkpoints hold only the trained part and its optimizer state.
    state = checkpoints.manager(tmp_path / "resumed" / "checkpoints", keep=3).item_metadata(4)["state"]
    assert set(state) == {"params", "opt_state"}
    assert jax.tree.structure(state["params"]) == jax.tree.structure(straight)


def torch_text_and_unet(pipe, prompt, inputs):
    """diffusers' text encoder output for `prompt` and UNet output for `inputs` (NHWC in, NHWC out)."""
    ids = pipe.tokenizer([prompt], padding="max_length", max_length=16, truncation=True,
                         return_tensors="pt").input_ids
    sample, t, context = (torch.from_numpy(np.array(x)) for x in inputs)
    with torch.no_grad():
        text = pipe.text_encoder(ids).last_hidden_state.numpy()
        out = pipe.unet(sample.permute(0, 3, 1, 2), t, context).sample.permute(0, 2, 3, 1).numpy()
    return ids.numpy(), text, out


def rel_error(ours, reference) -> float:
    return float(np.abs(ours - reference).max() / np.abs(reference).max())


def cli_image(output, *flags) -> np.ndarray:
    """The uint8 PNG that `nsync-jax sample` writes for PROMPT with seed 0."""
    from PIL import Image

    size = str(SAMPLE_SIZE)
    assert main(["sample", *map(str, flags), "--prompt", PROMPT, "--steps", str(SAMPLE_STEPS), "--seed", "0",
                 "--height", size, "--width", size, "--output", str(output)]) == 0
    return np.asarray(Image.open(output / "000000.png").convert("RGB"))


def diffusers_image(pipe) -> np.ndarray:
    """diffusers' image for PROMPT from the latents `sample` draws for seed 0, image 0, as uint8 (like the PNG)."""
    latents = initial_latents(0, [0], LATENT_SHAPE).transpose(0, 3, 1, 2)  # NHWC -> diffusers' NCHW
    pipe.set_progress_bar_config(disable=True)
    images = pipe(prompt=[PROMPT], num_inference_steps=SAMPLE_STEPS, height=SAMPLE_SIZE, width=SAMPLE_SIZE,
                  latents=torch.tensor(latents), output_type="np").images
    return to_uint8(images[0])


def pixel_difference(a, b) -> int:
    """The largest difference of two uint8 images, in 1/255."""
    return int(np.abs(a.astype(np.int16) - b).max())


@pytest.fixture(scope="module")
def lora_run(sd1_dir, style_dir, tmp_path_factory):
    """The workdir of a 3-step LoRA run on the UNet (attention and feed-forward, as the demo's NSYNC-LoRA) and
    the text encoder, shared by the export tests."""
    workdir = tmp_path_factory.mktemp("lora_run") / "work"
    config = lora_config(sd1_dir, style_dir, lora__text_encoder=True, method="textual_inversion",
                         lora__targets=lora.UNET_TARGETS + lora.FEED_FORWARD_TARGETS,
                         train__steps=3, train__learning_rate=0.05)
    trainer.train(config, workdir, progress=False)
    return workdir


def export(workdir, fmt, output, capsys):
    assert main(["export", "--workdir", str(workdir), "--format", fmt, "--output", str(output)]) == 0, \
        capsys.readouterr().err
    return output


def test_lora_export_matches_diffusers_load_lora_weights(sd1_dir, lora_run, tmp_path, capsys):
    from diffusers import StableDiffusionPipeline

    exported = export(lora_run, "diffusers-lora", tmp_path / "style_lora.safetensors", capsys)
    # The same tensors and header as the file training wrote (not the same bytes: safetensors orders header
    # metadata keys through a hash map).
    assert_same_safetensors(exported, lora_run / "lora.safetensors")

    inputs = unet_inputs(1)
    reference = StableDiffusionPipeline.from_pretrained(sd1_dir, safety_checker=None)
    _, base_text, base_unet = torch_text_and_unet(reference, PROMPT, inputs)
    base_image = diffusers_image(reference)
    reference.load_lora_weights(str(exported))
    torch_ids, torch_text, torch_unet = torch_text_and_unet(reference, PROMPT, inputs)
    # Not trivially equal: the adapters moved both models, and the image.
    assert rel_error(torch_text, base_text) > 1e-3 and rel_error(torch_unet, base_unet) > 1e-3
    lora_image = diffusers_image(reference)
    assert pixel_difference(lora_image, base_image) > 10

    pipe = load_pipeline(sd1_dir)
    lora.merge_lora(pipe.modules(), lora.read_lora_file(exported))  # what `sample --lora` does
    ids = tokens.tokenize(pipe.tokenizer, [PROMPT])
    np.testing.assert_array_equal(ids, torch_ids)
    text = np.asarray(encode_text(pipe.text_encoder, jnp.asarray(pipe.extra_token_rows), jnp.asarray(ids)))
    assert rel_error(text, torch_text) <= 1e-4
    assert rel_error(np.asarray(jitted(pipe.unet)(*inputs)), torch_unet) <= 1e-4
    assert pixel_difference(cli_image(tmp_path / "samples", "--model", sd1_dir, "--lora", exported),
                            lora_image) <= 2

    # Half the scale in `sample --lora-scale 0.5` and diffusers' fuse_lora(lora_scale=0.5) agree too.
    half = load_pipeline(sd1_dir)
    lora.merge_lora(half.modules(), lora.read_lora_file(exported), 0.5)
    reference.fuse_lora(lora_scale=0.5)
    reference.unload_lora_weights()
    _, _, torch_half = torch_text_and_unet(reference, PROMPT, inputs)
    assert rel_error(np.asarray(jitted(half.unet)(*inputs)), torch_half) <= 1e-4
    half_image = cli_image(tmp_path / "half", "--model", sd1_dir, "--lora", exported, "--lora-scale", "0.5")
    assert pixel_difference(half_image, diffusers_image(reference)) <= 2


def test_kohya_file_loads_in_diffusers_like_the_diffusers_file(sd1_dir, lora_run, tmp_path, capsys):
    """The kohya-ss layout (`export --format a1111-lora`, what A1111 and ComfyUI read): diffusers'
    `load_lora_weights` gives the same models from it as from the diffusers-layout file, and `sample --lora`
    (`read_lora_file` + `merge_lora`) reads it to the same weights as diffusers."""
    from diffusers import StableDiffusionPipeline

    files = {fmt: export(lora_run, fmt, tmp_path / f"{fmt}.safetensors", capsys)
             for fmt in ("diffusers-lora", "a1111-lora")}
    kohya = load_file(files["a1111-lora"])
    unet_q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    assert kohya[f"{unet_q}.lora_down.weight"].shape == (2, 8) and kohya[f"{unet_q}.lora_up.weight"].shape == (8, 2)
    assert float(kohya[f"{unet_q}.alpha"]) == 4.0  # lora.alpha itself: the up matrix is not rescaled
    assert "lora_unet_up_blocks_2_attentions_0_transformer_blocks_0_attn2_to_out_0.alpha" in kohya
    assert "lora_te_text_model_encoder_layers_2_self_attn_out_proj.lora_down.weight" in kohya
    assert "lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_0_proj.lora_up.weight" in kohya

    inputs = unet_inputs(3)
    reference = StableDiffusionPipeline.from_pretrained(sd1_dir, safety_checker=None)
    _, base_text, base_unet = torch_text_and_unet(reference, PROMPT, inputs)
    outputs = {}
    for fmt, path in files.items():
        reference.load_lora_weights(str(path))
        outputs[fmt] = torch_text_and_unet(reference, PROMPT, inputs)
        reference.unload_lora_weights()
    _, kohya_text, kohya_unet = outputs["a1111-lora"]
    _, diffusers_text, diffusers_unet = outputs["diffusers-lora"]
    # Not trivially equal: diffusers applied the kohya file's adapters to both models.
    assert rel_error(kohya_text, base_text) > 1e-3 and rel_error(kohya_unet, base_unet) > 1e-3
    assert rel_error(kohya_text, diffusers_text) <= 1e-6
    assert rel_error(kohya_unet, diffusers_unet) <= 1e-6

    # `sample --lora` (read_lora_file + merge_lora) gives diffusers' UNet, and the same weights from both files.
    merged = {}
    for fmt, path in files.items():
        merged[fmt] = load_pipeline(sd1_dir)
        lora.merge_lora(merged[fmt].modules(), lora.read_lora_file(path))
    assert rel_error(np.asarray(jitted(merged["a1111-lora"].unet)(*inputs)), kohya_unet) <= 1e-4
    for name in ("unet", "text_encoder"):
        ours, theirs = (flat_state(merged[fmt].modules()[name]) for fmt in files)
        for key in ours:
            np.testing.assert_allclose(ours[key], theirs[key], rtol=0, atol=1e-6, err_msg=key)


@pytest.mark.slow  # about 75 s on 2 CPU cores
def test_full_export_is_a_diffusers_pipeline(sd1_dir, style_dir, tmp_path, capsys):
    from diffusers import StableDiffusionPipeline

    config = tiny_config(sd1_dir, style_dir, trainable="full", placeholder_token="zwx", method="textual_inversion",
                         train__steps=2, train__learning_rate=1e-3)
    trained = trainer.train(config, tmp_path / "work", progress=False).trained
    out = tmp_path / "exported"
    assert main(["export", "--workdir", str(tmp_path / "work"), "--format", "diffusers-pipeline",
                 "--output", str(out)]) == 0, capsys.readouterr().err
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left
    assert main(["export", "--workdir", str(tmp_path / "work"), "--format", "diffusers-pipeline",
                 "--output", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err

    # This project's UNet with the trained weights, against diffusers loading the exported folder.
    pipe = load_pipeline(sd1_dir)
    nnx.update(pipe.unet, lora.nested_params({k: jnp.asarray(v) for k, v in trained["unet"].items()}))
    inputs = unet_inputs(2)
    ours = np.asarray(jitted(pipe.unet)(*inputs))
    reference = StableDiffusionPipeline.from_pretrained(out, safety_checker=None)
    ids, text, unet_out = torch_text_and_unet(reference, PROMPT, inputs)
    assert rel_error(ours, unet_out) <= 1e-4
    base = StableDiffusionPipeline.from_pretrained(sd1_dir, safety_checker=None)
    _, _, base_out = torch_text_and_unet(base, PROMPT, inputs)
    assert rel_error(unet_out, base_out) > 1e-4  # the export holds the trained weights, not the base ones
    # `sample --model OUT` and diffusers draw the same image from the exported folder, not the base model's.
    image = diffusers_image(reference)
    assert pixel_difference(cli_image(tmp_path / "samples", "--model", out), image) <= 2
    assert pixel_difference(image, diffusers_image(base)) > 10
    exported = load_pipeline(out)  # and `sample --model OUT` reads it
    np.testing.assert_array_equal(np.asarray(exported.text_encoder.encoder.layers[0].self_attn.q_proj.kernel[...]),
                                  trained["text_encoder"]["encoder.layers.0.self_attn.q_proj.kernel"])
    ours_text = np.asarray(encode_text(exported.text_encoder, jnp.asarray(exported.extra_token_rows),
                                       jnp.asarray(ids)))
    assert rel_error(ours_text, text) <= 1e-4


# 48 s on 2 cores; test_sampling's handoff test covers the sampling side by default.
@pytest.mark.slow
def test_lora_trained_below_a_timestep_previews_as_sample_draws_it(sd1_dir, style_dir, tmp_path):
    """A LoRA trained with train.max_timestep: its preview grid hands the high timesteps to the base model, and
    is the picture `sample --lora` draws from the exported file (whose header records the handoff)."""
    from PIL import Image

    workdir = tmp_path / "work"
    config = lora_config(sd1_dir, style_dir, lora__text_encoder=True, method="textual_inversion",
                         train__steps=3, train__learning_rate=0.05, train__max_timestep=500,
                         train__sample_every_steps=3, sample__count=2, sample__steps=3)
    trainer.train(config, workdir, progress=False)
    preview = np.asarray(Image.open(workdir / "samples" / "step_000003.png").convert("RGB"), np.int16)

    def sampled(output, *flags):
        prompts = [f"{caption} in the style of zwx" for caption in ("a red star", "a blue circle")]
        args = ["sample", "--model", str(sd1_dir), "--lora", str(workdir / "lora.safetensors"), "--steps", "3",
                "--scheduler", config.sample.scheduler,
                "--guidance", str(config.sample.guidance), "--seed", "0", "--height", "32", "--width", "32",
                "--batch-size", "2", "--output", str(output), *flags]
        assert main(args + [a for p in prompts for a in ("--prompt", p)]) == 0
        return np.concatenate([np.asarray(Image.open(output / f"00000{i}.png").convert("RGB"), np.int16)
                               for i in range(2)], axis=1)

    assert np.abs(sampled(tmp_path / "handoff") - preview).max() <= 2
    everywhere = sampled(tmp_path / "everywhere", "--handoff-timestep", "0")
    assert np.abs(everywhere - preview).max() > 10  # the handoff changed the picture
