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


# a: 2 x 128 px (upsampled), b: 1 x 320 px (down). b compiles the network once more for its shape:
# slow. By default its pool features and block means are checked through the same `preprocess`
# in test_gen_taps_match_pytorch_references (pytorch-fid protocol, a and b stacked).
@pytest.mark.parametrize("tag", ["a", pytest.param("b", marks=pytest.mark.slow)])
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


# pytorch-fid's `InceptionV3` wrapper (pytorch_fid/inception.py, use_fid_inception=True) written
# out by hand, not derived from the package's table: blocks[i][j] is the j-th module of block i.
# Block 0 ends with a MaxPool (j = 3) and block 1 with one (j = 2); neither has parameters.
PYTORCH_FID_BLOCKS = (
    ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3"),
    ("Conv2d_3b_1x1", "Conv2d_4a_3x3"),
    ("Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d",
     "Mixed_6e"),
    ("Mixed_7a", "Mixed_7b", "Mixed_7c"),
)

# Literal pytorch-fid parameter names and the Flax variable each must land in. Mixed_6c/6d and
# Mixed_7b/7c have identical shapes, so only the values tell a swapped table entry apart.
PINNED_WRAPPER_KEYS = {
    "blocks.0.0.bn.weight": ("params", "Conv2d_1a_3x3", "bn", "scale"),
    "blocks.0.2.bn.running_mean": ("batch_stats", "Conv2d_2b_3x3", "bn", "mean"),
    "blocks.1.1.bn.running_var": ("batch_stats", "Conv2d_4a_3x3", "bn", "var"),
    "blocks.2.0.branch5x5_1.bn.bias": ("params", "Mixed_5b", "branch5x5_1", "bn", "bias"),
    "blocks.2.3.branch3x3.bn.weight": ("params", "Mixed_6a", "branch3x3", "bn", "scale"),
    "blocks.2.5.branch7x7_2.bn.weight": ("params", "Mixed_6c", "branch7x7_2", "bn", "scale"),
    "blocks.2.6.branch7x7_2.bn.weight": ("params", "Mixed_6d", "branch7x7_2", "bn", "scale"),
    "blocks.3.0.branch7x7x3_4.bn.bias": ("params", "Mixed_7a", "branch7x7x3_4", "bn", "bias"),
    "blocks.3.1.branch_pool.bn.running_mean": ("batch_stats", "Mixed_7b", "branch_pool", "bn",
                                               "mean"),
    "blocks.3.2.branch_pool.bn.running_mean": ("batch_stats", "Mixed_7c", "branch_pool", "bn",
                                               "mean"),
}


def _leaf_at(tree, path):
  """The leaf of a nested dict at a tuple path."""
  for k in path:
    tree = tree[k]
  return np.asarray(tree)


def test_wrapper_layout_and_export_round_trip(torch_shapes, variables):
  sd = golden.random_state_dict(torch_shapes, golden.SEED)
  # The same weights under pytorch-fid's wrapper names, renamed by the hand-written block list.
  to_wrapper = {f"{name}.": f"blocks.{i}.{j}."
                for i, names in enumerate(PYTORCH_FID_BLOCKS) for j, name in enumerate(names)}
  wrapper = {}
  for k, v in sd.items():
    prefix = next((p for p in to_wrapper if k.startswith(p)), None)
    wrapper[k if prefix is None else to_wrapper[prefix] + k[len(prefix):]] = v
  assert len(wrapper) == len(sd) and "fc.weight" in wrapper  # every conv renamed, fc kept
  assert not any(k.startswith(("Conv2d_", "Mixed_")) for k in wrapper)
  converted = inc.convert_state_dict(wrapper)
  assert jax.tree.structure(converted) == jax.tree.structure(variables)
  leaves = zip(jax.tree_util.tree_leaves_with_path(converted), jax.tree.leaves(variables))
  for (path, a), b in leaves:
    np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))
  # Each pinned name, given a value of its own, lands where it must and nowhere else.
  marked = dict(wrapper)
  for n, key in enumerate(PINNED_WRAPPER_KEYS):
    marked[key] = np.full_like(wrapper[key], 1000.0 + n)
  converted = inc.convert_state_dict(marked)
  for n, (key, path) in enumerate(PINNED_WRAPPER_KEYS.items()):
    np.testing.assert_array_equal(_leaf_at(converted, path), 1000.0 + n, err_msg=key)
  hits = sum(int(np.sum(np.asarray(x) >= 1000.0)) for x in jax.tree.leaves(converted))
  assert hits == sum(wrapper[k].size for k in PINNED_WRAPPER_KEYS)
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
  if protocol == "pytorch-fid":  # pytorch-fid's intermediate block means, both image sizes
    for name in golden.BLOCKS:
      ref = np.concatenate([gold[f"mean_{name}_a"], gold[f"mean_{name}_b"]])
      np.testing.assert_allclose(out[name].mean(axis=(1, 2)), ref, rtol=0, atol=TOL,
                                 err_msg=name)


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
