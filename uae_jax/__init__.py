"""uae_jax: Unified Autoencoding (The Prism Hypothesis) in JAX/Flax."""
__version__ = "0.1.0"
