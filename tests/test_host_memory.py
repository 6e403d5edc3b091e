"""uae_jax.host_memory: with --host_malloc=retain a jitted call stops page-faulting its
temporaries back in after warm-up; with the system default every call faults them in again."""
import json
import os
import subprocess
import sys

import pytest

from uae_jax import host_memory

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A fresh process (the setting must precede the JAX backend): one program with ~96 MB of
# temporaries, called 8 times; prints whether the setting applied and each call's page faults.
CHILD = """
import json, resource, sys
from uae_jax import host_memory
applied = host_memory.apply(sys.argv[1])
import jax, jax.numpy as jnp
x = jnp.ones((8192, 1024), jnp.float32)
f = jax.jit(lambda x: jnp.cumsum(jnp.sin(x), 0).sum() + jnp.cos(x).T.sum(0)[0])
temp = f.lower(x).compile().memory_analysis().temp_size_in_bytes
faults = []
for _ in range(8):
  r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  f(x).block_until_ready()
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0)
print(json.dumps({"applied": applied, "temp": temp, "faults": faults}))
"""


def _run(mode: str) -> dict:
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "GLIBC_TUNABLES")}
  out = subprocess.run([sys.executable, "-c", CHILD, mode], cwd=REPO, env=env, check=True,
                       capture_output=True, text=True, timeout=300)
  return json.loads(out.stdout.strip().splitlines()[-1])


_REASON = host_memory.skip_reason()  # this process's backend may be running; the child's is not


@pytest.mark.skipif(_REASON is not None and "already running" not in _REASON,
                    reason=f"host_malloc=retain does not apply here: {_REASON}")
def test_retain_stops_per_call_page_faults():
  system, retain = _run("system"), _run("retain")
  pages = system["temp"] / 4096
  assert not system["applied"] and retain["applied"]
  # Default glibc: every call faults most of its temporaries' pages in again.
  assert min(system["faults"][-3:]) > 0.5 * pages, system
  # Retained: after the warm-up calls, (almost) none.
  assert max(retain["faults"][-2:]) < 0.01 * pages, retain


def test_bad_mode_and_late_call_are_reported():
  with pytest.raises(ValueError, match="host_malloc='keep'"):
    host_memory.apply("keep")
  import jax
  jax.devices()  # this test process's backend is running: too late to apply
  assert "already running" in host_memory.skip_reason()
  assert host_memory.apply("retain") is False
