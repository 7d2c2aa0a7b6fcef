"""Single-file checkpoints in the original LDM / A1111 layout (SDXL's in Stability's SGM layout): written here from
the tiny diffusers test models (the inverse of diffusers' conversion, checked by converting back with diffusers' own
converters), loaded through `load_pipeline` and `sample`, cached, detected, and refused in one line when they are
not checkpoints."""
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import load_file, save_file

from conftest import CONFIG, assert_token_encodes_as_in_diffusers
from nsync_jax import single_file, sources
from nsync_jax.cli import main
from nsync_jax.errors import UserError
from nsync_jax.pipeline import load_pipeline
from nsync_jax.weights import module_state_dict
from sdxl_fixtures import sdxl_dir  # noqa: F401 (a fixture)
from test_sdxl import SDXL_BASE_TEXT_ENCODER_2, SDXL_BASE_UNET

RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
          "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
OPEN_CLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
                   "self_attn.out_proj": "attn.out_proj"}


def unet_to_ldm(key: str, config: dict) -> str:
    """The LDM name of a diffusers UNet parameter (`openaimodel.UNetModel`'s input/middle/output blocks)."""
    per_down, per_up = config["layers_per_block"], config["layers_per_block"] + 1
    fixed = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
             "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}  # SDXL's
    name, parameter = key.rsplit(".", 1)
    if name in fixed:
        return f"{fixed[name]}.{parameter}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        block, kind, layer, rest = int(m[1]), m[2], int(m[3]), m[4]
        prefix = f"input_blocks.{(per_down + 1) * block + layer + 1}.{0 if kind == 'resnets' else 1}"
    elif m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"input_blocks.{(per_down + 1) * (int(m[1]) + 1)}.0.op.{m[2]}"
    elif m := re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", key):
        kind, layer, rest = m[1], int(m[2]), m[3]
        prefix = f"middle_block.{2 * layer if kind == 'resnets' else 1}"
    elif m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        block, kind, layer, rest = int(m[1]), m[2], int(m[3]), m[4]
        prefix = f"output_blocks.{per_up * block + layer}.{0 if kind == 'resnets' else 1}"
    elif m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        block = int(m[1])
        with_attention = config["up_block_types"][block].startswith("CrossAttn")
        return f"output_blocks.{per_up * block + per_up - 1}.{2 if with_attention else 1}.conv.{m[2]}"
    else:
        raise AssertionError(f"no LDM name for UNet key {key}")
    if kind == "resnets":
        first, _, tail = rest.partition(".")
        rest = f"{RESNET[first]}.{tail}"
    return f"{prefix}.{rest}"


def vae_to_ldm(key: str, config: dict) -> str:
    """The LDM name of a diffusers VAE parameter (`first_stage_model`'s encoder.down / decoder.up, reversed)."""
    key = re.sub(r"^(encoder|decoder)\.conv_norm_out", r"\1.norm_out", key)
    key = re.sub(r"mid_block\.resnets\.(\d)", lambda m: f"mid.block_{int(m[1]) + 1}", key)
    key = re.sub(r"mid_block\.attentions\.0\.([a-z_]+(?:\.0)?)\.",
                 lambda m: f"mid.attn_1.{VAE_ATTENTION[m[1]]}.", key)
    key = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0", r"encoder.down.\1.downsample", key)
    key = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets", r"encoder.down.\1.block", key)
    last = len(config["up_block_types"]) - 1
    key = re.sub(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0", lambda m: f"decoder.up.{last - int(m[1])}.upsample",
                 key)
    key = re.sub(r"decoder\.up_blocks\.(\d+)\.resnets", lambda m: f"decoder.up.{last - int(m[1])}.block", key)
    return key.replace("conv_shortcut", "nin_shortcut")


