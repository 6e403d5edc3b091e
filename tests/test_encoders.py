"""CLIP and SigLIP/SigLIP2 encoders: per-block parity with transformers (random weights), exact
conversion round trips, the official UAE-CLIP layout, the encoder registry and scan layout."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from uae_jax.convert import clip as clip_convert
from uae_jax.convert import siglip as siglip_convert
from uae_jax.convert import tables
from uae_jax.errors import ConfigError, LoadError
from uae_jax.models import clip as clip_lib
from uae_jax.models import encoders
from uae_jax.models import siglip as siglip_lib

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TOL = 1e-4
SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256)


def _randomise(model, seed: int):
  """Random weights everywhere (LayerNorm scales around 1) so no tensor is left at its init."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=g) * 0.2
      is_scale = name.endswith("weight") and "norm" in name
      p.copy_(noise + (1.0 if is_scale else 0.0))
  return model.eval()


def _run(model, params, x, **kw):
  """model.apply({"params": params}, x, **kw) as one jitted program (eager compiles per op)."""
  return jax.jit(lambda p, x: model.apply({"params": p}, x, **kw))(params, jnp.asarray(x))


def _state_dict(model):
  return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def hf_clip():
  cfg = transformers.CLIPVisionConfig(image_size=112, patch_size=14, **SMALL)
  return _randomise(transformers.CLIPVisionModel(cfg), 0)


@pytest.fixture(scope="module")
def hf_siglip():
  cfg = transformers.SiglipVisionConfig(image_size=128, patch_size=16, **SMALL)
  return _randomise(transformers.SiglipVisionModel(cfg), 1)


@pytest.fixture(scope="module")
def hf_siglip2():
  cfg = transformers.Siglip2VisionConfig(num_patches=64, patch_size=16, **SMALL)
  return _randomise(transformers.Siglip2VisionModel(cfg), 2)


def _images(size, n=2, seed=0):
  return np.random.RandomState(seed).rand(n, size, size, 3).astype(np.float32)


def _nchw(x, mean, std):
  return torch.from_numpy(((x - np.asarray(mean)) / np.asarray(std)).astype(np.float32)
                          .transpose(0, 3, 1, 2).copy())


def _maxdiff(a, b):
  return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


# ------------------------------------------------------------------------------------------------
# Parity with transformers.

@pytest.mark.parametrize("size", [112, 140])  # native 8 x 8 grid; 10 x 10 with interpolation
def test_clip_blocks_match_hf(hf_clip, size):
  params, arch, _ = clip_convert.convert_clip(_state_dict(hf_clip))
  assert arch["post_norm"] and arch["pos_embed_grid"] == 8 and arch["ln_eps"] == 1e-5
  x = _images(size)
  model = clip_lib.Clip(**{**arch, "input_size": size})
  grid, blocks, pooled = _run(model, params, x, return_blocks=True, return_pooled=True)
  with torch.no_grad():
    ref = hf_clip(pixel_values=_nchw(x, clip_lib.CLIP_MEAN, clip_lib.CLIP_STD),
                  output_hidden_states=True, interpolate_pos_encoding=size != 112)
  assert len(blocks) == len(ref.hidden_states) - 1 == 2
  for i, b in enumerate(blocks):
    assert _maxdiff(b, ref.hidden_states[i + 1]) <= TOL, f"block {i}"
  # The latent is last_hidden_state[:, 1:]: the last block, no post_layernorm on patch tokens.
  g = size // 14
  assert grid.shape == (2, g, g, 64)
  assert _maxdiff(grid.reshape(2, g * g, 64), ref.last_hidden_state[:, 1:]) <= TOL
  assert _maxdiff(pooled, ref.pooler_output) <= TOL


def test_clip_resizes_input_like_torch_bicubic(hf_clip):
  params, arch, _ = clip_convert.convert_clip(_state_dict(hf_clip), drop_post_norm=True)
  x = _images(128)  # the tokenizer image; resized 128 -> 112 inside the encoder
  grid = _run(clip_lib.Clip(**arch), params, x)
  xr = torch.nn.functional.interpolate(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()),
                                       size=(112, 112), mode="bicubic", align_corners=False)
  xr = xr.numpy().transpose(0, 2, 3, 1)
  with torch.no_grad():
    ref = hf_clip(pixel_values=_nchw(xr, clip_lib.CLIP_MEAN, clip_lib.CLIP_STD))
  assert _maxdiff(grid.reshape(2, 64, 64), ref.last_hidden_state[:, 1:]) <= TOL


