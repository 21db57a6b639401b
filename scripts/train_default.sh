#!/usr/bin/env bash
# Reproduce the shipped default model (src/xraydx/weights/default.safetensors; MODEL_CARD.md).
#
#   scripts/train_default.sh [SHARED_DATA_DIR] [RUNS_DIR]
#
# CPU only is fine: the shipped model was trained on 2 shared CPU cores (1 torch thread, a second
# training beside it), about 5 min per epoch, 10 epochs. Copy the result into the package to ship it:
#   cp RUNS_DIR/default-model/checkpoints/best.safetensors src/xraydx/weights/default.safetensors
set -euo pipefail
SHARED=${1:-../shared/data}
RUNS=${2:-runs}
PY=${PYTHON:-python}
export PYTHONPATH=${PYTHONPATH:-src}

# 1. the training manifest: cxr3 with the split xraydx makes for it (patient-grouped, seed 0) + the
#    ieee8023 images of lungseg (COVID-19) and cxr3_adult_pneumonia (non-COVID), split by patient
$PY scripts/make_default_manifest.py --shared "$SHARED" --out "$RUNS/default-data.csv"

# 2. the recipe: lung crop (shipped segmenter), every image at one base resolution first, histogram
#    equalisation, light batched augmentation, mobilenetv2_100 (offline ImageNet weights), 224 px
$PY -m xraydx train --data "$RUNS/default-data.csv" --runs-dir "$RUNS" --name default-model \
    --lung-mask crop --intensity equalize --base-size 224 --augment light --image-size 224 --epochs 10 \
    --set train.threads=1 --set train.augment_interpolation=bilinear
