#!/bin/bash
# On a device machine: encode NUM_VIDEOS latents with the bundled VAE, then time training steps of fresh DiTs of
# each SIZE (LAYERSxHEADS) at each batch size with benchmarks/bench_teacher_step.py; the table goes to $OUT.
#   usage: scripts/device/profile_step.sh NUM_VIDEOS WORLD "BATCH SIZES" SIZE...
#   e.g.:  scripts/device/profile_step.sh 2048 14 "128 256 512 1024 2048" 6x4 10x5
set -euo pipefail
NUM=$1; WORLD=$2; BATCHES=$3; shift 3
RUNS=${RUNS:-/tmp/runs}
source scripts/device/setup.sh
encode_in_parallel $RUNS/latents $NUM $WORLD
SIZES=(); for size in "$@"; do SIZES+=(--size "$size"); done
TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1 python3 benchmarks/bench_teacher_step.py --latents $RUNS/latents \
    --batch-sizes $BATCHES --steps ${STEPS:-20} --warmup ${WARMUP:-5} "${SIZES[@]}" 2>&1 | tee $OUT/profile.log
