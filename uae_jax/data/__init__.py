"""Input pipeline: sources (our ArrayRecord, TFDS ArrayRecord, bundled photos), transforms, Grain.

The trainer uses `default_input_config`, `make_train_iterator`, `make_eval_iterator` and
`to_global_array`; `python -m uae_jax.data.prepare` packs image folders. See docs/data.md.
"""
import importlib

# Resolved lazily so that `python -m uae_jax.data.prepare` does not import JAX and Grain, and does not
# import the prepare module twice (once as a package member, once as __main__).
_EXPORTS = {
    'default_input_config': 'uae_jax.data.config',
    'decode_error_count': 'uae_jax.data.pipeline',
    'make_eval_dataset': 'uae_jax.data.pipeline',
    'make_eval_iterator': 'uae_jax.data.pipeline',
    'make_train_dataset': 'uae_jax.data.pipeline',
    'make_train_iterator': 'uae_jax.data.pipeline',
    'to_global_array': 'uae_jax.data.pipeline',
    'build_photos_dataset': 'uae_jax.data.photos',
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
  """Imports the public names on first use."""
  if name in _EXPORTS:
    return getattr(importlib.import_module(_EXPORTS[name]), name)
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
