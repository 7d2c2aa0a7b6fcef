"""The real SD 1.5 UNet and text-encoder configurations (random weights) at a small latent size. Slow."""
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from conftest import jitted

pytestmark = pytest.mark.slow

SD15_UNET = {
    "act_fn": "silu", "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False, "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4, "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
SD15_TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                 num_hidden_layers=12, max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=49406,
                 eos_token_id=49407, pad_token_id=1)


def test_sd15_unet(tmp_path):
    from diffusers import UNet2DConditionModel

    from nsync_jax.models.unet import load_unet

    torch.manual_seed(0)
    torch_unet = UNet2DConditionModel(**SD15_UNET).eval()
    torch_unet.save_pretrained(tmp_path / "unet")
    sample, context = torch.randn(1, 4, 16, 16), torch.randn(1, 77, 768)
    with torch.no_grad():
        reference = torch_unet(sample, torch.tensor([321]), context).sample.numpy()
    del torch_unet
    unet = load_unet(tmp_path / "unet")
    assert sum(v.size for v in jax_leaves(unet)) == 859_520_964
    ours = jitted(unet)(jnp.asarray(sample.numpy().transpose(0, 2, 3, 1)), jnp.array([321]),
                        jnp.asarray(context.numpy()))
    ours = np.asarray(ours).transpose(0, 3, 1, 2)
    assert np.abs(ours - reference).max() / np.abs(reference).max() <= 1e-4


def test_sd15_text_encoder(tmp_path):
    from transformers import CLIPTextConfig, CLIPTextModel

    from nsync_jax.models.clip_text import load_text_encoder

    torch.manual_seed(0)
    torch_model = CLIPTextModel(CLIPTextConfig(**SD15_TEXT)).eval()
    torch_model.save_pretrained(tmp_path / "text_encoder")
    ids = torch.randint(0, 49408, (2, 77))
    with torch.no_grad():
        reference = torch_model(ids).last_hidden_state.numpy()
    ours = jitted(load_text_encoder(tmp_path / "text_encoder"))(jnp.asarray(ids.numpy()))
    assert np.abs(np.asarray(ours) - reference).max() / np.abs(reference).max() <= 1e-4


def jax_leaves(module):
    import jax
    from flax import nnx

    return jax.tree.leaves(nnx.state(module, nnx.Param))
