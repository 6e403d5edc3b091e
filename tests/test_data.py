"""Tests of the input side: prepare, sources, transforms, Grain pipelines, iterator checkpoints."""
import io
import json
import os
import tempfile

import grain
import jax
import ml_collections
import numpy as np
from PIL import Image
import pytest

from uae_jax.data import config as data_config
from uae_jax.data import photos as photos_lib
from uae_jax.data import pipeline
from uae_jax.data import prepare
from uae_jax.data import sources
from uae_jax.data import transforms

from array_record.python import array_record_module


# ----------------------------------------------------------------------------------------------
# Fixtures and helpers


@pytest.fixture(scope='session')
def photos_dir(tmp_path_factory):
  """The bundled photos dataset, built once per session in a temporary directory."""
  return photos_lib.build_photos_dataset(str(tmp_path_factory.mktemp('photos')))


def _cfg(data_dir, **overrides):
  """A small photos input config (64 px, batch 4) with overrides."""
  c = data_config.default_input_config()
  c.data_dir = data_dir
  c.image_size = 64
  c.global_batch_size = 4
  for k, v in overrides.items():
    c[k] = v
  return c


def _take(it, n):
  """The next `n` batches of an iterator."""
  return [next(it) for _ in range(n)]


def _assert_same_batches(a, b):
  """Bit-exact equality of two lists of dict batches."""
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def _jpeg(rng, h=48, w=64):
  """Encoded JPEG bytes of a random image."""
  buf = io.BytesIO()
  Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, 'JPEG', quality=90)
  return buf.getvalue()


def _adm_center_crop_reference(pil_image, image_size):
  """guided-diffusion `image_datasets.center_crop_arr`, verbatim apart from formatting."""
  while min(*pil_image.size) >= 2 * image_size:
    pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
  scale = image_size / min(*pil_image.size)
  pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
  arr = np.array(pil_image)
  crop_y = (arr.shape[0] - image_size) // 2
  crop_x = (arr.shape[1] - image_size) // 2
  return arr[crop_y:crop_y + image_size, crop_x:crop_x + image_size]


# ----------------------------------------------------------------------------------------------
# Bundled photos, prepare, record format


def test_photos_dataset_contents(photos_dir):
  """The bundled dataset has 10 classes, 80 train crops and the 10 original files as test."""
  train = prepare.load_manifest(photos_dir, 'train')
  test = prepare.load_manifest(photos_dir, 'test')
  assert train['classes'] == sorted(photos_lib.PHOTOS) == test['classes']
  assert train['num_records'] == 80 and test['num_records'] == 10
  assert set(train['counts_per_class'].values()) == {8}
  assert train['num_skipped'] == 0 and test['num_skipped'] == 0
  for m in (train, test):
    for shard in m['shards']:
      assert prepare._sha256_file(os.path.join(photos_dir, shard['file'])) == shard['sha256']
  src = sources.array_record_source(data_dir=photos_dir, split='train')
  img = transforms.decode_image(sources.parse_record(src[0])['image'])
  assert img.size == (photos_lib.CROP_SIZE, photos_lib.CROP_SIZE)


def test_prepared_pixels_equal_direct_decode(photos_dir):
  """Records keep the original bytes: decoded pixels equal a direct PIL decode of the file."""
  src = sources.array_record_source(data_dir=photos_dir, split='test')
  classes = prepare.load_manifest(photos_dir, 'test')['classes']
  seen = set()
  for i in range(len(src)):
    rec = sources.parse_record(src[i])
    name = rec['filename'].split(os.sep)[0]
    assert classes[rec['label']] == name
    path = photos_lib.original_path(name)
    with open(path, 'rb') as f:
      assert rec['image'] == f.read()
    ours = np.asarray(transforms.decode_image(rec['image']))
    direct = np.asarray(Image.open(path).convert('RGB'))
    assert ours.dtype == np.uint8 and ours.shape == direct.shape
    np.testing.assert_array_equal(ours, direct)
    seen.add(name)
  assert seen == set(photos_lib.PHOTOS)


