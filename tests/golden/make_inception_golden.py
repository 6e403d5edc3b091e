"""Generate tests/golden/inception_golden.npz: pytorch-fid's FID Inception on seeded random weights.

pytorch-fid needs torchvision, which does not import beside the project's torch 2.13 CPU build, so
this script runs ONCE in a separate throw-away venv (about 5.8 GB, local wheels; never in .venv):

    python3 -m venv /tmp/tvenv
    /tmp/tvenv/bin/pip install torch==2.14.1 torchvision==0.29.1 pytorch-fid==0.3.0 numpy scipy \
        safetensors pillow scikit-image tqdm
    /tmp/tvenv/bin/pip install --no-deps torch-fidelity==0.4.0
    /tmp/tvenv/bin/python tests/golden/make_inception_golden.py      # from the repository root

What it does:
1. Learns the names and shapes of the FID Inception state dict by building pytorch-fid's
   `fid_inception_v3()` with its weight download replaced by a no-op recorder (no network).
2. Fills every tensor from `random_state_dict(shapes, SEED)` below: a pure-numpy, deterministic
   generator. Key order: `sorted(shapes)` (Python string order of the Inception3 key names); one
   `np.random.default_rng(SEED)` stream consumed in that order; per key kind:
     *.conv.weight (O, I, kh, kw)   standard normal * sqrt(2 / (I * kh * kw))   (He scale, so the
                                    ~50-layer ReLU net neither explodes nor collapses)
     *.bn.weight                    uniform(0.8, 1.2)
     *.bn.bias                      0.05 * standard normal
     *.bn.running_mean              0.05 * standard normal
     *.bn.running_var               uniform(0.5, 1.5)          (positive)
     *.bn.num_batches_tracked       0 (int64), draws nothing
     fc.weight                      0.01 * standard normal
     fc.bias                        0, draws nothing
   everything float32 (drawn in float64, then cast).
3. Builds `pytorch_fid.inception.InceptionV3([3], resize_input=True, normalize_input=True,
   use_fid_inception=True)` with `load_state_dict_from_url` monkeypatched to return those tensors
   (strict load, so names and shapes must match), and runs it on real photos:
     batch 'a': astronaut and chelsea, square centre crops, PIL bicubic to 128 x 128 (resize up);
     batch 'b': coffee, square centre crop, PIL bicubic to 320 x 320 (resize down).
4. Writes tests/golden/inception_golden.npz (< 1 MB; the weights are NOT stored, the test rebuilds
   them with the same numpy generator and converts them through uae_jax.evaluate.inception):
     images_a (2,128,128,3) uint8, images_b (1,320,320,3) uint8  (the inputs, NHWC; model input is
                                             image / 255, NCHW for torch)
     resized_a (2,23,23,3) float32            F.interpolate(bilinear, 299) of batch a, every 13th
                                              pixel
     pool_a (2,2048), pool_b (1,2048)         the 2048-d FID features
     mean_<block>_a / mean_<block>_b (B, C)    spatial means of block0, block1 and every Mixed_*
                                              output
     spatial_a / spatial_b (B,17,17,7)        Mixed_6d output channels 0..6 (= TF mixed_6/conv[..., :7],
                                              ADM's sFID tap), NHWC
     logits_a / logits_b (B,1008)             pool @ fc.weight^T (no bias: ADM / torch-fidelity IS logits)
     keys (N,) str, shapes_flat, shapes_len   the torch state dict names/shapes, sorted
     seed, versions (torch, torchvision, pytorch-fid, torch-fidelity)
5. The TF1 ('ADM graph') protocol, from torch-fidelity 0.4.0's `FeatureExtractorInceptionV3`
   (`inception-v3-compat`: TF1-legacy bilinear resize of 0..255 pixels, then (x - 128) / 128), loaded
   with the same seeded weights from a temporary .pth:
     tf_resized_a (2,23,23,3)                 its `interpolate_bilinear_2d_like_tensorflow1x` to 299 of
                                              batch a (0..255 scale), every 13th pixel
     tf_pool_a/b, tf_logits_a/b, tf_spatial_a/b  its '2048' and 'logits_unbiased' features and the
                                              Mixed_6d[:, :7] activation (forward hook), NHWC
6. Precision/recall and Inception Score of torch-fidelity on fixed synthetic inputs (no network):
     prc_fake (150,16), prc_real (120,16)     float32 Gaussian clouds, partly overlapping
     prc_precision, prc_recall                `calculate_precision_recall_full(fake, real, 3)`
     isc_logits (200,12) float32, isc_mean, isc_std
                                              `isc_features_to_metric(splits=10, shuffle=False)`
   and prints the across-image std of the features: it must be far from 0 (random Inceptions with
   default init collapse to near-constant features, which would make a useless test).

`random_state_dict` and `SEED` are imported by tests/test_inception.py (numpy only, no torch).
"""
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "inception_golden.npz")
SEED = 20251121
SUBSAMPLE = 13  # stride of the stored slice of the 299 x 299 resized input
BLOCKS = ("block0", "block1", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b",
          "Mixed_6c", "Mixed_6d", "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c")


