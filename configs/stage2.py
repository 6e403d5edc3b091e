"""Paper recipe, stage 2: from the stage-1 EMA, everything trainable, L_rec + w_sem * L_sem.

Set `--config.init.from_stage=<stage-1 workdir>`. Variants: `:tiny`, `:tiny,steps=N`.
"""
from configs import common


def get_config(arg=None):
  """Stage-2 config (full size unless `tiny`)."""
  a = common.parse_arg(arg, tiny=False, steps=60)
  c = common.base_config(stage=2)
  return common.apply_tiny(c, a.steps) if a.tiny else c
