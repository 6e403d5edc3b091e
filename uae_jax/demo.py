"""`make demo`: the three stages of the tiny paper recipe on the bundled real photos, on a CPU.

    python -m uae_jax.demo --workdir=runs/demo

Each stage runs `uae_jax.train` (the same trainer as full-size runs) in `<workdir>/stageN`,
starting from the previous stage's EMA. Afterwards `<workdir>` holds `summary.md` /
`summary.json` (PSNR/SSIM/LPIPS of the EMA params at the start and end of every stage) and
`reconstruction_grid.png` (original | reconstruction | cumulative band decodes b0, b0+b1, ...).
Re-running resumes or skips finished stages.
"""
import json
import os
import shutil
import sys

from absl import app
from absl import flags
from absl import logging

from uae_jax import host_malloc

_WORKDIR = flags.DEFINE_string("workdir", "runs/demo", "Output directory.")
DEFAULT_STEPS = (400, 400, 160)
_STEPS = flags.DEFINE_list("steps", [str(n) for n in DEFAULT_STEPS], "Steps of stages 1, 2, 3.")
# At 64 px the VGG16 of LPIPS is ~95 % of a tiny train step on a CPU (1.06 s vs 0.05 s at batch
# 8), so the demo trains on L1 (+ semantic, + GAN in stage 3) and only evaluates LPIPS.
_LPIPS = flags.DEFINE_float("lpips", 0.0, "LPIPS weight of the training loss (the recipe's 1.0 "
                            "makes each step ~20x slower on a CPU); evaluation always reports it.")


def stage_config(stage: int, steps: int, prev_workdir: str, lpips: float = 0.0):
  """The tiny paper-recipe config of one stage, chained to the previous stage's workdir."""
  import importlib
  module = importlib.import_module(f"configs.stage{stage}")
  c = module.get_config(f"tiny,steps={steps}")
  c.loss.lpips = lpips
  c.optim.peak_lr = 2e-3
  c.optim.end_lr = 2e-4
  c.log_every_steps = max(steps // 10, 1)
  c.ckpt.every_steps = max(steps // 2, 1)
  c.ckpt.keep = 1
  c.image_every_steps = steps
  c.eval_every_steps = steps
  c.eval_batches = 0  # the whole (10-photo) test split
  if prev_workdir:
    c.init.from_stage = prev_workdir
  return c


def _summary_table(rows) -> str:
  """Markdown table of the per-stage metrics."""
  lines = ["| stage | steps | PSNR start | PSNR end | SSIM end | LPIPS end | images/s |",
           "|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['stage']} | {r['steps']} | {r['psnr_start']:.2f} | {r['psnr_end']:.2f} | "
                 f"{r['ssim_end']:.4f} | {r['lpips_end']:.4f} | {r['images_per_sec'] or 0:.1f} |")
  return "\n".join(lines)


def run_demo(workdir: str, steps=DEFAULT_STEPS, lpips: float = 0.0) -> list:
  """Runs (or resumes) the three stages; returns one summary row per stage."""
  from uae_jax import train
  os.makedirs(workdir, exist_ok=True)
  rows, prev = [], ""
  for stage, n in zip((1, 2, 3), steps):
    wd = os.path.join(workdir, f"stage{stage}")
    done = os.path.join(wd, "summary.json")
    summary = json.load(open(done)) if os.path.exists(done) else {}
    if summary.get("final_step") != n:
      logging.info("=== demo: stage %d, %d steps, workdir %s", stage, n, wd)
      summary = train.train_and_evaluate(stage_config(stage, n, prev, lpips), wd)
    start = summary.get("eval_start", {})
    end = summary["eval_end"]
    rows.append(dict(stage=stage, steps=n, psnr_start=start.get("eval_ema/psnr", float("nan")),
                     psnr_end=end["eval_ema/psnr"], ssim_end=end["eval_ema/ssim"],
                     lpips_end=end["eval_ema/lpips"], images_per_sec=summary.get("images_per_sec")))
    prev = wd
  shutil.copy(os.path.join(prev, "images", "recon_ema_latest.png"),
              os.path.join(workdir, "reconstruction_grid.png"))
  shutil.copy(os.path.join(workdir, "stage1", "images", "recon_ema_0000000.png"),
              os.path.join(workdir, "reconstruction_grid_start.png"))
  with open(os.path.join(workdir, "summary.json"), "w") as f:
    json.dump(rows, f, indent=1)
  table = _summary_table(rows)
  with open(os.path.join(workdir, "summary.md"), "w") as f:
    f.write("# uae-jax demo: tiny paper recipe on the bundled photos (EMA params, test split)\n\n"
            + table + "\n\nGrids (original | reconstruction | cumulative band decodes b0, b0+b1, "
            "...): `reconstruction_grid_start.png` before stage 1, `reconstruction_grid.png` after "
            "stage 3.\n")
  print(table)
  return rows


def main(argv):
  del argv
  from uae_jax.metric_writers import quiet_library_logs
  quiet_library_logs()
  run_demo(_WORKDIR.value, tuple(int(s) for s in _STEPS.value), _LPIPS.value)


if __name__ == "__main__":
  host_malloc.use_from_argv(sys.argv[1:])
  app.run(main)
