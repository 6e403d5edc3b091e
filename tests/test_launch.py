"""Launchers: commands in their documented gcloud / XManager forms, and the decisions a real launch
takes (preempted or queued capacity, stale trainers, fresh code, Python >= 3.11, logs of every
worker), exercised against a stubbed `gcloud` that records every call and can play the workers."""
import hashlib
import importlib.machinery
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TPU_VM = os.path.join(REPO, "launch", "tpu_vm.sh")
SETUP = os.path.join(REPO, "launch", "worker_setup.sh")
XM = os.path.join(REPO, "launch", "xm_launch.py")
TRAIN = ("python -m uae_jax.main --config=configs/stage1.py "
         "--workdir=gs://my-bucket/uae/stage1 --multihost")

# Flags of each gcloud command as listed in its reference synopsis (cloud.google.com/sdk/gcloud/
# reference/compute/tpus/...), plus the gcloud-wide --project / --format / --quiet.
GLOBAL = {"--project", "--format", "--quiet"}
DOCUMENTED = {
    ("tpu-vm", "create"): {"--zone", "--version", "--accelerator-type", "--spot", "--reserved",
                           "--preemptible", "--internal-ips", "--network", "--subnetwork",
                           "--service-account", "--metadata"},
    ("queued-resources", "create"): {"--zone", "--node-id", "--runtime-version",
                                     "--accelerator-type", "--spot", "--reserved",
                                     "--internal-ips", "--network", "--subnetwork",
                                     "--service-account", "--metadata"},
    ("tpu-vm", "describe"): {"--zone"}, ("queued-resources", "describe"): {"--zone"},
    ("tpu-vm", "delete"): {"--zone", "--async"},
    ("queued-resources", "delete"): {"--zone", "--async", "--force"},
    ("tpu-vm", "start"): {"--zone", "--async"},
    ("tpu-vm", "ssh"): {"--zone", "--worker", "--command", "--internal-ip"},
    ("tpu-vm", "scp"): {"--zone", "--worker", "--internal-ip"},
}

STUB = r'''#!{python}
"""Stub gcloud: logs argv; answers describe from queues; optionally plays the workers."""
import json, os, subprocess, sys
args = sys.argv[1:]
with open(os.environ["STUB_LOG"], "a") as f:
  f.write(json.dumps(args) + "\n")
with open(os.environ["STUB_STATE"]) as f:
  state = json.load(f)
def pop(key):
  queue = state.get(key) or []
  value = queue.pop(0) if queue else "NOT_FOUND"
  with open(os.environ["STUB_STATE"], "w") as f:
    json.dump(state, f)
  return value
if "describe" in args:
  value = pop("qr" if "queued-resources" in args else "tpu")
  if value == "NOT_FOUND":
    sys.exit("ERROR: (gcloud) NOT_FOUND: Resource was not found")
  print(value)
  sys.exit(0)
rc = 0
for k, home in enumerate(state.get("workers") or []):  # ssh/scp on each fake worker in turn
  if "scp" in args:
    os.makedirs(home, exist_ok=True)
    subprocess.check_call(["cp", args[4], args[5].split(":", 1)[1].replace("~", home, 1)])
  elif "ssh" in args:
    command = [a for a in args if a.startswith("--command=")][0][len("--command="):]
    env = dict(os.environ, HOME=home, FAKE_HOST=f"w{{k}}")
    rc = max(rc, subprocess.call(["bash", "-c", command], cwd=home, env=env))
sys.exit(rc)
'''


