"""Stages: the earlier runs a run depends on, run first by the one generic trainer and reused when done.

A config declares them under `config.stages`, in order; each entry is a ConfigDict with

  config    the stage's own run config (any experiment, may declare stages itself), or empty when the stage
            must be given as a path;
  path      "" to train `config` in `WORKDIR/<name>`, or an existing run directory (a finished stage run,
            or a finished run of `diffusion_jax.main`: its `export/`) or an export / pretrained directory
            (e.g. a transformers CLIP) to use as it is (`--config.stages.clip.path=/path/to/clip`);
  kind      optional: the export kind the consumer expects (`experiments.base.EXPORT_KINDS`); defaults to
            the stage experiment's `export_kind`; a given path is checked against it at start-up;
  optional  optional, default False: an entry with neither `config` nor `path` is skipped instead of an error.

`run(config, workdir, mode)` (what `python -m diffusion_jax.main` calls) resolves every stage to its export
directory and hands the dict to the experiment (`Experiment.stages`); the experiment never starts a run.
For each stage trained here:

* `WORKDIR/<name>/stage.json` records the stage's config fingerprint (a hash of its config without the keys
  of `OPERATIONAL_KEYS`, which do not change what is trained) and `complete: false`, before it trains;
  `complete: true` and the export directory once the trainer finished every step and exported. A killed or
  preempted stage is never taken as finished: running again resumes it from its last checkpoint.
* A finished stage whose fingerprint matches is reused without loading anything. A stage directory whose
  record has another fingerprint is an error that lists the keys that differ; `--restage=NAME` (or
  `restage=("NAME",)`) moves the old run aside to `WORKDIR/<name>.previous` and trains it again.
* Two stages with the same fingerprint anywhere in the tree (the CLIP of a run and the CLIP of the run's
  decoder stage) are trained once: the second takes the first one's export.
* `--mode sample|eval` never trains: a stage that is not finished is an error naming the command to run.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from typing import Any, Dict, Iterable, Optional, Tuple

import ml_collections
from absl import logging

from diffusion_jax import paths
from diffusion_jax.models import attention
from diffusion_jax.train.config_loading import flatten

STAGE_RECORD = "stage.json"
# Keys that change how a run is executed or logged, not what it trains.
OPERATIONAL_KEYS = ("train.progress_bar", "train.log_every", "train.async_ckpt", "train.keep_ckpts",
                    "train.ckpt_every", "train.sample_every", "train.num_samples", "data.num_workers",
                    "data.prefetch", "mesh.", "attention", "compilation_cache_dir",
                    "compilation_cache_min_compile_secs")
MODES = ("train", "sample", "eval")
RESERVED = ("checkpoints", "samples", "export", "cache")  # what a run writes into its own WORKDIR


class StageInterrupted(Exception):
  """A stage's training was preempted (SIGTERM): the caller stops; running again resumes the stage."""

  def __init__(self, name: str, result: Dict[str, Any]):
    super().__init__(f"stage {name!r} was preempted at step {result.get('step')}")
    self.name, self.result = name, result


def config_fingerprint(config: ml_collections.ConfigDict) -> Tuple[str, Dict[str, Any]]:
  """(sha256 hex of the config's JSON without `OPERATIONAL_KEYS`, the flat dict it was computed from)."""
  flat = flatten(json.loads(config.to_json_best_effort()))
  kept = {k: v for k, v in flat.items()
          if not any(k == op or (op.endswith(".") and k.startswith(op)) for op in OPERATIONAL_KEYS)}
  text = json.dumps(kept, sort_keys=True, default=str)
  return hashlib.sha256(text.encode()).hexdigest()[:16], kept


def read_record(stage_dir: str) -> Optional[Dict[str, Any]]:
  path = os.path.join(stage_dir, STAGE_RECORD)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def _is_main() -> bool:
  import jax
  return jax.process_index() == 0


def _barrier(what: str) -> None:
  """All processes wait for process 0's file operation (multi-host runs only)."""
  import jax
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(what)


def _write_record(stage_dir: str, record: Dict[str, Any]) -> None:
  """Process 0 writes the record (every process of a multi-host run resolves the same stages in lockstep)."""
  if not _is_main():
    return
  os.makedirs(stage_dir, exist_ok=True)
  tmp = os.path.join(stage_dir, STAGE_RECORD + ".tmp")
  with open(tmp, "w") as f:
    json.dump(record, f, indent=1, default=str)
  os.replace(tmp, os.path.join(stage_dir, STAGE_RECORD))


