"""Work dirs given as URLs (gs://, any fsspec protocol): diffusion_jax/paths.py and the trainer's outputs.

No cloud access: `gs://` is served by a fake fsspec file system over a temporary directory (the protocol
etils.epath and fsspec resolve, the one gcsfs would provide), and `memory://` is fsspec's in-memory one.
Orbax writes arrays through tensorstore, which has its own GCS driver, so the toy run's checkpointer is pointed
at the fake bucket's directory; the test checks that the URL reaches it unchanged.
"""

import json
import os

import fsspec
import numpy as np
import pytest
from fsspec.implementations.dirfs import DirFileSystem
from fsspec.implementations.local import LocalFileSystem

import toy_experiment as toy
from diffusion_jax import paths
from diffusion_jax.train import checkpoint as checkpoint_lib
from diffusion_jax.train import trainer


@pytest.fixture
def fake_gcs(tmp_path, monkeypatch):
  """`gs://bucket/x` -> `tmp_path/gcs/bucket/x` for fsspec (and thus etils.epath's fsspec backend)."""
  root = tmp_path / "gcs"
  root.mkdir()

  class FakeGCS(DirFileSystem):
    protocol = "gs"
    cachable = False

    def __init__(self, *args, **kwargs):
      super().__init__(path=str(root), fs=LocalFileSystem())

    @classmethod
    def _strip_protocol(cls, path):
      path = fsspec.utils.stringify_path(path)
      return (path[len("gs://"):] if path.startswith("gs://") else path).rstrip("/")

  fsspec.register_implementation("gs", FakeGCS, clobber=True)
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  monkeypatch.chdir(cwd)  # where a wrong os.path handling would leave a local "gs:" folder
  monkeypatch.setenv("DIFFUSION_JAX_LOCAL_DIR", str(tmp_path / "local"))
  yield root
  from fsspec.registry import _registry  # restore gcsfs (or nothing) for later tests
  _registry.pop("gs", None)


def test_url_helpers_on_memory_fs():
  base = "memory://paths-test/run"
  assert paths.is_url(base) and not paths.is_url("/data/run") and not paths.is_url("runs/x")
  assert paths.absolute(base + "/") == base and paths.absolute("runs/x") == os.path.abspath("runs/x")
  assert paths.join(base, "samples", "a.png") == base + "/samples/a.png"
  assert paths.dirname(base + "/samples/a.png") == base + "/samples"
  with paths.open(paths.join(base, "m.jsonl"), "a") as f:
    f.write('{"step": 1}\n')
  with paths.open(paths.join(base, "m.jsonl"), "a") as f:  # object stores cannot append: rewritten
    f.writelines(['{"step": 2}\n'])
  with paths.open(paths.join(base, "m.jsonl")) as f:
    assert f.read().splitlines() == ['{"step": 1}', '{"step": 2}']
  paths.rename(paths.join(base, "m.jsonl"), paths.join(base, "n.jsonl"))
  assert not paths.exists(paths.join(base, "m.jsonl")) and paths.exists(paths.join(base, "n.jsonl"))
  paths.remove(paths.join(base, "n.jsonl"))
  assert not paths.exists(paths.join(base, "n.jsonl"))


def test_put_dir_and_local_mirror(tmp_path, monkeypatch):
  src = tmp_path / "export"
  (src / "sub").mkdir(parents=True)
  (src / "config.json").write_text("{}")
  (src / "sub" / "w.bin").write_bytes(b"\x00\x01")
  paths.put_dir(str(src), "memory://paths-test/export")
  with paths.open("memory://paths-test/export/sub/w.bin", "rb") as f:
    assert f.read() == b"\x00\x01"
  monkeypatch.setenv("DIFFUSION_JAX_LOCAL_DIR", str(tmp_path / "mirror"))
  m = paths.local_mirror("gs://bucket/my run")
  assert m.startswith(str(tmp_path / "mirror")) and os.path.isdir(m) and m != paths.local_mirror("gs://b2/my run")
  assert paths.local_mirror("runs/x") == "runs/x"


def test_checkpointer_keeps_the_url(monkeypatch):
  seen = {}

  class FakeManager:
    def __init__(self, directory, options=None):
      seen["directory"] = directory

  monkeypatch.setattr(checkpoint_lib.ocp, "CheckpointManager", FakeManager)
  ckpt = checkpoint_lib.Checkpointer("gs://bucket/run/checkpoints", keep=2)
  assert ckpt.directory == seen["directory"] == "gs://bucket/run/checkpoints"


def test_toy_run_writes_its_outputs_to_the_bucket(fake_gcs, monkeypatch):
  real = trainer.Checkpointer
  seen = []

  def checkpointer(directory, **kw):  # orbax/tensorstore's own GCS driver is out of reach: use the bucket dir
    seen.append(directory)
    return real(str(fake_gcs / directory[len("gs://"):]), **kw)

  monkeypatch.setattr(trainer, "Checkpointer", checkpointer)
  cfg = toy.toy_config(**{"mesh.num_devices": 1, "train.num_steps": 4, "train.ckpt_every": 2,
                          "train.sample_every": 2, "train.num_samples": 2})
  out = trainer.train(cfg, "gs://bucket/run")
  run = fake_gcs / "bucket" / "run"
  assert seen == ["gs://bucket/run/checkpoints"]
  rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]
  assert json.loads((run / "run_info.json").read_text())["num_params"] > 0
  assert (run / "param_overview.txt").exists()
  assert sorted(os.listdir(run / "checkpoints"))[-1] == "4"
  assert [n for n in os.listdir(run / "samples") if n.endswith(".png")]
  assert (run / "export").is_dir() and os.listdir(run / "export")
  assert out["export"] == "gs://bucket/run/export"
  assert not os.listdir(os.getcwd()), "nothing may land in a local 'gs:' folder"
  # resumed from the bucket: the rows after the restored step are rewritten, one per step
  out = trainer.train(toy.toy_config(**{"mesh.num_devices": 1, "train.num_steps": 6, "train.ckpt_every": 2}),
                      "gs://bucket/run")
  rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5, 6]
  assert np.isfinite(out["loss"])


def test_stages_need_a_local_workdir(fake_gcs):
  from diffusion_jax import stages
  import toy_config
  with pytest.raises(ValueError, match="stages need a local"):
    stages.resolve(toy_config.get_config("distill"), "gs://bucket/run")
