"""Official DiT^DH checkpoints -> our DiTDH: parity with an independent PyTorch module, round trips,
one-line errors on bad files.

The PyTorch side (`tests/torch_dit_reference.py`) is written from the specification with the
official module and parameter names; its random-weight `state_dict()` is saved the way the official
training saves checkpoints ({'model', 'ema', ...}) and converted with `uae_jax.convert.dit`.
"""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from tests import torch_dit_reference as ref
from uae_jax.convert import __main__ as convert_cli
from uae_jax.convert import dit as dit_convert
from uae_jax.errors import LoadError
from uae_jax.models import dit as dit_lib

TOL = 1e-4
# The named 'tiny' sizes: body 64 wide, 2 deep, 4 heads; head 128 wide, 1 deep, 4 heads.
TINY = dict(hidden_size=(64, 128), depth=(2, 1), num_heads=(4, 4), num_classes=10)


def _torch_model(patch=1, qk_norm=False, seed=0):
  """A random-weight reference DiT^DH on a 4 x 4 x 8 latent."""
  torch.manual_seed(seed)
  m = ref.DiTwDDTHead(input_size=4, patch_size=patch, in_channels=8, qk_norm=qk_norm, **TINY)
  return ref.randomize_(m, seed).eval()


def _inputs(b=3, seed=1):
  """(x NCHW, t, y) torch inputs."""
  g = torch.Generator().manual_seed(seed)
  x = torch.randn(b, 8, 4, 4, generator=g)
  return x, torch.tensor([0.03, 0.5, 0.97])[:b], torch.tensor([1, 7, 10])[:b]


def _save(model, path, extra_noise=True):
  """torch.save of an official-style training checkpoint (model, ema, step)."""
  sd = model.state_dict()
  ema = {k: v.clone() for k, v in sd.items()}
  if extra_noise:  # 'model' differs from 'ema', so picking the entry is tested
    ema["final_layer.linear.bias"] = ema["final_layer.linear.bias"] + 1.0
  torch.save({"model": sd, "ema": ema, "step": 7}, path)


def _torch_blocks(model, x, t, y):
  """(output NCHW, every block's output) of the reference module, by forward hooks."""
  outs = []
  hooks = [b.register_forward_hook(lambda _m, _i, o: outs.append(o.detach().numpy()))
           for b in model.blocks]
  with torch.no_grad():
    out = model(x, t, y).numpy()
  for h in hooks:
    h.remove()
  return out, outs


@pytest.mark.parametrize("patch,qk_norm", [(1, False), (2, True)])
def test_converted_matches_torch_per_block(tmp_path, patch, qk_norm):
  tm = _torch_model(patch, qk_norm)
  path = str(tmp_path / "stage2.pt")
  _save(tm, path)
  params, info = dit_convert.import_official_dit(path, which="model")
  arch = info["kwargs"]
  assert arch == dict(kind="ddt", size="tiny", head_size="tiny", in_channels=8, input_size=4,
                      patch_size=patch, num_classes=10, qk_norm=qk_norm, num_freqs=256)
  x, t, y = _inputs()
  want, want_blocks = _torch_blocks(tm, x, t, y)
  model = dit_lib.build(arch)
  xj = jnp.asarray(x.numpy().transpose(0, 2, 3, 1))
  out, inter = jax.jit(lambda p: model.apply({"params": p}, xj, jnp.asarray(t.numpy()),
                                             jnp.asarray(y.numpy()), capture_intermediates=True)
                       )(params)
  names = ["blocks_0", "blocks_1", "head_blocks_0"]
  for name, w in zip(names, want_blocks):
    got = np.asarray(inter["intermediates"][name]["__call__"][0])
    np.testing.assert_allclose(got, w, atol=TOL, rtol=0, err_msg=name)
  np.testing.assert_allclose(np.asarray(out).transpose(0, 3, 1, 2), want, atol=TOL, rtol=0)
  assert np.abs(want).mean() > 1e-2  # not a comparison between zeros


