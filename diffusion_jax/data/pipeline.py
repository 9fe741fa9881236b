"""grain input pipelines: source -> shard -> shuffle -> map -> batch -> repeat -> prefetch (workers).

`make_pipeline` returns a `grain.IterDataset`; `iter()` on it gives a `grain.DatasetIterator` whose state
(`get_state`/`set_state`) the trainer stores in every checkpoint, so a resumed run sees exactly the batches
it would have seen without the interruption.

Determinism: the order depends only on (`seed`, `shard_index`, `shard_count`, `batch_size`), not on
`num_workers` (grain's `mp_prefetch` slices the *batched* dataset over workers and interleaves the results
back in order). Each epoch is shuffled differently (grain folds the epoch into the shuffle seed).

Transforms are picklable callables `example -> example` (module-level functions or classes,
`functools.partial`), so that worker processes can run them. A transform that subclasses
`grain.transforms.RandomMap` gets a per-example `np.random.Generator` derived from `seed`.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Sequence

import grain
import numpy as np

Example = Dict[str, Any]


def _apply_transform(ds: grain.MapDataset, transform: Any) -> grain.MapDataset:
  if isinstance(transform, grain.transforms.RandomMap):
    return ds.random_map(transform)
  if isinstance(transform, grain.transforms.Map):
    return ds.map(transform)
  if not callable(transform):
    raise TypeError(f"Pipeline transform {transform!r} is not callable; pass functions example -> example.")
  return ds.map(transform)


def make_pipeline(
    source: Any,
    transforms: Sequence[Callable[[Example], Example]] = (),
    *,
    batch_size: int,
    seed: int,
    shuffle: bool = True,
    num_epochs: Optional[int] = None,
    num_workers: int = 0,
    prefetch: int = 2,
    shard_index: int = 0,
    shard_count: int = 1,
    drop_remainder: bool = True,
) -> grain.IterDataset:
  """Builds the standard grain pipeline over a random-access `source`.

  Args:
    source: a grain `RandomAccessDataSource` (anything with `__len__` and `__getitem__`) or a
      `grain.MapDataset`.
    transforms: per-example callables applied in order (after shuffling).
    batch_size: examples per batch *on this host* (the trainer passes global_batch // process_count).
    seed: shuffle seed (and seed of `RandomMap` transforms).
    shuffle: shuffle globally (per epoch) before batching.
    num_epochs: None = repeat forever.
    num_workers: worker processes (0 = in-process). Output is the same for every value.
    prefetch: batches buffered per worker (or read-ahead threads' buffer when num_workers == 0).
    shard_index, shard_count: this host's shard: examples shard_index, shard_index + shard_count, ...
    drop_remainder: drop the last incomplete batch of each epoch.
  """
  if batch_size <= 0:
    raise ValueError(f"batch_size must be positive, got {batch_size}.")
  if not 0 <= shard_index < shard_count:
    raise ValueError(f"shard_index {shard_index} must be in [0, shard_count={shard_count}).")
  ds = source if isinstance(source, grain.MapDataset) else grain.MapDataset.source(source)
  if len(ds) < shard_count:
    raise ValueError(f"The data source has {len(ds)} examples, fewer than the {shard_count} hosts reading it.")
  if shard_count > 1:
    ds = ds[shard_index::shard_count]
  if drop_remainder and len(ds) < batch_size:
    raise ValueError(
        f"The data source has {len(ds)} examples per host, fewer than the per-host batch size {batch_size}; "
        "lower data.batch_size or use more data.")
  ds = ds.seed(seed)
  if shuffle:
    ds = ds.shuffle(seed)
  for t in transforms:
    ds = _apply_transform(ds, t)
  ds = ds.batch(batch_size, drop_remainder=drop_remainder)
  if num_epochs is None or num_epochs > 1:
    ds = ds.repeat(num_epochs)
  it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=max(1, min(4, prefetch)),
                                               prefetch_buffer_size=max(1, prefetch)))
  if num_workers > 0:
    from absl import flags  # grain's worker processes read absl flags; outside an absl app parse defaults.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers,
                                                           per_worker_buffer_size=max(1, prefetch)))
  return it_ds


# ---------------------------------------------------------------------------------------------------------
# Common picklable transforms.


class ToFloatImage(grain.transforms.Map):
  """uint8 image `[H, W, C]` in [0, 255] -> float32 in [-1, 1] under `key` (the convention of every
  experiment: images in batches are float32 NHWC in [-1, 1])."""

  def __init__(self, key: str = "image"):
    self.key = key

  def map(self, example: Example) -> Example:
    example = dict(example)
    x = np.asarray(example[self.key])
    if x.dtype == np.uint8:
      x = x.astype(np.float32) / 127.5 - 1.0
    example[self.key] = x.astype(np.float32)
    return example


class SelectKeys(grain.transforms.Map):
  """Keeps only `keys` (drops e.g. file names or raw strings the model does not need)."""

  def __init__(self, keys: Sequence[str]):
    self.keys = tuple(keys)

  def map(self, example: Example) -> Example:
    missing = [k for k in self.keys if k not in example]
    if missing:
      raise KeyError(f"Example has no keys {missing}; available: {sorted(example)}.")
    return {k: example[k] for k in self.keys}


def resize_center_crop(image: np.ndarray, size: int) -> np.ndarray:
  """Resizes the shorter side to `size` (bicubic, PIL) and center-crops to `size x size`; uint8 RGB out."""
  from PIL import Image  # local import: only the image paths need PIL.
  img = Image.fromarray(np.asarray(image, dtype=np.uint8))
  if img.mode != "RGB":
    img = img.convert("RGB")
  w, h = img.size
  scale = size / min(w, h)
  nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
  if (nw, nh) != (w, h):
    img = img.resize((nw, nh), Image.BICUBIC)
  left, top = (nw - size) // 2, (nh - size) // 2
  img = img.crop((left, top, left + size, top + size))
  return np.asarray(img, dtype=np.uint8)


class ResizeCrop(grain.transforms.Map):
  """Resize + center-crop the image under `key` to `size x size` (no-op if already that size)."""

  def __init__(self, size: int, key: str = "image"):
    self.size = int(size)
    self.key = key

  def map(self, example: Example) -> Example:
    example = dict(example)
    x = np.asarray(example[self.key])
    if x.ndim == 2:
      x = np.repeat(x[..., None], 3, axis=-1)
    if x.shape[-1] == 1:
      x = np.repeat(x, 3, axis=-1)
    if x.shape[:2] != (self.size, self.size):
      x = resize_center_crop(x, self.size)
    example[self.key] = x
    return example
