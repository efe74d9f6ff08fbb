#!/usr/bin/env bash
# bench/gpu_sdxl.py on a lent GPU machine (the device tool), as one call that fits its lease.
#
# That machine has Python 3.12 with torch, transformers, accelerate and peft, but not diffusers
# or torchao, and reaches no package registry: `make gpu-wheels` downloads those two here into
# .whl/, and the call carries the folder:
#
#     run(command="bash bench/gpu_lease.sh", carry=[".whl"], timeout_s=600)
#
# A lease is 15 minutes, the machine's start included, and one command at most 10: the
# benchmark gets BUDGET_S seconds (default 450), the likeliest gains first. The JSON, the
# Markdown tables and the log land in $OUT after every part, so a run cut short still returns
# what it measured.
set -o pipefail
out="${OUT:-bench/results}"
mkdir -p "$out"
echo "==> installing the carried wheels: $(ls .whl)"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/card.txt"
python3 -c "import torch, diffusers, transformers; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__)"
python3 bench/gpu_sdxl.py --budget-s "${BUDGET_S:-450}" --out "$out/gpu_sdxl.json" 2>&1 | tee "$out/gpu_sdxl.log"