def random_state_dict(shapes, seed=SEED):
  """Deterministic numpy weights for an FID Inception state dict {key: shape} (see docstring)."""
  rng = np.random.default_rng(seed)
  out = {}
  for key in sorted(shapes):
    shape = tuple(int(s) for s in shapes[key])
    if key.endswith("num_batches_tracked"):
      out[key] = np.zeros(shape, np.int64)
      continue
    if key.endswith("conv.weight"):
      fan_in = int(np.prod(shape[1:]))
      v = rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)
    elif key.endswith("bn.weight"):
      v = rng.uniform(0.8, 1.2, shape)
    elif key.endswith(("bn.bias", "bn.running_mean")):
      v = 0.05 * rng.standard_normal(shape)
    elif key.endswith("bn.running_var"):
      v = rng.uniform(0.5, 1.5, shape)
    elif key == "fc.weight":
      v = 0.01 * rng.standard_normal(shape)
    elif key == "fc.bias":
      v = np.zeros(shape)
    else:
      raise KeyError(f"no generator rule for {key}")
    out[key] = v.astype(np.float32)
  return out


def _photo(name, size):
  """A square centre crop of a scikit-image photo, PIL bicubic to size x size, uint8 HWC."""
  import skimage.data
  from PIL import Image
  im = Image.fromarray(getattr(skimage.data, name)())
  s = min(im.size)
  left, top = (im.size[0] - s) // 2, (im.size[1] - s) // 2
  return np.asarray(im.crop((left, top, left + s, top + s)).resize((size, size), Image.BICUBIC))


def _torch_shapes():
  """Names and shapes of pytorch-fid's FID Inception state dict, learnt without any download."""
  import torch
  import torchvision
  from pytorch_fid import inception as pf
  captured = {}
  original_load = torchvision.models.inception.Inception3.load_state_dict

  def record(self, state_dict, *args, **kwargs):
    captured.update({k: tuple(v.shape) for k, v in self.state_dict().items()})
    return None

  original_url = pf.load_state_dict_from_url
  pf.load_state_dict_from_url = lambda *a, **k: None
  torchvision.models.inception.Inception3.load_state_dict = record
  try:
    pf.fid_inception_v3()
  finally:
    pf.load_state_dict_from_url = original_url
    torchvision.models.inception.Inception3.load_state_dict = original_load
  del torch
  return captured


def _torch_fidelity_outputs(sd, batches):
  """torch-fidelity's inception-v3-compat (TF1 protocol) on the same weights and batches."""
  import tempfile
  import torch
  from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
  from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "seeded_inception.pth")
    torch.save(sd, path)
    model = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                        feature_extractor_weights_path=path).eval()
  spatial = {}
  model.Mixed_6d.register_forward_hook(
      lambda m, i, o: spatial.__setitem__("x", o[:, :7].permute(0, 2, 3, 1).numpy().copy()))
  out = {}
  for tag, imgs in batches.items():
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).contiguous()  # uint8 NCHW
    with torch.no_grad():
      pool, logits = model(x)
      if tag == "a":
        r = interpolate_bilinear_2d_like_tensorflow1x(x.float(), size=(299, 299), align_corners=False)
        out["tf_resized_a"] = r.permute(0, 2, 3, 1).numpy()[:, ::SUBSAMPLE, ::SUBSAMPLE].copy()
    out[f"tf_pool_{tag}"] = pool.numpy().astype(np.float32)
    out[f"tf_logits_{tag}"] = logits.numpy().astype(np.float32)
    out[f"tf_spatial_{tag}"] = spatial["x"].astype(np.float32)
    print(f"torch-fidelity batch {tag}: pool mean {float(pool.mean()):.4f}")
  return out


