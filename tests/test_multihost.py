"""Multi-host correctness on one machine: 2 JAX processes x 2 fake CPU devices vs 1 process.

The two processes run the real entry point (`uae_jax.main.main` with `--multihost`) against a
local coordinator, so per-host data shards, global batch assembly, the start-of-stage eval, the
image grid, Orbax checkpoint writes from every host and process-0-only metrics all run as on a
pod. The reference is a single process on a mesh of the same shape fed the same global batches
(the two per-process streams concatenated in process order, which is how
`make_array_from_process_local_data` lays them out on a mesh built from `jax.devices()`).
"""
import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import stage1
from uae_jax import train
from uae_jax.data import pipeline

from test_train import apply_overrides  # dotted-key config overrides

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 3
LOCAL_DEVICES = 2
# jax.distributed.initialize() only auto-detects real clusters (TPU, SLURM, MPI, k8s); locally the
# coordinator, process count and id are bound here, and main's own --multihost call uses them.
DRIVER = """
import functools, os, sys
sys.path.insert(0, os.getcwd())
import jax
pid, nproc, port = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
jax.distributed.initialize = functools.partial(
    jax.distributed.initialize, coordinator_address=f"localhost:{port}", num_processes=nproc,
    process_id=pid)
from absl import app
from uae_jax import main
app.run(main.main, argv=["uae_jax.main"] + sys.argv[4:])
"""
# Overrides shared by both runs. lr 1e-4: see test_train's sharded-vs-single test (Adam's first
# updates are ~lr * sign(g), which amplifies reduction-order noise).
# Evaluation every STEPS steps: the start-of-stage eval and the final one, both from every host.
OVERRIDES = {"optim.peak_lr": 1e-4, "log_every_steps": 1, "ckpt.every_steps": STEPS,
             "eval_every_steps": STEPS, "image_every_steps": STEPS}


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _config():
  """The tiny stage-1 config both runs use."""
  return apply_overrides(stage1.get_config(f"tiny,steps={STEPS}"), OVERRIDES)


def _start_two_processes(workdir):
  """Starts both processes of the pod simulation; returns (Popen, log file) pairs."""
  port = _free_port()
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={LOCAL_DEVICES}")
  args = [f"--config=configs/stage1.py:tiny,steps={STEPS}", f"--workdir={workdir}", "--multihost"]
  args += [f"--config.{k}={v}" for k, v in OVERRIDES.items()]
  # Logs go to files: an unread pipe could fill up and stall a process inside a collective.
  logs = [open(f"{workdir}.{i}.log", "w+") for i in range(2)]
  return [(subprocess.Popen([sys.executable, "-c", DRIVER, str(i), "2", str(port), *args],
                            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT), log)
          for i, log in enumerate(logs)]


def _wait(procs):
  """(returncode, log text) of each process; kills them all if one hangs."""
  out = []
  try:
    for p, log in procs:
      p.wait(timeout=900)
      log.seek(0)
      out.append((p.returncode, log.read()))
  finally:
    for p, log in procs:
      if p.poll() is None:
        p.kill()
      log.close()
  return out


def _single_process_losses(workdir):
  """Same config on one process and a 1x4 mesh, fed both hosts' batches concatenated."""
  config = _config()
  tr = train.Trainer(config, str(workdir), devices=jax.devices()[:2 * LOCAL_DEVICES])
  hosts = [pipeline.make_train_iterator(config.input, process_index=i, process_count=2)
           for i in range(2)]
  state, _ = tr.initial_state(hosts[0])
  losses = []
  for _ in range(STEPS):
    parts = [next(h) for h in hosts]
    batch = {k: np.concatenate([p[k] for p in parts]) for k in tr.batch_keys}
    state, m = tr.train_step(state, pipeline.to_global_array(batch, tr.ctx.batch_sh),
                             tr.frozen)
    losses.append(jax.device_get(m))
  tr.close()
  return losses


@pytest.mark.slow  # ~1.5 min: three trainer processes; `make test-slow`
def test_two_processes_match_one_process(tmp_path):
  workdir = tmp_path / "pod"
  procs = _start_two_processes(workdir)
  try:  # the reference runs while the pod processes start up (this machine has 2 cores)
    single = _single_process_losses(tmp_path / "single")
  finally:
    results = _wait(procs)
  for i, (code, err) in enumerate(results):
    assert code == 0, f"process {i} failed:\n{err[-4000:]}"
  assert "process 1/2, 4 devices" in results[1][1]

  # Metrics from process 0 only: one row per step, not two.
  rows = [json.loads(l) for l in open(workdir / "metrics.jsonl")]
  train_rows = [r for r in rows if "loss" in r]
  assert [r["step"] for r in train_rows] == list(range(1, STEPS + 1))
  # The start-of-stage and the final eval, each written once (eval_every_steps=0 would turn both
  # off, the start-of-stage one included).
  assert [r["step"] for r in rows if "eval/psnr" in r] == [0, STEPS]
  assert (workdir / "images" / "recon_ema_latest.png").exists()
  assert json.load(open(workdir / "summary.json"))["final_step"] == STEPS
  # Orbax: every host wrote its shards and its own data-iterator state.
  ckpt = workdir / "checkpoints" / str(STEPS)
  assert sorted(os.listdir(ckpt / "data_iter")) == [
      "commit_success.txt", "process_0-of-2.json", "process_1-of-2.json"]
  assert {"ocdbt.process_0", "ocdbt.process_1"} <= set(os.listdir(ckpt / "state"))

  for step, (a, b) in enumerate(zip(train_rows, single)):
    for k in ("loss", "l1", "lpips"):
      assert abs(a[k] - float(b[k])) <= 1e-4 * abs(float(b[k])), (step, k, a[k], b[k])
