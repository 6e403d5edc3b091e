"""`python -m uae_jax.evaluate compress` (and the task module's `decompress`) on saved QG-VAE runs."""
import json
import os
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import qgvae as qg_config  # noqa: E402
from uae_jax.checkpoint import manager as ckpt_lib  # noqa: E402
from uae_jax.evaluate import cli  # noqa: E402
from uae_jax.tasks import qgvae as task  # noqa: E402


def _save_run(workdir: str, config, params) -> None:
  """A one-step 'run': the params and the config in the trainer's checkpoint layout."""
  mgr = ckpt_lib.CheckpointManager(ckpt_lib.checkpoint_dir(workdir), async_save=False)
  mgr.save(0, {"params": params, "step": np.int32(0)},
           meta={"config": config.to_json_best_effort()})
  mgr.wait()
  mgr.close()


def _one_line_exit(capsys, argv) -> str:
  """Runs the evaluate CLI expecting exit status 2 and returns its single stderr line."""
  with pytest.raises(SystemExit) as e:
    cli.main(argv)
  assert e.value.code == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: "), err
  return err[0]


def test_evaluate_compress_bad_workdirs_are_one_line_errors(tmp_path, capsys):
  """No run there, or a run of another task: one line naming the problem, exit 2."""
  line = _one_line_exit(capsys, ["compress", "--workdir", str(tmp_path / "nothing")])
  assert "nothing" in line and "checkpoints" in line
  other = qg_config.get_config("tiny")
  other.task = "uae"
  _save_run(str(tmp_path / "uae_run"), other, {"w": np.zeros((2,), np.float32)})
  line = _one_line_exit(capsys, ["compress", "--workdir", str(tmp_path / "uae_run")])
  assert "'uae' run, not a qgvae run" in line
  # The task module's own entry point shares the implementation and the error format.
  assert task.compress_main(["compress", "--workdir", str(tmp_path / "nothing")]) == 2
  assert capsys.readouterr().err.count("\n") == 1


@pytest.mark.slow
def test_evaluate_compress_then_decompress_round_trip(tmp_path):
  """compress writes indices that are the model's own; decoding the file reproduces the
  reconstructions whose PSNR compress reported (recomputed here in numpy from the uint8 images)."""
  c = qg_config.get_config("tiny")
  model = task.build_model(c)
  params = nn.unbox(model.init(jax.random.key(0), np.zeros((1, 16, 16, 3), np.float32))["params"])
  run, out = str(tmp_path / "run"), str(tmp_path / "out")
  _save_run(run, c, params)
  metrics = cli.main(["compress", "--workdir", run, "--data", "photos", "--max-images", "4",
                      "--out", out])
  assert metrics["num_images"] == 4 and metrics["tokens"] == 16
  assert metrics["bytes_fixed"] == 16 * 5 / 8
  assert json.load(open(os.path.join(out, "metrics.json")))["psnr"] == metrics["psnr"]
  assert os.path.getsize(os.path.join(out, "progressive.png")) > 0
  indices, meta = task.read_indices(os.path.join(out, "indices.npz"))
  assert indices.shape == (4, 16) and meta["source"] == run
  # The same eval images, straight from the pipeline.
  from uae_jax.data import pipeline
  inp = cli.apply_data_arg(c.input, "photos", max_examples=4)
  batch = next(iter(pipeline.make_eval_iterator(inp)))
  images = np.asarray(batch["image"], np.float32)[np.asarray(batch["mask"], bool)][:4]
  want = np.asarray(model.apply({"params": params}, images, method="indices"))
  np.testing.assert_array_equal(indices, want)
  recon_file = str(tmp_path / "recon.npz")
  assert task.compress_main(["decompress", "--workdir", run, "--file",
                             os.path.join(out, "indices.npz"), "--out", recon_file]) == 0
  with np.load(recon_file) as z:
    recon = z["images"].astype(np.float64)
  target = np.round(np.clip(images, 0, 1) * 255.0)
  mse = ((recon - target) ** 2).reshape(4, -1).mean(-1)
  psnr = float(np.mean(10 * np.log10(255.0 ** 2 / mse)))
  np.testing.assert_allclose(psnr, metrics["psnr"], atol=1e-3)
