"""sd_layers.GroupNorm (the fast formulation) against flax's two-pass nn.GroupNorm: values, grads, dtype."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.models.sd_layers import GroupNorm


@pytest.mark.parametrize("shape,groups", [((2, 5, 7, 12), 3), ((3, 9, 8), 4), ((2, 4, 4, 32), 32)])
def test_matches_flax_group_norm(shape, groups):
  r = np.random.default_rng(0)
  x = jnp.asarray(r.standard_normal(shape, np.float32) * 3 + 5)  # a large mean: two-pass variance matters
  ref = nn.GroupNorm(num_groups=groups, epsilon=1e-6, use_fast_variance=False)
  ours = GroupNorm(num_groups=groups, epsilon=1e-6)
  params = ref.init(jax.random.PRNGKey(0), x)
  params = jax.tree_util.tree_map(lambda p: p + jnp.asarray(r.standard_normal(p.shape, np.float32)), params)
  assert jax.tree_util.tree_structure(ours.init(jax.random.PRNGKey(0), x)) == jax.tree_util.tree_structure(params)
  np.testing.assert_allclose(ours.apply(params, x), ref.apply(params, x), atol=2e-5, rtol=0)
  loss = lambda m: lambda p, x: jnp.sum(jnp.sin(m.apply(p, x)))
  g_ours, g_ref = (jax.grad(loss(m), argnums=(0, 1))(params, x) for m in (ours, ref))
  for a, b in zip(jax.tree_util.tree_leaves(g_ours), jax.tree_util.tree_leaves(g_ref)):
    np.testing.assert_allclose(a, b, atol=5e-5, rtol=0)


def test_dtype_and_errors():
  x = jnp.ones((1, 4, 4, 8), jnp.bfloat16)
  m = GroupNorm(num_groups=4, dtype=jnp.bfloat16)
  p = m.init(jax.random.PRNGKey(0), x)
  assert p["params"]["scale"].dtype == jnp.float32 and m.apply(p, x).dtype == jnp.bfloat16
  with pytest.raises(ValueError, match="not divisible by num_groups=3"):
    GroupNorm(num_groups=3).init(jax.random.PRNGKey(0), x)
