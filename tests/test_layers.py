"""The package's layers (docs: README "What it does"; ../shared/architecture.md), checked on the source.

Every ``.py`` under ``src/xraydx`` is parsed with :mod:`ast` (nothing is imported) and every import of
an xraydx module is collected: top-level and function-local, ``import x``, ``from x import y``
(``y`` counts as the module ``x.y`` where that is a module), relative imports, and
``importlib.import_module`` / ``__import__`` with a constant name. Then:

* each module imports only from its own layer or the layers below;
* nothing outside ``cli/`` imports ``cli/`` (the ``python -m xraydx`` entry point excepted), and
  nothing outside ``serve/`` imports ``serve/`` except ``cli/`` (``xraydx serve`` starts it);
* a dynamic import of an xraydx module (a name that is not a constant) is not allowed: it would hide
  an edge from this test;
* every module is in the layer table, and no module is longer than ``MAX_LINES`` lines.

``ALLOWED_IMPORTS`` / ``ALLOWED_OVERSIZE`` name the violations that exist today while issue 14 is
under way, each with why and what removes it; an entry that is no longer needed fails the test, so
the lists can only shrink.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "src" / "xraydx"
MAX_LINES = 600

#: layer of each module, by its name under ``xraydx`` (a package's entry covers its submodules)
LAYERS: dict[str, int] = {
    # L0: no xraydx imports beyond L0
    "": 0, "errors": 0, "constants": 0, "config": 0, "fsutil": 0, "device": 0, "schema": 0, "ahead": 0,
    # L1: files and images
    "io": 1, "io_formats": 1, "pixels": 1, "frontal": 1, "data": 1, "transforms": 1, "fastaug": 1, "acqaug": 1, "ampmix": 1, "tta": 1, "cache": 1, "batches": 1, "checkpoint": 1, "render": 1,
    # L2: networks
    "models": 2, "segment": 2,
    # L3: inference and its parts
    "engines": 3, "onnxio": 3, "predict": 3, "predwrite": 3, "explain": 3, "ood": 3, "metrics": 3, "abstention": 3, "calibration": 3, "optim": 3, "groupdro": 3, "mixstyle": 3, "mixup": 3, "dann": 3, "align": 3, "sam": 3, "shift": 3, "bnadapt": 3, "probe": 3, "weightavg": 3, "shiftfit": 4,
    # L4: the stages
    "train": 4, "step": 4, "trainset": 4, "resume": 4, "runchecks": 4, "segment_train": 4, "evaluate": 4, "audit": 4, "export": 4, "report": 4, "report_crossval": 4, "crossval": 4, "crossval_folds": 4, "crossval_metrics": 4, "ensemble": 4, "crossval_compare": 4, "train_ensemble": 4, "finish": 4,
    # L5: the front ends
    "serve": 5, "cli": 5, "dicom": 5, "__main__": 5,
}  # fmt: skip

#: (importer, imported) -> why it is still there and what removes it. Aim: empty.
ALLOWED_IMPORTS: dict[tuple[str, str], str] = {}

#: module -> why it is still longer than MAX_LINES and what splits it. Aim: empty.
ALLOWED_OVERSIZE: dict[str, str] = {}

ENTRY_POINTS = {"xraydx.__main__"}  # may import cli/: `python -m xraydx`


@dataclass(frozen=True)
class Edge:
    importer: str
    imported: str
    line: int


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def _resolve_relative(importer: str, is_package: bool, level: int, module: str | None) -> str:
    base = importer.split(".") if is_package else importer.split(".")[:-1]
    base = base[: len(base) - (level - 1)] if level > 1 else base
    return ".".join([*base, *([module] if module else [])])


def _imports(name: str, path: Path, modules: dict[str, Path]) -> tuple[list[Edge], list[str]]:
    """The xraydx modules ``name`` imports, and its dynamic imports that cannot be resolved."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    is_package = path.name == "__init__.py"
    edges: list[Edge] = []
    dynamic: list[str] = []

    def add(target: str, line: int) -> None:
        if target == "xraydx" or target.startswith("xraydx."):
            edges.append(Edge(name, target, line))

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            base = (
                _resolve_relative(name, is_package, node.level, node.module)
                if node.level
                else node.module or ""
            )
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                add(sub if sub in modules else base, node.lineno)
        elif isinstance(node, ast.Call):
            fn = node.func
            fname = fn.attr if isinstance(fn, ast.Attribute) else fn.id if isinstance(fn, ast.Name) else ""
            if fname in ("import_module", "__import__") and node.args:
                arg = node.args[0]
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                    add(arg.value, node.lineno)
                elif "xraydx" in ast.unparse(arg):
                    dynamic.append(f"{name}:{node.lineno}: {ast.unparse(node)}")
    return edges, dynamic