def open_clip_state(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """An SD 2.x text encoder (or SDXL's second) as OpenCLIP names it: fused q/k/v (`in_proj`), `resblocks`,
    `ln_final`, and SDXL's `text_projection` (a matrix applied on the right: the transposed linear weight)."""
    out = {"token_embedding.weight": state["text_model.embeddings.token_embedding.weight"],
           "positional_embedding": state["text_model.embeddings.position_embedding.weight"],
           "ln_final.weight": state["text_model.final_layer_norm.weight"],
           "ln_final.bias": state["text_model.final_layer_norm.bias"]}
    if "text_projection.weight" in state:
        out["text_projection"] = np.ascontiguousarray(state["text_projection.weight"].T)  # save_file needs it
    layers = {int(m[1]) for k in state if (m := re.match(r"text_model\.encoder\.layers\.(\d+)\.", k))}
    for i in layers:
        layer = f"text_model.encoder.layers.{i}"
        for parameter in ("weight", "bias"):
            out[f"transformer.resblocks.{i}.attn.in_proj_{parameter}"] = np.concatenate(
                [state[f"{layer}.self_attn.{p}_proj.{parameter}"] for p in "qkv"])
            for ours, theirs in OPEN_CLIP_LAYER.items():
                out[f"transformer.resblocks.{i}.{theirs}.{parameter}"] = state[f"{layer}.{ours}.{parameter}"]
    return out


def read_part(folder: Path, part: str) -> tuple[dict[str, np.ndarray], dict]:
    """A part's weights and config; a text encoder's keys with their `text_model.` prefix, as checkpoints have
    them (transformers 5 saves CLIPTextModel without it)."""
    config = json.loads((folder / part / "config.json").read_text())
    if part.startswith("text_encoder"):
        state = load_file(str(folder / part / "model.safetensors"))
        return {k if k.startswith(("text_model.", "text_projection")) else f"text_model.{k}": v
                for k, v in state.items() if not k.endswith("position_ids")}, config
    return load_file(str(folder / part / "diffusion_pytorch_model.safetensors")), config


def ldm_image_parts(unet: dict, unet_config: dict, vae: dict, vae_config: dict) -> dict:
    """The UNet and VAE weights under their LDM names, as every SD and SDXL checkpoint holds them."""
    state = {f"model.diffusion_model.{unet_to_ldm(k, unet_config)}": v for k, v in unet.items()}
    for key, value in vae.items():
        if ".attentions." in key and value.ndim == 2:  # LDM's VAE attention projections are 1x1 convolutions
            value = value[:, :, None, None]
        state[f"first_stage_model.{vae_to_ldm(key, vae_config)}"] = value
    return state


def ldm_checkpoint(folder: Path) -> dict[str, np.ndarray]:
    """The diffusers folder's weights in one LDM-layout state dict, as an A1111 checkpoint holds them."""
    state = ldm_image_parts(*read_part(folder, "unet"), *read_part(folder, "vae"))
    text, text_config = read_part(folder, "text_encoder")
    if text_config["hidden_act"] == "quick_gelu":  # SD 1.x: OpenAI CLIP through transformers, names kept
        state.update({f"cond_stage_model.transformer.{k}": v for k, v in text.items()})
    else:
        state.update({f"cond_stage_model.model.{k}": v for k, v in open_clip_state(text).items()})
    return state


def sgm_state(unet, unet_config, vae, vae_config, text, text_2) -> dict:
    """SDXL's parts under the names of Stability's SGM checkpoints: `conditioner.embedders.0` is CLIP-L as
    transformers names it, `conditioner.embedders.1` OpenCLIP bigG as OpenCLIP does."""
    return {**ldm_image_parts(unet, unet_config, vae, vae_config),
            **{f"conditioner.embedders.0.transformer.{k}": v for k, v in text.items()},
            **{f"conditioner.embedders.1.model.{k}": v for k, v in open_clip_state(text_2).items()}}


def sdxl_checkpoint(folder: Path) -> dict[str, np.ndarray]:
    """The SDXL diffusers folder's weights in one SGM-layout state dict, as SDXL single files hold them."""
    return sgm_state(*read_part(folder, "unet"), *read_part(folder, "vae"), read_part(folder, "text_encoder")[0],
                     read_part(folder, "text_encoder_2")[0])


def write_checkpoint(path: Path, state: dict[str, np.ndarray]) -> None:
    """A `.safetensors` file, or a `.ckpt` as Lightning saves one (the state dict nested, with a global step)."""
    if path.suffix == ".safetensors":
        save_file(state, str(path))
    else:
        import torch

        torch.save({"state_dict": {k: torch.from_numpy(v) for k, v in state.items()}, "global_step": 10}, path)


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """An empty Hugging Face home, offline: conversions land in it."""
    from huggingface_hub import constants

    home = tmp_path / "hf-home"
    monkeypatch.setattr(constants, "HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return home


def states(pipe) -> dict[str, dict[str, np.ndarray]]:
    return {name: module_state_dict(module) for name, module in pipe.modules().items()}


@pytest.fixture
def tiny_folders(sd1_dir, sd2_dir, sdxl_dir) -> dict[str, tuple[Path, object]]:
    """Each tiny test model with the function that writes its single file."""
    return {"sd1": (sd1_dir, ldm_checkpoint), "sd2": (sd2_dir, ldm_checkpoint), "sdxl": (sdxl_dir, sdxl_checkpoint)}


@pytest.mark.parametrize("family, suffix", [("sd1", ".safetensors"), ("sd2", ".ckpt"), ("sdxl", ".safetensors")])
def test_ldm_file_converts_back_to_the_folder(family, suffix, tiny_folders, tmp_path, cache):
    folder, checkpoint_state = tiny_folders[family]
    checkpoint = tmp_path / f"tiny-{family}{suffix}"
    write_checkpoint(checkpoint, checkpoint_state(folder))
    pipe = load_pipeline(checkpoint, model_config=folder, allow_sdxl=True)
    assert pipe.folder.is_relative_to(cache / "nsync-jax" / "single-file")
    assert pipe.folder.parent.name == single_file.file_digest(checkpoint)
    original = load_pipeline(folder, allow_sdxl=True)
    assert type(pipe) is type(original)
    for part, expected in states(original).items():
        got = states(pipe)[part]
        assert got.keys() == expected.keys()
        for key in expected:
            np.testing.assert_array_equal(got[key], expected[key], err_msg=f"{part} {key}")
    assert pipe.scheduler_config == original.scheduler_config
    # The settings no weight carries: model_index.json's (SDXL's force_zeros_for_empty_prompt), the VAE's
    # scaling_factor and force_upcast, every model's config.
    for config in ["model_index.json", *(f"{part}/config.json" for part in states(original))]:
        assert json.loads((pipe.folder / config).read_text()) == json.loads((folder / config).read_text()), config
    for tokenizer in [name for name in ("tokenizer", "tokenizer_2") if hasattr(original, name)]:
        ours, reference = getattr(pipe, tokenizer), getattr(original, tokenizer)
        assert ours("a red star").input_ids == reference("a red star").input_ids
        assert ours.pad_token == reference.pad_token
    if family == "sdxl":  # callers that do not handle SDXL refuse its single files as they refuse its folders
        with pytest.raises(UserError, match=r"a Stable Diffusion XL folder; on SDXL only sample, negatives and "):
            load_pipeline(checkpoint, model_config=folder)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_sample_with_a_single_file_draws_the_folder_images_and_the_second_load_reads_the_cache(
        family, tiny_folders, tmp_path, cache, capsys, monkeypatch):
    folder, checkpoint_state = tiny_folders[family]
    checkpoint = tmp_path / "tiny.safetensors"
    save_file(checkpoint_state(folder), str(checkpoint))
    args = ["--prompt", "a red star", "--steps", "2", "--height", "32", "--width", "32", "--seed", "3"]
    for name, model in (("folder", [str(folder)]), ("file", [str(checkpoint), "--model-config", str(folder)])):
        assert main(["sample", "--model", *model, *args, "--output", str(tmp_path / name)]) == 0, \
            capsys.readouterr().err
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "folder" / "000000.png")),
                                  np.asarray(Image.open(tmp_path / "file" / "000000.png")))
    converted = sources.resolve_model(checkpoint, model_config=folder)
    monkeypatch.setattr(single_file, "_convert", lambda *a: pytest.fail("converted again"))
    assert sources.resolve_model(checkpoint, model_config=folder) == converted
    assert [p.name for p in converted.parent.parent.iterdir()] == [converted.parent.name]  # nothing else cached


