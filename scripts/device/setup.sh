# Sourced at the start of every device call (from the repository root): installs the carried wheels and text
# encoder under /tmp/site and puts them and the source tree on PYTHONPATH. DEVICE=cpu skips the wheels, to try a
# device script here.
DEVICE=${DEVICE:-cuda}
if [ "$DEVICE" = cuda ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      .devcarry/whl/*.whl
  nvidia-smi -L
fi
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1
python3 scripts/device/pack_text_encoder.py unpack .devcarry/minilm /tmp/site
python3 -c "import torch, transformers, diffusers; print('torch', torch.__version__, 'transformers', \
transformers.__version__, 'diffusers', diffusers.__version__)"

# encode_in_parallel FOLDER NUM WORLD [KEYWORDS]: NUM training videos into FOLDER with the bundled VAE, by WORLD
# processes sharing the GPU (rendering is on the CPU); KEYWORDS are more arguments of encode_latents.
encode_in_parallel() {
  local pids=()
  for rank in $(seq 0 $(($3 - 1))); do
    OMP_NUM_THREADS=1 python3 -c "from neodragon.training.latents import encode_latents
from neodragon.presets import load_video_vae
encode_latents(load_video_vae('nano'), '$1', $2, rank=$rank, world=$3, device='$DEVICE'${4:+, $4})" &
    pids+=($!)
  done
  for pid in "${pids[@]}"; do wait "$pid"; done
}
