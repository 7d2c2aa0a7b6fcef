"""LoRA on the tiny SDXL: NSYNC-LoRA trains adapters on the UNet and on both text encoders; the run's file
(diffusers' keys `unet.`, `text_encoder.`, `text_encoder_2.`) and its kohya export (`lora_unet_` in the SGM UNet's
names, `lora_te1_`, `lora_te2_`) load in diffusers' `StableDiffusionXLPipeline.load_lora_weights` to the weights
`sample --lora` merges from either, and `sample --lora` draws what diffusers draws with the LoRA."""
import jax
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from conftest import tiny_config
from nsync_jax import lora, weights
from nsync_jax.cli import main
from nsync_jax.errors import UserError
from nsync_jax.pipeline import load_pipeline
from nsync_jax.train import methods, trainables, trainer
from sdxl_fixtures import sdxl_dir  # noqa: F401 (a fixture)

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
PROMPT = "a red star in the style of zwx"
HEIGHT, WIDTH = 24, 32  # latents 12 x 16 with the tiny VAE


@pytest.fixture(scope="module")
def lora_run(sdxl_dir, style_dir, tmp_path_factory):
    """The workdir and result of 2 NSYNC-LoRA steps on the tiny SDXL: adapters on the UNet's attention and
    feed-forward layers and on both text encoders."""
    workdir = tmp_path_factory.mktemp("sdxl_lora") / "work"
    config = tiny_config(sdxl_dir, style_dir, trainable="lora", placeholder_token="zwx", lora__rank=2,
                         lora__alpha=4.0, lora__text_encoder=True,
                         lora__targets=lora.UNET_TARGETS + lora.FEED_FORWARD_TARGETS, train__steps=2,
                         train__learning_rate=0.05)
    return workdir, trainer.train(config, workdir, progress=False)


def export(workdir, fmt, output, capsys):
    assert main(["export", "--workdir", str(workdir), "--format", fmt, "--output", str(output)]) == 0, \
        capsys.readouterr().err
    return output


def our_weights(pipe) -> dict[str, dict[str, np.ndarray]]:
    """The UNet's and both text encoders' weights under diffusers' and transformers' names (without `text_model.`)."""
    return {name: weights.module_state_dict(pipe.modules()[name]) for name in COMPONENTS}


def merged_with(sdxl_dir, *paths) -> dict[str, dict[str, np.ndarray]]:
    """Our weights with the LoRA files merged, as `sample --lora` merges them."""
    pipe = load_pipeline(sdxl_dir, allow_sdxl=True)
    for path in paths:
        lora.merge_lora(pipe.modules(), lora.read_lora_file(path), source=path)
    return our_weights(pipe)


def diffusers_with(sdxl_dir, path=None):
    """diffusers' tiny SDXL pipeline, with the LoRA file loaded by `load_lora_weights` if one is given."""
    from diffusers import StableDiffusionXLPipeline

    reference = StableDiffusionXLPipeline.from_pretrained(sdxl_dir)
    reference.set_progress_bar_config(disable=True)
    if path is not None:
        reference.load_lora_weights(str(path))
    return reference


def fused_weights(reference) -> dict[str, dict[str, np.ndarray]]:
    """diffusers' weights with its LoRA fused in (`fuse_lora`), as plain weights."""
    reference.fuse_lora()
    reference.unload_lora_weights()
    return {name: {k.removeprefix("text_model."): v.detach().numpy()
                   for k, v in getattr(reference, name).state_dict().items()} for name in COMPONENTS}


def assert_same_weights(ours, theirs, atol=1e-6):
    for name in COMPONENTS:
        assert set(ours[name]) <= set(theirs[name]), name
        for key, value in ours[name].items():
            np.testing.assert_allclose(value, theirs[name][key], rtol=0, atol=atol, err_msg=f"{name} {key}")


def assert_moved(merged, base):
    """The LoRA changed each component's weights (the comparisons are not between base models)."""
    for name in COMPONENTS:
        assert max(np.abs(merged[name][k] - base[name][k]).max() for k in base[name]) > 1e-3, name


