"""Official-code recipe, stage 1: frozen encoder, noise 0.8 on every token, no DCT, L1 + LPIPS +
GAN (D from epoch 6, G from epoch 8 of 16). See docs/method.md#official-code-recipe.

Variants: `:encoder=clip` / `:encoder=siglip2`, `:tiny`, `:tiny,steps=N`.
"""
from configs import common


def get_config(arg=None):
  """Official stage-1 config."""
  a = common.parse_arg(arg, tiny=False, steps=60, encoder="dinov2")
  c = common.uae_base(recipe="official", encoder=a.encoder)
  c.stage = 1
  c.train.encoder_trainable = False
  c.loss.semantic = 0.0
  c.model.noise_tau = 0.8
  c.model.dct_enabled = False
  c.gan.enabled = True
  c.model.decoder.weight_init = "torch_default"  # the official decoder keeps PyTorch's init

  if a.tiny:
    common.tiny(c, a.steps)
  return c
