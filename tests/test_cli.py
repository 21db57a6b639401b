"""The ``xraydx`` parser: built statically from one module per command; help without torch; real sub-commands."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from xraydx.cli import build_parser
from xraydx.cli.main import COMMANDS

SRC = Path(__file__).resolve().parents[1] / "src"
HEAVY = ("torch", "numpy", "PIL", "timm", "sklearn", "fastapi", "uvicorn", "onnxruntime")
HELPS = [[], ["data"], ["data", "inspect"], ["train"], ["crossval"], ["crossval", "ensemble"], ["evaluate"], ["predict"], ["demo"], ["export"],
         ["explain"], ["audit"], ["segment"], ["segment", "train"], ["serve"], ["ood"], ["ood", "fit"]]  # fmt: skip


def test_help_of_every_command_imports_no_heavy_module() -> None:
    code = (
        "import json, sys\n"
        "from xraydx.cli import main\n"
        f"heavy = {HEAVY!r}\n"
        "out = {}\n"
        f"for argv in {HELPS!r}:\n"
        "    try:\n"
        "        main([*argv, '--help'])\n"
        "    except SystemExit as exc:\n"
        "        assert exc.code == 0, (argv, exc.code)\n"
        "    out[' '.join(argv)] = sorted(m for m in heavy if m in sys.modules)\n"
        "print(json.dumps(out))\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(SRC)},
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    loaded = json.loads(res.stdout.strip().splitlines()[-1])
    assert set(loaded) == {" ".join(a) for a in HELPS}
    assert loaded == {k: [] for k in loaded}


def test_python_dash_m_help_does_not_import_torch() -> None:
    res = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "xraydx", "--help"], capture_output=True, text=True,
        env={"PYTHONPATH": str(SRC)}, timeout=120,
    )  # fmt: skip
    assert res.returncode == 0 and "usage: xraydx" in res.stdout
    imported = {line.split("|")[-1].strip() for line in res.stderr.splitlines() if "|" in line}
    assert "xraydx.cli.main" in imported and "argparse" in imported  # the trace is really there
    assert not {m for m in imported if m.split(".")[0] in HEAVY}


def test_every_command_module_has_add_parser_and_run() -> None:
    names = set(build_parser()._subparsers._group_actions[0].choices)  # type: ignore[union-attr]
    assert names == {"data", "train", "crossval", "evaluate", "predict", "demo", "export", "explain", "audit",
                     "segment", "serve", "dicom", "ood", "shift"}  # fmt: skip
    for mod in COMMANDS:
        assert callable(mod.add_parser)
        assert any(callable(getattr(mod, n, None)) for n in ("run", "run_fit"))


def test_segment_train_is_a_sub_command_and_inputs_are_the_default() -> None:
    p = build_parser()
    a = p.parse_args(["segment", "train", "--data", "d1", "--data", "d2", "--out", "o", "--epochs", "3"])
    assert (a.segment_command, a.data, a.out, a.epochs) == ("train", ["d1", "d2"], "o", 3)
    assert a.func.__name__ == "run_train"
    a = p.parse_args(["segment", "a.png", "b.png", "--out", "o", "--no-overlay"])
    assert (a.segment_command, a.inputs, a.out, a.no_overlay) == ("run", ["a.png", "b.png"], "o", True)
    assert a.func.__name__ == "run"
    # options before the inputs are kept, not reset by the sub-command's defaults
    a = p.parse_args(["segment", "--out", "o", "--overwrite", "--checkpoint", "s.safetensors", "a.png"])
    assert (a.out, a.overwrite, a.checkpoint, a.inputs, a.quiet) == (
        "o",
        True,
        "s.safetensors",
        ["a.png"],
        False,
    )
    with pytest.raises(SystemExit):  # `segment train` takes no inputs
        p.parse_args(["segment", "train", "x.png", "--data", "d", "--out", "o"])


def test_ood_fit_is_a_sub_command() -> None:
    a = build_parser().parse_args(["ood", "fit", "--cxr3", "c", "--out", "g.safetensors", "--k", "8"])
    assert (a.ood_command, a.cxr3, a.out, a.k, a.percentile, a.lungseg) == (
        "fit",
        "c",
        "g.safetensors",
        8,
        99.5,
        None,
    )
    assert a.func.__name__ == "run_fit"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["ood", "fit", "--out", "g.safetensors"])  # --cxr3 is required
