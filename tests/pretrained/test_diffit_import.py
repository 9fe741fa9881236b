"""Released latent DiffiT checkpoint import, on a synthetic checkpoint with the NVlabs names and shapes.

The reference forward is an independent PyTorch implementation of the released module structure (written here
from the published layout: PatchEmbed + sin-cos pos-embed, TimestepEmbedder, LabelEmbedder, DiffiTBlock with
qkv + qkv_temb and a Swin relative position bias, FinalLayer)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from diffusion_jax.pretrained import diffit as P  # noqa: E402
from diffusion_jax.pretrained import io  # noqa: E402

D, DEPTH, HEADS, PATCH, CIN, INPUT, CLASSES = 32, 2, 4, 2, 4, 8, 10


def _sincos_2d(dim, g):
  def one(d, pos):
    om = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
    o = np.einsum("m,d->md", pos.reshape(-1), om)
    return np.concatenate([np.sin(o), np.cos(o)], 1)
  gw, gh = np.meshgrid(np.arange(g, dtype=np.float32), np.arange(g, dtype=np.float32))
  return np.concatenate([one(dim // 2, gw), one(dim // 2, gh)], 1)


def _synthetic_state(seed=0):
  """Random weights under the released names/shapes (plus the pos_embed / relative index buffers)."""
  rng = np.random.RandomState(seed)
  r = lambda *s: (0.2 * rng.randn(*s)).astype(np.float32)
  g, w = INPUT // PATCH, INPUT // PATCH
  st = {"x_embedder.proj.weight": r(D, CIN, PATCH, PATCH), "x_embedder.proj.bias": r(D),
        "pos_embed": _sincos_2d(D, g)[None].astype(np.float32),
        "t_embedder.mlp.0.weight": r(D, 256), "t_embedder.mlp.0.bias": r(D),
        "t_embedder.mlp.2.weight": r(D, D), "t_embedder.mlp.2.bias": r(D),
        "y_embedder.embedding_table.weight": r(CLASSES + 1, D),
        "final_layer.linear.weight": r(PATCH * PATCH * 2 * CIN, D), "final_layer.linear.bias": r(PATCH * PATCH * 2 * CIN)}
  coords = np.stack(np.meshgrid(np.arange(w), np.arange(w), indexing="ij")).reshape(2, -1)
  rel = coords[:, :, None] - coords[:, None, :]
  index = ((rel[0] + w - 1) * (2 * w - 1) + rel[1] + w - 1).astype(np.int64)
  for i in range(DEPTH):
    b = f"blocks.{i}."
    st.update({b + "attn.qkv.weight": r(3 * D, D), b + "attn.qkv.bias": r(3 * D),
               b + "attn.qkv_temb.weight": r(3 * D, D), b + "attn.qkv_temb.bias": r(3 * D),
               b + "attn.relative_position_bias_table": r((2 * w - 1) ** 2, HEADS),
               b + "attn.relative_position_index": index,
               b + "attn.proj.weight": r(D, D), b + "attn.proj.bias": r(D),
               b + "mlp.fc1.weight": r(4 * D, D), b + "mlp.fc1.bias": r(4 * D),
               b + "mlp.fc2.weight": r(D, 4 * D), b + "mlp.fc2.bias": r(D)})
  return st


def _torch_forward(st, x_nchw, t, y):
  """The released DiffiT forward, written directly in torch ops."""
  T = {k: torch.from_numpy(np.asarray(v)) for k, v in st.items()}
  F = torch.nn.functional
  x = F.conv2d(x_nchw, T["x_embedder.proj.weight"], T["x_embedder.proj.bias"], stride=PATCH)
  x = x.flatten(2).transpose(1, 2) + T["pos_embed"]
  half = 128
  freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
  args = t[:, None].float() * freqs[None]
  tf = torch.cat([torch.cos(args), torch.sin(args)], -1)
  c = F.linear(F.silu(F.linear(tf, T["t_embedder.mlp.0.weight"], T["t_embedder.mlp.0.bias"])),
               T["t_embedder.mlp.2.weight"], T["t_embedder.mlp.2.bias"])
  c = c + T["y_embedder.embedding_table.weight"][y]
  B, N, C = x.shape
  for i in range(DEPTH):
    b = f"blocks.{i}."
    h = F.layer_norm(x, (C,), eps=1e-6)
    qkv = F.linear(c, T[b + "attn.qkv_temb.weight"], T[b + "attn.qkv_temb.bias"]).unsqueeze(1) + \
        F.linear(h, T[b + "attn.qkv.weight"], T[b + "attn.qkv.bias"])
    qkv = qkv.reshape(B, N, 3, HEADS, C // HEADS).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    attn = (q * (C // HEADS) ** -0.5) @ k.transpose(-2, -1)
    rpb = T[b + "attn.relative_position_bias_table"][T[b + "attn.relative_position_index"].view(-1)]
    attn = attn + rpb.view(N, N, -1).permute(2, 0, 1).unsqueeze(0)
    a = (attn.softmax(-1) @ v).transpose(1, 2).reshape(B, N, C)
    x = x + F.linear(a, T[b + "attn.proj.weight"], T[b + "attn.proj.bias"])
    h = F.layer_norm(x, (C,), eps=1e-6)
    h = F.gelu(F.linear(h, T[b + "mlp.fc1.weight"], T[b + "mlp.fc1.bias"]), approximate="tanh")
    x = x + F.linear(h, T[b + "mlp.fc2.weight"], T[b + "mlp.fc2.bias"])
  x = F.linear(F.silu(F.layer_norm(x, (C,), eps=1e-6)), T["final_layer.linear.weight"], T["final_layer.linear.bias"])
  g, co = INPUT // PATCH, 2 * CIN
  x = x.reshape(B, g, g, PATCH, PATCH, co)
  return torch.einsum("nhwpqc->nchpwq", x).reshape(B, co, g * PATCH, g * PATCH)


def test_import_forward_matches_torch_reference(tmp_path):
  st = _synthetic_state()
  path = str(tmp_path / "diffit_tiny.safetensors")
  io.save_state_dict(st, path)
  model, params = P.load_diffit(path)
  assert (model.hidden_size, model.depth, model.num_heads, model.patch_size, model.input_size,
          model.num_classes, model.learn_sigma) == (D, DEPTH, HEADS, PATCH, INPUT, CLASSES, True)
  x = np.random.RandomState(1).randn(2, CIN, INPUT, INPUT).astype(np.float32)
  t = np.array([3.0, 871.0], np.float32)
  y = np.array([2, CLASSES])   # a class and the null class
  with torch.no_grad():
    want = _torch_forward(st, torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(y)).numpy()
  got = jax.jit(model.apply)({"params": params}, jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(t),
                             jnp.asarray(y))
  np.testing.assert_allclose(np.asarray(got).transpose(0, 3, 1, 2), want, rtol=1e-4, atol=1e-4)


def test_round_trip_and_name_checks(tmp_path):
  st = _synthetic_state(seed=3)
  path = str(tmp_path / "a.safetensors")
  io.save_state_dict(st, path)
  model, params = P.load_diffit(path)
  out = str(tmp_path / "b.safetensors")
  P.save_diffit(out, params, model)
  back = io.load_state_dict(out)
  assert set(back) == set(st)
  for k in st:
    np.testing.assert_array_equal(back[k], st[k], err_msg=k)
  bad = dict(st)
  bad["blocks.1.attn.qkv_tmb.weight"] = bad.pop("blocks.1.attn.qkv_temb.weight")
  io.save_state_dict(bad, str(tmp_path / "bad.safetensors"))
  with pytest.raises(io.CheckpointError, match="qkv_temb.weight.*qkv_tmb.weight"):
    P.load_diffit(str(tmp_path / "bad.safetensors"))
  with pytest.raises(io.CheckpointError, match="hidden_size=32"):
    P.load_diffit(path, hidden_size=64)


def test_generation_init_from_released_layout(tmp_path):
  """`config.init_from` loads a released-layout checkpoint into the generation experiment's params."""
  import importlib
  from diffusion_jax.experiments.base import get_experiment
  from diffusion_jax.models.diffit import DiffiTLatent
  cfg = importlib.import_module("configs.diffit_imagenet256").get_config("tiny")
  m = cfg.model
  model = DiffiTLatent(input_size=m.input_size, patch_size=m.patch_size, in_channels=m.in_channels,
                       hidden_size=m.hidden_size, depth=m.depth, num_heads=m.num_heads, num_classes=m.num_classes)
  x = jnp.zeros((1, m.input_size, m.input_size, m.in_channels))
  params = jax.jit(model.init)(jax.random.key(7), x, jnp.zeros((1,)), jnp.zeros((1,), jnp.int32))["params"]
  params = jax.tree.map(lambda a: a + 0.01, params)   # non-zero head, differs from a fresh init
  path = str(tmp_path / "released.safetensors")
  P.save_diffit(path, params, model)
  cfg.init_from = path
  exp = get_experiment(cfg)
  like = jax.eval_shape(exp.init, jax.random.key(0), {}, {})
  got = exp.load_params(like)  # host arrays; the trainer places them on the mesh as the initial params
  for (ka, a), (kb, b) in zip(io.flatten(got).items(), io.flatten(jax.device_get(params)).items()):
    assert ka == kb
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=0)