def test_ema_entry_default_and_round_trip_bit_exact(tmp_path):
  tm = _torch_model()
  path = str(tmp_path / "ckpt.pt")
  _save(tm, path)
  params, info = dit_convert.import_official_dit(path)  # 'ema' by default
  assert info["source"]["which"] == "ema"
  np.testing.assert_array_equal(params["final_layer"]["linear"]["bias"],
                                tm.state_dict()["final_layer.linear.bias"].numpy() + 1.0)
  # Fourier frequencies: bit-exact import and export.
  w = tm.state_dict()["t_embedder.W"].numpy()
  assert np.array_equal(params["t_embedder"]["freqs"], w)
  sd = dit_convert.dit_to_state_dict(params, info["kwargs"])
  assert np.array_equal(sd["t_embedder.W"], w)
  # The export loads strictly into the reference module and gives back every tensor exactly.
  fresh = ref.DiTwDDTHead(input_size=4, patch_size=1, in_channels=8, **TINY)
  fresh.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=True)
  for k, v in tm.state_dict().items():
    if k == "final_layer.linear.bias":
      v = v + 1.0
    if k.endswith(("freqs_cos", "freqs_sin")) or k == "pos_embed":
      np.testing.assert_allclose(sd[k], v.numpy(), atol=1e-5, err_msg=k)  # our own fixed tables
    else:
      assert np.array_equal(sd[k], v.numpy()), k


def test_safetensors_export_reimports_and_loads_into_scanned_config(tmp_path):
  tm = _torch_model()
  path = str(tmp_path / "ckpt.pt")
  _save(tm, path, extra_noise=False)
  params, info = dit_convert.import_official_dit(path)
  out = str(tmp_path / "dit.safetensors")
  dit_convert.export_official_dit(params, info["kwargs"], out)
  cfg = dict(info["kwargs"], scan_blocks=True)
  loaded = dit_convert.load(out, cfg)
  assert loaded["blocks"]["norm1"]["weight"].shape == (2, 64)  # stacked for the scanned model
  again = dit_convert.unrolled(loaded)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(again)):
    assert np.array_equal(a, b)


def test_cli_import_export(tmp_path, capsys):
  tm = _torch_model()
  path = str(tmp_path / "ckpt.pt")
  _save(tm, path)
  out_dir = str(tmp_path / "conv")
  assert convert_cli.main(["dit", "--src", path, "--out", out_dir]) == 0
  assert "DiTDH" in capsys.readouterr().out
  st = str(tmp_path / "back.safetensors")
  assert convert_cli.main(["dit-export", "--src", out_dir, "--out", st]) == 0
  params = dit_convert.load(out_dir, dict(kind="ddt", size="tiny", head_size="tiny",
                                          in_channels=8, input_size=4, num_classes=10))
  assert params["t_embedder"]["freqs"].shape == (256,)


def _bad_state_dicts(sd):
  """(name, state dict, text the error must contain) of broken variants of a good state dict."""
  missing = {k: v for k, v in sd.items() if k != "blocks.1.mlp.w3.weight"}
  extra = dict(sd, **{"blocks.0.attn.extra.weight": torch.zeros(3)})
  shape = dict(sd, **{"blocks.0.mlp.w12.bias": torch.zeros(7)})
  pos = dict(sd, pos_embed=sd["pos_embed"] + 0.5)
  return [("missing", missing, "missing PyTorch key (1): blocks.1.mlp.w3.weight"),
          ("extra", extra, "unused PyTorch key (1): blocks.0.attn.extra.weight"),
          ("shape", shape, "blocks.0.mlp.w12.bias"),
          ("pos", pos, "fixed tensor differs")]


def test_bad_keys_give_one_line_load_error(tmp_path):
  sd = _torch_model().state_dict()
  for name, bad, text in _bad_state_dicts(sd):
    path = str(tmp_path / f"{name}.pt")
    torch.save({"ema": bad}, path)
    with pytest.raises(LoadError) as e:
      dit_convert.import_official_dit(path)
    msg = str(e.value)
    assert "\n" not in msg and path in msg and text in msg, (name, msg)


