"""A complete embedded-model folder (the layout of src/amused/assets/amused-emoji-64) from trained parts: a
VQGAN folder, U-ViT fp16 weights (one file, or the parts ship_uvit.py wrote) with their config, and the base
folder's text encoder, tokenizer reference and generation settings. The scheduler's mask token id follows the
U-ViT's vocabulary (its last id, as in the published checkpoints).

    python scripts/embedded/assemble_model.py --vq VQ_DIR --uvit PARTS_PREFIX_OR_FILE \
        --uvit-config transformer.config.json --out DIR [--base src/amused/assets/amused-emoji-64] [--int8]
"""

import argparse
import json
import shutil
from pathlib import Path

from safetensors.torch import load_file, save_file

from amused.loading import save_sharded

VQ_CONFIG_HEAD = {"_class_name": "VQModel", "_diffusers_version": "0.42.1"}


def uvit_state(source: Path) -> dict:
    """The U-ViT weights in `source`: a safetensors file, or the prefix of its .partN.safetensors files."""
    if source.is_file():
        return load_file(source)
    parts = sorted(source.parent.glob(source.name + ".part*.safetensors"),
                   key=lambda p: int(p.name.rsplit(".part", 1)[1].split(".")[0]))
    if not parts:
        raise SystemExit(f"--uvit: neither a file nor a prefix of .partN.safetensors files: {source}")
    state = {}
    for p in parts:
        state.update(load_file(p))
    return state


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vq", type=Path, required=True, help="VQGAN folder (config.json + safetensors weights)")
    ap.add_argument("--uvit", type=Path, required=True, help="U-ViT fp16 safetensors file or parts prefix")
    ap.add_argument("--uvit-config", type=Path, required=True, help="the U-ViT's config.json")
    ap.add_argument("--base", type=Path, default=Path("src/amused/assets/amused-emoji-64"))
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--int8", action="store_true", help="store the U-ViT's matrices as int8 with per-row scales "
                    "(amused.int8): half of fp16's bytes, for a U-ViT over the size budget in fp16")
    args = ap.parse_args()

    out = args.out
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(args.base, out, ignore=shutil.ignore_patterns("transformer", "vqvae", "scheduler"))
    (out / "vqvae").mkdir()
    vq_config = {**VQ_CONFIG_HEAD, **json.loads((args.vq / "config.json").read_text())}
    (out / "vqvae" / "config.json").write_text(json.dumps(vq_config, indent=2, sort_keys=True) + "\n")
    vq = load_file(args.vq / "diffusion_pytorch_model.safetensors")
    save_file({k: v.half().contiguous() for k, v in vq.items()}, out / "vqvae" / "diffusion_pytorch_model.safetensors",
              metadata={"format": "pt"})

    cfg = json.loads(args.uvit_config.read_text())
    if cfg["codebook_size"] != vq_config["num_vq_embeddings"]:
        raise SystemExit(f"--uvit-config: codebook_size {cfg['codebook_size']} but the VQGAN has "
                         f"{vq_config['num_vq_embeddings']} codes")
    (out / "transformer").mkdir()
    (out / "transformer" / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    state = uvit_state(args.uvit)  # sharded under 15 MiB a file (diffusers' layout): the repository's file limit
    save_sharded({k: v.half() for k, v in state.items()}, out / "transformer", int8_weights=args.int8)

    sched = json.loads((args.base / "scheduler" / "scheduler_config.json").read_text())
    sched["mask_token_id"] = cfg["vocab_size"] - 1
    (out / "scheduler").mkdir()
    (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(sched) + "\n")
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"assembled {out}: {size / 2**20:.1f} MiB, mask_token_id {sched['mask_token_id']}")


if __name__ == "__main__":
    main()