def _stub_bin(tmp_path, state):
  """A bin dir with the stub gcloud and a `hostname` that names the fake worker."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  (bin_dir / "gcloud").write_text(STUB.format(python=sys.executable))
  (bin_dir / "hostname").write_text("#!/bin/bash\necho \"${FAKE_HOST:-local}\"\n")
  for f in bin_dir.iterdir():
    f.chmod(0o755)
  (tmp_path / "state.json").write_text(json.dumps(state))
  return bin_dir


def _launch(tmp_path, state, *args):
  """Runs tpu_vm.sh (not a dry run) against the stub; returns (result, recorded gcloud calls)."""
  bin_dir = _stub_bin(tmp_path, state)
  log = tmp_path / "calls.jsonl"
  env = dict(os.environ, PATH=f"{bin_dir}:/usr/bin:/bin", STUB_LOG=str(log), TMPDIR=str(tmp_path),
             STUB_STATE=str(tmp_path / "state.json"))
  r = subprocess.run(["bash", TPU_VM, *args], capture_output=True, text=True, env=env, timeout=120)
  calls = [json.loads(l) for l in log.read_text().splitlines()] if log.exists() else []
  for call in calls:
    _assert_documented(call)
  return r, calls


def _assert_documented(call):
  """Every gcloud call uses a documented command and only its documented flags."""
  assert call[:2] == ["compute", "tpus"], call
  group, verb = call[2], call[3]
  flags = {a.split("=", 1)[0] for a in call if a.startswith("--")}
  assert (group, verb) in DOCUMENTED, call
  assert flags <= DOCUMENTED[(group, verb)] | GLOBAL, (call, flags - DOCUMENTED[(group, verb)])


def _verbs(calls):
  return [(c[2], c[3]) for c in calls]


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
  r = _two_host("--spot", "--python", "/opt/py311/bin/python3", "--config.optim.peak_lr=1e-4",
                "--config.input.num_workers=8")
  lines = [l for l in r.stdout.splitlines() if l and not l.startswith("#")]
  gcloud = [l for l in lines if l.startswith("gcloud ")]
  loc = "--zone=us-central2-b --project=my-proj"
  assert gcloud[0] == (f"gcloud compute tpus tpu-vm describe uae-v4 {loc} "
                       "'--format=value(state,acceleratorType)'")
  assert gcloud[1] == f"gcloud compute tpus tpu-vm delete uae-v4 {loc} --quiet"
  assert gcloud[2] == (f"gcloud compute tpus tpu-vm create uae-v4 {loc} "
                       "--version=tpu-ubuntu2204-base --accelerator-type=v4-16 --spot")
  # Stop, copy, unpack, install, run and (on failure) tail reach every worker.
  per_worker = [l for l in gcloud if " scp " in l or " ssh " in l]
  assert len(per_worker) == 6 and all("--worker=all" in l and loc in l for l in per_worker)
  stop, scp, unpack, install, run, tail = per_worker
  assert "uae_jax_run.pid" in stop and "kill" in stop
  assert " scp " in scp and "uae-v4:~/uae_jax.tgz" in scp
  assert "tar -xzf ~/uae_jax.tgz -C ~/uae_jax.new" in unpack and "mv ~/uae_jax.new ~/uae_jax" in unpack
  assert "UAE_PYTHON=/opt/py311/bin/python3 bash launch/worker_setup.sh ~/uae_jax_venv" in install
  assert "jax[tpu]==0.10.2" in install and "gcsfs==" in install
  assert f"~/uae_jax_venv/bin/{TRAIN} --config.optim.peak_lr=1e-4 --config.input.num_workers=8" in run
  assert "echo $$ > ~/uae_jax_run.pid" in run and "tee ~/uae_jax_run.log" in run
  assert "tail -n 50 ~/uae_jax_run.log" in tail
  # The local tarball leaves the venv and git history behind.
  tar = [l for l in lines if l.startswith("tar ")]
  assert len(tar) == 1 and "--exclude=./.venv" in tar[0] and "--exclude=./.git" in tar[0]


def test_tpu_vm_dry_run_repo_clone_detach_and_v5e_name():
  r = _tpu_vm("--name=uae-v5e", "--zone=us-west4-a", "--accelerator-type=v5e-16",
              "--config=configs/stage3.py", "--workdir=gs://b/uae/s3",
              "--repo", "https://github.com/example/uae_jax.git", "--ref", "v1.0",
              "--detach", "--skip-install", "--dry-run")
  out = r.stdout
  assert "--accelerator-type=v5litepod-16" in out and "v5e-16" not in out
  assert "--version=v2-alpha-tpuv5-lite" in out and "--project" not in out
  assert "git clone --quiet https://github.com/example/uae_jax.git ~/uae_jax.new" in out
  assert "checkout --quiet v1.0" in out and "scp" not in out and "worker_setup" not in out
  assert "nohup bash -c" in out and "exec ~/uae_jax_venv/bin/python -m uae_jax.main" in out
  assert "> ~/uae_jax_run.log 2>&1" in out
  # Logs of all workers, each line prefixed with its host.
  assert "--worker=all '--command=tail -n +1 -F ~/uae_jax_run.log | sed -u" in out


@pytest.mark.parametrize("args,message", [
    (("--name", "x", "--zone", "z", "--dry-run"), "missing --accelerator-type --config --workdir"),
    (("--name", "x", "--zone", "z", "--accelerator-type", "v4-8", "--config", "c.py",
      "--workdir", "/tmp/local", "--dry-run"), "must be a gs:// path"),
    (("--name", "x", "--zone", "z", "--accelerator-type", "v4-8", "--config", "c.py",
      "--workdir", "gs://b", "--spot", "--reserved", "--dry-run"), "exclude each other"),
    (("--bogus",), "unknown argument"),
])
def test_tpu_vm_rejects_bad_arguments(args, message):
  r = _tpu_vm(*args, check=False)
  assert r.returncode == 2 and message in r.stderr and not r.stdout


def test_tpu_vm_help():
  r = _tpu_vm("--help")
  assert "--accelerator-type" in r.stdout and "--queued" in r.stdout and "--dry-run" in r.stdout


V5P = ("--name", "uae-v5p", "--zone", "us-east5-a", "--accelerator-type", "v5p-256",
       "--config", "configs/stage3.py", "--workdir", "gs://b/s3", "--skip-install",
       "--poll-seconds", "0")


def test_preempted_tpu_is_deleted_and_recreated(tmp_path):
  r, calls = _launch(tmp_path, {"tpu": ["PREEMPTED\tv5p-256", "READY\tv5p-256"]}, *V5P, "--spot")
  assert r.returncode == 0, r.stderr
  assert "is PREEMPTED: deleting and recreating" in r.stderr
  assert _verbs(calls)[:4] == [("tpu-vm", "describe"), ("tpu-vm", "delete"),
                               ("tpu-vm", "create"), ("tpu-vm", "describe")]
  assert calls[1] == ["compute", "tpus", "tpu-vm", "delete", "uae-v5p", "--zone=us-east5-a",
                      "--quiet"]
  assert calls[2] == ["compute", "tpus", "tpu-vm", "create", "uae-v5p", "--zone=us-east5-a",
                      "--version=v2-alpha-tpuv5", "--accelerator-type=v5p-256", "--spot"]
  assert _verbs(calls)[4:] == [("tpu-vm", "ssh"), ("tpu-vm", "scp"), ("tpu-vm", "ssh"),
                               ("tpu-vm", "ssh")]


def test_existing_tpu_of_another_type_stops_the_launch(tmp_path):
  r, calls = _launch(tmp_path, {"tpu": ["READY\tv4-8"]}, *V5P)
  assert r.returncode == 2 and "already exists as v4-8" in r.stderr and "delete" in r.stderr
  assert _verbs(calls) == [("tpu-vm", "describe")]


def test_queued_resource_v6e_256_waits_for_active(tmp_path):
  state = {"qr": ["NOT_FOUND", "WAITING_FOR_RESOURCES", "PROVISIONING", "ACTIVE"],
           "tpu": ["READY\tv6e-256"]}
  r, calls = _launch(
      tmp_path, state, "--name", "uae-v6e", "--zone", "us-east5-b", "--project", "proj",
      "--accelerator-type", "v6e-256", "--config", "configs/stage3.py", "--workdir", "gs://b/s3",
      "--queued", "--reserved", "--internal-ips", "--network", "net", "--subnetwork", "sub",
      "--service-account", "trainer@proj.iam.gserviceaccount.com", "--metadata", "team=uae",
      "--skip-install", "--poll-seconds", "0")
  assert r.returncode == 0, r.stderr
  assert _verbs(calls)[:6] == [("queued-resources", "describe"), ("queued-resources", "create"),
                               ("queued-resources", "describe"), ("queued-resources", "describe"),
                               ("queued-resources", "describe"), ("tpu-vm", "describe")]
  assert calls[1] == [
      "compute", "tpus", "queued-resources", "create", "uae-v6e-qr", "--node-id=uae-v6e",
      "--zone=us-east5-b", "--project=proj", "--runtime-version=v2-alpha-tpuv6e",
      "--accelerator-type=v6e-256", "--reserved", "--internal-ips", "--network=net",
      "--subnetwork=sub", "--service-account=trainer@proj.iam.gserviceaccount.com",
      "--metadata=team=uae"]
  for state_name in ("WAITING_FOR_RESOURCES", "PROVISIONING", "ACTIVE"):
    assert f"queued resource uae-v6e-qr: {state_name}" in r.stderr
  # ssh/scp reach the workers over their internal IPs (singular flag), all workers at once.
  remote = [c for c in calls if c[3] in ("ssh", "scp")]
  assert remote and all("--internal-ip" in c and "--worker=all" in c for c in remote)
  assert not any("--internal-ips" in c for c in remote)


def test_suspended_queued_resource_is_recreated(tmp_path):
  r, calls = _launch(tmp_path, {"qr": ["SUSPENDED", "ACTIVE"], "tpu": ["READY\tv6e-256"]},
                     "--name", "uae-v6e", "--zone", "us-east5-b", "--accelerator-type",
                     "v6e-256", "--config", "c.py", "--workdir", "gs://b", "--queued", "--spot",
                     "--skip-install", "--poll-seconds", "0")
  assert r.returncode == 0, r.stderr
  assert _verbs(calls)[:4] == [("queued-resources", "describe"), ("queued-resources", "delete"),
                               ("queued-resources", "create"), ("queued-resources", "describe")]
  assert "--force" in calls[1] and "--spot" in calls[2]


def test_reuse_stops_stale_trainer_unpacks_fresh_and_shows_every_worker(tmp_path):
  homes = [tmp_path / "w0", tmp_path / "w1"]
  for k, home in enumerate(homes):
    venv_bin = home / "uae_jax_venv" / "bin"
    venv_bin.mkdir(parents=True)
    # The "trainer": prints on every worker; worker 1 crashes.
    (venv_bin / "python").write_text(textwrap.dedent(f"""\
        #!/bin/bash
        echo "trainer on $(hostname) in $PWD: $*"
        {'echo "Traceback: boom on w1"; exit 1' if k == 1 else 'exit 0'}
        """))
    (venv_bin / "python").chmod(0o755)
    (home / "uae_jax").mkdir()
    (home / "uae_jax" / "stale_module.py").write_text("left over\n")
  # A trainer from an earlier launch still running on worker 0 (its cmdline names uae_jax.main).
  stale = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", "uae_jax.main"])
  (homes[0] / "uae_jax_run.pid").write_text(f"{stale.pid}\n")
  try:
    r, calls = _launch(tmp_path, {"tpu": ["READY\tv4-16"], "workers": [str(h) for h in homes]},
                       "--name", "uae-v4", "--zone", "us-central2-b", "--accelerator-type",
                       "v4-16", "--config", "configs/stage1.py", "--workdir", "gs://b/s1",
                       "--skip-install", "--tail-lines", "5")
    assert stale.wait(timeout=10) == -15  # stopped with SIGTERM
  finally:
    if stale.poll() is None:
      stale.kill()
  assert f"w0: stopping previous trainer {stale.pid}" in r.stdout
  # Fresh tree: the old file is gone, the new code is there, no tarball left behind.
  for home in homes:
    assert not (home / "uae_jax" / "stale_module.py").exists()
    assert (home / "uae_jax" / "launch" / "tpu_vm.sh").exists()
    assert not (home / "uae_jax.tgz").exists() and not (home / "uae_jax.new").exists()
    assert (home / "uae_jax_run.pid").read_text().strip().isdigit()  # recorded for next time
  # Every worker's output streams with its host prefix; the crash on w1 fails the launch and the
  # last lines of each worker's log are printed.
  assert "[w0] trainer on w0" in r.stdout and "[w1] Traceback: boom on w1" in r.stdout
  assert r.returncode == 1 and "the run failed on at least one worker" in r.stderr
  assert "==== w0: last 5 lines" in r.stdout and "==== w1: last 5 lines" in r.stdout
  assert f"in {homes[1]}/uae_jax: -m uae_jax.main --config=configs/stage1.py" in r.stdout


# --- worker_setup.sh: interpreter selection with stubbed interpreters -----------------------------

def _script(path, body):
  path.write_text("#!/bin/bash\n" + textwrap.dedent(body))
  path.chmod(0o755)


def _fake_python(path, version, log):
  """An interpreter stub: `-V` reports `version`, `-c` succeeds, `-m venv D` makes a venv of it."""
  _script(path, f"""\
      echo "$(basename $0) $*" >> {log}
      case "$1" in
        -V) echo "Python {version}" ;;
        -c) exit 0 ;;
        -m) if [ "$2" = venv ]; then mkdir -p "$3/bin" && cp "$0" "$3/bin/python"; fi ;;
      esac
      """)


def _setup_env(tmp_path, tools):
  """cwd with requirements.txt, a PATH holding only `tools` + basic utilities, and a HOME."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  for tool in ("sha256sum", "cut", "cat", "rm", "id", "mkdir", "cp", "chmod", "basename"):
    os.symlink(shutil.which(tool, path="/usr/bin:/bin"), bin_dir / tool)
  _script(bin_dir / "hostname", "echo tpu-w-0\n")
  log = tmp_path / "calls.log"
  for name, body in tools.items():
    body(bin_dir / name, log)
  work = tmp_path / "code"
  work.mkdir()
  shutil.copy(os.path.join(REPO, "requirements.txt"), work)
  env = {"PATH": str(bin_dir), "HOME": str(tmp_path / "home")}
  return work, env, log


