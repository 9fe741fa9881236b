"""CoDi: the loss against a NumPy computation on a toy denoiser (epsilon and v bases, x / eps space, PF-ODE vs true
eps, min-SNR), the distillation timesteps, CFG-aware [cond; uncond] ordering, the gate mu = 0 reproducing the base
exactly (module and experiment level, on eps and v tiny pipelines), PE-CoDi's zero residuals, the 1-step rollout
against a hand computation, and the SD-1.5-scale parameter counts."""

import os
import sys

import numpy as np
import pytest

import jax
import jax.numpy as jnp

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
for p in (ROOT, os.path.dirname(os.path.abspath(__file__))):
  if p not in sys.path:
    sys.path.insert(0, p)

import sd_testlib  # noqa: E402
from diffusion_jax.core.schedules import make_schedule  # noqa: E402
from diffusion_jax.experiments import codi as C  # noqa: E402
from diffusion_jax.models import codi_adapter as A  # noqa: E402
from diffusion_jax.models.unet import UNet2DConditionModel, count_params, init_unet, tiny_unet_config  # noqa: E402


# ------------------------------------------------------------------------------------------- loss vs NumPy


def _np_terms(pred, ode, tgt, x0, eps, t, s, ac, pt, space, ode_noise, gamma, sd=0.5, k=10.0):
  """Direct NumPy float64 CoDi terms for toy denoisers pred/ode/tgt(z, t) -> output."""
  def conv(out, z, a, sg):
    if pt == "epsilon":
      return (z - sg * out) / a, out
    return a * z - sg * out, a * out + sg * z
  def scal(tt):
    kt = k * tt
    return sd ** 2 / (kt ** 2 + sd ** 2), kt / np.sqrt(kt ** 2 + sd ** 2)
  b = lambda v: v[:, None, None, None]
  a_t, s_t, a_s, s_s = (np.sqrt(ac[t]), np.sqrt(1 - ac[t]), np.sqrt(ac[s]), np.sqrt(1 - ac[s]))
  z_t = b(a_t) * x0 + b(s_t) * eps
  x_on, e_on = conv(pred(z_t, t), z_t, b(a_t), b(s_t))
  cs, co = scal(t.astype(np.float64))
  f_on = b(cs) * z_t + b(co) * x_on
  x_o, e_o = conv(ode(z_t, t), z_t, b(a_t), b(s_t))
  z_s = b(a_s) * x_o + b(s_s) * (e_o if ode_noise == "model" else eps)
  x_tg, e_tg = conv(tgt(z_s, s), z_s, b(a_s), b(s_s))
  cs, co = scal(s.astype(np.float64))
  f_tg = b(cs) * z_s + b(co) * x_tg
  cons = ((f_on - f_tg) ** 2 if space == "x" else (e_on - e_tg) ** 2).mean(axis=(1, 2, 3))
  if gamma:
    snr = ac[t] / (1 - ac[t])
    cons = cons * (np.minimum(snr, gamma) if space == "x" else np.minimum(snr, gamma) / snr)
  return cons, ((f_on - x0) ** 2).mean(axis=(1, 2, 3))


@pytest.mark.parametrize("pt,space,ode_noise,gamma,separate_ode", [
    ("epsilon", "x", "model", 0.0, False), ("v_prediction", "x", "model", 0.0, False),
    ("epsilon", "epsilon", "true", 5.0, True), ("v_prediction", "epsilon", "model", 5.0, True),
    ("v_prediction", "x", "true", 0.0, True)])
