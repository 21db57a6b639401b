"""Results as DICOM: a TID 1500 Measurement Report in a Comprehensive SR, and a Grad-CAM Secondary Capture.

Both go into the source image's study as new series (one per node run and kind), built with highdicom,
which copies the Patient and Study modules from the source image (the PACS files them with the
patient; that is the point) and lists the source in the Current Requested Procedure Evidence.

The SR's content tree is drawn in full in docs/pacs.md (TID 1500 > Imaging Measurements > one TID 1501
Measurement Group: tracking ids, finding site, algorithm name/version/parameters, a NUM probability per
class, the OOD score, CODEs for the predicted class, the uncertainty status and the OOD check, the
source IMAGE, and a TEXT comment saying research use only, not for diagnosis).

Codes: classes and xraydx's own concepts use the private coding scheme ``99XRAYDX`` (the ``99`` prefix is
DICOM's rule for local schemes); COVID-19 and "Normal" also exist in SNOMED CT and use those codes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.coding import Code

__all__ = [
    "RESEARCH_NOTE",
    "SCHEME",
    "ModelInfo",
    "build_heatmap_sc",
    "build_sr",
    "class_code",
    "read_sr",
]

SCHEME = "99XRAYDX"
RESEARCH_NOTE = "Research use only, not for diagnosis. Computed by xraydx; not reviewed by a radiologist."
_KNOWN_CLASSES: dict[str, Code] = {
    "covid": Code("840539006", "SCT", "COVID-19"),
    "normal": Code("17621005", "SCT", "Normal"),
    "non_covid": Code("non_covid", SCHEME, "Non-COVID lung infection or opacity"),
}
CONCEPT_PREDICTED = Code("predicted-class", SCHEME, "Predicted class")
CONCEPT_UNCERTAINTY = Code("uncertainty", SCHEME, "Uncertainty status")
CONCEPT_OOD = Code("ood-check", SCHEME, "Out-of-distribution check")
CONCEPT_OOD_SCORE = Code("ood-score", SCHEME, "Out-of-distribution score")
VALUE_UNCERTAIN = Code("uncertain", SCHEME, "Uncertain, refer to a radiologist")
VALUE_CONFIDENT = Code("not-flagged", SCHEME, "Not flagged")
VALUE_OOD_PASSED = Code("passed", SCHEME, "Passed: looks like a frontal chest X-ray")
VALUE_OOD_NOT_RUN = Code("not-run", SCHEME, "Not run")
PROCEDURE = Code("399208008", "SCT", "Plain chest X-ray")
MANUFACTURER = "xraydx"


def class_code(name: str) -> Code:
    return _KNOWN_CLASSES.get(name, Code(name[:16], SCHEME, name.replace("_", " ")))


def probability_concept(name: str) -> Code:
    return Code(f"prob-{name}"[:16], SCHEME, f"Probability of {class_code(name).meaning}")


@dataclass(frozen=True)
class ModelInfo:
    """What the SR says about the model: name (architecture), version (tool + checkpoint date), id."""

    name: str
    version: str
    model_id: str
    engine: str
    classes: tuple[str, ...]
    threshold: float | None = None
    members: int = 0  # an ensemble whose rule also flags where its members disagree: how many; else 0

    @classmethod
    def from_predictor(cls, predictor: Any) -> ModelInfo:
        """From an xraydx.predict.Predictor; the id is every output's (:func:`xraydx.schema.model_id`)."""
        from xraydx.schema import model_id

        meta = predictor.meta
        arch = str((meta.get("architecture") or {}).get("name", "unknown"))
        version = f"xraydx {meta.get('tool_version', '?')}, checkpoint {str(meta.get('created', '?'))[:19]}"
        threshold = (predictor.abstention or {}).get("threshold")
        return cls(
            name=f"xraydx {arch}", version=version[:64],
            model_id=getattr(predictor, "model_id", None) or model_id(predictor.checkpoint, meta),
            engine=str(predictor.engine),
            classes=tuple(predictor.classes), threshold=None if threshold is None else float(threshold),
            members=int(predictor.n_members) if getattr(predictor, "members_rule", False) else 0,
        )  # fmt: skip


@dataclass(frozen=True)
class Classification:
    probs: Sequence[float]
    flag: str  # "" or the uncertainty flag text
    ood_score: float | None  # None where the guard did not run


def _series_fields(series_uid: str, series_number: int, description: str) -> dict[str, Any]:
    return {
        "series_instance_uid": series_uid,
        "series_number": series_number,
        "instance_number": 1,
        "manufacturer": MANUFACTURER,
        "series_description": description,
    }


