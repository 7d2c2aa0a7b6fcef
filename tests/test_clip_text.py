"""The Flax CLIP text encoder against transformers' CLIPTextModel (tiny, random), and its load errors."""
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file, save_file
from transformers import CLIPTextConfig as TorchCLIPTextConfig
from transformers import CLIPTextModel as TorchCLIPTextModel
from transformers import CLIPTextModelWithProjection as TorchCLIPTextModelWithProjection

from conftest import _randomize
from nsync_jax.errors import UserError
from nsync_jax.models.clip_text import (CLIPTextConfig, CLIPTextWithProjectionConfig, load_text_encoder,
                                        pooled_output)
from nsync_jax.tokens import load_tokenizer, tokenize

# Short, long (truncated to 16 tokens), empty, and byte-level text (not in the tiny BPE merges).
PROMPTS = ["a photo of a cat", "a red dog in the style of a blue star circle painting of the cat in a photo", "",
           "Zebra, 42!"]


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer_dir):
    return load_tokenizer(tiny_tokenizer_dir)


@pytest.fixture(scope="module")
def ids(tokenizer):
    return tokenize(tokenizer, PROMPTS)


def torch_encoder(tokenizer, *, hidden_act="quick_gelu", extra_vocab=0, model_class=TorchCLIPTextModel, **config):
    torch.manual_seed(0)
    model = model_class(TorchCLIPTextConfig(**{
        **dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=3,
               vocab_size=len(tokenizer) + extra_vocab, max_position_embeddings=tokenizer.model_max_length,
               bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id, hidden_act=hidden_act), **config})).eval()
    _randomize(model)
    return model


def run(model, fn):
    """`fn(model)` compiled, with the parameters as jit arguments (eager NNX dispatch is slow)."""
    graphdef, state = nnx.split(model)
    return jax.tree.map(np.asarray, jax.jit(lambda state: fn(nnx.merge(graphdef, state)))(state))


def rel_error(ours, reference) -> float:
    return float(np.abs(np.asarray(ours, np.float32) - reference).max() / np.abs(reference).max())


@pytest.fixture(scope="module")
def sd1(tmp_path_factory, tokenizer):
    """A quick-GELU (SD 1.x) encoder, saved by transformers, and our load of it."""
    torch_model = torch_encoder(tokenizer)
    folder = tmp_path_factory.mktemp("text_encoder")
    torch_model.save_pretrained(folder)
    return torch_model, folder, load_text_encoder(folder)


@pytest.mark.parametrize("hidden_act", ["quick_gelu", "gelu", "gelu_new", "gelu_pytorch_tanh"])
def test_last_hidden_state_matches_transformers(hidden_act, tokenizer, ids, tmp_path):
    torch_model = torch_encoder(tokenizer, hidden_act=hidden_act)
    torch_model.save_pretrained(tmp_path)
    with torch.no_grad():
        reference = torch_model(torch.from_numpy(ids).long()).last_hidden_state.numpy()
    model = load_text_encoder(tmp_path)
    assert model.config == CLIPTextConfig(vocab_size=549, hidden_size=32, intermediate_size=37, num_hidden_layers=3,
                                          num_attention_heads=4, max_position_embeddings=16, hidden_act=hidden_act,
                                          eos_token_id=tokenizer.eos_token_id)
    ours = run(model, lambda m: m(jnp.asarray(ids)))
    assert ours.shape == reference.shape == (len(PROMPTS), 16, 32)
    assert rel_error(ours, reference) <= 1e-4


@pytest.mark.parametrize("clip_skip", [1, 2])
def test_clip_skip_matches_diffusers(clip_skip, sd1, ids):
    torch_model, _, model = sd1
    with torch.no_grad():
        # diffusers' encode_prompt: hidden_states[-(clip_skip + 1)], then the final layer norm.
        hidden = torch_model(torch.from_numpy(ids).long(), output_hidden_states=True).hidden_states
        assert len(hidden) == 4  # the embeddings, then each of the 3 layers
        reference = torch_model.final_layer_norm(hidden[-(clip_skip + 1)]).numpy()
    ours = run(model, lambda m: m(jnp.asarray(ids), clip_skip=clip_skip))
    assert rel_error(ours, reference) <= 1e-4


@pytest.fixture(scope="module")
def with_projection(tmp_path_factory, tokenizer):
    """A `CLIPTextModelWithProjection` (SDXL's second encoder; projection_dim != hidden_size), and our load."""
    torch_model = torch_encoder(tokenizer, hidden_act="gelu", projection_dim=24,
                                model_class=TorchCLIPTextModelWithProjection)
    folder = tmp_path_factory.mktemp("text_encoder_2")
    torch_model.save_pretrained(folder)
    return torch_model, folder, load_text_encoder(folder, with_projection=True)