@pytest.mark.parametrize("size", [128, 160, pytest.param(96, marks=pytest.mark.slow)])  # 8x8; 10x10, 6x6 interpolated
def test_siglip_blocks_match_hf(hf_siglip, size):
  params, arch, info = siglip_convert.convert_siglip(_state_dict(hf_siglip))
  assert info["layout"] == "siglip" and arch["pos_embed_convention"] == "torch_bicubic"
  x = _images(size)
  model = siglip_lib.Siglip(**{**arch, "input_size": size})
  grid, blocks, pooled = _run(model, params, x, return_blocks=True, return_pooled=True)
  with torch.no_grad():
    ref = hf_siglip(pixel_values=_nchw(x, siglip_lib.SIGLIP_MEAN, siglip_lib.SIGLIP_STD),
                    output_hidden_states=True, interpolate_pos_encoding=size != 128)
  for i, b in enumerate(blocks):
    assert _maxdiff(b, ref.hidden_states[i + 1]) <= TOL, f"block {i}"
  g = size // 16
  assert _maxdiff(grid.reshape(2, g * g, 64), ref.last_hidden_state) <= TOL
  assert _maxdiff(pooled, ref.pooler_output) <= TOL
  # UAE's encoder: post_layernorm without its affine = per-token standardised last block.
  p_uae, a_uae, _ = siglip_convert.convert_siglip(_state_dict(hf_siglip), drop_final_norm=True,
                                                  drop_head=True)
  z = _run(siglip_lib.Siglip(**{**a_uae, "input_size": size}), p_uae, x)
  last = ref.hidden_states[-1].numpy()
  ln = (last - last.mean(-1, keepdims=True)) / np.sqrt(last.var(-1, keepdims=True) + 1e-6)
  assert _maxdiff(z.reshape(2, g * g, 64), ln) <= TOL


@pytest.mark.parametrize("size", [128, 96, pytest.param(160, marks=pytest.mark.slow)])
def test_siglip2_naflex_matches_hf(hf_siglip2, size):
  params, arch, info = siglip_convert.convert_siglip(_state_dict(hf_siglip2))
  assert info["layout"] == "naflex" and arch["pos_embed_convention"] == "antialiased_bilinear"
  x = _images(size)
  grid, pooled = _run(siglip_lib.Siglip(**{**arch, "input_size": size}), params, x,
                      return_pooled=True)
  g = size // 16
  xn = ((x - 0.5) / 0.5).astype(np.float32)
  # NaFlex input: patches flattened in (p, p, C) order, row-major over the grid.
  patches = xn.reshape(2, g, 16, g, 16, 3).transpose(0, 1, 3, 2, 4, 5).reshape(2, g * g, -1)
  with torch.no_grad():
    ref = hf_siglip2(pixel_values=torch.from_numpy(patches),
                     pixel_attention_mask=torch.ones(2, g * g, dtype=torch.long),
                     spatial_shapes=torch.tensor([[g, g]] * 2))
  assert _maxdiff(grid.reshape(2, g * g, 64), ref.last_hidden_state) <= TOL
  assert _maxdiff(pooled, ref.pooler_output) <= TOL


@pytest.mark.parametrize("out", [6, pytest.param(10, marks=pytest.mark.slow), 24])
def test_antialiased_bilinear_matrix_matches_torch(out):
  p = np.random.RandomState(3).randn(1, 5, 16, 16).astype(np.float32)
  ref = torch.nn.functional.interpolate(torch.from_numpy(p), size=(out, out), mode="bilinear",
                                        align_corners=False, antialias=True).numpy()
  m = siglip_lib.antialiased_bilinear_matrix(16, out)
  got = np.einsum("oh,pw,bchw->bcop", m, m, p.astype(np.float64))
  assert _maxdiff(got, ref) <= 1e-5


# ------------------------------------------------------------------------------------------------
# Exact round trips and errors.

