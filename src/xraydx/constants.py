"""Names and values every layer shares: the classes, the splits, the mode vocabularies, the texts
shown to users, and where the shipped assets are.

One home for each: ``config`` validates against these vocabularies, ``transforms`` checks them, and
the CLI offers them as choices. Nothing here imports anything beyond the standard library and
:mod:`xraydx.errors`.
"""

from __future__ import annotations

from pathlib import Path

from xraydx.errors import UsageError

# ---- labels and splits ---------------------------------------------------------------------------

CLASSES: tuple[str, ...] = ("covid", "non_covid", "normal")
SPLITS: tuple[str, ...] = ("train", "val", "test")
#: a split for a source never trained on (train --holdout-source, or a CSV split column)
ALL_SPLITS: tuple[str, ...] = (*SPLITS, "external")

# ---- mode vocabularies (config values and CLI choices) -------------------------------------------

LUNG_MASK_MODES: tuple[str, ...] = ("none", "crop", "mask", "crop_mask")
#: the lung-mask modes that cut the image to the lungs' box (the model's input is that box, stretched)
CROPPING_MODES: tuple[str, ...] = ("crop", "crop_mask")
INTENSITY_MODES: tuple[str, ...] = ("none", "equalize")
#: test-time augmentation (xraydx.tta): none | affine (the mean logits of 7 fixed shifted / scaled views)
TTA_MODES: tuple[str, ...] = ("none", "affine")
#: resampling of the random affine: bilinear (smooth), or nearest (what torchvision's RandomAffine does by
#: default; about 2x cheaper on a CPU)
AUGMENT_INTERPOLATIONS: tuple[str, ...] = ("bilinear", "nearest")
AUGMENT_PRESETS: tuple[str, ...] = ("none", "light", "strong")
PRETRAINED_MODES: tuple[str, ...] = ("offline", "timm", "none")
BALANCE_MODES: tuple[str, ...] = ("loss", "sampler", "class_source", "none")
#: train.objective: the mean loss, or Group DRO over (class, source) cells (xraydx.groupdro)
OBJECTIVES: tuple[str, ...] = ("erm", "group_dro")
#: train.dro_groups: Group DRO's groups, (class, source) cells or the sources alone (xraydx.groupdro)
DRO_GROUPS: tuple[str, ...] = ("class_source", "source")
#: train.probe: no probe, a linear probe then fine-tuning everything, or the head alone (xraydx.probe)
PROBE_MODES: tuple[str, ...] = ("none", "lp-ft", "lp")
#: train.average: no weight averaging, the mean of the weights (SWA, dense as SWAD), or their EMA (xraydx.weightavg)
AVERAGE_MODES: tuple[str, ...] = ("none", "swa", "ema")
#: train.schedule after the warmup (xraydx.optim): cosine decay, constant (SWAD), or the cosine held from
#: train.average_start's step on (SWA)
SCHEDULES: tuple[str, ...] = ("cosine", "constant", "hold")
ENGINES: tuple[str, ...] = ("torch", "onnx")
SEGMENTER_ENCODERS: tuple[str, ...] = ("mobilenetv2_100", "tf_efficientnet_lite0")

# ---- defaults the CLI shows in its help (the stage modules use the same values) ------------------

AUDIT_BORDER = 0.12  # shortcut audit: border band width, fraction of the side
AUDIT_CORNER = 0.20  # shortcut audit: corner squares, fraction of the side
ONNX_OPSET = 17
#: the largest |difference| of probabilities allowed between PyTorch and onnxruntime on real images
PARITY_TOLERANCE = 1e-4
#: the environment variable holding the API token of ``xraydx serve``
TOKEN_ENV = "XRAYDX_TOKEN"

# ---- texts shown to users ------------------------------------------------------------------------

#: the predictions' ``flag`` column where the abstention rule refers a case
UNCERTAIN_FLAG = "uncertain: refer to a radiologist"
#: the predictions' ``flag`` column where the input is not a frontal chest X-ray (OOD guard, lateral view)
NOT_FRONTAL_FLAG = "not a frontal chest X-ray"
#: the predictions' ``flag`` column where the source-shift score is over its threshold (xraydx.shift)
SHIFT_FLAG = "unlike the training sources"
RESEARCH_NOTE = (
    "Research use only; not a medical device. Figures describe this data set, not another hospital's."
)

# ---- shipped assets ------------------------------------------------------------------------------

PACKAGE_DIR = Path(__file__).parent
WEIGHTS_DIR = PACKAGE_DIR / "weights"
STATIC_DIR = PACKAGE_DIR / "static"
DEFAULT_CHECKPOINT = WEIGHTS_DIR / "default.safetensors"
DEFAULT_SEGMENTER = WEIGHTS_DIR / "lungseg.safetensors"
DEFAULT_GUARD = WEIGHTS_DIR / "ood.safetensors"


def sample_dir() -> Path:
    """The bundled sample dataset (``data/sample`` of a source checkout, else of the working folder)."""
    for cand in (Path(__file__).resolve().parents[2] / "data" / "sample", Path("data/sample")):
        if cand.is_dir():
            return cand
    return Path("data/sample")


def checkpoint_or_default(given: str | Path | None) -> Path:
    """``given`` as a path, else the shipped default model; a UsageError when neither exists."""
    if given:
        return Path(given)
    if DEFAULT_CHECKPOINT.is_file():
        return DEFAULT_CHECKPOINT
    raise UsageError("--checkpoint is required (no default model is installed)")


#: resamples of the paired bootstrap of `xraydx crossval compare` (xraydx.crossval_compare)
COMPARE_RESAMPLES = 1000

#: a class a crossval fold's model learned with at least this share of its training images from one source
#: counts as learned from one source (xraydx.crossval_metrics.training_coverage): its held-out recall measures
#: the transfer from that one hospital, not from a mixture
ONE_SOURCE_SHARE = 0.9
