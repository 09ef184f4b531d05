#!/usr/bin/env bash
# Fifth pass on the embedded model (issue 16): the 4096-code VQGAN of the session-6 ablation, continued from
# its 4000-step weights with a cosine decay, for as long as one device hold allows. Its held-out PSNR decides
# whether the next U-ViT is trained on its tokens (target 29 dB).
#
# Needs .stage_vq/ (carried by the call that starts it; ~24 MB): images.npy.xz, train/heldout.jsonl.xz (from
# pack_inputs.py) and init/vqvae/ (config.json + the session-6 fp16 weights). Runs in the background:
#   OUT=$OUT DEADLINE=1300 setsid bash scripts/embedded/vqgan_long_gpu.sh > /tmp/vq.log 2>&1 &
# Another job may pause it (SIGSTOP/SIGCONT on "train-vqgan") while it times something; DEADLINE is wall clock.
# At DEADLINE the run stops; its last checkpoint is exported to $OUT/vq/: fp16 weights, the logs, and the full
# resumable state (`--resume_from_checkpoint` input) tarred and split into 15 MiB parts.
set -euo pipefail
OUT=${OUT:-/tmp/out}; W=${WORK:-/tmp/vqlong}; S=.stage_vq
DEADLINE=${DEADLINE:-1300}; STEPS=${STEPS:-6000}; WORKERS=${WORKERS:-6}
mkdir -p "$W" "$OUT/vq"
rm -rf "$W/stage" && cp -r "$S" "$W/stage"
python3 -c "import lzma, sys, pathlib; [pathlib.Path(f[:-3]).write_bytes(lzma.open(f).read()) for f in sys.argv[1:]]" "$W"/stage/*.jsonl.xz
python3 scripts/embedded/unpack_images.py "$W/stage" "$W/data"
START=$(date +%s)
echo "== train $(date +%T)"
python3 -m amused.cli train-vqgan --pretrained_model_name_or_path "$W/stage/init" \
  --train_data_dir "$W/data/train" --validation_data_dir "$W/data/heldout" --resolution 64 --center_crop \
  --train_batch_size 128 --learning_rate 2e-4 --lr_scheduler cosine --lr_warmup_steps 100 \
  --max_train_steps "$STEPS" --restart_dead_codes_every 500 --mixed_precision bf16 --dataloader_num_workers "$WORKERS" \
  --eval_steps 1000 --checkpointing_steps 500 --checkpoints_total_limit 1 --logging_steps 250 \
  --output_dir "$W/run" > "$W/train.log" 2>&1 &
PID=$!
while kill -0 $PID 2> /dev/null && [ $(( $(date +%s) - START )) -lt "$DEADLINE" ]; do sleep 5; done
echo "== stop at $(( $(date +%s) - START )) s $(date +%T)"
pkill -CONT -f train-vqgan || true
kill $PID 2> /dev/null || true; sleep 5; pkill -f train-vqgan || true; sleep 2
source=$(python3 scripts/embedded/export_fp16.py "$W/run" vqvae vq. "$OUT/vq/vq4096_long.fp16.safetensors")
echo "{\"weights_from\": \"$source\"}" > "$OUT/vq/source.json"
cp "$W/stage/init/vqvae/config.json" "$OUT/vq/vq4096_long.config.json"
for log in "$W"/run/logs/*.jsonl; do if [ -f "$log" ]; then cp "$log" "$OUT/vq/vq4096_long_$(basename "$log")"; fi; done
tr '\r' '\n' < "$W/train.log" | tail -40 > "$OUT/vq/train_log_tail.txt"
last=$(ls -d "$W"/run/checkpoint-* 2>/dev/null | sort -t- -k2 -n | tail -1 || true)
if [ -n "$last" ]; then
  tar cf - -C "$W/run" "$(basename "$last")" | split -b 15M - "$OUT/vq/state.tar.part-"
fi
ls -la "$OUT/vq"
echo "== done $(date +%T)"
