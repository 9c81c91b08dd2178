#!/usr/bin/env bash
# Train the generator on a lent GPU machine (this workplace's `device` tool) and bring the run back.
#
# Here, once per session (the text encoder's wheel cannot be installed there, and the working tree
# that travels is limited to 64 MiB; .gitignore keeps .device out of git):
#   .venv/bin/python scripts/compact_text_encoder.py .device/text_encoder
# Then one device call, carrying .device, with a timeout about two minutes over MINUTES:
#   bash scripts/device_train.sh configs/generator_c32_gpu.toml 8
# $OUT gets the exported weights (model.safetensors, config.json, pipeline.json), the run's log,
# loss curve and last sample sheet, and the console output; copy them into a run folder here.
set -euo pipefail
recipe=${1:?usage: scripts/device_train.sh RECIPE MINUTES}
minutes=${2:?usage: scripts/device_train.sh RECIPE MINUTES}
out=${OUT:?OUT must name the folder whose files come back}

export KINETOSCOPE_TEXT_ENCODER=.device/text_encoder PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || echo "no nvidia-smi"; } | tee "$out/console.log"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" | tee -a "$out/console.log"

# The progress bar's carriage returns would make one huge line; keep every 200th update.
python3 -m kinetoscope train --recipe "$recipe" --minutes "$minutes" 2>&1 \
    | tr '\r' '\n' | awk '!/it\/s|s\/it/ || NR % 200 == 0' | tee -a "$out/console.log"

run=$(python3 -c "from kinetoscope.training.common import load_recipe; print(load_recipe('$recipe')['train']['output'])")
cp "$run/final/model.safetensors" "$run/final/config.json" "$run/final/pipeline.json" "$out/"
cp "$run/log.jsonl" "$run/loss.png" "$out/"
last_sheet=$(ls "$run/samples/"*.png 2>/dev/null | tail -1 || true)
if [ -n "$last_sheet" ]; then cp "$last_sheet" "$out/samples.png"; fi
ls -la "$out"