def meta_parts(architecture: str) -> dict[str, tuple[dict, dict]]:
    """Each model of a shipped architecture as (state dict, config), built from its shipped configs on torch's meta
    device: names and shapes, no memory."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    builders = {"unet": UNet2DConditionModel.from_config, "vae": AutoencoderKL.from_config,
                "text_encoder": lambda c: CLIPTextModel(CLIPTextConfig(**c)),
                "text_encoder_2": lambda c: CLIPTextModelWithProjection(CLIPTextConfig(**c))}
    parts = {}
    for part, build in builders.items():
        file = single_file.ARCHITECTURES / architecture / part / "config.json"
        if file.is_file():
            config = json.loads(file.read_text())
            with torch.device("meta"):
                state = build({k: v for k, v in config.items() if k != "architectures"}).state_dict()
            parts[part] = {k: v for k, v in state.items() if not k.endswith("position_ids")}, config
    return parts


def standard_shapes(architecture: str) -> dict[str, tuple[int, ...]]:
    """The checkpoint key shapes of a shipped architecture: the UNet's (LDM layout) for SD, the whole SGM-layout
    file's for SDXL (float16 zeros that take no memory but the fused q/k/v, 0.3 GB)."""
    parts = meta_parts(architecture)
    unet, unet_config = parts["unet"]
    if "text_encoder_2" not in parts:
        return {f"model.diffusion_model.{unet_to_ldm(k, unet_config)}": tuple(v.shape) for k, v in unet.items()}
    zeros = {part: {k: np.broadcast_to(np.float16(0), v.shape) for k, v in state.items()}
             for part, (state, _) in parts.items()}
    state = sgm_state(zeros["unet"], unet_config, zeros["vae"], parts["vae"][1], zeros["text_encoder"],
                      zeros["text_encoder_2"])
    return {k: v.shape for k, v in state.items()}


