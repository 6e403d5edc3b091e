"""Run a process under tcmalloc, so XLA:CPU's per-step temporaries stop page-faulting.

XLA:CPU allocates a compiled step's temporaries (1.14 GB for the B/B stage-1 step) afresh on
every call. glibc's malloc serves blocks that large with a new `mmap` and returns them on free,
so every step touches all those pages anew: 280,000 page faults and 0.4-0.85 s of kernel time per
B/B step on 2 cores. tcmalloc (gperftools; Debian/Ubuntu package `libtcmalloc-minimal4`) keeps
freed memory for reuse, so after one warm-up step the faults stop (docs/speed.md has the
measurements). A malloc cannot be swapped inside a running process, so `use` re-executes the
process (same pid, same command line) with tcmalloc in `LD_PRELOAD`, before JAX starts.

  host_malloc.use("auto")      # tcmalloc when installed, else carry on with the system malloc
  host_malloc.use("tcmalloc")  # tcmalloc or a one-line UserError naming the package to install
  host_malloc.use("system")    # leave the process as it started (glibc's malloc unless LD_PRELOAD)

Every command-line entry point takes `--host_malloc=auto|tcmalloc|system` (default auto): the
trainer, the demos, `uae_jax.evaluate` and `uae_jax.generate`, through `use_from_argv`.
"""
import ctypes.util
import os
import sys
from typing import Optional

from absl import flags

from uae_jax.errors import UserError

CHOICES = ("auto", "tcmalloc", "system")
# Defined once, here, for the absl entry points' --help; `use_from_argv` acts on it before absl
# parses anything (a malloc is chosen when the process starts).
flags.DEFINE_enum("host_malloc", "auto", CHOICES,
                  "auto: run under tcmalloc when installed; tcmalloc: require it; "
                  "system: keep the malloc the process started with.")
# The runtime library names gperftools installs (the minimal one has no heap profiler).
_NAMES = ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4")
_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib",
         "/usr/local/lib")


def find_tcmalloc() -> Optional[str]:
  """Path of an installed tcmalloc shared library, or None."""
  for d in _DIRS:
    for name in _NAMES:
      if os.path.isfile(os.path.join(d, name)):
        return os.path.join(d, name)
  # Elsewhere, a name the dynamic loader finds by itself (LD_PRELOAD takes bare names too).
  return ctypes.util.find_library("tcmalloc_minimal") or ctypes.util.find_library("tcmalloc")


def active() -> str:
  """'tcmalloc' if this process runs under tcmalloc, else 'system'."""
  try:
    with open("/proc/self/maps") as f:
      return "tcmalloc" if "libtcmalloc" in f.read() else "system"
  except OSError:  # not Linux
    return "system"


def split_argv(argv, default: str = "auto") -> tuple:
  """(the `--host_malloc=X` / `--host_malloc X` choice in a command line, else `default`; the
  command line without the option)."""
  choice, rest, i = default, [], 0
  while i < len(argv):
    if argv[i].startswith("--host_malloc="):
      choice = argv[i].split("=", 1)[1]
    elif argv[i] == "--host_malloc" and i + 1 < len(argv):
      choice, i = argv[i + 1], i + 1
    else:
      rest.append(argv[i])
    i += 1
  return choice, rest


def use_from_argv(argv: list) -> list:
  """Acts on `--host_malloc` in a command line (may re-execute the process); returns the command
  line without it, for parsers that do not define it. A bad choice ends with one line, exit 2."""
  choice, rest = split_argv(argv)
  try:
    use(choice)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  return rest


def use(choice: str) -> str:
  """Re-executes this process under tcmalloc if `choice` asks for it; returns the malloc in use."""
  if choice not in CHOICES:
    raise UserError(f"--host_malloc={choice}: expected one of {', '.join(CHOICES)}")
  current = active()
  if choice == "system" or current == "tcmalloc":
    return current
  path = find_tcmalloc()
  preloaded = os.environ.get("LD_PRELOAD", "").split()
  if path is None or path in preloaded:  # not installed, or preloaded without effect: no loop
    if choice == "tcmalloc":
      why = ("it was preloaded but did not load" if path else
             "it is not installed (Debian/Ubuntu: apt-get install libtcmalloc-minimal4)")
      raise UserError(f"--host_malloc=tcmalloc: {why}")
    return "system"
  sys.stdout.flush()
  sys.stderr.flush()
  # Release rate 0: freed pages are never handed back to the kernel (the next step needs them
  # again; at the default rate 1 a call in a few still page-faults its temporaries in anew).
  env = dict(os.environ, LD_PRELOAD=" ".join([path] + preloaded))
  env.setdefault("TCMALLOC_RELEASE_RATE", "0")
  os.execve(sys.executable, sys.orig_argv, env)
