"""Opt-in host malloc setting for CPU training: keep freed memory instead of faulting it back in.

XLA:CPU allocates an executable's temporaries afresh on every call (1.14 GB for the B/B stage-1
step). glibc serves blocks that large from fresh `mmap`s (for JAX's worker threads always), so
every step touches ~280,000 new pages; that cost 0.4-0.6 s of kernel time per 2.3 s step on a
quiet 2-core machine and 1.2-2.0 s next to other work (docs/speed.md). `retain_freed_memory`
sets glibc's `mallopt` so that freed blocks stay in the process and are reused: one arena (so
worker threads allocate from the main heap, not from mmap), no mmap'd blocks, and no trimming of
up to 2 GiB of free heap top (mallopt takes an int). After a few warm-up steps the step takes no
page faults; the price is that resident memory keeps its high-water mark (about 1 GB more at
B/B) and that one arena serialises malloc across threads.

It is opt-in (`python -m uae_jax.main --host_malloc=retain`, `bench.vs_torch --host_malloc
retain`): on a quiet machine the step was no faster (the user time rose by about what the kernel
time fell); it removes the page-fault cost where faults are expensive. It must run before JAX
starts its CPU backend (the first device query or computation): glibc applies the arena limit
only to threads that have no arena yet. It does nothing off glibc, with an accelerator plugin
installed (the step's memory is then on the device), or once the backend is running.
"""
import ctypes
import ctypes.util
import importlib.util
import platform

from absl import logging

# mallopt parameter numbers from glibc's <malloc.h>.
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -2, -4, -8
_INT_MAX = 2**31 - 1
_ACCELERATOR_PLUGINS = ("libtpu", "jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm7_plugin")
MODES = ("system", "retain")


def skip_reason():
  """Why `retain_freed_memory` would not apply in this process, or None."""
  if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
    return "not glibc on Linux"
  plugin = next((p for p in _ACCELERATOR_PLUGINS if importlib.util.find_spec(p)), None)
  if plugin:
    return f"accelerator plugin {plugin} is installed"
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
  if getattr(xla_bridge, "_backends", None):
    return "the JAX backend is already running (call this first in the process)"
  return None


def retain_freed_memory() -> bool:
  """Sets glibc malloc to keep freed memory for reuse (see the module doc); True if applied."""
  reason = skip_reason()
  if reason:
    logging.warning("--host_malloc=retain not applied: %s", reason)
    return False
  libc = ctypes.CDLL(ctypes.util.find_library("c"))
  settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _INT_MAX),
              (_M_TOP_PAD, _INT_MAX))
  ok = all(libc.mallopt(param, value) == 1 for param, value in settings)
  logging.info("host malloc keeps freed memory (one arena, no mmap, no trim): %s", ok)
  return ok


def apply(mode: str) -> bool:
  """`retain_freed_memory()` for mode 'retain'; nothing for 'system'."""
  if mode not in MODES:
    raise ValueError(f"host_malloc={mode!r}: expected one of {MODES}")
  return retain_freed_memory() if mode == "retain" else False