def _same(a: dict, b: dict):
  assert set(a) == set(b), set(a) ^ set(b)
  for k in a:
    assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k


@pytest.mark.parametrize("prefix", ["", "vision_model."])
def test_clip_export_round_trip_bit_exact(hf_clip, prefix):
  sd = {prefix + k: v for k, v in _state_dict(hf_clip).items()}
  params, _, _ = clip_convert.convert_clip(sd)
  back = clip_convert.export_clip(params, prefix=prefix)
  _same(back, sd)
  again, _, _ = clip_convert.convert_clip(back)
  _same(tables.flatten(again), tables.flatten(params))


@pytest.mark.parametrize("which", ["siglip", "siglip2"])
def test_siglip_export_round_trip_bit_exact(hf_siglip, hf_siglip2, which):
  model = hf_siglip if which == "siglip" else hf_siglip2
  sd = {"vision_model." + k: v for k, v in _state_dict(model).items()}
  params, _, info = siglip_convert.convert_siglip(sd)
  _same(siglip_convert.export_siglip(params, layout=info["layout"]), sd)


def test_hf_saved_dir_and_full_model_keys(tmp_path, hf_clip):
  """save_pretrained writes Hub names (`vision_model.` prefix); a full CLIPModel's text tower,
  projections and logit_scale are dropped by name; anything else unknown is refused."""
  hf_clip.save_pretrained(tmp_path / "hf")
  params, kwargs = clip_convert.load_clip(str(tmp_path / "hf"))
  ref, _, _ = clip_convert.convert_clip(_state_dict(hf_clip))
  _same(tables.flatten(params), tables.flatten(ref))
  sd = {"vision_model." + k: v for k, v in _state_dict(hf_clip).items()}
  full = dict(sd, **{"text_model.embeddings.token_embedding.weight": np.zeros((4, 8), np.float32),
                     "visual_projection.weight": np.zeros((8, 64), np.float32),
                     "logit_scale": np.zeros((), np.float32),
                     "vision_model.embeddings.position_ids": np.arange(65)[None]})
  _, _, info = clip_convert.convert_clip(full)
  assert len(info["dropped_keys"]) == 4
  with pytest.raises(LoadError, match="unused PyTorch key.*vision_model.extra"):
    clip_convert.convert_clip(dict(sd, **{"vision_model.extra": np.zeros(3, np.float32)}))
  missing = dict(sd)
  del missing["vision_model.encoder.layers.1.mlp.fc2.bias"]
  with pytest.raises(LoadError, match="missing PyTorch key"):
    clip_convert.convert_clip(missing)
  with pytest.raises(LoadError, match="not a CLIP vision tower"):
    clip_convert.convert_clip({k: v for k, v in sd.items() if "class_embedding" not in k})


def test_clip_and_siglip_files_are_told_apart(hf_clip, hf_siglip):
  with pytest.raises(LoadError, match="CLIP vision tower, not SigLIP"):
    siglip_convert.convert_siglip(_state_dict(hf_clip))
  with pytest.raises(LoadError, match="not a CLIP vision tower"):
    clip_convert.convert_clip(_state_dict(hf_siglip))


# ------------------------------------------------------------------------------------------------
# Official UAE-CLIP checkpoint layout.

