#!/bin/bash
# Here, once per checkout: put what a device machine lacks into .devcarry/ (ignored by git, about 29 MB), which
# every device call then names in `carry`: the wheels of diffusers and peft, and the packed text encoder.
set -euo pipefail
cd "$(dirname "$0")/../.."
grep -qx "/.devcarry/" .git/info/exclude 2>/dev/null || echo "/.devcarry/" >> .git/info/exclude
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 -d .devcarry/whl diffusers==0.42.1 peft==0.21.2 importlib_metadata==8.7.0
python3 scripts/device/pack_text_encoder.py pack .devcarry/minilm
du -sh .devcarry
