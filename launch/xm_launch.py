r"""XManager launcher: one `uae_jax.main` job per point of a hyper-parameter sweep (Vertex AI).

    python launch/xm_launch.py --config=configs/stage1.py --workdir=gs://bucket/uae/sweep1 \
        --sweep='optim.peak_lr=1e-4,2e-4;loss.semantic=0.5,1.0' --tpu_type=v3 --tpu_count=8 --dry_run

    xmanager launch launch/xm_launch.py -- --config=... --workdir=gs://... --sweep=...

`--sweep` is a cartesian product: axes separated by ';', each `KEY=V1,V2,...` (KEY is a config
field, with or without the `config.` prefix). `--set KEY=VALUE` adds the same override to every
job. Every job gets its own work directory `<workdir>/<index>_<key=value...>`.

TPUs are requested the way XManager documents them, as a count: `--tpu_type=v3 --tpu_count=8`
becomes `xm.JobRequirements(tpu_v3=8)`, i.e. one Vertex AI replica of machine type `cloud-tpu`
with 8 TPU v3 cores (a v3-8, one host). What the Vertex executor of xmanager 0.8.5 can request:

* only TPU v2 and v3: its accelerator map (`xmanager/cloud/vertex.py`,
  `_CLOUD_TPU_ACCELERATOR_TYPES`) has TPU_V2 and TPU_V3 only, although `xm.ResourceType` also
  lists TPU_V4/V5E/V5P/V6E (google-deepmind/xmanager issue #63);
* only single-host slices (v2-8 / v3-8): a job is one worker pool of one `cloud-tpu` machine;
* for TPU jobs it drops the service account (xmanager issue #11), so the jobs run as the Vertex AI
  service agent, which must be able to write the gs:// work directory.

Anything else is refused for a real launch with that reason; use `launch/tpu_vm.sh` (v4, v5e =
v5litepod, v5p, v6e, multi-host). `--dry_run` prints one JSON job spec per sweep point (module,
arguments, TPU request, image build steps, environment, work directory) for any TPU type, so a
sweep can be planned here and run point by point with `tpu_vm.sh`; it contacts nothing and does
not need xmanager installed.

Packaging follows XManager's own examples (`use_deep_module=False`): a clean copy of the project
(`uae_jax/`, `configs/`, `requirements.txt`, `pyproject.toml`, `launch/`; no `.venv` or `.git`) is
staged as `uae-jax/`, copied to `/uae-jax` in the image and used as the working directory, so the
entrypoint `python -m uae_jax.main` imports the package from the working directory. The image
installs `requirements.txt` plus pinned `jax[tpu]` (libtpu) and `gcsfs` (gs:// paths).
"""
import itertools
import json
import os
import re
import shutil
import sys
import tempfile
from typing import Dict, List, Optional, Sequence, Tuple

from absl import app
from absl import flags

_CONFIG = flags.DEFINE_string("config", None, "Stage config file for uae_jax.main (with :arg).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Base GCS work directory; one subdir per job.")
_SWEEP = flags.DEFINE_string("sweep", "", "Cartesian sweep: 'a.b=1,2;c=x,y'.")
_SET = flags.DEFINE_multi_string("set", [], "KEY=VALUE config override for every job.")
_TPU_TYPE = flags.DEFINE_enum("tpu_type", "v3", ["v2", "v3", "v4", "v5litepod", "v5p", "v6e"],
                              "TPU generation (gcloud naming: v5e is v5litepod).")
_TPU_COUNT = flags.DEFINE_integer(
    "tpu_count", 8, "The number in the gcloud slice name (v3-8 -> 8): TensorCores for "
    "v2/v3/v4/v5p, chips for v5litepod/v6e. XManager form: tpu_v3=8.")
_TITLE = flags.DEFINE_string("experiment_title", "uae_jax", "XManager experiment title.")
_BASE_IMAGE = flags.DEFINE_string("base_image", "python:3.11", "Container base image.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print the job specs; launch nothing.")
flags.mark_flags_as_required(["config", "workdir"])

MODULE = "uae_jax.main"
# What xmanager 0.8.5's Vertex executor maps to a Vertex accelerator
# (xmanager/cloud/vertex.py `_CLOUD_TPU_ACCELERATOR_TYPES`; xmanager issue #63).
VERTEX_TPU_TYPES = ("v2", "v3")
VERTEX_TPU_COUNT = 8  # one `cloud-tpu` machine = one v2-8 / v3-8 host
# Pins installed into the image on top of requirements.txt (the same as launch/tpu_vm.sh).
JAX_TPU_PIN = "jax[tpu]==0.10.2"
GCSFS_PIN = "gcsfs==2026.10.1"
PROJECT_DIR = "uae-jax"  # staged project directory = /uae-jax in the image
PROJECT_ENTRIES = ("uae_jax", "configs", "launch", "requirements.txt", "pyproject.toml")
# TPU VM pods start jax.distributed from the TPU metadata; these keep logs readable.
ENV = {"TF_CPP_MIN_LOG_LEVEL": "1", "PYTHONUNBUFFERED": "1"}