def _official_clip_state_dict(hf_clip, seed=0):
  """A UAE-CLIP state dict in the official key layout built from random tensors: the encoder is
  HF `CLIPVisionModel` under `encoder.model.vision_model.` without post_layernorm, the decoder
  the official GeneralDecoder names (list written out from the reference's description)."""
  from uae_jax.convert.uae import decoder_sincos
  rs = np.random.RandomState(seed)
  sd = {"encoder.model.vision_model." + k: v for k, v in _state_dict(hf_clip).items()
        if not k.startswith("post_layernorm")}
  d, c, mlp, out = 64, 64, 128, 8 * 8 * 3  # tiny decoder: width 64, MLP 128, patch 8
  shapes = {"decoder.decoder_embed.weight": (d, c), "decoder.decoder_embed.bias": (d,),
            "decoder.trainable_cls_token": (1, 1, d), "decoder.decoder_norm.weight": (d,),
            "decoder.decoder_norm.bias": (d,), "decoder.decoder_pred.weight": (out, d),
            "decoder.decoder_pred.bias": (out,)}
  for i in range(2):
    t = f"decoder.decoder_layers.{i}."
    for n in ("attention.attention.query", "attention.attention.key", "attention.attention.value",
              "attention.output.dense"):
      shapes[t + n + ".weight"], shapes[t + n + ".bias"] = (d, d), (d,)
    for n in ("layernorm_before", "layernorm_after"):
      shapes[t + n + ".weight"], shapes[t + n + ".bias"] = (d,), (d,)
    shapes[t + "intermediate.dense.weight"], shapes[t + "intermediate.dense.bias"] = (mlp, d), (mlp,)
    shapes[t + "output.dense.weight"], shapes[t + "output.dense.bias"] = (d, mlp), (d,)
  sd.update({k: rs.randn(*s).astype(np.float32) for k, s in shapes.items()})
  sd["decoder.decoder_pos_embed"] = decoder_sincos(d, 8).astype(np.float32)
  return sd


def test_official_uae_clip_import_run_export(tmp_path, hf_clip):
  from uae_jax.models import decoder as decoder_lib
  sd = _official_clip_state_dict(hf_clip)
  assert clip_convert.official_encoder_kind(sd) == "clip"
  path = str(tmp_path / "ep-last.pt")
  torch.save({"step": 7, "model": {k: torch.from_numpy(v) for k, v in sd.items()},
              "ema": {k: torch.from_numpy(v) for k, v in sd.items()}}, path)
  params, arch = clip_convert.import_official_uae_clip(path, encoder_input_size=112)
  assert arch["encoder"]["kind"] == "clip" and arch["latent_grid"] == 8
  # Runs: the encoder is the HF tower's raw last block; the decoder maps it to 64 px images.
  enc = encoders.build({k: v for k, v in arch["encoder"].items()})
  x = _images(112)
  z = _run(enc, params["encoder"], x)
  with torch.no_grad():
    ref = hf_clip(pixel_values=_nchw(x, clip_lib.CLIP_MEAN, clip_lib.CLIP_STD))
  assert _maxdiff(z.reshape(2, 64, 64), ref.last_hidden_state[:, 1:]) <= TOL
  img = _run(decoder_lib.PixelDecoder(**arch["decoder"], mean=clip_lib.CLIP_MEAN,
                                      std=clip_lib.CLIP_STD), params["decoder"], z)
  assert img.shape == (2, 64, 64, 3) and bool(jnp.all(jnp.isfinite(img)))
  # Exports back to the same keys, bit-exact.
  back = clip_convert.export_official_uae_clip(params, str(tmp_path / "out.safetensors"),
                                               decoder_grid=arch["latent_grid"])
  _same(back, sd)
  again, _ = clip_convert.import_official_uae_clip(str(tmp_path / "out.safetensors"),
                                                   encoder_input_size=112)
  _same(tables.flatten(again), tables.flatten(params))
  # The trainer's path (`init.official_uae` with model.encoder.kind='clip') loads the same params.
  import ml_collections
  from configs import official_stage1
  from uae_jax.models import uae as uae_lib
  c = official_stage1.get_config("tiny,encoder=clip")
  c.model.encoder = ml_collections.ConfigDict(dict(arch["encoder"]))
  c.model.decoder = ml_collections.ConfigDict(dict(arch["decoder"]))
  _same(tables.flatten(uae_lib.load_official(path, c.model)), tables.flatten(params))


def test_official_uae_clip_refuses_post_layernorm_and_extra_keys(hf_clip):
  sd = _official_clip_state_dict(hf_clip)
  bad = dict(sd, **{"encoder.model.vision_model.post_layernorm.weight": np.ones(64, np.float32)})
  with pytest.raises(LoadError, match="post_layernorm"):
    clip_convert.uae_clip_from_state_dict(bad, encoder_input_size=112)
  with pytest.raises(LoadError, match="unused PyTorch key"):
    clip_convert.uae_clip_from_state_dict(dict(sd, stray=np.zeros(1, np.float32)),
                                          encoder_input_size=112)


