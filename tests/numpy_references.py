"""Independent numpy/scipy references and numpy-drawn test inputs shared by more than one test
file."""
import numpy as np
import scipy.fft


def np_block_lowpass(x, k, b=8):
  """scipy block DCT of (B, H, W, C): zero (u, v) with u + v >= 2(b - 1) - (k - 1); k = 0 is the identity."""
  if k == 0:
    return x.copy()
  u, v = np.meshgrid(np.arange(b), np.arange(b), indexing="ij")
  keep = (u + v < 2 * (b - 1) - (k - 1))[None, :, :, None]
  out = np.empty_like(x)
  for i in range(0, x.shape[1], b):
    for j in range(0, x.shape[2], b):
      c = scipy.fft.dctn(x[:, i:i + b, j:j + b], type=2, norm="ortho", axes=(1, 2)) * keep
      out[:, i:i + b, j:j + b] = scipy.fft.idctn(c, type=2, norm="ortho", axes=(1, 2))
  return out


def random_uae_params(config, seed: int = 0) -> dict:
  """Random UAE params from numpy (no XLA compile of the init, only its shapes are traced): LN
  scales 1, biases 0, weights N(0, 1/fan_in)."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  from uae_jax.tasks import uae as uae_task
  model = uae_task.build_model(config)
  size = config.input.image_size
  abstract = nn.unbox(jax.eval_shape(
      lambda k: model.init({"params": k, "noise": k}, jnp.zeros((1, size, size, 3)),
                           train=False)["params"], jax.random.key(0)))
  rng = np.random.default_rng(seed)

  def leaf(path, s):
    name = str(getattr(path[-1], "key", path[-1]))
    if name == "scale":
      return np.ones(s.shape, np.float32)
    if name == "bias":
      return np.zeros(s.shape, np.float32)
    fan_in = int(np.prod(s.shape[:-1])) or 1
    return (rng.standard_normal(s.shape) / np.sqrt(fan_in)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(leaf, abstract)
