"""`python -m uae_jax.evaluate {recon, fid-stats, gen, probe, spectrum, latent-spectrum, compress}`: evaluate/cli.py."""
import sys

from uae_jax import host_malloc
from uae_jax.evaluate import cli

if __name__ == "__main__":
  cli.main(host_malloc.use_from_argv(sys.argv[1:]))
