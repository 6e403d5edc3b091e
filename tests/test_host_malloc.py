"""`--host_malloc`: the trainer re-executes itself under tcmalloc; XLA:CPU stops page-faulting."""
import os
import resource
import subprocess
import sys

import pytest

from uae_jax import host_malloc
from uae_jax.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TCMALLOC = host_malloc.find_tcmalloc()
needs_tcmalloc = pytest.mark.skipif(TCMALLOC is None,
                                    reason="tcmalloc not installed (apt-get install "
                                           "libtcmalloc-minimal4)")


def _python(code, *args, env=None):
  """Runs `python -c code args...` from the repository with the environment minus any preload."""
  e = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
  return subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, capture_output=True,
                        text=True, timeout=300, env=dict(e, **(env or {})))


def test_choice_parsing_and_errors(monkeypatch):
  split = host_malloc.split_argv
  assert split(["--x", "--host_malloc=system"]) == ("system", ["--x"])
  assert split(["--host_malloc", "tcmalloc", "--y=1"]) == ("tcmalloc", ["--y=1"])
  assert split(["--hostmalloc=system"]) == ("auto", ["--hostmalloc=system"])
  # Parsers that do not define the option (the evaluate / generate CLIs) never see it.
  assert host_malloc.use_from_argv(["recon", "--host_malloc", "system", "--x=1"]) == ["recon", "--x=1"]
  assert host_malloc.use_from_argv(["--host_malloc=system", "gen"]) == ["gen"]
  with pytest.raises(UserError, match="--host_malloc=jemalloc: expected one of auto"):
    host_malloc.use("jemalloc")
  if host_malloc.active() == "tcmalloc":
    pytest.skip("this test process already runs under tcmalloc")
  assert host_malloc.use("system") == "system"
  monkeypatch.setattr(host_malloc, "find_tcmalloc", lambda: None)
  assert host_malloc.use("auto") == "system"  # carries on, no re-exec
  with pytest.raises(UserError, match="not installed.*libtcmalloc-minimal4"):
    host_malloc.use("tcmalloc")
  # A preload that did not take (tcmalloc is in LD_PRELOAD, yet not loaded) must not loop.
  monkeypatch.setattr(host_malloc, "find_tcmalloc", lambda: "/nonexistent/libtcmalloc.so.4")
  monkeypatch.setenv("LD_PRELOAD", "/nonexistent/libtcmalloc.so.4")
  assert host_malloc.use("auto") == "system"
  with pytest.raises(UserError, match="preloaded but did not load"):
    host_malloc.use("tcmalloc")


@pytest.mark.parametrize("entry", [("uae_jax.main", "--config=configs/stage1.py:tiny"),
                                   ("uae_jax.demo",), ("uae_jax.demo_generate",),
                                   ("uae_jax.evaluate", "recon"), ("uae_jax.generate", "sample")])
def test_every_entry_point_rejects_a_bad_choice_in_one_line(tmp_path, entry):
  r = subprocess.run([sys.executable, "-m", *entry, f"--workdir={tmp_path}",
                      "--host_malloc=jemalloc"], cwd=REPO, capture_output=True, text=True,
                     timeout=300)
  assert r.returncode == 2
  assert r.stderr.strip().splitlines() == [
      "error: --host_malloc=jemalloc: expected one of auto, tcmalloc, system"]
  assert not os.listdir(tmp_path)


_REEXEC = """
import os, sys
from uae_jax import host_malloc
print("start", os.getpid(), host_malloc.active(), flush=True)
print("use", host_malloc.use(sys.argv[1]), os.getpid(), sys.argv[1:])
"""


@needs_tcmalloc
def test_auto_reexecutes_the_same_process_under_tcmalloc():
  r = _python(_REEXEC, "auto", "--keep=1")
  assert r.returncode == 0, r.stderr
  lines = r.stdout.splitlines()
  pid = lines[0].split()[1]
  # Started under glibc, re-executed (same pid, same arguments) under tcmalloc, then carried on.
  assert lines == [f"start {pid} system", f"start {pid} tcmalloc",
                   f"use tcmalloc {pid} ['auto', '--keep=1']"]
  r = _python(_REEXEC, "system")
  assert r.stdout.splitlines()[1:] == [f"use system {r.stdout.split()[1]} ['system']"]


_FAULTS = """
import resource, sys
import jax, jax.numpy as jnp
from uae_jax import host_malloc
host_malloc.use(sys.argv[1])
# Two cumulative sums are not fused: ~200 MB of float32 temporaries per call, little compute.
f = jax.jit(lambda x: jnp.cumsum(jnp.cumsum(jnp.tanh(x), 0)[::-1], 1).sum())
x = jnp.full((4096, 6144), 0.001, jnp.float32)
temp = f.lower(x).compile().memory_analysis().temp_size_in_bytes
for _ in range(3):
  f(x).block_until_ready()
faults = []
for _ in range(6):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  f(x).block_until_ready()
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(host_malloc.active(), temp, *faults)
"""


@needs_tcmalloc
def test_tcmalloc_stops_the_per_call_page_faults():
  """A jitted program with ~200 MB of temporaries: glibc page-faults them in on every call;
  under tcmalloc (after warm-up) the calls take (almost) none. Measured: 75,370 faults per call
  against 0-5; now and then one call of the six still faults its temporaries in (a freed span
  taken by another allocation), so one such call is allowed."""
  out = {}
  for choice in ("system", "tcmalloc"):
    r = _python(_FAULTS, choice, env={"JAX_PLATFORMS": "cpu"})
    assert r.returncode == 0, r.stderr[-2000:]
    name, temp, *faults = r.stdout.split()
    out[name] = [int(f) for f in faults]
  pages = int(temp) / resource.getpagesize()
  assert pages > 40_000
  assert min(out["system"]) > 0.9 * pages, out
  assert sorted(out["tcmalloc"])[-2] < 0.01 * pages, out
