"""Two processes x 2 CPU devices through jax.distributed (launch/local_multiprocess.sh): each host reads
its own data shard, both see the same global loss, and the checkpoint holds one iterator state per host."""

import json
import os
import socket
import subprocess
import sys

import toy_experiment as toy


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_two_process_run(tmp_path):
  w = str(tmp_path / "mh")
  env = {**toy.subprocess_env(2), "PYTHON": sys.executable, "PORT": str(_free_port())}
  r = subprocess.run(["bash", os.path.join(toy.REPO, "launch", "local_multiprocess.sh"), toy.CONFIG, w,
                      "--config.train.num_steps=3", "--config.train.ckpt_every=3"],
                     env=env, capture_output=True, text=True, timeout=300, cwd=toy.REPO)
  logs = "".join(open(f"{w}.proc{i}.log").read()[-2000:] for i in range(2) if os.path.exists(f"{w}.proc{i}.log"))
  assert r.returncode == 0, r.stdout + logs
  info = json.load(open(os.path.join(w, "run_info.json")))
  assert info["num_processes"] == 2 and info["num_devices"] == 4
  rows = toy.read_metrics(w)
  assert sorted(rows) == [1, 2, 3]
  assert sorted(os.listdir(os.path.join(w, "checkpoints", "3", "data"))) == [
      "commit_success.txt", "process_0-of-2.json", "process_1-of-2.json"]
  # both hosts computed the same global loss (only host 0 writes metrics; host 1 logs to its console).
  done = [l for i in range(2) for l in open(f"{w}.proc{i}.log") if "Done (train)" in l]
  losses = {json.loads(l.split("Done (train): ", 1)[1])["loss"] for l in done}
  assert len(done) == 2 and len(losses) == 1
