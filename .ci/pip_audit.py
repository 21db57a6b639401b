"""CI step: audit the installed dependencies of .venv for known vulnerabilities with pip-audit.

Policy (docs/reliability.md, "Dependency audit"):
* every known vulnerability is reported;
* the step fails (exit 1) only for a vulnerability in a *direct* dependency (xraydx's own requirements,
  extras included, and the packages the Makefile installs by name) for which a fixed version exists:
  that is actionable here, by raising a pin; a vulnerable transitive dependency, or one with no fix yet,
  is reported only;
* it never fails for network reasons: where pip-audit cannot be installed, or the advisory database
  (PyPI's JSON API) cannot be reached, or no package could be looked up, it prints SKIPPED and why.

pip-audit runs from its own virtual environment (.venv/.pip-audit, removed by `make clean`) and audits
.venv's site-packages by path, so its own dependencies are neither audited nor mixed into the tested
environment. Standard library only; run with .venv/bin/python from the repository root.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

PIP_AUDIT = "pip-audit==2.10.1"
ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / ".venv"
TOOL_VENV = VENV / ".pip-audit"
SELF = "xraydx"


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def direct_names(requires: list[str], makefile: str) -> set[str]:
    """Canonical names of the direct dependencies: xraydx's requirements (any extra) + `pip install X==V` in
    the Makefile."""
    names = {canonical(re.split(r"[\s;<>=!~\[(]", r.strip(), maxsplit=1)[0]) for r in requires if r.strip()}
    names |= {canonical(m) for m in re.findall(r"(?<![\w.-])([A-Za-z0-9][A-Za-z0-9._-]*)==[0-9]", makefile)}
    return names


def classify(report: dict[str, Any], direct: set[str]) -> tuple[int, list[str]]:
    """(exit code, lines to print) for a pip-audit JSON report."""
    deps = report.get("dependencies", [])
    audited = [d for d in deps if "skip_reason" not in d]
    not_looked_up = [d for d in deps if "skip_reason" in d and canonical(d.get("name", "")) != SELF]
    if not audited:
        return 0, [
            f"pip-audit: SKIPPED - the advisory database could not be reached: none of the {len(deps)} installed"
            f" packages could be looked up (e.g. {not_looked_up[0]['skip_reason'] if not_looked_up else 'n/a'})"
        ]
    lines = [f"pip-audit: {len(audited)} packages audited against PyPI's advisory data"]
    if not_looked_up:
        names = ", ".join(f"{d['name']}" for d in not_looked_up[:10])
        more = f" and {len(not_looked_up) - 10} more" if len(not_looked_up) > 10 else ""
        lines.append(
            f"pip-audit: {len(not_looked_up)} packages could not be looked up (not audited): {names}{more}"
        )
    failing = 0
    for d in audited:
        for v in d.get("vulns", []):
            is_direct = canonical(d["name"]) in direct
            fixes = v.get("fix_versions") or []
            fail = is_direct and bool(fixes)
            failing += fail
            verdict = "FAIL (direct dependency, fix available)" if fail else "report only"
            kind = "direct" if is_direct else "transitive"
            aliases = ",".join(v.get("aliases") or [])
            lines.append(
                f"  {d['name']} {d['version']}: {v.get('id')}{f' ({aliases})' if aliases else ''} [{kind}]"
                f" fixed in: {', '.join(fixes) or 'no fix yet'} -> {verdict}"
            )
    n_vulns = sum(len(d.get("vulns", [])) for d in audited)
    if n_vulns == 0:
        lines.append("pip-audit: no known vulnerabilities")
    else:
        lines.append(f"pip-audit: {n_vulns} known vulnerabilities, {failing} failing the build")
    return (1 if failing else 0), lines


def _run(cmd: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1][:300] if lines else "no output"


def main() -> int:
    py = VENV / "bin" / "python"
    if not py.exists():
        print(f"pip-audit: {py} not found; run `make install` first", file=sys.stderr)
        return 1
    tool = TOOL_VENV / "bin" / "pip-audit"
    try:
        if not tool.exists():
            subprocess.run([sys.executable, "-m", "venv", str(TOOL_VENV)], check=True, capture_output=True)
            r = _run([str(TOOL_VENV / "bin" / "pip"), "install", "-q", PIP_AUDIT], timeout=900)
            if r.returncode != 0:
                print(f"pip-audit: SKIPPED - could not install {PIP_AUDIT}: {_last_line(r.stderr)}")
                return 0
        site = _run(
            [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], 60
        ).stdout.strip()
        req = _run(
            [
                str(py),
                "-c",
                f"import importlib.metadata as m, json; print(json.dumps(m.requires({SELF!r}) or []))",
            ],
            60,
        )
        requires = json.loads(req.stdout) if req.returncode == 0 else []
        makefile = (ROOT / "Makefile").read_text(encoding="utf-8") if (ROOT / "Makefile").exists() else ""
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "audit.json"
            cmd = [str(tool), "--progress-spinner", "off", "--skip-editable", "--timeout", "30", "--path", site,
                   "--format", "json", "--output", str(out)]  # fmt: skip
            r = _run(cmd, timeout=900)
            if not out.exists():  # pip-audit stopped before writing a report: a network error or similar
                print(
                    f"pip-audit: SKIPPED - the advisory database could not be reached: {_last_line(r.stderr)}"
                )
                return 0
            report = json.loads(out.read_text(encoding="utf-8"))
    except subprocess.TimeoutExpired as exc:
        print(f"pip-audit: SKIPPED - timed out after {exc.timeout:.0f} s ({' '.join(map(str, exc.cmd[:2]))})")
        return 0
    except (OSError, subprocess.CalledProcessError, json.JSONDecodeError) as exc:
        print(f"pip-audit: SKIPPED - {type(exc).__name__}: {exc}")
        return 0
    code, lines = classify(report, direct_names(requires, makefile))
    print("\n".join(lines))
    return code


if __name__ == "__main__":
    sys.exit(main())
