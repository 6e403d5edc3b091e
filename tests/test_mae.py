"""MAE ViT encoder: per-block parity with transformers `ViTMAEModel` (random weights, identity
shuffle), exact conversion round trips in both key styles, load errors, the registry, configs, the
convert CLI and the spectrum CLI."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from uae_jax.convert import mae as mae_convert
from uae_jax.convert import tables
from uae_jax.errors import ConfigError, LoadError
from uae_jax.models import encoders
from uae_jax.models import mae as mae_lib

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TOL = 1e-4
SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
             image_size=128, patch_size=16, mask_ratio=0.0, decoder_hidden_size=32,
             decoder_num_hidden_layers=1, decoder_num_attention_heads=4,
             decoder_intermediate_size=64)


def _hf_sincos(dim: int, grid: int) -> "torch.Tensor":
  """HF's own MAE table: `build_2d_sinusoidal_position_embedding` with the h/w halves swapped as
  `ViTMAEEmbeddings.initialize_weights` does (the facebook/vit-mae-* layout)."""
  from transformers.models.vit_mae import modeling_vit_mae
  t = modeling_vit_mae.build_2d_sinusoidal_position_embedding(grid, grid, dim, cls_token=True)
  return torch.cat([t[..., dim // 2:], t[..., :dim // 2]], dim=-1)


def _randomise(model, seed: int):
  """Random values in every trainable tensor (LayerNorm scales around 1) and HF's fixed sin-cos
  table in `position_embeddings`, as in every real checkpoint (transformers 5.23 leaves the table
  of a freshly built model at zeros: its init is skipped once the patch conv is initialised)."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("embeddings.position_embeddings"):
        p.copy_(_hf_sincos(p.shape[-1], int(round((p.shape[1] - 1) ** 0.5)))[None])
        continue
      if not p.requires_grad:
        continue  # the decoder's fixed table (ViTMAEForPreTraining)
      is_scale = name.endswith("weight") and "norm" in name
      p.copy_(torch.randn(p.shape, generator=g) * 0.2 + (1.0 if is_scale else 0.0))
  return model.eval()


@pytest.fixture(scope="module")
def hf_mae():
  return _randomise(transformers.ViTMAEModel(transformers.ViTMAEConfig(**SMALL)), 0)


@pytest.fixture(scope="module")
def hf_pretraining():
  return _randomise(transformers.ViTMAEForPreTraining(transformers.ViTMAEConfig(**SMALL)), 1)


def _state_dict(model):
  return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def _disk_state_dict(model, tmp_path):
  """The on-disk (transformers-4 style) keys that `save_pretrained` writes."""
  from safetensors.numpy import load_file
  model.save_pretrained(tmp_path)
  return load_file(os.path.join(tmp_path, "model.safetensors"))


def _images(size, n=2, seed=0):
  return np.random.RandomState(seed).rand(n, size, size, 3).astype(np.float32)


def _nchw(x):
  mean, std = np.asarray(mae_lib.IMAGENET_MEAN), np.asarray(mae_lib.IMAGENET_STD)
  return torch.from_numpy(((x - mean) / std).astype(np.float32).transpose(0, 3, 1, 2).copy())


