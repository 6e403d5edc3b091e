"""TensorFlow-free metric writing: TensorBoard event files (tensorboardX), JSONL, PNG grids, console.

CLU's writers import TensorFlow unconditionally (CommonLoopUtils #358), so this small writer
keeps CLU's method names (`write_scalars`, `write_images`, `flush`, `close`) without it.
Only JAX process 0 writes; other processes get a writer whose methods do nothing.
"""
import io
import json
import os
import time
from typing import Mapping, Optional

import numpy as np
from absl import logging
from etils import epath
from PIL import Image


class _QuietLibraries:
  """absl log filter: drops INFO chatter from Orbax/Grain internals (warnings still pass)."""

  def filter(self, record):
    noisy = any(f"/{lib}/" in record.pathname for lib in ("orbax", "grain", "tensorstore"))
    return record.levelno >= 30 or not noisy


def quiet_library_logs():
  """Keeps the console readable: library INFO lines are dropped, our own lines and warnings kept."""
  logging.get_absl_handler().addFilter(_QuietLibraries())


def is_remote(path: str) -> bool:
  """True for object-store paths such as gs://bucket/run (handled through etils.epath + gcsfs)."""
  return "://" in str(path)


def _summary_writer_class():
  """tensorboardX's SummaryWriter, imported without pulling in PyTorch.

  tensorboardX imports torch when it is installed (only to accept torch tensors), which costs
  ~4 s in every training process of an environment that also converts PyTorch weights. We only
  pass numpy, so torch is hidden during that one import unless something already loaded it.
  """
  import sys
  if "torch" in sys.modules or "tensorboardX" in sys.modules:
    from tensorboardX import SummaryWriter
    return SummaryWriter
  sys.modules["torch"] = None  # makes `import torch` raise ImportError, which tensorboardX handles
  try:
    from tensorboardX import SummaryWriter
  finally:
    del sys.modules["torch"]
  return SummaryWriter


class MetricWriter:
  """Writes scalars to `<workdir>/metrics.jsonl` and TensorBoard, images to PNG and TensorBoard.

  Local workdirs append to the JSONL file; on object stores (gs://), which cannot append, the
  file is rewritten from memory at every `flush` (it holds one short line per log step).
  TensorBoard event files need a local directory (tensorboardX writes to GCS only through
  TensorFlow), so for remote workdirs they go to `$UAE_JAX_LOCAL_TB` or are skipped with a warning.
  """

  def __init__(self, workdir: str, enabled: bool = True, tensorboard: bool = True):
    self.workdir = epath.Path(workdir)
    self.enabled = enabled
    self.remote = is_remote(workdir)
    self._tb = None
    self._jsonl = None
    self._lines = []
    if not enabled:
      return
    self.workdir.mkdir(parents=True, exist_ok=True)
    if not self.remote:
      self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
    elif (self.workdir / "metrics.jsonl").exists():
      # Object stores cannot append: a resumed run rewrites the whole file, so start from it.
      self._lines = (self.workdir / "metrics.jsonl").read_text().splitlines()
    tb_dir = os.path.join(workdir, "tensorboard") if not self.remote else os.environ.get(
        "UAE_JAX_LOCAL_TB", "")
    if tensorboard and tb_dir:
      self._tb = _summary_writer_class()(tb_dir)
    elif tensorboard:
      logging.warning("workdir %s is remote: TensorBoard events skipped (set UAE_JAX_LOCAL_TB to "
                      "a local directory to keep them); metrics.jsonl is still written", workdir)

  def write_scalars(self, step: int, scalars: Mapping[str, float]):
    """One JSONL line and one TensorBoard scalar per entry."""
    if not self.enabled:
      return
    row = {"step": int(step), "time": time.time()}
    row.update({k: float(v) for k, v in scalars.items()})
    if self._jsonl is not None:
      self._jsonl.write(json.dumps(row) + "\n")
      self._jsonl.flush()
    else:
      self._lines.append(json.dumps(row))
    if self._tb is not None:
      for k, v in scalars.items():
        self._tb.add_scalar(k, float(v), int(step))

  def write_images(self, step: int, images: Mapping[str, np.ndarray]):
    """HWC uint8 images to `<workdir>/images/<name>_<step>.png` and TensorBoard."""
    if not self.enabled:
      return
    folder = self.workdir / "images"
    folder.mkdir(parents=True, exist_ok=True)
    for name, img in images.items():
      buf = io.BytesIO()
      Image.fromarray(img).save(buf, format="PNG")
      (folder / f"{name}_{int(step):07d}.png").write_bytes(buf.getvalue())
      (folder / f"{name}_latest.png").write_bytes(buf.getvalue())
      if self._tb is not None:
        self._tb.add_image(name, img, int(step), dataformats="HWC")

  def flush(self):
    """Flushes pending TensorBoard events (and rewrites a remote metrics.jsonl)."""
    if self._tb is not None:
      self._tb.flush()
    if self.enabled and self.remote:
      (self.workdir / "metrics.jsonl").write_text("\n".join(self._lines) + "\n")

  def close(self):
    """Closes the files."""
    self.flush()
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