def test_consistency_terms_match_numpy(pt, space, ode_noise, gamma, separate_ode):
  sched = make_schedule("scaled_linear", 1000, 0.00085, 0.012)
  ac = np.asarray(sched.alphas_cumprod, np.float64)
  r = np.random.default_rng(0)
  x0 = r.standard_normal((3, 4, 4, 2)).astype(np.float32)
  eps = r.standard_normal(x0.shape).astype(np.float32)
  t = np.array([980, 400, 20], np.int32)
  s = t - 20
  # toy denoisers: output = a z + b (t / 1000) + c, different per network (online / ODE / target)
  nets = {n: (float(a), float(b_), float(c_)) for n, a, b_, c_ in
          (("on", 0.7, 0.3, 0.1), ("ode", 0.5, -0.2, 0.05), ("tg", 0.6, 0.1, -0.1))}
  def jfn(n):
    a, b_, c_ = nets[n]
    return lambda z, tt: a * z + b_ * (tt / 1000.0)[:, None, None, None] + c_
  def nfn(n):
    a, b_, c_ = nets[n]
    return lambda z, tt: a * z + b_ * (tt.astype(np.float64) / 1000.0)[:, None, None, None] + c_
  cons, guide = C.consistency_targets(jfn("on"), jfn("ode") if separate_ode else None, jfn("tg"), jnp.asarray(x0),
                                      jnp.asarray(eps), jnp.asarray(t), jnp.asarray(s), sched, pt,
                                      ode_noise=ode_noise, consistency_space=space, snr_gamma=gamma)
  want_c, want_g = _np_terms(nfn("on"), nfn("ode") if separate_ode else nfn("on"), nfn("tg"),
                             x0.astype(np.float64), eps.astype(np.float64), t, s, ac, pt, space, ode_noise, gamma)
  np.testing.assert_allclose(np.asarray(cons), want_c, rtol=2e-4, atol=1e-6)
  np.testing.assert_allclose(np.asarray(guide), want_g, rtol=2e-4, atol=1e-6)
  assert want_c.min() > 1e-4 and want_g.min() > 1e-4  # nothing trivially zero


def test_consistency_gradient_flows_only_through_online():
  sched = make_schedule("scaled_linear", 1000, 0.00085, 0.012)
  x0 = jnp.ones((2, 2, 2, 1))
  eps = jnp.full((2, 2, 2, 1), 0.5)
  t, s = jnp.array([500, 500]), jnp.array([480, 480])
  def total(w_on, w_tg):
    c, g = C.consistency_targets(lambda z, tt: w_on * z, None, lambda z, tt: w_tg * z, x0, eps, t, s, sched,
                                 "epsilon")
    return jnp.sum(c)
  g_on, g_tg = jax.grad(total, argnums=(0, 1))(0.3, 0.6)
  assert abs(float(g_on)) > 1e-6 and float(g_tg) == 0.0


def test_timesteps():
  t, s = C.codi_timesteps(jax.random.PRNGKey(0), 64, grid_size=50, mode="grid", shared=False)
  t, s = np.asarray(t), np.asarray(s)
  assert np.all(t % 20 == 0) and np.all(s == t - 20) and t.min() >= 20 and t.max() <= 980
  assert len(np.unique(t)) > 10
  t, s = C.codi_timesteps(jax.random.PRNGKey(1), 16, mode="grid", shared=True)
  assert len(np.unique(np.asarray(t))) == 1
  t, s = C.codi_timesteps(jax.random.PRNGKey(2), 256, mode="uniform", shared=False)
  t, s = np.asarray(t), np.asarray(s)
  assert np.all(s == np.maximum(t - 20, 0)) and t.max() > 900 and np.any(t % 20 != 0)


def test_cfg_ordering_is_cond_first():
  """The CFG-aware loss combines one call on [cond; uncond] as out_u + w (out_c - out_u) (fast-codi's split labels
  the first half "uncond", giving out_c + w (out_u - out_c): must not be reproduced)."""
  fn = lambda x, t, c: x * 0 + c["ctx"][:, :1, :1, None] * 1.0
  x = jnp.zeros((2, 2, 2, 1))
  c = {"ctx": jnp.full((2, 3, 4), 2.0), "cond": jnp.zeros((2, 2, 2, 1))}
  u = {"ctx": jnp.full((2, 3, 4), -1.0), "cond": jnp.zeros((2, 2, 2, 1))}
  w = jnp.array([3.0, 5.0])
  out = np.asarray(C.cfg_prediction(fn, x, jnp.array([10.0, 10.0]), c, u, w))[:, 0, 0, 0]
  np.testing.assert_allclose(out, -1.0 + np.array([3.0, 5.0]) * (2.0 - -1.0))  # not 2 + w (-1 - 2)


# ------------------------------------------------------------------------------------------- adapters


# One-level UNets keep the compiles of these tests short (the mechanics do not depend on the depth).
ONE_LEVEL = dict(block_out_channels=(16,), down_block_types=("CrossAttnDownBlock2D",),
                 up_block_types=("CrossAttnUpBlock2D",))


@pytest.fixture(scope="module")
def unet():
  cfg = tiny_unet_config(**ONE_LEVEL)
  return cfg, init_unet(jax.random.PRNGKey(0), cfg)


