"""The one prediction schema (xraydx.schema, README "Prediction rows"): every output kind -- predict CSV and
JSON, evaluate's predictions.csv, explain.csv, the server's rows (one upload, and a batch's error), the
DICOM results log -- is validated against the shipped JSON Schema file, has the schema's columns in the
schema's order, and marks non-frontal inputs (a lateral DICOM, a noise image) with the flag.

``jsonschema`` is not installed here, so :func:`validate` is a small checker of the keywords the schema
uses (a keyword it does not know fails the test rather than passing silently)."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from conftest import TINY_MODEL, sample_images
from xraydx import schema
from xraydx.cli import main
from xraydx.constants import CLASSES, NOT_FRONTAL_FLAG, UNCERTAIN_FLAG

# ---- a small JSON Schema checker -----------------------------------------------------------------

_TYPES = {
    "string": lambda v: isinstance(v, str),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "null": lambda v: v is None,
    "object": lambda v: isinstance(v, dict),
    "boolean": lambda v: isinstance(v, bool),
}
_ANNOTATIONS = {"$schema", "$id", "title", "description"}


def validate(v: Any, s: dict[str, Any], where: str = "$") -> list[str]:
    """The errors of ``v`` against schema ``s`` (the keywords prediction.schema.json uses)."""
    errs: list[str] = []
    for key, arg in s.items():
        if key in _ANNOTATIONS or key.startswith("x-") or key in ("then", "else"):
            continue
        if key == "type":
            kinds = arg if isinstance(arg, list) else [arg]
            if not any(_TYPES[k](v) for k in kinds):
                errs.append(f"{where}: {v!r} is not of type {arg}")
        elif key == "enum":
            if v not in arg:
                errs.append(f"{where}: {v!r} not in {arg}")
        elif key == "const":
            if v != arg:
                errs.append(f"{where}: {v!r} != {arg!r}")
        elif key == "pattern":
            if isinstance(v, str) and not re.search(arg, v):
                errs.append(f"{where}: {v!r} does not match {arg}")
        elif key == "minLength":
            if isinstance(v, str) and len(v) < arg:
                errs.append(f"{where}: shorter than {arg}")
        elif key == "minimum":
            if _TYPES["number"](v) and v < arg:
                errs.append(f"{where}: {v} < {arg}")
        elif key == "maximum":
            if _TYPES["number"](v) and v > arg:
                errs.append(f"{where}: {v} > {arg}")
        elif key == "not":
            if not validate(v, arg, where):
                errs.append(f"{where}: matches a 'not' schema")
        elif key == "required":
            if isinstance(v, dict):
                errs += [f"{where}: missing {k!r}" for k in arg if k not in v]
        elif key == "minProperties":
            if isinstance(v, dict) and len(v) < arg:
                errs.append(f"{where}: fewer than {arg} keys")
        elif key in ("properties", "patternProperties", "additionalProperties"):
            if isinstance(v, dict) and key == "properties":
                for k, sub in arg.items():
                    if k in v:
                        errs += validate(v[k], sub, f"{where}.{k}")
            elif isinstance(v, dict) and key == "patternProperties":
                for pat, sub in arg.items():
                    errs += [e for k in v if re.search(pat, k) for e in validate(v[k], sub, f"{where}.{k}")]
            elif isinstance(v, dict):
                known = set(s.get("properties", {}))
                pats = list(s.get("patternProperties", {}))
                extra = [k for k in v if k not in known and not any(re.search(p, k) for p in pats)]
                if arg is False and extra:
                    errs.append(f"{where}: unexpected keys {extra}")
        elif key == "allOf":
            for sub in arg:
                errs += validate(v, sub, where)
        elif key == "if":
            branch = s.get("then") if not validate(v, arg, where) else s.get("else")
            if branch is not None:
                errs += validate(v, branch, where)
        else:
            raise AssertionError(f"the test's checker does not know the keyword {key!r}: extend it")
    return errs


def shipped_schema() -> dict[str, Any]:
    return json.loads(schema.SCHEMA_FILE.read_text(encoding="utf-8"))


def check_rows(rows: list[dict[str, Any]], kind: str, classes: tuple[str, ...] = CLASSES) -> None:
    """Every row valid against the shipped schema, with exactly the kind's columns in order."""
    sch = shipped_schema()
    assert rows
    for r in rows:
        assert list(r) == schema.columns(classes, kind), r
        assert validate(r, sch) == [], (r, validate(r, sch))


def csv_rows(path: Path, kind: str) -> list[dict[str, Any]]:
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        assert reader.fieldnames == schema.columns(CLASSES, kind)
        return [schema.from_csv(r) for r in reader]


# ---- the checker and the schema file themselves ----------------------------------------------------


