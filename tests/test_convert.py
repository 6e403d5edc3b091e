"""Weight conversion: explicit tables, parity with HF DINOv2, golden files, round trips, bad files.

Tests that need the PyTorch reference call `pytest.importorskip("torch")` themselves; everything
else (golden files, round trips, table errors) runs without torch.
"""
import importlib.util
import os
import pickle
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from uae_jax import convert
from uae_jax.convert import __main__ as cli
from uae_jax.convert import dinov2 as cdino
from uae_jax.convert import discriminator as cdisc
from uae_jax.convert import tables
from uae_jax.convert import torch_io
from uae_jax.convert.tables import ConversionError
from uae_jax.models import decoder as decoder_lib
from uae_jax.models.dinov2 import DinoV2
from uae_jax.models.modulator import SpectralModulator

GOLDEN = os.path.join(os.path.dirname(__file__), "golden")
ATOL = 1e-4
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _golden_helpers():
  spec = importlib.util.spec_from_file_location(
      "make_dinov2_golden", os.path.join(GOLDEN, "make_dinov2_golden.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


gold = _golden_helpers()


def run_dinov2(params, arch, images01):
  """Our DINOv2 of `arch` on [0,1] images at full f32 matmul precision: (grid, blocks) in numpy."""
  model = DinoV2(**arch)
  # One jitted program: eager apply compiles one program per op.
  run = jax.jit(lambda p, x: model.apply({"params": p}, x, return_blocks=True))
  with jax.default_matmul_precision("highest"):
    grid, blocks = run(params, jnp.asarray(images01))
  return np.asarray(grid), [np.asarray(b) for b in blocks]


def random_like_tree(tree, seed):
  rng = np.random.RandomState(seed)
  return jax.tree.map(lambda x: rng.randn(*x.shape).astype(np.float32), tree)


def init_params(module, *inputs):
  v = jax.eval_shape(module.init, jax.random.key(0), *inputs)
  return nn.unbox(v)["params"]


def assert_trees_equal(a, b):
  fa, fb = tables.flatten(a), tables.flatten(b)
  assert sorted(fa) == sorted(fb)
  for k in fa:
    assert fa[k].dtype == fb[k].dtype, k
    assert np.array_equal(fa[k], fb[k]), k


# ------------------------------------------------------------------------------------------------
# Golden files (torch-free).

@pytest.mark.parametrize("case", ["reg4", "noreg"])
def test_golden_dinov2_matches_hf_reference(case):
  ref = np.load(os.path.join(GOLDEN, f"dinov2_tiny_{case}_ref.npz"))
  params, arch = convert.load_dinov2(os.path.join(GOLDEN, f"dinov2_tiny_{case}_hf.safetensors"),
                                     input_size=int(ref["input_size"]))
  registers = int(ref["num_registers"])
  assert arch["num_registers"] == registers and arch["final_norm_affine"]
  assert arch["pos_embed_grid"] == int(ref["pos_embed_grid"]) != int(ref["input_size"]) // 14
  assert arch["pos_embed_convention"] == ("antialiased_bicubic" if registers else "torch_bicubic")
  image = ref["image"][None].astype(np.float32) / np.float32(255.0)
  grid, blocks = run_dinov2(params, arch, image)
  errs = [float(np.abs(b - ref[f"block_{i}"]).max()) for i, b in enumerate(blocks)]
  err_grid = float(np.abs(grid - ref["grid"]).max())
  print(f"golden {case}: block max abs err {errs}, grid {err_grid:.2e}")
  assert len(blocks) == 2 and max(errs) <= ATOL and err_grid <= ATOL


def test_golden_conversion_runs_without_torch():
  code = (
      "import sys\n"
      "class Block:\n"
      "  def find_spec(self, name, path=None, target=None):\n"
      "    if name.split('.')[0] == 'torch': raise ImportError('torch is blocked in this test')\n"
      "sys.meta_path.insert(0, Block())\n"
      "from uae_jax.convert import load_dinov2\n"
      f"p, a = load_dinov2({os.path.join(GOLDEN, 'dinov2_tiny_reg4_hf.safetensors')!r})\n"
      "assert p['pos_embed'].shape == (1, 1 + 18 * 18, 64), p['pos_embed'].shape\n"
      "assert 'torch' not in sys.modules\n"
      "print('ok', a['size'])\n")
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  r = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                     text=True, timeout=300)
  assert r.returncode == 0 and "ok tiny" in r.stdout, r.stderr[-2000:]


def test_golden_files_are_small():
  total = sum(os.path.getsize(os.path.join(GOLDEN, f)) for f in os.listdir(GOLDEN)
              if f.startswith("dinov2_tiny_"))
  assert total < 2_000_000


# ------------------------------------------------------------------------------------------------
# Parity against transformers (torch).

# By default registers with a resized table (224 -> 252) and no registers with the other resize
# (252 -> 224); the remaining combinations only under -m slow.
@pytest.mark.torch
@pytest.mark.parametrize("registers,hf_image,input_size", [
    (r, h, i) if (r, h, i) in ((4, 224, 252), (0, 252, 224))
    else pytest.param(r, h, i, marks=pytest.mark.slow)
    for h, i in [(224, 224), (224, 252), (252, 224)] for r in (0, 4)])
def test_dinov2_parity_with_hf(registers, hf_image, input_size, tmp_path):
  pytest.importorskip("torch")
  model = gold.build_hf_dinov2(registers, hf_image, seed=7 + registers)
  model.save_pretrained(tmp_path)
  x = np.random.RandomState(3).rand(2, input_size, input_size, 3).astype(np.float32)
  ref_blocks, ref_last = gold.hf_forward(model, x)

  # On-disk names (save_pretrained) and transformers-5 in-memory names give identical params.
  params_disk, arch = convert.load_dinov2(str(tmp_path), input_size=input_size)
  sd_mem = {k: v.numpy() for k, v in model.state_dict().items()}
  assert any(".attention.q_proj." in k for k in sd_mem)
  params_mem, arch_mem, info = convert.convert_dinov2(sd_mem, input_size=input_size)
  assert info["layout"] == "hf5" and arch_mem == arch
  assert_trees_equal(params_disk, params_mem)

  grid, blocks = run_dinov2(params_disk, arch, x)
  g = input_size // 14
  errs = [float(np.abs(b - r).max()) for b, r in zip(blocks, ref_blocks)]
  err_grid = float(np.abs(grid - ref_last[:, 1 + registers:].reshape(2, g, g, -1)).max())
  print(f"parity reg={registers} table {hf_image // 14} input {input_size}: blocks {errs}, "
        f"grid {err_grid:.2e}")
  assert len(blocks) == 2 and max(errs) <= ATOL and err_grid <= ATOL

  # UAE use: the final LayerNorm affine dropped explicitly.
  p2, a2 = convert.load_dinov2(str(tmp_path), drop_final_norm=True)
  assert "norm" not in p2 and a2["final_norm_affine"] is False


@pytest.mark.torch
def test_swiglu_blocks_match_hf(tmp_path):
  """ViT-g's SwiGLU FFN on a tiny HF model: on-disk `weights_in/out`, in-memory `gate/up/down_proj`,
  FAIR `w12/w3` and timm `fc1/fc2` all map to our fused `w12` (gate half first) and `w3`."""
  torch = pytest.importorskip("torch")
  from transformers import Dinov2Config, Dinov2Model
  from uae_jax.models import layers
  model = Dinov2Model(Dinov2Config(use_swiglu_ffn=True, image_size=224, **gold.TINY))
  gold.randomize_(model, 5)
  model.eval().save_pretrained(tmp_path)
  x = np.random.RandomState(0).rand(1, 224, 224, 3).astype(np.float32)
  ref_blocks, _ = gold.hf_forward(model, x)
  with torch.no_grad():
    pv = torch.from_numpy(((x - gold.MEAN) / gold.STD).transpose(0, 3, 1, 2).copy())
    h0 = model(pixel_values=pv, output_hidden_states=True).hidden_states[0].numpy()
  disk, _ = torch_io.read_state_dict(str(tmp_path))
  mem = {k: v.numpy() for k, v in model.state_dict().items()}
  results = []
  for sd in (disk, mem):
    layout, prefix = cdino.detect_layout(sd)
    src = cdino.infer_source(sd, layout, prefix)
    assert src.swiglu and src.mlp_hidden == 176 and layout == ("hf4" if sd is disk else "hf5")
    results.append(tables.to_flax(src.table(), sd))
  assert_trees_equal(results[0], results[1])
  params = results[0]
  block = layers.TransformerBlock(64, 4, 176, layerscale=1.0, swiglu=True)
  h = h0
  apply = jax.jit(block.apply)  # both blocks have one shape: one compiled program
  for i in range(2):
    with jax.default_matmul_precision("highest"):
      h = np.asarray(apply({"params": params[f"blocks_{i}"]}, jnp.asarray(h)))
    assert np.abs(h - ref_blocks[i]).max() <= ATOL
  for layout, sd in (("hf4", disk), ("hf5", mem)):
    back = convert.export_dinov2(params, layout=layout)
    assert sorted(back) == sorted(sd) and all(np.array_equal(back[k], sd[k]) for k in sd)
  for layout in ("fair", "timm"):
    other = convert.export_dinov2(params, layout=layout)
    names = ("w12", "w3") if layout == "fair" else ("fc1", "fc2")
    assert other[f"blocks.0.mlp.{names[0]}.weight"].shape == (352, 64)
    assert other[f"blocks.0.mlp.{names[1]}.weight"].shape == (64, 176)
    src = cdino.infer_source(other, *cdino.detect_layout(other, layout))
    assert src.swiglu and src.mlp_hidden == 176
    want = dict(params, mask_token=np.zeros_like(params["mask_token"])) if layout == "timm" else params
    assert_trees_equal(tables.to_flax(src.table(), other), want)  # timm has no mask token


def _hf_to_timm_fair(sd, layout, depth):
  """Build a timm / FAIR-hub state dict from an HF (in-memory) one, the way timm converts."""
  out = {"patch_embed.proj.weight": sd["embeddings.patch_embeddings.projection.weight"],
         "patch_embed.proj.bias": sd["embeddings.patch_embeddings.projection.bias"],
         "cls_token": sd["embeddings.cls_token"], "pos_embed": sd["embeddings.position_embeddings"],
         "norm.weight": sd["layernorm.weight"], "norm.bias": sd["layernorm.bias"]}
  if "embeddings.register_tokens" in sd:
    reg = sd["embeddings.register_tokens"]
    if layout == "timm":
      out["reg_token"] = reg
      pos = sd["embeddings.position_embeddings"]
      out["cls_token"] = sd["embeddings.cls_token"] + pos[:, :1]  # timm folds the CLS pos row
      out["pos_embed"] = pos[:, 1:]
    else:
      out["register_tokens"] = reg
  if layout == "fair":
    out["mask_token"] = sd["embeddings.mask_token"]
  for i in range(depth):
    h, b = f"encoder.layer.{i}.", f"blocks.{i}."
    for p in ("weight", "bias"):
      out[b + f"attn.qkv.{p}"] = np.concatenate(
          [sd[h + f"attention.{n}_proj.{p}"] for n in "qkv"], axis=0)
      out[b + f"attn.proj.{p}"] = sd[h + f"attention.o_proj.{p}"]
      for n in ("norm1", "norm2", "mlp.fc1", "mlp.fc2"):
        out[b + f"{n}.{p}"] = sd[h + f"{n}.{p}"]
    out[b + "ls1.gamma"] = sd[h + "layer_scale1.lambda1"]
    out[b + "ls2.gamma"] = sd[h + "layer_scale2.lambda1"]
  return out


@pytest.mark.torch
@pytest.mark.parametrize("registers", [0, 4])
def test_hf_timm_fair_layouts_convert_identically(registers):
  torch = pytest.importorskip("torch")
  model = gold.build_hf_dinov2(registers, 224, seed=11)
  with torch.no_grad():
    # Lossless only with a zero CLS position row (timm reg4 folds it into cls_token) and a zero
    # mask token (timm has none); see uae_jax/convert/dinov2.py.
    model.embeddings.position_embeddings[:, 0] = 0
    model.embeddings.mask_token.zero_()
  sd = {k: v.numpy() for k, v in model.state_dict().items()}
  ref, arch_hf, _ = convert.convert_dinov2(sd)
  for layout in ("timm", "fair"):
    other = _hf_to_timm_fair(sd, layout, 2)
    params, arch, info = convert.convert_dinov2(other)
    assert info["layout"] == layout
    assert_trees_equal(params, ref)
    want = {"timm": "antialiased_bicubic",
            "fair": "antialiased_bicubic" if registers else "torch_bicubic_offset"}[layout]
    assert arch["pos_embed_convention"] == want
    assert {k: v for k, v in arch.items() if k != "pos_embed_convention"} == \
           {k: v for k, v in arch_hf.items() if k != "pos_embed_convention"}
    # And back: our params -> that layout reproduces the same state dict bit for bit.
    back = convert.export_dinov2(params, layout=layout)
    assert sorted(back) == sorted(other)
    assert all(np.array_equal(back[k], other[k]) for k in other)


def test_timm_reg4_general_case_folds_cls_pos_row():
  """With a non-zero CLS position row, timm import gives cls + pos0 and a zero row: same function."""
  rng = np.random.RandomState(0)
  params = random_like_tree(init_params(DinoV2(size="tiny", pos_embed_grid=16, input_size=224),
                                        jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)), 1)
  timm_sd = convert.export_dinov2(params, layout="timm")
  assert timm_sd["pos_embed"].shape == (1, 256, 64) and "mask_token" not in timm_sd
  back, arch, _ = convert.convert_dinov2(timm_sd)
  np.testing.assert_array_equal(back["cls_token"], params["cls_token"] + params["pos_embed"][:, :1])
  np.testing.assert_array_equal(back["pos_embed"][:, 0], 0)
  np.testing.assert_array_equal(back["pos_embed"][:, 1:], params["pos_embed"][:, 1:])
  np.testing.assert_array_equal(back["mask_token"], 0)
  x = rng.rand(1, 224, 224, 3).astype(np.float32)
  (g0, b0), (g1, b1) = run_dinov2(params, arch, x), run_dinov2(back, arch, x)
  assert np.abs(g0 - g1).max() <= 1e-5 and np.abs(b0[-1] - b1[-1]).max() <= 1e-4


