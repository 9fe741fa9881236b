"""Shared defaults for every config file: `base_config()` returns the common keys the trainer reads.

A task config starts from it and overrides what it needs:

    from configs import _base
    def get_config(arg=None):
      config = _base.base_config()
      config.experiment = "generation"
      config.data.name = "shapes"
      ...
      return config

Keys (see docs/training-and-configs.md for what each one does):
  experiment, seed, dtype ("float32"|"bfloat16": compute dtype; params stay float32),
  remat ("none"|"full"|"dots"|"dots_no_batch"), param_sharding ("replicated"|"fsdp"),
  attention ("auto"|"xla"|"dot_product_attention"|"chunked": the attention implementation every network uses,
  see diffusion_jax/models/attention.py; "auto" picks per platform and shape),
  compilation_cache_dir ("" = off: a directory for JAX's persistent compilation cache, so a later process
  loads the compiled programs instead of compiling again), compilation_cache_min_compile_secs,
  data.{name, batch_size (global), num_workers, prefetch, data_dir, ...},
  model.{name, ...}, optim.{name, lr, b1, b2, eps, weight_decay, momentum, schedule, warmup_steps,
  decay_steps, restart_period, min_lr_ratio, grad_clip, grad_accum},
  optim.groups (name -> {match: regex over "/"-joined param paths, lr: peak lr, 0 = frozen}),
  optim.train_unmatched (params matching no group: trained with optim.lr if True, else frozen),
  train.{num_steps, log_every, ckpt_every, keep_ckpts, async_ckpt, sample_every, num_samples,
  sample_with ("params" or an EMA name), eval_every, ema (name -> decay), progress_bar},
  stages (name -> {config: the stage's run config, path: an existing run / pretrained dir, kind, optional};
  see diffusion_jax/stages.py),
  mesh.{data, fsdp, tensor, num_devices, fsdp_min_size}, sample.{...}, eval.{...}.
"""

from __future__ import annotations

import ml_collections


def base_config() -> ml_collections.ConfigDict:
  """Returns a ConfigDict holding every key the generic trainer reads, with defaults."""
  c = ml_collections.ConfigDict()
  c.experiment = ""
  c.seed = 0
  c.dtype = "float32"
  c.remat = "none"
  c.param_sharding = "replicated"
  c.attention = "auto"            # attention implementation (diffusion_jax/models/attention.py)
  c.compilation_cache_dir = ""    # persistent XLA compilation cache ("" = off; diffusion_jax/compile_cache.py)
  c.compilation_cache_min_compile_secs = 1.0  # cache programs that took at least this long to compile

  c.data = ml_collections.ConfigDict()
  c.data.name = ""
  c.data.batch_size = 32
  c.data.num_workers = 0
  c.data.prefetch = 2
  c.data.data_dir = ""

  c.model = ml_collections.ConfigDict()
  c.model.name = ""

  c.optim = ml_collections.ConfigDict()
  c.optim.name = "adamw"          # adamw | adam | sgd
  c.optim.lr = 1e-4
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.eps = 1e-8
  c.optim.weight_decay = 0.0
  c.optim.momentum = 0.9          # sgd only
  c.optim.schedule = "constant"   # constant | cosine | warmup_cosine | cosine_restarts
  c.optim.warmup_steps = 0
  c.optim.decay_steps = 0         # 0 = train.num_steps
  c.optim.restart_period = 0      # cosine_restarts: steps per cycle (0 = decay_steps // 4)
  c.optim.min_lr_ratio = 0.0      # final lr = lr * min_lr_ratio for the cosine schedules
  c.optim.grad_clip = 1.0         # global-norm clipping; 0 = off
  c.optim.grad_accum = 1          # micro-batches per step (the global batch is split)
  c.optim.groups = ml_collections.ConfigDict()  # {} = one group: every param at optim.lr
  c.optim.train_unmatched = True  # with groups: params that match no group train at optim.lr (else frozen)

  c.train = ml_collections.ConfigDict()
  c.train.num_steps = 1000
  c.train.log_every = 50
  c.train.ckpt_every = 500
  c.train.keep_ckpts = 3
  c.train.async_ckpt = True
  c.train.sample_every = 0        # 0 = off
  c.train.num_samples = 16
  c.train.eval_every = 0          # 0 = at the end only
  c.train.ema = ml_collections.ConfigDict({"ema": 0.9999})  # named EMA copies of params: name -> decay
  c.train.sample_with = "ema"     # params that sample / evaluate / export use: "params" or an EMA name
  c.train.progress_bar = True

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1
  c.mesh.fsdp = 1
  c.mesh.tensor = 1
  c.mesh.num_devices = 0          # > 0: use only the first N devices
  c.mesh.fsdp_min_size = 1024     # param_sharding="fsdp": arrays smaller than this stay replicated

  c.sample = ml_collections.ConfigDict()
  c.eval = ml_collections.ConfigDict()
  c.stages = ml_collections.ConfigDict()  # runs this one needs (diffusion_jax/stages.py)
  return c


def stage(config=None, path: str = "", kind: str = "", optional: bool = False) -> ml_collections.ConfigDict:
  """One `config.stages` entry: train `config` in WORKDIR/<name>, or use `path` (a finished run of the stage,
  or a pretrained directory of the right `kind`)."""
  return ml_collections.ConfigDict({"config": config if config is not None else ml_collections.ConfigDict(),
                                    "path": path, "kind": kind, "optional": optional})


def set_ema(config: ml_collections.ConfigDict, **decays) -> None:
  """Replaces config.train.ema with the given name -> decay (none: no EMA) and samples with the first one,
  or with the raw params when there is none."""
  config.train.ema = ml_collections.ConfigDict({k: float(v) for k, v in decays.items()})
  config.train.sample_with = next(iter(decays), "params")
