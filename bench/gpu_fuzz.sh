#!/usr/bin/env bash
# On a CUDA machine: the fuzzer with every program on the GPU, so the op runs the compiled Triton kernels.
# Usage: bash bench/gpu_fuzz.sh [log dir] [processes] [seconds] [first seed]
# Runs `processes` copies of scripts/fuzz_long.py side by side (seeds first, first + 10000, ...) for `seconds`
# each (most of it goes to compiling the Triton kernels for each new shape; a second run on the same
# machine finds more of them in Triton's cache), then prints the merged summary (python scripts/fuzz_long.py --merge) to summary.md in the log dir,
# and packs the per-process JSON summaries (what a later --merge reads) into summaries.tgz beside it: two files to
# copy off a machine that returns only a few. Each process writes its summary when `seconds` interrupts it, with
# every program that finished; give the whole command a minute more than `seconds` for that and the merge.
set -uo pipefail
cd "$(dirname "$0")/.."
log=${1:-/tmp/flashfuse-fuzz}
procs=${2:-8}
seconds=${3:-480}
first=${4:-200000}
mkdir -p "$log"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} TRITON_INTERPRET=0 PYTHONUNBUFFERED=1
for i in $(seq 0 $((procs - 1))); do
  timeout --signal=INT "$seconds" python scripts/fuzz_long.py --device cuda --examples 100000 --every 20 \
    --seed $((first + 10000 * i)) --log "$log/cuda-$i.log" --summary "$log/cuda-$i.json" > "$log/cuda-$i.out" 2>&1 &
done
wait
python scripts/fuzz_long.py --merge "$log"/cuda-*.json > "$log/summary.md"
tar czf "$log/summaries.tgz" -C "$log" $(cd "$log" && ls cuda-*.json)
cat "$log/summary.md" | head -8
grep -h -A30 FAILURE "$log"/cuda-*.log | head -150 || true