def _hf_forward(model, x_nchw, **kw):
  """HF forward as MAEwNorm runs it: identity shuffle (noise = arange), interpolated positions."""
  n = (x_nchw.shape[2] // 16) * (x_nchw.shape[3] // 16)
  noise = torch.arange(n, dtype=torch.float32)[None].expand(x_nchw.shape[0], -1)
  with torch.no_grad():
    return model(pixel_values=x_nchw, noise=noise, interpolate_pos_encoding=True, **kw)


def _maxdiff(a, b):
  return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


def _same(a: dict, b: dict):
  assert set(a) == set(b), set(a) ^ set(b)
  for k in a:
    assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k


# ------------------------------------------------------------------------------------------------
# Parity with transformers.

@pytest.mark.parametrize("size", [128, 160, pytest.param(96, marks=pytest.mark.slow)])
def test_mae_blocks_match_hf(hf_mae, size):
  """Native 8 x 8 grid, and 10 x 10 / 6 x 6 with HF's bicubic position interpolation."""
  params, arch, info = mae_convert.convert_mae(_state_dict(hf_mae))
  assert info["style"] == "hf5" and arch["pos_embed_grid"] == 8 and arch["ln_eps"] == 1e-12
  assert arch["final_norm_affine"] and "pos_embed" not in params  # the table is a constant
  x = _images(size)
  model = mae_lib.Mae(**{**arch, "input_size": size})
  # jit: one compile is cheaper here than eager dispatch compiling every op for a new shape.
  grid, blocks, cls = jax.jit(lambda p, v: model.apply(p, v, return_blocks=True, return_cls=True))(
      {"params": params}, jnp.asarray(x))
  ref = _hf_forward(hf_mae, _nchw(x), output_hidden_states=True)
  g = size // 16
  # The identity shuffle keeps every token in row-major order.
  assert ref.ids_restore.tolist() == [list(range(g * g))] * 2 and not ref.mask.any()
  hidden = ref.hidden_states[-len(blocks):]
  assert len(blocks) == 2
  for i, b in enumerate(blocks):
    assert _maxdiff(b, hidden[i]) <= TOL, f"block {i}"
  assert grid.shape == (2, g, g, 64)
  assert _maxdiff(grid.reshape(2, g * g, 64), ref.last_hidden_state[:, 1:]) <= TOL
  assert _maxdiff(cls, ref.last_hidden_state[:, 0]) <= TOL
  # (The UAE latent without the final affine is checked in the registry test below.)


def test_random_shuffle_is_not_the_identity(hf_mae):
  """Why the noise matters: HF's default random noise permutes the tokens even at mask_ratio 0."""
  x = _nchw(_images(128))
  torch.manual_seed(0)
  with torch.no_grad():
    shuffled = hf_mae(pixel_values=x).last_hidden_state[:, 1:]
  ordered = _hf_forward(hf_mae, x).last_hidden_state[:, 1:]
  assert _maxdiff(shuffled, ordered) > 0.1


def test_pos_table_is_hf_sincos():
  """Our constant equals HF's MAE table (the facebook/vit-mae-* layout) at the full-size grid."""
  hf = _hf_sincos(768, 14).numpy()
  ours = mae_lib.pos_table(768, 14)
  assert hf.shape == ours.shape == (197, 768) and not ours[0].any()
  assert np.array_equal(ours, hf), _maxdiff(ours, hf)


# ------------------------------------------------------------------------------------------------
# Exact round trips and errors.

def test_export_round_trip_bit_exact_both_styles(hf_mae, hf_pretraining, tmp_path):
  mem = _state_dict(hf_mae)  # transformers-5 in-memory names
  params, arch, _ = mae_convert.convert_mae(mem)
  _same(mae_convert.export_mae(params, pos_embed_grid=8, style="hf5"), mem)
  disk = _disk_state_dict(hf_mae, tmp_path / "m")  # on-disk names
  p2, _, info = mae_convert.convert_mae(disk)
  assert info["style"] == "hf4"
  _same(tables.flatten(p2), tables.flatten(params))
  _same(mae_convert.export_mae(p2, pos_embed_grid=8), disk)
  # ViTMAEForPreTraining (facebook/vit-mae-* files): the encoder under `vit.`, decoder dropped.
  full = _disk_state_dict(hf_pretraining, tmp_path / "p")
  p3, _, info = mae_convert.convert_mae(full)
  assert info["prefix"] == "vit." and info["dropped_keys"]
  assert all(k.startswith("decoder.") for k in info["dropped_keys"])
  back = mae_convert.export_mae(p3, pos_embed_grid=8, prefix="vit.")
  _same(back, {k: v for k, v in full.items() if k.startswith("vit.")})
  # The exported dict loads into transformers without missing or unexpected keys.
  fresh = transformers.ViTMAEModel(transformers.ViTMAEConfig(**SMALL))
  fresh.load_state_dict({k: torch.from_numpy(v) for k, v in
                         mae_convert.export_mae(params, pos_embed_grid=8, style="hf5").items()})


def test_conversion_errors(hf_mae, tmp_path):
  sd = _state_dict(hf_mae)
  with pytest.raises(LoadError, match="unused PyTorch key.*extra"):
    mae_convert.convert_mae(dict(sd, extra=np.zeros(3, np.float32)))
  missing = dict(sd)
  del missing["layers.1.mlp.fc2.bias"]
  with pytest.raises(LoadError, match="missing PyTorch key.*layers.1.mlp.fc2.bias"):
    mae_convert.convert_mae(missing)
  bad_pos = dict(sd, **{mae_convert.POS_KEY: sd[mae_convert.POS_KEY] + 0.01})
  with pytest.raises(LoadError, match="fixed tensor differs"):
    mae_convert.convert_mae(bad_pos)
  bad_shape = dict(sd, **{"layers.0.mlp.fc1.weight": np.zeros((256, 32), np.float32)})
  with pytest.raises(LoadError, match="shape mismatch"):
    mae_convert.convert_mae(bad_shape)
  with pytest.raises(LoadError, match="cannot find the ViTMAE vision tower"):
    mae_convert.convert_mae({"vision_model.embeddings.patch_embedding.weight": np.zeros(1)})
  (tmp_path / "junk.safetensors").write_bytes(b"garbage")
  with pytest.raises(LoadError, match="junk.safetensors"):
    mae_convert.load_mae(str(tmp_path / "junk.safetensors"))


# ------------------------------------------------------------------------------------------------
# Registry, configs, CLIs.

def test_registry_load_resized_input_scanned_equals_unrolled(hf_mae, tmp_path):
  """A converted dir through `encoders.load` (both block layouts); 64 px tokenizer images are
  resized to 128 inside the encoder with PyTorch's bicubic, and the latent is MAEwNorm's."""
  src = str(tmp_path / "hf")
  hf_mae.save_pretrained(src)
  out = str(tmp_path / "conv")
  mae_convert.convert_mae_file(src, out)
  cfg = dict(encoders.DEFAULTS["mae"], **encoders.TINY["mae"])
  assert encoders.latent_dim(cfg) == 64 and encoders.latent_grid(cfg) == 8
  x = _images(64)
  outs = []
  for scan in (False, True):
    c = dict(cfg, scan_blocks=scan)
    params = encoders.load(out, c)
    assert ("blocks" in params) == scan and "norm" not in params
    outs.append(np.asarray(jax.jit(encoders.build(c).apply)({"params": params}, jnp.asarray(x))))
  assert _maxdiff(outs[0], outs[1]) <= 1e-5 * np.abs(outs[0]).max()
  xr = torch.nn.functional.interpolate(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()),
                                       size=(128, 128), mode="bicubic", align_corners=False)
  ref = _hf_forward(hf_mae, _nchw(xr.numpy().transpose(0, 2, 3, 1)), output_hidden_states=True)
  last = ref.hidden_states[-1].numpy()[:, 1:].astype(np.float64)
  ln = (last - last.mean(-1, keepdims=True)) / np.sqrt(last.var(-1, keepdims=True) + 1e-12)
  assert _maxdiff(outs[0].reshape(2, 64, 64), ln) <= TOL
  with pytest.raises(ConfigError, match="pos_embed_grid"):
    encoders.load(out, dict(cfg, pos_embed_grid=14))
  with pytest.raises(ConfigError, match="final_norm_affine"):
    nonorm = str(tmp_path / "conv_nonorm")
    mae_convert.convert_mae_file(src, nonorm, drop_final_norm=True)
    encoders.load(nonorm, dict(cfg, final_norm_affine=True))


