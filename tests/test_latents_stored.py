"""Stored latents (`python -m uae_jax.generate latents`, `latent.source='stored'`): the records equal
the on-the-fly `tokenize` output (and its mirror), the one-pass statistics equal `compute_stats`
and a float64 numpy reference, the pipeline serves them resumably, and one DiT step on stored
latents equals the on-the-fly step."""
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import dit as dit_cfg
from uae_jax.data import pipeline
from uae_jax.errors import ConfigError, LoadError
from uae_jax.generate import cli
from uae_jax.generate import latents
from uae_jax.tasks import dit as dit_task

BATCHES = 2  # of 16 photos at 64 px: 32 images, 64 latents with the mirrors


def _config(hflip=True, lat_dir=""):
  """The tiny DiT on a random tiny UAE (8 x 8 x 64 latents), optionally on stored latents."""
  c = dit_cfg.get_config("tiny")
  c.tokenizer.allow_random = True
  c.train.hflip = hflip
  if lat_dir:
    c.latent.update(source="stored", dir=lat_dir)
  return c


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
  """(config, tokenizer config, tokenizer params, out dir, stats) of 2 encoded batches."""
  c = _config()
  uae_cfg = latents.tokenizer_config(c)
  tok = latents.load_tokenizer_params(c, uae_cfg)
  out = str(tmp_path_factory.mktemp("latents"))
  s = latents.encode_dataset(c, uae_cfg, tok, out, hflip=True, max_batches=BATCHES)
  return c, uae_cfg, tok, out, s


def _reference(c, uae_cfg, tok):
  """On-the-fly (latent, mirrored latent, label) of the same images, eval transform order."""
  model = latents.build_tokenizer(uae_cfg)
  fn = jax.jit(lambda im: (model.apply({"params": tok}, im, method="tokenize"),
                           model.apply({"params": tok}, im[:, :, ::-1], method="tokenize")))
  zs, zf, labels = [], [], []
  for i, b in enumerate(pipeline.make_eval_iterator(c.input, split=c.input.split)):
    if i >= BATCHES:
      break
    a, f = jax.device_get(fn(jnp.asarray(b["image"])))
    keep = b["mask"]
    zs.append(a[keep]), zf.append(f[keep]), labels.append(b["label"][keep])
  return np.concatenate(zs), np.concatenate(zf), np.concatenate(labels)


def _records(out):
  """All stored (latents (N, 2, H, W, C), labels) in record order."""
  _, src = pipeline.open_latent_dir(out)
  recs = [pipeline.parse_latent_record(src[i]) for i in range(len(src))]
  return np.stack([r[0] for r in recs]), np.asarray([r[1] for r in recs])