# ------------------------------------------------------------------------------------------------
# Round trips (torch-free): Flax -> PyTorch layout -> Flax is bit-exact.

@pytest.mark.parametrize("registers", [0, 4])
@pytest.mark.parametrize("layout", ["hf4", "hf5", "fair"])
def test_dinov2_round_trip_bit_exact(registers, layout):
  model = DinoV2(size="tiny", num_registers=registers, pos_embed_grid=37, final_norm_affine=True)
  params = random_like_tree(init_params(model, jax.ShapeDtypeStruct((1, 224, 224, 3),
                                                                    jnp.float32)), registers)
  sd = convert.export_dinov2(params, layout=layout)
  back, arch, info = convert.convert_dinov2(sd)
  assert info["layout"] == layout and arch["pos_embed_grid"] == 37
  assert_trees_equal(back, params)


def _uae_params(seed=0, registers=4, with_modulator=True, num_bands=4):
  enc = DinoV2(size="tiny", num_registers=registers, pos_embed_grid=37, input_size=224)
  dec = decoder_lib.PixelDecoder(size="tiny")
  p = {"encoder": init_params(enc, jax.ShapeDtypeStruct((1, 256, 256, 3), jnp.float32)),
       "decoder": init_params(dec, jax.ShapeDtypeStruct((1, 16, 16, 64), jnp.float32))}
  if with_modulator:
    p["modulator"] = init_params(SpectralModulator(features=64, num_bands=num_bands),
                                 jax.ShapeDtypeStruct((num_bands, 1, 16, 16, 64), jnp.float32))
  return random_like_tree(p, seed)


