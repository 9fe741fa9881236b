"""Command line: train, sample or evaluate any experiment from a config file.

  python -m diffusion_jax.main --config configs/<task>.py[:arg] --workdir DIR [--mode train|sample|eval]
      [--config.some.key=value ...] [--restage=NAME ...] [--multihost]

`--config` is an ml_collections config file whose `get_config(arg)` returns the ConfigDict (`:arg` picks a
variant such as `tiny`); `--config.key=value` overrides a key (an unknown key is an error). A run resumes
from the latest checkpoint in DIR. Stages (`config.stages`: the runs this one needs, such as a CLIP or a
pretrained base model) run first into DIR/<name> and are reused when finished with the same config
(`diffusion_jax/stages.py`); `--restage=NAME` trains a changed stage again. `--mode sample|eval` never
train. On several hosts (TPU pod, SLURM) pass `--multihost` (or let the
environment say so) so that `jax.distributed.initialize()` runs first.
"""

from __future__ import annotations

import json
import os
import sys

# Config files import `configs._base`: make the repository root (the current directory when run from a
# clone) importable.
for _p in (os.getcwd(), os.path.dirname(os.path.dirname(os.path.abspath(__file__)))):
  if _p not in sys.path:
    sys.path.insert(0, _p)

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file or shipped config name (--list_configs), optionally "
                                "with ':arg' (e.g. configs/x.py:tiny).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics.jsonl, TensorBoard, samples.")
flags.DEFINE_enum("mode", "train", ["train", "sample", "eval"], "What to run.")
flags.DEFINE_multi_string("restage", [], "Train this stage again although a finished run of it exists "
                          "(its config changed); repeatable.")
flags.DEFINE_bool("multihost", None, "Call jax.distributed.initialize() (auto-detected under SLURM with "
                  "several tasks, on multi-host TPU VMs, or when JAX_COORDINATOR_ADDRESS is set).")
flags.mark_flags_as_required(["config", "workdir"])


def _is_multihost() -> bool:
  from diffusion_jax import cluster
  return cluster.is_multihost(os.environ, FLAGS.multihost)


def _config_spec(argv) -> str:
  for i, a in enumerate(argv):
    if a.startswith("--config="):
      return a.split("=", 1)[1]
    if a == "--config" and i + 1 < len(argv):
      return argv[i + 1]
  return ""


def _bad_override(argv) -> str:
  """Names the first `--config.key` override that does not exist in the config file, with valid keys."""
  spec = _config_spec(argv)
  if not spec:
    return ""
  from diffusion_jax.train.config_loading import load_config
  try:
    config = load_config(spec)
  except Exception as e:  # the config file itself is broken.
    return f"Could not load config {spec!r}: {type(e).__name__}: {e}"
  for a in argv:
    if not a.startswith("--config.") and not a.startswith("--noconfig."):
      continue
    key = a.split("=", 1)[0].split(".", 1)[1]
    node, path = config, []
    for part in key.split("."):
      if not hasattr(node, "keys") or part not in node:
        valid = sorted(node.keys()) if hasattr(node, "keys") else []
        where = "config" + "".join(f".{p}" for p in path)
        return (f"Unknown config key --config.{key}: {where} has no key {part!r}. Valid keys of {where}: "
                f"{', '.join(valid)}.")
      node = node[part]
      path.append(part)
  return ""


def _parse_flags(argv):
  from diffusion_jax import named_configs
  if "--list_configs" in argv:  # the configs shipped with the package, usable by name: --config=NAME[:arg]
    print("\n".join(named_configs.list_configs()))
    sys.exit(0)
  try:
    argv = named_configs.resolve_argv(argv)  # --config=NAME[:arg] or a configs/ path that is not here
  except FileNotFoundError as e:
    print(f"FATAL: {e}", file=sys.stderr)
    sys.exit(2)
  try:
    return FLAGS(argv)
  except Exception as e:  # pylint: disable=broad-except
    msg = _bad_override(argv) or f"{type(e).__name__}: {e}"
    print(f"FATAL: {msg}", file=sys.stderr)
    sys.exit(2)


class _QuietLibraries:
  """Drops INFO records of orbax (several lines per checkpoint) from the console; warnings still show."""

  def filter(self, record) -> bool:
    return record.levelno >= 30 or "/orbax/" not in getattr(record, "pathname", "")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.get_absl_handler().addFilter(_QuietLibraries())
  import jax
  if _is_multihost():
    # On SLURM / TPU VMs / Kubernetes JAX detects everything; JAX_COORDINATOR_ADDRESS + JAX_NUM_PROCESSES +
    # JAX_PROCESS_ID (see launch/local_multiprocess.sh) cover any other cluster.
    # Under SLURM the local GPUs are computed here (diffusion_jax/cluster.py): JAX alone would give each task
    # only GPU [SLURM_LOCALID].
    from diffusion_jax import cluster
    kwargs = cluster.distributed_init_kwargs(os.environ)
    if kwargs:
      logging.info("jax.distributed.initialize(%s)", ", ".join(f"{k}={v}" for k, v in kwargs.items()))
    jax.distributed.initialize(**kwargs)
  logging.info("JAX %s: process %d/%d, %d devices (%d local), platform %s.", jax.__version__,
               jax.process_index(), jax.process_count(), jax.device_count(), jax.local_device_count(),
               jax.devices()[0].platform)
  from diffusion_jax import compile_cache, stages
  try:
    cache_dir = compile_cache.configure(FLAGS.config)  # before the first compilation of the process
    if cache_dir:
      logging.info("Persistent compilation cache: %s (programs that compile in >= %s s).", cache_dir,
                   FLAGS.config.get("compilation_cache_min_compile_secs", 1.0))
    result = stages.run(FLAGS.config, FLAGS.workdir, FLAGS.mode, restage=FLAGS.restage)
  except (ValueError, FileNotFoundError) as e:
    # A user mistake (config, paths, stage state): one clear message, no traceback (DIFFUSION_JAX_TRACEBACK=1
    # shows it).
    if os.environ.get("DIFFUSION_JAX_TRACEBACK"):
      raise
    print(f"FATAL: {type(e).__name__}: {e}", file=sys.stderr)
    sys.exit(2)
  if cache_dir:
    st = compile_cache.stats()
    logging.info("Compilation cache: %d of %d compilations loaded from %s (%.1f s of compile time saved).",
                 st["hits"], st["requests"], cache_dir, st["saved_s"])
  logging.info("Done (%s): %s", FLAGS.mode, json.dumps(result, default=str))


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
