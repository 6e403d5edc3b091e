"""Latent generation: flow-matching transport, samplers, the frozen tokenizer's latents, sampling CLI."""
