#!/usr/bin/env bash
# Second pass on the embedded model, on a 2-GPU machine, within one 10-minute device call:
#   GPU 0: the U-ViT retrained from scratch for UVIT_SECONDS on the *shipped* VQGAN (its tokens are what the
#          shipped decoder reads), step count set from a short timing run so the cosine schedule ends on time;
#   GPU 1: the text-encoder comparison: the same U-ViT for CMP_STEPS with (a) pretrained MiniLM (frozen,
#          pre-encoded) and (b) a CLIP-architecture encoder trained here from scratch jointly with the U-ViT
#          (--train_text_encoder, BPE vocabulary learnt from the captions); both scored by `amused eval`.
# Inputs: .stage_a/ (carried by the call before, within the warm window) and .stage_b/ (split_stage.py).
#   OUT=$OUT UVIT_SECONDS=380 CMP_STEPS=3000 bash scripts/embedded/retrain_uvit.sh
set -euo pipefail
OUT=${OUT:-/tmp/out}; W=${WORK:-/tmp/emb}; S=.stage
UVIT_SECONDS=${UVIT_SECONDS:-380}; CMP_STEPS=${CMP_STEPS:-3000}; BATCH=${BATCH:-2048}; LR=${LR:-1.2e-3}
CMP_SECONDS=${CMP_SECONDS:-200}  # per comparison run: a slow one is cut rather than holding up the call
TIMING_STEPS=${TIMING_STEPS:-300}; EVAL_DEVICE=${EVAL_DEVICE:-cuda:0}; EVAL_N=${EVAL_N:-200}; WARMUP=${WARMUP:-500}; MP=${MP:-bf16}
COMPILE=${COMPILE---compile}  # COMPILE= (empty) trains eagerly
VQ=src/amused/assets/amused-emoji-64/vqvae
AM="python3 -m amused.cli"
mkdir -p "$W" "$OUT"
python3 scripts/embedded/join_stage.py
python3 scripts/embedded/unpack_images.py "$S" "$W/data"

echo "== pre-encode $(date +%T)"
[ -f "$W/enc/index.json" ] || CUDA_VISIBLE_DEVICES=0 $AM preencode --vqvae_path "$VQ" --text_encoder_path "$S/minilm" \
  --train_data_dir "$W/data/train" --resolution 64 --center_crop --batch_size 1024 --output_dir "$W/enc" 2>&1 | tail -2

train() {  # GPU OUTPUT_DIR STEPS [extra args]: the U-ViT recipe of docs/embedded_model.md
  local gpu=$1 dir=$2 steps=$3; shift 3
  CUDA_VISIBLE_DEVICES=$gpu timeout "${LIMIT:-0}" $AM train --vqvae_path "$VQ" --train_batch_size "$BATCH" --learning_rate "$LR" \
    --lr_scheduler cosine --lr_warmup_steps "$WARMUP" --max_train_steps "$steps" --mixed_precision "$MP" --use_ema \
    --ema_decay 0.999 --cond_dropout_prob 0.1 --label_smoothing 0.1 --checkpointing_steps 0 \
    --logging_steps "$((TIMING_STEPS < 250 ? TIMING_STEPS / 2 : 250))" --output_dir "$dir" $COMPILE "$@"
}
minilm=(--transformer_config "$S/transformer.json" --text_encoder_path "$S/minilm" --preencoded_data_dir "$W/enc"
        --dataloader_num_workers 2)

main_run() {
  echo "== timing run $(date +%T)"
  train 0 "$W/timing" "$TIMING_STEPS" "${minilm[@]}" > "$W/timing.log" 2>&1
  local ips; ips=$(tail -1 "$W/timing/logs/train_log.jsonl" | python3 -c "import json,sys; print(json.load(sys.stdin)['images_per_s'])")
  local steps; steps=$(python3 -c "print(int($UVIT_SECONDS * $ips / $BATCH) // 500 * 500 or $TIMING_STEPS)")
  echo "== main run: $ips images/s -> $steps steps $(date +%T)"
  echo "$steps" > "$OUT/main_steps.txt"
  train 0 "$W/uvit" "$steps" "${minilm[@]}" > "$W/main.log" 2>&1 || { tail -30 "$W/main.log"; return 1; }
  tail -3 "$W/uvit/logs/train_log.jsonl"
  # Ship fp16 U-ViT weights (the embedded model's size budget) at once: nothing after this may lose them.
  python3 scripts/embedded/ship_uvit.py "$W/uvit" "$OUT"
  echo "== main eval $(date +%T)"
  $AM eval --model "$W/uvit" --data "$W/data" --device "$EVAL_DEVICE" --num-train "$EVAL_N" --out "$OUT/eval_main_gpu.json" --quiet || true
}

compare_run() {
  echo "== compare: MiniLM $(date +%T)"
  LIMIT=$CMP_SECONDS train 1 "$W/cmp_minilm" "$CMP_STEPS" "${minilm[@]}" > "$W/cmp_minilm.log" 2>&1 || tail -30 "$W/cmp_minilm.log"
  echo "== compare: CLIP trained here $(date +%T)"
  python3 scripts/embedded/make_clip_text.py --captions "$W/data/train/metadata.jsonl" --out "$W/clip" \
    > "$OUT/clip_text.txt" 2>&1
  python3 -c "import sys; sys.path.insert(0, 'scripts/embedded'); import config; \
config.write_transformer_json('$W/clip', '$W/clip_transformer.json')"
  LIMIT=$CMP_SECONDS train 1 "$W/cmp_clip" "$CMP_STEPS" --transformer_config "$W/clip_transformer.json" \
    --text_encoder_path "$W/clip" --train_text_encoder --train_data_dir "$W/data/train" --resolution 64 \
    --center_crop --dataloader_num_workers 8 > "$W/cmp_clip.log" 2>&1 || tail -30 "$W/cmp_clip.log"
  for m in minilm clip; do
    echo "== compare eval $m $(date +%T)"
    $AM eval --model "$W/cmp_$m" --data "$W/data" --device "$EVAL_DEVICE" --num-train "$EVAL_N" --out "$OUT/eval_cmp_$m.json" --quiet \
      || echo "eval $m failed"
    cp "$W/cmp_$m/logs/train_log.jsonl" "$OUT/cmp_${m}_log.jsonl" || true
  done
}

main_run > "$OUT/main.txt" 2>&1 &
MAIN=$!
CUDA_VISIBLE_DEVICES=1 compare_run > "$OUT/compare.txt" 2>&1 &
CMP=$!
wait $CMP || true
wait $MAIN || true
cat "$OUT/main.txt" "$OUT/compare.txt"
ls -la "$OUT"

