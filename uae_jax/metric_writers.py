"""TensorFlow-free metric writing: TensorBoard event files (tensorboardX), JSONL, PNG grids, console.

CLU's writers import TensorFlow unconditionally (CommonLoopUtils #358), so this small writer
keeps CLU's method names (`write_scalars`, `write_images`, `flush`, `close`) without it.
Only JAX process 0 writes; other processes get a writer whose methods do nothing.
"""
import json
import os
import time
from typing import Mapping, Optional

import numpy as np
from absl import logging
from PIL import Image


class _QuietLibraries:
  """absl log filter: drops INFO chatter from Orbax/Grain internals (warnings still pass)."""

  def filter(self, record):
    noisy = any(f"/{lib}/" in record.pathname for lib in ("orbax", "grain", "tensorstore"))
    return record.levelno >= 30 or not noisy


def quiet_library_logs():
  """Keeps the console readable: library INFO lines are dropped, our own lines and warnings kept."""
  logging.get_absl_handler().addFilter(_QuietLibraries())


class MetricWriter:
  """Writes scalars to `<workdir>/metrics.jsonl` and TensorBoard, images to PNG and TensorBoard."""

  def __init__(self, workdir: str, enabled: bool = True, tensorboard: bool = True):
    self.workdir = workdir
    self.enabled = enabled
    self._tb = None
    self._jsonl = None
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
    if tensorboard:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write_scalars(self, step: int, scalars: Mapping[str, float]):
    """One JSONL line and one TensorBoard scalar per entry."""
    if not self.enabled:
      return
    row = {"step": int(step), "time": time.time()}
    row.update({k: float(v) for k, v in scalars.items()})
    self._jsonl.write(json.dumps(row) + "\n")
    self._jsonl.flush()
    if self._tb is not None:
      for k, v in scalars.items():
        self._tb.add_scalar(k, float(v), int(step))

  def write_images(self, step: int, images: Mapping[str, np.ndarray]):
    """HWC uint8 images to `<workdir>/images/<name>_<step>.png` and TensorBoard."""
    if not self.enabled:
      return
    folder = os.path.join(self.workdir, "images")
    os.makedirs(folder, exist_ok=True)
    for name, img in images.items():
      Image.fromarray(img).save(os.path.join(folder, f"{name}_{int(step):07d}.png"))
      Image.fromarray(img).save(os.path.join(folder, f"{name}_latest.png"))
      if self._tb is not None:
        self._tb.add_image(name, img, int(step), dataformats="HWC")

  def flush(self):
    """Flushes pending TensorBoard events."""
    if self._tb is not None:
      self._tb.flush()

  def close(self):
    """Closes the files."""
    if self._tb is not None:
      self._tb.close()
    if self._jsonl is not None:
      self._jsonl.close()


class ProgressLine:
  """Console progress: step, loss, images/s and ETA from a moving window of step times."""

  def __init__(self, total_steps: int, global_batch: int, start_step: int = 0):
    self.total = total_steps
    self.batch = global_batch
    self._last_step = start_step
    self._last_time = time.time()
    self.images_per_sec: Optional[float] = None

  def update(self, step: int, scalars: Mapping[str, float]) -> str:
    """Returns (and logs) the progress line for `step`; also records images/s."""
    now = time.time()
    dt, ds = now - self._last_time, step - self._last_step
    self._last_time, self._last_step = now, step
    if ds > 0 and dt > 0:
      self.images_per_sec = ds * self.batch / dt
    ips = self.images_per_sec or 0.0
    eta = (self.total - step) * self.batch / ips if ips else float("nan")
    parts = " ".join(f"{k}={scalars[k]:.4g}" for k in ("loss", "l1", "lpips", "semantic",
                                                       "gan_g", "gan_d") if k in scalars)
    line = f"step {step}/{self.total} | {parts} | {ips:.1f} img/s | ETA {_fmt(eta)}"
    logging.info(line)
    return line


def _fmt(seconds: float) -> str:
  """Seconds as h:mm:ss (or '?' when unknown)."""
  if not np.isfinite(seconds):
    return "?"
  s = int(seconds)
  return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def image_grid(rows: list, pad: int = 2) -> np.ndarray:
  """Tiles a list of rows (each a list of HWC float [0,1] images) into one uint8 image."""
  h, w = rows[0][0].shape[:2]
  ncol = max(len(r) for r in rows)
  out = np.ones((len(rows) * (h + pad) + pad, ncol * (w + pad) + pad, 3), np.float32)
  for i, row in enumerate(rows):
    for j, img in enumerate(row):
      y, x = pad + i * (h + pad), pad + j * (w + pad)
      out[y:y + h, x:x + w] = np.clip(np.asarray(img, np.float32), 0, 1)
  return np.round(out * 255).astype(np.uint8)
