"""predict and evaluate through the command line, on real sample images plus bad files."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest

from conftest import sample_images
from xraydx.cli import EXIT_OK, EXIT_PARTIAL, EXIT_USAGE, main

CLASSES = ["covid", "non_covid", "normal"]


def _rows(p: Path) -> list[dict[str, str]]:
    with open(p, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture()
def mixed_folder(tmp_path: Path) -> Path:
    d = tmp_path / "in" / "nested"
    d.mkdir(parents=True)
    for p in sample_images("test")[:5]:
        shutil.copy(p, d / p.name)
    (d / "notes.png").write_text("this is not an image")
    (d / "empty.png").write_bytes(b"")
    return tmp_path / "in"


def test_predict_folder_with_bad_files(checkpoint: Path, mixed_folder: Path, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    out = tmp_path / "pred.csv"
    code = main(["predict", str(mixed_folder), "--checkpoint", str(checkpoint), "--out", str(out), "-q"])
    assert code == EXIT_PARTIAL
    rows = _rows(out)
    assert list(rows[0].keys()) == [
        "path", "prediction", "prob_covid", "prob_non_covid", "prob_normal", "status", "flag", "ood_score",
        "ood_reason", "shift_score", "model_id",
    ]  # fmt: skip
    assert len(rows) == 7
    ok = [r for r in rows if r["status"] == "ok"]
    bad = {Path(r["path"]).name: r["status"] for r in rows if r["status"] != "ok"}
    assert len(ok) == 5
    for r in ok:
        assert r["prediction"] in CLASSES
        assert sum(float(r[f"prob_{c}"]) for c in CLASSES) == pytest.approx(1.0, abs=1e-4)
    assert set(bad) == {"notes.png", "empty.png"}
    assert all(s.startswith("error: ") for s in bad.values())
    err = capsys.readouterr().err
    assert "notes.png" in err and "empty.png" in err


def test_predict_refuses_to_overwrite(checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "pred.csv"
    out.write_text("precious\n")
    img = str(sample_images("test")[0])
    assert main(["predict", img, "--checkpoint", str(checkpoint), "--out", str(out), "-q"]) != EXIT_OK
    assert out.read_text() == "precious\n"
    assert (
        main(["predict", img, "--checkpoint", str(checkpoint), "--out", str(out), "-q", "--overwrite"])
        == EXIT_OK
    )
    assert len(_rows(out)) == 1


def test_predict_json_and_list_file(checkpoint: Path, tmp_path: Path) -> None:
    imgs = sample_images("val")[:3]
    lst = tmp_path / "files.txt"
    lst.write_text("\n".join(str(p) for p in imgs) + "\n# a comment\n")
    out = tmp_path / "pred.json"
    code = main(
        ["predict", str(lst), "--checkpoint", str(checkpoint), "--out", str(out), "--format", "json", "-q"]
    )
    assert code == EXIT_OK
    doc = json.loads(out.read_text())
    assert doc["classes"] == CLASSES and len(doc["predictions"]) == 3
    assert all(isinstance(r["prob_covid"], float) for r in doc["predictions"])


def test_predict_resume_skips_done_rows(checkpoint: Path, tmp_path: Path) -> None:
    imgs = sample_images("test")[:6]
    folder = tmp_path / "in"
    folder.mkdir()
    for p in imgs[:3]:
        shutil.copy(p, folder / p.name)
    out = tmp_path / "pred.csv"
    assert (
        main(["predict", str(folder), "--checkpoint", str(checkpoint), "--out", str(out), "-q", "--resume"])
        == 0
    )
    for p in imgs[3:]:
        shutil.copy(p, folder / p.name)
    assert (
        main(["predict", str(folder), "--checkpoint", str(checkpoint), "--out", str(out), "-q", "--resume"])
        == 0
    )
    rows = _rows(out)
    assert sorted(Path(r["path"]).name for r in rows) == sorted(p.name for p in imgs)


def test_evaluate_cli(
    checkpoint: Path, sample_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "ev"
    code = main(
        ["evaluate", "--checkpoint", str(checkpoint), "--data", str(sample_dir), "--out", str(out), "-q"]
    )
    assert code == EXIT_OK
    m = json.loads((out / "metrics.json").read_text())
    assert m["n"] == 30 and m["split"] == "test"
    for c in CLASSES:
        assert set(m["per_class"][c]) >= {"sensitivity", "specificity", "ppv", "f1", "roc_auc"}
    assert "confusion matrix" in capsys.readouterr().out
    assert len(_rows(out / "predictions.csv")) == 30
    # refuses to overwrite: an existing output is bad usage, exit 2
    assert (
        main(
            ["evaluate", "--checkpoint", str(checkpoint), "--data", str(sample_dir), "--out", str(out), "-q"]
        )
        == 2
    )


def test_evaluate_on_an_external_set_that_lacks_classes(checkpoint: Path, tmp_path: Path) -> None:
    """An external collection of COVID-19 images only (no normal, no non-COVID) can be evaluated: the
    metrics of the absent classes are n/a, the sensitivity of the present one is real."""
    imgs = sample_images("test", "covid")
    csv_path = tmp_path / "external.csv"
    csv_path.write_text("path,label,split\n" + "".join(f"{p},covid,test\n" for p in imgs))
    out = tmp_path / "ext"
    assert (
        main(["evaluate", "--checkpoint", str(checkpoint), "--data", str(csv_path), "--out", str(out), "-q"])
        == 0
    )
    m = json.loads((out / "metrics.json").read_text())
    assert m["n"] == len(imgs) and m["per_class"]["covid"]["support"] == len(imgs)
    pred = [r["prediction"] for r in _rows(out / "predictions.csv")]
    assert m["per_class"]["covid"]["sensitivity"] == pytest.approx(pred.count("covid") / len(imgs))
    assert m["per_class"]["normal"]["sensitivity"] is None and m["macro_roc_auc"] is None
    # training still needs every class
    assert main(["train", "--data", str(csv_path), "--runs-dir", str(tmp_path / "r"), "-q"]) != 0


def test_usage_errors(tmp_path: Path) -> None:
    assert main(["train", "--data", "x", "--set", "train.nope=1"]) == EXIT_USAGE
    assert (
        main(["predict", str(tmp_path), "--checkpoint", "x", "--out", str(tmp_path / "o.csv")]) == EXIT_USAGE
    )


def test_resume_never_mixes_models_inputs_or_a_stale_partial(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 16 item 7: --resume refuses rows of another model or another input list, and a partial file
    older than the finished output; a run that is not resuming removes a leftover partial, saying so."""
    import os

    from xraydx.cli import DEFAULT_CHECKPOINT

    imgs = [str(p) for p in sample_images("test", "normal")[:2]]
    out = tmp_path / "p.csv"
    base = ["predict", "--out", str(out), "-q"]
    assert main([*base, imgs[0], "--checkpoint", str(checkpoint)]) == 0
    before = out.read_bytes()
    # another model
    assert main([*base, *imgs, "--checkpoint", str(DEFAULT_CHECKPOINT), "--resume"]) == 2
    assert "another model" in capsys.readouterr().err and out.read_bytes() == before
    # another input list: a row of the file is not among the inputs now
    assert main([*base, imgs[1], "--checkpoint", str(checkpoint), "--resume"]) == 2
    assert "not among the inputs given" in capsys.readouterr().err and out.read_bytes() == before
    # a partial older than the finished output is refused, not used
    partial = out.with_name(out.name + ".partial")
    partial.write_text("path\nx\n")
    os.utime(partial, ns=(1, 1))
    assert main([*base, *imgs, "--checkpoint", str(checkpoint), "--resume"]) == 2
    assert "older than the finished" in capsys.readouterr().err and out.read_bytes() == before
    # a run that is not resuming removes it and says so
    assert main([*base, *imgs, "--checkpoint", str(checkpoint), "--overwrite"]) == 0
    assert not partial.exists() and "removed" in capsys.readouterr().err
    assert len(_rows(out)) == 2
