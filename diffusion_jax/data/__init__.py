"""Input data: grain pipelines and sources.

  pipeline.py     make_pipeline(source, transforms, batch_size=, seed=, ...) and picklable transforms
  shapes.py       the procedural shapes world (ShapesSource)
  tfds_source.py  TFDS array_record builds read TF-free (TfdsSource)
  folder.py       a folder of images with optional captions (FolderSource)
  clip_cache.py   (caption, image) pairs from the sources above -> cached CLIP embeddings (EmbeddingSource)

`make_image_source(config.data, split, seed)` picks one of them by `config.data.name` ("shapes", "tfds",
"folder"); an unknown name raises with the list of valid names. Experiments may use it or build their own.
"""

from __future__ import annotations

from typing import Any

from diffusion_jax.registry import Registry

IMAGE_SOURCES = Registry("dataset")


def _get(cfg: Any, key: str, default: Any) -> Any:
  return cfg[key] if key in cfg and cfg[key] not in (None, "") else default


@IMAGE_SOURCES.register("shapes")
def _shapes(dc, split: str, seed: int):
  """Keys: image_size (32), num_train (50000), num_test (1000), shapes (ShapesConfig fields)."""
  from diffusion_jax.data import shapes as S
  cfg = S.ShapesConfig.from_dict(dict(_get(dc, "shapes", {}) or {}), image_size=int(_get(dc, "image_size", 32)))
  n = int(_get(dc, "num_train", 50000)) if split == "train" else int(_get(dc, "num_test", 1000))
  return S.ShapesSource(n, seed=seed, cfg=cfg, split=split)


@IMAGE_SOURCES.register("tfds")
def _tfds(dc, split: str, seed: int):
  """Keys: tfds_name, data_dir, splits.{train,test} (TFDS split names), image_key, label_key, caption_key."""
  del seed
  from diffusion_jax.data.tfds_source import TfdsSource
  name = _get(dc, "tfds_name", "")
  if not name:
    raise ValueError("config.data.name='tfds' needs config.data.tfds_name (e.g. 'cifar10').")
  splits = _get(dc, "splits", {}) or {}
  tfds_split = splits.get(split, split) if hasattr(splits, "get") else split
  return TfdsSource(name, tfds_split, _get(dc, "data_dir", ""), image_key=_get(dc, "image_key", "image"),
                    label_key=_get(dc, "label_key", "label"), caption_key=_get(dc, "caption_key", None))


@IMAGE_SOURCES.register("folder")
def _folder(dc, split: str, seed: int):
  """Keys: data_dir (uses data_dir/<split> when that exists), image_size, captions ("auto" | "txt" | path of a
  .jsonl / .tsv), captions_file (a captions path, takes precedence), labels_from_subdirs."""
  del seed
  from diffusion_jax.data.folder import source_from_config
  return source_from_config(dc, split)


def make_image_source(data_config: Any, split: str, seed: int):
  """The random-access source named by `data_config.name` (see the registered builders' docstrings)."""
  return IMAGE_SOURCES.get(data_config.name)(data_config, split, seed)