def _make_folder(root, rng):
  """A small ImageFolder: 2 classes x 3 JPEGs, a truncated JPEG, a text file and a root-level image."""
  for cls in ('cat', 'dog'):
    os.makedirs(os.path.join(root, cls))
    for k in range(3):
      with open(os.path.join(root, cls, f'{cls}{k}.jpg'), 'wb') as f:
        f.write(_jpeg(rng))
  with open(os.path.join(root, 'dog', 'broken.jpg'), 'wb') as f:
    f.write(_jpeg(rng)[:300])  # Truncated: the header parses, the full decode fails.
  with open(os.path.join(root, 'cat', 'notes.txt'), 'w') as f:
    f.write('not an image')
  with open(os.path.join(root, 'loose.jpg'), 'wb') as f:
    f.write(_jpeg(rng))


def test_prepare_reports_and_skips_corrupt_files(tmp_path, capsys):
  """Corrupt and non-image files are listed with reasons and counted; the good ones are written."""
  src, out = str(tmp_path / 'src'), str(tmp_path / 'out')
  _make_folder(src, np.random.default_rng(0))
  assert prepare.main(['--src', src, '--out', out, '--shard-size', '3', '--num-workers', '0',
                       '--no-progress']) == 0
  printed = capsys.readouterr().out
  assert 'skipped 2 files' in printed and 'broken.jpg' in printed and 'notes.txt' in printed
  m = prepare.load_manifest(out, 'train')
  assert m['complete'] and m['num_skipped'] == 2
  reasons = {s['file']: s['reason'] for s in m['skipped']}
  assert set(reasons) == {os.path.join('cat', 'notes.txt'), os.path.join('dog', 'broken.jpg')}
  assert 'UnidentifiedImageError' in reasons[os.path.join('cat', 'notes.txt')]
  assert 'truncated' in reasons[os.path.join('dog', 'broken.jpg')].lower()
  assert m['classes'] == ['cat', 'dog'] and m['counts_per_class'] == {'cat': 3, 'dog': 3}
  assert m['num_unlabelled'] == 1 and m['num_records'] == 7
  src_ds = sources.array_record_source(data_dir=out, split='train')
  recs = [sources.parse_record(src_ds[i]) for i in range(len(src_ds))]
  # ImageFolder order: root-level files first (label -1), then sorted classes and files.
  assert [(r['filename'], r['label']) for r in recs] == [
      ('loose.jpg', -1), ('cat/cat0.jpg', 0), ('cat/cat1.jpg', 0), ('cat/cat2.jpg', 0),
      ('dog/dog0.jpg', 1), ('dog/dog1.jpg', 1), ('dog/dog2.jpg', 1)]


def test_prepare_resumes_after_interruption(tmp_path):
  """An interrupted run, restarted, gives the same shards and manifest as an uninterrupted run."""
  rng = np.random.default_rng(1)
  src = str(tmp_path / 'src')
  _make_folder(src, rng)
  full = prepare.prepare_split(src, str(tmp_path / 'a'), shard_size=2, progress=False)

  out = str(tmp_path / 'b')

  def crash(shard_index):
    if shard_index == 0:
      raise KeyboardInterrupt('simulated kill after the first shard')

  with pytest.raises(KeyboardInterrupt):
    prepare.prepare_split(src, out, shard_size=2, progress=False, on_shard_done=crash)
  with open(prepare.manifest_path(out, 'train')) as f:
    partial = json.load(f)
  assert not partial['complete'] and [s['index'] for s in partial['shards']] == [0]
  # Debris of a kill in the middle of shard 1, and an unrecorded final file of shard 2.
  names = [prepare.shard_name('train', i, full['num_shards']) for i in range(full['num_shards'])]
  with open(os.path.join(out, names[1] + '.tmp'), 'wb') as f:
    f.write(b'half a shard')
  with open(os.path.join(out, names[2]), 'wb') as f:
    f.write(b'garbage')
  first_shard_mtime = os.path.getmtime(os.path.join(out, names[0]))

  written = []
  resumed = prepare.prepare_split(src, out, shard_size=2, progress=False,
                                  on_shard_done=written.append)
  assert written == list(range(1, full['num_shards']))  # Shard 0 was not redone.
  assert os.path.getmtime(os.path.join(out, names[0])) == first_shard_mtime
  assert resumed == full
  assert not any(n.endswith('.tmp') for n in os.listdir(out))
  for name in names:
    with open(os.path.join(tmp_path, 'a', name), 'rb') as fa, open(os.path.join(out, name), 'rb') as fb:
      assert fa.read() == fb.read()


