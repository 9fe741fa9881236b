"""Orbax checkpoints: train state + grain iterator state + config JSON, keep-last-N, async.

Layout: `DIR/checkpoints/<step>/{state, data, config}`. The state is restored against an abstract tree
(`jax.ShapeDtypeStruct`s carrying the current run's shardings), so a checkpoint written on one mesh / device
count restores onto another. Orbax writes into a temporary directory and renames it when complete, so a
process killed mid-save leaves the previous checkpoint as the latest one.
"""

from __future__ import annotations

import json
import time
from typing import Any, Optional, Tuple

import grain
import orbax.checkpoint as ocp
from absl import logging

from diffusion_jax import paths


class _IteratorSnapshot:
  """The iterator state captured at save time (the live iterator keeps moving while orbax writes async)."""

  def __init__(self, iterator):
    state = iterator.get_state()
    self._state = state if isinstance(state, bytes) else json.dumps(state, indent=1).encode()

  def get_state(self) -> bytes:
    return self._state


class _IteratorRestorer:
  """Receives the saved state (bytes) from grain's handler and sets it on the live iterator."""

  def __init__(self, iterator):
    self.iterator = iterator

  def set_state(self, state: bytes):
    if isinstance(self.iterator, grain.DatasetIterator):
      state = json.loads(state.decode() if isinstance(state, bytes) else state)
    self.iterator.set_state(state)

  def start_prefetch(self):
    fn = getattr(self.iterator, "start_prefetch", None)
    if fn is not None:
      fn()


class Checkpointer:
  def __init__(self, directory: str, keep: int = 3, use_async: bool = True):
    self.directory = paths.absolute(directory)  # a gs:// (or any fsspec) URL stays a URL
    options = ocp.CheckpointManagerOptions(max_to_keep=max(1, int(keep)), create=True,
                                           enable_async_checkpointing=bool(use_async))
    self.manager = ocp.CheckpointManager(self.directory, options=options)
    # After `restore` with a data iterator: whether its position came back (False: the data stream restarted,
    # so the resumed run is not exact; the trainer reports it in its result and run_info.json).
    self.data_restored: Optional[bool] = None

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def all_steps(self):
    return list(self.manager.all_steps())

  def save(self, step: int, state: Any, data_iterator: Any, config_dict: dict) -> bool:
    args = dict(state=ocp.args.StandardSave(state), config=ocp.args.JsonSave(config_dict))
    if data_iterator is not None:
      args["data"] = grain.checkpoint.CheckpointSave(_IteratorSnapshot(data_iterator))
    return self.manager.save(int(step), args=ocp.args.Composite(**args), force=True)

  def read_config(self, step: int) -> dict:
    return self.manager.restore(int(step), args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]

  def restore(self, step: int, abstract_state: Any, data_iterator: Any = None, config_diff=()):
    """Returns (state, saved_config_dict). Sets `data_iterator` to its saved position when possible.

    A checkpoint whose arrays do not match the current run's state (another model or optimizer) raises a
    ValueError naming the differing config keys (`config_diff`) instead of orbax's low-level error."""
    try:
      out = self.manager.restore(int(step), args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state), config=ocp.args.JsonRestore()))
    except Exception as e:  # pylint: disable=broad-except
      diff = ", ".join(config_diff) or "(none)"
      raise ValueError(
          f"The checkpoint at step {step} in {self.directory} does not match the current run's train state "
          f"({type(e).__name__}: {str(e)[:500]}). Config keys that differ from the checkpoint's: {diff}. "
          "Use a fresh --workdir, or run with the config the checkpoint was trained with.") from e
    if data_iterator is not None:
      try:
        self.manager.restore(int(step), args=ocp.args.Composite(
            data=grain.checkpoint.CheckpointRestore(_IteratorRestorer(data_iterator))))
      except Exception as e:  # pylint: disable=broad-except
        # E.g. saved by a different number of hosts (one iterator file per host) or with another
        # data.num_workers (the iterator state's layout differs).
        logging.warning("Could not restore the data iterator state of step %d (%s: %s); the input pipeline "
                        "restarts from its beginning, so the data order differs from an uninterrupted run. "
                        "Resume with the same number of hosts and data.num_workers to keep it exact.",
                        step, type(e).__name__, e)
        self.data_restored = False
      else:
        self.data_restored = True
    return out["state"], out["config"]

  def restore_newest(self, abstract_state: Any, data_iterator: Any = None, config_diff_fn=None
                     ) -> Tuple[Optional[int], Any, list]:
    """The newest checkpoint that restores cleanly: (step, state, damaged) or (None, None, []) if there is none.

    A checkpoint that fails to read (a truncated array file, a deleted manifest or metadata) while an older
    one restores is *damaged*: it is moved aside to `<step>.damaged-<time>` (never deleted) and named in
    `damaged` and in a warning. If no checkpoint restores, the newest one's error is raised (e.g. a
    checkpoint of another model: `config_diff_fn(step)` names the differing config keys)."""
    steps = sorted(self.all_steps(), reverse=True)
    if not steps:
      return None, None, []
    first_error = None
    for i, step in enumerate(steps):
      try:
        diff = config_diff_fn(step) if config_diff_fn is not None else ()
        state, _ = self.restore(step, abstract_state, data_iterator, config_diff=diff)
      except Exception as e:  # pylint: disable=broad-except
        first_error = first_error or e
        continue
      damaged = []
      for bad in steps[:i]:
        src = paths.join(self.directory, str(bad))
        dst = f"{src}.damaged-{time.strftime('%Y%m%d-%H%M%S')}"
        paths.rename(src, dst)
        damaged.append(dst)
        logging.warning("Checkpoint step %d in %s could not be read; moved it to %s and resumed from step %d.",
                        bad, self.directory, dst, step)
      if damaged:
        self._reopen()
      return step, state, damaged
    raise first_error

  def _reopen(self):
    """A fresh manager (after checkpoint directories were moved aside)."""
    options = self.manager._options  # pylint: disable=protected-access
    self.manager.close()
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    if self.manager is not None:
      self.manager.wait_until_finished()
      self.manager.close()
      self.manager = None