def test_official_uae_siglip2_round_trip(hf_siglip):
  """UAE-SigLIP2 keys: `encoder.model.{embeddings, encoder.layers, head}`, no post_layernorm."""
  sd = _official_clip_state_dict(hf_siglip)  # same decoder; encoder re-keyed below
  sd = {k: v for k, v in sd.items() if not k.startswith("encoder.")}
  sd.update({"encoder.model." + k: v for k, v in _state_dict(hf_siglip).items()
             if not k.startswith("post_layernorm")})
  assert clip_convert.official_encoder_kind(sd) == "siglip2"
  params, arch = siglip_convert.uae_siglip_from_state_dict(sd, encoder_input_size=128)
  assert arch["encoder"]["head"] and not arch["encoder"]["final_norm_affine"]
  _same(siglip_convert.uae_siglip_to_state_dict(params, decoder_grid=8), sd)


# ------------------------------------------------------------------------------------------------
# Registry, config loading, scan layout.

@pytest.mark.parametrize("kind", ["clip", pytest.param("siglip2", marks=pytest.mark.slow)])
def test_registry_load_converted_dir_scanned_equals_unrolled(tmp_path, hf_clip, hf_siglip, kind):
  hf = hf_clip if kind == "clip" else hf_siglip
  src = str(tmp_path / "hf")
  hf.save_pretrained(src)
  out = str(tmp_path / "conv")
  if kind == "clip":
    clip_convert.convert_clip_file(src, out)
  else:
    siglip_convert.convert_siglip_file(src, out)
  cfg = dict(encoders.DEFAULTS[kind], **encoders.TINY[kind])
  assert encoders.latent_dim(cfg) == 64 and encoders.latent_grid(cfg) == 8
  x = jnp.asarray(_images(64))  # the tiny tokenizer image size; resized inside the encoder
  outs = []
  for scan in (False, True):
    c = dict(cfg, scan_blocks=scan)
    params = encoders.load(out, c)
    assert ("blocks" in params) == scan and ("blocks_0" in params) != scan
    outs.append(np.asarray(_run(encoders.build(c), params, x)))
  assert outs[0].shape == (2, 8, 8, 64)
  assert _maxdiff(outs[0], outs[1]) <= 1e-5 * np.abs(outs[0]).max()  # same math, reordered
  if kind == "clip":
    assert "post_norm" not in encoders.load(out, cfg)  # UAE-CLIP has no post_layernorm
  with pytest.raises(ConfigError, match="pos_embed_grid"):
    encoders.load(out, dict(cfg, pos_embed_grid=16))


def test_registry_rejects_unknown_kind_and_gives_official_recipe():
  assert encoders.normalisation({"kind": "siglip2"}) == ((0.5,) * 3, (0.5,) * 3)
  assert encoders.normalisation(encoders.DEFAULTS["clip"])[0] == clip_lib.CLIP_MEAN
  with pytest.raises(ConfigError, match="expected one of"):
    encoders.build({"kind": "vqgan"})
  assert encoders.official_recipe({"kind": "siglip2"})["semantic_first_k"] == 128
  assert encoders.official_recipe({"kind": "clip"})["dct_count"] == 36
  assert encoders.latent_dim(encoders.DEFAULTS["clip"]) == 1024
  assert encoders.latent_grid(encoders.DEFAULTS["siglip2"]) == 16


@pytest.mark.parametrize("kind", [pytest.param("clip", marks=pytest.mark.slow), "siglip2"])
def test_full_size_shapes_and_logical_axes(kind):
  import flax.linen as nn
  cfg = encoders.DEFAULTS[kind]
  enc = encoders.build(cfg)
  images = jax.ShapeDtypeStruct((1, 256, 256, 3), jnp.float32)
  boxed = jax.eval_shape(enc.init, jax.random.key(0), images)
  out = jax.eval_shape(enc.apply, nn.unbox(boxed), images)
  assert out.shape == (1, 16, 16, encoders.latent_dim(cfg))
  leaves = jax.tree.leaves(boxed["params"], is_leaf=lambda v: isinstance(v, nn.LogicallyPartitioned))
  assert leaves and all(isinstance(v, nn.LogicallyPartitioned) for v in leaves)
  n = sum(int(np.prod(v.value.shape)) for v in leaves)
  # CLIP-L/14 vision tower ~303M (without post_layernorm); SigLIP2-B/16 tower ~86M (no head).
  assert (3.02e8 < n < 3.05e8) if kind == "clip" else (8.5e7 < n < 8.7e7)