def test_standard_architectures_are_detected_from_their_shapes(tmp_path):
    sd1, sd2, sdxl = standard_shapes("sd1"), standard_shapes("sd2-v"), standard_shapes("sdxl-base")
    assert single_file.detect_architecture(sd1, None, source=tmp_path) == "sd1"
    assert single_file.detect_architecture(sd2, None, source=tmp_path) == "sd2-v"
    assert single_file.detect_architecture(sd2, 875000, source=tmp_path) == "sd2-base"
    assert single_file.detect_architecture(sdxl, None, source=tmp_path) == "sdxl-base"
    refiner = {k.replace("embedders.1", "embedders.0"): v for k, v in sdxl.items() if "embedders.1" in k}
    others = {"xl_refiner": {**sd1, **refiner}, "xl_inpaint": {**sdxl, single_file.UNET_KEY: (320, 9, 3, 3)},
              "inpainting": {**sd1, single_file.UNET_KEY: (320, 9, 3, 3)}}
    for model_type, shapes in others.items():
        with pytest.raises(UserError, match=rf"^{tmp_path}: a checkpoint of type {model_type} \(as diffusers names "
                                            r"it\); nsync-jax reads text-to-image Stable Diffusion 1.x, 2.x and SDXL "
                                            r"base checkpoints$"):
            single_file.detect_architecture(shapes, None, source=tmp_path)


def test_shipped_sdxl_configs_are_the_released_ones(tmp_path):
    """SDXL base's configs as stabilityai/stable-diffusion-xl-base-1.0 publishes them: the UNet and second text
    encoder are those tests/test_sdxl.py builds in NNX, every model has the released parameter count in diffusers
    and transformers, and the tokenizers are CLIP's 49408 tokens, the second padding with "!"."""
    from transformers import CLIPTokenizer

    parts = meta_parts("sdxl-base")
    assert parts["unet"][1] == SDXL_BASE_UNET and parts["text_encoder_2"][1] == SDXL_BASE_TEXT_ENCODER_2
    counts = {part: sum(v.numel() for v in state.values()) for part, (state, _) in parts.items()}
    assert counts == {"unet": 2_567_463_684, "vae": 83_653_863, "text_encoder": 123_060_480,
                      "text_encoder_2": 694_659_840}
    folder = single_file.shipped_config("sdxl-base", tmp_path / "sdxl-base")
    for part, pad in (("tokenizer", "<|endoftext|>"), ("tokenizer_2", "!")):
        tokenizer = CLIPTokenizer.from_pretrained(folder / part)
        assert len(tokenizer) == 49408 and tokenizer("a cat").input_ids == [49406, 320, 2368, 49407]
        assert tokenizer.pad_token == pad


def write_sparse_safetensors(path: Path, shapes: dict[str, tuple[int, ...]]) -> None:
    """A float16 `.safetensors` file of `shapes` holding zeros the disk does not store (a sparse file): a real-size
    checkpoint's header without its gigabytes."""
    import struct

    header, offset = {}, 0
    for key, shape in shapes.items():
        size = 2 * int(np.prod(shape))
        header[key] = {"dtype": "F16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)  # the format aligns the data to 8 bytes
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)) + encoded)
        f.truncate(8 + len(encoded) + offset)


