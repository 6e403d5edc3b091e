"""Independent numpy/scipy references shared by more than one test file."""
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
