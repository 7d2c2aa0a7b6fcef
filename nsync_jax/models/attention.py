"""Multi-head attention for the UNet, the VAE and the CLIP text encoder.

`dot_product_attention` is the one place where attention is computed. It has three backends:

* `"cudnn"`: `jax.nn.dot_product_attention(implementation="cudnn")`, the flash kernel on NVIDIA GPUs
  (float16/bfloat16 only); about 5x faster than XLA for SD's 4096-token self-attention on an H100.
* `"xla"`: `jax.nn.dot_product_attention(implementation="xla")`.
* `"einsum"`: an explicit softmax(QK^T)V, in query chunks so that 4096-token attention stays in cache on CPU
  (faster than the fused XLA path there), and the only path that can hand back the probabilities.

`"auto"` (the default) picks cuDNN on GPU for half precision (XLA's path for heads wider than 128 and for odd
sequence lengths such as the text's 77 tokens), and the einsum path otherwise.

`Attention` mirrors diffusers' `Attention` (`to_q`, `to_k`, `to_v`, `to_out.0`) so its weights load by name.
Setting `record_probs = True` on an instance (or on a whole model with
`model.set_attributes(record_probs=True)`) makes it sow its attention probabilities, shape
`(batch, heads, query_len, key_len)`, as `nnx.Intermediate` under the name `attention_probs`; read them with
`nnx.capture(model, nnx.Intermediate)(...)`. They stay differentiable, which attention-guided editing needs.
`record_output = True` likewise sows the layer's output `(batch, query_len, query_dim)` as `attention_output`
(the features of patch-wise contrastive editing losses); it does not change the backend.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

BACKENDS = ("auto", "cudnn", "xla", "einsum")
# Query rows per einsum chunk: 1024 keeps a 1024x4096 float32 score block at 16 MB.
QUERY_CHUNK = 1024


def dot_product_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    *,
    causal: bool = False,
    backend: str = "auto",
    upcast: bool = False,
    return_probs: bool = False,
):
    """Scaled dot-product attention on `(batch, length, heads, head_dim)` arrays.

    Args:
      causal: mask out keys after each query (the CLIP text encoder).
      backend: one of `BACKENDS`.
      upcast: compute the scores in float32 even for half-precision inputs (diffusers' `upcast_attention`).
      return_probs: also return the probabilities `(batch, heads, query_len, key_len)`; forces `"einsum"`.

    Returns:
      The attended values `(batch, query_len, heads, head_dim)`, and the probabilities if asked.
    """
    if backend not in BACKENDS:
        raise ValueError(f"attention backend {backend!r} is not one of {BACKENDS}")
    if backend == "auto":
        backend = auto_backend(jax.default_backend(), query.dtype, query.shape[-1], upcast,
                               lengths=(query.shape[1], key.shape[1]))
    if return_probs:
        backend = "einsum"
    if backend in ("cudnn", "xla"):
        return jax.nn.dot_product_attention(query, key, value, is_causal=causal, implementation=backend)
    return _einsum_attention(query, key, value, causal=causal, upcast=upcast, return_probs=return_probs)


def auto_backend(platform: str, dtype, head_dim: int, upcast: bool, lengths: tuple[int, int]) -> str:
    """What `"auto"` means for one attention call on `platform` (`jax.default_backend()`) with
    `lengths = (query_len, key_len)`."""
    if platform != "gpu" or jnp.dtype(dtype) not in (jnp.float16, jnp.bfloat16) or upcast:
        return "einsum"
    # cuDNN's flash kernel takes head dims up to 128 on every GPU it supports (256 from Hopper on); wider
    # heads, such as the VAE's single 512-wide one, go to XLA's fused path. Its backward pass refuses odd
    # sequence lengths (jax 0.11.2 on an H200: "Unsupported sequence length Q 77, KV 77" in the text encoder
    # under grad), and the forward pass cannot know whether it will be differentiated.
    flash_ok = head_dim <= 128 and head_dim % 8 == 0 and all(n % 2 == 0 for n in lengths)
    return "cudnn" if flash_ok else "xla"


def _einsum_attention(query, key, value, *, causal, upcast, return_probs):
    scale = query.shape[-1] ** -0.5
    score_dtype = jnp.float32 if upcast else query.dtype

    def attend(q_chunk, q_offset):
        scores = jnp.einsum("bqhd,bkhd->bhqk", q_chunk.astype(score_dtype), key.astype(score_dtype)) * scale
        if causal:
            q_pos = q_offset + jnp.arange(q_chunk.shape[1])[:, None]
            k_pos = jnp.arange(key.shape[1])[None, :]
            scores = jnp.where(k_pos <= q_pos, scores, jnp.finfo(scores.dtype).min)
        probs = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(value.dtype)
        return jnp.einsum("bhqk,bkhd->bqhd", probs, value), probs

    length = query.shape[1]
    if return_probs or length <= QUERY_CHUNK or length % QUERY_CHUNK:
        out, probs = attend(query, 0)
        return (out, probs) if return_probs else out
    chunks = query.reshape(query.shape[0], length // QUERY_CHUNK, QUERY_CHUNK, *query.shape[2:])
    offsets = jnp.arange(length // QUERY_CHUNK) * QUERY_CHUNK
    out = jax.lax.map(lambda args: attend(*args)[0], (jnp.moveaxis(chunks, 1, 0), offsets))
    return jnp.moveaxis(out, 0, 1).reshape(query.shape[0], length, *out.shape[3:])


class Attention(nnx.Module):
    """diffusers' `Attention`: self-attention, or cross-attention when `context_dim` is given."""

    def __init__(
        self,
        query_dim: int,
        *,
        heads: int,
        head_dim: int,
        context_dim: int | None = None,
        qkv_bias: bool = False,
        upcast: bool = False,
        backend: str = "auto",
        dtype=None,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        inner = heads * head_dim
        context_dim = context_dim or query_dim
        linear = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.heads = heads
        self.upcast = upcast
        self.backend = backend
        self.record_probs = False
        self.record_output = False
        self.to_q = nnx.Linear(query_dim, inner, use_bias=qkv_bias, **linear)
        self.to_k = nnx.Linear(context_dim, inner, use_bias=qkv_bias, **linear)
        self.to_v = nnx.Linear(context_dim, inner, use_bias=qkv_bias, **linear)
        self.to_out = nnx.List([nnx.Linear(inner, query_dim, **linear)])

    def __call__(self, hidden: jax.Array, context: jax.Array | None = None) -> jax.Array:
        """`hidden`: `(batch, length, query_dim)`; `context`: `(batch, context_len, context_dim)` or None."""
        context = hidden if context is None else context
        split = lambda x: x.reshape(*x.shape[:2], self.heads, -1)
        q, k, v = split(self.to_q(hidden)), split(self.to_k(context)), split(self.to_v(context))
        result = dot_product_attention(
            q, k, v, backend=self.backend, upcast=self.upcast, return_probs=self.record_probs
        )
        if self.record_probs:
            result, probs = result
            self.sow(nnx.Intermediate, "attention_probs", probs)
        output = self.to_out[0](result.reshape(*result.shape[:2], -1))
        if self.record_output:
            self.sow(nnx.Intermediate, "attention_output", output)
        return output
