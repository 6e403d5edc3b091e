"""Tests for the spectral modulator."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from uae_jax.models import bands as bands_lib
from uae_jax.models.modulator import SpectralModulator

K, C = 4, 16


def _bands(batch=2, size=8, seed=0):
  """Bands of a random latent, (K, B, H, W, C) float32."""
  z = np.random.default_rng(seed).standard_normal((batch, size, size, C)).astype(np.float32)
  return bands_lib.BandProjector(size, size, K).split(z)


def test_init_returns_exact_band_sum():
  bands = _bands()
  model = SpectralModulator(features=C, num_bands=K)
  variables = model.init(jax.random.key(0), bands)
  q = model.apply(variables, bands)
  assert q.shape == bands.shape[1:] and q.dtype == jnp.float32
  assert np.array_equal(np.asarray(q), np.asarray(bands.sum(0)))
  # bf16 compute: the zero-init residual still leaves the f32 band sum untouched.
  model16 = SpectralModulator(features=C, num_bands=K, dtype=jnp.bfloat16)
  q16 = model16.apply(model16.init(jax.random.key(0), bands), bands)
  assert q16.dtype == jnp.float32
  assert np.array_equal(np.asarray(q16), np.asarray(bands.sum(0)))


def test_perturbed_conv_out_changes_output():
  bands = _bands()
  model = SpectralModulator(features=C, num_bands=K)
  params = nn.unbox(model.init(jax.random.key(0), bands))["params"]
  kernel = params["conv_out"]["kernel"]
  params["conv_out"]["kernel"] = 0.1 * jax.random.normal(jax.random.key(1), kernel.shape)
  q = np.asarray(model.apply({"params": params}, bands))
  delta = q - np.asarray(bands.sum(0))
  assert np.abs(delta).mean() > 1e-3
  # The residual depends on the individual bands, not just their sum: swapping two bands
  # keeps the sum but changes the output.
  swapped = bands[jnp.array([1, 0, 2, 3])]
  q_swapped = np.asarray(model.apply({"params": params}, swapped))
  assert not np.allclose(q_swapped, q, atol=1e-4)
  # Bias only: a constant shift per channel.
  params["conv_out"]["kernel"] = jnp.zeros_like(kernel)
  params["conv_out"]["bias"] = jnp.arange(C, dtype=jnp.float32)
  q = np.asarray(model.apply({"params": params}, bands))
  np.testing.assert_allclose(q - np.asarray(bands.sum(0)),
                             np.broadcast_to(np.arange(C), q.shape), atol=1e-5)


def test_param_shapes_and_logical_axes():
  bands = _bands()
  variables = SpectralModulator(features=C, num_bands=K).init(jax.random.key(0), bands)
  params = variables["params"]
  expected = {
      ("conv_in", "kernel"): ((3, 3, K * C, C), (None, None, "embed", "mlp")),
      ("conv_in", "bias"): ((C,), ("mlp",)),
      ("conv_out", "kernel"): ((3, 3, C, C), (None, None, "mlp", "embed")),
      ("conv_out", "bias"): ((C,), ("embed",)),
  }
  assert set(params) == {"conv_in", "conv_out"}
  for (mod, name), (shape, axes) in expected.items():
    leaf = params[mod][name]
    assert isinstance(leaf, nn.LogicallyPartitioned)
    assert leaf.value.shape == shape and leaf.value.dtype == jnp.float32
    assert tuple(leaf.names) == axes
  unboxed = nn.unbox(params)
  assert not np.any(np.asarray(unboxed["conv_out"]["kernel"]))
  assert not np.any(np.asarray(unboxed["conv_out"]["bias"]))
  assert np.asarray(unboxed["conv_in"]["kernel"]).std() > 0


def test_shape_validation():
  model = SpectralModulator(features=C, num_bands=3)
  with pytest.raises(ValueError, match="num_bands"):
    model.init(jax.random.key(0), _bands())


def test_sharded_init_and_apply_match_single_device():
  mesh = jax.make_mesh((2, 4), ("data", "fsdp"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)
  rules = (("embed", "fsdp"), ("mlp", None))
  bands = _bands(batch=8, seed=1)
  model = SpectralModulator(features=C, num_bands=K)

  def init(rng):
    """Unboxed params with a perturbed conv_out, so the conv path is exercised."""
    params = nn.unbox(model.init(rng, bands))["params"]
    params["conv_out"]["kernel"] = 0.05 * jax.random.normal(
        jax.random.key(7), params["conv_out"]["kernel"].shape)
    return params

  ref_params = init(jax.random.key(0))
  ref = np.asarray(model.apply({"params": ref_params}, bands))

  abstract = jax.eval_shape(lambda r: model.init(r, bands), jax.random.key(0))
  specs = nn.get_partition_spec(abstract)["params"]
  shardings = nn.logical_to_mesh_sharding(specs, mesh, rules)
  assert shardings["conv_in"]["kernel"].spec == jax.sharding.PartitionSpec(
      None, None, "fsdp", None)
  with jax.set_mesh(mesh):
    params = jax.jit(init, out_shardings=shardings)(jax.random.key(0))
    batch_sharding = jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec(None, ("data", "fsdp")))
    out = jax.jit(lambda p, b: model.apply({"params": p}, b))(
        params, jax.device_put(bands, batch_sharding))
  assert len(params["conv_in"]["kernel"].sharding.device_set) == 8
  np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5)