def test_shipped_schema_file_is_the_module_s_schema() -> None:
    """One source of truth: the file is what xraydx.schema generates (python -m xraydx.schema)."""
    assert schema.SCHEMA_FILE.read_text(encoding="utf-8") == schema.schema_text()


def test_checker_rejects_what_the_schema_forbids() -> None:
    sch = shipped_schema()
    good = schema.make_row("a.png", CLASSES, [0.7, 0.2, 0.1], "ok", model="resnet-0123456789ab")
    assert validate(good, sch) == []
    bad = [
        {**good, "ood_score": "0.412"},  # a number, not a string
        {**good, "flag": ""},  # null when empty
        {k: v for k, v in good.items() if k != "model_id"},  # every key
        {**good, "status": "not_cxr"},  # not_cxr without its flag
        {**good, "prediction": None},  # ok without a class
        {**good, "prob_covid": 1.5},
        {**good, "surprise": 1},
        {**schema.error_row("b.png", CLASSES, "x", model="resnet-0123456789ab"), "prob_covid": 0.3},
    ]
    for b in bad:
        assert validate(b, sch), b


def test_flag_rule() -> None:
    m = "resnet-0123456789ab"
    assert (
        schema.make_row("a", CLASSES, [0.4, 0.3, 0.3], "ok", model=m, uncertain=True)["flag"]
        == UNCERTAIN_FLAG
    )
    r = schema.make_row("a", CLASSES, [0.9, 0.05, 0.05], "not_cxr", model=m, ood_reason="lateral view")
    assert r["flag"] == NOT_FRONTAL_FLAG and r["ood_reason"] == "lateral view" and r["prediction"] == "covid"
    assert schema.make_row("a", CLASSES, [0.9, 0.05, 0.05], "ok", model=m)["flag"] is None
    e = schema.error_row("a", CLASSES, "unreadable", model=m)
    assert e["flag"] is None and e["prediction"] is None and e["status"] == "error: unreadable"


# ---- every output kind ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A classifier checkpoint without training: timm's test network, 64 px, no lung mask."""
    import torch

    from xraydx.checkpoint import save
    from xraydx.models import create_model

    torch.manual_seed(0)
    model = create_model(TINY_MODEL, 3, pretrained="none")
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    meta = {
        "classes": list(CLASSES), "architecture": {"name": TINY_MODEL, "in_chans": 1},
        "input_size": 64, "preprocessing": {"size": 64, "lung_mask": "none", "mean": 0.5, "std": 0.25},
        "calibration": {"method": "temperature", "temperature": 1.0},
        "abstention": {"threshold": 0.5},
    }  # fmt: skip
    save(path, model, meta)
    return path


def lateral_dicom(path: Path, view: str = "LL") -> Path:
    from dicomfiles import write, xray_dataset

    return write(xray_dataset(sample_images("test", "normal")[0], view=view), path)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("in")
    for i, p in enumerate(sample_images("test")[:2]):
        (d / f"a{i}_{p.name}").write_bytes(p.read_bytes())
    lateral_dicom(d / "b_lateral.dcm")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)).save(d / "c_noise.png")
    (d / "d_notes.png").write_text("not an image\n")
    return d


def test_predict_csv_and_json_follow_the_schema(tiny_ckpt: Path, inputs: Path, tmp_path: Path) -> None:
    from xraydx.predict import expand_inputs

    missing = tmp_path / "gone.png"
    for fmt in ("csv", "json"):
        out = tmp_path / f"pred.{fmt}"
        first = tmp_path / "before.png"
        args = [
            "predict",
            str(first),
            str(inputs),
            str(missing),
            "--checkpoint",
            str(tiny_ckpt),
            "--out",
            str(out),
        ]
        main([*args, "--format", fmt, "-q"])
        if fmt == "csv":
            rows = csv_rows(out, "predict")
        else:
            doc = json.loads(out.read_text())
            rows = doc["predictions"]
            assert doc["columns"] == schema.columns(CLASSES, "predict")
        check_rows(rows, "predict")
        by = {Path(r["path"]).name: r for r in rows}
        assert len({r["model_id"] for r in rows}) == 1
        # the lateral DICOM: the view rule (issue 17 items 3 and 6), flagged in every output
        lat = by["b_lateral.dcm"]
        assert lat["status"] == "not_cxr" and lat["flag"] == NOT_FRONTAL_FLAG
        assert "ViewPosition LL" in lat["ood_reason"] and lat["prediction"] in CLASSES
        assert by["c_noise.png"]["flag"] == NOT_FRONTAL_FLAG  # the OOD guard
        assert by["d_notes.png"]["status"].startswith("error: ") and by["gone.png"]["status"].startswith(
            "error: "
        )
        # rows in input order: a missing input's row where it was given, the folder in its walk order
        want = [str(first), *(str(p) for p in expand_inputs([inputs])[0]), str(missing)]
        assert [r["path"] for r in rows] == want
        # no row that a script filtering on flag/status accepts is a non-frontal input
        accepted = [r for r in rows if r["flag"] is None and r["status"] == "ok"]
        assert {Path(r["path"]).name for r in accepted} <= {p.name for p in inputs.glob("a*")}


