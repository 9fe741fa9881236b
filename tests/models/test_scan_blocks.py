"""scan_blocks=True of DiT / latent DiffiT (one nn.scan over the blocks): the same outputs and gradients as the
unscanned network for the same weights, via models.dit.scan_block_params / unscan_block_params."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.models import build_model
from diffusion_jax.models.dit import scan_block_params, unscan_block_params

DEPTH = 3


def _setup(name, remat):
  kw = dict(name=name, input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=DEPTH, num_heads=2,
            num_classes=5, remat=remat)
  plain, scanned = build_model(kw), build_model({**kw, "scan_blocks": True})
  x = jax.random.normal(jax.random.key(1), (2, 8, 8, 4))
  t, y = jnp.array([3.0, 500.0]), jnp.array([1, 5])
  shapes = jax.eval_shape(lambda: plain.init(jax.random.key(0), x, t, y)["params"])
  # random values everywhere (adaLN-Zero and the heads are zero-initialised, which would hide a wrong order)
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda a: jnp.asarray(0.2 * rng.standard_normal(a.shape), jnp.float32), shapes)
  return plain, scanned, params, (x, t, y)


@pytest.mark.parametrize("name,remat,grad", [("dit", "none", False), ("dit", "full", True),
                                             ("diffit_latent", "none", True)])
def test_scanned_matches_unscanned(name, remat, grad):
  plain, scanned, p0, args = _setup(name, remat)
  p1 = scan_block_params(p0, DEPTH)
  # the scanned network's own init has exactly the converted tree (names, shapes)
  shapes = jax.eval_shape(lambda: scanned.init(jax.random.key(0), *args)["params"])
  assert jax.tree.structure(shapes) == jax.tree.structure(p1)
  assert all(a.shape == b.shape for a, b in zip(jax.tree.leaves(shapes), jax.tree.leaves(p1)))
  assert all(a.shape[0] == DEPTH for a in jax.tree.leaves(p1["blocks"]))
  fwd = lambda m: jax.jit(lambda p: m.apply({"params": p}, *args))
  o0, o1 = fwd(plain)(p0), fwd(scanned)(p1)
  np.testing.assert_allclose(o1, o0, atol=2e-6 * float(jnp.abs(o0).max()), rtol=0)
  if grad:
    loss = lambda m: lambda p: jnp.sum(m.apply({"params": p}, *args) ** 2)
    g0 = jax.jit(jax.grad(loss(plain)))(p0)
    g1 = unscan_block_params(jax.jit(jax.grad(loss(scanned)))(p1))
    assert jax.tree.structure(g0) == jax.tree.structure(g1)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
      np.testing.assert_allclose(b, a, atol=1e-5 * max(1.0, float(jnp.abs(a).max())), rtol=1e-5)


def test_conversion_round_trip_and_errors():
  tree = {f"blocks_{i}": {"w": np.full((2, 3), i, np.float32)} for i in range(DEPTH)}
  tree["final_linear"] = {"kernel": np.ones((3,), np.float32)}
  s = scan_block_params(tree, DEPTH)
  assert set(s) == {"blocks", "final_linear"} and s["blocks"]["block"]["w"].shape == (DEPTH, 2, 3)
  back = unscan_block_params(s)
  assert set(back) == set(tree)
  for i in range(DEPTH):
    np.testing.assert_array_equal(back[f"blocks_{i}"]["w"], tree[f"blocks_{i}"]["w"])
  with pytest.raises(ValueError, match="more than depth"):
    scan_block_params(tree, DEPTH - 1)
  with pytest.raises(KeyError):
    scan_block_params(tree, DEPTH + 1)
