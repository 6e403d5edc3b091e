"""Both launchers' dry runs print complete, correct commands / job specs and contact nothing."""
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TPU_VM = os.path.join(REPO, "launch", "tpu_vm.sh")
XM = os.path.join(REPO, "launch", "xm_launch.py")
TRAIN = ("python -m uae_jax.main --config=configs/stage1.py "
         "--workdir=gs://my-bucket/uae/stage1 --multihost")


def _tpu_vm(*args, check=True):
  # No gcloud on PATH: a dry run must not need (or call) it.
  env = dict(os.environ, PATH="/usr/bin:/bin")
  r = subprocess.run(["bash", TPU_VM, *args], capture_output=True, text=True, env=env,
                     timeout=60)
  if check:
    assert r.returncode == 0, r.stderr
  return r


def _two_host(*extra):
  return _tpu_vm("--name", "uae-v4", "--zone", "us-central2-b", "--accelerator-type", "v4-16",
                 "--project", "my-proj", "--config", "configs/stage1.py",
                 "--workdir", "gs://my-bucket/uae/stage1", "--dry-run", *extra)


def test_tpu_vm_dry_run_two_hosts():
  r = _two_host("--spot", "--config.optim.peak_lr=1e-4", "--config.input.num_workers=8")
  lines = [l for l in r.stdout.splitlines() if l and not l.startswith("#")]
  gcloud = [l for l in lines if l.startswith("gcloud ")]
  loc = "--zone=us-central2-b --project=my-proj"
  assert gcloud[0] == f"gcloud compute tpus tpu-vm describe uae-v4 {loc}"
  assert gcloud[1] == (f"gcloud compute tpus tpu-vm create uae-v4 {loc} --accelerator-type=v4-16 "
                       "--version=tpu-ubuntu2204-base --spot")
  # Copy, install and run reach every worker.
  per_worker = [l for l in gcloud if " scp " in l or " ssh " in l]
  assert len(per_worker) == 4 and all("--worker=all" in l and loc in l for l in per_worker)
  assert " scp " in per_worker[0] and "uae-v4:~/uae_jax.tgz" in per_worker[0]
  install = per_worker[2]
  assert "python3 -m venv .venv" in install and "pip install -q -r requirements.txt" in install
  assert "gcsfs==" in install and "jax[tpu]==0.10.2" in install
  run = per_worker[3]
  assert f".venv/bin/{TRAIN} --config.optim.peak_lr=1e-4 --config.input.num_workers=8" in run
  assert run.startswith("gcloud compute tpus tpu-vm ssh uae-v4 ") and "tee ~/uae_jax_run.log" in run
  # The local tarball leaves the venv and git history behind.
  tar = [l for l in lines if l.startswith("tar ")]
  assert len(tar) == 1 and "--exclude=./.venv" in tar[0] and "--exclude=./.git" in tar[0]


def test_tpu_vm_dry_run_repo_clone_and_detach():
  r = _tpu_vm("--name=uae-v5p", "--zone=us-east5-a", "--accelerator-type=v5p-256",
              "--config=configs/stage3.py", "--workdir=gs://b/uae/s3",
              "--repo", "https://github.com/example/uae_jax.git", "--ref", "v1.0",
              "--detach", "--skip-install", "--dry-run")
  out = r.stdout
  assert "--version=v2-alpha-tpuv5" in out and "--project" not in out
  assert "git clone --quiet https://github.com/example/uae_jax.git ~/uae_jax" in out
  assert "checkout --quiet v1.0" in out and "scp" not in out and "pip install" not in out
  assert ("nohup .venv/bin/python -m uae_jax.main --config=configs/stage3.py "
          "--workdir=gs://b/uae/s3 --multihost > ~/uae_jax_run.log") in out
  assert "--worker=0 '--command=tail -n +1 -F ~/uae_jax_run.log'" in out