def test_generation_init_from_released_layout_into_scanned_blocks(tmp_path):
  """`model.scan_blocks=True` + `config.init_from`: the released per-block checkpoint arrives stacked on the
  depth axis (`blocks/block/...`), block i's weights at index i, and the scanned network computes what the
  per-block one does with the same weights."""
  import importlib
  from diffusion_jax.experiments.base import get_experiment
  from diffusion_jax.models.diffit import DiffiTLatent
  from diffusion_jax.models.dit import unscan_block_params
  cfg = importlib.import_module("configs.diffit_imagenet256").get_config("tiny")
  m = cfg.model
  model = DiffiTLatent(input_size=m.input_size, patch_size=m.patch_size, in_channels=m.in_channels,
                       hidden_size=m.hidden_size, depth=m.depth, num_heads=m.num_heads, num_classes=m.num_classes)
  x = jax.random.normal(jax.random.key(1), (2, m.input_size, m.input_size, m.in_channels))
  t, y = jnp.array([0.2, 0.7]), jnp.array([1, 2])
  params = jax.jit(model.init)(jax.random.key(7), x, t, y)["params"]
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda a: a + 0.05 * rng.standard_normal(a.shape).astype(a.dtype), params)
  path = str(tmp_path / "released.safetensors")
  P.save_diffit(path, params, model)
  cfg.init_from = path
  cfg.model.scan_blocks = True
  exp = get_experiment(cfg)
  like = jax.eval_shape(exp.init, jax.random.key(0), {}, {})
  assert "blocks" in like and "blocks_0" not in like
  got = exp.load_params(like)
  assert set(io.flatten(got)) == set(io.flatten(like))
  back = unscan_block_params(got)
  for k, v in io.flatten(jax.device_get(params)).items():
    np.testing.assert_array_equal(np.asarray(io.flatten(back)[k]), np.asarray(v), err_msg=k)
  want = model.apply({"params": params}, x, t, y)
  out = exp.model.apply({"params": jax.tree.map(jnp.asarray, got)}, x, t, y)
  np.testing.assert_allclose(np.asarray(out), np.asarray(want), rtol=1e-5, atol=1e-5)