@pytest.mark.slow
def test_a_file_of_the_real_sdxl_base_shapes_is_converted_with_the_shipped_configs(tmp_path, cache, monkeypatch):
    """SDXL base's 2513 keys at their real shapes, 6.9 GB of float16 zeros in a sparse file: read from its header,
    detected as diffusers' xl_base, and handed to diffusers' SDXL conversion with the shipped sdxl-base configs and
    both tokenizers (the conversion itself is not run: it would hold the 7 GB in memory). Slow: the file is hashed."""
    checkpoint = tmp_path / "sd_xl_base_1.0.safetensors"
    write_sparse_safetensors(checkpoint, standard_shapes("sdxl-base"))
    assert checkpoint.stat().st_size > 6.9e9
    shapes, global_step = single_file.read_shapes(checkpoint)
    assert shapes == standard_shapes("sdxl-base") and global_step is None
    handed = {}

    def convert(path, config, folder):
        from transformers import CLIPTokenizer

        handed.update(path=path, config=config.name, pipeline=(config / "model_index.json").read_text(),
                      pads=[CLIPTokenizer.from_pretrained(config / t).pad_token for t in ("tokenizer", "tokenizer_2")])
        (folder / "model_index.json").write_text("{}")

    monkeypatch.setattr(single_file, "_convert", convert)
    converted = sources.resolve_model(checkpoint)
    assert converted.name == handed["config"] == "sdxl-base" and handed["path"] == checkpoint
    assert '"StableDiffusionXLPipeline"' in handed["pipeline"] and handed["pads"] == ["<|endoftext|>", "!"]
    assert (converted.parent / "detected-architecture").read_text() == "sdxl-base"


def test_files_that_are_not_checkpoints_are_refused_in_one_line(sd1_dir, tmp_path, cache):
    import torch

    good = tmp_path / "good.safetensors"
    save_file(ldm_checkpoint(sd1_dir), str(good))
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-100])
    other = tmp_path / "classifier.safetensors"
    save_file({"fc.weight": np.zeros((2, 3), np.float32)}, str(other))
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": {"fc.weight": torch.zeros(2, 3)}, "global_step": 3}, ckpt)
    broken_ckpt = tmp_path / "broken.ckpt"
    broken_ckpt.write_bytes(ckpt.read_bytes()[:-50])
    pickled = tmp_path / "pickled.ckpt"
    torch.save({"state_dict": {}, "callback": Path("a class instance")}, pickled)
    cases = {truncated: "not a readable safetensors file, truncated or corrupt",
             other: "not a Stable Diffusion checkpoint in the original (LDM / A1111) layout",
             ckpt: "not a Stable Diffusion checkpoint in the original (LDM / A1111) layout",
             broken_ckpt: "not a readable checkpoint, truncated or corrupt",
             pickled: "holds Python objects besides tensors, which torch.load(weights_only=True) refuses to run"}
    for path, message in cases.items():
        with pytest.raises(UserError, match=rf"^{re.escape(str(path))}: {re.escape(message)}[^\n]*$"):
            sources.resolve_model(path)
    with pytest.raises(UserError, match=r"a variant \(fp16\) picks files of a Hugging Face Hub model or folder; a "
                                        r"single-file checkpoint has none$"):
        sources.resolve_model(good, variant="fp16")
    with pytest.raises(UserError, match=r"a model config \(sd1\) describes a single-file checkpoint"):
        sources.resolve_model(sd1_dir, model_config="sd1")
    with pytest.raises(UserError, match=r"^nowhere: model config not found \(a diffusers folder, a Hugging Face Hub "
                                        r"id, or one of sd1, sd2-base, sd2-v, sdxl-base\)$"):
        sources.resolve_model(good, model_config="nowhere")
    inpainting = tmp_path / "inpainting"
    inpainting.mkdir()
    (inpainting / "model_index.json").write_text('{"_class_name": "StableDiffusionInpaintPipeline"}')
    with pytest.raises(UserError, match=r"model_index.json: a StableDiffusionInpaintPipeline pipeline; single-file "
                                        r"checkpoints convert with the configs of a StableDiffusionPipeline or "
                                        r"StableDiffusionXLPipeline$"):
        sources.resolve_model(good, model_config=inpainting)
    # Configs that do not fit the weights (the tiny file read as real SD 1.5, named or detected): one line, and
    # nothing converted is cached; the detection is kept.
    for model_config in ("stable-diffusion-v1-5/stable-diffusion-v1-5", None):
        with pytest.raises(UserError, match=rf"^{re.escape(str(good))}: cannot convert with the configs of [^\n]*$"):
            sources.resolve_model(good, model_config=model_config)
    assert [(p.name, p.read_text()) for p in cache.rglob("*") if p.is_file()] == [("detected-architecture", "sd1")]