# ----------------------------------------------------------------------------------------------
# Transforms


# uint8 levels of the ADM centre crop, computed once (Pillow 12.0.0) by an independent
# implementation written from guided-diffusion's documentation: PIL BOX halvings while the short
# side >= 2 * size, one BICUBIC resize with the short side to `size` and the long side round()ed,
# then `Image.crop` at floor offsets. {(name, size): (sum of all levels, {(y, x): [r, g, b]})}.
ADM_CROP_PINS = {
    ('retina', 256): (17767593, {(0, 255): [2, 0, 1], (128, 128): [182, 41, 21],
                                 (36, 192): [191, 76, 51], (204, 51): [214, 85, 65]}),
    ('chelsea', 256): (22072768, {(0, 0): [123, 64, 50], (255, 255): [175, 153, 143],
                                  (128, 128): [192, 152, 126], (36, 192): [130, 96, 66],
                                  (204, 51): [166, 124, 102]}),
    ('astronaut', 256): (22618811, {(0, 0): [147, 141, 148], (0, 255): [123, 117, 108],
                                    (255, 0): [184, 167, 171], (128, 128): [20, 17, 9],
                                    (204, 51): [175, 63, 32]}),
    ('chelsea', 64): (1393429, {(0, 0): [130, 74, 62], (63, 63): [177, 155, 143],
                                (32, 32): [194, 153, 124], (9, 48): [131, 98, 70],
                                (51, 12): [159, 121, 99]}),
}


def test_eval_transform_matches_adm_center_crop(photos):
  """ADM centre crop on real photos: pinned uint8 levels, and the guided-diffusion copy exactly."""
  # retina: two halvings; chelsea: none at 256, two with odd sizes at 64; astronaut: exactly 2x.
  for (name, size), (level_sum, pixels) in ADM_CROP_PINS.items():
    img = Image.open(photos_lib.original_path(name)).convert('RGB')
    ours = transforms.eval_transform(img, size)
    assert ours.shape == (size, size, 3) and ours.dtype == np.float32
    levels = np.round(ours.astype(np.float64) * 255).astype(np.int64)
    # ToTensor's float conversion exactly: every value is level / 255 in float32.
    np.testing.assert_array_equal(ours, levels.astype(np.float32) / np.float32(255))
    assert int(levels.sum()) == level_sum, (name, size, int(levels.sum()))
    for (y, x), rgb in pixels.items():
      assert levels[y, x].tolist() == rgb, (name, size, (y, x), levels[y, x].tolist())
    np.testing.assert_array_equal(levels, _adm_center_crop_reference(img, size), err_msg=name)
  # The shipped file the bundled dataset copies is the image scikit-image serves.
  np.testing.assert_array_equal(
      np.asarray(Image.open(photos_lib.original_path('astronaut')).convert('RGB')), photos['astronaut'])


def test_train_transform_is_resize_then_seeded_crop():
  """Train transform = torchvision Resize(int(1.5 s), bicubic) + RandomCrop(s) driven by the rng."""
  img = Image.open(photos_lib.original_path('coffee')).convert('RGB')  # 600x400
  size = 256
  resized = np.asarray(img.resize((576, 384), Image.BICUBIC))  # int(384 * 600 / 400) = 576
  rng_a, rng_b = np.random.default_rng(7), np.random.default_rng(7)
  out = transforms.train_transform(img, size, rng_a)
  top, left = int(rng_b.integers(0, 384 - size + 1)), int(rng_b.integers(0, 576 - size + 1))
  np.testing.assert_array_equal(out, resized[top:top + size, left:left + size].astype(np.float32) / 255)
  assert transforms.train_resize_size(256) == 384
  # Portrait: the width becomes the short side.
  assert transforms.resize_shorter_side(Image.new('RGB', (300, 451)), 384).size == (384, 577)