def _inputs(cond_dim=4, f=2):
  r = jax.random.split(jax.random.PRNGKey(1), 3)
  x = jax.random.normal(r[0], (2, 8, 8, 4))
  ctx = jax.random.normal(r[1], (2, 5, 32))
  cond = jax.random.uniform(r[2], (2, 8 * f, 8 * f, cond_dim))
  return x, jnp.array([10.0, 700.0]), ctx, cond


def test_gate_mu_zero_reproduces_base_exactly(unet):
  cfg, up = unet
  chans = A.cond_embedding_channels(2)
  p = A.init_codi_params(up, cfg, 4, chans, jax.random.PRNGKey(3))
  assert float(p["mu"]) == 0.0
  x, t, ctx, cond = _inputs()
  base = np.asarray(jax.jit(lambda q: UNet2DConditionModel(cfg).apply({"params": q}, x, t, ctx))(up))
  m = A.CoDiUNet(cfg, chans)
  f = jax.jit(lambda q: m.apply({"params": q}, x, t, ctx, cond))
  np.testing.assert_array_equal(np.asarray(f(p)), base)
  assert np.abs(base).max() > 1e-3
  p2 = dict(p, mu=jnp.float32(0.25))
  assert np.abs(np.asarray(f(p2)) - base).max() > 1e-3
  g = jax.jit(jax.grad(lambda q: jnp.sum(m.apply({"params": q}, x, t, ctx, cond) ** 2)))(p)
  assert abs(float(g["mu"])) > 0  # the gate learns from step 0
  # the encoder copy starts as the base encoder
  for k in ("time_embedding", "down_blocks_0", "mid_block"):
    for a_, b_ in zip(jax.tree.leaves(p["codi_encoder"][k]), jax.tree.leaves(up[k])):
      np.testing.assert_array_equal(np.asarray(a_), np.asarray(b_))


def test_pe_codi_starts_at_the_base(unet):
  from diffusion_jax.models.controlnet import ControlNetModel, init_controlnet_from_unet
  cfg, up = unet
  ccfg = A.pe_controlnet_config(cfg, 4, 2)
  cp = init_controlnet_from_unet(up, ccfg, jax.random.PRNGKey(4))
  x, t, ctx, cond = _inputs()
  base = UNet2DConditionModel(cfg).apply({"params": up}, x, t, ctx)
  out = C._model_apply("pe_codi", None, ControlNetModel(ccfg), UNet2DConditionModel(cfg), 1.0,
                       {"controlnet": cp}, up, x, t, {"ctx": ctx, "cond": cond})
  np.testing.assert_array_equal(np.asarray(out), np.asarray(base))


def test_condition_factors():
  assert A.cond_embedding_channels(1) == (16,) and A.cond_embedding_channels(8) == (16, 32, 96, 256)
  with pytest.raises(ValueError, match="1, 2, 4 or 8"):
    A.cond_embedding_channels(3)


def test_sd15_scale_parameter_counts():
  """Full CoDi (base UNet + encoder copy + gate) and the PE-CoDi ControlNet at SD-1.5 scale, on eval_shape trees,
  next to the paper's 1.22B total / 364M trainable (codi.md A6 ablation)."""
  from diffusion_jax.models.controlnet import abstract_controlnet_params
  from diffusion_jax.models.unet import sd15_unet_config
  ucfg = sd15_unet_config()
  full = A.abstract_codi_params(ucfg, 3, A.cond_embedding_channels(8))
  n_full, n_enc = count_params(full), count_params(full["codi_encoder"])
  n_pe = count_params(abstract_controlnet_params(A.pe_controlnet_config(ucfg, 3, 8)))
  assert n_full - n_enc - 1 == 859_520_964          # the SD-1.5 UNet
  assert abs(n_full / 1.22e9 - 1) < 0.015, n_full    # paper: 1.22B
  assert abs(n_pe / 364e6 - 1) < 0.015, n_pe          # paper: 364M trainable
  assert (n_full, n_pe) == (1_209_308_565, 361_279_120)


# ------------------------------------------------------------------------------------------- experiment level


@pytest.fixture(scope="module", params=["epsilon", "v_prediction"])
def tiny_pipe(request, tmp_path_factory):
  d = str(tmp_path_factory.mktemp(f"codi_pipe_{request.param}"))
  old = sd_testlib.UNET_KW
  sd_testlib.UNET_KW = dict(old, **ONE_LEVEL)
  try:
    return request.param, sd_testlib.make_tiny_pipeline(d, prediction_type=request.param,
                                                        sd2=request.param == "v_prediction")
  finally:
    sd_testlib.UNET_KW = old