def _setup(work, env, venv, *pins):
  return subprocess.run(["/bin/bash", SETUP, str(venv), *pins], cwd=work, env=env,
                        capture_output=True, text=True, timeout=60)


PINS = ("jax[tpu]==0.10.2", "gcsfs==2026.10.1")


def test_setup_python310_only_falls_back_to_uv_managed_python(tmp_path):
  def uv(path, log):
    _script(path, f"""\
        echo "uv $*" >> {log}
        if [ "$1" = venv ]; then
          mkdir -p "$5/bin"
          printf '#!/bin/bash\\necho "venv-python $*" >> {log}\\n[ "$1" = -V ] && echo "Python 3.11.9"\\nexit 0\\n' > "$5/bin/python"
          chmod +x "$5/bin/python"
        fi
        """)
  work, env, log = _setup_env(tmp_path, {"python3": lambda p, l: _fake_python(p, "3.10.12", l),
                                         "uv": uv})
  venv = tmp_path / "venv"
  r = _setup(work, env, venv, *PINS)
  assert r.returncode == 0, r.stderr
  calls = log.read_text().splitlines()
  assert "uv python install 3.11" in calls and f"uv venv --seed --python 3.11 {venv}" in calls
  assert not any(c.startswith("python3 -m venv") for c in calls)  # 3.10 was not used
  install = "venv-python -m pip install -q -r requirements.txt jax[tpu]==0.10.2 gcsfs==2026.10.1"
  assert install in calls
  # The stamp names the interpreter, the requirements' hash and the launcher's pins.
  digest = hashlib.sha256((work / "requirements.txt").read_bytes()).hexdigest()
  assert (venv / ".tpu-installed").read_text().strip() == (
      f"Python 3.11.9 requirements={digest} pins=jax[tpu]==0.10.2 gcsfs==2026.10.1")
  # Same stamp: nothing reinstalled. A changed pin: reinstalled.
  assert _setup(work, env, venv, *PINS).returncode == 0
  assert log.read_text().splitlines().count(install) == 1
  assert _setup(work, env, venv, "jax[tpu]==0.10.2", "gcsfs==2026.9.0").returncode == 0
  assert "gcsfs==2026.9.0" in log.read_text()