@pytest.mark.parametrize("key_style", ["hf4", "hf5"])
def test_uae_round_trip_bit_exact_with_modulator(key_style, tmp_path):
  params = _uae_params(seed=5)
  path = str(tmp_path / "uae.safetensors")
  sd = convert.export_official_uae(params, path, key_style=key_style)
  assert sd["uae_jax_modulator.conv_in.weight"].shape == (64, 256, 3, 3)  # Conv2d OIHW
  assert sd["decoder.decoder_pos_embed"].shape == (1, 257, 64)
  assert not any(k.startswith("encoder.encoder.layernorm") for k in sd)
  assert torch_io.safetensors_metadata(path)["encoder_key_style"] == key_style
  back, arch = convert.import_official_uae(path)
  assert arch["recipe"] == "paper" and arch["modulator"] == {"features": 64, "num_bands": 4}
  assert arch["encoder"]["pos_embed_convention"] == "antialiased_bicubic"
  assert_trees_equal(back, params)
  # Through the CLI-level directory format as well.
  out = tmp_path / "imported"
  assert cli.main(["uae-import", "--src", path, "--out", str(out)]) == 0
  assert cli.main(["uae-export", "--src", str(out), "--out", str(tmp_path / "again.safetensors"),
                   "--key-style", key_style]) == 0
  again = torch_io.read_safetensors(str(tmp_path / "again.safetensors"))
  assert sorted(again) == sorted(sd) and all(np.array_equal(again[k], sd[k]) for k in sd)


def test_modulator_table_is_oihw():
  params = _uae_params(seed=2)["modulator"]
  sd = tables.to_torch(tables.modulator_table(), params)
  k = params["conv_in"]["kernel"]  # (3, 3, K*C, C)
  np.testing.assert_array_equal(sd["uae_jax_modulator.conv_in.weight"][5, 7, 2, 1], k[2, 1, 7, 5])
  assert_trees_equal(tables.to_flax(tables.modulator_table(), sd), params)


# ------------------------------------------------------------------------------------------------
# Synthetic official UAE checkpoint (torch).

HF4_ATTN = {"attention.q_proj": "attention.attention.query", "attention.k_proj":
            "attention.attention.key", "attention.v_proj": "attention.attention.value",
            "attention.o_proj": "attention.output.dense"}


