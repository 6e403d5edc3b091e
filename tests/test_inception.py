"""FID Inception-v3 in Flax vs pytorch-fid's InceptionV3 (FID blocks), with seeded random weights.

The golden file comes from tests/golden/make_inception_golden.py, run once in a separate venv
with torchvision + pytorch-fid. Here the same weights are rebuilt from the same numpy generator
(no torch), converted through our key table, and the Flax network must reproduce pytorch-fid's
2048-d features and intermediate block means to 1e-4.
"""
import os
import sys

import jax
import numpy as np
import pytest

from uae_jax.convert import torch_io
from uae_jax.convert.tables import ConversionError
from uae_jax.evaluate import inception as inc

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "golden"))
import make_inception_golden as golden  # noqa: E402  (numpy-only module level)

TOL = 1e-4


@pytest.fixture(scope="module")
def gold():
  with np.load(os.path.join(HERE, "golden", "inception_golden.npz"), allow_pickle=False) as z:
    return {k: z[k] for k in z.files}


@pytest.fixture(scope="module")
def torch_shapes(gold):
  """{key: shape} of pytorch-fid's real FID Inception state dict, as recorded in the golden file."""
  shapes, offset = {}, 0
  for key, n in zip(gold["keys"], gold["shapes_len"]):
    shapes[str(key)] = tuple(int(d) for d in gold["shapes_flat"][offset:offset + n])
    offset += n
  return shapes


@pytest.fixture(scope="module")
def variables(torch_shapes):
  return inc.convert_state_dict(golden.random_state_dict(torch_shapes, golden.SEED))


@pytest.fixture(scope="module")
def forward():
  model = inc.FIDInception()
  return jax.jit(lambda v, x: model.apply(v, x, return_blocks=True))


@pytest.mark.parametrize("with_logits", [False, True])
def test_key_table_covers_the_pytorch_fid_state_dict_exactly(torch_shapes, with_logits):
  ours = inc.torch_state_dict_shapes(with_logits)
  ignored = set(inc.ignored_torch_keys(with_logits))
  assert set(ours) | (set(torch_shapes) & ignored) == set(torch_shapes)
  assert not set(ours) & ignored
  assert {k: torch_shapes[k] for k in ours} == ours
  # 94 BasicConv2d x 5 (+ fc.weight) + 94 counters + fc.weight/bias
  assert len(ours) == 470 + with_logits and len(torch_shapes) == 566


def test_resize_is_torch_bilinear(gold):
  x = gold["images_a"].astype(np.float32) / 255.0
  resized = np.asarray(inc.resize_bilinear_torch(x))[:, ::golden.SUBSAMPLE, ::golden.SUBSAMPLE]
  np.testing.assert_allclose(resized, gold["resized_a"], rtol=0, atol=1e-6)
  # Rows of the resampling matrix are convex weights (bilinear), for up- and downsampling.
  for n in (64, 299, 512):
    m = inc.torch_bilinear_matrix(n, 299)
    np.testing.assert_allclose(m.sum(1), 1.0, atol=1e-6)


@pytest.mark.parametrize("tag", ["a", "b"])  # a: 2 x 128 px (upsampled), b: 1 x 320 px (down)
def test_features_match_pytorch_fid(gold, variables, forward, tag):
  x = gold[f"images_{tag}"].astype(np.float32) / 255.0
  out = jax.device_get(forward(variables, x))
  ref = gold[f"pool_{tag}"]
  assert out["pool"].shape == ref.shape == (len(x), 2048)
  err = np.max(np.abs(out["pool"] - ref))
  assert err <= TOL, f"2048-d features differ by {err}"
  for name in golden.BLOCKS:
    mean = out[name].mean(axis=(1, 2))
    np.testing.assert_allclose(mean, gold[f"mean_{name}_{tag}"], rtol=0, atol=TOL, err_msg=name)


def test_golden_features_are_not_degenerate(gold):
  pools = np.concatenate([gold["pool_a"], gold["pool_b"]])
  # Across-image variation is ~5000x the tolerance: a wrong layer cannot hide below it.
  assert pools.std(axis=0).mean() > 1000 * TOL
  assert np.abs(pools[0] - pools[1]).max() > 1.0


def test_other_weights_give_other_features(gold, torch_shapes, forward):
  other = inc.convert_state_dict(golden.random_state_dict(torch_shapes, golden.SEED + 1))
  x = gold["images_a"].astype(np.float32) / 255.0
  out = np.asarray(forward(other, x)["pool"])
  assert np.max(np.abs(out - gold["pool_a"])) > 100 * TOL


def test_conversion_fails_loudly_and_lists_every_problem(torch_shapes):
  sd = golden.random_state_dict(torch_shapes, 0)
  bad = dict(sd)
  del bad["Mixed_6b.branch7x7_2.conv.weight"]
  bad["Mixed_5b.branch1x1.bn.running_var"] = np.ones((65,), np.float32)
  bad["Mixed_7c.extra.weight"] = np.zeros((3,), np.float32)
  with pytest.raises(ConversionError) as e:
    inc.convert_state_dict(bad)
  msg = str(e.value)
  assert "missing PyTorch key" in msg and "Mixed_6b.branch7x7_2.conv.weight" in msg
  assert "unused PyTorch key" in msg and "Mixed_7c.extra.weight" in msg
  assert "shape mismatch" in msg and "Mixed_5b.branch1x1.bn.running_var" in msg


