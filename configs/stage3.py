"""Paper recipe, stage 3: from the stage-2 EMA; L_rec + 0.5 * L_sem + GAN, noise on high bands.

Set `--config.init.from_stage=<stage-2 workdir>` and `--config.gan.disc_backbone_path=<DINO
ViT-S/8>`. Variants: `:encoder=clip` / `:encoder=siglip2`, `:tiny`, `:tiny,steps=N`.
"""
from configs import common


def get_config(arg=None):
  """Stage-3 config (full size unless `tiny`)."""
  a = common.parse_arg(arg, tiny=False, steps=60, encoder="dinov2")
  c = common.uae_base(recipe="paper", encoder=a.encoder)
  c.stage = 3
  c.train.encoder_trainable = True
  c.loss.semantic = 0.5
  c.model.noise_tau = 0.8           # band-limited noise on bands >= model.k_base
  c.model.p_band = 1.0
  c.gan.enabled = True              # D from 6/16 of the stage, the G term from 8/16

  if a.tiny:
    common.tiny(c, a.steps)
  return c
