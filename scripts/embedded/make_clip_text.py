"""A small CLIP-architecture text encoder for the embedded model, to train from scratch with the U-ViT.

    python scripts/embedded/make_clip_text.py --captions .stage/train.jsonl --out .stage/clip_text \\
        [--vocab_size 2048 --width 256 --layers 4 --heads 4 --max_length 24 --projection_dim 384] \\
        [--transformer_config .stage/transformer_clip.json]

writes a transformers folder (`AutoTokenizer.from_pretrained(DIR)`; the model class is named in config.json's
`architectures`, which `amused train --text_encoder_path DIR` follows):

- a byte-level BPE tokenizer trained with Hugging Face `tokenizers` on the captions (the `text` field of each
  jsonl row), in CLIP's format so `CLIPTokenizer` / `CLIPTokenizerFast` read it: CLIP's normaliser and
  pre-tokeniser, `</w>` marking the end of a word, vocab.json ordered as CLIP's (the 256 byte characters, the
  same with `</w>`, one token per merge, then `<|startoftext|>` and `<|endoftext|>`), merges.txt, padding with
  `<|endoftext|>` to `--max_length` tokens;
- a randomly initialised (seeded) `CLIPTextModelWithProjection`: `--width` per token, `--layers` layers of
  `--heads` heads, MLP 4 x width, `--max_length` positions, pooled output projected to `--projection_dim`.

In the pipeline (amused.models.text_encoder.TextEncoder) cross-attention reads the penultimate layer's states
(`--width` per token: the U-ViT's `encoder_hidden_size`) and the adaptive norms the projected `text_embeds`
(`--projection_dim`: its `cond_embed_dim`). The script prints those two numbers, the parameter count and the
fp16 size, and with `--transformer_config PATH` writes the embedded U-ViT (scripts/embedded/config.py) sized
for this encoder. Train it jointly with `amused train ... --text_encoder_path DIR --train_text_encoder`.
Train the tokenizer on training captions only (not held-out ones).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
SUFFIX = "</w>"  # CLIP's end-of-word marker


def read_captions(paths: list[str | Path]) -> list[str]:
    """The non-empty `text` field of every row of the given jsonl files."""
    captions = []
    for path in paths:
        for line in Path(path).read_text().splitlines():
            if line.strip() and (text := str(json.loads(line).get("text", "")).strip()):
                captions.append(text)
    if not captions:
        raise ValueError(f"no captions (a `text` field per jsonl row) in {', '.join(map(str, paths))}")
    return captions


def train_tokenizer(captions: list[str], vocab_size: int, max_length: int, folder: Path):
    """Learn BPE merges on the captions and save a CLIP tokenizer of at most `vocab_size` tokens in `folder`.

    Returns:
        The saved tokenizer, as `CLIPTokenizerFast`.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import CLIPTokenizerFast

    from amused.presets import write_clip_tokenizer

    base = 2 * 256 + 2  # every byte character, alone and word-final, and the two specials
    if vocab_size <= base:
        raise ValueError(f"--vocab_size must exceed {base} (CLIP's byte alphabet, with and without {SUFFIX}, "
                         f"and 2 special tokens), got {vocab_size}")
    with tempfile.TemporaryDirectory() as tmp:  # CLIP's own normaliser and pre-tokeniser, so merges fit it
        write_clip_tokenizer(Path(tmp))
        clip = CLIPTokenizerFast.from_pretrained(tmp).backend_tokenizer
        chars = [t for t, _ in sorted(clip.get_vocab().items(), key=lambda kv: kv[1])][:256]  # byte -> unicode
    bpe = Tokenizer(models.BPE(unk_token=EOS, end_of_word_suffix=SUFFIX, continuing_subword_prefix=""))
    bpe.normalizer, bpe.pre_tokenizer = clip.normalizer, clip.pre_tokenizer
    # The trainer's alphabet is the bytes plus the word-final characters seen; ask for enough merges, keep a prefix.
    trainer = trainers.BpeTrainer(vocab_size=vocab_size + 256, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), end_of_word_suffix=SUFFIX,
                                  continuing_subword_prefix="")
    bpe.train_from_iterator(captions, trainer)
    merges = json.loads(bpe.to_str())["model"]["merges"][:vocab_size - base]
    merges = [m if isinstance(m, list) else m.split(" ") for m in merges]  # older tokenizers write "a b"
    vocab = {t: i for i, t in enumerate(chars + [c + SUFFIX for c in chars])}
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    vocab[BOS], vocab[EOS] = len(vocab), len(vocab) + 1
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    tokenizer = CLIPTokenizerFast(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=max_length,
                                  bos_token=BOS, eos_token=EOS, unk_token=EOS, pad_token=EOS)
    tokenizer.save_pretrained(folder)
    return tokenizer


