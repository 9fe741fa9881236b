"""CLIP text and vision towers in Flax linen (Radford et al. 2021, "Learning Transferable Visual Models From
Natural Language Supervision"), laid out like the transformers `CLIPModel` family so that public checkpoints map
one-to-one (see `diffusion_jax/pretrained/clip.py`).

Text tower (CLIP paper §2.4): token + learned position embedding -> pre-LN transformer with a causal mask ->
final LayerNorm; the pooled feature is the hidden state at the end-of-text token ("[EOS] activations ... are
treated as the feature representation of the text"), then a bias-free linear `text_projection`.

Vision tower (ViT, Dosovitskiy et al. 2021): bias-free patch convolution, a learned class token, learned position
embedding, an extra LayerNorm before the encoder (`pre_layrnorm`, CLIP's addition), the same pre-LN encoder,
`post_layernorm` on the class token, bias-free `visual_projection`.

`CLIPModel` adds `logit_scale` (learned temperature, initialised to log(1/0.07)); logits are cosine similarities
times exp(logit_scale) (CLIP paper Fig. 3).

Param trees use the transformers module names with "/" for "." and `layers_N` for `layers.N`; params are float32,
computation runs in `dtype`. Images are NHWC (JAX convention), not NCHW. Attention uses
`models/attention.py` (implementation by name).

Usage::

  cfg = clip_config("vit-l-14")
  text = CLIPTextModel(cfg.text, with_projection=True)
  params = text.init(rng, ids)["params"]
  out = text.apply({"params": params}, ids)   # dict: last_hidden_state, pooler_output, hidden_states, text_embeds
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import flax.linen as nn

from diffusion_jax.models import attention as attn_lib
from diffusion_jax.registry import check_choice

Array = jax.Array

ACTIVATIONS = ("quick_gelu", "gelu", "gelu_new", "relu")

# transformers' fixed token ids of the CLIP BPE vocabulary.
BOS_TOKEN_ID = 49406  # <|startoftext|>
EOS_TOKEN_ID = 49407  # <|endoftext|>


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
  """Text tower hyper-parameters (names follow transformers' `CLIPTextConfig`).

  `eos_token_id == 2` is the legacy setting found in the original OpenAI/LAION configs: the pooled token is then
  the argmax of the token ids (the end-of-text id is the largest id of the CLIP vocabulary). Any other value
  pools at the first position holding that id, as transformers does.
  """
  vocab_size: int = 49408
  hidden_size: int = 512
  intermediate_size: int = 2048
  num_hidden_layers: int = 12
  num_attention_heads: int = 8
  max_position_embeddings: int = 77
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  projection_dim: int = 512
  eos_token_id: int = 2


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
  """Vision tower hyper-parameters (names follow transformers' `CLIPVisionConfig`)."""
  image_size: int = 224
  patch_size: int = 32
  num_channels: int = 3
  hidden_size: int = 768
  intermediate_size: int = 3072
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  projection_dim: int = 512


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
  text: CLIPTextConfig = CLIPTextConfig()
  vision: CLIPVisionConfig = CLIPVisionConfig()
  projection_dim: int = 512
  logit_scale_init_value: float = 2.6592  # log(1 / 0.07), CLIP paper §2.5


def _presets() -> Dict[str, CLIPConfig]:
  b32 = CLIPConfig(
      text=CLIPTextConfig(hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8,
                          projection_dim=512),
      vision=CLIPVisionConfig(patch_size=32, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                              num_attention_heads=12, projection_dim=512),
      projection_dim=512)
  l14 = CLIPConfig(
      text=CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                          projection_dim=768),
      vision=CLIPVisionConfig(patch_size=14, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                              num_attention_heads=16, projection_dim=768),
      projection_dim=768)
  # laion/CLIP-ViT-bigG-14-laion2B-39B-b160k (text encoder of SDXL / Kandinsky 2.2 prior), exact GELU.
  bigg14 = CLIPConfig(
      text=CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                          hidden_act="gelu", projection_dim=1280),
      vision=CLIPVisionConfig(patch_size=14, hidden_size=1664, intermediate_size=8192, num_hidden_layers=48,
                              num_attention_heads=16, hidden_act="gelu", projection_dim=1280),
      projection_dim=1280)
  return {"vit-b-32": b32, "vit-l-14": l14, "vit-bigg-14": bigg14}


CLIP_PRESETS = _presets()


