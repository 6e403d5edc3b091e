"""Entry point: `python -m uae_jax.main --config=configs/stage3.py[:tiny] --workdir=DIR`.

`--config.x.y=value` overrides any field (unknown fields fail before any compute). On multi-host
TPU pods set `--multihost` (or run where JAX_COORDINATOR_ADDRESS / TPU metadata is available) so
`jax.distributed.initialize()` is called first.
"""
import os

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Stage config file (with :variant).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and images.")
_MULTIHOST = flags.DEFINE_bool("multihost", bool(os.environ.get("JAX_COORDINATOR_ADDRESS")),
                               "Call jax.distributed.initialize() before anything else.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  from uae_jax.metric_writers import quiet_library_logs
  quiet_library_logs()
  import jax
  if _MULTIHOST.value:
    jax.distributed.initialize()
  from uae_jax import train
  logging.info("process %d/%d, %d devices", jax.process_index(), jax.process_count(),
               jax.device_count())
  summary = train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  logging.info("summary: %s", summary)


if __name__ == "__main__":
  app.run(main)
