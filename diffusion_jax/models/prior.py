"""unCLIP prior transformer in Flax linen, laid out like diffusers' `PriorTransformer` (Karlo, Kandinsky 2.x), plus
the ECLIPSE variant without a time embedding (ECLIPSE, Patel et al. 2024, App. A Table 3 and the released
`prior_transformer.py`: "additional_embeddings 3 instead of 4", no timestep argument).

Token layout (DALL-E 2 / unCLIP §2.1 "decoder-only Transformer with a causal attention mask on a sequence
consisting of, in order: the encoded text, the CLIP text embedding, an embedding for the diffusion timestep,
the noised CLIP image embedding, and a final embedding whose output is used to predict the unnoised CLIP image
embedding"):

  [encoder_hidden_states (num_embeddings tokens, via `encoder_hidden_states_proj`),
   proj_embedding (1 token, via `embedding_proj`), time embedding (1 token; absent in the ECLIPSE variant),
   hidden_states (1 token, via `proj_in`; noised embedding, or Gaussian noise for ECLIPSE), prd token]

+ learned `positional_embedding`; optional `norm_in`; `num_layers` BasicTransformerBlocks (LN -> self-attention
with biases -> residual; LN -> GELU feed-forward x4 -> residual); `norm_out`; the prd (last) token ->
`proj_to_clip_embeddings`. Attention bias: with a text mask, (1 - mask) * -10000 on text keys (extra tokens
unmasked) + a causal -10000 upper triangle. As in diffusers, **no mask at all is applied when `attention_mask`
is None** (pass an all-ones mask for the causal behaviour). `clip_mean`/`clip_std` are stored for
`post_process_latents` (x * std + mean); ECLIPSE's pipelines never call it.

Param names follow diffusers ("/" for ".", `transformer_blocks_N`, `to_out_0`, `ff/net_0/proj`, `ff/net_2`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Dict, Optional

import jax
import jax.numpy as jnp
import flax.linen as nn

from diffusion_jax.models import attention as attn_lib
from diffusion_jax.registry import check_choice

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class PriorConfig:
  """Hyper-parameters with diffusers' `PriorTransformer` names; `use_timestep=False` is the ECLIPSE variant."""
  num_attention_heads: int = 32
  attention_head_dim: int = 64
  num_layers: int = 20
  embedding_dim: int = 768
  num_embeddings: int = 77
  additional_embeddings: int = 4
  dropout: float = 0.0
  time_embed_act_fn: str = "silu"
  norm_in_type: Optional[str] = None  # None | "layer"
  embedding_proj_norm_type: Optional[str] = None  # None | "layer"
  encoder_hid_proj_type: Optional[str] = "linear"  # None | "linear"
  added_emb_type: Optional[str] = "prd"  # None | "prd"
  time_embed_dim: Optional[int] = None
  embedding_proj_dim: Optional[int] = None
  clip_embed_dim: Optional[int] = None
  use_timestep: bool = True

  @property
  def inner_dim(self) -> int:
    return self.num_attention_heads * self.attention_head_dim

  def validate(self) -> "PriorConfig":
    check_choice("norm_in_type", self.norm_in_type, (None, "layer"))
    check_choice("embedding_proj_norm_type", self.embedding_proj_norm_type, (None, "layer"))
    check_choice("encoder_hid_proj_type", self.encoder_hid_proj_type, (None, "linear"))
    check_choice("added_emb_type", self.added_emb_type, (None, "prd"))
    check_choice("time_embed_act_fn", self.time_embed_act_fn, tuple(_ACTS))
    return self


# Karlo: kakaobrain/karlo-v1-alpha prior; Kandinsky 2.2: kandinsky-community/kandinsky-2-2-prior;
# ECLIPSE (App. A Table 3 + ECLIPSE-Community/ECLIPSE_KandinskyV22_Prior config): 10 layers, 16 x 32 heads.
PRIOR_PRESETS: Dict[str, PriorConfig] = {
    "karlo": PriorConfig(embedding_dim=768),
    "kandinsky-2.2": PriorConfig(embedding_dim=1280),
    "eclipse-karlo": PriorConfig(num_attention_heads=16, attention_head_dim=32, num_layers=10, embedding_dim=768,
                                 additional_embeddings=3, use_timestep=False),
    "eclipse-kandinsky": PriorConfig(num_attention_heads=16, attention_head_dim=32, num_layers=10,
                                     embedding_dim=1280, additional_embeddings=3, use_timestep=False),
}


def prior_config(name: str, **overrides: Any) -> PriorConfig:
  """A named prior: "karlo", "kandinsky-2.2", "eclipse-karlo" (33.1M params) or "eclipse-kandinsky" (34.2M)."""
  check_choice("prior preset", name, PRIOR_PRESETS)
  return dataclasses.replace(PRIOR_PRESETS[name], **overrides).validate()