def test_setup_python310_without_uv_stops_with_clear_message(tmp_path):
  def python3(path, log):
    _script(path, f"""\
        echo "python3 $*" >> {log}
        [ "$1" = -V ] && echo "Python 3.10.12"
        [ "$1" = -m ] && [ "$2" = pip ] && exit 1   # no pip to install uv with
        exit 0
        """)
  work, env, log = _setup_env(tmp_path, {"python3": python3})
  r = _setup(work, env, tmp_path / "venv", *PINS)
  assert r.returncode == 3
  assert "needs Python >= 3.11" in r.stderr and "Python 3.10.12" in r.stderr
  assert "python3.11-venv" in r.stderr and "--python" in r.stderr
  assert not (tmp_path / "venv").exists()


def test_setup_prefers_system_python311_and_rebuilds_an_old_venv(tmp_path):
  work, env, log = _setup_env(tmp_path, {
      "python3": lambda p, l: _fake_python(p, "3.10.12", l),
      "python3.11": lambda p, l: _fake_python(p, "3.11.4", l)})
  venv = tmp_path / "venv"
  (venv / "bin").mkdir(parents=True)
  _fake_python(venv / "bin" / "python", "3.10.12", log)  # left by an older launch
  r = _setup(work, env, venv, *PINS)
  assert r.returncode == 0, r.stderr
  assert "older than 3.11" in r.stderr
  assert f"python3.11 -m venv {venv}" in log.read_text().splitlines()
  assert (venv / ".tpu-installed").read_text().startswith("Python 3.11.4 ")


