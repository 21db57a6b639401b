#!/usr/bin/env bash
# Reproduce the shipped lung segmenter (src/xraydx/weights/lungseg.safetensors) and the OOD guard's
# statistics fit on it (src/xraydx/weights/ood.safetensors), then measure the guard.
#
#   scripts/train_segmenter.sh [LUNGSEG_DIR] [CXR3_DIR] [ADULT_DIR] [OUT_DIR]
#
# CPU only is fine (the shipped model was trained on 2 shared CPU cores). Results are written to OUT_DIR;
# copy the two .safetensors into src/xraydx/weights/ to ship them. Changing the segmenter invalidates the
# OOD statistics (OODGuard checks the segmenter's sha256), so always rerun both steps.
set -euo pipefail
USAGE="usage: scripts/train_segmenter.sh DATA_DIR/lungseg DATA_DIR/cxr3 DATA_DIR/cxr3_adult_pneumonia [OUT]"
LUNGSEG=${1:?$USAGE}
CXR3=${2:?$USAGE}
ADULT=${3:?$USAGE}
OUT=${4:-runs/lungseg}
PY=${PYTHON:-python}
export PYTHONPATH=${PYTHONPATH:-src}

# 1. segmenter: lungseg (250 CXRs, 163 patients), patient-grouped 70/15/15 split, seed 0
$PY -m xraydx segment train --data "$LUNGSEG" --out "$OUT" --image-size 224 --epochs 12 --batch-size 8 \
    --lr 1e-3 --seed 0 --threads 2

# 2. OOD statistics with that segmenter (fit on cxr3's fit part + lungseg train; threshold on calibration)
$PY -m xraydx ood fit --segmenter "$OUT/lungseg.safetensors" --cxr3 "$CXR3" --lungseg "$LUNGSEG" \
    --out "$OUT/ood.safetensors" --k 64 --percentile 99.5 --seed 0 --threads 1 --features-cache "$OUT/features"

# 3. the benchmark (acceptance on real CXRs, rejection of non-CXRs)
$PY benchmarks/bench_ood.py --segmenter "$OUT/lungseg.safetensors" --guard "$OUT/ood.safetensors" \
    --cxr3 "$CXR3" --adult "$ADULT" --lungseg "$LUNGSEG" --json "$OUT/bench_ood.json" --threads 1 \
    --leave-source-out --features-cache "$OUT/features"
