"""Command line: `python -m uae_jax.convert {dinov2, uae-import, uae-export, dino-disc, clip, siglip2, mae, dit, dit-export} ...`.

  python -m uae_jax.convert dinov2 --src FILE_OR_HF_DIR --out DIR [--variant auto|hf|timm|fair]
         [--input-size 224] [--size B] [--num-heads N] [--drop-final-norm]
  python -m uae_jax.convert uae-import --src FILE --out DIR [--which ema|model]
         [--encoder-num-heads N] [--decoder-num-heads N]
  python -m uae_jax.convert uae-export --src DIR --out FILE.safetensors [--key-style hf4|hf5]
  python -m uae_jax.convert dino-disc --src FILE --out DIR [--zero-key-bias]
  python -m uae_jax.convert dit --src FILE --out DIR [--which ema|model]
  python -m uae_jax.convert dit-export --src DIR --out FILE.safetensors [--no-rope-buffers]
  python -m uae_jax.convert clip --src FILE_OR_HF_DIR --out DIR [--input-size 224] [--drop-post-norm]
  python -m uae_jax.convert siglip2 --src FILE_OR_HF_DIR --out DIR [--drop-final-norm] [--drop-head]
  python -m uae_jax.convert mae --src FILE_OR_HF_DIR --out DIR [--input-size 224] [--drop-final-norm]

Output directories hold `params.msgpack` + `arch.json` (see uae_jax/convert/flax_io.py). The
architecture is inferred from the tensor shapes: a named size when one matches, otherwise
size='custom' with explicit dims. Attention heads are not in the weights: --num-heads, else an HF
config.json beside the weights, else the matching named size, else width // 64.
Exit status 2 and one line listing every problem on bad input (a ConversionError or other
UserError); output directories are written so that an interrupted run never looks complete.
"""
import argparse
import json
import sys

from uae_jax.errors import UserError


def _encoder_parser(sub, name: str, help_text: str):
  """A converter subcommand for an HF vision encoder: --src, --out, --input-size."""
  p = sub.add_parser(name, help=help_text)
  p.add_argument("--src", required=True, help=".safetensors / .bin file or HF model dir")
  p.add_argument("--out", required=True, help="output directory")
  p.add_argument("--input-size", type=int, default=None, help="encoder input px (default: native)")
  return p


