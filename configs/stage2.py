"""Paper recipe, stage 2: from the stage-1 EMA; everything trainable; L_rec + 0.5 * L_sem.

Set `--config.init.from_stage=<stage-1 workdir>`. Variants: `:encoder=clip` / `:encoder=siglip2`, `:tiny`, `:tiny,steps=N`.
"""
from configs import common


def get_config(arg=None):
  """Stage-2 config (full size unless `tiny`)."""
  a = common.parse_arg(arg, tiny=False, steps=60, encoder="dinov2")
  c = common.uae_base(recipe="paper", encoder=a.encoder)
  c.stage = 2
  c.train.encoder_trainable = True
  c.loss.semantic = 0.5
  c.model.noise_tau = 0.0
  c.gan.enabled = False

  if a.tiny:
    common.tiny(c, a.steps)
  return c
