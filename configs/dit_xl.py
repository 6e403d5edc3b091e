"""DiT^DH-XL on UAE latents (the reference's main generator); `:tiny` for this CPU.

Same as `configs/dit.py` (see there for the recipe and the commands); this file only fixes
the size, like `configs/dit_s.py` for the autoguidance model.
"""
from configs import common
from configs import dit


def get_config(arg=None):
  """DiT^DH-XL config (full size unless `tiny`)."""
  a = common.parse_arg(arg, tiny=False, steps=300)
  c = dit.base("XL", "ddt")
  if a.tiny:
    dit.tiny(c, a.steps)
  return c