@pytest.mark.parametrize("family", ["sd1", "with_projection"])
def test_hidden_states_match_transformers(family, request, ids):
    """Every layer's output without the final layer norm; SDXL conditions on `hidden_states[-2]` of both."""
    torch_model, _, model = request.getfixturevalue(family)
    with torch.no_grad():
        reference = torch_model(torch.from_numpy(ids).long(), output_hidden_states=True).hidden_states
    ours = run(model, lambda m: m.hidden_states(jnp.asarray(ids)))
    assert len(ours) == len(reference) == 4
    for state, expected in zip(ours, reference):
        assert rel_error(state, expected.numpy()) <= 1e-4


def test_projected_pooled_output_matches_transformers(with_projection, ids):
    torch_model, _, model = with_projection
    assert model.config == CLIPTextWithProjectionConfig(
        vocab_size=549, hidden_size=32, intermediate_size=37, num_hidden_layers=3, num_attention_heads=4,
        max_position_embeddings=16, hidden_act="gelu", eos_token_id=model.config.eos_token_id, projection_dim=24)
    with torch.no_grad():
        reference = torch_model(torch.from_numpy(ids).long())
    def last_and_projected(m):
        last = m(jnp.asarray(ids))
        return last, m.text_embeds(last, jnp.asarray(ids))

    last, text_embeds = run(model, last_and_projected)
    assert text_embeds.shape == (len(PROMPTS), 24)
    assert rel_error(last, reference.last_hidden_state.numpy()) <= 1e-4
    assert rel_error(text_embeds, reference.text_embeds.numpy()) <= 1e-4


def test_with_projection_and_without_are_told_apart(sd1, with_projection):
    with pytest.raises(UserError, match="config.json: config architectures=.*CLIPTextModelWithProjection"):
        load_text_encoder(with_projection[1])
    with pytest.raises(UserError, match=r"config.json: config architectures=\['CLIPTextModel'\]"):
        load_text_encoder(sd1[1], with_projection=True)


def test_clip_skip_out_of_range(sd1, ids):
    with pytest.raises(UserError, match="clip_skip=3 .*3 layers"):
        sd1[2](jnp.asarray(ids), clip_skip=3)


def test_layer_norm_is_two_pass(sd1):
    # Hidden states far from zero mean: E[x^2] - E[x]^2 in float32 (Flax's default) is 20% off here.
    torch_model, _, model = sd1
    x = np.random.default_rng(0).standard_normal((2, 16, 32)).astype(np.float32) + 1000
    with torch.no_grad():
        reference = torch_model.final_layer_norm(torch.from_numpy(x)).numpy()
    assert rel_error(model.final_layer_norm(jnp.asarray(x)), reference) <= 1e-3


def test_inputs_embeds_equal_ids(sd1, ids):
    model = sd1[2]
    by_ids = run(model, lambda m: m(jnp.asarray(ids)))
    by_embeds = run(model, lambda m: m(inputs_embeds=m.embeddings.token_embedding.embedding[...][ids]))
    np.testing.assert_allclose(by_embeds, by_ids, rtol=0, atol=1e-6)


@pytest.mark.parametrize("eos_token_id", [None, 2])
def test_pooled_output_matches_transformers(eos_token_id, tokenizer, ids, tmp_path):
    # Ids past the eos id (learned tokens) tell transformers' two pooling rules apart: the legacy
    # `eos_token_id == 2` rule pools at the largest id, the current one at the first eos.
    ids = ids.copy()
    ids[0, 2] = len(tokenizer) + 1
    extra = {} if eos_token_id is None else dict(eos_token_id=eos_token_id)
    torch_model = torch_encoder(tokenizer, extra_vocab=2, **extra)
    torch_model.save_pretrained(tmp_path)
    with torch.no_grad():
        reference = torch_model(torch.from_numpy(ids).long()).pooler_output.numpy()
    model = load_text_encoder(tmp_path)
    ours = run(model, lambda m: pooled_output(m(jnp.asarray(ids)), jnp.asarray(ids), m.config.eos_token_id))
    assert rel_error(ours, reference) <= 1e-4


def test_legacy_bin_with_text_model_prefix(sd1, ids, tmp_path):
    """Checkpoints from transformers 4 (pytorch_model.bin): `text_model.` keys and a `position_ids` buffer."""
    torch_model, folder, _ = sd1
    (tmp_path / "config.json").write_bytes((folder / "config.json").read_bytes())
    state = {f"text_model.{k}": v for k, v in torch_model.state_dict().items()}
    state["text_model.embeddings.position_ids"] = torch.arange(16)[None]
    torch.save(state, tmp_path / "pytorch_model.bin")
    with torch.no_grad():
        reference = torch_model(torch.from_numpy(ids).long()).last_hidden_state.numpy()
    assert rel_error(run(load_text_encoder(tmp_path), lambda m: m(jnp.asarray(ids))), reference) <= 1e-4