# --- XManager launcher ----------------------------------------------------------------------------

def _xm(*args, check=True):
  r = subprocess.run([sys.executable, XM, *args], capture_output=True, text=True, timeout=120,
                     cwd=REPO)
  if check:
    assert r.returncode == 0, r.stderr
  return r


def test_xm_dry_run_one_job_per_sweep_point():
  r = _xm("--config=configs/stage2.py", "--workdir=gs://b/sweep",
          "--sweep=optim.peak_lr=1e-4,2e-4;loss.semantic=0.5,1.0",
          "--set=train.num_epochs=8", "--tpu_type=v3", "--tpu_count=8", "--dry_run")
  specs = [json.loads(l) for l in r.stdout.splitlines()]
  assert len(specs) == 4
  got = set()
  for s in specs:
    assert s["module"] == "uae_jax.main"
    assert s["args"][0] == "--config=configs/stage2.py"
    assert s["args"][1] == f"--workdir={s['workdir']}" and s["workdir"].startswith("gs://b/sweep/")
    assert "--multihost" not in s["args"] and "--config.train.num_epochs=8" in s["args"]
    lr = [a for a in s["args"] if a.startswith("--config.optim.peak_lr=")]
    sem = [a for a in s["args"] if a.startswith("--config.loss.semantic=")]
    assert len(lr) == len(sem) == 1
    got.add((lr[0].split("=")[1], sem[0].split("=")[1]))
  assert got == {("1e-4", "0.5"), ("1e-4", "1.0"), ("2e-4", "0.5"), ("2e-4", "1.0")}
  assert len({s["workdir"] for s in specs}) == 4


