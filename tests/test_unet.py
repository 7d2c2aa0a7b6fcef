"""UNet parity with diffusers' UNet2DConditionModel (float32, random weights) and config/weight errors."""
import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel as TorchUNet

from conftest import jitted
from nsync_jax.errors import UserError
from nsync_jax.models.unet import load_unet


def rel_error(ours, reference) -> float:
    return float(np.abs(ours - reference).max() / np.abs(reference).max())


def torch_inputs_and_output(torch_unet, latent_size):
    """Seeded inputs (sample NCHW, timesteps, context, added_cond) and the torch UNet's output on them.

    `added_cond` (SDXL's pooled text embedding and micro-conditioning) is None unless the UNet takes it.
    """
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, *latent_size, generator=generator)
    context = torch.randn(2, 16, torch_unet.config.cross_attention_dim, generator=generator)
    timesteps = torch.tensor([3, 901])
    added_cond = None
    if torch_unet.config.addition_embed_type == "text_time":
        config = torch_unet.config
        pooled_width = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        # Original size, crop top-left, target size: unlike sizes and non-zero crops.
        time_ids = torch.tensor([[1024., 768., 0., 32., 1024., 1024.], [512., 640., 16., 0., 768., 512.]])
        added_cond = dict(text_embeds=torch.randn(2, pooled_width, generator=generator), time_ids=time_ids)
    with torch.no_grad():
        output = torch_unet(sample, timesteps, context, added_cond_kwargs=added_cond).sample.numpy()
    return (sample, timesteps, context, added_cond), output


def unet_outputs(folder, latent_size, backend="auto"):
    """Runs the torch and the Flax UNet on the same inputs; returns both outputs in NCHW."""
    (sample, timesteps, context, _), reference = torch_inputs_and_output(
        TorchUNet.from_pretrained(folder / "unet").eval(), latent_size)
    unet = load_unet(folder / "unet", attention_backend=backend)
    ours = jitted(unet)(jnp.asarray(sample.numpy().transpose(0, 2, 3, 1)), jnp.asarray(timesteps.numpy()),
                        jnp.asarray(context.numpy()))
    return np.asarray(ours).transpose(0, 3, 1, 2), reference


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_unet_matches_diffusers(family, request):
    folder = request.getfixturevalue(f"{family}_dir")
    ours, reference = unet_outputs(folder, (8, 8))
    assert rel_error(ours, reference) <= 1e-4


def test_unet_with_text_time_embedding_matches_diffusers(tmp_path):
    """`addition_embed_type="text"`: an attention-pooled summary of the text states joins the time embedding."""
    from conftest import SD1_UNET, _randomize

    torch.manual_seed(0)
    torch_unet = TorchUNet(**SD1_UNET, addition_embed_type="text", addition_embed_type_num_heads=4).eval()
    _randomize(torch_unet)
    torch_unet.save_pretrained(tmp_path / "with_text" / "unet")
    ours, reference = unet_outputs(tmp_path / "with_text", (8, 8))
    assert rel_error(ours, reference) <= 1e-4
    # Not trivially equal: the same weights without the pooled text give another output.
    plain = TorchUNet(**SD1_UNET).eval()
    plain.load_state_dict({k: v for k, v in torch_unet.state_dict().items() if not k.startswith("add_embedding.")})
    _, without = torch_inputs_and_output(plain, (8, 8))
    assert rel_error(without, reference) > 1e-3

    config = json.loads((tmp_path / "with_text" / "unet" / "config.json").read_text())
    (tmp_path / "with_text" / "unet" / "config.json").write_text(json.dumps(
        {**config, "addition_embed_type_num_heads": 5}))
    with pytest.raises(UserError, match="addition_embed_type_num_heads=5 does not divide cross_attention_dim=32"):
        load_unet(tmp_path / "with_text" / "unet")


def test_sdxl_unet_matches_diffusers(tmp_path):
    """SDXL's UNet: `addition_embed_type="text_time"`, a plain first block, two transformer layers per block."""
    from conftest import _randomize
    from sdxl_fixtures import SDXL_UNET

    torch.manual_seed(0)
    torch_unet = TorchUNet(**SDXL_UNET).eval()
    _randomize(torch_unet)
    torch_unet.save_pretrained(tmp_path / "unet")
    (sample, timesteps, context, added_cond), reference = torch_inputs_and_output(torch_unet, (8, 6))
    unet = load_unet(tmp_path / "unet")
    assert len(unet.down_blocks[1].attentions[0].transformer_blocks) == 2
    run = jitted(unet)
    inputs = [jnp.asarray(t.numpy()) for t in (sample.permute(0, 2, 3, 1), timesteps, context)]
    added_cond = {key: jnp.asarray(value.numpy()) for key, value in added_cond.items()}
    ours = np.asarray(run(*inputs, added_cond)).transpose(0, 3, 1, 2)
    assert rel_error(ours, reference) <= 1e-4
    # The micro-conditioning is not ignored: other sizes, other prediction.
    other = np.asarray(run(*inputs, {**added_cond, "time_ids": added_cond["time_ids"][::-1]})).transpose(0, 3, 1, 2)
    assert rel_error(other, reference) > 1e-3
    with pytest.raises(ValueError, match="added_cond .* addition_embed_type is 'text_time'"):
        unet(*inputs)