def specs(config: ml_collections.ConfigDict) -> Dict[str, Any]:
  """config.stages as an ordered dict name -> entry (empty if the config declares none)."""
  st = config.get("stages", None) if hasattr(config, "get") else None
  if not st:
    return {}
  out = {}
  for name, spec in st.items():
    if name in RESERVED or not name.replace("_", "").isalnum():
      raise ValueError(f"config.stages.{name}: a stage name must be a plain identifier and not one of "
                       f"{', '.join(RESERVED)} (its run goes to WORKDIR/<name>).")
    if not hasattr(spec, "get") or not set(spec.keys()) <= {"config", "path", "kind", "optional"}:
      bad = sorted(set(spec.keys()) - {"config", "path", "kind", "optional"}) if hasattr(spec, "keys") else spec
      raise ValueError(f"config.stages.{name} must be a dict with keys config / path / kind / optional; got "
                       f"{bad!r}.")
    out[name] = spec
  return out


def _expected_kind(spec) -> str:
  kind = str(spec.get("kind", "") or "")
  sub = spec.get("config", None)
  if not kind and sub and sub.get("experiment", ""):
    from diffusion_jax.experiments.base import experiment_class
    kind = experiment_class(sub.experiment).export_kind or ""
  return kind


def _check_kind(name: str, path: str, kind: str) -> None:
  from diffusion_jax import experiments
  from diffusion_jax.experiments.base import EXPORT_KINDS
  experiments.import_all()  # the experiments register their export kinds
  if kind:
    try:
      EXPORT_KINDS.get(kind)(path)
    except FileNotFoundError as e:
      raise FileNotFoundError(
          f"Stage {name!r}: {e} It should hold a {kind!r} export. Fix config.stages.{name}.path (a finished run "
          f"directory of that stage, or its export directory), or clear it to train the stage here.") from e


def _from_path(name: str, path: str, kind: str) -> str:
  """A stage given as a path: a finished run directory (its export) or an export / pretrained directory."""
  if not os.path.isdir(path):
    raise FileNotFoundError(f"Stage {name!r}: config.stages.{name}.path={path!r} does not exist. Point it at a "
                            "finished run of the stage or a pretrained directory, or clear it to train the stage.")
  record = read_record(path)
  if record is None and os.path.isdir(os.path.join(path, "export")):
    # A run trained on its own (not as a stage): its export is written only when it finished every step.
    path = os.path.join(path, "export")
  elif record is not None:
    if not record.get("complete"):
      raise ValueError(f"Stage {name!r}: the run in {path} is not finished (killed or still running). Finish it "
                         f"first (rerun its training), or point config.stages.{name}.path elsewhere.")
    if kind and record.get("kind") and record["kind"] != kind:
      raise ValueError(f"Stage {name!r}: the run in {path} exports {record['kind']!r}, but this stage needs "
                       f"{kind!r}. Point config.stages.{name}.path at a run of the right kind.")
    path = os.path.join(path, record["export"])
  _check_kind(name, path, kind)
  return os.path.abspath(path)


def _diff(old: Dict[str, Any], new: Dict[str, Any]) -> Iterable[str]:
  return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))