def test_registry_full_size_and_official_recipe():
  import flax.linen as nn
  cfg = encoders.DEFAULTS["mae"]
  assert encoders.latent_grid(cfg) == 14 and encoders.latent_dim(cfg) == 768
  assert encoders.normalisation(cfg) == (mae_lib.IMAGENET_MEAN, mae_lib.IMAGENET_STD)
  assert encoders.official_recipe(cfg)["dct_count_max"] == 196
  images = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
  enc = encoders.build(cfg)
  boxed = jax.eval_shape(enc.init, jax.random.key(0), images)
  assert jax.eval_shape(enc.apply, nn.unbox(boxed), images).shape == (1, 14, 14, 768)
  leaves = jax.tree.leaves(boxed["params"], is_leaf=lambda v: isinstance(v, nn.LogicallyPartitioned))
  assert leaves and all(isinstance(v, nn.LogicallyPartitioned) for v in leaves)
  n = sum(int(np.prod(v.value.shape)) for v in leaves)
  assert 8.55e7 < n < 8.6e7, n  # ViT-B/16 encoder ~85.8M without the fixed table and final affine
  # Scan + remat + bf16 compute (as the UAE builds it) trace to a bf16 grid of the same shape.
  tiny = dict(cfg, **encoders.TINY["mae"], scan_blocks=True, remat_policy="full")
  enc = encoders.build(tiny, dtype=jnp.bfloat16)
  x = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
  v = jax.eval_shape(enc.init, jax.random.key(0), x)
  assert v["params"]["blocks"]["norm1"]["scale"].value.shape == (2, 64)
  out = jax.eval_shape(enc.apply, nn.unbox(v), x)
  assert out.shape == (1, 8, 8, 64) and out.dtype == jnp.bfloat16


