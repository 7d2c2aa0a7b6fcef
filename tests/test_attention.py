"""The attention backends: which one "auto" picks, and that the einsum path (chunked, causal, upcast) computes
what `jax.nn.dot_product_attention` does."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nsync_jax.models.attention import QUERY_CHUNK, auto_backend, dot_product_attention


@pytest.mark.parametrize("platform, dtype, head_dim, upcast, lengths, expected", [
    ("gpu", jnp.bfloat16, 40, False, (4096, 4096), "cudnn"),    # SD's 64x64 self-attention
    ("gpu", jnp.float16, 128, False, (1024, 1024), "cudnn"),
    ("gpu", jnp.bfloat16, 40, False, (4096, 77), "xla"),        # cross-attention to 77 text tokens
    ("gpu", jnp.bfloat16, 64, False, (77, 77), "xla"),          # the text encoder: cuDNN's backward refuses it
    ("gpu", jnp.bfloat16, 160, False, (256, 256), "xla"),       # SD 1.5's 1280-wide blocks: 8 heads of 160
    ("gpu", jnp.bfloat16, 512, False, (4096, 4096), "xla"),     # the VAE's single head
    ("gpu", jnp.bfloat16, 36, False, (64, 64), "xla"),          # not a multiple of 8
    ("gpu", jnp.bfloat16, 64, True, (64, 64), "einsum"),        # upcast_attention needs float32 scores
    ("gpu", jnp.float32, 64, False, (64, 64), "einsum"),
    ("cpu", jnp.bfloat16, 64, False, (64, 64), "einsum"),
    ("tpu", jnp.bfloat16, 64, False, (64, 64), "einsum"),
])
def test_auto_backend(platform, dtype, head_dim, upcast, lengths, expected):
    assert auto_backend(platform, dtype, head_dim, upcast, lengths) == expected


@pytest.mark.parametrize("length, causal", [(77, True), (2 * QUERY_CHUNK, False)])
def test_einsum_path_matches_jax(length, causal):
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((2, length, 3, 16)), jnp.float32) for _ in range(3))
    expected = jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="xla")
    got = dot_product_attention(q, k, v, causal=causal, backend="einsum")
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    _, probs = dot_product_attention(q, k, v, causal=causal, backend="einsum", return_probs=True)
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)
    if causal:  # no query sees a later key
        assert float(jnp.triu(probs[0, 0], 1).max()) == 0.0


def test_upcast_scores_in_float32():
    rng = np.random.default_rng(1)
    q, k, v = (jnp.asarray(rng.standard_normal((1, 64, 2, 32)) * 8, jnp.bfloat16) for _ in range(3))
    reference = jax.nn.dot_product_attention(*(x.astype(jnp.float32) for x in (q, k, v)), implementation="xla")
    upcast = dot_product_attention(q, k, v, backend="einsum", upcast=True).astype(jnp.float32)
    plain = dot_product_attention(q, k, v, backend="einsum").astype(jnp.float32)
    assert float(jnp.abs(upcast - reference).max()) < float(jnp.abs(plain - reference).max())
