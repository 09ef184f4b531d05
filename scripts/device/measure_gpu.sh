#!/usr/bin/env bash
# One device hold's measurements, run in the background so that they span several calls:
#   1. the GPU test suite (tests marked gpu) -> $RES/gpu_tests.json
#   2. benchmarks/user_facing.py --parts engine server: the engine's batch-1/8 calls and `amused serve` under
#      1, 8 and 32 clients, in one run on one checkpoint (amused-512 shapes, random weights, fp16)
#   3. `amused bench --preset meissonic`: ours against the reference pipeline (a checkout under $REF), 1024 px,
#      48/64 steps, batch 1/4, fp16 then bf16
# Training started by another script (train-vqgan, finetune) is paused (SIGSTOP) while 2 and 3 time things, and
# resumed after. Each part has its own time bound; logs and results go to $RES.
#   RES=/tmp/res setsid bash scripts/device/measure_gpu.sh > /tmp/measure.log 2>&1 &
set -u
RES=${RES:-/tmp/res}; REF=${REF:-.stage_ref/meissonic_ref}; CKPT=/tmp/a512; CACHE=/tmp/compile_cache
mkdir -p "$RES"
stamp() { echo "== $* $(date +%T)"; }
TRAINING="train-vqgan|amused.cli finetune|amused.cli train "
hold_training() {  # pause training for as long as $RES/.timing exists
  touch "$RES/.timing"
  ( while [ -f "$RES/.timing" ]; do pkill -STOP -f "$TRAINING"; sleep 1; done; pkill -CONT -f "$TRAINING" ) &
}
release_training() { rm -f "$RES/.timing"; sleep 2; pkill -CONT -f "$TRAINING" || true; }

stamp checkpoint
python3 -c "
import torch
from amused.bench import random_pipeline
random_pipeline('amused-512', 'cuda', torch.float16).save_pretrained('$CKPT')" || stamp "checkpoint FAILED"

stamp gpu suite
AMUSED_GPU_REPORT=$RES/gpu_tests.json timeout 420 python3 -m pytest -q -p no:cacheprovider -m gpu \
  tests/test_gpu.py tests/test_training_gpu.py tests/test_meissonic.py > "$RES/gpu_tests.log" 2>&1
echo "gpu suite exit $?"; tail -5 "$RES/gpu_tests.log"

hold_training
stamp user_facing engine server
timeout 540 python3 benchmarks/user_facing.py --quick --parts engine server --ckpt "$CKPT" --cache "$CACHE" \
  --duration 6 --out "$RES/user_facing_server.json" > "$RES/user_facing.log" 2>&1
echo "user_facing exit $?"; tail -25 "$RES/user_facing.log"

for dtype in fp16 bf16; do
  stamp meissonic $dtype
  timeout 600 python3 -m amused.cli bench --preset meissonic --dtype $dtype --steps 48 64 --batch 1 4 \
    --repeats 2 --reference-path "$REF" --out "$RES/meissonic_bench_$dtype.json" > "$RES/meissonic_$dtype.log" 2>&1
  echo "meissonic $dtype exit $?"; tail -12 "$RES/meissonic_$dtype.log"
done
release_training
stamp done
touch "$RES/.measured"