def mae_sincos(dim, grid):
  """MAE's get_2d_sincos_pos_embed (as in the official decoder), add_cls_token=True."""
  def one_d(d, pos):
    omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=float) / (d / 2.0))
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)
  g = np.stack(np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32)), 0)
  g = g.reshape(2, 1, grid, grid)
  emb = np.concatenate([one_d(dim // 2, g[0]), one_d(dim // 2, g[1])], axis=1)
  return np.concatenate([np.zeros([1, dim]), emb], axis=0)[None].astype(np.float32)


def official_uae_state_dict(seed, enc_model=None):
  """Random tensors with exactly the official names/shapes (tiny: enc 64x2, 4 regs, 37x37 table;
  decoder 'tiny' 64 wide, 2 layers, MLP 128). Encoder names are transformers-4 ones."""
  import torch
  if enc_model is None:
    enc_model = gold.build_hf_dinov2(4, 518, seed=seed)
  sd = {}
  for k, v in enc_model.state_dict().items():
    if k.startswith("layernorm."):
      continue  # UAE's final LayerNorm has no affine parameters
    for new, old in HF4_ATTN.items():
      k = k.replace(new, old)
    sd["encoder.encoder." + k] = v.clone()
  g = torch.Generator().manual_seed(seed + 1)
  rnd = lambda *s: torch.randn(*s, generator=g) * (1.0 / s[-1] ** 0.5 if len(s) == 2 else 0.1)
  d, c, h = 64, 64, 128
  sd.update({"decoder.decoder_embed.weight": rnd(d, c), "decoder.decoder_embed.bias": rnd(d),
             "decoder.decoder_pos_embed": torch.from_numpy(mae_sincos(d, 16)),
             "decoder.trainable_cls_token": torch.randn(1, 1, d, generator=g)})
  for i in range(2):
    p = f"decoder.decoder_layers.{i}."
    for n in ("attention.attention.query", "attention.attention.key", "attention.attention.value",
              "attention.output.dense"):
      sd[p + n + ".weight"], sd[p + n + ".bias"] = rnd(d, d), rnd(d)
    sd[p + "intermediate.dense.weight"], sd[p + "intermediate.dense.bias"] = rnd(h, d), rnd(h)
    sd[p + "output.dense.weight"], sd[p + "output.dense.bias"] = rnd(d, h), rnd(d)
    for n in ("layernorm_before", "layernorm_after"):
      sd[p + n + ".weight"], sd[p + n + ".bias"] = 1 + rnd(d), rnd(d)
  sd["decoder.decoder_norm.weight"], sd["decoder.decoder_norm.bias"] = 1 + rnd(d), rnd(d)
  sd["decoder.decoder_pred.weight"], sd["decoder.decoder_pred.bias"] = rnd(768, d), rnd(768)
  return sd, enc_model


def torch_decoder_reference(sd, z):
  """The official decoder forward on latent z (B, 16, 16, C) with transformers' ViTMAE layers."""
  import torch
  from transformers import ViTMAEConfig
  from transformers.models.vit_mae.modeling_vit_mae import ViTMAELayer
  cfg = ViTMAEConfig(hidden_size=64, num_attention_heads=4, intermediate_size=128,
                     layer_norm_eps=1e-12, hidden_act="gelu", qkv_bias=True)
  cfg._attn_implementation = "eager"
  rename = [("attention.attention.query", "attention.q_proj"), ("attention.attention.key",
            "attention.k_proj"), ("attention.attention.value", "attention.v_proj"),
            ("attention.output.dense", "attention.o_proj"), ("intermediate.dense", "mlp.fc1"),
            ("output.dense", "mlp.fc2")]
  lin = lambda x, n: x @ sd[f"decoder.{n}.weight"].T + sd[f"decoder.{n}.bias"]
  ln = lambda x, n: torch.nn.functional.layer_norm(x, (64,), sd[f"decoder.{n}.weight"],
                                                   sd[f"decoder.{n}.bias"], 1e-12)
  with torch.no_grad():
    b = z.shape[0]
    x = lin(torch.from_numpy(np.array(z)).reshape(b, 256, 64), "decoder_embed")
    x = torch.cat([sd["decoder.trainable_cls_token"].expand(b, -1, -1), x], 1)
    x = x + sd["decoder.decoder_pos_embed"]
    for i in range(2):
      layer = ViTMAELayer(cfg).eval()
      p = f"decoder.decoder_layers.{i}."
      lsd = {}
      for k, v in sd.items():
        if k.startswith(p):
          k = k[len(p):]
          for old, new in rename:
            k = k.replace(old, new)
          lsd[k] = v
      layer.load_state_dict(lsd, strict=True)
      x = layer(x)
    x = lin(ln(x, "decoder_norm"), "decoder_pred")[:, 1:]
    x = x.reshape(b, 16, 16, 16, 16, 3)
    img = torch.einsum("nhwpqc->nchpwq", x).reshape(b, 3, 256, 256)
    mean = torch.tensor(gold.MEAN).view(1, 3, 1, 1)
    std = torch.tensor(gold.STD).view(1, 3, 1, 1)
    return (img * std + mean).numpy().transpose(0, 2, 3, 1)


@pytest.mark.torch
def test_official_uae_import_run_export(tmp_path):
  torch = pytest.importorskip("torch")
  from transformers import Dinov2WithRegistersModel
  sd_model, _ = official_uae_state_dict(seed=20)
  sd_ema, enc_model = official_uae_state_dict(seed=30)
  assert sd_ema["encoder.encoder.embeddings.position_embeddings"].shape == (1, 1370, 64)
  ckpt = {"model": sd_model, "ema": sd_ema, "step": 3, "epoch": 1,
          "optimizer": {"state": {0: {"exp_avg": torch.zeros(3)}}, "param_groups": [{"lr": 2e-4}]}}
  path = str(tmp_path / "ep-last.pt")
  torch.save(ckpt, path)

  params, arch = convert.import_official_uae(path)  # ema by default
  assert arch["recipe"] == "official" and "modulator" not in params
  assert arch["encoder"] == {"size": "tiny", "patch_size": 14, "num_registers": 4,
                             "input_size": 224, "pos_embed_grid": 37,
                             "pos_embed_convention": "antialiased_bicubic",
                             "final_norm_affine": False, "ln_eps": 1e-6}
  assert arch["decoder"] == {"size": "tiny", "patch_size": 16}
  np.testing.assert_array_equal(params["decoder"]["embed"]["kernel"],
                                sd_ema["decoder.decoder_embed.weight"].numpy().T)
  p_model, _ = convert.import_official_uae(path, which="model")
  np.testing.assert_array_equal(p_model["encoder"]["cls_token"],
                                sd_model["encoder.encoder.embeddings.cls_token"].numpy())

  # Run: our encoder on a 256 px photo vs HF (official preprocessing: torch bicubic 256 -> 224,
  # ImageNet normalisation, non-affine final LayerNorm), then our decoder vs the torch decoder.
  x = gold.photo(256)[None].astype(np.float32) / np.float32(255.0)
  enc, dec = DinoV2(**arch["encoder"]), decoder_lib.PixelDecoder(**arch["decoder"])
  with jax.default_matmul_precision("highest"):  # jitted: eager compiles one program per op
    z = np.asarray(jax.jit(lambda p, x: enc.apply({"params": p}, x))(params["encoder"],
                                                                     jnp.asarray(x)))
    img = np.asarray(jax.jit(lambda p, z: dec.apply({"params": p}, z))(params["decoder"],
                                                                       jnp.asarray(z)))
  with torch.no_grad():
    enc_model.layernorm.weight.fill_(1.0)
    enc_model.layernorm.bias.zero_()
    xt = torch.nn.functional.interpolate(torch.from_numpy(x.transpose(0, 3, 1, 2)), size=(224, 224),
                                         mode="bicubic", align_corners=False)
    pv = (xt - torch.tensor(gold.MEAN).view(1, 3, 1, 1)) / torch.tensor(gold.STD).view(1, 3, 1, 1)
    z_ref = enc_model(pixel_values=pv).last_hidden_state[:, 5:].numpy().reshape(1, 16, 16, 64)
  img_ref = torch_decoder_reference(sd_ema, z)
  err_z, err_img = float(np.abs(z - z_ref).max()), float(np.abs(img - img_ref).max())
  print(f"official UAE: encoder latent max abs err {err_z:.2e}, decoder image {err_img:.2e}")
  assert err_z <= ATOL and err_img <= ATOL

  # Export: the same key set, bit-identical tensors.
  out = str(tmp_path / "export.safetensors")
  exported = convert.export_official_uae(params, out)
  on_disk = torch_io.read_safetensors(out)
  assert sorted(on_disk) == sorted(sd_ema) == sorted(exported)
  for k, v in sd_ema.items():
    assert np.array_equal(on_disk[k], v.numpy()), k

  # transformers 5.23 keeps q/k/v/o_proj in memory: the hf5 export loads strictly into
  # Dinov2WithRegistersModel apart from the final layernorm (which UAE does not have).
  sd5 = convert.export_official_uae(params, None, key_style="hf5")
  enc5 = {k[len("encoder.encoder."):]: torch.from_numpy(v) for k, v in sd5.items()
          if k.startswith("encoder.encoder.")}
  fresh = gold.build_hf_dinov2(4, 518, seed=0)
  res = fresh.load_state_dict(enc5, strict=False)
  assert sorted(res.missing_keys) == ["layernorm.bias", "layernorm.weight"]
  assert res.unexpected_keys == []
  # The default hf4 names are the on-disk names HF's from_pretrained maps on load.
  d = tmp_path / "hf"
  fresh.save_pretrained(d)
  enc4 = {k[len("encoder.encoder."):]: v for k, v in exported.items()
          if k.startswith("encoder.encoder.")}
  enc4["layernorm.weight"], enc4["layernorm.bias"] = np.ones(64, np.float32), np.zeros(64, np.float32)
  torch_io.write_safetensors(enc4, str(d / "model.safetensors"), {"format": "pt"})
  loaded = Dinov2WithRegistersModel.from_pretrained(d).eval()
  for k, v in enc_model.state_dict().items():
    assert torch.equal(loaded.state_dict()[k], v), k


@pytest.mark.torch
def test_official_uae_errors(tmp_path):
  torch = pytest.importorskip("torch")
  sd, _ = official_uae_state_dict(seed=40)
  only_model = str(tmp_path / "only_model.pt")
  torch.save({"model": sd, "step": 1}, only_model)
  with pytest.raises(ConversionError, match="no 'ema' entry.*--which model"):
    convert.import_official_uae(only_model)
  assert convert.import_official_uae(only_model, which="model")[1]["recipe"] == "official"

  bad = dict(sd)
  bad["decoder.decoder_pos_embed"] = bad["decoder.decoder_pos_embed"] + 1e-3
  bad["encoder.encoder.layernorm.weight"] = torch.ones(64)   # extra
  del bad["decoder.decoder_layers.1.output.dense.bias"]       # missing
  bad["decoder.decoder_layers.1.intermediate.dense.weight"] = torch.zeros(127, 64)  # shape
  p = str(tmp_path / "bad.pt")
  torch.save({"ema": bad}, p)
  with pytest.raises(ConversionError) as e:
    convert.import_official_uae(p)
  msg = str(e.value)
  print(msg)
  for s in ("decoder.decoder_pos_embed: max |diff| 0.001", "encoder.encoder.layernorm.weight",
            "decoder.decoder_layers.1.output.dense.bias",
            "decoder.decoder_layers.1.intermediate.dense.weight (127, 64)"):
    assert s in msg
  assert len(e.value.problems) == 4
  # The architecture is inferred from block 0: a wrong width there makes every other MLP
  # tensor a named shape mismatch (the decoder itself would import as size='custom').
  bad = dict(sd)
  bad["decoder.decoder_layers.0.intermediate.dense.weight"] = torch.zeros(127, 64)
  torch.save({"ema": bad}, p)
  with pytest.raises(ConversionError, match=r"decoder.decoder_layers.1.output.dense.weight "
                                            r"\(64, 128\) -> decoder/blocks_1/mlp/fc2/kernel"):
    convert.import_official_uae(p)


# ------------------------------------------------------------------------------------------------
# Errors: every offending key in one message; bad files.

def _tiny_hf4_sd():
  return torch_io.read_safetensors(os.path.join(GOLDEN, "dinov2_tiny_reg4_hf.safetensors"))


def test_unmapped_unused_and_mismatched_keys_are_all_reported():
  sd = _tiny_hf4_sd()
  del sd["encoder.layer.1.mlp.fc2.bias"]
  del sd["embeddings.mask_token"]
  sd["encoder.layer.0.extra.weight"] = np.zeros(3, np.float32)
  sd["classifier.weight"] = np.zeros((10, 64), np.float32)
  sd["encoder.layer.0.layer_scale1.lambda1"] = np.zeros(63, np.float32)
  with pytest.raises(ConversionError) as e:
    convert.convert_dinov2(sd)
  cats = sorted(c for c, _ in e.value.problems)
  assert cats == ["missing PyTorch key"] * 2 + ["shape mismatch"] + ["unused PyTorch key"] * 2
  msg = str(e.value)
  for key in ("encoder.layer.1.mlp.fc2.bias", "embeddings.mask_token", "encoder.layer.0.extra.weight",
              "classifier.weight", "encoder.layer.0.layer_scale1.lambda1 (63,)"):
    assert key in msg


def test_wrong_architecture_is_refused(tmp_path):
  path = os.path.join(GOLDEN, "dinov2_tiny_reg4_hf.safetensors")
  with pytest.raises(ConversionError, match=r"architecture mismatch.*'tiny' \(dim 64, depth 2.*"
                                            r"size 'B' \(dim 768, depth 12"):
    convert.load_dinov2(path, size="B")
  assert cli.main(["dinov2", "--src", path, "--out", str(tmp_path / "o"), "--size", "L"]) == 2
  # A width that tells no head count (not a multiple of 64, no config.json) asks for num_heads.
  sd = {k: v for k, v in _tiny_hf4_sd().items()}
  sd["embeddings.cls_token"] = np.zeros((1, 1, 32), np.float32)
  sd["embeddings.patch_embeddings.projection.weight"] = np.zeros((32, 3, 14, 14), np.float32)
  with pytest.raises(ConversionError, match="cannot tell the number of attention heads.*"
                                            "--num-heads"):
    convert.convert_dinov2(sd)
  # A converted directory of one size does not load as another.
  out = str(tmp_path / "conv")
  assert cli.main(["dinov2", "--src", path, "--out", out]) == 0
  with pytest.raises(ConversionError, match="architecture mismatch"):
    convert.load_dinov2(out, size="S")
  # A tensor of the wrong size inside an otherwise right file: shape mismatch names it.
  sd = _tiny_hf4_sd()
  sd["encoder.layer.1.mlp.fc1.weight"] = np.zeros((255, 64), np.float32)
  with pytest.raises(ConversionError, match=r"encoder.layer.1.mlp.fc1.weight \(255, 64\)"):
    convert.convert_dinov2(sd)


def test_truncated_and_corrupt_safetensors(tmp_path):
  raw = open(os.path.join(GOLDEN, "dinov2_tiny_reg4_hf.safetensors"), "rb").read()
  p = tmp_path / "trunc.safetensors"
  p.write_bytes(raw[: len(raw) // 2])
  with pytest.raises(ConversionError, match="trunc.safetensors: truncated safetensors file"):
    convert.load_dinov2(str(p))
  p.write_bytes(raw[:4])
  with pytest.raises(ConversionError, match="truncated or corrupt"):
    convert.load_dinov2(str(p))
  p.write_bytes(raw[:8] + b"#" * 40)
  with pytest.raises(ConversionError, match="corrupt safetensors header|truncated"):
    convert.load_dinov2(str(p))
  with pytest.raises(ConversionError, match="no such file"):
    convert.load_dinov2(str(tmp_path / "missing.safetensors"))


class _Evil:
  """Unpickling this runs a shell command."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f"touch {self.marker}",))


@pytest.mark.torch
def test_bad_torch_files(tmp_path):
  torch = pytest.importorskip("torch")
  sd = {k: torch.from_numpy(v) for k, v in _tiny_hf4_sd().items()}
  good = tmp_path / "good.pth"
  torch.save(sd, good)
  params, _ = convert.load_dinov2(str(good))  # a plain state dict .pth loads
  assert params["pos_embed"].shape == (1, 325, 64)

  raw = good.read_bytes()
  (tmp_path / "trunc.pth").write_bytes(raw[: len(raw) // 2])
  with pytest.raises(ConversionError, match="trunc.pth: truncated or corrupt PyTorch file"):
    convert.load_dinov2(str(tmp_path / "trunc.pth"))
  (tmp_path / "empty.pt").write_bytes(b"")
  with pytest.raises(ConversionError, match="empty file"):
    convert.load_dinov2(str(tmp_path / "empty.pt"))

  marker = tmp_path / "pwned"
  torch.save({**sd, "evil": _Evil(str(marker))}, tmp_path / "evil.pth")
  with open(tmp_path / "evil_p2.pt", "wb") as f:  # plain pickle, protocol 2
    pickle.dump({"a": _Evil(str(marker))}, f, protocol=2)
  with open(tmp_path / "evil_p5.pkl", "wb") as f:  # plain pickle, newest protocol
    pickle.dump({"a": _Evil(str(marker))}, f, protocol=pickle.HIGHEST_PROTOCOL)
  for name, why in (("evil.pth", "posix.system"), ("evil_p2.pt", "posix.system"),
                    ("evil_p5.pkl", "Unsupported operand")):
    with pytest.raises(ConversionError, match=rf"refusing to load .*{name}.*{why}"):
      convert.load_dinov2(str(tmp_path / name))
    with pytest.raises(ConversionError, match="refusing to load"):
      convert.import_official_uae(str(tmp_path / name))
  assert not marker.exists()
  assert cli.main(["dino-disc", "--src", str(tmp_path / "evil.pth"), "--out",
                   str(tmp_path / "o")]) == 2
  assert not marker.exists()


# ------------------------------------------------------------------------------------------------
# DINO ViT-S/8 discriminator backbone table.

def _timm_vit_sd(dim=64, depth=2, mlp=256, patch=8, tokens=785, seed=0):
  rng = np.random.RandomState(seed)
  r = lambda *s: rng.randn(*s).astype(np.float32)
  sd = {"cls_token": r(1, 1, dim), "pos_embed": r(1, tokens, dim),
        "patch_embed.proj.weight": r(dim, 3, patch, patch), "patch_embed.proj.bias": r(dim),
        "norm.weight": r(dim), "norm.bias": r(dim)}
  for i in range(depth):
    b = f"blocks.{i}."
    for n, (o, k) in {"attn.qkv": (3 * dim, dim), "attn.proj": (dim, dim), "mlp.fc1": (mlp, dim),
                      "mlp.fc2": (dim, mlp)}.items():
      sd[b + n + ".weight"], sd[b + n + ".bias"] = r(o, k), r(o)
    for n in ("norm1", "norm2"):
      sd[b + n + ".weight"], sd[b + n + ".bias"] = r(dim), r(dim)
  return sd


def test_dino_disc_table_splits_qkv_and_round_trips(tmp_path):
  sd = _timm_vit_sd()
  with pytest.raises(ConversionError, match="not a DINO ViT-S/8.*dim 64, expected 384"):
    cdisc.convert_dino_disc(sd)
  params, arch = cdisc.convert_dino_disc(sd, expect=None)
  assert arch == {"dim": 64, "depth": 2, "num_heads": 1, "mlp_hidden": 256, "patch_size": 8,
                  "image_size": 224}
  assert {p: v.shape for p, v in tables.flatten(params).items()} == cdisc.disc_param_shapes(arch)
  qkv_w, qkv_b = sd["blocks.1.attn.qkv.weight"], sd["blocks.1.attn.qkv.bias"]
  x = np.random.RandomState(1).randn(5, 64).astype(np.float32)
  fused = x @ qkv_w.T + qkv_b
  a = params["blocks_1"]["attn"]
  split = np.concatenate([x @ a[n]["kernel"] + a[n]["bias"] for n in ("query", "key", "value")], 1)
  np.testing.assert_allclose(split, fused, rtol=1e-6, atol=1e-5)
  assert params["patch_embed"]["kernel"].shape == (8, 8, 3, 64)
  back = cdisc.export_dino_disc(params)
  assert sorted(back) == sorted(sd) and all(np.array_equal(back[k], sd[k]) for k in sd)
  zeroed, _ = cdisc.convert_dino_disc(sd, expect=None, zero_key_bias=True)
  np.testing.assert_array_equal(zeroed["blocks_0"]["attn"]["key"]["bias"], 0)
  # The real ViT-S/8 shapes pass the architecture check (file written, then the CLI).
  src = str(tmp_path / "dino_vit_small_patch8_224.safetensors")
  torch_io.write_safetensors(_timm_vit_sd(dim=384, depth=12, mlp=1536), src)
  assert cli.main(["dino-disc", "--src", src, "--out", str(tmp_path / "disc")]) == 0
  p2, a2 = cdisc.load_dino_disc(str(tmp_path / "disc"))
  assert a2 == cdisc.DINO_S8 and p2["pos_embed"].shape == (1, 785, 384)
  assert p2["blocks_11"]["mlp"]["fc1"]["kernel"].shape == (384, 1536)


# ------------------------------------------------------------------------------------------------
# CLI + output format.

def test_cli_dinov2_writes_msgpack_and_arch(tmp_path):
  src = os.path.join(GOLDEN, "dinov2_tiny_noreg_hf.safetensors")
  out = str(tmp_path / "out")
  assert cli.main(["dinov2", "--src", src, "--out", out, "--input-size", "252"]) == 0
  params, kwargs = convert.load_dinov2(out)
  ref, ref_kwargs = convert.load_dinov2(src, input_size=252)
  assert kwargs == ref_kwargs and kwargs["input_size"] == 252
  assert_trees_equal(params, ref)
  _, arch = convert.load_params(out)
  assert arch["model_class"] == "uae_jax.models.dinov2.DinoV2"
  assert arch["source"]["layout"] == "hf4" and len(arch["source"]["sha256"]) == 64
  DinoV2(**kwargs)  # the kwargs rebuild the model
  assert cli.main(["dinov2", "--src", src, "--out", out, "--variant", "timm"]) == 2


def test_bfloat16_safetensors_are_read_and_upcast_exactly(tmp_path):
  """safetensors.numpy cannot name bfloat16; the reader falls back to ml_dtypes (torch-free)."""
  import json
  import struct
  import ml_dtypes
  sd = _tiny_hf4_sd()
  bf = {k: v.astype(ml_dtypes.bfloat16) for k, v in sd.items()}
  header, blobs, off = {}, [], 0
  for k, v in bf.items():
    b = v.tobytes()
    header[k] = {"dtype": "BF16", "shape": list(v.shape), "data_offsets": [off, off + len(b)]}
    blobs.append(b)
    off += len(b)
  h = json.dumps(header).encode()
  p = tmp_path / "bf16.safetensors"
  p.write_bytes(struct.pack("<Q", len(h)) + h + b"".join(blobs))
  read = torch_io.read_safetensors(str(p))
  assert read["embeddings.cls_token"].dtype == ml_dtypes.bfloat16
  params, _ = convert.load_dinov2(str(p))
  assert params["cls_token"].dtype == np.float32
  np.testing.assert_array_equal(params["cls_token"], bf["embeddings.cls_token"].astype(np.float32))
  np.testing.assert_array_equal(params["blocks_1"]["mlp"]["fc1"]["kernel"],
                                bf["encoder.layer.1.mlp.fc1.weight"].astype(np.float32).T)


def test_dino_disc_table_matches_backbone_module():
  """The table's target tree is exactly what uae_jax.models.discriminator.DinoViTBackbone creates."""
  try:
    from uae_jax.models.discriminator import DinoViTBackbone
  except ImportError:
    pytest.skip("uae_jax.models.discriminator.DinoViTBackbone not available")
  for arch in (cdisc.DINO_S8, dict(cdisc.DINO_S8, dim=64, depth=2, num_heads=4, mlp_hidden=256)):
    got = cdino.model_param_shapes(DinoViTBackbone, arch, (1, 224, 224, 3))
    assert got == cdisc.disc_param_shapes(arch)
  sd = _timm_vit_sd()
  params, arch = cdisc.convert_dino_disc(sd, expect=None)
  # Abstract evaluation: the converted tree must fit the module (a shape check, no compile).
  feats = jax.eval_shape(lambda p: DinoViTBackbone(**arch).apply({"params": p}, jnp.zeros(
      (1, 224, 224, 3))), params)
  assert feats[0].shape == (1, 784, 64)  # final block patch tokens (CLS dropped)


# ------------------------------------------------------------------------------------------------
# Non-standard architectures: inferred from the shapes, size='custom', loaded through `load`.

def _hf_custom_dinov2(heads, registers=4, seed=11):
  """A randomised HF DINOv2 that is no named size: width 192, 4 layers, MLP 384, 98 px table."""
  from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel
  cfg = Dinov2WithRegistersConfig(hidden_size=192, num_hidden_layers=4, num_attention_heads=heads,
                                  mlp_ratio=2, patch_size=14, image_size=98,
                                  num_register_tokens=registers)
  model = Dinov2WithRegistersModel(cfg)
  gold.randomize_(model, seed)
  return model.eval()


CUSTOM_DIMS = {"dim": 192, "depth": 4, "mlp_hidden": 384, "swiglu": False}


@pytest.mark.torch
@pytest.mark.parametrize("heads,where", [(3, "file"), (6, "hf_dir")])
def test_non_standard_dinov2_converts_with_parity(heads, where, tmp_path):
  """Width 192 / depth 4 / MLP 384 (no named size) converts; heads from dim // 64 for a bare
  file, from config.json for an HF directory (6 heads there, which dim // 64 would get wrong)."""
  torch = pytest.importorskip("torch")
  model = _hf_custom_dinov2(heads)
  if where == "hf_dir":
    model.save_pretrained(tmp_path / "hf")
    src = str(tmp_path / "hf")
  else:
    src = str(tmp_path / "custom.safetensors")
    torch_io.write_safetensors({k: v.numpy() for k, v in model.state_dict().items()}, src)
  out = str(tmp_path / "converted")
  assert cli.main(["dinov2", "--src", src, "--out", out, "--input-size", "112"]) == 0
  params, kwargs = convert.load_dinov2(out)
  assert kwargs["size"] == "custom" and kwargs["num_heads"] == heads
  assert {k: kwargs[k] for k in CUSTOM_DIMS} == CUSTOM_DIMS and kwargs["pos_embed_grid"] == 7
  _, arch = convert.load_params(out)
  assert arch["source"]["inferred"]["heads_from"] == ("dim // 64" if heads == 3 else "config.json")
  x = np.random.RandomState(4).rand(2, 112, 112, 3).astype(np.float32)
  ref_blocks, ref_last = gold.hf_forward(model, x)
  grid, blocks = run_dinov2(params, kwargs, x)
  errs = [float(np.abs(b - r).max()) for b, r in zip(blocks, ref_blocks)]
  err_grid = float(np.abs(grid - ref_last[:, 5:].reshape(2, 8, 8, 192)).max())
  print(f"custom DINOv2 ({heads} heads, {where}): blocks {errs}, grid {err_grid:.2e}")
  assert len(blocks) == 4 and max(errs) <= ATOL and err_grid <= ATOL
  if where == "hf_dir":
    # The bare file of a 6-head model needs the flag; the flag and config.json must agree.
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    p6, a6, _ = convert.convert_dinov2(sd, input_size=112, num_heads=6)
    assert a6 == kwargs
    assert_trees_equal(p6, params)
    with pytest.raises(ConversionError, match="num_heads=3 was given but config.json says num_attention_heads=6"):
      convert.load_dinov2(src, num_heads=3)


def test_named_size_is_still_validated_and_named():
  """A file of a named size keeps its name; asking for another size is still refused."""
  sd = _tiny_hf4_sd()
  _, arch, info = convert.convert_dinov2(sd)
  assert arch["size"] == "tiny" and "dim" not in arch
  assert info["inferred"] == dict(dim=64, depth=2, mlp_hidden=256, swiglu=False, num_heads=4,
                                  heads_from="named size 'tiny'")
  with pytest.raises(ConversionError, match=r"architecture mismatch.*size 'S'"):
    convert.convert_dinov2(sd, size="S")
  # An explicit head count that is not the named size's makes it a custom model.
  _, arch, _ = convert.convert_dinov2(sd, num_heads=2)
  assert arch["size"] == "custom" and arch["num_heads"] == 2


def test_dinov2_load_gives_the_config_layout_and_checks_the_architecture(tmp_path):
  from uae_jax.errors import LoadError
  from uae_jax.models import dinov2 as dinov2_lib
  src = os.path.join(GOLDEN, "dinov2_tiny_reg4_hf.safetensors")
  cfg = dict(kind="dinov2", size="tiny", num_registers=4, input_size=112, pos_embed_grid=18,
             pos_embed_convention="antialiased_bicubic", final_norm_affine=False,
             remat_policy="none", scan_blocks=True)
  scanned = dinov2_lib.load(src, cfg)  # raw file: converted on the fly
  assert "norm" not in scanned and scanned["blocks"]["mlp"]["fc1"]["kernel"].shape == (2, 64, 256)
  out = str(tmp_path / "conv")
  assert cli.main(["dinov2", "--src", src, "--out", out]) == 0
  unrolled = dinov2_lib.load(out, dict(cfg, scan_blocks=False))
  np.testing.assert_array_equal(unrolled["blocks_1"]["attn"]["key"]["kernel"],
                                scanned["blocks"]["attn"]["key"]["kernel"][1])
  with_norm = dinov2_lib.load(out, dict(cfg, final_norm_affine=True, scan_blocks=False))
  assert with_norm["norm"]["scale"].shape == (64,)
  # Custom dims equal to the named size are the same encoder.
  same = dict(cfg, size="custom", dim=64, depth=2, num_heads=4, mlp_hidden=256)
  assert sorted(dinov2_lib.load(out, same)) == sorted(scanned)
  for bad, what in ((dict(cfg, size="S"), "size 'tiny'.*model.encoder.size='S'"),
                    (dict(cfg, num_registers=0), "num_registers=4 but model.encoder.num_registers=0"),
                    (dict(cfg, pos_embed_grid=16), "pos_embed_grid=18"),
                    (dict(same, num_heads=2), "size 'tiny'.*4 heads.*'custom'.*2 heads")):
    with pytest.raises(LoadError, match=f"{out}: the DINOv2 weights do not fit the config: {what}"):
      dinov2_lib.load(out, bad)


def test_custom_decoder_round_trips_and_load_official_checks_the_config(tmp_path):
  """A decoder of no named size (width 96, 3 layers, MLP 200, 2 heads) exports and imports;
  `load_official` lays the UAE out as the config asks and refuses another architecture."""
  from uae_jax.convert import uae as cuae
  from uae_jax.errors import LoadError
  dec_cfg = dict(size="custom", dim=96, depth=3, num_heads=2, mlp_hidden=200, patch_size=8)
  dec = decoder_lib.PixelDecoder(**dec_cfg)
  enc = DinoV2(size="tiny", num_registers=4, pos_embed_grid=37, input_size=112)
  params = random_like_tree({
      "encoder": init_params(enc, jax.ShapeDtypeStruct((1, 112, 112, 3), jnp.float32)),
      "decoder": init_params(dec, jax.ShapeDtypeStruct((1, 8, 8, 64), jnp.float32))}, 3)
  path = str(tmp_path / "custom_uae.safetensors")
  convert.export_official_uae(params, path, decoder_grid=8)
  with pytest.raises(ConversionError, match="cannot tell the number of attention heads.*dim 96"):
    convert.import_official_uae(path, encoder_input_size=112)
  back, arch = convert.import_official_uae(path, encoder_input_size=112, decoder_num_heads=2)
  assert arch["decoder"] == dict(dec_cfg)
  assert_trees_equal(back, params)
  model_cfg = {"encoder": dict(size="tiny", num_registers=4, input_size=112, pos_embed_grid=37,
                               pos_embed_convention="antialiased_bicubic",
                               final_norm_affine=False, scan_blocks=False),
               "decoder": dict(dec_cfg, scan_blocks=True), "use_modulator": False, "num_bands": 4}
  loaded = cuae.load_official(path, model_cfg)  # heads from the config's custom decoder
  assert loaded["decoder"]["blocks"]["mlp"]["fc1"]["kernel"].shape == (3, 96, 200)
  assert "blocks_0" in loaded["encoder"]
  np.testing.assert_array_equal(loaded["decoder"]["blocks"]["attn"]["query"]["kernel"][2],
                                params["decoder"]["blocks_2"]["attn"]["query"]["kernel"])
  bad = dict(model_cfg, decoder=dict(dec_cfg, mlp_hidden=256))
  with pytest.raises(LoadError, match=f"{path}: the decoder is size 'custom' .*MLP 200.*MLP 256"):
    cuae.load_official(path, bad)
  with pytest.raises(LoadError, match=f"official UAE checkpoint {path} does not match the model: "
                                      r"missing params \[modulator/"):
    cuae.load_official(path, dict(model_cfg, use_modulator=True))