def build_sr(
    source: Dataset, result: Classification, model: ModelInfo, *, series_uid: str, series_number: int = 9901
) -> Dataset:
    """A Comprehensive SR holding one TID 1500 report of ``result`` for the ``source`` image."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    algo = hd.sr.AlgorithmIdentification(
        name=model.name, version=model.version, parameters=_algorithm_parameters(model)
    )
    unit = codes.UCUM.NoUnits
    measurements = [
        hd.sr.Measurement(name=probability_concept(c), value=float(p), unit=unit)
        for c, p in zip(model.classes, result.probs, strict=True)
    ]
    if result.ood_score is not None:
        measurements.append(
            hd.sr.Measurement(name=CONCEPT_OOD_SCORE, value=float(result.ood_score), unit=unit)
        )
    top = model.classes[int(np.argmax(result.probs))]
    evaluations = [
        hd.sr.QualitativeEvaluation(CONCEPT_PREDICTED, class_code(top)),
        hd.sr.QualitativeEvaluation(CONCEPT_UNCERTAINTY, VALUE_UNCERTAIN if result.flag else VALUE_CONFIDENT),
        hd.sr.QualitativeEvaluation(
            CONCEPT_OOD, VALUE_OOD_NOT_RUN if result.ood_score is None else VALUE_OOD_PASSED
        ),
    ]
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier="xraydx chest X-ray classification"),
        algorithm_id=algo,
        finding_sites=[hd.sr.FindingSite(anatomic_location=codes.SCT.Lung)],
        measurements=measurements,
        qualitative_evaluations=evaluations,
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(source)],
    )  # fmt: skip
    note = RESEARCH_NOTE
    if model.threshold is not None:
        note += f" Flagged as uncertain when the top probability is below {model.threshold:.3f}"
        note += (
            f" or the ensemble's {model.members} networks pick different classes." if model.members else "."
        )
    group[0].ContentSequence.append(
        hd.sr.TextContentItem(
            name=codes.DCM.Comment, value=note, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
        )
    )
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=hd.UID(), name="xraydx", manufacturer_name=MANUFACTURER, model_name=model.model_id[:64]
    )
    context = hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DCM.Device, observer_identifying_attributes=device
        )
    )
    report = hd.sr.MeasurementReport(
        observation_context=context, procedure_reported=PROCEDURE, imaging_measurements=[group]
    )
    return hd.sr.ComprehensiveSR(
        evidence=[source], content=report[0], sop_instance_uid=hd.UID(), is_complete=True, is_final=False,
        is_verified=False, **_series_fields(series_uid, series_number, "xraydx AI classification (research use only)"),
    )  # fmt: skip


def _algorithm_parameters(model: ModelInfo) -> list[str]:
    params = [f"model_id={model.model_id}", f"engine={model.engine}"]
    if model.threshold is not None:
        params.append(f"abstention_threshold={model.threshold:.4f}")
    if model.members:
        params.append(f"flag_members_disagree={model.members}")
    return params


def build_heatmap_sc(
    source: Dataset, overlay_rgb: np.ndarray, model: ModelInfo, predicted: str, *, series_uid: str,
    series_number: int = 9902,
) -> Dataset:  # fmt: skip
    """A Secondary Capture (RGB) of the Grad-CAM overlay for the predicted class, drawn on what the model saw
    (the preprocessed image), in the source's study."""
    import highdicom as hd
    from pydicom.uid import ExplicitVRLittleEndian

    rgb = np.ascontiguousarray(overlay_rgb, dtype=np.uint8)
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected an RGB overlay (H, W, 3); got {rgb.shape}")
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source, pixel_array=rgb, photometric_interpretation="RGB", bits_allocated=8,
        coordinate_system="PATIENT", patient_orientation=_orientation(source), sop_instance_uid=hd.UID(), transfer_syntax_uid=ExplicitVRLittleEndian,
        **_series_fields(series_uid, series_number, "xraydx Grad-CAM (research use only)"),
    )  # fmt: skip
    sc.ImageComments = f"Grad-CAM for {class_code(predicted).meaning} ({model.model_id}). {RESEARCH_NOTE}"
    sc.BurnedInAnnotation = "NO"
    sc.ReferencedImageSequence = [_reference(source)]
    return sc


def _orientation(source: Dataset) -> tuple[str, str]:
    """The source's Patient Orientation where it has two valid values, else a frontal chest film's usual
    display (rows towards the patient's left, columns towards the feet)."""
    value = source.get("PatientOrientation")
    parts = [str(v).strip().upper() for v in value] if value and not isinstance(value, str) else []
    if len(parts) == 2 and all(p and set(p) <= set("LRAPHF") for p in parts):
        return parts[0], parts[1]
    return "L", "F"


def _reference(source: Dataset) -> Dataset:
    ref = Dataset()
    ref.ReferencedSOPClassUID = source.SOPClassUID
    ref.ReferencedSOPInstanceUID = source.SOPInstanceUID
    return ref


def read_sr(ds: Dataset) -> dict[str, Any]:
    """The classification in an SR written by :func:`build_sr`: probabilities by class, predicted class code,
    uncertainty and OOD codes, the referenced source SOP Instance UIDs, the comment (for tools and checks)."""
    out: dict[str, Any] = {"probs": {}, "sources": [], "codes": {}, "text": [], "numbers": {}}
    prob_codes = {}

    def walk(items: Sequence[Dataset]) -> None:
        for it in items:
            name = it.ConceptNameCodeSequence[0] if "ConceptNameCodeSequence" in it else None
            vt = it.get("ValueType", "")
            if vt == "NUM" and name is not None:
                value = float(it.MeasuredValueSequence[0].NumericValue)
                out["numbers"][str(name.CodeValue)] = value
                if str(name.CodeValue).startswith("prob-"):
                    prob_codes[str(name.CodeValue)[5:]] = value
            elif vt == "CODE" and name is not None:
                out["codes"][str(name.CodeValue)] = str(it.ConceptCodeSequence[0].CodeValue)
            elif vt == "TEXT":
                out["text"].append(str(it.TextValue))
            elif vt == "IMAGE":
                ref = it.ReferencedSOPSequence[0]
                out["sources"].append(str(ref.ReferencedSOPInstanceUID))
            if "ContentSequence" in it:
                walk(it.ContentSequence)

    walk(ds.ContentSequence)
    out["probs"] = prob_codes
    return out
