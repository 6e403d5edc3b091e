"""Paper recipe, stage 1: encoder frozen; train the modulator and the decoder on L_rec; no noise.

Variants: `configs/stage1.py:tiny` (this CPU), `:tiny,steps=N`.
"""
from configs import common


def get_config(arg=None):
  """Stage-1 config (full size unless `tiny`)."""
  a = common.parse_arg(arg, tiny=False, steps=60)
  c = common.base_config(stage=1)
  return common.apply_tiny(c, a.steps) if a.tiny else c
