"""`amused preencode`: run the VQGAN and the text encoder over a dataset once and store the results.

Output folder:
    shard-00000.safetensors ...   ids (N, h, w) int16 VQ token ids; hidden (N, S, D) float16 penultimate text
                                  states; pooled (N, P) float16; micro_conds (N, 5) float32; captions in the
                                  file's metadata (JSON list)
    empty_prompt.safetensors      hidden (1, S, D) / pooled (1, P) of "" (what text dropout substitutes)
    index.json                    shard list and sizes, written last: a folder without it is incomplete
Training with `--preencoded_data_dir` then needs neither model on the GPU. The crop (and flip) of each image is
fixed at encoding time: use --center_crop, or accept one random crop per image. At 256 px with CLIP-L a sample
takes 256 x 2 + 77 x 768 x 2 + 768 x 2 bytes, about 120 kB.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch.utils.data import DataLoader, IterableDataset

from ..loading import atomic_write, load_model, resolve, write_json
from ..models.text_encoder import TextEncoder
from ..models.vqgan import VQGAN, VQGANConfig
from .data import make_dataset
from .train import load_text

FP16_MAX = 65504.0


def _write_shard(path: Path, rows: dict[str, list[torch.Tensor]], captions: list[str]) -> int:
    tensors = {k: torch.cat(v).contiguous() for k, v in rows.items()}
    for key in ("hidden", "pooled"):
        if tensors[key].abs().max() > FP16_MAX:
            raise ValueError(f"{path}: text embeddings exceed the float16 range; cannot store them as fp16")
        tensors[key] = tensors[key].half()
    tensors["ids"] = tensors["ids"].to(torch.int16)  # codebooks up to 32767 codes
    metadata = {"format": "pt", "captions": json.dumps(captions)}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
    return len(captions)


@torch.no_grad()
def run(args) -> Path:
    """Encode the dataset the arguments name into `args.output_dir`; returns the folder."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    root = resolve(args.pretrained_model_name_or_path) if args.pretrained_model_name_or_path else None
    vq_folder = Path(args.vqvae_path) if args.vqvae_path else (root / "vqvae" if root else None)
    if vq_folder is None or (root is None and not args.text_encoder_path):
        raise ValueError("preencode needs --pretrained_model_name_or_path, or --vqvae_path and --text_encoder_path")
    vq = load_model(VQGAN, VQGANConfig, vq_folder).to(device)
    if vq.config.num_vq_embeddings > 32767:
        raise ValueError(f"{vq_folder}: {vq.config.num_vq_embeddings} codes do not fit the int16 token storage")
    tokenizer, model = load_text(root, args.text_encoder_path)
    text = TextEncoder(model.to(device).eval(), tokenizer)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "index.json").unlink(missing_ok=True)  # incomplete until rewritten at the end

    args.train_batch_size = args.batch_size
    dataset = make_dataset(args)
    if isinstance(dataset, IterableDataset):
        dataset.set_position(0, 0)
        loader = DataLoader(dataset, batch_size=args.batch_size, num_workers=args.dataloader_num_workers)
    else:
        keys = [(0, i) for i in range(len(dataset))]
        loader = DataLoader(dataset, batch_size=args.batch_size, sampler=keys, num_workers=args.dataloader_num_workers)

    shards, rows, captions, total = [], {"ids": [], "hidden": [], "pooled": [], "micro_conds": []}, [], 0
    from tqdm.auto import tqdm

    def flush():
        nonlocal rows, captions
        if captions:
            name = f"shard-{len(shards):05d}.safetensors"
            shards.append({"file": name, "num_samples": _write_shard(out / name, rows, captions)})
            rows, captions = {k: [] for k in rows}, []

    for batch in tqdm(loader, desc="preencode"):
        ids = vq.encode(batch["pixels"].to(device))  # (B, h, w)
        hidden, pooled = text(list(batch["caption"]))
        for key, value in (("ids", ids), ("hidden", hidden), ("pooled", pooled), ("micro_conds", batch["micro_conds"])):
            rows[key].append(value.cpu())
        captions += list(batch["caption"])
        total += len(ids)
        if len(captions) >= args.shard_size:
            flush()
    flush()
    if total == 0:
        raise ValueError("the dataset is empty")
    hidden, pooled = text([""])
    atomic_write(out / "empty_prompt.safetensors",
                 lambda tmp: save_file({"hidden": hidden.cpu().half().contiguous(),
                                        "pooled": pooled.cpu().half().contiguous()}, str(tmp)))
    write_json(out / "index.json", {"num_samples": total, "shards": shards, "resolution": args.resolution,
                                    "token_grid": list(ids.shape[1:]), "text_hidden_size": text.hidden_size,
                                    "center_crop": bool(args.center_crop), "source": str(root or vq_folder)})
    print(f"encoded {total} samples into {len(shards)} shards under {out}")
    return out