@pytest.mark.parametrize("args,message", [
    (("--name", "x", "--zone", "z", "--dry-run"), "missing --accelerator-type --config --workdir"),
    (("--name", "x", "--zone", "z", "--accelerator-type", "v4-8", "--config", "c.py",
      "--workdir", "/tmp/local", "--dry-run"), "must be a gs:// path"),
    (("--bogus",), "unknown argument"),
])
def test_tpu_vm_rejects_bad_arguments(args, message):
  r = _tpu_vm(*args, check=False)
  assert r.returncode == 2 and message in r.stderr and not r.stdout


def test_tpu_vm_help():
  r = _tpu_vm("--help")
  assert "--accelerator-type" in r.stdout and "--dry-run" in r.stdout


def _xm(*args, check=True):
  r = subprocess.run([sys.executable, XM, *args], capture_output=True, text=True, timeout=120,
                     cwd=REPO)
  if check:
    assert r.returncode == 0, r.stderr
  return r


def test_xm_dry_run_one_job_per_sweep_point():
  r = _xm("--config=configs/stage2.py", "--workdir=gs://b/sweep",
          "--sweep=optim.peak_lr=1e-4,2e-4;loss.semantic=0.5,1.0",
          "--set=train.num_epochs=8", "--tpu_type=v3", "--tpu_topology=4x4", "--dry_run")
  specs = [json.loads(l) for l in r.stdout.splitlines()]
  assert len(specs) == 4
  got = set()
  for s in specs:
    assert s["module"] == "uae_jax.main"
    assert s["args"][0] == "--config=configs/stage2.py"
    assert s["args"][1] == f"--workdir={s['workdir']}" and s["workdir"].startswith("gs://b/sweep/")
    assert "--multihost" in s["args"] and "--config.train.num_epochs=8" in s["args"]
    assert s["requirements"]["xm"] == "xm.JobRequirements(tpu_v3='4x4')"
    assert s["requirements"]["chips"] == 16 and s["requirements"]["hosts"] == 4
    assert s["env"]["PYTHONUNBUFFERED"] == "1"
    lr = [a for a in s["args"] if a.startswith("--config.optim.peak_lr=")]
    sem = [a for a in s["args"] if a.startswith("--config.loss.semantic=")]
    assert len(lr) == len(sem) == 1
    got.add((lr[0].split("=")[1], sem[0].split("=")[1]))
  assert got == {("1e-4", "0.5"), ("1e-4", "1.0"), ("2e-4", "0.5"), ("2e-4", "1.0")}
  assert len({s["workdir"] for s in specs}) == 4


def test_xm_dry_run_without_sweep_and_newer_tpus():
  # Single host (v3-8 = 2x2 chips): no --multihost. v5p is printed, flagged as not XM-launchable.
  (s,) = [json.loads(l) for l in _xm("--config=configs/stage1.py", "--workdir=gs://b/one",
                                     "--tpu_type=v3", "--tpu_topology=2x2", "--dry_run").stdout.splitlines()]
  assert s["args"] == ["--config=configs/stage1.py", "--workdir=gs://b/one/0"]
  (s,) = [json.loads(l) for l in _xm("--config=configs/stage1.py", "--workdir=gs://b/one",
                                     "--tpu_type=v5p", "--tpu_topology=4x4x4", "--dry_run").stdout.splitlines()]
  assert s["requirements"]["xm_supported"] is False and s["requirements"]["chips"] == 64
  assert "--multihost" in s["args"]
  # A real launch on v5p refuses with the issue-#63 pointer (before importing xmanager).
  r = _xm("--config=configs/stage1.py", "--workdir=gs://b/one", "--tpu_type=v5p", check=False)
  assert r.returncode != 0 and "issue #63" in r.stderr and "tpu_vm.sh" in r.stderr


def test_xm_bad_sweep_is_a_usage_error():
  r = _xm("--config=c.py", "--workdir=gs://b", "--sweep=optim.peak_lr", "--dry_run", check=False)
  assert r.returncode != 0 and "KEY=V1,V2" in r.stderr
