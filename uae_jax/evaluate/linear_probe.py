"""Linear probe of the UAE encoder: band-0 vs all-band features, logistic regression, top-1.

Features (paper recipe): `UAE.encode` gives the clean latent z (B, H, W, C); `UAE.split` gives the
bands b_0 .. b_{K-1}; "band 0" = b_0 and "all bands" = sum_k b_k = z. Official recipe: "band 0" =
the eval-mode zig-zag DCT low-pass of z (`model.dct_count` coefficients), "all bands" = z. Each
feature grid is pooled over H, W:

* pooling='grid4' (the default, DEFAULT_POOLING): adaptive average pool to 4 x 4, flattened ->
  (B, 16 C). It keeps the spatial frequencies a 4 x 4 grid can hold (plus the box filter's
  leakage), so band 0 and all bands give different features and two different probes.
  'gridN' chooses another N; the feature size, and the host memory of full-batch training, grow
  with N * N.
* pooling='mean': global average pool -> (B, C). A global mean keeps only the DC (zero-frequency)
  component, and the DC component lives entirely in band 0 (its multiplier at 0 is
  1 - sigmoid(-e_1 / tau) ~ 1 - 2e-8; the zig-zag low-pass always keeps DC), so band-0 and all-band
  features are identical up to ~1e-7. The probe then trains once and reports one number for both
  (`band0_equals_all: True`), rather than two equal numbers that look like a finding.

The head is a multinomial logistic regression on standardised features (train mean/std), trained
full-batch with optax (L-BFGS with a zoom line search by default, or Adam) with an L2 penalty on
the weights; accuracy is top-1 on a held-out split. Full batch means all train features sit in
host memory: ImageNet-1k with C = 768 is 1.28M x 768 float32 = 3.9 GB per feature set with 'mean'
and 16 times that with 'grid4' (cap the split with `max_train`, or use 'grid2').
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.experimental import multihost_utils

from uae_jax.tasks import uae as uae_task
from uae_jax.data import pipeline
from uae_jax.models import bands as bands_lib

FEATURE_SETS = ("band0", "all")
DEFAULT_POOLING = "grid4"
# Feature sets closer than this (max abs difference relative to their scale) count as identical.
IDENTICAL_RTOL = 1e-5


def _pool_matrix(in_size: int, out_size: int) -> np.ndarray:
  """(out, in) matrix of PyTorch's adaptive_avg_pool along one axis."""
  m = np.zeros((out_size, in_size), np.float64)
  for i in range(out_size):
    start = (i * in_size) // out_size
    end = -((-(i + 1) * in_size) // out_size)  # ceil
    m[i, start:end] = 1.0 / (end - start)
  return m


def adaptive_avg_pool(x: jax.Array, size: int) -> jax.Array:
  """(B, H, W, C) -> (B, size, size, C) as torch.nn.functional.adaptive_avg_pool2d."""
  _, h, w, _ = x.shape
  if (h, w) == (size, size):
    return x
  hi = jax.lax.Precision.HIGHEST
  x = jnp.einsum("oh,bhwc->bowc", jnp.asarray(_pool_matrix(h, size), x.dtype), x, precision=hi)
  return jnp.einsum("pw,bowc->bopc", jnp.asarray(_pool_matrix(w, size), x.dtype), x, precision=hi)


def pool_features(grid: jax.Array, pooling: str = DEFAULT_POOLING) -> jax.Array:
  """Pools a (B, H, W, C) grid to (B, D): 'mean' (D = C) or 'gridN' (D = N * N * C)."""
  if pooling == "mean":
    return jnp.mean(grid, axis=(1, 2))
  if pooling.startswith("grid") and pooling[4:].isdigit():
    pooled = adaptive_avg_pool(grid, int(pooling[4:]))
    return pooled.reshape(pooled.shape[0], -1)
  raise ValueError(f"pooling must be 'mean' or 'gridN' (e.g. 'grid4'), got {pooling!r}")


def make_feature_fn(config: ml_collections.ConfigDict, pooling: str = DEFAULT_POOLING):
  """`features(params, images) -> {'band0': (B, D), 'all': (B, D)}` for the configured UAE."""
  model = uae_task.build_model(config)
  recipe = config.recipe
  dct_count = int(config.model.dct_count)

  def features(params, images):
    v = {"params": params}
    z = model.apply(v, images, method="encode")
    if recipe == "paper":
      bands = model.apply(v, z, method="split")
      band0, everything = bands[0], jnp.sum(bands, axis=0)
    else:
      band0, everything = bands_lib.dct_lowpass(z, dct_count), z
    return {"band0": pool_features(band0, pooling), "all": pool_features(everything, pooling)}

  return features


def extract_features(feature_fn, params, input_config: ml_collections.ConfigDict, split: str,
                     batch_sharding, max_examples: int = 0) -> dict:
  """Runs `feature_fn` over one ordered pass of `split`: {name: (N, D), 'label': (N,), 'index'}.

  Pass an already jitted `feature_fn` to reuse its compilation across splits.
  """
  cfg = ml_collections.ConfigDict(input_config.to_dict())
  cfg.eval_max_examples = int(max_examples)
  fn = feature_fn if hasattr(feature_fn, "lower") else jax.jit(feature_fn)
  out = {}
  it = pipeline.make_eval_iterator(cfg, split=split)
  try:
    for batch in it:
      local = {"image": np.asarray(batch["image"], np.float32),
               "mask": np.asarray(batch["mask"], np.bool_),
               "label": np.asarray(batch["label"], np.int32),
               "index": np.asarray(batch["index"], np.int32)}
      g = pipeline.to_global_array(local, batch_sharding)
      feats = fn(params, g["image"])
      host = multihost_utils.process_allgather(
          {"f": feats, "mask": g["mask"], "label": g["label"], "index": g["index"]}, tiled=True)
      valid = np.asarray(host["mask"], bool)
      for k, v in host["f"].items():
        out.setdefault(k, []).append(np.asarray(v, np.float32)[valid])
      out.setdefault("label", []).append(np.asarray(host["label"])[valid])
      out.setdefault("index", []).append(np.asarray(host["index"])[valid])
  finally:
    if hasattr(it, "close"):
      it.close()
  return {k: np.concatenate(v) for k, v in out.items()}


@dataclasses.dataclass
class LinearProbe:
  """A trained logistic-regression head on standardised features."""
  params: dict          # {'w': (D, K), 'b': (K,)}
  mean: np.ndarray      # (D,) train feature mean
  std: np.ndarray       # (D,) train feature std (floored)
  final_loss: float

  def logits(self, x) -> np.ndarray:
    """Class scores (N, K) for raw features x (N, D)."""
    z = (np.asarray(x, np.float32) - self.mean) / self.std
    return z @ np.asarray(self.params["w"]) + np.asarray(self.params["b"])

  def accuracy(self, x, y) -> float:
    """Top-1 accuracy on raw features x and integer labels y."""
    return float(np.mean(np.argmax(self.logits(x), axis=-1) == np.asarray(y)))


def _optimizer_step(optimizer: str, learning_rate: float, loss_fn):
  """(optax optimizer, scan step over (params, opt state)) for 'lbfgs' or 'adam'."""
  if optimizer == "lbfgs":
    opt = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(loss_fn)

    def step(carry, _):
      p, state = carry
      value, grad = value_and_grad(p, state=state)
      updates, state = opt.update(grad, state, p, value=value, grad=grad, value_fn=loss_fn)
      return (optax.apply_updates(p, updates), state), value
  else:
    opt = optax.adam(learning_rate)

    def step(carry, _):
      p, state = carry
      value, grad = jax.value_and_grad(loss_fn)(p)
      updates, state = opt.update(grad, state, p)
      return (optax.apply_updates(p, updates), state), value
  return opt, step


# The features and labels are arguments, not constants closed over: every probe of the same shape
# and settings is one compiled program (closing over the data made each probe a new program, and
# large constants make XLA compile slowly). The random init is inside too (no eager compiles).
@functools.partial(jax.jit, static_argnames=("num_classes", "optimizer", "steps", "learning_rate",
                                             "l2", "seed"))
def _fit(xs, y, *, num_classes, optimizer, steps, learning_rate, l2, seed):
  """(head params, final loss) after `steps` full-batch steps on standardised features xs."""
  ys = jax.nn.one_hot(y, num_classes)
  params = {"w": 0.01 * jax.random.normal(jax.random.key(seed), (xs.shape[1], num_classes),
                                          jnp.float32),
            "b": jnp.zeros((num_classes,), jnp.float32)}

  def loss_fn(p):
    logits = xs @ p["w"] + p["b"]
    ce = jnp.mean(optax.softmax_cross_entropy(logits, ys))
    return ce + 0.5 * l2 * jnp.sum(jnp.square(p["w"]))

  opt, step = _optimizer_step(optimizer, learning_rate, loss_fn)
  (params, _), _ = jax.lax.scan(step, (params, opt.init(params)), None, length=steps)
  return params, loss_fn(params)


def train_linear_probe(x, y, num_classes: Optional[int] = None, *, optimizer: str = "lbfgs",
                       steps: int = 200, learning_rate: float = 1e-2, l2: float = 1e-4,
                       seed: int = 0) -> LinearProbe:
  """Full-batch multinomial logistic regression with optax ('lbfgs' or 'adam')."""
  x = np.asarray(x, np.float32)
  y = np.asarray(y, np.int32)
  if x.ndim != 2 or y.shape != (x.shape[0],):
    raise ValueError(f"expected x (N, D) and y (N,), got {x.shape} and {y.shape}")
  if y.min() < 0:
    raise ValueError("labels must be >= 0 (unlabelled records have label -1)")
  if optimizer not in ("lbfgs", "adam"):
    raise ValueError(f"optimizer must be 'lbfgs' or 'adam', got {optimizer!r}")
  k = int(num_classes or y.max() + 1)
  mean = x.mean(0)
  # Constant features (e.g. dead channels) would divide by zero; leave them at zero instead.
  std = np.maximum(x.std(0), 1e-6)
  params, final = _fit((x - mean) / std, y, num_classes=k, optimizer=optimizer, steps=int(steps),
                       learning_rate=float(learning_rate), l2=float(l2), seed=int(seed))
  return LinearProbe(jax.device_get(params), mean, std, float(final))


def features_identical(a, b) -> bool:
  """True if two feature sets are equal up to float round-off (e.g. band 0 vs all under 'mean')."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if a.shape != b.shape:
    return False
  scale = max(float(np.max(np.abs(a), initial=0.0)), 1e-12)
  return float(np.max(np.abs(a - b), initial=0.0)) <= IDENTICAL_RTOL * scale


def probe_accuracies(train: dict, test: dict, *, feature_sets=FEATURE_SETS, **train_kwargs) -> dict:
  """Trains one probe per feature set on `train` and reports its top-1 accuracy on `test`.

  Feature sets identical to an earlier one (band 0 and all bands under global mean pooling) are
  not trained again: they get the earlier result and `same_as` naming it.
  """
  num_classes = int(max(train["label"].max(), test["label"].max()) + 1)
  out = {}
  for name in feature_sets:
    twin = next((n for n in out if features_identical(train[n], train[name])
                 and features_identical(test[n], test[name])), None)
    if twin is not None:
      out[name] = dict(out[twin], same_as=twin)
      continue
    probe = train_linear_probe(train[name], train["label"], num_classes, **train_kwargs)
    out[name] = {"top1": probe.accuracy(test[name], test["label"]),
                 "train_top1": probe.accuracy(train[name], train["label"]),
                 "final_loss": probe.final_loss, "dim": int(train[name].shape[1])}
  out["num_classes"] = num_classes
  counts = np.bincount(test["label"], minlength=num_classes)
  out["chance"] = float(np.max(counts) / len(test["label"]))  # majority-class rate
  out["num_train"], out["num_test"] = int(len(train["label"])), int(len(test["label"]))
  return out


def run_probe(config: ml_collections.ConfigDict, params: Any, batch_sharding, *,
              input_config: Optional[ml_collections.ConfigDict] = None, train_split: str = "",
              test_split: str = "", pooling: str = DEFAULT_POOLING, max_train: int = 0,
              max_test: int = 0,
              **train_kwargs) -> dict:
  """Feature extraction on both splits + one probe per feature set; returns a JSON-able dict."""
  cfg = input_config if input_config is not None else config.input
  train_split = train_split or cfg.split
  test_split = test_split or cfg.get("eval_split", "") or "test"
  fn = jax.jit(make_feature_fn(config, pooling))
  train = extract_features(fn, params, cfg, train_split, batch_sharding, max_train)
  test = extract_features(fn, params, cfg, test_split, batch_sharding, max_test)
  out = probe_accuracies(train, test, **train_kwargs)
  diff = float(np.max(np.abs(train["band0"] - train["all"]))) if len(train["all"]) else 0.0
  out.update(pooling=pooling, train_split=train_split, test_split=test_split,
             max_abs_band0_minus_all=diff, band0_equals_all=out["all"].get("same_as") == "band0")
  return out