def clip_config(name: str, **text_overrides: Any) -> CLIPConfig:
  """A named CLIP size: "vit-b-32", "vit-l-14" or "vit-bigg-14"; keyword overrides apply to the text tower."""
  check_choice("CLIP preset", name, CLIP_PRESETS)
  cfg = CLIP_PRESETS[name]
  if text_overrides:
    cfg = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, **text_overrides))
  return cfg


def activation(name: str):
  check_choice("CLIP activation", name, ACTIVATIONS)
  if name == "quick_gelu":  # OpenAI CLIP: x * sigmoid(1.702 x)
    return lambda x: x * jax.nn.sigmoid(1.702 * x)
  if name == "gelu":
    return lambda x: jax.nn.gelu(x, approximate=False)
  if name == "gelu_new":
    return lambda x: jax.nn.gelu(x, approximate=True)
  return jax.nn.relu


class CLIPAttention(nn.Module):
  """Multi-head self-attention with biased q/k/v/out projections; `mask` is boolean (B, 1|N, T, S)."""
  hidden_size: int
  num_heads: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, mask: Optional[Array] = None) -> Array:
    b, t, _ = x.shape
    if self.hidden_size % self.num_heads:
      raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_heads}.")
    hd = self.hidden_size // self.num_heads
    dense = lambda name: nn.Dense(self.hidden_size, dtype=self.dtype, param_dtype=jnp.float32, name=name)
    q = dense("q_proj")(x).reshape(b, t, self.num_heads, hd)
    k = dense("k_proj")(x).reshape(b, t, self.num_heads, hd)
    v = dense("v_proj")(x).reshape(b, t, self.num_heads, hd)
    o = attn_lib.dot_product_attention(q, k, v, mask=mask, scale=hd ** -0.5)
    return dense("out_proj")(o.reshape(b, t, self.hidden_size))


class CLIPMLP(nn.Module):
  hidden_size: int
  intermediate_size: int
  hidden_act: str
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x = nn.Dense(self.intermediate_size, dtype=self.dtype, param_dtype=jnp.float32, name="fc1")(x)
    x = activation(self.hidden_act)(x)
    return nn.Dense(self.hidden_size, dtype=self.dtype, param_dtype=jnp.float32, name="fc2")(x)


class CLIPEncoderLayer(nn.Module):
  """Pre-LN residual block: x + Attn(LN(x)); x + MLP(LN(x))."""
  hidden_size: int
  intermediate_size: int
  num_heads: int
  hidden_act: str
  layer_norm_eps: float
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, mask: Optional[Array] = None) -> Array:
    ln = lambda name: nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype, param_dtype=jnp.float32,
                                   name=name)
    x = x + CLIPAttention(self.hidden_size, self.num_heads, self.dtype, name="self_attn")(ln("layer_norm1")(x), mask)
    x = x + CLIPMLP(self.hidden_size, self.intermediate_size, self.hidden_act, self.dtype,
                    name="mlp")(ln("layer_norm2")(x))
    return x


class CLIPEncoder(nn.Module):
  """Stack of `CLIPEncoderLayer`s; returns the final state and all hidden states (input + each layer)."""
  config: Any  # CLIPTextConfig or CLIPVisionConfig
  dtype: Any = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, x: Array, mask: Optional[Array] = None) -> Tuple[Array, Tuple[Array, ...]]:
    c = self.config
    layer_cls = nn.remat(CLIPEncoderLayer) if self.remat else CLIPEncoderLayer
    states = [x]
    for i in range(c.num_hidden_layers):
      x = layer_cls(c.hidden_size, c.intermediate_size, c.num_attention_heads, c.hidden_act, c.layer_norm_eps,
                    self.dtype, name=f"layers_{i}")(x, mask)
      states.append(x)
    return x, tuple(states)


class CLIPTextEmbeddings(nn.Module):
  config: CLIPTextConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, input_ids: Array, position_ids: Optional[Array] = None) -> Array:
    c = self.config
    t = input_ids.shape[-1]
    if t > c.max_position_embeddings:
      raise ValueError(f"Sequence length {t} exceeds max_position_embeddings {c.max_position_embeddings}; "
                       "truncate the tokens (the CLIP tokenizer pads/truncates to 77).")
    init = nn.initializers.normal(0.02)
    tok = nn.Embed(c.vocab_size, c.hidden_size, embedding_init=init, dtype=self.dtype, param_dtype=jnp.float32,
                   name="token_embedding")(input_ids)
    if position_ids is None:
      position_ids = jnp.arange(t)[None]
    pos = nn.Embed(c.max_position_embeddings, c.hidden_size, embedding_init=init, dtype=self.dtype,
                   param_dtype=jnp.float32, name="position_embedding")(position_ids)
    return tok + pos