class SweepError(ValueError):
  """The --sweep or --set string is malformed."""


def _key(key: str) -> str:
  """'optim.peak_lr' or 'config.optim.peak_lr' -> 'config.optim.peak_lr'."""
  key = key.strip()
  if not re.fullmatch(r"[A-Za-z_][\w.]*", key):
    raise SweepError(f"bad config key {key!r}")
  return key if key.startswith("config.") else f"config.{key}"


def parse_sweep(sweep: str) -> List[Dict[str, str]]:
  """'a=1,2;b=x' -> [{'config.a': '1', 'config.b': 'x'}, {'config.a': '2', 'config.b': 'x'}]."""
  axes: List[Tuple[str, List[str]]] = []
  for axis in filter(None, (a.strip() for a in sweep.split(";"))):
    key, sep, values = axis.partition("=")
    vals = [v.strip() for v in values.split(",") if v.strip()]
    if not sep or not vals:
      raise SweepError(f"sweep axis {axis!r}: expected KEY=V1,V2,...")
    axes.append((_key(key), vals))
  keys = [k for k, _ in axes]
  if len(set(keys)) != len(keys):
    raise SweepError(f"sweep names a key twice: {keys}")
  return [dict(zip(keys, combo)) for combo in itertools.product(*(v for _, v in axes))]


def parse_set(items: Sequence[str]) -> Dict[str, str]:
  """['a.b=1', ...] -> {'config.a.b': '1', ...}."""
  out = {}
  for item in items:
    key, sep, value = item.partition("=")
    if not sep:
      raise SweepError(f"--set {item!r}: expected KEY=VALUE")
    out[_key(key)] = value
  return out


