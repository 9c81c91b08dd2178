#!/usr/bin/env bash
# Train the generator on a lent GPU machine (this workplace's `device` tool) and bring the run back.
#
# Here, once per session (the text encoder's wheel cannot be installed there, and the working tree
# that travels is limited to 64 MiB; .gitignore keeps .device out of git):
#   .venv/bin/python scripts/compact_text_encoder.py .device/text_encoder
# Then one device call, carrying .device, with a timeout about three minutes over MINUTES:
#   bash scripts/device_train.sh configs/generator_c32_gpu.toml 8
# Every call starts a fresh run in runs/device, then scores the export with `kinetoscope eval`
# (PER_TIER prompts per tier, 50 unless set).
# $OUT gets console.log, the run's log.jsonl, loss.png and last sample sheet, eval.json, and the
# exported folder as final.tar in parts of at most 15 MiB (a returned file may not exceed 16 MiB);
# here: cat final.tar.part-* | tar -x -C runs/device
set -euo pipefail
usage="usage: scripts/device_train.sh RECIPE MINUTES"
recipe=$(realpath "${1:?$usage}")
minutes=${2:?$usage}
out=${OUT:?OUT must name the folder whose files come back}
cd "$(dirname "$0")/.."
export KINETOSCOPE_TEXT_ENCODER=$PWD/.device/text_encoder PYTHONUNBUFFERED=1
if [ ! -f "$KINETOSCOPE_TEXT_ENCODER/compact.json" ]; then
    echo "no compact text encoder in .device/text_encoder: make it with scripts/compact_text_encoder.py and carry .device" >&2
    exit 2
fi
run=runs/device
rm -rf "$run"

bring_back() {  # also after a failed run: whatever it logged is what says why
    cp "$run/log.jsonl" "$run/loss.png" "$out/" 2>/dev/null || true
    last_sheet=$(ls "$run/samples/"*.png 2>/dev/null | tail -1 || true)
    if [ -n "$last_sheet" ]; then cp "$last_sheet" "$out/samples.png"; fi
    if [ -d "$run/final" ]; then tar -C "$run" -cf - final | split -b 15M - "$out/final.tar.part-"; fi
    ls -la "$out"
}
trap bring_back EXIT

{ nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || echo "no nvidia-smi"; } | tee "$out/console.log"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" | tee -a "$out/console.log"
# The progress bar's carriage returns would make one huge line: keep every 200th of its updates.
python3 -m kinetoscope train --recipe "$recipe" --output "$run" --minutes "$minutes" 2>&1 \
    | tr '\r' '\n' | awk '/it\/s|s\/it/ { if (++updates % 200) next } { print; fflush() }' | tee -a "$out/console.log"
python3 -m kinetoscope eval --weights "$run/final" --per-tier "${PER_TIER:-50}" --report "$out/eval.json" 2>&1 \
    | tr '\r' '\n' | grep -v "%|" | tee -a "$out/console.log"