def test_garbage_and_wrong_files(tmp_path, capsys):
  garbage = str(tmp_path / "garbage.pt")
  with open(garbage, "wb") as f:
    f.write(os.urandom(4096))
  assert convert_cli.main(["dit", "--src", garbage, "--out", str(tmp_path / "o")]) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("error: ") and "\n" not in err and garbage in err
  no_ema = str(tmp_path / "noema.pt")
  torch.save({"model": _torch_model().state_dict()}, no_ema)
  with pytest.raises(LoadError, match="no 'ema' entry"):
    dit_convert.import_official_dit(no_ema)
  with pytest.raises(LoadError, match="no such file"):
    dit_convert.import_official_dit(str(tmp_path / "absent.pt"))


def test_config_mismatch_is_refused(tmp_path):
  path = str(tmp_path / "ckpt.pt")
  _save(_torch_model(), path)
  with pytest.raises(LoadError, match="num_classes: file 10, config 1000"):
    dit_convert.load(path, dict(kind="ddt", size="tiny", head_size="tiny", in_channels=8,
                                input_size=4, num_classes=1000))


@pytest.mark.slow
def test_dit_s_sized_body_parity(tmp_path):
  """DiT^DH-S body (384 / 12 / 6) with the DH head (2048 / 2 / 16) on a 4 x 4 x 32 latent."""
  torch.manual_seed(0)
  tm = ref.randomize_(ref.DiTwDDTHead(input_size=4, in_channels=32, hidden_size=(384, 2048),
                                     depth=(12, 2), num_heads=(6, 16), num_classes=10), 0, 0.02)
  tm.eval()
  path = str(tmp_path / "s.pt")
  torch.save({"ema": tm.state_dict()}, path)
  params, info = dit_convert.import_official_dit(path)
  assert (info["kwargs"]["size"], info["kwargs"]["head_size"]) == ("S", "DH")
  g = torch.Generator().manual_seed(3)
  x, t, y = torch.randn(2, 32, 4, 4, generator=g), torch.tensor([0.2, 0.8]), torch.tensor([3, 10])
  want, want_blocks = _torch_blocks(tm, x, t, y)
  model = dit_lib.build(info["kwargs"])
  out, inter = jax.jit(lambda p: model.apply(
      {"params": p}, jnp.asarray(x.numpy().transpose(0, 2, 3, 1)), jnp.asarray(t.numpy()),
      jnp.asarray(y.numpy()), capture_intermediates=True))(params)
  names = [f"blocks_{i}" for i in range(12)] + ["head_blocks_0", "head_blocks_1"]
  for name, w in zip(names, want_blocks):
    got = np.asarray(inter["intermediates"][name]["__call__"][0])
    np.testing.assert_allclose(got, w, atol=TOL * max(1.0, np.abs(w).max()), rtol=0, err_msg=name)
  np.testing.assert_allclose(np.asarray(out).transpose(0, 3, 1, 2), want, atol=TOL, rtol=0)


@pytest.mark.slow
def test_trainer_starts_from_init_dit(tmp_path):
  """`init.dit` puts the converted official weights into params and EMA of a trainer run."""
  from configs import dit as dit_config
  from uae_jax import train
  from uae_jax.data import pipeline
  torch.manual_seed(0)
  tm = ref.randomize_(ref.DiTwDDTHead(input_size=8, in_channels=64, **TINY), 0)
  path = str(tmp_path / "official.pt")
  torch.save({"model": tm.state_dict(), "ema": tm.state_dict()}, path)
  c = dit_config.get_config("tiny,steps=2")
  c.tokenizer.allow_random = True
  c.model.scan_blocks = True
  c.init.dit = path
  tr = train.Trainer(c, str(tmp_path / "run"))
  state, _ = tr.initial_state(pipeline.make_train_iterator(c.input))
  host = jax.device_get(state)
  want = dit_convert.in_layout(dit_convert.import_official_dit(path)[0], True)
  for key in ("params", "ema"):
    for a, b in zip(jax.tree.leaves(host[key]), jax.tree.leaves(want)):
      assert np.array_equal(a, b)
  tr.close()