class CLIPTextTransformer(nn.Module):
  """Text tower without projection. Returns last_hidden_state (after final LN), pooler_output (EOS token) and
  hidden_states (embeddings + every layer output, before the final LN), as transformers does."""
  config: CLIPTextConfig
  dtype: Any = jnp.float32
  remat: bool = False
  attention: Optional[str] = None  # attention implementation (models/attention.py); None = inherit

  @nn.compact
  @attn_lib.scoped
  def __call__(self, input_ids: Array, attention_mask: Optional[Array] = None,
               position_ids: Optional[Array] = None) -> Dict[str, Any]:
    c = self.config
    input_ids = jnp.asarray(input_ids)
    x = CLIPTextEmbeddings(c, self.dtype, name="embeddings")(input_ids, position_ids)
    t = input_ids.shape[-1]
    mask = jnp.tril(jnp.ones((t, t), bool))[None, None]  # causal (CLIP §2.4: masked self-attention)
    if attention_mask is not None:
      mask = mask & (jnp.asarray(attention_mask) > 0)[:, None, None, :]
    x, states = CLIPEncoder(c, self.dtype, self.remat, name="encoder")(x, mask)
    x = nn.LayerNorm(epsilon=c.layer_norm_eps, dtype=self.dtype, param_dtype=jnp.float32,
                     name="final_layer_norm")(x)
    if c.eos_token_id == 2:  # legacy configs: EOT is the largest id of the vocabulary
      idx = jnp.argmax(input_ids, axis=-1)
    else:  # first occurrence of the configured EOS id
      idx = jnp.argmax((input_ids == c.eos_token_id).astype(jnp.int32), axis=-1)
    pooled = jnp.take_along_axis(x, idx[:, None, None], axis=1)[:, 0]
    return {"last_hidden_state": x, "pooler_output": pooled, "hidden_states": states}


class CLIPTextModel(nn.Module):
  """transformers `CLIPTextModel` (with_projection=False) or `CLIPTextModelWithProjection` (True).

  Output dict: last_hidden_state (B,T,D), pooler_output (B,D), hidden_states (L+1 x (B,T,D)) and, with the
  projection, text_embeds (B,P) (unnormalised, as transformers returns them).
  """
  config: CLIPTextConfig
  with_projection: bool = False
  dtype: Any = jnp.float32
  remat: bool = False
  attention: Optional[str] = None  # attention implementation (models/attention.py); None = inherit

  @nn.compact
  @attn_lib.scoped
  def __call__(self, input_ids: Array, attention_mask: Optional[Array] = None,
               position_ids: Optional[Array] = None) -> Dict[str, Any]:
    out = CLIPTextTransformer(self.config, self.dtype, self.remat, name="text_model")(
        input_ids, attention_mask, position_ids)
    if self.with_projection:
      out["text_embeds"] = nn.Dense(self.config.projection_dim, use_bias=False, dtype=self.dtype,
                                    param_dtype=jnp.float32, name="text_projection")(out["pooler_output"])
    return out