def random_adapters(module, targets, key, scale=0.1) -> dict[str, np.ndarray]:
    """Rank-1 adapters `{"<path>.lora_down": (in, 1), "<path>.lora_up": (1, out)}` of random values on the linear
    layers of `module` whose last name is one of `targets` (all of them with `targets` None)."""
    adapters = {}
    for index, (path, linear) in enumerate(nnx.iter_modules(module)):
        path = ".".join(map(str, path))
        if type(linear) is not nnx.Linear or targets is not None and path.rsplit(".", 1)[-1] not in targets:
            continue
        down, up = (jax.random.normal(jax.random.fold_in(key, 2 * index + i), shape) * scale
                    for i, shape in enumerate(((linear.in_features, 1), (1, linear.out_features))))
        adapters.update({f"{path}.lora_down": np.asarray(down), f"{path}.lora_up": np.asarray(up)})
    return adapters


@pytest.mark.parametrize("text_encoder", [True, False])
def test_lora_on_sdxl_adapts_the_unet_and_with_lora_text_encoder_both_encoders(sdxl_dir, style_dir, text_encoder):
    config = tiny_config(sdxl_dir, style_dir, trainable="lora", lora__text_encoder=text_encoder)
    method = methods.get(config.method)
    trainable = trainables.get("lora").configured(config).for_model(True, config, method)
    assert trainable.export_formats == ("diffusers-lora", "a1111-lora", "diffusers-pipeline")
    pipe = load_pipeline(sdxl_dir, allow_sdxl=True)
    _, frozen, trained = trainable.split(pipe, config, method, method.frozen_modules(config))
    assert set(frozen) == set(COMPONENTS)  # the step reads both encoders either way
    assert set(trained) == set(COMPONENTS if text_encoder else ("unet",))
    for name, flat in trained.items():
        layers = {k.rsplit(".", 2)[-2] for k in flat}
        expected = {"to_q", "to_k", "to_v", "0"} if name == "unet" else {"q_proj", "k_proj", "v_proj", "out_proj"}
        assert layers == expected, name
        assert all(np.abs(v).max() == 0 for k, v in flat.items() if k.endswith("lora_up"))


# The run (about 100 s on 2 CPU cores: NSYNC's three groups through both encoders and the UNet) is shared by the
# next two tests: with `-m slow`.
@pytest.mark.slow
def test_nsync_lora_trains_both_encoders_and_its_file_loads_in_diffusers(sdxl_dir, lora_run):
    workdir, result = lora_run
    assert set(result.trained) == set(COMPONENTS)
    for name, flat in result.trained.items():  # every adapter's up matrix left zero, both encoders' too ...
        assert all(k.endswith((".lora_down", ".lora_up")) for k in flat)
        # ... but those of text encoder 1's last layer: SDXL reads its penultimate layer (encoder 2's last one
        # gives the pooled embedding).
        unread = "encoder.layers.2." if name == "text_encoder" else "-"
        ups = {k: v for k, v in flat.items() if k.endswith("lora_up")}
        assert all((np.abs(v).max() > 0) != k.startswith(unread) for k, v in ups.items()), name
    path = workdir / "lora.safetensors"
    assert result.files == [path]
    keys = load_file(path)
    assert "unet.down_blocks.1.attentions.0.transformer_blocks.1.ff.net.2.lora_A.weight" in keys
    assert "text_encoder.text_model.encoder.layers.2.self_attn.out_proj.lora_B.weight" in keys
    assert "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight" in keys

    ours = merged_with(sdxl_dir, path)
    assert_moved(ours, merged_with(sdxl_dir))
    assert_same_weights(ours, fused_weights(diffusers_with(sdxl_dir, path)))


@pytest.mark.slow
def test_lora_exports_an_sdxl_pipeline_folder_with_the_adapters_merged(sdxl_dir, lora_run, tmp_path, capsys):
    workdir, _ = lora_run
    folder = export(workdir, "diffusers-pipeline", tmp_path / "merged", capsys)
    assert_same_weights(our_weights(load_pipeline(folder, allow_sdxl=True)),
                        merged_with(sdxl_dir, workdir / "lora.safetensors"))


