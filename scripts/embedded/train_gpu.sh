#!/usr/bin/env bash
# Train the embedded model (amused-emoji-64) from the staged inputs (scripts/embedded/pack_inputs.py), with
# the project's own training commands: VQGAN, pre-encoding, U-ViT. Run from the repo root:
#   OUT=/tmp/out VQ_STEPS=4000 UVIT_STEPS=3000 bash scripts/embedded/train_gpu.sh
set -euo pipefail
S=${STAGE:-.stage}; W=${WORK:-/tmp/emb}; OUT=${OUT:-/tmp/out}
VQ_STEPS=${VQ_STEPS:-4000}; UVIT_STEPS=${UVIT_STEPS:-3000}; WORKERS=${WORKERS:-8}
VQ_BATCH=${VQ_BATCH:-128}; UVIT_BATCH=${UVIT_BATCH:-256}; MP=${MP:-bf16}
AM="python3 -m amused.cli"
mkdir -p "$W" "$OUT"
python3 scripts/embedded/unpack_images.py "$S" "$W/data"

echo "== VQGAN $(date +%T)"
$AM train-vqgan --vqgan_config "$S/vqgan.json" --train_data_dir "$W/data/train" \
  --validation_data_dir "$W/data/heldout" --resolution 64 --center_crop --train_batch_size "$VQ_BATCH" \
  --learning_rate 2e-4 --lr_scheduler cosine --lr_warmup_steps 100 --max_train_steps "$VQ_STEPS" \
  --restart_dead_codes_every 500 --mixed_precision "$MP" --dataloader_num_workers "$WORKERS" \
  --eval_steps "$VQ_STEPS" --checkpointing_steps 0 --logging_steps 250 --output_dir "$W/vq" 2>&1 | tail -25
cp -r "$W/vq/vqvae" "$OUT/" 2>/dev/null || true

echo "== pre-encode $(date +%T)"
$AM preencode --vqvae_path "$W/vq/vqvae" --text_encoder_path "$S/minilm" --train_data_dir "$W/data/train" \
  --resolution 64 --center_crop --batch_size 512 --output_dir "$W/enc" 2>&1 | tail -3

echo "== U-ViT $(date +%T)"
$AM train --transformer_config "$S/transformer.json" --vqvae_path "$W/vq/vqvae" --text_encoder_path "$S/minilm" \
  --preencoded_data_dir "$W/enc" --train_batch_size "$UVIT_BATCH" --learning_rate 6e-4 --lr_scheduler cosine \
  --lr_warmup_steps 200 --max_train_steps "$UVIT_STEPS" --mixed_precision "$MP" --use_ema --ema_decay 0.999 \
  --cond_dropout_prob 0.1 --label_smoothing 0.1 --checkpointing_steps 0 --logging_steps 250 \
  --dataloader_num_workers 2 --output_dir "$W/uvit" 2>&1 | tail -25
echo "== done $(date +%T)"
find "$W/uvit" -maxdepth 2 | head -20
# Ship fp16 weights (the embedded model's size budget); configs and logs alongside.
python3 - "$W" "$OUT" <<'PY'
import shutil, sys
from safetensors.torch import load_file, save_file
w, out = sys.argv[1], sys.argv[2]
for c in ("transformer", "vqvae"):
    sd = load_file(f"{w}/uvit/{c}/diffusion_pytorch_model.safetensors")
    save_file({k: v.half().contiguous() for k, v in sd.items()}, f"{out}/{c}.fp16.safetensors")
    shutil.copy(f"{w}/uvit/{c}/config.json", f"{out}/{c}.config.json")
shutil.copy(f"{w}/uvit/logs/train_log.jsonl", f"{out}/uvit_log.jsonl")
PY
cp "$W/vq/logs/eval_log.jsonl" "$OUT/vq_eval.jsonl"; cp "$W/vq/metrics.json" "$OUT/vq_metrics.json" || true
rm -rf "$OUT/vqvae"
ls -la "$OUT"
