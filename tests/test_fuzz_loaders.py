"""Malformed weight files and converted directories: every loader and CLI ends in one clean line.

Inputs are generated: random bytes, truncations of valid files at several offsets, and valid
containers (safetensors, torch zip, npz, params.msgpack + arch.json) holding the wrong things.
Each loader must raise a `LoadError` (a `UserError`) whose message is one line naming the file;
each CLI must print exactly one `error:` line naming it and exit with status 2.
"""
import json
import os
import struct
import subprocess
import sys

import numpy as np
import pytest

from uae_jax.convert import flax_io
from uae_jax.errors import LoadError, UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN = os.path.join(REPO, "tests", "golden", "dinov2_tiny_reg4_hf.safetensors")
DINO_CLASS = "uae_jax.models.dinov2.DinoV2"


def _write(path, data: bytes) -> str:
  with open(path, "wb") as f:
    f.write(data)
  return str(path)


def _safetensors(header, payload: bytes = b"\0" * 8) -> bytes:
  """A safetensors container with the given JSON header (valid framing, any content)."""
  raw = json.dumps(header).encode()
  return struct.pack("<Q", len(raw)) + raw + payload


def _converted_dir(root, name, arch, params: bytes) -> str:
  d = root / name
  d.mkdir()
  (d / flax_io.ARCH_FILE).write_bytes(arch if isinstance(arch, bytes) else json.dumps(arch).encode())
  (d / flax_io.PARAMS_FILE).write_bytes(params)
  return str(d)