def test_stage_configs_with_mae():
  import importlib
  from uae_jax.tasks import uae as uae_task
  for name in ("stage1", "stage2", "stage3", "official_stage1", "official_stage2"):
    mod = importlib.import_module(f"configs.{name}")
    full = mod.get_config("encoder=mae")
    assert full.model.encoder.kind == "mae" and full.input.image_size == 224
    assert full.model.dct_count_max == 196
    uae_task.validate(_with_random_init(full))
    tiny = mod.get_config("tiny,encoder=mae")
    assert tiny.input.image_size == 64 and tiny.model.encoder.input_size == 128
    uae_task.validate(tiny)
  # The other encoders keep their 256 px images.
  assert importlib.import_module("configs.stage1").get_config("").input.image_size == 256


def _with_random_init(c):
  c.init.allow_random_encoder = True
  return c


def test_convert_cli(hf_pretraining, tmp_path):
  from uae_jax.convert.__main__ import main
  hf_pretraining.save_pretrained(tmp_path / "hf")
  assert main(["mae", "--src", str(tmp_path / "hf"), "--out", str(tmp_path / "o"),
               "--drop-final-norm"]) == 0
  arch = json.load(open(tmp_path / "o" / "arch.json"))
  assert arch["model_class"] == mae_convert.MODEL_CLASS and not arch["kwargs"]["final_norm_affine"]
  (tmp_path / "junk.safetensors").write_bytes(b"garbage")
  assert main(["mae", "--src", str(tmp_path / "junk.safetensors"), "--out",
               str(tmp_path / "x")]) == 2


def test_spectrum_semantic_encoder_goes_through_the_registry(hf_mae, tmp_path):
  """The Prism analysis's MAE features: the UAE latent pooled to the 16 x 16 analysis grid."""
  from uae_jax.evaluate import linear_probe
  from uae_jax.evaluate import spectrum
  hf_mae.save_pretrained(tmp_path / "hf")
  x = _images(128)
  feats = jax.jit(spectrum.semantic_encoder("mae", str(tmp_path / "hf")))(jnp.asarray(x))
  assert set(feats) == {"mae"} and feats["mae"].shape == (2, spectrum.GRID, spectrum.GRID, 64)
  ref = _hf_forward(hf_mae, _nchw(x)).last_hidden_state[:, 1:].numpy().reshape(2, 8, 8, 64)
  want = linear_probe.adaptive_avg_pool(jnp.asarray(ref), spectrum.GRID)
  assert _maxdiff(feats["mae"], want) <= TOL


@pytest.mark.slow
def test_spectrum_cli_with_random_mae(hf_mae, tmp_path):
  """`python -m uae_jax.evaluate spectrum --encoder mae --mae DIR` on two bundled photos."""
  from uae_jax.evaluate import cli
  hf_mae.save_pretrained(tmp_path / "hf")
  res = cli.main(["spectrum", "--encoder", "mae", "--mae", str(tmp_path / "hf"), "--splits",
                  "test", "--max-images", "2", "--batch-size", "2", "--out", str(tmp_path / "s")])
  assert list(res["results"]) == ["mae"] and os.path.exists(res["png"])
  assert res["results"]["mae"]["num_images"] == 2
  with pytest.raises(SystemExit) as e:  # no --mae weights: one error line, exit status 2
    cli.main(["spectrum", "--encoder", "mae", "--out", str(tmp_path / "t")])
  assert e.value.code == 2


# ------------------------------------------------------------------------------------------------
# Training through the trainer.

@pytest.mark.slow
def test_tiny_three_stages_train_with_mae(tmp_path):
  """Stage 1 -> 2 -> 3 with the MAE encoder: PSNR improves and the semantic target is the latent
  (the same check as for CLIP and SigLIP2, reused from tests/test_encoders.py)."""
  from tests import test_encoders
  test_encoders.test_tiny_three_stages_train_with_each_encoder(tmp_path, "mae")
