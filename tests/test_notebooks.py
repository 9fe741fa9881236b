"""Executes every notebooks/*.ipynb top to bottom (nbclient), so a broken notebook fails the suite.

Each notebook runs in a fresh kernel on this interpreter, from the repository root, with
DIFFUSION_JAX_NOTEBOOK_TINY=1 (notebooks shrink their step counts when it is set), the test process's XLA
flags, matmul precision and compilation cache (NOTEBOOK_SINGLE_DEVICE=1: one CPU device, as on Colab) and
matplotlib's inline backend. A failing cell fails the test with the cell's source and traceback; a notebook
that runs past its time limit (NOTEBOOK_TIME_LIMIT_S, whole notebook) fails too. NOTEBOOK_EXECUTED_DIR=DIR
keeps the executed copies (with outputs) in DIR. The structure checks below (Colab cells first, outputs
stripped) keep every notebook Colab-ready; see docs/notebooks.md.
"""

from __future__ import annotations

import glob
import json
import os
import re
import sys
import time
from typing import Optional

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(REPO, "notebooks", "*.ipynb")))
TINY_ENV = "DIFFUSION_JAX_NOTEBOOK_TINY"
# Whole-notebook limit in tiny mode. Each notebook takes <= ~30 s on a quiet 2-core machine; the limit leaves
# room for a loaded CI box.
# A notebook may ask for more in its metadata ({"diffusion_jax": {"test_time_limit_s": N}}); the environment
# variable NOTEBOOK_TIME_LIMIT_S overrides both.
TIME_LIMIT_S = 240.0
COLAB_URL = "https://colab.research.google.com/github/diffusion-jax/diffusion_jax/blob/main/notebooks/{name}"
KERNEL_NAME = "diffusion_jax_test"


def _ids(paths):
  return [os.path.basename(p) for p in paths]


def _kernel_env():
  """The test process's environment with tiny mode on. The XLA flags (4 simulated CPU devices) and the
  persistent compilation cache of tests/conftest.py are kept: the notebooks run the same tiny configs as the
  end-to-end tests, so their programs are the same and mostly come from the cache. (On Colab the notebooks run
  on one device; NOTEBOOK_SINGLE_DEVICE=1 tests that.)"""
  env = dict(os.environ)
  env[TINY_ENV] = "1"
  env["JAX_PLATFORMS"] = "cpu"
  env["JAX_DEFAULT_MATMUL_PRECISION"] = "highest"  # as tests/conftest.py sets it: the same compiled programs
  if os.environ.get("NOTEBOOK_SINGLE_DEVICE") == "1":
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", "")).strip()
    if flags:
      env["XLA_FLAGS"] = flags
    else:
      env.pop("XLA_FLAGS", None)
  env.pop("MPLBACKEND", None)  # the kernel's inline backend, so that figures are cell outputs
  env.setdefault("PYDEVD_DISABLE_FILE_VALIDATION", "1")
  return env


@pytest.fixture(scope="module")
def kernel_dirs(tmp_path_factory):
  """A kernelspec that starts ipykernel on this very interpreter (not whatever `python3` is on PATH)."""
  root = tmp_path_factory.mktemp("kernels")
  spec_dir = root / KERNEL_NAME
  spec_dir.mkdir()
  (spec_dir / "kernel.json").write_text(json.dumps({
      "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}",
               "--InteractiveShell.colors=nocolor"],
      "display_name": "diffusion_jax (test)",
      "language": "python",
  }))
  return str(root)


def time_limit(nb) -> float:
  if os.environ.get("NOTEBOOK_TIME_LIMIT_S"):
    return float(os.environ["NOTEBOOK_TIME_LIMIT_S"])
  return float(nb.metadata.get("diffusion_jax", {}).get("test_time_limit_s", TIME_LIMIT_S))