def test_wrapper_layout_and_export_round_trip(torch_shapes, variables):
  sd = golden.random_state_dict(torch_shapes, golden.SEED)
  # pytorch-fid's InceptionV3 wrapper names the same modules blocks.<i>.<j>.
  wrapper = {}
  for k, v in sd.items():
    for new, old in inc._WRAPPER_PREFIXES.items():
      if k.startswith(old):
        k = new + k[len(old):]
        break
    wrapper[k] = v
  assert any(k.startswith("blocks.3.2.") for k in wrapper)
  converted = inc.convert_state_dict(wrapper)
  for a, b in zip(jax.tree.leaves(converted), jax.tree.leaves(variables)):
    np.testing.assert_array_equal(a, b)
  exported = inc.export_state_dict(variables)
  assert set(exported) == set(inc.torch_state_dict_shapes(with_logits=True))
  for k, v in exported.items():
    np.testing.assert_array_equal(v, sd[k])


def test_load_inception_from_safetensors(tmp_path, torch_shapes, variables):
  path = str(tmp_path / "fid_inception.safetensors")
  torch_io.write_safetensors(golden.random_state_dict(torch_shapes, golden.SEED), path)
  loaded = inc.load_inception(path)
  assert jax.tree.structure(loaded) == jax.tree.structure(variables)
  for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(variables)):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(ConversionError, match="no such"):
    inc.load_inception(str(tmp_path / "missing.pth"))


# ------------------------------------------------------------------------------------------------
# Generation-suite taps (sFID spatial, IS logits) and the TF1 (ADM / torch-fidelity) protocol.
# One network compile at 299 x 299 serves both protocols: the preprocessing runs separately.


@pytest.fixture(scope="module")
def raw_forward():
  model = inc.FIDInception(resize_input=False, normalize_input=False, with_logits=True)
  return jax.jit(lambda v, x: model.apply(v, x, return_blocks=True))


@pytest.fixture(scope="module")
def protocol_outputs(gold, variables, raw_forward):
  """{protocol: outputs} for batches a and b stacked (3 images), computed once."""
  prep = jax.jit(inc.preprocess, static_argnums=(1,))
  out = {}
  for protocol in ("pytorch-fid", "tf1"):
    x = np.concatenate([np.asarray(prep(gold["images_a"], protocol)),
                        np.asarray(prep(gold["images_b"], protocol))])
    out[protocol] = jax.device_get(raw_forward(variables, x))
  return out


def test_tf1_resize_matches_torch_fidelity(gold):
  x = gold["images_a"].astype(np.float32)  # torch-fidelity resizes 0..255 values
  resized = np.asarray(inc.resize_bilinear_tf1(x))[:, ::golden.SUBSAMPLE, ::golden.SUBSAMPLE]
  np.testing.assert_allclose(resized, gold["tf_resized_a"], rtol=0, atol=2e-4)
  # TF1 legacy sampling differs from PyTorch's half-pixel one: the two must not coincide.
  assert np.max(np.abs(inc.tf1_bilinear_matrix(128, 299) - inc.torch_bilinear_matrix(128, 299))) \
      > 0.1
  for n in (64, 256, 299, 512):
    np.testing.assert_allclose(inc.tf1_bilinear_matrix(n, 299).sum(1), 1.0, atol=1e-6)
  np.testing.assert_array_equal(inc.tf1_bilinear_matrix(299, 299), np.eye(299))


@pytest.mark.parametrize("protocol,prefix", [("pytorch-fid", ""), ("tf1", "tf_")])
def test_gen_taps_match_pytorch_references(gold, protocol_outputs, protocol, prefix):
  """pool, sFID spatial tap and IS logits vs pytorch-fid (2x-1) / torch-fidelity (TF1)."""
  out = protocol_outputs[protocol]
  for name, shape in (("pool", (3, 2048)), ("spatial", (3, 17, 17, 7)), ("logits", (3, 1008))):
    ref = np.concatenate([gold[f"{prefix}{name}_a"], gold[f"{prefix}{name}_b"]])
    assert out[name].shape == ref.shape == shape
    err = np.max(np.abs(out[name] - ref))
    assert err <= TOL, f"{protocol} {name} differs by {err}"
    assert np.abs(ref).max() > 1000 * TOL  # not a trivially small signal


def test_protocols_give_different_features(protocol_outputs):
  a, b = protocol_outputs["pytorch-fid"]["pool"], protocol_outputs["tf1"]["pool"]
  assert np.max(np.abs(a - b)) > 100 * TOL


def test_logits_head_is_optional(torch_shapes):
  sd = golden.random_state_dict(torch_shapes, golden.SEED)
  assert inc.has_logits(inc.convert_state_dict(sd))
  trunk = {k: v for k, v in sd.items() if not k.startswith("fc.")}
  assert not inc.has_logits(inc.convert_state_dict(trunk))
  with pytest.raises(ConversionError, match="fc.weight"):
    inc.convert_state_dict(trunk, with_logits=True)
  bad = dict(sd, **{"fc.weight": np.zeros((1000, 2048), np.float32)})
  with pytest.raises(ConversionError, match="shape mismatch"):
    inc.convert_state_dict(bad)
