"""The experiment interface as the trainer uses it: frozen weights as arguments (not program constants) and
sharded by the params' rule, optimiser groups (frozen masks, per-group learning rates), named EMAs, sample
sheets."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import toy_experiment as toy
from diffusion_jax.images import sample_sheet
from diffusion_jax.train import optim, trainer


def _text_mb(lowered) -> float:
  return len(lowered.as_text()) / 2 ** 20


def test_frozen_weights_do_not_grow_the_compiled_program(tmp_path):
  """A 16 MB frozen array is an argument of the init and step programs: their text does not grow. Captured as
  a constant (what loading it inside a jitted init does), the same array adds > 16 MB of program text."""
  small = trainer._Run(toy.toy_config(**{"mesh.num_devices": 1}), str(tmp_path / "a"))
  big = trainer._Run(toy.toy_config(**{"mesh.num_devices": 1, "toy.frozen_mb": 16.0}), str(tmp_path / "b"))
  try:
    assert trainer._tree_mb(big.frozen) > 16.0
    for lower in ("lower_step", "lower_init"):
      s, b = _text_mb(getattr(small, lower)()), _text_mb(getattr(big, lower)())
      assert b < s + 0.05, (lower, s, b)
    # The failure mode this guards against: the same array closed over by the jitted function.
    arr = jnp.asarray(big.frozen["big"])
    captured = jax.jit(lambda x: x + jnp.mean(arr)).lower(jnp.zeros(()))
    assert _text_mb(captured) > 16.0
  finally:
    small.close()
    big.close()


def test_fsdp_rule_shards_frozen_weights(tmp_path):
  cfg = toy.toy_config(**{"mesh.data": 1, "mesh.fsdp": 4, "param_sharding": "fsdp", "toy.frozen_mb": 1.0})
  run = trainer._Run(cfg, str(tmp_path))
  try:
    big = run.frozen["big"]
    assert big.sharding.spec == jax.sharding.PartitionSpec("fsdp")
    assert {s.data.shape for s in big.addressable_shards} == {(big.shape[0] // 4,)}
    small = run.frozen["scale"]  # below mesh.fsdp_min_size: replicated
    assert small.sharding.spec == jax.sharding.PartitionSpec()
    out = trainer.train(cfg, str(tmp_path / "train"))
    assert out["step"] == cfg.train.num_steps and np.isfinite(out["loss"])
  finally:
    run.close()


def _groups_config(**groups):
  oc = ml_collections.ConfigDict({"name": "sgd", "lr": 0.1, "momentum": 0.0, "schedule": "constant",
                                  "warmup_steps": 0, "grad_clip": 0.0, "train_unmatched": False,
                                  "groups": ml_collections.ConfigDict(groups)})
  return oc


def test_optimizer_groups_per_group_lr_and_frozen_masks():
  params = {"controlnet": {"w": jnp.ones((3, 3))}, "unet": {"down": {"w": jnp.ones((3,))},
                                                            "up_blocks": {"w": jnp.ones((3,))}}}
  grads = jax.tree.map(lambda p: jnp.full_like(p, 2.0), params)
  oc = _groups_config(controlnet={"match": "^controlnet/", "lr": 1e-4}, decoder={"match": "^unet/up_blocks", "lr": 1e-5})
  counts = optim.check_groups(oc, params)
  assert counts == {"controlnet": (1, 9), "decoder": (1, 3), "frozen": (1, 3)}
  tx, _ = optim.make_optimizer(oc, 10)
  state = tx.init(params)
  updates, _ = tx.update(grads, state, params)
  np.testing.assert_allclose(updates["controlnet"]["w"], -1e-4 * 2.0, rtol=1e-6)
  np.testing.assert_allclose(updates["unet"]["up_blocks"]["w"], -1e-5 * 2.0, rtol=1e-6)
  np.testing.assert_array_equal(updates["unet"]["down"]["w"], 0.0)
  # Frozen leaves carry no optimiser state: adam moments exist only for the two trained leaves.
  oc.name = "adam"
  state = optim.make_optimizer(oc, 10)[0].init(params)
  moment_leaves = [x for x in jax.tree.leaves(state) if getattr(x, "ndim", 0) >= 1]
  assert sorted(x.size for x in moment_leaves) == [3, 3, 9, 9]
  # Unmatched params train at optim.lr when train_unmatched is True.
  oc.name, oc.train_unmatched = "sgd", True
  updates, _ = optim.make_optimizer(oc, 10)[0].update(grads, optim.make_optimizer(oc, 10)[0].init(params), params)
  np.testing.assert_allclose(updates["unet"]["down"]["w"], -0.1 * 2.0, rtol=1e-6)


def test_frozen_group_is_excluded_from_the_clipped_norm():
  params = {"a": jnp.ones((2,)), "b": jnp.ones((2,))}
  grads = {"a": jnp.array([3.0, 4.0]), "b": jnp.array([300.0, 400.0])}
  oc = _groups_config(a={"match": "^a", "lr": 1.0})
  oc.grad_clip = 5.0  # |g_a| = 5: not clipped; with b counted (|g| ~ 500) it would be scaled by 0.01
  tx, _ = optim.make_optimizer(oc, 10)
  updates, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(updates["a"], [-3.0, -4.0], rtol=1e-6)


def test_bad_groups_fail_with_the_parameter_paths():
  params = {"unet": {"w": jnp.ones((2,))}}
  with pytest.raises(ValueError, match=r"match no parameter.*unet/w"):
    optim.check_groups(_groups_config(cn={"match": "^controlnet/", "lr": 1e-4}), params)
  with pytest.raises(ValueError, match="freeze every parameter"):
    optim.check_groups(_groups_config(u={"match": "^unet", "lr": 0.0}), params)
  with pytest.raises(ValueError, match="not a valid regex"):
    optim.check_groups(_groups_config(u={"match": "(", "lr": 1.0}), params)


def test_groups_through_the_trainer_train_only_their_params(tmp_path):
  cfg = toy.toy_config(**{"mesh.num_devices": 1, "train.num_steps": 3})
  cfg.optim.groups = ml_collections.ConfigDict({"head": {"match": r"^params/Dense_1/", "lr": 1e-2}})
  cfg.optim.train_unmatched = False
  run = trainer._Run(cfg, str(tmp_path / "probe"))
  init = run.init_state()
  run.close()
  trainer.train(cfg, str(tmp_path / "run"))
  run, state, _ = trainer._restore_latest(cfg, str(tmp_path / "run"))
  run.close()
  flat0 = dict(jax.tree_util.tree_leaves_with_path(init.params))
  for path, leaf in jax.tree_util.tree_leaves_with_path(state.params):
    name = optim.path_name(path)
    changed = not np.array_equal(np.asarray(leaf), np.asarray(flat0[path]))
    assert changed == name.startswith("params/Dense_1/"), name


def test_named_emas_and_sample_with(tmp_path):
  cfg = toy.toy_config(**{"mesh.num_devices": 1, "train.num_steps": 4})
  cfg.train.ema = ml_collections.ConfigDict({"fast": 0.5, "target": 0.95})
  cfg.train.sample_with = "target"
  trainer.train(cfg, str(tmp_path / "run"))
  run, state, _ = trainer._restore_latest(cfg, str(tmp_path / "run"))
  assert set(state.ema) == {"fast", "target"}
  p, fast, target = (np.asarray(jax.tree.leaves(t)[0]) for t in (state.params, state.ema["fast"], state.ema["target"]))
  # After 4 steps the fast EMA is closer to the params than the slow one.
  assert np.abs(fast - p).mean() < np.abs(target - p).mean()
  assert run.eval_params(state) is state.ema["target"]
  run.close()
  cfg.train.sample_with = "slow"
  with pytest.raises(ValueError, match=r"sample_with = 'slow' names no EMA.*'fast', 'target'"):
    trainer.validate_config(cfg)
  cfg.train.ema = ml_collections.ConfigDict({"fast": 1.5})
  cfg.train.sample_with = "fast"
  with pytest.raises(ValueError, match=r"train\.ema\.fast = 1\.5"):
    trainer.validate_config(cfg)


def test_sample_sheet_layout():
  batch = {"image": np.zeros((3, 8, 8, 3), np.uint8), "caption": np.array(["a red circle", "b", "c"]),
           "x": np.zeros((3, 12), np.float32)}
  out = {"image": np.ones((3, 8, 8, 3), np.float32), "seg": np.arange(3 * 16 * 16).reshape(3, 16, 16),
         "emb": np.zeros((3, 7), np.float32)}
  sheet = sample_sheet(batch, out)
  # 3 image-like columns (input image, output image, map), >= 64 px each; 3 rows with a caption line each.
  assert sheet.dtype == np.uint8 and sheet.shape[1] >= 3 * 64 and sheet.shape[0] >= 3 * (64 + 11)
  assert sample_sheet(batch, {"emb": out["emb"]}) is None
  # The input (black) sits left of the output (white) in the first row.
  row = sheet[20:60]
  assert row[:, 5:60].mean() < 10 and row[:, 72:120].mean() > 245


def test_sample_and_eval_modes_read_only_the_test_split(tmp_path):
  cfg = toy.toy_config(**{"mesh.num_devices": 1, "train.num_steps": 2, "train.sample_every": 2})
  run = trainer._Run(cfg, str(tmp_path / "probe"))
  run.sample_batch(4)
  assert run.experiment.splits_requested == ["train", "test"]  # training, plus the sample sheets' conditions
  run.close()
  trainer.train(cfg, str(tmp_path / "run"))
  run, _, _ = trainer._restore_latest(cfg, str(tmp_path / "run"))
  run.sample_batch(4)
  assert run.experiment.splits_requested == ["test"]
  run.close()
