"""`python -m uae_jax.evaluate {recon, fid-stats, gen, probe, spectrum, latent-spectrum, compress}`: evaluate/cli.py."""
import sys

from uae_jax.evaluate import cli

if __name__ == "__main__":
  cli.main(sys.argv[1:])
