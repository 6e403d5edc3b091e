"""Paper recipe, stage 1: encoder frozen; train the modulator and the decoder on L_rec; no noise.

Set `--config.init.encoder=<converted encoder dir>`. Variants: `:encoder=clip`, `:encoder=siglip2`,
`:encoder=mae` (224 px images: MAE-B/16's 14 x 14 grid), `:tiny` (this CPU), `:tiny,steps=N`.
"""
from configs import common


def get_config(arg=None):
  """Stage-1 config (full size unless `tiny`)."""
  a = common.parse_arg(arg, tiny=False, steps=60, encoder="dinov2")
  c = common.uae_base(recipe="paper", encoder=a.encoder)
  c.stage = 1
  c.train.encoder_trainable = False
  c.loss.semantic = 0.0
  c.model.noise_tau = 0.0
  c.gan.enabled = False

  if a.tiny:
    common.tiny(c, a.steps)
  return c