def _experiment(pipe, tmp, **codi):
  from configs import codi_sd15
  from diffusion_jax.experiments.base import get_experiment
  cfg = codi_sd15.get_config("tiny")
  cfg.stages.pipeline.path = pipe
  cfg.data.cache_dir = str(tmp)
  cfg.diffusion.prediction_type = ""  # the pipeline's
  for k, v in codi.items():
    cfg.codi[k] = v
  return get_experiment(cfg, stages={"pipeline": pipe})


def test_experiment_step0_rollout_is_the_base_and_matches_hand(tiny_pipe, tmp_path):
  """At init (mu = 0) CoDi's 1-step rollout is the base UNet's, read in the pipeline's own parameterisation
  (epsilon or v), and equals the hand computation x = a_0 f + s_0 eps_hat with f = c_skip z + c_out x0_hat at
  t = 980."""
  from diffusion_jax.core.parameterization import consistency_scalings, predict_x0_eps
  from diffusion_jax.models.vae import decode_latents
  pt, pipe = tiny_pipe
  exp = _experiment(pipe, tmp_path)
  assert exp.prediction_type == pt and exp.latent and exp.cond_factor == 2
  frozen = jax.tree.map(jnp.asarray, exp.load_frozen())
  batch = next(iter(exp.make_dataset("test", seed=0)))
  params = jax.jit(exp.init)(jax.random.PRNGKey(0), batch, frozen)
  ids, cond = batch["ids"][:2], batch["cond"][:2]
  x_T = jax.random.normal(jax.random.PRNGKey(5), (2,) + exp.latent_shape)
  got = np.asarray(exp.sample_images(params, frozen, ids, cond, None, x_T=x_T, sampler="consistency", steps=1,
                                     guidance=1.0))
  ctx = exp.host.encode(np.asarray(ids))
  out = UNet2DConditionModel(exp.unet_config).apply({"params": frozen["unet"]}, x_T, jnp.full((2,), 980.0), ctx)
  ac = np.asarray(exp.schedule.alphas_cumprod, np.float64)
  x0, e = predict_x0_eps(out, x_T, np.sqrt(ac[980]), np.sqrt(1 - ac[980]), pt)
  cs, co = consistency_scalings(980.0)
  z = np.sqrt(ac[0]) * (cs * x_T + co * x0) + np.sqrt(1 - ac[0]) * e
  img = np.clip(np.asarray(decode_latents(frozen["vae"], exp.host.vae_config, z)) / 2 + 0.5, 0, 1)
  np.testing.assert_allclose(got, img, atol=2e-5)
  assert got.std() > 1e-3
  # the same with the wrong parameterisation differs (the test can tell eps from v)
  other = "v_prediction" if pt == "epsilon" else "epsilon"
  x0b, eb = predict_x0_eps(out, x_T, np.sqrt(ac[980]), np.sqrt(1 - ac[980]), other)
  zb = np.sqrt(ac[0]) * (cs * x_T + co * x0b) + np.sqrt(1 - ac[0]) * eb
  assert np.abs(np.asarray(zb) - np.asarray(z)).max() > 1e-2


def test_experiment_loss_options_run(tiny_pipe, tmp_path):
  """The experiment's loss (jitted, with gradient) for full CoDi with the release-style options together
  (frozen-base ODE step, per-example t, eps-space consistency, min-SNR, CFG-aware), and for PE-CoDi with the
  defaults: finite, nonzero gradient, loss = consistency + guidance, a CFG scale in [cfg_min, cfg_max).
  (Full CoDi with the defaults trains in test_codi_end_to_end.py.)
  (Each option's math is checked against NumPy in test_consistency_terms_match_numpy.)"""
  pt, pipe = tiny_pipe
  if pt == "v_prediction":
    pytest.skip("the options are parameterisation-independent (the NumPy test covers both); run once")
  base = _experiment(pipe, tmp_path)
  frozen = jax.tree.map(jnp.asarray, base.load_frozen())
  batch = next(iter(base.make_dataset("train", seed=0)))
  rng = jax.random.PRNGKey(7)
  res = {}
  for name, kw in {"release": dict(ode_model="base", shared_t=False, consistency_space="epsilon",
                                  snr_gamma=5.0, cfg_aware=True),
                   "pe": dict(adapter="pe_codi")}.items():
    exp = _experiment(pipe, tmp_path, **kw)
    p = jax.jit(exp.init)(jax.random.PRNGKey(0), batch, frozen)
    p = jax.tree.map(lambda a: a + 0.01, p)  # mu != 0 / nonzero zero-convs: the condition branch matters
    fn = jax.jit(jax.value_and_grad(lambda q: exp.loss(q, frozen, {"target": q, "ema": q}, batch, rng, 0),
                                    has_aux=True))
    (loss, m), g = fn(p)
    gn = float(jnp.sqrt(sum(jnp.sum(x ** 2) for x in jax.tree.leaves(g))))
    assert np.isfinite(float(loss)) and gn > 0, name
    m = {k: float(v) for k, v in m.items()}
    np.testing.assert_allclose(float(loss), m["consistency"] + m["guidance"], rtol=1e-5)
    assert m["consistency"] > 0, name
    res[name] = m
  assert 2 <= res["release"]["cfg_scale"] < 14