def run_notebook(path: str, kernel_dirs: str, cwd: str = REPO, time_limit_s: Optional[float] = None,
                 env: Optional[dict] = None):
  """Executes `path` cell by cell; returns (wall time, the executed notebook). `env`: extra kernel environment
  variables. Raises nbclient's CellExecutionError (whose message holds the failing cell's source and traceback)
  or pytest.fail on the time limit."""
  from jupyter_client.kernelspec import KernelSpecManager
  from jupyter_client.manager import AsyncKernelManager

  nb = nbformat.read(path, as_version=4)
  time_limit_s = time_limit(nb) if time_limit_s is None else time_limit_s
  ksm = KernelSpecManager(kernel_dirs=[kernel_dirs], ensure_native_kernel=False)
  # The async manager (nbclient's default): with a blocking one, waiting for output blocks the event loop and
  # the per-cell timeout never fires.
  km = AsyncKernelManager(kernel_name=KERNEL_NAME, kernel_spec_manager=ksm)
  client = nbclient.NotebookClient(
      nb, km=km, kernel_name=KERNEL_NAME, timeout=int(time_limit_s), allow_errors=False,
      shutdown_kernel="immediate",  # a kernel stopped at the time limit is killed, not waited for
      resources={"metadata": {"path": cwd}})
  start = time.monotonic()
  try:
    with client.setup_kernel(env={**_kernel_env(), **(env or {})}, cwd=cwd):
      for index, cell in enumerate(nb.cells):
        left = time_limit_s - (time.monotonic() - start)
        if left <= 0:
          pytest.fail(f"{os.path.basename(path)}: over its {time_limit_s:.0f} s limit before cell {index}")
        client.timeout = max(1, int(left))
        try:
          client.execute_cell(cell, index)
        except nbclient.exceptions.CellTimeoutError:
          pytest.fail(f"{os.path.basename(path)}: cell {index} ran past the notebook's {time_limit_s:.0f} s "
                      f"limit:\n{cell.source}")
      cpu = _kernel_cpu_seconds(client.km)
  finally:
    if os.environ.get("NOTEBOOK_EXECUTED_DIR") and path.startswith(REPO):  # keep executed copies for a look
      os.makedirs(os.environ["NOTEBOOK_EXECUTED_DIR"], exist_ok=True)
      nbformat.write(nb, os.path.join(os.environ["NOTEBOOK_EXECUTED_DIR"], os.path.basename(path)))
  seconds = time.monotonic() - start
  print(f"{os.path.basename(path)}: {seconds:.1f} s wall, {cpu:.1f} s kernel CPU, load {_load()}")
  return seconds, nb


def _kernel_cpu_seconds(km) -> float:
  """User + system CPU seconds of the kernel process so far (Linux /proc; nan elsewhere). On a loaded machine
  this, not the wall time, says what the notebook costs."""
  try:
    pid = km.provisioner.process.pid
    with open(f"/proc/{pid}/stat") as f:
      fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
  except Exception:  # pylint: disable=broad-except
    return float("nan")


def _load() -> str:
  try:
    return "%.1f" % os.getloadavg()[0]
  except OSError:
    return "n/a"


def test_notebooks_exist():
  assert NOTEBOOKS, "no notebooks/*.ipynb found"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_notebook_structure(path):
  """Colab-ready: cell 0 the "Open in Colab" badge for this very file, cell 1 the install cell that is skipped
  when diffusion_jax is importable; outputs stripped; the notebook reads the tiny-mode variable."""
  name = os.path.basename(path)
  nb = nbformat.read(path, as_version=4)
  nbformat.validate(nb)
  cells = nb.cells
  assert len(cells) >= 3, f"{name}: too few cells"
  assert cells[0].cell_type == "markdown" and COLAB_URL.format(name=name) in cells[0].source, (
      f"{name}: cell 0 must be the Open-in-Colab badge linking {COLAB_URL.format(name=name)}")
  assert cells[1].cell_type == "code" and 'find_spec("diffusion_jax")' in cells[1].source, (
      f"{name}: cell 1 must be the Colab install cell, skipped when diffusion_jax is importable")
  assert any(TINY_ENV in c.source for c in cells if c.cell_type == "code"), f"{name}: never reads {TINY_ENV}"
  for i, c in enumerate(cells):
    if c.cell_type == "code":
      assert not c.get("outputs") and c.get("execution_count") is None, (
          f"{name}: cell {i} has outputs; strip them before committing (see docs/notebooks.md)")