def test_unet_odd_latent_size_and_xla_attention(sd1_dir):
    # 10x6 latents are not divisible by 4: the up blocks must upsample to the skip's size, not 2x.
    ours, reference = unet_outputs(sd1_dir, (10, 6), backend="xla")
    assert rel_error(ours, reference) <= 1e-4


def test_unet_loads_bin_weights(sd1_bin_dir):
    assert (sd1_bin_dir / "unet" / "diffusion_pytorch_model.bin").exists()
    ours, reference = unet_outputs(sd1_bin_dir, (8, 8))
    assert rel_error(ours, reference) <= 1e-4


def test_unet_bfloat16_stays_close(sd1_dir):
    generator = np.random.default_rng(0)
    sample = jnp.asarray(generator.standard_normal((1, 8, 8, 4)), jnp.float32)
    context = jnp.asarray(generator.standard_normal((1, 16, 32)), jnp.float32)
    full = jitted(load_unet(sd1_dir / "unet"))(sample, jnp.array([500]), context)
    unet_bf16 = load_unet(sd1_dir / "unet", dtype=jnp.bfloat16)
    assert unet_bf16.conv_in.kernel[...].dtype == jnp.bfloat16
    half = jitted(unet_bf16)(sample.astype(jnp.bfloat16), jnp.array([500]), context.astype(jnp.bfloat16))
    assert half.dtype == jnp.bfloat16
    assert rel_error(np.asarray(half, np.float32), np.asarray(full)) < 0.05


def copy_unet(src, tmp_path):
    dst = tmp_path / "unet"
    shutil.copytree(src / "unet", dst)
    return dst


@pytest.mark.parametrize("key, value, message", [
    ("resnet_time_scale_shift", "scale_shift", "resnet_time_scale_shift='scale_shift' is not supported"),
    ("class_embed_type", "timestep", "class_embed_type='timestep' is not supported"),
    ("some_future_option", 1, "config key 'some_future_option' is not supported"),
    ("layers_per_block", [1, 1], "layers_per_block has 2 entries for 3 blocks"),
    ("addition_embed_type", "text_image", "addition_embed_type='text_image' is not supported"),
    ("addition_embed_type", "text_time", "addition_embed_type='text_time' needs addition_time_embed_dim"),
    ("addition_time_embed_dim", 8, "addition_time_embed_dim=8 is not supported without addition_embed_type="),
    ("projection_class_embeddings_input_dim", 80, "projection_class_embeddings_input_dim=80 is not supported"),
])
def test_unet_rejects_unsupported_config(sd1_dir, tmp_path, key, value, message):
    folder = copy_unet(sd1_dir, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config[key] = value
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="config.json: .*" + message.replace("[", r"\[")):
        load_unet(folder)


def test_unet_weight_mismatch_names_file_and_key(sd1_dir, tmp_path):
    from safetensors.numpy import load_file, save_file

    folder = copy_unet(sd1_dir, tmp_path)
    weight_file = folder / "diffusion_pytorch_model.safetensors"
    state = load_file(weight_file)
    # norm_num_groups does not change shapes, but a different channel count does.
    config = json.loads((folder / "config.json").read_text())
    config["block_out_channels"] = [8, 16, 32]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="diffusion_pytorch_model.safetensors: weight .* has shape"):
        load_unet(folder)
    (folder / "config.json").write_text((sd1_dir / "unet" / "config.json").read_text())
    del state["mid_block.attentions.0.proj_in.weight"]
    save_file(state, weight_file)
    with pytest.raises(UserError, match="missing weight 'mid_block.attentions.0.proj_in.weight'"):
        load_unet(folder)
    state["mid_block.attentions.0.proj_in.weight"] = np.zeros((16, 16, 1, 1), np.float32)
    state["extra.weight"] = np.zeros(3, np.float32)
    save_file(state, weight_file)
    with pytest.raises(UserError, match="unexpected weight 'extra.weight'"):
        load_unet(folder)


def test_unet_bin_without_torch_is_a_clear_error(sd1_bin_dir, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "torch", None)
    with pytest.raises(UserError, match=r"diffusion_pytorch_model.bin: reading .bin weights needs PyTorch"):
        load_unet(sd1_bin_dir / "unet")


def test_record_attention_probs(sd1_dir):
    import jax
    from flax import nnx

    unet = load_unet(sd1_dir / "unet")
    unet.set_attributes(record_probs=True)
    graphdef, state = nnx.split(unet)
    capture = jax.jit(lambda state, *args: nnx.capture(nnx.merge(graphdef, state), nnx.Intermediate)(*args))
    rng = np.random.default_rng(0)
    sample = jnp.asarray(rng.standard_normal((1, 8, 8, 4)), jnp.float32)
    context = jnp.asarray(rng.standard_normal((1, 16, 32)), jnp.float32)
    out, intermediates = capture(state, sample, jnp.array([10]), context)
    flat = {".".join(map(str, path)): v for path, v in nnx.to_flat_state(intermediates)}
    assert len(flat) == 2 * 11  # self- and cross-attention of 4 down, 1 mid and 6 up transformer blocks
    (cross,) = flat["down_blocks.0.attentions.0.transformer_blocks.0.attn2.attention_probs"].get_value()
    assert cross.shape == (1, 2, 64, 16)  # (batch, heads, 8x8 pixels, 16 tokens)
    np.testing.assert_allclose(cross.sum(-1), 1.0, atol=1e-5)
    unet.set_attributes(record_probs=False)
    np.testing.assert_allclose(out, jitted(unet)(sample, jnp.array([10]), context), atol=1e-5)
