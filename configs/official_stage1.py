"""Official-code recipe, stage 1 (reference §2.5): frozen encoder, noise tau 0.8 on every token,
no DCT, L1 + LPIPS + GAN (D from epoch 6, G from epoch 8 of 16). Variants: `:tiny`.
"""
from configs import common


def get_config(arg=None):
  """Official stage-1 config."""
  a = common.parse_arg(arg, tiny=False, steps=60)
  c = common.base_config(stage=1, recipe="official")
  c.loss.noise_tau = 0.8
  c.gan.enabled = True
  return common.apply_tiny(c, a.steps) if a.tiny else c