def make_text_model(tokenizer, width: int, layers: int, heads: int, max_length: int, projection_dim: int,
                    seed: int = 0):
    """A seeded random `CLIPTextModelWithProjection` for the tokenizer (its vocabulary and special ids)."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    if width % heads:
        raise ValueError(f"--width {width} is not a multiple of --heads {heads}")
    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=4 * width,
                            num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=max_length,
                            projection_dim=projection_dim, hidden_act="quick_gelu",
                            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return CLIPTextModelWithProjection(config).eval()


def build(captions: list[str], out: str | Path, vocab_size: int = 2048, width: int = 256, layers: int = 4,
          heads: int = 4, max_length: int = 24, projection_dim: int = 384, seed: int = 0):
    """Tokenizer + random text model saved together in `out` (one transformers folder).

    Returns:
        (tokenizer, model) as saved.
    """
    out = Path(out)
    tokenizer = train_tokenizer(captions, vocab_size, max_length, out)
    model = make_text_model(tokenizer, width, layers, heads, max_length, projection_dim, seed)
    model.save_pretrained(out)
    return tokenizer, model


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--captions", nargs="+", required=True, help="jsonl files with a `text` field per row")
    ap.add_argument("--out", required=True, help="output folder (transformers layout)")
    ap.add_argument("--vocab_size", type=int, default=2048, help="at most this many tokens (fewer if the "
                                                                 "captions give fewer merges)")
    ap.add_argument("--width", type=int, default=256, help="per-token width (the U-ViT's encoder_hidden_size)")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--max_length", type=int, default=24, help="tokens per prompt, specials included")
    ap.add_argument("--projection_dim", type=int, default=384, help="pooled size (the U-ViT's cond_embed_dim)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--transformer_config", help="also write the embedded U-ViT config for this encoder here")
    args = ap.parse_args(argv)
    captions = read_captions(args.captions)
    tokenizer, model = build(captions, args.out, args.vocab_size, args.width, args.layers, args.heads,
                             args.max_length, args.projection_dim, args.seed)
    lengths = [len(ids) for ids in tokenizer(captions, truncation=False)["input_ids"]]
    n = sum(p.numel() for p in model.parameters())
    print(f"tokenizer: {len(tokenizer)} tokens from {len(captions)} captions; tokens per caption (specials "
          f"included): mean {sum(lengths) / len(lengths):.1f}, max {max(lengths)}; "
          f"{sum(x > args.max_length for x in lengths)} truncated at {args.max_length}")
    print(f"text encoder: {n / 1e6:.2f} M parameters, {2 * n / 1e6:.2f} MB in fp16 ({2 * n / 2**20:.2f} MiB)")
    print(f"a U-ViT config for it needs encoder_hidden_size={model.config.hidden_size} "
          f"cond_embed_dim={model.config.projection_dim}")
    if args.transformer_config:
        sys.path.insert(0, str(Path(__file__).parent))
        from config import write_transformer_json

        write_transformer_json(args.out, args.transformer_config)
        print(f"wrote {args.transformer_config}")
    print(f"saved to {args.out}")


if __name__ == "__main__":
    main()