def _bad_files(root) -> dict:
  """name -> path of malformed single files."""
  rng = np.random.default_rng(0)
  out = {}
  for seed, suffix in enumerate((".pt", ".pth", ".bin", ".safetensors", ".npz", "")):
    out[f"random{suffix}"] = _write(root / f"random{seed}{suffix}", rng.bytes(2048 + 97 * seed))
    out[f"empty{suffix}"] = _write(root / f"empty{seed}{suffix}", b"")
  good = open(GOLDEN, "rb").read()
  for cut in (3, 8, 64, len(good) // 2, len(good) - 1):
    out[f"safetensors cut at {cut}"] = _write(root / f"cut{cut}.safetensors", good[:cut])
  buf = root / "ok.npz"
  np.savez(buf, a=np.zeros((4, 4), np.float32))
  raw = buf.read_bytes()
  for cut in (10, len(raw) // 2, len(raw) - 5):
    out[f"npz cut at {cut}"] = _write(root / f"cut{cut}.npz", raw[:cut])
  out["header without data_offsets"] = _write(
      root / "no_offsets.safetensors", _safetensors({"w": {"dtype": "F32", "shape": [2]}}))
  out["header is a list"] = _write(root / "list_header.safetensors", _safetensors([1, 2]))
  out["header offsets reversed"] = _write(
      root / "reversed.safetensors",
      _safetensors({"w": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}))
  out["header shape too big"] = _write(
      root / "bigshape.safetensors",
      _safetensors({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}))
  out["header not JSON"] = _write(root / "garbage_header.safetensors",
                                  struct.pack("<Q", 6) + b"{garb}" + b"\0" * 8)
  out["unrelated tensors"] = _write(
      root / "unrelated.safetensors",
      _safetensors({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}))
  np.savez(root / "unrelated.npz", a=np.zeros(3, np.float32))
  out["unrelated npz"] = str(root / "unrelated.npz")
  return out


def _torch_files(root) -> dict:
  """Valid torch zip files with the wrong contents, and truncations of one (needs torch)."""
  try:
    import torch
  except ImportError:
    return {}
  out = {}
  torch.save({"foo": torch.zeros(3)}, root / "unrelated.pt")
  out["torch unrelated keys"] = str(root / "unrelated.pt")
  torch.save([1, 2, 3], root / "list.pt")
  out["torch list"] = str(root / "list.pt")
  torch.save({"ema": {"x": 3}}, root / "ema_int.pt")
  out["torch ema of ints"] = str(root / "ema_int.pt")
  raw = (root / "unrelated.pt").read_bytes()
  for cut in (10, 200, len(raw) // 2, len(raw) - 8):
    out[f"torch cut at {cut}"] = _write(root / f"cut{cut}.pt", raw[:cut])
  return out


def _bad_dirs(root) -> dict:
  """name -> malformed converted directory (params.msgpack + arch.json)."""
  from flax import serialization
  good = serialization.msgpack_serialize({"a": np.zeros(3, np.float32)})
  arch = {"format": flax_io.FORMAT, "model_class": DINO_CLASS,
          "kwargs": {"size": "tiny", "patch_size": 14, "pos_embed_grid": 2, "input_size": 28}}
  return {
      "arch.json not JSON": _converted_dir(root, "d_notjson", b"{not json", good),
      "arch.json a list": _converted_dir(root, "d_list", b"[1]", good),
      "arch.json without kwargs": _converted_dir(root, "d_nokw", {k: v for k, v in arch.items()
                                                                  if k != "kwargs"}, good),
      "params.msgpack empty": _converted_dir(root, "d_empty", arch, b""),
      "params.msgpack random": _converted_dir(root, "d_random", arch,
                                              np.random.default_rng(1).bytes(300)),
      "params.msgpack an int": _converted_dir(root, "d_int", arch,
                                              serialization.msgpack_serialize(5)),
      "params.msgpack truncated": _converted_dir(root, "d_cut", arch, good[: len(good) // 2]),
      "params of another model": _converted_dir(root, "d_wrongtree", arch, good),
  }


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory):
  """(files, containers with wrong contents, converted dirs): name -> path."""
  root = tmp_path_factory.mktemp("fuzz")
  files = _bad_files(root)
  wrong = {k: files.pop(k) for k in ("unrelated tensors", "unrelated npz")}
  torch_files = _torch_files(root)
  for k in ("torch unrelated keys", "torch ema of ints"):
    if k in torch_files:
      wrong[k] = torch_files.pop(k)
  files.update(torch_files)
  return files, wrong, _bad_dirs(root)


def _official_model_cfg():
  from configs import official_stage2
  return official_stage2.get_config("tiny").model


GENERIC_OK = ("unrelated tensors", "unrelated npz", "torch unrelated keys", "torch ema of ints",
              "arch.json without kwargs", "params of another model")


def _loaders():
  """name -> (loader(path), inputs it may accept: generic readers do not know the model)."""
  from uae_jax.convert import clip, dinov2, discriminator, siglip, torch_io, uae
  from uae_jax.evaluate import inception
  from uae_jax.models import lpips
  return {
      "torch_io.read_state_dict": (torch_io.read_state_dict, GENERIC_OK),
      "flax_io.load_params": (flax_io.load_params, GENERIC_OK),
      "dinov2.load_dinov2": (dinov2.load_dinov2, ()),
      "uae.import_official_uae": (uae.import_official_uae, ()),
      "uae.load_official": (lambda p: uae.load_official(p, _official_model_cfg()), ()),
      "clip.load_clip": (clip.load_clip, ()),
      "siglip.load_siglip": (siglip.load_siglip, ()),
      "discriminator.load_dino_disc": (discriminator.load_dino_disc, ()),
      "lpips.load_lpips_params": (lambda p: lpips.load_lpips_params("vgg16", p), ()),
      "lpips.load_torch_lpips_params": (lpips.load_torch_lpips_params, ()),
      "inception.load_inception": (inception.load_inception, ()),
  }


def _check_clean_error(load, name, path):
  """The loader raises a LoadError whose message is one line naming the file; returns it."""
  try:
    load(path)
  except LoadError as e:
    msg = str(e)
  except Exception as e:  # pylint: disable=broad-except
    pytest.fail(f"{name} ({path}): raw {type(e).__name__}: {e}")
  else:
    pytest.fail(f"{name} ({path}): no error")
  assert "\n" not in msg, (name, msg)
  assert os.path.basename(path.rstrip("/")) in msg, (name, msg)
  return msg


@pytest.mark.parametrize("loader", sorted(_loaders()))
def test_loader_turns_malformed_input_into_one_line_load_error(loader, bad_inputs):
  files, wrong, dirs = bad_inputs
  load, may_accept = _loaders()[loader]
  cases = {k: v for k, v in dict(files, **dirs, **wrong).items() if k not in may_accept}
  assert len(cases) >= 30
  for name, path in cases.items():
    _check_clean_error(load, f"{loader} on {name}", path)


def test_messages_say_what_is_wrong(bad_inputs):
  """Spot checks of the wording for the cases named in the issue."""
  from uae_jax.convert import dinov2, torch_io
  files, _, dirs = bad_inputs
  assert "truncated or corrupt PyTorch file" in _check_clean_error(
      dinov2.load_dinov2, "random .pt", files["random.pt"])
  assert "data_offsets" in _check_clean_error(
      torch_io.read_state_dict, "no offsets", files["header without data_offsets"])
  assert "arch.json" in _check_clean_error(flax_io.load_params, "arch", dirs["arch.json not JSON"])
  assert "empty file" in _check_clean_error(flax_io.load_params, "params",
                                            dirs["params.msgpack empty"])
  assert "does not match" in _check_clean_error(dinov2.load_dinov2, "tree",
                                                dirs["params of another model"])


def test_converted_dir_write_is_never_half_complete(tmp_path, monkeypatch):
  """A crash while writing params.msgpack leaves no arch.json, so the dir is not 'converted'."""
  out = str(tmp_path / "conv")
  flax_io.save_params(out, {"a": np.ones(3, np.float32)}, {"model_class": "x", "kwargs": {}})
  assert flax_io.is_converted_dir(out)
  from flax import serialization

  def boom(tree):
    raise OSError("disk full")

  monkeypatch.setattr(serialization, "msgpack_serialize", boom)
  with pytest.raises(OSError):
    flax_io.save_params(out, {"a": np.zeros(3, np.float32)}, {"model_class": "x", "kwargs": {}})
  assert not flax_io.is_converted_dir(out)
  assert sorted(os.listdir(out)) == [flax_io.PARAMS_FILE]  # the old params, no temp files


# ------------------------------------------------------------------------------------------------
# CLIs: one `error:` line naming the input, exit status 2.


def _one_error_line(stderr: str, must_name: str):
  """Asserts stderr has no traceback and exactly one `error:` line that names `must_name`."""
  assert "Traceback" not in stderr, stderr[-2000:]
  lines = [l for l in stderr.splitlines() if l.startswith("error:")]
  assert len(lines) == 1, stderr[-2000:]
  assert must_name in lines[0], lines[0]
  return lines[0]


def test_convert_cli(bad_inputs, tmp_path, capsys):
  from uae_jax.convert import __main__ as convert_cli
  files, wrong, dirs = bad_inputs
  out = str(tmp_path / "out")
  for argv, bad in ((["dinov2", "--src", files["random.pt"], "--out", out], files["random.pt"]),
                    (["uae-import", "--src", files["header without data_offsets"], "--out", out],
                     files["header without data_offsets"]),
                    (["uae-export", "--src", dirs["arch.json not JSON"], "--out",
                      str(tmp_path / "x.safetensors")], dirs["arch.json not JSON"]),
                    (["dino-disc", "--src", files["empty.pt"], "--out", out], files["empty.pt"]),
                    (["clip", "--src", wrong["unrelated tensors"], "--out", out],
                     wrong["unrelated tensors"]),
                    (["siglip2", "--src", dirs["params.msgpack empty"], "--out", out],
                     dirs["params.msgpack empty"])):
    assert convert_cli.main(argv) == 2, argv
    _one_error_line(capsys.readouterr().err, os.path.basename(bad))
  assert not os.path.exists(out) or not flax_io.is_converted_dir(out)
  assert not os.path.exists(tmp_path / "x.safetensors")


def test_evaluate_cli(bad_inputs, tmp_path, capsys):
  from uae_jax.evaluate import cli
  files, _, dirs = bad_inputs
  empty_run = tmp_path / "run"
  (empty_run / "checkpoints" / "7").mkdir(parents=True)  # a step directory with nothing in it
  cases = (
      (["recon", "--checkpoint", files["random.pt"], "--config",
        "configs/official_stage2.py:tiny"], files["random.pt"]),
      (["probe", "--workdir", str(empty_run)], "checkpoints"),
      (["recon", "--workdir", str(tmp_path / "missing")], "missing"),
      (["fid-stats", "--inception", files["npz cut at 10"], "--out", str(tmp_path / "s.npz")],
       files["npz cut at 10"]),
      (["gen", "--samples", files["random.npz"], "--ref", files["random.npz"]],
       files["random.npz"]),
      (["spectrum", "--encoder", "dinov2", "--dinov2", dirs["params.msgpack an int"], "--out",
        str(tmp_path / "sp")], dirs["params.msgpack an int"]),
  )
  cwd = os.getcwd()
  os.chdir(REPO)
  try:
    for argv, bad in cases:
      with pytest.raises(SystemExit) as e:
        cli.main(argv)
      assert e.value.code == 2, argv
      _one_error_line(capsys.readouterr().err, os.path.basename(bad))
  finally:
    os.chdir(cwd)
  assert not os.path.exists(tmp_path / "s.npz")


def test_prepare_cli(tmp_path, capsys):
  from uae_jax.data import prepare
  argv = ["--out", str(tmp_path / "o"), "--num-workers", "0", "--no-progress"]
  assert prepare.main(["--src", str(tmp_path / "nowhere")] + argv) == 2
  _one_error_line(capsys.readouterr().err, "nowhere")
  (tmp_path / "emptydir").mkdir()
  assert prepare.main(["--src", str(tmp_path / "emptydir")] + argv) == 2
  _one_error_line(capsys.readouterr().err, "emptydir")
  src = tmp_path / "src"
  src.mkdir()
  (src / "a.jpg").write_bytes(b"not an image")
  (tmp_path / "o").mkdir()
  (tmp_path / "o" / "train.manifest.json").write_text("{torn")
  assert prepare.main(["--src", str(src)] + argv) == 2
  _one_error_line(capsys.readouterr().err, "train.manifest.json")


def _run(module, *args):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1",
             JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=600)


def test_main_and_generate_clis(tmp_path):
  """Subprocesses, as users run them: a config typo, a run whose only checkpoint is empty."""
  r = _run("uae_jax.main", "--config=configs/stage1.py:tiny", f"--workdir={tmp_path / 'w'}",
           "--config.loss.l1x=1")
  assert r.returncode == 2
  _one_error_line(r.stderr, "l1x")
  run = tmp_path / "run"
  (run / "checkpoints" / "5").mkdir(parents=True)
  r = _run("uae_jax.generate", "sample", f"--workdir={run}", f"--out={tmp_path / 's.npz'}")
  assert r.returncode == 2, r.stderr[-3000:]
  _one_error_line(r.stderr, "checkpoints")


@pytest.mark.slow
def test_main_cli_with_no_readable_checkpoint(tmp_path):
  """The trainer stops before training with one line listing what it tried; nothing moves."""
  run = tmp_path / "run"
  (run / "checkpoints" / "5").mkdir(parents=True)
  r = _run("uae_jax.main", "--config=configs/stage1.py:tiny,steps=2", f"--workdir={run}")
  assert r.returncode == 2, r.stderr[-3000:]
  line = _one_error_line(r.stderr, "checkpoints")
  assert "no readable checkpoint" in line and "step 5" in line
  assert (run / "checkpoints" / "5").is_dir()