def test_decode_image_modes():
  """Grey, RGBA and (H, W, 1) arrays all decode to RGB."""
  grey = np.arange(12, dtype=np.uint8).reshape(3, 4)
  for data in (grey, grey[..., None]):
    out = np.asarray(transforms.decode_image(data))
    assert out.shape == (3, 4, 3)
    np.testing.assert_array_equal(out[..., 1], grey)
  buf = io.BytesIO()
  Image.new('RGBA', (5, 2), (10, 20, 30, 40)).save(buf, 'PNG')
  np.testing.assert_array_equal(np.asarray(transforms.decode_image(buf.getvalue()))[0, 0], [10, 20, 30])


# ----------------------------------------------------------------------------------------------
# Pipelines: determinism, resume, sharding


def test_same_seed_same_batches(photos_dir):
  """Equal seeds give bit-identical batches; another seed gives a different order."""
  cfg = _cfg(photos_dir)
  a, b = _take(pipeline.make_train_iterator(cfg), 4), _take(pipeline.make_train_iterator(cfg), 4)
  _assert_same_batches(a, b)
  assert set(a[0]) == {'image', 'label'}
  assert a[0]['image'].shape == (4, 64, 64, 3) and a[0]['image'].dtype == np.float32
  assert a[0]['label'].shape == (4,) and a[0]['label'].dtype == np.int32
  assert 0.0 <= a[0]['image'].min() and a[0]['image'].max() <= 1.0
  c = _take(pipeline.make_train_iterator(_cfg(photos_dir, shuffle_seed=1)), 4)
  assert not all(np.array_equal(x['image'], y['image']) for x, y in zip(a, c))


def test_state_restore_mid_epoch_and_across_epochs(photos_dir):
  """Restoring get_state() gives exactly the batches an uninterrupted iterator gives next."""
  cfg = _cfg(photos_dir, global_batch_size=16)  # 80 records: 5 batches per epoch.
  reference = _take(pipeline.make_train_iterator(cfg), 9)
  it = pipeline.make_train_iterator(cfg)
  _take(it, 3)
  state = it.get_state()
  restored = pipeline.make_train_iterator(cfg)
  restored.set_state(state)
  _assert_same_batches(_take(restored, 6), reference[3:])  # Crosses into epoch 2.


