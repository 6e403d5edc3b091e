r"""XManager launcher: one `uae_jax.main` job per point of a hyper-parameter sweep.

    python launch/xm_launch.py --config=configs/stage1.py --workdir=gs://bucket/uae/sweep1 \
        --sweep='optim.peak_lr=1e-4,2e-4;loss.semantic=0.5,1.0' \
        --tpu_type=v3 --tpu_topology=4x4 --dry_run

    xmanager launch launch/xm_launch.py -- --config=... --workdir=gs://... --sweep=...

`--sweep` is a cartesian product: axes separated by ';', each `KEY=V1,V2,...` (KEY is a config
field, with or without the `config.` prefix). `--set KEY=VALUE` adds the same override to every
job. Every job gets its own work directory `<workdir>/<index>_<key=value...>`.

`--dry_run` prints one JSON job spec per sweep point (module, arguments, TPU requirements,
environment, work directory) and contacts nothing; XManager is imported only for a real launch,
so it need not be installed for a dry run.

XManager's Vertex executor only knows TPU v2 and v3 (`xm.ResourceType` has TPU_V2/TPU_V3 only;
google-deepmind/xmanager issue #63). Real launches therefore accept `--tpu_type` v2 / v3 only;
for v4, v5e (v5litepod), v5p and v6e use `launch/tpu_vm.sh` (or xpk on GKE) — the dry run still
prints their specs so a sweep can be planned and then run through `tpu_vm.sh`.
"""
import itertools
import json
import re
import sys
from typing import Dict, List, Sequence, Tuple

from absl import app
from absl import flags

_CONFIG = flags.DEFINE_string("config", None, "Stage config file for uae_jax.main (with :arg).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Base GCS work directory; one subdir per job.")
_SWEEP = flags.DEFINE_string("sweep", "", "Cartesian sweep: 'a.b=1,2;c=x,y'.")
_SET = flags.DEFINE_multi_string("set", [], "KEY=VALUE config override for every job.")
_TPU_TYPE = flags.DEFINE_enum("tpu_type", "v3", ["v2", "v3", "v4", "v5litepod", "v5p", "v6e"],
                              "TPU generation.")
_TPU_TOPOLOGY = flags.DEFINE_string("tpu_topology", "2x2",
                                    "Chip topology, e.g. 2x2 (8 cores on v2/v3), 4x4, 2x2x2.")
_TITLE = flags.DEFINE_string("experiment_title", "uae_jax", "XManager experiment title.")
_BASE_IMAGE = flags.DEFINE_string("base_image", "python:3.11", "Container base image.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print the job specs; launch nothing.")
flags.mark_flags_as_required(["config", "workdir"])

MODULE = "uae_jax.main"
XM_TPU_TYPES = ("v2", "v3")  # what xm.ResourceType knows (xmanager issue #63)
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


def tpu_requirements(tpu_type: str, topology: str) -> Dict[str, object]:
  """Resource request of one job: the XManager form for v2/v3, a plain description otherwise."""
  if not re.fullmatch(r"\d+(x\d+)*", topology):
    raise SweepError(f"--tpu_topology={topology!r}: expected e.g. 2x2 or 2x2x2")
  chips = 1
  for d in topology.split("x"):
    chips *= int(d)
  # Chips per TPU VM host: 4, except single-host v5e/v6e slices of up to 8 chips.
  per_host = 8 if tpu_type in ("v5litepod", "v6e") and chips <= 8 else 4
  req = {"accelerator": f"tpu_{tpu_type}", "topology": topology, "chips": chips,
         "hosts": max(1, -(-chips // per_host)), "xm_supported": tpu_type in XM_TPU_TYPES}
  if tpu_type in XM_TPU_TYPES:
    req["xm"] = f"xm.JobRequirements(tpu_{tpu_type}={topology!r})"
  return req


def job_specs(config: str, workdir: str, sweep: str, overrides: Sequence[str], tpu_type: str,
              topology: str) -> List[dict]:
  """One dict per sweep point: name, module, args (flag list), requirements, env, workdir."""
  fixed = parse_set(overrides)
  points = parse_sweep(sweep) or [{}]
  req = tpu_requirements(tpu_type, topology)
  specs = []
  for i, point in enumerate(points):
    clash = set(point) & set(fixed)
    if clash:
      raise SweepError(f"{sorted(clash)} both swept and set")
    tag = ",".join(f"{k[len('config.'):]}={v}" for k, v in point.items())
    name = f"{i}" + (f"_{tag}" if tag else "")
    job_workdir = workdir.rstrip("/") + "/" + re.sub(r"[^\w.=,-]", "_", name)
    args = {"config": config, "workdir": job_workdir, **fixed, **point}
    if req["hosts"] > 1:  # several hosts: main must call jax.distributed.initialize()
      args = {"config": config, "workdir": job_workdir, "multihost": True, **fixed, **point}
    specs.append({
        "name": name,
        "module": MODULE,
        "args": [f"--{k}" if v is True else f"--{k}={v}" for k, v in args.items()],
        "requirements": req,
        "env": dict(ENV),
        "workdir": job_workdir,
    })
  return specs


def launch(specs: List[dict], title: str, base_image: str, tpu_type: str, topology: str):
  """Creates the XManager experiment on Vertex AI with one job per spec."""
  if tpu_type not in XM_TPU_TYPES:
    raise SystemExit(
        f"XManager's Vertex executor supports TPU v2/v3 only (xmanager issue #63); "
        f"--tpu_type={tpu_type} cannot be requested through it. Use launch/tpu_vm.sh "
        f"(or xpk on GKE) for v4/v5e/v5p/v6e; --dry_run prints the per-job arguments.")
  # Imported here so that --dry_run works without xmanager installed.
  from xmanager import xm  # pylint: disable=g-import-not-at-top
  from xmanager import xm_local  # pylint: disable=g-import-not-at-top
  repo = __file__.rsplit("/launch/", 1)[0]
  with xm_local.create_experiment(experiment_title=title) as experiment:
    [executable] = experiment.package([
        xm.python_container(
            executor_spec=xm_local.Vertex.Spec(), path=repo, base_image=base_image,
            entrypoint=xm.ModuleName(MODULE), use_deep_module=True),
    ])
    for spec in specs:
      requirements = xm.JobRequirements(**{f"tpu_{tpu_type}": topology})
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
                      _TPU_TOPOLOGY.value)
  except SweepError as e:
    raise app.UsageError(str(e))
  if not _WORKDIR.value.startswith("gs://"):
    print(f"warning: --workdir={_WORKDIR.value} is not on GCS; TPU hosts need a shared workdir",
          file=sys.stderr)
  if _DRY_RUN.value:
    for spec in specs:
      print(json.dumps(spec, sort_keys=True))
    print(f"# {len(specs)} job(s); dry run, nothing launched", file=sys.stderr)
    return
  launch(specs, _TITLE.value, _BASE_IMAGE.value, _TPU_TYPE.value, _TPU_TOPOLOGY.value)


if __name__ == "__main__":
  app.run(main)