def test_explain_csv_follows_the_schema(tiny_ckpt: Path, inputs: Path, tmp_path: Path) -> None:
    from xraydx.explain import explain_files

    explain_files(tiny_ckpt, [str(inputs)], tmp_path / "cam", device="cpu", progress=False)
    rows = csv_rows(tmp_path / "cam" / "explain.csv", "explain")
    check_rows(rows, "explain")
    by = {Path(r["path"]).name: r for r in rows}
    assert by["b_lateral.dcm"]["flag"] == NOT_FRONTAL_FLAG and by["d_notes.png"]["prediction"] is None


def test_evaluate_predictions_follow_the_schema_in_input_order(tmp_path: Path) -> None:
    from xraydx.data import Record
    from xraydx.evaluate import write_split_predictions

    recs = [Record(Path(f"/d/{i}.png"), CLASSES[i % 3], "test", f"g{i}", source="s") for i in range(4)]
    logits = np.array([[2.0, 0.0, 0.0], [0.0, 0.1, 0.0], [0.0, 0.0, 3.0]], dtype=np.float32)
    out = tmp_path / "predictions.csv"
    write_split_predictions(
        out, [recs[0], recs[2], recs[3]], logits, classes=CLASSES, temperature=1.0,
        abstention={"threshold": 0.5}, model_id="resnet-0123456789ab", failures=[(recs[1], "unreadable")],
        order=[str(r.path) for r in recs],
    )  # fmt: skip
    rows = csv_rows(out, "evaluate")
    check_rows(rows, "evaluate")
    assert [r["path"] for r in rows] == [str(r.path) for r in recs]
    assert rows[1]["status"] == "error: unreadable" and rows[1]["label"] == CLASSES[1]
    assert rows[2]["flag"] == UNCERTAIN_FLAG and rows[0]["flag"] is None


def test_serve_rows_follow_the_schema(tiny_ckpt: Path, inputs: Path) -> None:
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from xraydx import serve

    with TestClient(
        serve.create_app(tiny_ckpt), raise_server_exceptions=False, base_url="http://127.0.0.1"
    ) as c:
        good = next(inputs.glob("a0_*"))
        d = c.post("/api/predict", files={"file": (good.name, good.read_bytes(), "image/png")}).json()
        lat = (inputs / "b_lateral.dcm").read_bytes()
        dl = c.post("/api/predict", files={"file": ("lat.dcm", lat)}).json()
        files = [("files", ("x.png", good.read_bytes())), ("files", ("notes.png", b"not an image\n"))]
        b = c.post("/api/predict/batch", files=files).json()
    check_rows([d["row"], dl["row"], *(r["row"] for r in b["results"])], "serve")
    assert d["row"]["model_id"] == d["model_id"]
    assert dl["flag"] == dl["row"]["flag"] == NOT_FRONTAL_FLAG and dl["status"] == "not_cxr"
    assert "ViewPosition LL" in dl["row"]["ood_reason"]
    assert b["results"][1]["row"]["status"].startswith("error: ")


def test_dicom_results_log_follows_the_schema(tiny_ckpt: Path, inputs: Path, tmp_path: Path) -> None:
    pytest.importorskip("highdicom")
    import pydicom

    from xraydx.dicom.pipeline import Pipeline
    from xraydx.dicom.results import Record, ResultsLog, read_records
    from xraydx.predict import Predictor

    pred = Predictor(tiny_ckpt, "cpu")
    pipe = Pipeline(pred, tmp_path / "node")
    log = ResultsLog(tmp_path / "node", pred.classes, pred.model_id)
    for view in ("LL", "PA"):
        f = lateral_dicom(tmp_path / f"{view}.dcm", view)
        log.write(
            pipe.process(f.read_bytes(), pydicom.dcmread(f), event="received", calling_ae="TEST").record
        )
    log.write(Record(event="resend", sop_instance_uid="1.2.3", send="sent to X", elapsed_ms="3"))
    rows = read_records(tmp_path / "node")
    check_rows(rows, "dicom")
    with open(tmp_path / "node" / "results.csv", newline="") as fh:
        csv_back = [schema.from_csv(r) for r in csv.DictReader(fh)]
    check_rows(csv_back, "dicom")
    assert (
        rows[0]["status"] == "skipped: lateral view (ViewPosition LL)" and rows[0]["flag"] == NOT_FRONTAL_FLAG
    )
    assert rows[1]["status"] == "ok" and rows[1]["prediction"] in CLASSES
    assert rows[2]["model_id"] == pred.model_id  # a resend record names the log's model