class CLIPVisionEmbeddings(nn.Module):
  config: CLIPVisionConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, pixel_values: Array) -> Array:
    c = self.config
    b, h, w, ch = pixel_values.shape
    if h != c.image_size or w != c.image_size or ch != c.num_channels:
      raise ValueError(f"Expected NHWC images of shape (B, {c.image_size}, {c.image_size}, {c.num_channels}), "
                       f"got {pixel_values.shape}. Resize the images or change image_size.")
    p = c.patch_size
    x = nn.Conv(c.hidden_size, (p, p), strides=(p, p), padding="VALID", use_bias=False, dtype=self.dtype,
                param_dtype=jnp.float32, name="patch_embedding")(pixel_values.astype(self.dtype))
    x = x.reshape(b, -1, c.hidden_size)
    cls = self.param("class_embedding", nn.initializers.normal(c.hidden_size ** -0.5), (c.hidden_size,))
    x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (b, 1, c.hidden_size)), x], axis=1)
    n_pos = (c.image_size // p) ** 2 + 1
    pos = nn.Embed(n_pos, c.hidden_size, embedding_init=nn.initializers.normal(0.02), dtype=self.dtype,
                   param_dtype=jnp.float32, name="position_embedding")(jnp.arange(n_pos)[None])
    return x + pos


class CLIPVisionTransformer(nn.Module):
  """Vision tower without projection. Returns last_hidden_state, pooler_output (post_layernorm of the class
  token) and hidden_states (the pre_layrnorm output + every layer output)."""
  config: CLIPVisionConfig
  dtype: Any = jnp.float32
  remat: bool = False
  attention: Optional[str] = None  # attention implementation (models/attention.py); None = inherit

  @nn.compact
  @attn_lib.scoped
  def __call__(self, pixel_values: Array) -> Dict[str, Any]:
    c = self.config
    ln = lambda name: nn.LayerNorm(epsilon=c.layer_norm_eps, dtype=self.dtype, param_dtype=jnp.float32, name=name)
    x = CLIPVisionEmbeddings(c, self.dtype, name="embeddings")(jnp.asarray(pixel_values))
    x = ln("pre_layrnorm")(x)
    x, states = CLIPEncoder(c, self.dtype, self.remat, name="encoder")(x)
    pooled = ln("post_layernorm")(x[:, 0])
    return {"last_hidden_state": x, "pooler_output": pooled, "hidden_states": states}


class CLIPVisionModel(nn.Module):
  """transformers `CLIPVisionModel` / `CLIPVisionModelWithProjection` (adds image_embeds)."""
  config: CLIPVisionConfig
  with_projection: bool = False
  dtype: Any = jnp.float32
  remat: bool = False
  attention: Optional[str] = None  # attention implementation (models/attention.py); None = inherit

  @nn.compact
  @attn_lib.scoped
  def __call__(self, pixel_values: Array) -> Dict[str, Any]:
    out = CLIPVisionTransformer(self.config, self.dtype, self.remat, name="vision_model")(pixel_values)
    if self.with_projection:
      out["image_embeds"] = nn.Dense(self.config.projection_dim, use_bias=False, dtype=self.dtype,
                                     param_dtype=jnp.float32, name="visual_projection")(out["pooler_output"])
    return out


def _l2norm(x: Array) -> Array:
  return x / jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True))


class CLIPModel(nn.Module):
  """Two towers + projections + logit_scale (transformers `CLIPModel`).

  `__call__(input_ids, pixel_values, attention_mask)` returns logits_per_text (Nt, Ni), logits_per_image,
  text_embeds / image_embeds (L2-normalised), text_model_output, vision_model_output.
  `get_text_features` / `get_image_features` return the unnormalised projected embeddings.
  """
  config: CLIPConfig
  dtype: Any = jnp.float32
  remat: bool = False
  attention: Optional[str] = None  # attention implementation (models/attention.py); None = inherit

  def setup(self):
    c = self.config
    self.text_model = CLIPTextTransformer(c.text, self.dtype, self.remat)
    self.vision_model = CLIPVisionTransformer(c.vision, self.dtype, self.remat)
    self.text_projection = nn.Dense(c.projection_dim, use_bias=False, dtype=self.dtype, param_dtype=jnp.float32)
    self.visual_projection = nn.Dense(c.projection_dim, use_bias=False, dtype=self.dtype, param_dtype=jnp.float32)
    self.logit_scale = self.param("logit_scale", nn.initializers.constant(c.logit_scale_init_value), ())

  @attn_lib.scoped
  def get_text_features(self, input_ids: Array, attention_mask: Optional[Array] = None) -> Array:
    return self.text_projection(self.text_model(input_ids, attention_mask)["pooler_output"])

  @attn_lib.scoped
  def get_image_features(self, pixel_values: Array) -> Array:
    return self.visual_projection(self.vision_model(pixel_values)["pooler_output"])

  @attn_lib.scoped
  def __call__(self, input_ids: Array, pixel_values: Array,
               attention_mask: Optional[Array] = None) -> Dict[str, Any]:
    t_out = self.text_model(input_ids, attention_mask)
    v_out = self.vision_model(pixel_values)
    text_embeds = _l2norm(self.text_projection(t_out["pooler_output"]).astype(jnp.float32))
    image_embeds = _l2norm(self.visual_projection(v_out["pooler_output"]).astype(jnp.float32))
    logits_per_text = text_embeds @ image_embeds.T * jnp.exp(self.logit_scale)
    return {"logits_per_text": logits_per_text, "logits_per_image": logits_per_text.T,
            "text_embeds": text_embeds, "image_embeds": image_embeds,
            "text_model_output": t_out, "vision_model_output": v_out}


def count_params(tree: Any) -> int:
  """Number of scalars in a (possibly abstract, `jax.eval_shape`) param tree."""
  import math
  return int(sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))


def abstract_params(module: nn.Module, *args: Any) -> Any:
  """Param shapes of `module` built with `jax.eval_shape` (no memory allocated)."""
  return jax.eval_shape(lambda *a: module.init(jax.random.PRNGKey(0), *a), *args)["params"]
