"""Run-directory paths that may be URLs: `gs://bucket/run` (with the `gcp` extra), any fsspec protocol, or local.

The trainer writes checkpoints (orbax, through etils.epath), `metrics.jsonl`, `run_info.json`,
`eval_results.json`, `param_overview.txt`, sample sheets and the export through these helpers, so a
`--workdir gs://bucket/run` on a TPU pod is one shared directory instead of a local `gs:` folder on every host.
Local paths keep the plain `os` behaviour. Experiments' own side files (embedding caches, evaluation dumps) need
a local directory: for a URL work dir they go to `local_mirror(workdir)` on each host.
"""

from __future__ import annotations

import builtins
import hashlib
import os
import re
import tempfile
from typing import IO, Any, List, Tuple

_URL = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")


def is_url(path: Any) -> bool:
  """`gs://b/x`, `memory://x`, `s3://...`: a path with a protocol (`file://` included)."""
  return bool(_URL.match(os.fspath(path))) if isinstance(path, (str, os.PathLike)) else False


def protocol(path: str) -> str:
  m = _URL.match(path)
  return m.group(1).lower() if m else ""


def _fs(path: str) -> Tuple[Any, str]:
  import fsspec
  try:
    return fsspec.core.url_to_fs(path)
  except (ImportError, ValueError) as e:
    extra = " Install the gcp extra: pip install 'diffusion_jax[gcp]'." if protocol(path) == "gs" else ""
    raise ValueError(f"Cannot open {path!r}: {type(e).__name__}: {e}.{extra}") from e


def absolute(path: str) -> str:
  """`os.path.abspath` for local paths; URLs unchanged (abspath would turn `gs://b/x` into `./gs:/b/x`)."""
  path = os.fspath(path)
  return path.rstrip("/") if is_url(path) else os.path.abspath(path)


def join(base: str, *parts: str) -> str:
  base = os.fspath(base)
  if is_url(base):
    return "/".join([base.rstrip("/")] + [p.strip("/") for p in parts if p])
  return os.path.join(base, *parts)


def dirname(path: str) -> str:
  if is_url(path):
    head, _, _ = path.rstrip("/").rpartition("/")
    return head
  return os.path.dirname(path)


def exists(path: str) -> bool:
  if not is_url(path):
    return os.path.exists(path)
  fs, p = _fs(path)
  return fs.exists(p)


def makedirs(path: str) -> None:
  if not is_url(path):
    os.makedirs(path, exist_ok=True)
    return
  fs, p = _fs(path)
  fs.makedirs(p, exist_ok=True)


def remove(path: str) -> None:
  if not is_url(path):
    os.remove(path)
    return
  fs, p = _fs(path)
  fs.rm(p)


def open(path: str, mode: str = "r") -> IO:  # pylint: disable=redefined-builtin
  """A file object (a context manager). Append mode on a URL rewrites the object with the new data added
  (object stores cannot append); the parent directory is created when writing."""
  if not is_url(path):
    if any(c in mode for c in "wa"):
      os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    return builtins.open(path, mode)
  fs, p = _fs(path)
  if any(c in mode for c in "wa"):
    parent = dirname(path)
    if parent and not parent.endswith(":/"):
      fs.makedirs(_fs(parent)[1], exist_ok=True)
  if "a" in mode:
    return _AppendFile(fs, p, mode)
  return fs.open(p, mode)


class _AppendFile:
  """Append for object stores: the old content plus what is written, uploaded on close."""

  def __init__(self, fs, path: str, mode: str):
    self.fs, self.path, self.binary = fs, path, "b" in mode
    self.old = fs.cat_file(path) if fs.exists(path) else b""
    self.chunks: List[Any] = []

  def write(self, data):
    self.chunks.append(data)
    return len(data)

  def writelines(self, lines):
    for line in lines:
      self.write(line)

  def close(self):
    new = b"".join(self.chunks) if self.binary else "".join(self.chunks).encode()
    with self.fs.open(self.path, "wb") as f:
      f.write(self.old + new)
    self.chunks = []

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def put_dir(local_dir: str, url: str) -> None:
  """Uploads a local directory tree to `url` (replacing what is there)."""
  fs, p = _fs(url)
  if fs.exists(p):
    fs.rm(p, recursive=True)
  for root, _, files in os.walk(local_dir):
    rel = os.path.relpath(root, local_dir)
    dst = p if rel == "." else p.rstrip("/") + "/" + rel.replace(os.sep, "/")
    fs.makedirs(dst, exist_ok=True)
    for name in files:
      fs.put_file(os.path.join(root, name), dst.rstrip("/") + "/" + name)


def rename(src: str, dst: str) -> None:
  if not is_url(src):
    os.replace(src, dst)
    return
  fs, p = _fs(src)
  fs.mv(p, _fs(dst)[1], recursive=True)


def local_mirror(workdir: str) -> str:
  """A local directory standing in for a URL work dir where an experiment needs local files (caches, dumps):
  `$DIFFUSION_JAX_LOCAL_DIR/<name>-<hash>` (default: the system temp directory); local work dirs are returned
  unchanged."""
  if not is_url(workdir):
    return workdir
  base = os.environ.get("DIFFUSION_JAX_LOCAL_DIR") or os.path.join(tempfile.gettempdir(), "diffusion_jax")
  name = re.sub(r"[^A-Za-z0-9_.-]+", "_", workdir.rstrip("/").rpartition("/")[2]) or "run"
  d = os.path.join(base, f"{name}-{hashlib.sha1(workdir.encode()).hexdigest()[:10]}")
  os.makedirs(d, exist_ok=True)
  return d