@pytest.mark.slow
def test_kohya_export_uses_the_sgm_names_and_loads_like_the_diffusers_file(sdxl_dir, lora_run, tmp_path, capsys):
    """`export --format a1111-lora` on SDXL writes kohya's SDXL names (the SGM UNet's `input_blocks`,
    `middle_block`, `output_blocks`; `lora_te1_`, `lora_te2_`), which `sample --lora` reads back to the deltas of
    the diffusers file and diffusers' `load_lora_weights` to the same weights."""
    workdir, _ = lora_run
    files = {fmt: export(workdir, fmt, tmp_path / f"{fmt}.safetensors", capsys)
             for fmt in ("diffusers-lora", "a1111-lora")}
    kohya = load_file(files["a1111-lora"])
    # Two layers per block: diffusers' down_blocks.1.attentions.0 is input_blocks.4.1, up_blocks.0.attentions.2
    # is output_blocks.2.1.
    for key in ("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight",
                "lora_unet_input_blocks_5_1_transformer_blocks_1_attn2_to_k.lora_up.weight",
                "lora_unet_middle_block_1_transformer_blocks_0_ff_net_0_proj.alpha",
                "lora_unet_output_blocks_2_1_transformer_blocks_1_attn2_to_out_0.lora_up.weight",
                "lora_te1_text_model_encoder_layers_2_self_attn_out_proj.lora_down.weight",
                "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.alpha"):
        assert key in kohya, key
    assert not any(part in key for key in kohya for part in ("down_blocks", "mid_block", "up_blocks", "lora_te_"))
    assert float(kohya["lora_te2_text_model_encoder_layers_0_self_attn_q_proj.alpha"]) == 4.0

    from_kohya = merged_with(sdxl_dir, files["a1111-lora"])
    assert_same_weights(from_kohya, merged_with(sdxl_dir, files["diffusers-lora"]))
    assert_same_weights(from_kohya, fused_weights(diffusers_with(sdxl_dir, files["a1111-lora"])))


def test_every_unet_linear_layer_has_a_kohya_sdxl_name_diffusers_reads(sdxl_dir, tmp_path):
    """Adapters on every linear layer of the SDXL UNet (time and added embeddings, resnets' time projections,
    attention, feed-forward, linear proj_in/out): the kohya SDXL file names each one once, and diffusers reads it to
    the weights of the diffusers-layout file; `merge_lora` too."""
    pipe = load_pipeline(sdxl_dir, allow_sdxl=True)
    linears = [(".".join(map(str, path)), m) for path, m in nnx.iter_modules(pipe.unet) if type(m) is nnx.Linear]
    layers_per_block = pipe.unet.config.layers_per_block
    names = [lora.sgm_module_path(path, layers_per_block) for path, _ in linears]
    assert None not in names and len(set(names)) == len(names)
    assert {"time_embed.0", "label_emb.0.2", "input_blocks.1.0.emb_layers.1", "middle_block.2.emb_layers.1",
            "output_blocks.5.0.emb_layers.1", "output_blocks.1.1.proj_out"} <= set(names)
    adapters = random_adapters(pipe.unet, None, jax.random.key(0))
    assert len(adapters) == 2 * len(linears)
    files = {layout: tmp_path / f"{layout}.safetensors" for layout in ("diffusers", "kohya")}
    for layout, path in files.items():
        lora.write_lora_file(path, {"unet": adapters}, alpha=2.0, layout=layout,
                             sdxl_layers_per_block=layers_per_block)
    assert all(k.startswith(("lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_",
                             "lora_unet_time_embed_", "lora_unet_label_emb_")) for k in load_file(files["kohya"]))

    merged = {layout: merged_with(sdxl_dir, path) for layout, path in files.items()}
    assert_same_weights(merged["kohya"], merged["diffusers"])
    theirs = fused_weights(diffusers_with(sdxl_dir, files["kohya"]))
    assert_same_weights({"unet": merged["kohya"]["unet"], "text_encoder": {}, "text_encoder_2": {}}, theirs, 1e-5)


