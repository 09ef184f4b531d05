#!/usr/bin/env bash
# Third pass on the embedded model: several U-ViT runs side by side on ONE GPU, within one 10-minute device call.
# The small model's training step is bound by launch and dispatch cost, not arithmetic (docs/training.md), so
# concurrent processes fill each other's idle gaps. Runs (RUNS picks; all on the *shipped* VQGAN, whose tokens
# the shipped decoder reads; same batch, learning rate and wall-clock budget):
#   uvit            the shipped architecture (16x16 tokens, 8x8 inside the transformer), MiniLM, pre-encoded
#   uvit_flat       config.UVIT_FLAT: the transformer on all 16x16 tokens, MiniLM, pre-encoded
#   uvit_l6         config.UVIT_L6: six transformer layers, wider MLPs (12.3 M parameters with 4096 codes)
#   uvit_flat_clip  uvit_flat with a CLIP-architecture encoder trained here from scratch with the U-ViT
#                   (--train_text_encoder, BPE learnt from the captions): the text-encoder comparison
# A short concurrent timing run sets each run's step count so that its cosine schedule ends on time. Each run
# then ships its fp16 U-ViT weights to $OUT/<run>/ at once (nothing later may lose them) and is scored by
# `amused eval` on the GPU.
# Inputs: the stage chunks .stage_a/, .stage_b/, ... (split_stage.py), each carried by one call within the warm window.
#   OUT=$OUT UVIT_SECONDS=300 bash scripts/embedded/retrain_uvit.sh
# (RUNS=uvit BATCH=1024 LR=1e-3 UVIT_SECONDS=390 SKIP_EVAL=1: one long run of the shipped architecture;
#  STYLELESS=1 adds every training caption once more without its style: add_styleless_captions.py.)
set -euo pipefail
OUT=${OUT:-/tmp/out}; W=${WORK:-/tmp/emb}; S=.stage
RUNS=${RUNS:-"uvit uvit_flat uvit_flat_clip"}
UVIT_SECONDS=${UVIT_SECONDS:-300}; BATCH=${BATCH:-512}; LR=${LR:-8e-4}; WARMUP=${WARMUP:-300}; MP=${MP:-bf16}
TIMING_STEPS=${TIMING_STEPS:-200}; EVAL_N=${EVAL_N:-200}; EVAL_DEVICE=${EVAL_DEVICE:-cuda}
COMPILE=${COMPILE---compile}  # COMPILE= (empty) trains eagerly
VQ=${VQ:-src/amused/assets/amused-emoji-64/vqvae}  # VQ=.stage/vqvae: the VQGAN split_stage.py --vq carried
AM="python3 -m amused.cli"
mkdir -p "$W" "$OUT"
python3 scripts/embedded/join_stage.py
python3 scripts/embedded/unpack_images.py "$S" "$W/data"

# amused eval reads the captions as built (a style-less copy of each training row would be its own nearest
# neighbour): it gets a copy made before they are added
[ -d "$W/data_eval" ] || cp -r "$W/data" "$W/data_eval"
[ -n "${STYLELESS-}" ] && python3 scripts/embedded/add_styleless_captions.py "$W/data/train/metadata.jsonl"
echo "== pre-encode $(date +%T)"
[ -f "$W/enc/index.json" ] || $AM preencode --vqvae_path "$VQ" --text_encoder_path "$S/minilm" \
  --train_data_dir "$W/data/train" --resolution 64 --center_crop --batch_size 1024 --output_dir "$W/enc" 2>&1 | tail -2
python3 scripts/embedded/make_clip_text.py --captions "$W/data/train/metadata.jsonl" --out "$W/clip" > "$W/clip_text.log" 2>&1
python3 - <<EOF
import json, sys; sys.path.insert(0, "scripts/embedded"); import config
codes = json.load(open("$VQ/config.json"))["num_vq_embeddings"]  # the U-ViT predicts this VQGAN's codes
config.write_transformer_json("$S/minilm", "$W/uvit.json", "uvit", codes)
config.write_transformer_json("$S/minilm", "$W/uvit_flat.json", "uvit_flat", codes)
config.write_transformer_json("$S/minilm", "$W/uvit_l6.json", "uvit_l6", codes)
config.write_transformer_json("$W/clip", "$W/uvit_flat_clip.json", "uvit_flat", codes)
EOF

