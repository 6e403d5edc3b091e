"""Official-code recipe, stage 2: joint fine-tuning from the stage-1 EMA with a random DCT zig-zag
low-pass (p = 0.5, keep ~ U{32..256}), noise, a 10x clean-reconstruction pass, the zig-zag
semantic loss (first 64 coefficients, weight 0.5) and a fresh discriminator; 17 epochs. The
effective peak lr is 2e-4: the official YAML's 2e-5 is never read (docs/method.md#official-quirks).

Variants: `:encoder=clip` / `:encoder=siglip2`, `:tiny`, `:tiny,steps=N`.
"""
from configs import common


def get_config(arg=None):
  """Official stage-2 config."""
  a = common.parse_arg(arg, tiny=False, steps=60, encoder="dinov2")
  c = common.uae_base(recipe="official", encoder=a.encoder)
  c.stage = 2
  c.train.encoder_trainable = True
  c.train.num_epochs = 17.0
  c.model.noise_tau = 0.8
  c.model.dct_enabled = True
  c.loss.update(semantic=0.5, semantic_first_k=64, clean_l1=10.0, clean_lpips=10.0)
  c.gan.enabled = True
  c.model.decoder.weight_init = "torch_default"  # the official decoder keeps PyTorch's init
  c.gan.d_start_frac, c.gan.g_start_frac = 6 / 17, 8 / 17

  if a.tiny:
    common.tiny(c, a.steps)
    c.loss.semantic_first_k = 16
  return c