@pytest.mark.slow
def test_train_on_a_single_file_exports_a_token_diffusers_loads_into_that_file(sd1_dir, style_dir, tmp_path, cache,
                                                                                capsys):
    from diffusers import StableDiffusionPipeline

    checkpoint = tmp_path / "tiny.safetensors"
    save_file(ldm_checkpoint(sd1_dir), str(checkpoint))
    work = tmp_path / "work"
    assert main(["train", "--config", str(CONFIG), "--workdir", str(work), f"--config.model={checkpoint}",
                 f"--config.model_config={sd1_dir}", f"--config.data.images={style_dir / 'images'}",
                 f"--config.data.captions={style_dir / 'captions'}",
                 f"--config.data.negatives={style_dir / 'negatives'}", "--config.train.steps=2"]) == 0, \
        capsys.readouterr().err
    token = tmp_path / "style.safetensors"
    assert main(["export", "--workdir", str(work), "--step", "2", "--output", str(token)]) == 0

    reference = StableDiffusionPipeline.from_single_file(str(checkpoint), config=str(sd1_dir), local_files_only=True)
    assert_token_encodes_as_in_diffusers(load_pipeline(checkpoint, model_config=sd1_dir), reference, token,
                                         "a cat in the style of <tiny-style>")


@pytest.mark.slow
@pytest.mark.parametrize("architecture, scheduler, pad", [("sd1", "PNDMScheduler", "<|endoftext|>"),
                                                          ("sd2-v", "DDIMScheduler", "!")])
def test_a_file_of_a_real_architecture_loads_with_no_config_and_no_network(architecture, scheduler, pad, tmp_path,
                                                                           cache):
    """Random weights in the SD 1.5 or 2.1 layout (float16, as most released files): detected, converted with the
    shipped configs, and loaded with every UNet weight as written."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    configs = single_file.ARCHITECTURES / architecture

    def config(part):
        return json.loads((configs / part / "config.json").read_text())

    torch.manual_seed(0)
    parts = {"unet": (UNet2DConditionModel.from_config(config("unet")), "model.diffusion_model.", unet_to_ldm),
             "vae": (AutoencoderKL.from_config(config("vae")), "first_stage_model.", vae_to_ldm)}
    state = {}
    for name, (model, prefix, rename) in parts.items():
        for key, value in model.state_dict().items():
            value = value.to(torch.float16).numpy()
            state[f"{prefix}{rename(key, config(name))}"] = value[:, :, None, None] if (
                name == "vae" and ".attentions." in key and value.ndim == 2) else value
    text = CLIPTextModel(CLIPTextConfig(**{k: v for k, v in config("text_encoder").items() if k != "architectures"}))
    text = {f"text_model.{k.removeprefix('text_model.')}": v.to(torch.float16).numpy()
            for k, v in text.state_dict().items() if "position_ids" not in k}
    if architecture == "sd1":
        state.update({f"cond_stage_model.transformer.{k}": v for k, v in text.items()})
    else:
        state.update({f"cond_stage_model.model.{k}": v for k, v in open_clip_state(text).items()})
    del parts, text
    checkpoint = tmp_path / f"{architecture}.safetensors"
    save_file(state, str(checkpoint))

    pipe = load_pipeline(checkpoint)
    assert pipe.folder.name == architecture and pipe.scheduler_config["_class_name"] == scheduler
    assert (pipe.folder.parent / "detected-architecture").read_text() == architecture
    assert len(pipe.tokenizer) == 49408 and pipe.tokenizer("a cat").input_ids == [49406, 320, 2368, 49407]
    assert pipe.tokenizer.pad_token == pad
    unet = module_state_dict(pipe.unet)
    assert len(unet) == len([k for k in state if k.startswith("model.diffusion_model.")])
    unet_config = config("unet")
    for key, value in unet.items():
        np.testing.assert_array_equal(value, state[f"model.diffusion_model.{unet_to_ldm(key, unet_config)}"],
                                      err_msg=key)
