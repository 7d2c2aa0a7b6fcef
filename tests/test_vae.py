"""VAE parity with diffusers' AutoencoderKL (posterior and decoded image, float32 random weights)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as TorchVAE

from conftest import jitted
from nsync_jax.errors import UserError
from nsync_jax.models.vae import load_vae, sample_posterior


def rel_error(ours, reference) -> float:
    return float(np.abs(ours - reference).max() / np.abs(reference).max())


nchw = lambda x: np.asarray(x).transpose(0, 3, 1, 2)


@pytest.mark.parametrize("folder_fixture", ["sd1_dir", "sd1_bin_dir"])
def test_vae_posterior_and_decoder_match_diffusers(folder_fixture, request):
    folder = request.getfixturevalue(folder_fixture) / "vae"
    torch_vae = TorchVAE.from_pretrained(folder).eval()
    images = torch.rand(2, 3, 24, 40, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        posterior = torch_vae.encode(images).latent_dist
        decoded = torch_vae.decode(posterior.mean).sample
    vae = load_vae(folder)
    mean, logvar = jitted(vae, "encode")(jnp.asarray(images.numpy().transpose(0, 2, 3, 1)))
    assert rel_error(nchw(mean), posterior.mean.numpy()) <= 1e-4
    assert rel_error(nchw(logvar), posterior.logvar.numpy()) <= 1e-4
    assert rel_error(nchw(jitted(vae, "decode")(mean)), decoded.numpy()) <= 1e-4


def test_vae_loads_legacy_attention_names(sd1_dir, tmp_path):
    """Checkpoints converted before diffusers 0.14 call the mid-block attention query/key/value/proj_attn."""
    import shutil

    from safetensors.numpy import load_file, save_file

    folder = tmp_path / "vae"
    shutil.copytree(sd1_dir / "vae", folder)
    state = load_file(folder / "diffusion_pytorch_model.safetensors")
    legacy = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    for key in list(state):
        for new, old in legacy.items():
            if ".attentions.0." + new + "." in key:
                value = state.pop(key)
                state[key.replace(new, old)] = value[:, :, None, None] if value.ndim == 2 else value
    save_file(state, folder / "diffusion_pytorch_model.safetensors")
    reference, legacy_vae = load_vae(sd1_dir / "vae"), load_vae(folder)
    z = jnp.ones((1, 4, 4, 4))
    np.testing.assert_array_equal(jitted(reference, "decode")(z), jitted(legacy_vae, "decode")(z))


def test_sample_posterior_statistics():
    mean = jnp.full((4000,), 1.5)
    logvar = jnp.full((4000,), np.log(0.25))
    draws = sample_posterior(mean, logvar, jax.random.key(0))
    assert abs(float(draws.mean()) - 1.5) < 0.03 and abs(float(draws.std()) - 0.5) < 0.03


def test_vae_rejects_unsupported_config(sd1_dir, tmp_path):
    import json
    import shutil

    folder = tmp_path / "vae"
    shutil.copytree(sd1_dir / "vae", folder)
    config = json.loads((folder / "config.json").read_text())
    config["latents_mean"] = [0.0, 0.0, 0.0, 0.0]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=r"vae/config.json: config latents_mean=.* is not supported"):
        load_vae(folder)