def test_stored_latents_equal_tokenize_and_stats_are_exact(stored):
  c, uae_cfg, tok, out, s = stored
  z, labels = _records(out)
  ref, ref_f, ref_labels = _reference(c, uae_cfg, tok)
  assert z.shape == (32, 2, 8, 8, 64)
  np.testing.assert_array_equal(labels, ref_labels)
  np.testing.assert_allclose(z[:, 0], ref, atol=1e-6, rtol=0)
  np.testing.assert_allclose(z[:, 1], ref_f, atol=1e-6, rtol=0)
  assert np.abs(z[:, 0] - z[:, 1]).max() > 1e-3  # the mirror is a different latent
  # The same statistics as the existing one-pass `compute_stats` over the same batches...
  ref_s = latents.compute_stats(c, uae_cfg, tok, hflip=True, max_batches=BATCHES)
  assert int(s["count"]) == int(ref_s["count"]) == 64
  for k in ("mean", "var"):
    np.testing.assert_allclose(s[k], ref_s[k], rtol=1e-10, atol=0)  # measured: bit-identical
  # ... and as float64 numpy over the stored latents and mirrors (float32 per-batch moments).
  flat = z.reshape(-1, 8, 8, 64).astype(np.float64)
  np.testing.assert_allclose(s["mean"], flat.mean(0), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(s["var"], flat.var(0), rtol=1e-5, atol=1e-7)
  loaded = latents.load_stats(os.path.join(out, latents.STORED_STATS), (8, 8, 64))
  np.testing.assert_array_equal(loaded["mean"], s["mean"])
  with open(os.path.join(out, pipeline.LATENT_MANIFEST)) as f:
    m = json.load(f)
  assert m["count"] == 32 and m["views"] == 2 and m["shape"] == [8, 8, 64] and m["hflip"]


def test_pipeline_serves_stored_views_resumably(stored):
  c, _, _, out, _ = stored
  z, labels = _records(out)
  cfg = _config(lat_dir=out).input.copy_and_resolve_references()
  assert cfg.latent_dir == out
  cfg.global_batch_size = 8
  it = pipeline.make_train_iterator(cfg)
  first = next(it)
  assert set(first) == {"latent", "label"} and first["latent"].shape == (8, 8, 8, 64)
  views, records = [], []
  for batch in (first, next(it), next(it), next(it)):  # the whole first epoch
    for row, label in zip(batch["latent"], batch["label"]):  # each row is one stored view
      hits = [(i, v) for i in range(len(z)) for v in range(2) if np.array_equal(z[i, v], row)]
      assert len(hits) == 1 and labels[hits[0][0]] == label
      records.append(hits[0][0]), views.append(hits[0][1])
  assert sorted(records) == list(range(32))  # every record once per epoch
  assert 8 <= sum(views) <= 24  # image or mirror, at random (binomial(32, 0.5): 99.9 %)
  state = it.get_state()
  nxt = [next(it) for _ in range(5)]  # crosses the 32-latent epoch boundary
  it2 = pipeline.make_train_iterator(cfg)
  it2.set_state(state)
  for a in nxt:
    b = next(it2)
    np.testing.assert_array_equal(a["latent"], b["latent"])
    np.testing.assert_array_equal(a["label"], b["label"])


@pytest.mark.slow  # two compiles of the whole tiny DiT step (one with the UAE inside): ~50 s here
def test_dit_step_on_stored_latents_equals_on_the_fly(stored):
  _, uae_cfg, tok, out, s = stored
  c_fly, c_st = _config(hflip=False), _config(hflip=False, lat_dir=out)
  st = latents._with_std(s)
  frozen = {"tokenizer": tok, "stats": {"mean": st["mean"], "std": st["std"]}}
  images = next(pipeline.make_eval_iterator(c_fly.input))["image"][:8]
  labels = jnp.asarray([0, 3, 9, 10, 1, 2, 5, -1], jnp.int32)  # 10, -1: the null class
  z = latents.build_tokenizer(uae_cfg).apply({"params": tok}, jnp.asarray(images),
                                             method="tokenize")
  state = jax.jit(lambda k: nn.unbox(dit_task.init_state(c_fly, k)))(jax.random.key(0))
  fly = jax.jit(dit_task.make_train_step(c_fly))(state, {"image": images, "label": labels}, frozen)
  sto = jax.jit(dit_task.make_train_step(c_st))(state, {"latent": z, "label": labels}, frozen)
  assert set(dit_task.batch_spec(c_st)) == {"latent", "label"}
  np.testing.assert_allclose(float(sto[1]["loss"]), float(fly[1]["loss"]), rtol=1e-6)
  diffs = jax.tree.leaves(jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))),
                                       sto[0]["params"], fly[0]["params"]))
  assert max(diffs) <= 1e-6


def test_bad_inputs_are_one_line_errors(stored, tmp_path):
  c, uae_cfg, _, out, _ = stored
  with pytest.raises(LoadError, match="manifest"):
    pipeline.open_latent_dir(str(tmp_path))
  bad = tmp_path / "bad"
  bad.mkdir()
  (bad / pipeline.LATENT_MANIFEST).write_text(open(os.path.join(out, pipeline.LATENT_MANIFEST))
                                              .read())
  for name in json.loads((bad / pipeline.LATENT_MANIFEST).read_text())["shards"]:
    (bad / name).write_bytes(b"garbage" * 100)
  (bad / latents.STORED_STATS).write_bytes(b"garbage")
  with pytest.raises(LoadError) as e:
    pipeline.open_latent_dir(str(bad))
  assert "\n" not in str(e.value) and str(bad) in str(e.value)
  with pytest.raises(LoadError, match="not a stored-latent record"):
    pipeline.parse_latent_record(b"garbage", "x")
  with pytest.raises(ConfigError, match="repa"):
    c2 = _config(lat_dir=out)
    c2.repa.weight = 0.5
    dit_task.validate(c2)
  with pytest.raises(ConfigError, match="hflip"):
    dit_task.validate(_config(hflip=False, lat_dir=out))
  dit_task.validate(_config(lat_dir=out))  # the good one passes
  with pytest.raises(SystemExit) as e:  # the CLI: one line, exit 2
    cli.main(["latents", "--config=configs/dit.py:tiny", f"--out={tmp_path}/o",
              "--set", "latent.progressive.enabled=True"])
  assert e.value.code == 2