def _layer_key(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _all_edges() -> tuple[list[Edge], list[str], dict[str, Path]]:
    modules = _modules()
    edges: list[Edge] = []
    dynamic: list[str] = []
    for name, path in modules.items():
        e, d = _imports(name, path, modules)
        edges += e
        dynamic += d
    return edges, dynamic, modules


def _violations(edges: list[Edge]) -> dict[tuple[str, str], str]:
    found: dict[tuple[str, str], str] = {}
    for e in edges:
        src, dst = _layer_key(e.importer), _layer_key(e.imported)
        if src == dst:
            continue  # within one module or package
        if src not in LAYERS or dst not in LAYERS:
            continue  # reported by test_every_module_is_in_the_layer_table
        why = ""
        if dst == "cli" and e.importer not in ENTRY_POINTS:
            why = "only cli/ itself (and the entry point) may import cli/"
        elif dst == "serve" and src != "cli":
            why = "only cli/ may import serve/"
        elif LAYERS[dst] > LAYERS[src]:
            why = f"L{LAYERS[src]} imports L{LAYERS[dst]}"
        if why:
            found.setdefault((e.importer, e.imported), f"line {e.line}: {why}")
    return found


def test_the_scan_sees_function_local_relative_and_dynamic_imports(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"  # scanned as if it were xraydx/constants.py (an L0 module)
    probe.write_text(
        "import importlib\nimport xraydx.io\nfrom . import errors\nfrom .cli import main\n"
        "def f(name):\n    from xraydx.data import discover\n    importlib.import_module('xraydx.serve')\n"
        "    return importlib.import_module(f'xraydx.{name}')\n",
        encoding="utf-8",
    )
    edges, dynamic = _imports("xraydx.constants", probe, _modules())
    assert {e.imported for e in edges} == {
        "xraydx.io",
        "xraydx.errors",
        "xraydx.cli.main",  # a module of the package, so `from .cli import main` names it
        "xraydx.data",
        "xraydx.serve",
    }
    assert len(dynamic) == 1 and "xraydx.{name}" in dynamic[0]
    found = _violations(edges)
    assert set(found) == {
        ("xraydx.constants", m) for m in ("xraydx.io", "xraydx.cli.main", "xraydx.data", "xraydx.serve")
    }
    assert "only cli/" in found[("xraydx.constants", "xraydx.cli.main")]
    assert "L0 imports L1" in found[("xraydx.constants", "xraydx.data")]  # function-local, still seen


def test_every_module_is_in_the_layer_table() -> None:
    unknown = sorted(m for m in _modules() if _layer_key(m) not in LAYERS)
    assert not unknown, (
        f"modules with no layer: {unknown}; add each to LAYERS in tests/test_layers.py and to the README's module map"
    )


def test_imports_follow_the_layers() -> None:
    edges, dynamic, _ = _all_edges()
    assert not dynamic, f"dynamic imports of xraydx modules hide edges from this test: {dynamic}"
    found = _violations(edges)
    new = {k: v for k, v in found.items() if k not in ALLOWED_IMPORTS}
    assert not new, "imports against the layers:\n" + "\n".join(
        f"  {a} -> {b} ({w})" for (a, b), w in new.items()
    )
    stale = sorted(set(ALLOWED_IMPORTS) - set(found))
    assert not stale, f"no longer needed, remove from ALLOWED_IMPORTS in tests/test_layers.py: {stale}"


def test_no_module_is_longer_than_the_budget() -> None:
    sizes = {m: len(p.read_text(encoding="utf-8").splitlines()) for m, p in _modules().items()}
    over = {m: n for m, n in sizes.items() if n > MAX_LINES}
    new = {m: n for m, n in over.items() if m not in ALLOWED_OVERSIZE}
    assert not new, f"modules over {MAX_LINES} lines: {new}"
    stale = sorted(set(ALLOWED_OVERSIZE) - set(over))
    assert not stale, (
        f"no longer over {MAX_LINES} lines, remove from ALLOWED_OVERSIZE in tests/test_layers.py: {stale}"
    )
