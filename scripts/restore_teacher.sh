#!/usr/bin/env bash
# Restore the teacher of the shipped (guidance-distilled) default generator to
# runs/generator_c32_stage2/final, where configs/generator_c32_stage2.toml exports it, so that the
# recipes which start from it (configs/generator_c32_distilled.toml,
# configs/generator_c32_gpu_continue.toml) find it without rerunning its 335 minutes of training.
# It was the shipped model until the student replaced it (2026-11-30); git keeps it.
#   bash scripts/restore_teacher.sh
set -euo pipefail
commit=b2d1f36  # the last commit that shipped the teacher in kinetoscope/weights/generator
cd "$(dirname "$0")/.."
destination=runs/generator_c32_stage2/final
mkdir -p "$destination"
for file in model.safetensors config.json; do
    git show "$commit:kinetoscope/weights/generator/$file" > "$destination/$file"
done
# An export carries the autoencoder it was trained with: the default one, unchanged since.
git show "$commit:kinetoscope/weights/generator/pipeline.json" | sed 's#"\.\./autoencoder"#"autoencoder"#' > "$destination/pipeline.json"
rm -rf "$destination/autoencoder"
cp -r kinetoscope/weights/autoencoder "$destination/autoencoder"
echo "restored the teacher ($(git show "$commit:kinetoscope/weights/generator/config.json" | grep -o '"trained_steps": [0-9]*')) to $destination"