def test_epochs_reshuffle_and_shards_are_disjoint(photos_dir):
  """2 processes: disjoint shards covering every record, each epoch a new global permutation."""
  cfg = _cfg(photos_dir, global_batch_size=8)  # 4 per process, 40 records per process and epoch.
  epochs = {}
  for p in range(2):
    it = pipeline.make_train_iterator(cfg, process_index=p, process_count=2, keep_index=True)
    idx = np.concatenate([b['index'] for b in _take(it, 20)])  # Two epochs.
    epochs[p] = (idx[:40], idx[40:])
  for e in range(2):
    a, b = epochs[0][e], epochs[1][e]
    assert len(set(a)) == 40 and len(set(b)) == 40 and not set(a) & set(b)
    assert set(a) | set(b) == set(range(80))
  assert not np.array_equal(epochs[0][0], epochs[0][1])
  # Labels follow the records (ImageFolder order: 8 crops per class).
  it = pipeline.make_train_iterator(cfg, process_index=1, process_count=2, keep_index=True)
  b = next(it)
  np.testing.assert_array_equal(b['label'], b['index'] // 8)


def test_eval_pass_is_ordered_padded_and_sharded(photos_dir):
  """Eval: each of 2 processes gets the same number of full batches; valid slots cover the split."""
  cfg = _cfg(photos_dir, global_batch_size=8)  # 10 test records -> padded to 16.
  seen = []
  for p in range(2):
    batches = list(pipeline.make_eval_iterator(cfg, process_index=p, process_count=2))
    assert len(batches) == 2
    for b in batches:
      assert b['image'].shape == (4, 64, 64, 3)
      assert np.all(b['mask'] == (b['index'] >= 0))
      assert np.all(b['image'][~b['mask']] == 0)
      seen.extend(b['index'][b['mask']].tolist())
  assert sorted(seen) == list(range(10))
  # Pixels are exactly the ADM centre crop of the original file, for all 10 photos.
  src = sources.array_record_source(data_dir=photos_dir, split='test')
  for b in pipeline.make_eval_iterator(_cfg(photos_dir, global_batch_size=2)):
    for i, img in zip(b['index'], b['image']):
      rec = sources.parse_record(src[int(i)])
      ref = _adm_center_crop_reference(Image.open(io.BytesIO(rec['image'])).convert('RGB'), 64)
      np.testing.assert_array_equal(img, ref.astype(np.float32) / np.float32(255), err_msg=str(i))


def test_orbax_checkpoint_of_iterator_state(photos_dir, tmp_path):
  """The iterator state saved as an Orbax Composite item restores to the same next batches."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  cfg = _cfg(photos_dir)
  it = pipeline.make_train_iterator(cfg)
  _take(it, 5)
  with ocp.CheckpointManager(str(tmp_path / 'ckpt'), item_names=('data_iter',)) as mngr:
    mngr.save(5, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointSave(it)))
    mngr.wait_until_finished()
  expected = _take(it, 3)
  fresh = pipeline.make_train_iterator(cfg)
  with ocp.CheckpointManager(str(tmp_path / 'ckpt'), item_names=('data_iter',)) as mngr:
    assert mngr.latest_step() == 5
    mngr.restore(5, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointRestore(fresh)))
  _assert_same_batches(_take(fresh, 3), expected)


def test_mp_prefetch_gives_the_same_batches(photos_dir):
  """Two multiprocess workers produce exactly the batches of the in-process pipeline."""
  cfg = _cfg(photos_dir, image_size=32)
  expected = _take(pipeline.make_train_iterator(cfg), 4)
  it = pipeline.make_train_iterator(_cfg(photos_dir, image_size=32, num_workers=2))
  try:
    _assert_same_batches(_take(it, 4), expected)
  finally:
    it.close()


# ----------------------------------------------------------------------------------------------
# Bad records at train time


def _write_records(path, payloads):
  """Writes raw records to an ArrayRecord file."""
  w = array_record_module.ArrayRecordWriter(path, prepare.WRITER_OPTIONS)
  for p in payloads:
    w.write(p)
  w.close()


def test_corrupt_records_are_skipped_and_counted(tmp_path):
  """Bad records are replaced (batches stay full), counted once per epoch, and masked in eval."""
  rng = np.random.default_rng(3)
  good = _jpeg(rng)
  payloads = [prepare.encode_record(good, i, f'img{i}.jpg') for i in range(8)]
  payloads[2] = prepare.encode_record(good[:200], 2, 'truncated.jpg')
  payloads[5] = b'\x00not msgpack at all'
  path = str(tmp_path / 'bad.array_record')
  _write_records(path, payloads)
  cfg = _cfg('', source='array_record', paths=path)
  pipeline.reset_decode_error_count()
  it = pipeline.make_train_iterator(cfg, keep_index=True)
  batches = _take(it, 4)  # Two epochs of 8 records.
  for b in batches:
    assert b['image'].shape == (4, 64, 64, 3)
    assert not {2, 5} & set(b['index'].tolist())
    np.testing.assert_array_equal(b['label'], b['index'])
  assert pipeline.decode_error_count('train') == 4
  # Determinism holds with bad records: a restored iterator continues identically.
  again = pipeline.make_train_iterator(cfg, keep_index=True)
  _take(again, 1)
  state = again.get_state()
  resumed = pipeline.make_train_iterator(cfg, keep_index=True)
  resumed.set_state(state)
  _assert_same_batches(_take(resumed, 3), batches[1:])
  # Eval does not substitute: the slots are masked out.
  ev = list(pipeline.make_eval_iterator(_cfg('', source='array_record', paths=path,
                                             global_batch_size=8)))
  assert len(ev) == 1
  np.testing.assert_array_equal(ev[0]['mask'], [i not in (2, 5) for i in range(8)])
  assert pipeline.decode_error_count('eval') == 2


# ----------------------------------------------------------------------------------------------
# TFDS ArrayRecord source, global arrays, errors


def test_tfds_array_record_source(tmp_path, monkeypatch):
  """A TFDS ArrayRecord dataset (decoded uint8 'image' + 'label') feeds the same pipelines."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  # TFDS leaves an empty mkdtemp() directory behind when it builds; keep it out of /tmp.
  monkeypatch.setattr(tempfile, 'tempdir', str(tmp_path))

  images = [np.random.default_rng(i).integers(0, 256, (40 + 3 * i, 50, 3), dtype=np.uint8)
            for i in range(6)]

  class UaeTinyTfds(tfds.core.GeneratorBasedBuilder):
    """Six random images, Tensor features (building Image features would need TensorFlow)."""
    VERSION = tfds.core.Version('1.0.0')

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          'image': tfds.features.Tensor(shape=(None, None, 3), dtype=np.uint8, encoding='zlib'),
          'label': tfds.features.ClassLabel(num_classes=6),
          'file_name': tfds.features.Text()}))

    def _split_generators(self, dl_manager):
      return {'train': self._generate_examples()}

    def _generate_examples(self):
      for i, im in enumerate(images):
        yield i, {'image': im, 'label': i, 'file_name': f'{i}.png'}

  data_dir = str(tmp_path / 'tfds')
  UaeTinyTfds(data_dir=data_dir, file_format='array_record').download_and_prepare()
  cfg = _cfg(data_dir, source='tfds', name='uae_tiny_tfds', split='train', eval_split='train',
             image_size=32, global_batch_size=2)
  b = next(pipeline.make_train_iterator(cfg, keep_index=True))
  assert b['image'].shape == (2, 32, 32, 3)
  src = sources.make_source(cfg)
  for k in range(2):
    assert sources.parse_record(src[int(b['index'][k])])['label'] == b['label'][k]
  for b in pipeline.make_eval_iterator(cfg):
    for k in range(2):
      rec = sources.parse_record(src[int(b['index'][k])])
      np.testing.assert_array_equal(
          b['image'][k], transforms.eval_transform(Image.fromarray(images[rec['label']]), 32))