def test_sgm_names_of_sdxl_base_layers():
    """kohya's SDXL names of diffusers layers for SDXL base's UNet (two layers per block, three levels)."""
    layers_per_block = (2, 2, 2)
    for path, sgm in (
            ("down_blocks.0.resnets.1.time_emb_proj", "input_blocks.2.0.emb_layers.1"),
            ("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
             "input_blocks.4.1.transformer_blocks.0.attn1.to_q"),
            ("down_blocks.2.attentions.1.proj_in", "input_blocks.8.1.proj_in"),
            ("mid_block.attentions.0.transformer_blocks.9.ff.net.2", "middle_block.1.transformer_blocks.9.ff.net.2"),
            ("mid_block.resnets.1.time_emb_proj", "middle_block.2.emb_layers.1"),
            ("up_blocks.0.attentions.2.transformer_blocks.0.attn2.to_out.0",
             "output_blocks.2.1.transformer_blocks.0.attn2.to_out.0"),
            ("up_blocks.1.attentions.0.proj_out", "output_blocks.3.1.proj_out"),
            ("up_blocks.2.resnets.2.time_emb_proj", "output_blocks.8.0.emb_layers.1"),
            ("time_embedding.linear_1", "time_embed.0"), ("add_embedding.linear_2", "label_emb.0.2")):
        assert lora.sgm_module_path(path, layers_per_block) == sgm, path
    for path in ("down_blocks.0.resnets.0.conv1", "mid_block.attentions.1.proj_in", "mid_block.0.resnets.0.norm1",
                 "down_blocks.attentions.0.proj_in", "conv_in"):
        assert lora.sgm_module_path(path, layers_per_block) is None, path


# About 15 s on 2 CPU cores (one compiled SDXL sampling loop, and diffusers').
def test_sample_lora_on_sdxl_draws_what_diffusers_draws_with_it(sdxl_dir, tmp_path, capsys):
    """A LoRA file on the UNet and both text encoders: `sample --lora` on the SDXL folder draws diffusers' image with
    `load_lora_weights` of the same file (from the same latents), and another image than without it."""
    import torch
    from PIL import Image

    pipe = load_pipeline(sdxl_dir, allow_sdxl=True)
    key = jax.random.key(1)
    params = {name: random_adapters(pipe.modules()[name], ("to_q", "to_v", "q_proj", "v_proj"),
                                    jax.random.fold_in(key, index), scale=0.5) for index, name in enumerate(COMPONENTS)}
    path = tmp_path / "style.safetensors"
    lora.write_lora_file(path, params, alpha=1.0)
    latents = np.random.default_rng(3).standard_normal((1, 4, HEIGHT // 2, WIDTH // 2)).astype(np.float32)
    np.save(tmp_path / "latents.npy", latents)

    def draw(output, *flags):
        args = ["sample", "--model", sdxl_dir, "--prompt", PROMPT, "--steps", 2, "--guidance", 4.0, "--height", HEIGHT,
                "--width", WIDTH, "--latents", tmp_path / "latents.npy", "--batch-size", 1, "--output", output, *flags]
        assert main(list(map(str, args))) == 0, capsys.readouterr().err
        return np.asarray(Image.open(output / "000000.png"), np.float32) / 255

    with_lora, without = draw(tmp_path / "lora", "--lora", path), draw(tmp_path / "base")
    reference = diffusers_with(sdxl_dir, path)(PROMPT, num_inference_steps=2, guidance_scale=4.0, height=HEIGHT,
                                               width=WIDTH, latents=torch.from_numpy(latents),
                                               output_type="np").images[0]
    assert np.abs(with_lora - np.round(reference * 255) / 255).max() <= 2 / 255  # both as 8-bit images
    assert np.abs(with_lora - without).max() > 20 / 255


def test_what_sdxl_lora_does_not_support_is_refused(sdxl_dir, sd1_dir, style_dir, tmp_path):
    config = tiny_config(sdxl_dir, style_dir, method="dreamartist", trainable="lora", data__negatives="")
    with pytest.raises(UserError, match=r"trainable='lora' with method='dreamartist' \(adapters per branch"):
        trainer.train(config, tmp_path / "work", progress=False)
    assert not (tmp_path / "work").exists()
    # An SDXL file's second text encoder on Stable Diffusion 1.x: one line naming the file.
    path = tmp_path / "sdxl_lora.safetensors"
    text_encoder_2 = load_pipeline(sdxl_dir, allow_sdxl=True).text_encoder_2
    lora.write_lora_file(path, {"text_encoder_2": random_adapters(text_encoder_2, ("q_proj",), jax.random.key(0))},
                         alpha=1.0)
    with pytest.raises(UserError, match=r"sdxl_lora\.safetensors: holds LoRA weights for a text_encoder_2, which "
                                        r"the model has not"):
        lora.merge_lora(load_pipeline(sd1_dir).modules(), lora.read_lora_file(path), source=path)