def test_xm_tpu_v3_8_spec_and_importable_entry_module(tmp_path):
  (s,) = [json.loads(l) for l in _xm("--config=configs/stage1.py", "--workdir=gs://b/one",
                                     "--tpu_type=v3", "--tpu_count=8", "--dry_run").stdout.splitlines()]
  req = s["requirements"]
  assert req["xm"] == "xm.JobRequirements(tpu_v3=8)" and req["xm_supported"] is True
  # What xmanager's Vertex executor makes of it: one cloud-tpu replica with 8 TPU v3 cores.
  assert req["vertex"] == {"machine_type": "cloud-tpu", "accelerator_type": "TPU_V3",
                           "accelerator_count": 8, "replica_count": 1}
  assert req["chips"] == 4 and req["hosts"] == 1
  assert s["args"] == ["--config=configs/stage1.py", "--workdir=gs://b/one/0"]
  steps = s["image"]["docker_instructions"]
  assert any("jax[tpu]==0.10.2" in x and "gcsfs==" in x for x in steps if x.startswith("RUN "))
  # Build the packaged layout (stage the project, then apply the COPY / WORKDIR steps) and check
  # that `python -m uae_jax.main` in the working directory finds the entry module.
  context = tmp_path / "context"
  subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, 'launch'); import "
                  f"xm_launch; xm_launch.stage_project('.', {str(context)!r})"],
                 cwd=REPO, check=True, timeout=60)
  staged = context / s["image"]["project_dir"]
  assert not (staged / ".venv").exists() and not (staged / ".git").exists()
  image = tmp_path / "image"
  workdir = _apply_layout(steps, context, image)
  assert _finds_module(workdir, "uae_jax.main").endswith(os.path.join("uae_jax", "main.py"))
  assert (workdir / "configs" / "stage1.py").exists()  # --config=configs/stage1.py resolves
  # Negative control: the deep-module layout (project under /workdir) does not import.
  deep = ["COPY uae-jax/ /workdir/uae-jax", "WORKDIR /workdir"]
  assert _finds_module(_apply_layout(deep, context, tmp_path / "deep"), "uae_jax.main") is None