# Finished stages a notebook may start from under the suite ({"diffusion_jax": {"test_stages": [...]}} in its
# metadata): name -> the session fixture of tests/conftest.py that trains it once for the whole suite. The
# notebook gets a fresh work dir holding a copy (DIFFUSION_JAX_NOTEBOOK_WORKDIR), so it trains only what is its
# own; on Colab it trains everything.
TEST_STAGES = {"sd_shapes_tiny": "sd_shapes_tiny_stage"}
WORKDIR_ENV = "DIFFUSION_JAX_NOTEBOOK_WORKDIR"
REUSED = "reusing the finished run"  # what the stage runner prints when it reuses a stage


def _outputs_text(nb) -> str:
  return "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
                   if o.get("output_type") == "stream")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_notebook_runs(path, kernel_dirs, request, tmp_path):
  wanted = nbformat.read(path, as_version=4).metadata.get("diffusion_jax", {}).get("test_stages", [])
  env = {}
  if wanted:
    unknown = sorted(set(wanted) - set(TEST_STAGES))
    assert not unknown, f"{os.path.basename(path)}: unknown test_stages {unknown}; known: {sorted(TEST_STAGES)}"
    workdir = tmp_path / "workdir"
    workdir.mkdir()
    for name in wanted:
      request.getfixturevalue(TEST_STAGES[name]).copy_to(str(workdir))
    env[WORKDIR_ENV] = str(workdir)
  try:
    _, nb = run_notebook(path, kernel_dirs, env=env)
  except nbclient.exceptions.CellExecutionError as err:
    message = f"{os.path.basename(path)} failed:\n{err}"
  else:
    message = None
    if wanted:  # the copied stages were reused, not trained again (a changed config would retrain silently)
      assert _outputs_text(nb).count(REUSED) >= len(wanted), (
          f"{os.path.basename(path)}: the stage runner did not reuse the given stages {wanted}; does the notebook "
          f"read {WORKDIR_ENV}, and is its stage config the suite's?")
  if message:
    pytest.fail(message, pytrace=False)


def test_runner_reports_the_failing_cell(tmp_path, kernel_dirs):
  """The runner itself can fail: a notebook whose second cell raises fails with that cell shown."""
  nb = nbformat.v4.new_notebook()
  nb.cells = [nbformat.v4.new_code_cell("import os\nassert os.environ['%s'] == '1'" % TINY_ENV),
              nbformat.v4.new_code_cell("x = 1\nraise ValueError('broken cell ' + str(x))")]
  path = tmp_path / "broken.ipynb"
  nbformat.write(nb, str(path))
  with pytest.raises(nbclient.exceptions.CellExecutionError) as err:
    run_notebook(str(path), kernel_dirs, cwd=str(tmp_path), time_limit_s=60)
  assert "broken cell 1" in str(err.value) and "raise ValueError" in str(err.value)


def test_runner_enforces_the_time_limit(tmp_path, kernel_dirs):
  """A cell still running at the notebook's limit is stopped and fails the test."""
  nb = nbformat.v4.new_notebook()
  nb.cells = [nbformat.v4.new_code_cell("import time\ntime.sleep(60)")]
  path = tmp_path / "slow.ipynb"
  nbformat.write(nb, str(path))
  start = time.monotonic()
  with pytest.raises(pytest.fail.Exception, match="limit"):
    run_notebook(str(path), kernel_dirs, cwd=str(tmp_path), time_limit_s=8)
  assert time.monotonic() - start < 40
