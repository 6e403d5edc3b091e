"""DiT^DH-S on UAE latents: the small guide model of autoguidance (reference: used at an early
epoch with scale 1.42 at 256 px); `:tiny` for this CPU.

Train it like the main model, then sample the main model with
`--guidance=autoguidance --guide-config=configs/dit_s.py --guide-workdir=<this run>`.
"""
from configs import common
from configs import dit


def get_config(arg=None):
  """DiT^DH-S config (full size unless `tiny`)."""
  a = common.parse_arg(arg, tiny=False, steps=300)
  c = dit.base("S", "ddt")
  if a.tiny:
    dit.tiny(c, a.steps)
  return c
