#!/usr/bin/env bash
# One "wait" call of a background run on the device machine (the runs started with setsid by grow_uvit_gpu.sh and
# the like), safe against the machine having gone back between calls:
#   bash scripts/embedded/device_wait.sh LOG SECONDS DONE_PATTERN [FILE_OR_GLOB ...]
# - LOG missing: this is a fresh machine (the earlier one went cold after 30 s idle and took the run with it):
#   says so and exits 3 at once, instead of sleeping out the call on nothing (session 12 lost 500 s so);
# - else waits up to SECONDS for DONE_PATTERN in LOG, printing its tail;
# - then, whether done or not, copies every FILE_OR_GLOB that exists to $OUT, so that what the run has written so
#   far comes back with this call even if the machine is gone by the next one. Exits 0 when done, 2 when not yet.
set -u
LOG=$1; SECONDS_MAX=$2; DONE=$3; shift 3
if [ ! -e "$LOG" ]; then
  echo "device_wait: $LOG does not exist: a fresh machine, the background run is gone"; exit 3
fi
end=$((SECONDS + SECONDS_MAX)); done=2
while [ "$SECONDS" -lt "$end" ]; do
  if grep -q -- "$DONE" "$LOG"; then done=0; break; fi
  sleep 5
done
tail -n 15 "$LOG"
mkdir -p "${OUT:?}"
for pattern in "$@"; do
  for f in $pattern; do [ -f "$f" ] && cp "$f" "$OUT/"; done
done
ls -la "$OUT"
exit $done