def resolve(config: ml_collections.ConfigDict, workdir: str, *, restage: Iterable[str] = (),
            train_missing: bool = True, _memo: Optional[Dict[str, str]] = None) -> Dict[str, str]:
  """Name -> export directory of every stage of `config`, training the missing ones (see module docstring)."""
  from diffusion_jax.train import trainer
  restage = set(restage)
  memo = {} if _memo is None else _memo
  out: Dict[str, str] = {}
  for name, spec in specs(config).items():
    path = str(spec.get("path", "") or "")
    sub = spec.get("config", None)
    kind = _expected_kind(spec)
    if path:
      out[name] = _from_path(name, path, kind)
      continue
    if not sub or not sub.get("experiment", ""):
      if bool(spec.get("optional", False)):
        continue
      raise ValueError(f"Stage {name!r} needs a path: this config has no run to train it "
                       f"(config.stages.{name}.config is empty). Pass --config.stages.{name}.path=/path/to/it"
                       f"{f' (a {kind!r} directory)' if kind else ''}.")
    fp, flat = config_fingerprint(sub)
    if fp in memo:
      out[name] = memo[fp]
      continue
    if paths.is_url(workdir):  # a stage's export is read back by local-file loaders
      raise ValueError(f"Stage {name!r} would be trained inside the remote work dir {workdir}, but stages need a "
                       f"local (or shared, mounted) directory. Train it there first and pass "
                       f"--config.stages.{name}.path=/path/to/that/run.")
    stage_dir = os.path.join(workdir, name)
    record = read_record(stage_dir)
    if record is not None and record.get("fingerprint") != fp:
      if name in restage:
        old = stage_dir + ".previous"
        if _is_main():
          shutil.rmtree(old, ignore_errors=True)
          os.replace(stage_dir, old)
        _barrier(f"restage {name}")
        logging.warning("Stage %r: --restage given, moved the old run to %s.", name, old)
        record = None
      else:
        keys = list(_diff(record.get("config", {}), flat))
        raise ValueError(
            f"Stage {name!r} in {stage_dir} was run with another config; keys that differ: "
            f"{', '.join(keys[:20]) or '(unknown)'}{' ...' if len(keys) > 20 else ''}. Rerun with --restage={name} "
            f"to train it again (the old run moves to {stage_dir}.previous), or use another --workdir.")
    if record is None and os.path.isdir(os.path.join(stage_dir, "checkpoints")):
      raise ValueError(f"Stage {name!r}: {stage_dir} holds checkpoints but no {STAGE_RECORD}; it is not a stage "
                       f"run of this config. Use another --workdir, or --restage={name} after moving it away.")
    if record is not None and record.get("complete"):
      export = os.path.join(stage_dir, record["export"])
      if not os.path.isdir(export):
        raise FileNotFoundError(f"Stage {name!r}: its export {export} is missing. Rerun with --restage={name}.")
      print(f"[stages] {name}: reusing the finished run in {stage_dir}", flush=True)
    else:
      if not train_missing:
        raise ValueError(f"Stage {name!r} has not finished in {stage_dir}; --mode sample/eval never trains. "
                           "Run the same command with --mode train first (it resumes the stage).")
      _write_record(stage_dir, {"complete": False, "fingerprint": fp, "experiment": sub.experiment, "kind": kind,
                                "config": flat, "started": time.strftime("%Y-%m-%d %H:%M:%S")})
      sub_stages = resolve(sub, stage_dir, restage=restage, train_missing=True, _memo=memo)
      print(f"[stages] {name}: training {sub.experiment} in {stage_dir}", flush=True)
      attention.configure(sub)
      result = trainer.train(sub, stage_dir, sub_stages)
      if result.get("preempted") or int(result.get("step", 0)) < int(sub.train.num_steps):
        raise StageInterrupted(name, result)
      if not result.get("export"):
        raise RuntimeError(f"Stage {name!r}: experiment {sub.experiment!r} exported nothing, so no run can use "
                           "it as a stage.")
      export = result["export"]
      _barrier(f"stage {name} trained")
      _write_record(stage_dir, {"complete": True, "fingerprint": fp, "experiment": sub.experiment, "kind": kind,
                                "config": flat, "export": os.path.relpath(export, stage_dir),
                                "finished": time.strftime("%Y-%m-%d %H:%M:%S"), "step": int(result["step"]),
                                "eval": {k[5:]: v for k, v in result.items()
                                         if k.startswith("eval/") and isinstance(v, (int, float, str))}})
    _check_kind(name, export, kind)
    memo[fp] = os.path.abspath(export)
    out[name] = memo[fp]
  return out


def run(config: ml_collections.ConfigDict, workdir: str, mode: str = "train", restage: Iterable[str] = (),
        num_samples: Optional[int] = None) -> Dict[str, Any]:
  """Resolves (and in train mode trains) the stages of `config`, then trains / samples / evaluates it."""
  from diffusion_jax.registry import check_choice
  from diffusion_jax.train import trainer
  check_choice("mode", mode, MODES)
  unknown = set(restage) - _all_names(config)
  if unknown:
    raise ValueError(f"--restage names {sorted(unknown)}, which are not stages of this config. Its stages: "
                     f"{', '.join(sorted(_all_names(config))) or '(none)'}.")
  attention.configure(config)  # fails on an unknown implementation name before any stage runs
  if config.get("experiment", ""):
    from diffusion_jax.experiments.base import experiment_class
    experiment_class(config.experiment).check_config(config)  # the experiment's own keys, before any stage
  try:
    stages = resolve(config, workdir, restage=restage, train_missing=mode == "train")
  except StageInterrupted as e:
    logging.warning("%s; rerun the same command to resume it.", e)
    return {**e.result, "preempted": True, "stage": e.name}
  attention.configure(config)
  logging.info("Attention implementation: %s (config.attention).", attention.get_default())
  if mode == "train":
    return trainer.train(config, workdir, stages)
  if mode == "sample":
    return trainer.sample(config, workdir, num_samples, stages)
  return trainer.evaluate(config, workdir, stages)


def _all_names(config) -> set:
  names = set()
  for name, spec in specs(config).items():
    names.add(name)
    sub = spec.get("config", None)
    if sub:
      names |= _all_names(sub)
  return names
