"""Metric accumulation (clu.metrics) and writers: DIR/metrics.jsonl, TensorBoard event files, console.

`clu.metric_writers` needs TensorFlow, which this project does not depend on, so the writers here are a
JSONL file plus `tensorboardX`. Only process 0 writes.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any, Dict, Optional

import jax
import numpy as np
from absl import logging
from clu import metrics as clu_metrics

from diffusion_jax import paths


class Accumulator:
  """Averages every scalar metric between two logs with `clu.metrics.Average`; the metrics of `LAST` (the
  learning rate) are the value of the window's last step instead (the current value, not a window mean).

  Per step it only keeps references to the step's on-device scalars (no device ops, no host sync: dispatching
  a merge per metric per step costs more than a small model's step on CPU); at log time the values are fetched
  in one transfer and reduced with `clu.metrics.Average`.
  """

  def __init__(self):
    self._rows = []  # (step, {name: on-device scalar})
    self._checked = 0  # rows already known to have a finite loss

  def update(self, step: int, metrics: Dict[str, Any]):
    self._rows.append((int(step), metrics))

  LAST = ("lr",)
  GUARDED = ("loss", "grad_norm")  # a finite loss with an infinite gradient norm is a divergence too

  def first_non_finite(self) -> Optional[tuple]:
    """(step, value, name) of the first non-finite loss or gradient norm since the last `reset`, else None
    (syncs with the device)."""
    rows = [(s, {k: m[k] for k in self.GUARDED if k in m}) for s, m in self._rows[self._checked:]]
    rows = [(s, v) for s, v in rows if v]
    if not rows:
      return None
    for s, vals in jax.device_get(rows):
      for name, v in vals.items():
        v = np.asarray(v, np.float64)
        if not np.all(np.isfinite(v)):
          return s, float(v.ravel()[0]), name
    self._checked = len(self._rows)
    return None

  def compute(self) -> Dict[str, float]:
    host = jax.device_get([m for _, m in self._rows])
    out = {}
    for k in host[0] if host else []:
      vals = np.asarray([np.asarray(m[k], np.float32).mean() for m in host if k in m], np.float32)
      if k in self.LAST:
        out[k] = float(vals[-1])
      else:
        out[k] = float(clu_metrics.Average.from_model_output(vals).compute())
    return out

  def reset(self):
    self._rows = []
    self._checked = 0

  def __bool__(self):
    return bool(self._rows)


def _jsonable(v):
  if isinstance(v, (np.floating, np.integer)):
    v = v.item()
  if isinstance(v, float) and not math.isfinite(v):
    return str(v)
  return v


def _has_module(name: str) -> bool:
  import importlib.util
  try:
    return importlib.util.find_spec(name) is not None
  except (ImportError, ValueError):
    return False


_TB_INVALID = re.compile(r"[^-/\w.]")


def tensorboard_tag(name: str) -> str:
  """A TensorBoard-legal tag for a metric name (TensorBoard allows letters, digits and "_-/."): "eval/R@1" ->
  "eval/R_at_1", other characters -> "_". metrics.jsonl keeps the original names; this avoids tensorboardX's renaming
  message for every write."""
  return _TB_INVALID.sub("_", str(name).replace("@", "_at_")).lstrip("/")


class MetricWriter:
  """Writes scalar dicts to `workdir/metrics.jsonl`, TensorBoard (`workdir/`, tags `tensorboard_tag(name)`) and
  the console."""

  def __init__(self, workdir: str, enabled: bool = True, tensorboard: bool = True):
    self.enabled = enabled
    self.path = paths.join(workdir, "metrics.jsonl")  # workdir may be a gs:// (fsspec) URL
    self._tb = None
    if enabled and tensorboard and paths.is_url(workdir) and paths.protocol(workdir) not in ("gs", "s3"):
      logging.warning("TensorBoard events are not written to %s (tensorboardX writes local, gs:// and s3:// "
                      "directories only); metrics.jsonl is.", workdir)
      tensorboard = False
    if enabled and tensorboard and paths.protocol(workdir) == "gs" and not _has_module("google.cloud.storage"):
      logging.warning("TensorBoard events are not written to %s: tensorboardX's gs:// writer needs "
                      "google-cloud-storage (pip install 'diffusion_jax[gcp]'); metrics.jsonl is.", workdir)
      tensorboard = False
    if enabled and tensorboard:
      try:
        from tensorboardX import SummaryWriter
        self._tb = SummaryWriter(logdir=workdir, flush_secs=30)
      except Exception as e:  # pragma: no cover - tensorboardX is a core dependency.
        logging.warning("TensorBoard writer unavailable (%s); writing metrics.jsonl only.", e)

  def truncate_after(self, step: int):
    """Drops rows with `step` > `step` (a resumed run rewrites them; keeps the file one row per step)."""
    if not self.enabled or not paths.exists(self.path):
      return
    with paths.open(self.path) as f:
      rows = [line for line in f if line.strip()]
    kept = []
    for n, r in enumerate(rows, 1):
      try:
        row_step = json.loads(r).get("step", 0)
      except json.JSONDecodeError:  # a line half-written when the process was killed
        logging.warning("%s line %d is not complete JSON (a run killed mid-write); dropping it.", self.path, n)
        continue
      if row_step <= step:
        kept.append(r if r.endswith("\n") else r + "\n")
    if len(kept) != len(rows):
      with paths.open(self.path, "w") as f:
        f.writelines(kept)

  def write(self, step: int, scalars: Dict[str, Any], console: bool = True):
    if not self.enabled:
      return
    row = {"step": int(step), **{k: _jsonable(v) for k, v in scalars.items()}}
    with paths.open(self.path, "a") as f:
      f.write(json.dumps(row) + "\n")
    if self._tb is not None:
      for k, v in scalars.items():
        if isinstance(v, (int, float, np.floating, np.integer)):
          self._tb.add_scalar(tensorboard_tag(k), float(v), int(step))
    if console:
      logging.info("step %d: %s", step, ", ".join(
          f"{k}={v:.5g}" if isinstance(v, float) else f"{k}={v}" for k, v in scalars.items()))

  def write_image(self, step: int, tag: str, image: np.ndarray):
    if self._tb is not None:
      self._tb.add_image(tensorboard_tag(tag), np.asarray(image), int(step), dataformats="HWC")

  def flush(self):
    if self._tb is not None:
      self._tb.flush()

  def close(self):
    if self._tb is not None:
      self._tb.close()
      self._tb = None
