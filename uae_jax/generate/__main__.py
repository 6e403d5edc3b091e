"""`python -m uae_jax.generate {sample, stats} ...`; see uae_jax/generate/cli.py."""
import sys

from uae_jax.generate import cli

if __name__ == "__main__":
  cli.main(sys.argv[1:])