def test_to_global_array_with_batch_sharding(photos_dir):
  """A host batch becomes global jax.Arrays sharded over the 8 fake devices."""
  mesh = jax.make_mesh((8,), ('data',), axis_types=(jax.sharding.AxisType.Auto,))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
  batch = next(pipeline.make_train_iterator(_cfg(photos_dir, global_batch_size=8, image_size=16)))
  out = pipeline.to_global_array(batch, sharding)
  assert out['image'].shape == (8, 16, 16, 3) and out['image'].sharding == sharding
  assert len(out['image'].addressable_shards) == 8
  np.testing.assert_array_equal(np.asarray(out['image']), batch['image'])
  np.testing.assert_array_equal(np.asarray(out['label']), batch['label'])


def test_errors_name_the_problem(tmp_path, photos_dir):
  """Unknown sources, missing paths and bad batch sizes fail with the offending field named."""
  with pytest.raises(ValueError, match=r"input.source='imagenet' is not one of"):
    pipeline.make_train_iterator(_cfg(photos_dir, source='imagenet'))
  missing = str(tmp_path / 'nowhere')
  with pytest.raises(FileNotFoundError, match=r'input.data_dir .*nowhere'):
    pipeline.make_train_iterator(_cfg(missing, source='array_record'))
  with pytest.raises(FileNotFoundError, match=r'input.paths: .*nowhere'):
    pipeline.make_train_iterator(_cfg('', source='array_record', paths=missing + '/*.array_record'))
  with pytest.raises(FileNotFoundError, match=r'no manifest .*validation.manifest.json'):
    pipeline.make_train_iterator(_cfg(photos_dir, source='array_record', split='validation'))
  with pytest.raises(ValueError, match='bundled photos dataset has splits'):
    pipeline.make_train_iterator(_cfg(photos_dir, split='validation'))
  with pytest.raises(FileNotFoundError, match=r"input.name='no_such_dataset'"):
    pipeline.make_train_iterator(_cfg(missing, source='tfds', name='no_such_dataset'))
  with pytest.raises(ValueError, match='input.name'):
    pipeline.make_train_iterator(_cfg(missing, source='tfds'))
  with pytest.raises(ValueError, match=r'input.global_batch_size=6 must be a positive multiple'):
    pipeline.make_train_iterator(_cfg(photos_dir, global_batch_size=6), process_count=4,
                                 process_index=0)
  with pytest.raises(FileNotFoundError, match=r"--src .*nowhere"):
    prepare.prepare_split(missing, str(tmp_path / 'out'))
  assert isinstance(data_config.default_input_config(), ml_collections.ConfigDict)