_ACTS = {"silu": jax.nn.silu, "swish": jax.nn.silu, "gelu": lambda x: jax.nn.gelu(x, approximate=False),
         "relu": jax.nn.relu, "mish": lambda x: x * jnp.tanh(jax.nn.softplus(x))}


def timestep_embedding(t: Array, dim: int, max_period: float = 10000.0) -> Array:
  """Sinusoidal embedding [cos, sin] (diffusers `Timesteps(dim, flip_sin_to_cos=True, downscale_freq_shift=0)`)."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = jnp.asarray(t, jnp.float32)[:, None] * freqs[None]
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


class PriorAttention(nn.Module):
  """diffusers `Attention` (self-attention, bias on q/k/v/out) with an additive bias (B, 1, T, S)."""
  heads: int
  head_dim: int
  dropout: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, bias: Optional[Array], deterministic: bool = True) -> Array:
    b, t, _ = x.shape
    inner = self.heads * self.head_dim
    dense = lambda n, name: nn.Dense(n, dtype=self.dtype, param_dtype=jnp.float32, name=name)
    q = dense(inner, "to_q")(x).reshape(b, t, self.heads, self.head_dim)
    k = dense(inner, "to_k")(x).reshape(b, t, self.heads, self.head_dim)
    v = dense(inner, "to_v")(x).reshape(b, t, self.heads, self.head_dim)
    if bias is not None:
      bias = bias.astype(q.dtype)
    o = attn_lib.dot_product_attention(q, k, v, bias=bias, scale=self.head_dim ** -0.5)
    o = dense(x.shape[-1], "to_out_0")(o.reshape(b, t, inner))
    return nn.Dropout(self.dropout)(o, deterministic=deterministic)


class FeedForward(nn.Module):
  """diffusers `FeedForward(activation_fn="gelu")`: Linear(d, 4d) + exact GELU -> dropout -> Linear(4d, d)."""
  dim: int
  mult: int = 4
  dropout: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, deterministic: bool = True) -> Array:
    h = _GELUProj(self.dim * self.mult, self.dtype, name="net_0")(x)
    h = nn.Dropout(self.dropout)(h, deterministic=deterministic)
    return nn.Dense(self.dim, dtype=self.dtype, param_dtype=jnp.float32, name="net_2")(h)


class _GELUProj(nn.Module):
  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x = nn.Dense(self.features, dtype=self.dtype, param_dtype=jnp.float32, name="proj")(x)
    return jax.nn.gelu(x, approximate=False)


class BasicTransformerBlock(nn.Module):
  """diffusers `BasicTransformerBlock` as the prior uses it (layer_norm, no cross-attention, attention_bias=True)."""
  dim: int
  heads: int
  head_dim: int
  dropout: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, bias: Optional[Array], deterministic: bool = True) -> Array:
    ln = lambda name: nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, param_dtype=jnp.float32, name=name)
    x = x + PriorAttention(self.heads, self.head_dim, self.dropout, self.dtype, name="attn1")(
        ln("norm1")(x), bias, deterministic)
    x = x + FeedForward(self.dim, 4, self.dropout, self.dtype, name="ff")(ln("norm3")(x), deterministic)
    return x


class PriorTransformer(nn.Module):
  """unCLIP prior / ECLIPSE prior.

  Args of `__call__`:
    hidden_states: (B, embedding_dim) (or (B, N, embedding_dim)) noised image embedding; ECLIPSE: Gaussian noise.
    proj_embedding: (B, embedding_proj_dim) pooled/projected CLIP text embedding.
    encoder_hidden_states: (B, num_embeddings, embedding_dim) CLIP text hidden states (required when
      `encoder_hid_proj_type == "linear"`).
    attention_mask: (B, num_embeddings) text mask (1 keep / 0 pad); None = no masking at all (diffusers).
    timestep: (B,) or scalar; required iff `config.use_timestep`.
  Returns (B, clip_embed_dim) predicted image embedding (prd token), or (B, N, clip_embed_dim) without prd token.
  """
  config: PriorConfig
  dtype: Any = jnp.float32
  remat: bool = False
  attention: Optional[str] = None  # attention implementation (models/attention.py); None = inherit

  @nn.compact
  @attn_lib.scoped
  def __call__(self, hidden_states: Array, proj_embedding: Array, encoder_hidden_states: Optional[Array] = None,
               attention_mask: Optional[Array] = None, timestep: Optional[Array] = None,
               deterministic: bool = True) -> Array:
    c = self.config.validate()
    inner = c.inner_dim
    dense = lambda n, name: nn.Dense(n, dtype=self.dtype, param_dtype=jnp.float32, name=name)
    ln = lambda name: nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, param_dtype=jnp.float32, name=name)
    hidden_states = jnp.asarray(hidden_states)
    b = hidden_states.shape[0]
    clip_dim = c.clip_embed_dim or c.embedding_dim

    tokens = []
    if c.encoder_hid_proj_type is not None:
      if encoder_hidden_states is None:
        raise ValueError("This prior projects encoder_hidden_states (encoder_hid_proj_type='linear'); pass the "
                         "CLIP text hidden states (B, num_embeddings, embedding_dim).")
      encoder_hidden_states = dense(inner, "encoder_hidden_states_proj")(encoder_hidden_states)
    if encoder_hidden_states is not None:
      tokens.append(encoder_hidden_states)
    if c.embedding_proj_norm_type == "layer":
      proj_embedding = ln("embedding_proj_norm")(proj_embedding)
    proj = dense(inner, "embedding_proj")(proj_embedding)
    tokens.append(proj[:, None] if proj.ndim == 2 else proj)
    if c.use_timestep:
      if timestep is None:
        raise ValueError("This prior has a time embedding (use_timestep=True); pass `timestep`.")
      t = jnp.broadcast_to(jnp.asarray(timestep).reshape(-1), (b,))
      temb = timestep_embedding(t, inner).astype(self.dtype)
      temb = _TimestepEmbedding(c.time_embed_dim or inner, inner, c.time_embed_act_fn, self.dtype,
                                name="time_embedding")(temb)
      tokens.append(temb[:, None])
    elif timestep is not None:
      raise ValueError("This prior has no time embedding (ECLIPSE variant, use_timestep=False); do not pass "
                       "`timestep`.")
    x = dense(inner, "proj_in")(hidden_states)
    tokens.append(x[:, None] if x.ndim == 2 else x)
    # ECLIPSE keeps diffusers' offset `len(text) + len(proj) + 1` although it has no time token.
    n_before = sum(tk.shape[1] for tk in tokens[:-1]) if c.use_timestep else \
        sum(tk.shape[1] for tk in tokens[:-1]) + 1
    if c.added_emb_type == "prd":
      prd = self.param("prd_embedding", nn.initializers.zeros, (1, 1, inner))
      tokens.append(jnp.broadcast_to(prd.astype(x.dtype), (b, 1, inner)))
    h = jnp.concatenate([tk.astype(self.dtype) for tk in tokens], axis=1)

    pos = self.param("positional_embedding", nn.initializers.zeros,
                     (1, c.num_embeddings + c.additional_embeddings, inner)).astype(self.dtype)
    if pos.shape[1] < h.shape[1]:  # diffusers pads with zeros for the extra tokens
      pos = jnp.pad(pos, ((0, 0), (n_before, 1 if c.added_emb_type == "prd" else 0), (0, 0)))
    if pos.shape[1] != h.shape[1]:
      raise ValueError(f"The prior sees {h.shape[1]} tokens but has {pos.shape[1]} positions "
                       f"(num_embeddings {c.num_embeddings} + additional_embeddings {c.additional_embeddings}); "
                       "check the text length and the config.")
    h = h + pos

    bias = None
    if attention_mask is not None:
      n = c.num_embeddings + c.additional_embeddings
      text_bias = (1.0 - jnp.asarray(attention_mask, jnp.float32)) * -10000.0
      text_bias = jnp.pad(text_bias, ((0, 0), (0, c.additional_embeddings)))
      causal = jnp.triu(jnp.full((n, n), -10000.0, jnp.float32), k=1)
      bias = (text_bias[:, None, :] + causal[None])[:, None]  # (B, 1, T, S)

    if c.norm_in_type == "layer":
      h = ln("norm_in")(h)
    block_cls = nn.remat(BasicTransformerBlock, static_argnums=(3,)) if self.remat else BasicTransformerBlock
    for i in range(c.num_layers):
      h = block_cls(inner, c.num_attention_heads, c.attention_head_dim, c.dropout, self.dtype,
                    name=f"transformer_blocks_{i}")(h, bias, deterministic)
    h = ln("norm_out")(h)
    h = h[:, -1] if c.added_emb_type == "prd" else h[:, n_before:]
    out = dense(clip_dim, "proj_to_clip_embeddings")(h)
    # Stored statistics (diffusers `clip_mean`, `clip_std`), used by `post_process_latents`.
    self.param("clip_mean", nn.initializers.zeros, (1, clip_dim))
    self.param("clip_std", nn.initializers.zeros, (1, clip_dim))
    return out


class _TimestepEmbedding(nn.Module):
  """diffusers `TimestepEmbedding`: linear_1 -> act -> linear_2."""
  hidden: int
  out: int
  act: str
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x = nn.Dense(self.hidden, dtype=self.dtype, param_dtype=jnp.float32, name="linear_1")(x)
    x = _ACTS[self.act](x)
    return nn.Dense(self.out, dtype=self.dtype, param_dtype=jnp.float32, name="linear_2")(x)


def post_process_latents(params: Dict[str, Any], x: Array) -> Array:
  """x * clip_std + clip_mean (diffusers `PriorTransformer.post_process_latents`)."""
  return x * params["clip_std"] + params["clip_mean"]
