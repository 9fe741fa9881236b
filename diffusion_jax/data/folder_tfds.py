"""An image folder converted into a TFDS array_record build, without TensorFlow (`folder_array_record`).

`tfds build` needs TensorFlow, which this project does not install. This builder writes the same kind of
array_record build from a folder of images (any data set exported as files: CIFAR-10, FFHQ, ImageNet, a
captioned folder), with plain `tfds.features.Tensor` features (as `shapes_tfds.py`; image encoding would need
TensorFlow), so `config.data.name=tfds` reads it:

    python -m diffusion_jax.data.folder_tfds --src /data/cifar10_png --data_dir /data/tfds --name cifar10 \
        --image_size 32 --labels_from_subdirs
    python -m diffusion_jax.main --config configs/diffit_cifar10.py --workdir runs/cifar \
        --config.data.tfds_name=folder_array_record/cifar10 --config.data.data_dir=/data/tfds

Splits: `--src/<split>/` folders (e.g. `train/`, `test/`) when present, else the whole folder as `train`.
Each record: `image` uint8 [S, S, 3] (shorter side resized, center-cropped: `folder.FolderSource`), `label`
int32 (the first-level sub-folder's index with `--labels_from_subdirs`, else -1), `caption` str (from
`captions.jsonl` / `.tsv` / `.txt` side files, else ""). Record i of a split is example i of the folder
source, in its sorted order.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from typing import Dict, List, Optional

import numpy as np
import tensorflow_datasets as tfds

from diffusion_jax.data.folder import FolderSource


@dataclasses.dataclass
class FolderConfig(tfds.core.BuilderConfig):
  src: str = ""
  image_size: int = 32
  labels_from_subdirs: bool = False
  captions: str = "auto"


def split_dirs(src: str) -> Dict[str, str]:
  """Split name -> folder: the `train` / `test` / `validation` sub-folders of `src`, else {"train": src}."""
  found = {s: os.path.join(src, s) for s in ("train", "test", "validation") if os.path.isdir(os.path.join(src, s))}
  return found or {"train": src}


class FolderArrayRecord(tfds.core.GeneratorBasedBuilder):
  """TFDS builder over an image folder (array_record, Tensor features only; see the module docstring)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [FolderConfig(name="default")]

  def __init__(self, *args, **kwargs):
    kwargs.setdefault("file_format", tfds.core.FileFormat.ARRAY_RECORD)
    super().__init__(*args, **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    s = self.builder_config.image_size
    T = tfds.features.Tensor
    return self.dataset_info_from_configs(
        description=f"Images of the folder {os.path.basename(self.builder_config.src.rstrip('/'))!r}, {s}x{s}.",
        features=tfds.features.FeaturesDict({
            "image": T(shape=(s, s, 3), dtype=np.uint8),
            "label": T(shape=(), dtype=np.int32),
            "caption": T(shape=(), dtype=np.str_),
        }),
        supervised_keys=("image", "label"),
        disable_shuffling=True,  # record i = example i of the folder source
    )

  def _sources(self) -> Dict[str, FolderSource]:
    c = self.builder_config
    return {split: FolderSource(d, c.image_size, captions=c.captions or None, labels_from_subdirs=c.labels_from_subdirs)
            for split, d in split_dirs(c.src).items()}

  def _split_generators(self, dl_manager):
    del dl_manager
    return {split: self._generate_examples(src) for split, src in self._sources().items()}

  def _generate_examples(self, src: FolderSource):
    for i in range(len(src)):
      ex = src[i]
      yield i, {"image": ex["image"], "label": np.int32(ex.get("label", -1)), "caption": ex.get("caption", "")}


def build(src: str, data_dir: str, name: str, *, image_size: int = 32, labels_from_subdirs: bool = False,
          captions: str = "auto") -> tfds.core.DatasetBuilder:
  """Writes `folder_array_record/<name>` under `data_dir`; returns the builder."""
  if not os.path.isdir(src):
    raise FileNotFoundError(f"No folder {src!r} to convert.")
  cfg = FolderConfig(name=name, src=os.path.abspath(src), image_size=int(image_size),
                     labels_from_subdirs=bool(labels_from_subdirs), captions=captions)
  builder = FolderArrayRecord(data_dir=data_dir, config=cfg)
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(download_mode=tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS))
  return builder


def main(argv: Optional[List[str]] = None) -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--src", required=True, help="the image folder (with train/ and test/ sub-folders, or not)")
  ap.add_argument("--data_dir", required=True, help="the TFDS data dir to write into")
  ap.add_argument("--name", required=True, help="the build's config name: tfds_name folder_array_record/NAME")
  ap.add_argument("--image_size", type=int, default=32)
  ap.add_argument("--labels_from_subdirs", action="store_true")
  ap.add_argument("--captions", default="auto", help='"auto", "txt", "" (none) or a .jsonl / .tsv captions file')
  a = ap.parse_args(argv)
  b = build(a.src, a.data_dir, a.name, image_size=a.image_size, labels_from_subdirs=a.labels_from_subdirs,
            captions=a.captions)
  counts = {k: v.num_examples for k, v in b.info.splits.items()}
  print(f"Wrote folder_array_record/{a.name} to {b.data_dir}: {counts}. Read it with --config.data.name=tfds "
        f"--config.data.tfds_name=folder_array_record/{a.name} --config.data.data_dir={a.data_dir}")


if __name__ == "__main__":
  main()
