"""Generate the torch-free DINOv2 golden files used by tests/test_convert.py.

Run from the repository root (needs torch + transformers, i.e. the test venv):

    .venv/bin/python tests/golden/make_dinov2_golden.py

For each case it builds a tiny randomly initialised HF DINOv2 (hidden 64, 2 layers, 4 heads, MLP
256 = our 'tiny' DinoV2 size), with every parameter randomised (LayerScale lambda1, LayerNorm
weights/biases, CLS / register / mask / position tokens included, so a mis-mapped tensor cannot
hide behind an init of ones or zeros), and writes

  dinov2_tiny_<case>_hf.safetensors  the weights exactly as `save_pretrained` writes them (HF
                                     on-disk names), i.e. the source the converter reads;
  dinov2_tiny_<case>_ref.npz         image (uint8 HWC, a centre crop of skimage's astronaut
                                     resized with PIL bicubic), input_size, num_registers,
                                     pos_embed_grid, block_<i> (1, 1+R+N, 64) = HF hidden_states[i+1],
                                     grid (1, H, W, 64) = last_hidden_state patch tokens (after
                                     the affine final layernorm), torch/transformers versions.

Cases: 'reg4' = Dinov2WithRegistersModel, 18x18 table (image_size=252) evaluated at 224 px
(antialiased bicubic 18 -> 16); 'noreg' = Dinov2Model, 16x16 table (image_size=224) evaluated at
252 px (PyTorch bicubic 16 -> 18). HF gets pixel_values = (image/255 - mean) / std in float32,
which is what DinoV2 computes from image/255 when input_size equals the image size.

The torch-importing helpers below are also used by tests/test_convert.py.
"""
import os

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
            patch_size=14)
CASES = {
    # name: (registers, HF image_size -> position grid, evaluation size)
    "reg4": (4, 252, 224),
    "noreg": (0, 224, 252),
}


TOKENS = ("cls_token", "register_tokens", "mask_token", "position_embeddings")


def randomize_(model, seed: int) -> None:
  """Overwrite every parameter of a torch model with seeded random values of sensible scale."""
  import torch
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      r = torch.randn(p.shape, generator=g)
      if name.endswith("lambda1"):
        v = 0.1 + 0.9 * torch.rand(p.shape, generator=g)
      elif "norm" in name and name.endswith("weight"):
        v = 1.0 + 0.2 * r
      elif name.endswith("bias"):
        v = 0.1 * r
      elif name.endswith(TOKENS):
        v = r
      else:  # Linear / Conv2d weights: unit gain
        v = r / float(np.prod(p.shape[1:])) ** 0.5
      p.copy_(v)


def build_hf_dinov2(registers: int, image_size: int, seed: int):
  """A tiny randomised HF Dinov2Model / Dinov2WithRegistersModel in eval mode."""
  from transformers import (Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig,
                            Dinov2WithRegistersModel)
  if registers:
    model = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(
        image_size=image_size, num_register_tokens=registers, **TINY))
  else:
    model = Dinov2Model(Dinov2Config(image_size=image_size, **TINY))
  randomize_(model, seed)
  return model.eval()


def hf_forward(model, images01_nhwc: np.ndarray):
  """HF reference on images in [0,1] already at the evaluation size: (block outputs, last hidden)."""
  import torch
  pv = (images01_nhwc.astype(np.float32) - MEAN) / STD
  with torch.no_grad():
    out = model(pixel_values=torch.from_numpy(pv.transpose(0, 3, 1, 2).copy()),
                output_hidden_states=True)
  blocks = [h.numpy() for h in out.hidden_states[1:]]
  return blocks, out.last_hidden_state.numpy()


def photo(size: int) -> np.ndarray:
  """skimage's astronaut, centre square, PIL bicubic to size x size, uint8 HWC."""
  import skimage.data
  from PIL import Image
  im = Image.fromarray(skimage.data.astronaut())
  s = min(im.size)
  left, top = (im.size[0] - s) // 2, (im.size[1] - s) // 2
  return np.asarray(im.crop((left, top, left + s, top + s)).resize((size, size), Image.BICUBIC))


def main() -> None:
  import shutil
  import tempfile

  import torch
  import transformers
  torch.manual_seed(0)
  for seed, (name, (registers, image_size, eval_size)) in enumerate(sorted(CASES.items())):
    model = build_hf_dinov2(registers, image_size, seed=100 + seed)
    with tempfile.TemporaryDirectory() as tmp:
      model.save_pretrained(tmp)
      shutil.copyfile(os.path.join(tmp, "model.safetensors"),
                      os.path.join(HERE, f"dinov2_tiny_{name}_hf.safetensors"))
    img = photo(eval_size)
    blocks, last = hf_forward(model, img[None] / np.float32(255.0))
    g = eval_size // 14
    ref = {"image": img, "input_size": np.int64(eval_size), "num_registers": np.int64(registers),
           "pos_embed_grid": np.int64(image_size // 14),
           "grid": last[:, 1 + registers:].reshape(1, g, g, -1),
           "versions": np.array(f"torch {torch.__version__}, transformers {transformers.__version__}")}
    ref.update({f"block_{i}": b for i, b in enumerate(blocks)})
    np.savez_compressed(os.path.join(HERE, f"dinov2_tiny_{name}_ref.npz"), **ref)
    print(f"{name}: registers={registers} table {image_size // 14}x{image_size // 14}, eval "
          f"{eval_size}px, |grid| max {np.abs(ref['grid']).max():.3f}")


if __name__ == "__main__":
  main()