def _parser() -> argparse.ArgumentParser:
  """The argument parser of the four subcommands."""
  p = argparse.ArgumentParser(prog="python -m uae_jax.convert", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = p.add_subparsers(dest="cmd", required=True)
  d = sub.add_parser("dinov2", help="DINOv2 (HF / timm / FAIR hub) -> Flax DinoV2 params")
  d.add_argument("--src", required=True, help=".safetensors / .pth / .bin file or HF model dir")
  d.add_argument("--out", required=True, help="output directory")
  d.add_argument("--variant", default="auto", choices=("auto", "hf", "timm", "fair"))
  d.add_argument("--input-size", type=int, default=224, help="encoder input resolution (px)")
  d.add_argument("--size", default=None, help="expected DinoV2 size (S/B/L/g/tiny); refuse others")
  d.add_argument("--num-heads", "--num_heads", type=int, default=None,
                 help="attention heads (default: config.json, the named size, or width // 64)")
  d.add_argument("--drop-final-norm", action="store_true",
                 help="discard the final LayerNorm affine (UAE's encoder has none)")
  ui = sub.add_parser("uae-import", help="official UAE checkpoint -> Flax params")
  ui.add_argument("--src", required=True)
  ui.add_argument("--out", required=True)
  ui.add_argument("--which", default="ema", choices=("ema", "model"))
  ui.add_argument("--encoder-input-size", type=int, default=224)
  ui.add_argument("--encoder-num-heads", type=int, default=None,
                  help="encoder heads when the width is no named size (default: width // 64)")
  ui.add_argument("--decoder-num-heads", type=int, default=None,
                  help="decoder heads when the width is no named size (default: width // 64)")
  ue = sub.add_parser("uae-export", help="Flax UAE params dir -> official-layout .safetensors")
  ue.add_argument("--src", required=True, help="directory with params.msgpack + arch.json")
  ue.add_argument("--out", required=True, help="output .safetensors file")
  ue.add_argument("--key-style", default="hf4", choices=("hf4", "hf5"),
                  help="encoder attention names: hf4 = transformers-4 / on-disk (official code), "
                       "hf5 = transformers-5 in-memory")
  ue.add_argument("--decoder-grid", type=int, default=None,
                  help="latent grid of the written decoder_pos_embed (default: from arch.json, 16)")
  c = _encoder_parser(sub, "clip", "CLIP vision tower (HF CLIPVisionModel / CLIPModel) -> Flax Clip")
  c.add_argument("--drop-post-norm", action="store_true",
                 help="discard post_layernorm (pooled output only; UAE-CLIP has none)")
  sg = _encoder_parser(sub, "siglip2", "SigLIP/SigLIP2 vision tower (HF) -> Flax Siglip params")
  sg.add_argument("--drop-final-norm", action="store_true",
                  help="discard post_layernorm's affine (UAE-SigLIP2 has none)")
  sg.add_argument("--drop-head", action="store_true", help="discard the attention-pool head")
  ma = _encoder_parser(sub, "mae", "MAE ViT (HF ViTMAEModel / ViTMAEForPreTraining) -> Flax Mae")
  ma.add_argument("--drop-final-norm", action="store_true",
                  help="discard the final layernorm's affine (the UAE MAEwNorm encoder has none)")
  dd = sub.add_parser("dino-disc", help="DINO ViT-S/8 discriminator backbone -> Flax params")
  dd.add_argument("--src", required=True)
  dd.add_argument("--out", required=True)
  dd.add_argument("--zero-key-bias", action="store_true",
                  help="zero the key third of attn.qkv.bias as the official code does (no effect)")
  dt = sub.add_parser("dit", help="official stage-2 DiT^DH checkpoint -> Flax DiTDH params")
  dt.add_argument("--src", required=True, help="training checkpoint .pt or state dict file")
  dt.add_argument("--out", required=True, help="output directory")
  dt.add_argument("--which", default="ema", choices=("ema", "model"))
  de = sub.add_parser("dit-export", help="converted DiT^DH directory -> official .safetensors")
  de.add_argument("--src", required=True, help="directory with params.msgpack + arch.json")
  de.add_argument("--out", required=True, help="output .safetensors file")
  de.add_argument("--no-rope-buffers", action="store_true",
                  help="omit the fixed enc/dec_feat_rope.freqs_{cos,sin} buffers")
  return p


def main(argv=None) -> int:
  """Runs one subcommand; returns the exit status (2 on a LoadError)."""
  args = _parser().parse_args(argv)
  try:
    if args.cmd == "dinov2":
      from uae_jax.convert import dinov2
      _, arch = dinov2.convert_dinov2_file(args.src, args.out, variant=args.variant,
                                           input_size=args.input_size, size=args.size,
                                           drop_final_norm=args.drop_final_norm,
                                           num_heads=args.num_heads)
      print(f"wrote {args.out}/params.msgpack and arch.json: DinoV2({json.dumps(arch)})")
    elif args.cmd == "uae-import":
      from uae_jax.convert import uae
      _, arch = uae.import_official_uae_to_dir(args.src, args.out, args.which,
                                               encoder_input_size=args.encoder_input_size,
                                               encoder_num_heads=args.encoder_num_heads,
                                               decoder_num_heads=args.decoder_num_heads)
      print(f"wrote {args.out}/params.msgpack and arch.json: encoder DinoV2({json.dumps(arch['encoder'])}),"
            f" decoder PixelDecoder({json.dumps(arch['decoder'])}), recipe {arch['recipe']}")
    elif args.cmd == "uae-export":
      from uae_jax.convert import uae
      sd = uae.export_official_uae_from_dir(args.src, args.out, key_style=args.key_style,
                                            decoder_grid=args.decoder_grid)
      print(f"wrote {args.out}: {len(sd)} tensors ({args.key_style} encoder names)")
    elif args.cmd == "clip":
      from uae_jax.convert import clip
      _, arch = clip.convert_clip_file(args.src, args.out, input_size=args.input_size,
                                       drop_post_norm=args.drop_post_norm)
      print(f"wrote {args.out}/params.msgpack and arch.json: Clip({json.dumps(arch)})")
    elif args.cmd == "siglip2":
      from uae_jax.convert import siglip
      _, arch = siglip.convert_siglip_file(args.src, args.out, input_size=args.input_size,
                                           drop_final_norm=args.drop_final_norm,
                                           drop_head=args.drop_head)
      print(f"wrote {args.out}/params.msgpack and arch.json: Siglip({json.dumps(arch)})")
    elif args.cmd == "mae":
      from uae_jax.convert import mae
      _, arch = mae.convert_mae_file(args.src, args.out, input_size=args.input_size,
                                     drop_final_norm=args.drop_final_norm)
      print(f"wrote {args.out}/params.msgpack and arch.json: Mae({json.dumps(arch)})")
    elif args.cmd == "dino-disc":
      from uae_jax.convert import discriminator
      _, arch = discriminator.convert_dino_disc_file(args.src, args.out,
                                                     zero_key_bias=args.zero_key_bias)
      print(f"wrote {args.out}/params.msgpack and arch.json: {json.dumps(arch)}")
    elif args.cmd == "dit":
      from uae_jax.convert import dit
      _, arch = dit.import_official_dit_to_dir(args.src, args.out, args.which)
      print(f"wrote {args.out}/params.msgpack and arch.json: DiTDH({json.dumps(arch['kwargs'])})")
    elif args.cmd == "dit-export":
      from uae_jax.convert import dit
      sd = dit.export_official_dit_from_dir(args.src, args.out,
                                            rope_buffers=not args.no_rope_buffers)
      print(f"wrote {args.out}: {len(sd)} tensors")
  except UserError as e:  # ConversionError is a LoadError, a UserError
    text = "; ".join(line.strip() for line in str(e).splitlines() if line.strip())
    print(f"error: {text or type(e).__name__}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
