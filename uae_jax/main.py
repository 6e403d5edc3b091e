"""Entry point: `python -m uae_jax.main --config=configs/stage3.py[:tiny] --workdir=DIR`.

`--config.x.y=value` overrides any field; an unknown field, a value of the wrong type or a bad
input file ends with one line naming it and exit status 2, before any compute. On multi-host TPU
pods set `--multihost` (or run where JAX_COORDINATOR_ADDRESS is set) so
`jax.distributed.initialize()` is called first. `--host_malloc` (default `auto`) re-executes the
process under tcmalloc when it is installed: XLA:CPU's step temporaries then stop page-faulting
every step (uae_jax/host_malloc.py; `system` keeps the malloc the process started with).
"""
import difflib
import importlib.util
import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from uae_jax import host_malloc
from uae_jax.errors import UserError

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (with :variant).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and images.")
_MULTIHOST = flags.DEFINE_bool("multihost", bool(os.environ.get("JAX_COORDINATOR_ADDRESS")),
                               "Call jax.distributed.initialize() before anything else.")
flags.mark_flags_as_required(["config", "workdir"])


def _flag_value(argv, name):
  """The value of `--name=value` or `--name value` in argv, or None."""
  for i, a in enumerate(argv):
    if a.startswith(f"--{name}="):
      return a.split("=", 1)[1]
    if a == f"--{name}" and i + 1 < len(argv):
      return argv[i + 1]
  return None


def _load_config(spec: str):
  """get_config(arg) of a config file spec 'path.py[:arg]'."""
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise UserError(f"--config={spec}: no such config file {path!r}")
  module_spec = importlib.util.spec_from_file_location("_uae_jax_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  try:
    return module.get_config(arg or None)
  except (KeyError, ValueError) as e:
    raise UserError(f"--config={spec}: {e.args[0] if e.args else e}") from None


def _dotted_keys(node, prefix=""):
  """Every dotted key path of a ConfigDict (leaves and sections)."""
  out = []
  for k, v in node.items():
    out.append(prefix + k)
    if hasattr(v, "items"):
      out += _dotted_keys(v, prefix + k + ".")
  return out


def check_overrides(argv) -> None:
  """Raises UserError for a `--config.<key>` override whose key the config does not have."""
  spec = _flag_value(argv, "config")
  if not spec:
    return
  keys = set(_dotted_keys(_load_config(spec)))
  for a in argv:
    if a.startswith("--config."):
      key = a[len("--config."):].split("=", 1)[0]
      if key not in keys:
        near = difflib.get_close_matches(key, sorted(keys), n=1)
        hint = f"; did you mean {near[0]}?" if near else ""
        raise UserError(f"unknown config key {key}{hint}")


def main(argv):
  del argv
  from uae_jax.metric_writers import quiet_library_logs
  quiet_library_logs()
  import jax
  if _MULTIHOST.value:
    jax.distributed.initialize()
  from uae_jax import train
  logging.info("process %d/%d, %d devices, %s malloc", jax.process_index(), jax.process_count(),
               jax.device_count(), host_malloc.active())
  try:
    summary = train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  logging.info("summary: %s", summary)


def run():
  """Checks the config overrides, then runs `main` under absl (one-line errors, exit 2)."""
  # Before anything else: a malloc can only be swapped by re-executing the process.
  host_malloc.use_from_argv(sys.argv[1:])
  try:
    check_overrides(sys.argv[1:])
    # Parsed once, here, so a wrong-typed value is one line; absl must not parse them again
    # (config overrides define their flags while parsing).
    remaining = flags.FLAGS(sys.argv)
  except (UserError, flags.Error) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  app.run(main, flags_parser=lambda _: remaining)


if __name__ == "__main__":
  run()
