"""The shapes world as a TFDS dataset (`shapes_world`), built and read without TensorFlow.

The builder writes array_record files whose features are plain `tfds.features.Tensor`s (no
`tfds.features.Image`: image encoding needs TensorFlow), so the build reads back with
`tfds.data_source("shapes_world", data_dir=...)` (or `tfds.builder_from_directory`) into grain,
TF-free. Record ``i`` of a split equals `shapes.make_example(split_seed(seed, split), i, cfg)` (the builder does
not shuffle on write); records come back with the caption as ``bytes`` and scalars as Python ints, and
`decode_example` turns them into exactly the generator's dict. `tfds.data_source` by name needs this module
imported (it registers the builder); `tfds.builder_from_directory(path)` does not.

Build a data directory::

  from diffusion_jax.data import shapes_tfds
  builder = shapes_tfds.build(data_dir, num_train=50_000, num_test=10_000, image_size=32)
  src = tfds.data_source(f"shapes_world/{builder.builder_config.name}", data_dir=data_dir, split="train")
  example = shapes_tfds.decode_example(src[0])

The default parameters (1000 train / 200 test, 32x32, 1-3 objects, seed 0) are the config "default"; others
get a config named after them (`config_name`, e.g. ``"s64_n1-3_seed0_train7_test3"``).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np
import tensorflow_datasets as tfds

from diffusion_jax.data import shapes as S

_DESCRIPTION = """Procedural shapes world: 1-3 coloured shapes per image with caption, class label,
segmentation, instance, edge and depth maps, low-resolution image, inpainting mask and masked image."""


@dataclasses.dataclass
class ShapesWorldConfig(tfds.core.BuilderConfig):
  """Builder config: the number of examples per split, the seed and the `ShapesConfig` fields."""
  num_train: int = 1000
  num_test: int = 200
  seed: int = 0
  image_size: int = 32
  min_objects: int = 1
  max_objects: int = 3

  def shapes_config(self) -> S.ShapesConfig:
    return S.ShapesConfig(image_size=self.image_size, min_objects=self.min_objects, max_objects=self.max_objects)


def config_name(image_size: int = 32, min_objects: int = 1, max_objects: int = 3, seed: int = 0,
                num_train: int = 1000, num_test: int = 200) -> str:
  return f"s{image_size}_n{min_objects}-{max_objects}_seed{seed}_train{num_train}_test{num_test}"


class ShapesWorld(tfds.core.GeneratorBasedBuilder):
  """TFDS builder of the shapes world (array_record, Tensor features only)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [ShapesWorldConfig(name="default", description="32x32, 1-3 objects, 1000/200 examples.")]
  DEFAULT_BUILDER_CONFIG_NAME = "default"

  def __init__(self, *args, **kwargs):
    kwargs.setdefault("file_format", tfds.core.FileFormat.ARRAY_RECORD)
    super().__init__(*args, **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    c = self.builder_config
    s, m = c.image_size, c.max_objects
    f = S.ShapesConfig().lowres_factor
    T = tfds.features.Tensor
    return self.dataset_info_from_configs(
        description=_DESCRIPTION,
        features=tfds.features.FeaturesDict({
            "image": T(shape=(s, s, 3), dtype=np.uint8),
            "label": T(shape=(), dtype=np.int32),
            "caption": T(shape=(), dtype=np.str_),
            "segmentation": T(shape=(s, s), dtype=np.uint8),
            "instances": T(shape=(s, s), dtype=np.uint8),
            "edges": T(shape=(s, s), dtype=np.uint8),
            "depth": T(shape=(s, s), dtype=np.float32),
            "lowres": T(shape=(s // f, s // f, 3), dtype=np.uint8),
            "mask": T(shape=(s, s), dtype=np.uint8),
            "masked_image": T(shape=(s, s, 3), dtype=np.uint8),
            "objects": T(shape=(m, len(S.OBJECT_FIELDS)), dtype=np.int32),
            "num_objects": T(shape=(), dtype=np.int32),
            "relation": T(shape=(), dtype=np.int32),
        }),
        supervised_keys=("image", "label"),
        # Record i of a split is example i (no write-time shuffling): the build equals the generator.
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    c = self.builder_config
    return {"train": self._generate_examples("train", c.num_train),
            "test": self._generate_examples("test", c.num_test)}

  def _generate_examples(self, split: str, num: int):
    c = self.builder_config
    cfg = c.shapes_config()
    seed = S.split_seed(c.seed, split)
    for i in range(num):
      yield i, S.make_example(seed, i, cfg)


def decode_example(example) -> dict:
  """A record read from the build -> the `shapes.make_example` dict (caption bytes -> str, scalars -> int32)."""
  out = dict(example)
  cap = out["caption"]
  out["caption"] = cap.decode("utf-8") if isinstance(cap, bytes) else str(cap)
  for k in ("label", "num_objects", "relation"):
    out[k] = np.int32(out[k])
  return out


def build(data_dir: str, num_train: int = 1000, num_test: int = 200, seed: int = 0, image_size: int = 32,
          min_objects: int = 1, max_objects: int = 3, name: Optional[str] = None) -> tfds.core.DatasetBuilder:
  """Writes the `shapes_world` array_record build under `data_dir` and returns the builder.

  The default parameters use the registered "default" config; others get a config named by `config_name`
  (or `name`). Read back with `tfds.data_source(f"shapes_world/{builder.builder_config.name}", data_dir=...)`
  or `tfds.builder_from_directory(builder.data_dir)`.
  """
  params = dict(num_train=num_train, num_test=num_test, seed=seed, image_size=image_size,
                min_objects=min_objects, max_objects=max_objects)
  if name is None and params == dict(num_train=1000, num_test=200, seed=0, image_size=32, min_objects=1,
                                     max_objects=3):
    builder = ShapesWorld(data_dir=data_dir)
  else:
    cfg = ShapesWorldConfig(name=name or config_name(**params), **params)
    builder = ShapesWorld(data_dir=data_dir, config=cfg)
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(download_mode=tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS))
  return builder