def _apply_layout(steps, context, image):
  """Applies the COPY and WORKDIR steps of a Dockerfile to a directory; returns the workdir."""
  workdir = image
  for step in steps:
    op, *rest = step.split()
    if op == "COPY":
      src, dst = context / rest[0], image / rest[1].lstrip("/")
      if src.is_dir():
        shutil.copytree(src, dst, dirs_exist_ok=True)
      else:
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, dst)
    elif op == "WORKDIR":
      workdir = image / rest[0].lstrip("/")
  return workdir


def _finds_module(workdir, dotted):
  """The file `python -m dotted` run in `workdir` would execute (sys.path[0] = cwd), or None."""
  package, module = dotted.rsplit(".", 1)
  spec = importlib.machinery.PathFinder.find_spec(package, [str(workdir)])
  if spec is None or not spec.submodule_search_locations:
    return None
  sub = importlib.machinery.PathFinder.find_spec(dotted, spec.submodule_search_locations)
  return sub.origin if sub else None


def test_xm_refuses_multi_host_and_newer_tpus_with_the_reason():
  # Multi-host v3: the Vertex executor asks for one cloud-tpu machine, i.e. a single host.
  r = _xm("--config=configs/stage1.py", "--workdir=gs://b/one", "--tpu_type=v3",
          "--tpu_count=32", check=False)
  assert r.returncode != 0 and "spans 4 hosts" in r.stderr and "single-host" in r.stderr
  assert "tpu_vm.sh" in r.stderr and "ModuleNotFoundError" not in r.stderr  # before xmanager
  # v5e: in xm.ResourceType but not in the Vertex executor's accelerator map (issue #63).
  r = _xm("--config=configs/stage1.py", "--workdir=gs://b/one", "--tpu_type=v5litepod",
          "--tpu_count=16", check=False)
  assert r.returncode != 0 and "_CLOUD_TPU_ACCELERATOR_TYPES" in r.stderr
  assert "issue #63" in r.stderr and "v5litepod-16 with launch/tpu_vm.sh" in r.stderr
  # The dry run still plans it (for tpu_vm.sh) and says why XManager cannot launch it.
  r = _xm("--config=configs/stage1.py", "--workdir=gs://b/one", "--tpu_type=v5p",
          "--tpu_count=256", "--dry_run")
  (s,) = [json.loads(l) for l in r.stdout.splitlines()]
  assert s["requirements"]["xm_supported"] is False and s["requirements"]["chips"] == 128
  assert s["requirements"]["hosts"] == 32 and "--multihost" in s["args"]
  assert "not launchable through XManager" in r.stderr


def test_xm_bad_sweep_is_a_usage_error():
  r = _xm("--config=c.py", "--workdir=gs://b", "--sweep=optim.peak_lr", "--dry_run", check=False)
  assert r.returncode != 0 and "KEY=V1,V2" in r.stderr
