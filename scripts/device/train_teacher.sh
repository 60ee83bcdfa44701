#!/bin/bash
# On a device machine: encode the training latents with the bundled VAE, train a teacher DiT until DEADLINE_S
# seconds after the start, and write it to $OUT in fp16 (in 10 MB shards: a returned file may not exceed 16 MiB)
# with its log.
#   usage: scripts/device/train_teacher.sh DEADLINE_S NUM_VIDEOS NUM_STYLED WORLD BATCH LR [TRAIN TEACHER ARGS]
#   e.g.:  scripts/device/train_teacher.sh 570 24576 6144 14 1024 8e-4 --layers 10 --heads 5
# ARMS="NAME=ARGS;NAME=ARGS" (environment) trains one DiT per arm side by side on the same GPU and latents, each
# with the common arguments plus its own; since at most 8 files come back, the arms' folders (NAME/dit-fp16,
# NAME/log.jsonl, NAME/train.log) come back as one tar archive cut in 15 MB parts: `cat arms.tar.part-* | tar -x`.
set -euo pipefail
START=$(date +%s)
DEADLINE=$1; NUM=$2; NUM_STYLED=$3; WORLD=$4; BATCH=$5; LR=$6; shift 6
RUNS=${RUNS:-/tmp/runs}
source scripts/device/setup.sh
encode_in_parallel $RUNS/latents $NUM $WORLD
encode_in_parallel $RUNS/latents-styled $NUM_STYLED $WORLD "seed=2, styles=('neon', 'stripes', 'pixel', 'outline')"
echo "encoded in $(( $(date +%s) - START )) s"
# The learning rate decays over the time left; 50 s stay for writing and shrinking the result.
MINUTES=$(python3 -c "print(max(0.2, ($DEADLINE - $(date +%s) + $START - 50) / 60))")
echo "training for $MINUTES minutes"

# train_into DEST [ARGS]: one DiT trained into $RUNS/teacher-<basename DEST>, its fp16 weights and logs to DEST.
train_into() {
  local dest=$1 run=$RUNS/teacher-$(basename $1); shift
  mkdir -p $dest
  TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1 python3 -m neodragon train teacher --latents $RUNS/latents \
      --latents $RUNS/latents-styled -o $run --steps 1000000 --batch-size $BATCH \
      --lr $LR --save-every 1000000 --max-minutes $MINUTES "$@" > $dest/train.log 2>&1 \
      || { tail -c 3000 $dest/train.log; return 1; }
  python3 -c "from neodragon.models import PyramidMMDiT
PyramidMMDiT.from_pretrained('$run/final').half().save_pretrained('$dest/dit-fp16', max_shard_size='10MB')"
  cp $run/log.jsonl $dest/
  echo "$(basename $dest): $(tail -n 1 $dest/log.jsonl)"
}

if [ -z "${ARMS:-}" ]; then
  train_into $OUT "$@"
else
  pids=()
  IFS=';' read -ra ARM_LIST <<< "$ARMS"
  for arm in "${ARM_LIST[@]}"; do
    read -ra ARM_ARGS <<< "${arm#*=}"
    train_into $RUNS/arms/${arm%%=*} "$@" ${ARM_ARGS[@]+"${ARM_ARGS[@]}"} &
    pids+=($!)
  done
  status=0
  for pid in "${pids[@]}"; do wait "$pid" || status=1; done
  tar -cf - -C $RUNS/arms . | split -b 15M - $OUT/arms.tar.part-
  [ $status = 0 ] || exit 1
fi
echo "total $(( $(date +%s) - START )) s"