def _metric_references():
  """torch-fidelity precision/recall and Inception Score on fixed synthetic inputs."""
  import torch
  from torch_fidelity.metric_isc import isc_features_to_metric
  from torch_fidelity.metric_prc import calculate_precision_recall_full
  rng = np.random.default_rng(SEED + 7)
  fake = rng.standard_normal((150, 16)).astype(np.float32)
  real = (rng.standard_normal((120, 16)) * 1.3 + 0.8).astype(np.float32)
  precision, recall = calculate_precision_recall_full(torch.from_numpy(fake),
                                                      torch.from_numpy(real), 3)
  logits = (3.0 * rng.standard_normal((200, 12))).astype(np.float32)
  isc = isc_features_to_metric(torch.from_numpy(logits), splits=10, shuffle=False)
  print(f"torch-fidelity: precision {precision:.4f} recall {recall:.4f}, "
        f"IS {isc['inception_score_mean']:.4f} +- {isc['inception_score_std']:.4f}")
  return {"prc_fake": fake, "prc_real": real, "prc_precision": np.float64(precision),
          "prc_recall": np.float64(recall), "isc_logits": logits,
          "isc_mean": np.float64(isc["inception_score_mean"]),
          "isc_std": np.float64(isc["inception_score_std"])}


def main():
  """Builds the seeded pytorch-fid model, runs the photos, writes the golden file."""
  import pytorch_fid
  import torch
  import torch.nn.functional as F
  import torchvision
  from pytorch_fid import inception as pf
  torch.set_num_threads(2)

  shapes = _torch_shapes()
  sd = {k: torch.from_numpy(v) for k, v in random_state_dict(shapes).items()}
  pf.load_state_dict_from_url = lambda *a, **k: sd  # the "download" returns the seeded weights
  model = pf.InceptionV3([3], resize_input=True, normalize_input=True,
                         use_fid_inception=True).eval()
  loaded = {k: v for k, v in model.blocks.state_dict().items()}
  assert len(loaded) > 0

  # Spatial means of intermediate outputs, via forward hooks on the shared modules.
  captured = {}
  modules = {"block0": model.blocks[0], "block1": model.blocks[1]}
  for j, name in enumerate(BLOCKS[2:10]):
    modules[name] = model.blocks[2][j]
  for j, name in enumerate(BLOCKS[10:]):
    modules[name] = model.blocks[3][j]
  for name, mod in modules.items():
    mod.register_forward_hook(
        lambda m, i, o, name=name: captured.__setitem__(name, o.mean(dim=(2, 3)).numpy().copy()))
  captured_spatial = {}
  modules["Mixed_6d"].register_forward_hook(
      lambda m, i, o: captured_spatial.__setitem__(
          "a" if "a" not in captured_spatial else "b",
          o[:, :7].permute(0, 2, 3, 1).numpy().astype(np.float32).copy()))

  out = {"seed": np.int64(SEED)}
  batches = {"a": np.stack([_photo("astronaut", 128), _photo("chelsea", 128)]),
             "b": np.stack([_photo("coffee", 320)])}
  for tag, imgs in batches.items():
    x = torch.from_numpy(imgs.astype(np.float32) / 255.0).permute(0, 3, 1, 2).contiguous()
    with torch.no_grad():
      pool = model(x)[0][:, :, 0, 0].numpy()
      if tag == "a":
        r = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        out["resized_a"] = r.permute(0, 2, 3, 1).numpy()[:, ::SUBSAMPLE, ::SUBSAMPLE].copy()
    out[f"images_{tag}"] = imgs
    out[f"pool_{tag}"] = pool.astype(np.float32)
    for name in BLOCKS:
      out[f"mean_{name}_{tag}"] = captured[name].astype(np.float32)
    print(f"batch {tag}: pool mean {pool.mean():.4f}, per-feature std over all features "
          f"{pool.std():.4f}, range [{pool.min():.4f}, {pool.max():.4f}]")

  for tag in batches:
    with torch.no_grad():
      out[f"logits_{tag}"] = (torch.from_numpy(out[f"pool_{tag}"]) @ sd["fc.weight"].T).numpy()
    out[f"spatial_{tag}"] = captured_spatial[tag]
  out.update(_torch_fidelity_outputs(sd, batches))
  out.update(_metric_references())

  pools = np.concatenate([out["pool_a"], out["pool_b"]])
  across = pools.std(axis=0)
  print(f"across-image std per feature: mean {across.mean():.4f}, median {np.median(across):.4f} "
        f"(feature scale {np.abs(pools).mean():.4f})")
  if across.mean() < 1e-3 * max(np.abs(pools).mean(), 1e-12):
    sys.exit("features collapsed to near-constant values: change the weight scales")
  keys = sorted(shapes)
  out["keys"] = np.array(keys)
  out["shapes_len"] = np.array([len(shapes[k]) for k in keys], np.int64)
  out["shapes_flat"] = np.array([d for k in keys for d in shapes[k]], np.int64)
  import torch_fidelity
  out["versions"] = np.array([torch.__version__, torchvision.__version__, pytorch_fid.__version__,
                              torch_fidelity.__version__])
  np.savez_compressed(OUT, **out)
  print(f"wrote {OUT} ({os.path.getsize(OUT) / 1e3:.0f} kB), {len(keys)} state dict keys")


if __name__ == "__main__":
  main()
