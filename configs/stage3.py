"""Paper recipe, stage 3: from the stage-2 EMA; L_rec + w_sem * L_sem + GAN, noise on high bands.

Set `--config.init.from_stage=<stage-2 workdir>`. Variants: `:tiny`, `:tiny,steps=N`.
"""
from configs import common


def get_config(arg=None):
  """Stage-3 config (full size unless `tiny`)."""
  a = common.parse_arg(arg, tiny=False, steps=60)
  c = common.base_config(stage=3)
  return common.apply_tiny(c, a.steps) if a.tiny else c