def _slice_shape(tpu_type: str, count: int) -> Tuple[int, int]:
  """(chips, hosts) of the gcloud slice `<tpu_type>-<count>`."""
  if tpu_type in ("v5litepod", "v6e"):  # the name counts chips; 8 on one host, else 4 per host
    chips = count
    per_host = 8 if chips <= 8 else 4
  else:  # v2/v3/v4/v5p names count TensorCores: 2 per chip, 4 chips per host
    chips = max(1, count // 2)
    per_host = 4
  return chips, max(1, -(-chips // per_host))


def vertex_refusal(tpu_type: str, count: int) -> Optional[str]:
  """Why XManager's Vertex executor cannot request this slice, or None when it can."""
  name = f"{tpu_type}-{count}"
  if tpu_type not in VERTEX_TPU_TYPES:
    return (f"XManager's Vertex executor cannot request TPU {tpu_type}: its accelerator map "
            f"(xmanager/cloud/vertex.py _CLOUD_TPU_ACCELERATOR_TYPES, xmanager 0.8.5) has only "
            f"TPU_V2 and TPU_V3, although xm.ResourceType lists newer TPUs (google-deepmind/"
            f"xmanager issue #63). Run {name} with launch/tpu_vm.sh.")
  if count != VERTEX_TPU_COUNT:
    _, hosts = _slice_shape(tpu_type, count)
    what = f"spans {hosts} hosts" if hosts > 1 else "is not a whole host"
    return (f"{name} {what}, but XManager's Vertex executor requests one replica of machine type "
            f"'cloud-tpu' (accelerator_count = the tpu_{tpu_type} count): only single-host "
            f"{tpu_type}-{VERTEX_TPU_COUNT} slices (tpu_{tpu_type}={VERTEX_TPU_COUNT}) can be "
            f"requested. Run {name} with launch/tpu_vm.sh.")
  return None


def tpu_requirements(tpu_type: str, count: int) -> Dict[str, object]:
  """Resource request of one job: the XManager count form, chips, hosts and any refusal."""
  if count < 1:
    raise SweepError(f"--tpu_count={count}: must be positive")
  chips, hosts = _slice_shape(tpu_type, count)
  refusal = vertex_refusal(tpu_type, count)
  req = {"accelerator": f"{tpu_type}-{count}", "chips": chips, "hosts": hosts,
         "xm_supported": refusal is None}
  if refusal is None:
    req["xm"] = f"xm.JobRequirements(tpu_{tpu_type}={count})"
    req["vertex"] = {"machine_type": "cloud-tpu", "accelerator_type": f"TPU_{tpu_type.upper()}",
                     "accelerator_count": count, "replica_count": 1}
  else:
    req["refusal"] = refusal
  return req


def docker_instructions(directory: str = PROJECT_DIR) -> List[str]:
  """Image build steps: the project at /<directory> (also the working directory) + pinned stack.

  The layout of XManager's examples (`use_deep_module=False`): `python -m uae_jax.main` then finds
  `/<directory>/uae_jax/main.py` through the working directory.
  """
  return [
      "ENV LANG=C.UTF-8",
      "RUN python -m pip install --upgrade pip",
      f"COPY {directory}/requirements.txt /{directory}/requirements.txt",
      f"RUN python -m pip install -r /{directory}/requirements.txt '{JAX_TPU_PIN}' '{GCSFS_PIN}'",
      f"COPY {directory}/ /{directory}",
      f"WORKDIR /{directory}",
  ]


def stage_project(repo: str, dest_parent: str) -> str:
  """Copies only what the image needs (no .venv/.git/runs) to <dest_parent>/uae-jax; returns it."""
  dest = os.path.join(dest_parent, PROJECT_DIR)
  os.makedirs(dest)
  ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
  for entry in PROJECT_ENTRIES:
    src = os.path.join(repo, entry)
    if os.path.isdir(src):
      shutil.copytree(src, os.path.join(dest, entry), ignore=ignore)
    elif os.path.exists(src):
      shutil.copy2(src, os.path.join(dest, entry))
  return dest


def job_specs(config: str, workdir: str, sweep: str, overrides: Sequence[str], tpu_type: str,
              count: int) -> List[dict]:
  """One dict per sweep point: name, module, args (flag list), requirements, image, env, workdir."""
  fixed = parse_set(overrides)
  points = parse_sweep(sweep) or [{}]
  req = tpu_requirements(tpu_type, count)
  specs = []
  for i, point in enumerate(points):
    clash = set(point) & set(fixed)
    if clash:
      raise SweepError(f"{sorted(clash)} both swept and set")
    tag = ",".join(f"{k[len('config.'):]}={v}" for k, v in point.items())
    name = f"{i}" + (f"_{tag}" if tag else "")
    job_workdir = workdir.rstrip("/") + "/" + re.sub(r"[^\w.=,-]", "_", name)
    args = {"config": config, "workdir": job_workdir}
    if req["hosts"] > 1:  # several hosts: main must call jax.distributed.initialize()
      args["multihost"] = True
    args.update({**fixed, **point})
    specs.append({
        "name": name,
        "module": MODULE,
        "args": [f"--{k}" if v is True else f"--{k}={v}" for k, v in args.items()],
        "requirements": req,
        "image": {"project_dir": PROJECT_DIR, "use_deep_module": False,
                  "docker_instructions": docker_instructions()},
        "env": dict(ENV),
        "workdir": job_workdir,
    })
  return specs


def launch(specs: List[dict], title: str, base_image: str, tpu_type: str, count: int):
  """Creates the XManager experiment on Vertex AI with one job per spec."""
  refusal = vertex_refusal(tpu_type, count)
  if refusal:
    raise SystemExit(f"error: {refusal} (--dry_run prints the per-job arguments.)")
  # Imported here so that --dry_run works without xmanager installed.
  from xmanager import xm  # pylint: disable=g-import-not-at-top
  from xmanager import xm_local  # pylint: disable=g-import-not-at-top
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  with tempfile.TemporaryDirectory() as staging, \
      xm_local.create_experiment(experiment_title=title) as experiment:
    [executable] = experiment.package([
        xm.python_container(
            executor_spec=xm_local.Vertex.Spec(), path=stage_project(repo, staging),
            base_image=base_image, docker_instructions=docker_instructions(),
            entrypoint=xm.ModuleName(MODULE), use_deep_module=False),
    ])
    for spec in specs:
      requirements = xm.JobRequirements(**{f"tpu_{tpu_type}": count})
      # args as a list keeps the exact --config.x=y flags of the dry run.
      experiment.add(xm.Job(executable=executable,
                            executor=xm_local.Vertex(requirements=requirements),
                            args=spec["args"], env_vars=spec["env"]))


def main(argv):
  """Builds the job specs; prints them (--dry_run) or launches them."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:
    specs = job_specs(_CONFIG.value, _WORKDIR.value, _SWEEP.value, _SET.value, _TPU_TYPE.value,
                      _TPU_COUNT.value)
  except SweepError as e:
    raise app.UsageError(str(e))
  if not _WORKDIR.value.startswith("gs://"):
    print(f"warning: --workdir={_WORKDIR.value} is not on GCS; TPU hosts need a shared workdir",
          file=sys.stderr)
  if _DRY_RUN.value:
    for spec in specs:
      print(json.dumps(spec, sort_keys=True))
    refusal = specs[0]["requirements"].get("refusal")
    if refusal:
      print(f"# not launchable through XManager: {refusal}", file=sys.stderr)
    print(f"# {len(specs)} job(s); dry run, nothing launched", file=sys.stderr)
    return
  launch(specs, _TITLE.value, _BASE_IMAGE.value, _TPU_TYPE.value, _TPU_COUNT.value)


if __name__ == "__main__":
  app.run(main)