def test_bfloat16(sd1, ids):
    torch_model, folder, _ = sd1
    model = load_text_encoder(folder, dtype=jnp.bfloat16)
    assert model.encoder.layers[0].mlp.fc1.kernel[...].dtype == jnp.bfloat16
    ours = run(model, lambda m: m(jnp.asarray(ids)))
    assert ours.dtype == jnp.bfloat16
    with torch.no_grad():
        reference = torch_model(torch.from_numpy(ids).long()).last_hidden_state.numpy()
    assert rel_error(ours, reference) <= 5e-2


# text_encoder/config.json of stable-diffusion-v1-5 and stable-diffusion-2-1 (transformers 4.2x).
SD15_CONFIG = {
    "_name_or_path": "openai/clip-vit-large-patch14", "architectures": ["CLIPTextModel"], "attention_dropout": 0.0,
    "bos_token_id": 0, "dropout": 0.0, "eos_token_id": 2, "hidden_act": "quick_gelu", "hidden_size": 768,
    "initializer_factor": 1.0, "initializer_range": 0.02, "intermediate_size": 3072, "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77, "model_type": "clip_text_model", "num_attention_heads": 12,
    "num_hidden_layers": 12, "pad_token_id": 1, "projection_dim": 768, "torch_dtype": "float32",
    "transformers_version": "4.22.0.dev0", "vocab_size": 49408,
}
SD21_CONFIG = {**SD15_CONFIG, "_name_or_path": "hf-models/stable-diffusion-v2-768x768/text_encoder",
               "hidden_act": "gelu", "hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16,
               "num_hidden_layers": 23, "projection_dim": 512, "transformers_version": "4.25.0.dev0"}


def test_released_configs_parse():
    assert CLIPTextConfig.from_dict(SD15_CONFIG) == CLIPTextConfig(
        hidden_size=768, intermediate_size=3072, num_attention_heads=12, eos_token_id=2)
    assert CLIPTextConfig.from_dict(SD21_CONFIG) == CLIPTextConfig(
        hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=23, hidden_act="gelu",
        eos_token_id=2)


def test_missing_config(sd1, tmp_path):
    (tmp_path / "model.safetensors").write_bytes((sd1[1] / "model.safetensors").read_bytes())
    with pytest.raises(UserError, match=f"{tmp_path / 'config.json'}: file not found"):
        load_text_encoder(tmp_path)


@pytest.mark.parametrize("key, value", [
    ("hidden_act", "relu"),
    ("architectures", ["CLIPTextModelWithProjection"]),
    ("model_type", "clip"),
    ("eos_token_id", [2, 49407]),
    ("num_attention_heads", 5),  # does not divide hidden_size=32
    ("pruned_heads", {"0": [1]}),
    ("layer_norm_eps", None),
])
def test_unsupported_config(key, value, sd1, tmp_path):
    folder = sd1[1]
    config = json.loads((folder / "config.json").read_text())
    config[key] = value
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    with pytest.raises(UserError, match=f"{tmp_path / 'config.json'}: config.*{key}"):
        load_text_encoder(tmp_path)


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.pop("encoder.layers.2.mlp.fc2.bias"), "missing weight 'encoder.layers.2.mlp.fc2.bias'"),
    (lambda s: s.update({"embeddings.position_embedding.weight": np.zeros((8, 32), np.float32)}),
     r"weight 'embeddings.position_embedding.weight' has shape \(8, 32\), but the config implies \(16, 32\)"),
    (lambda s: s.update({"text_projection.weight": np.zeros((32, 32), np.float32)}),
     "unexpected weight 'text_projection.weight'"),
])
def test_bad_weights(edit, message, sd1, tmp_path):
    folder = sd1[1]
    (tmp_path / "config.json").write_bytes((folder / "config.json").read_bytes())
    state = load_file(folder / "model.safetensors")
    edit(state)
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(UserError, match=f"{tmp_path / 'model.safetensors'}: {message}"):
        load_text_encoder(tmp_path)


def test_bin_without_torch(sd1, tmp_path, monkeypatch):
    torch_model, folder, _ = sd1
    (tmp_path / "config.json").write_bytes((folder / "config.json").read_bytes())
    torch.save(torch_model.state_dict(), tmp_path / "pytorch_model.bin")
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(UserError, match=f"{tmp_path / 'pytorch_model.bin'}: reading .bin weights needs PyTorch"):
        load_text_encoder(tmp_path)