def test_cli_clip_and_siglip2(tmp_path, hf_clip, hf_siglip):
  from uae_jax.convert.__main__ import main
  hf_clip.save_pretrained(tmp_path / "c")
  hf_siglip.save_pretrained(tmp_path / "s")
  assert main(["clip", "--src", str(tmp_path / "c"), "--out", str(tmp_path / "co")]) == 0
  assert main(["siglip2", "--src", str(tmp_path / "s"), "--out", str(tmp_path / "so"),
               "--drop-final-norm", "--drop-head"]) == 0
  assert os.path.exists(tmp_path / "so" / "params.msgpack")
  (tmp_path / "junk.safetensors").write_bytes(b"garbage")
  assert main(["clip", "--src", str(tmp_path / "junk.safetensors"), "--out",
               str(tmp_path / "x")]) == 2


def test_spectrum_semantic_encoder_goes_through_the_registry(tmp_path, hf_clip):
  from uae_jax.evaluate import linear_probe
  from uae_jax.evaluate import spectrum
  hf_clip.save_pretrained(tmp_path / "c")
  x = _images(112)
  feats = jax.jit(spectrum.semantic_encoder("clip", str(tmp_path / "c")))(jnp.asarray(x))
  assert set(feats) == {"clip"} and feats["clip"].shape == (2, spectrum.GRID, spectrum.GRID, 64)
  with torch.no_grad():
    ref = hf_clip(pixel_values=_nchw(x, clip_lib.CLIP_MEAN, clip_lib.CLIP_STD))
  want = linear_probe.adaptive_avg_pool(
      jnp.asarray(ref.last_hidden_state[:, 1:].numpy().reshape(2, 8, 8, 64)), spectrum.GRID)
  assert _maxdiff(feats["clip"], want) <= TOL


# ------------------------------------------------------------------------------------------------
# The three paper-recipe stages with each new encoder, through the trainer.

@pytest.mark.slow
@pytest.mark.parametrize("kind", ["clip", "siglip2"])
def test_tiny_three_stages_train_with_each_encoder(tmp_path, kind):
  """Stage 1 -> 2 -> 3 chained: PSNR improves, and the semantic target is the encoder's latent
  (the layer the parity tests pin against transformers), so it starts at exactly zero."""
  import importlib
  from uae_jax import train
  from uae_jax.data import pipeline
  from uae_jax.tasks import uae as uae_task
  prev, psnr = "", []
  for stage, steps in ((1, 40), (2, 20), (3, 6)):
    c = importlib.import_module(f"configs.stage{stage}").get_config(
        f"tiny,steps={steps},encoder={kind}")
    c.init.from_stage = prev
    c.image_every_steps, c.gan.d_start_frac, c.gan.g_start_frac = 0, 0.0, 0.0
    wd = str(tmp_path / f"s{stage}")
    if stage == 2:  # first step: student == teacher, so L_sem is exactly 0
      tr = train.Trainer(c, wd + "_probe")
      it = pipeline.make_train_iterator(c.input)
      state, _ = tr.initial_state(it)
      model = uae_task.build_model(c)
      x = tr.global_batch(it)["image"]
      z = model.apply({"params": state["params"]}, x, method="encode")
      direct = encoders.build(dict(c.model.encoder)).apply(
          {"params": state["teacher"]}, x)
      np.testing.assert_array_equal(np.asarray(z), np.asarray(direct))
      _, m = tr.train_step(state, tr.global_batch(it), tr.frozen)
      assert float(m["semantic"]) == 0.0
      tr.close()
    summary = train.train_and_evaluate(c, wd)
    psnr.append((summary["eval_start"]["eval_ema/psnr"], summary["eval_end"]["eval_ema/psnr"]))
    prev = wd
  assert psnr[0][1] > psnr[0][0] + 1.0, psnr
  assert psnr[2][1] > psnr[0][0] + 1.0, psnr