# ------------------------------------------------------------------------------------------- configs


def test_configs():
  """Paper-scale configs carry the released code's hyper-parameters; the shapes variants parse; bad words fail."""
  from configs import codi_sd15, codi_sd21, codi_shapes
  for mod, pt, size in ((codi_sd15, "epsilon", 512), (codi_sd21, "v_prediction", 768)):
    c = mod.get_config("inpaint,pe")
    assert (c.optim.lr, c.optim.weight_decay, c.optim.grad_clip, c.optim.schedule) == (1e-5, 1e-2, 1.0, "constant")
    assert dict(c.train.ema) == {"target": 0.999} and c.train.sample_with == "target"
    assert (c.data.image_size, c.diffusion.prediction_type, c.data.task) == (size, pt, "inpaint")
    assert c.codi.adapter == "pe_codi" and c.optim.groups.controlnet.match == "^controlnet/"
    assert not c.optim.train_unmatched and c.stages.pipeline.kind == "sd_pipeline"
    assert (c.codi.grid_size, c.codi.sigma_data, c.codi.timestep_scaling) == (50, 0.5, 10.0)
    assert (c.sample.sampler, c.sample.steps) == ("consistency", 4)
  c = codi_shapes.get_config("depth")
  assert c.data.task == "depth" and c.codi.adapter == "codi" and c.codi.objective == "codi"
  assert c.optim.groups.gate.match == "^codi/mu$" and "target" in c.train.ema
  c = codi_shapes.get_config("edge,diffusion,pe")
  assert c.codi.objective == "diffusion" and c.sample.sampler == "ddim" and "target" not in c.train.ema
  c = codi_shapes.get_config("sr,no_consistency,true_eps,base_ode,per_example_t,eps_space,cfg_aware")
  assert (c.codi.consistency_weight, c.codi.ode_noise, c.codi.ode_model, c.codi.shared_t,
          c.codi.consistency_space, c.codi.cfg_aware) == (0.0, "true", "base", False, "epsilon", True)
  with pytest.raises(ValueError, match="Valid"):
    codi_shapes.get_config("sr,typo")
  with pytest.raises(ValueError, match="several tasks"):
    codi_sd15.get_config("sr,edge")


def test_bad_settings_name_the_fix():
  from configs import codi_shapes
  from diffusion_jax.experiments.base import get_experiment
  st = {"pipeline": "/nonexistent"}  # nothing is read before the first use
  for key, value, match in (("codi.adapter", "lora", "Valid"), ("codi.ode_model", "teacher", "Valid"),
                            ("sample.sampler", "euler", "Valid"), ("data.task", "colour", "Valid")):
    c = codi_shapes.get_config("tiny")
    node, last = (c.codi, key.split(".")[1]) if key.startswith("codi") else (c[key.split(".")[0]], key.split(".")[1])
    node[last] = value
    with pytest.raises(ValueError, match=match):
      get_experiment(c, stages=st)
  c = codi_shapes.get_config("tiny")
  c.train.ema = {"ema": 0.9}
  with pytest.raises(ValueError, match="train.ema.target"):
    get_experiment(c, stages=st)
  c = codi_shapes.get_config("tiny")
  c.codi.typo = 1
  with pytest.raises(ValueError, match="Unknown config.codi keys"):
    get_experiment(c, stages=st)
  with pytest.raises(ValueError, match="stages.pipeline"):
    get_experiment(codi_shapes.get_config("tiny"), stages={})
  c = codi_shapes.get_config("tiny")
  c.eval.shapes_fd_path = "/nonexistent/net16.safetensors"
  with pytest.raises(FileNotFoundError, match=r"config.eval.shapes_fd_path=.*scripts/shapes_fd.py train.*16"):
    get_experiment(c, stages=st)
