"""`python -m uae_jax.generate {sample, stats} ...`; see uae_jax/generate/cli.py."""
import sys

from uae_jax import host_malloc
from uae_jax.generate import cli

if __name__ == "__main__":
  cli.main(host_malloc.use_from_argv(sys.argv[1:]))