run_args() {  # RUN [compile flag]: the data, text encoder and architecture of one run
  case $1 in
    uvit|uvit_flat|uvit_l6) echo "--transformer_config $W/$1.json --text_encoder_path $S/minilm --preencoded_data_dir $W/enc" \
                         "--dataloader_num_workers 2 ${2-}" ;;
    uvit_flat_clip) echo "--transformer_config $W/$1.json --text_encoder_path $W/clip --train_text_encoder" \
                         "--train_data_dir $W/data/train --resolution 64 --center_crop --dataloader_num_workers 6" ;;
  esac
}
train() {  # OUTPUT_DIR STEPS LOG_EVERY [extra args]: the U-ViT recipe of docs/embedded_model.md
  local dir=$1 steps=$2 every=$3; shift 3
  $AM train --vqvae_path "$VQ" --train_batch_size "$BATCH" --learning_rate "$LR" --lr_scheduler cosine \
    --lr_warmup_steps "$WARMUP" --max_train_steps "$steps" --mixed_precision "$MP" --use_ema --ema_decay 0.999 \
    --cond_dropout_prob 0.1 --label_smoothing 0.1 --checkpointing_steps 0 --logging_steps "$every" \
    --output_dir "$dir" "$@"
}
rate() { tail -1 "$1/logs/train_log.jsonl" | python3 -c "import json,sys; print(json.load(sys.stdin)['images_per_s'])"; }

echo "== timing runs, side by side $(date +%T)"
for r in $RUNS; do
  ( train "$W/t_$r" "$TIMING_STEPS" "$((TIMING_STEPS / 2))" $(run_args "$r" "$COMPILE") > "$W/t_$r.log" 2>&1 \
    || { echo "timing $r failed: $(tail -3 "$W/t_$r.log")"; touch "$W/t_$r.failed"; } ) &
done
wait
for r in $RUNS; do  # a compiled run that failed is timed again eagerly (alone, so its rate is optimistic)
  if [ -f "$W/t_$r.failed" ]; then
    rm -rf "$W/t_$r"; train "$W/t_$r" "$TIMING_STEPS" "$((TIMING_STEPS / 2))" $(run_args "$r") > "$W/t_$r.log" 2>&1
    echo "$r" >> "$W/eager_runs"
  fi
done

one_run() {
  local r=$1 flag=$COMPILE ips steps
  grep -qx "$r" "$W/eager_runs" 2>/dev/null && flag=
  [ "$r" = uvit_flat_clip ] && flag=  # run_args gives it no --compile
  ips=$(rate "$W/t_$r")
  steps=$(python3 -c "print(max(int($UVIT_SECONDS * $ips / $BATCH) // 100 * 100, $TIMING_STEPS))")
  echo "== $r: $ips images/s side by side -> $steps steps $(date +%T)"
  local res=$W/res/$r; mkdir -p "$res"
  echo "{\"run\": \"$r\", \"timing_images_per_s\": $ips, \"steps\": $steps, \"batch\": $BATCH, \"lr\": $LR," \
       "\"compile\": \"$flag\"}" > "$res/run.json"
  train "$W/$r" "$steps" 100 $(run_args "$r" "$flag") > "$W/$r.log" 2>&1 || { tail -30 "$W/$r.log"; return 1; }
  tail -2 "$W/$r/logs/train_log.jsonl"
  python3 scripts/embedded/ship_uvit.py "$W/$r" "$res"
  for f in "$res"/transformer.fp16.part*.safetensors; do  # at most 8 files (16 MiB each) come back
    if [ "$r" = uvit_flat_clip ]; then rm "$f"  # not shippable with its encoder
    else mv "$f" "$OUT/$r.fp16.${f##*/transformer.fp16.}"; fi
  done
  pack
  [ -n "${SKIP_EVAL-}" ] && return 0
  echo "== eval $r $(date +%T)"
  cp src/amused/assets/amused-emoji-64/generation_config.json "$W/$r/"  # the shipped model's sampling defaults
  $AM eval --model "$W/$r" --data "$W/data_eval" --device "$EVAL_DEVICE" --num-train "$EVAL_N" --out "$res/eval_gpu.json" \
    --grid "$res/grid.png" --quiet || echo "eval $r failed"
  pack
  echo "== done $r $(date +%T)"
}
pack() {  # everything small in one file (logs, configs, evals, grids), replaced atomically
  cp "$W"/*.log "$W/res/" 2>/dev/null || true
  tar czf "$OUT/.results.tgz.$BASHPID" -C "$W" res && mv "$OUT/.results.tgz.$BASHPID" "$OUT/results.tgz"
}
mkdir -p "$W/res"
for r in $RUNS; do one_run "$r" > "$W/res/$r.txt" 2>&1 & done
wait
for r in $RUNS; do cat "$W/res/$r.txt"; python3 -c "
import json; d = json.load(open('$W/res/$r/eval_gpu.json'))
print('$r', json.dumps({k: {m: x for m, x in v.items() if m != 'neighbours'} for k, v in d['retrieval'].items()}))
" || true; done
pack
ls -laR "$OUT"
