"""Print the candidates table of docs/generalisation.md from crossval run folders (their metrics.json).

    python scripts/crossval_table.py runs/cv/A-base runs/cv/B-srcbal-acq ...

One row per run: the recipe, the pooled out-of-source balanced accuracy [95% CI] and macro-F1, the
pooled recall per class, the mean in-source test macro-F1 of the folds, the share of out-of-source errors
the shipped flag catches, and the wall time; then one row per held-out source and run. An ensemble run
(``xraydx crossval ensemble``) is a row too: its recipe names its members, its in-source figure is the mean
of theirs, its flag is the members' flags or their disagreement, its minutes are the members' sum.
"""

from __future__ import annotations

import argparse
import json
from datetime import datetime
from pathlib import Path

import yaml


def _f(v: float | None) -> str:
    return "—" if v is None else f"{v:.3f}"


def _minutes(run: Path) -> str:
    log = run / "crossval.log"
    if not log.is_file():
        return "—"
    lines = log.read_text(encoding="utf-8").splitlines()
    t0 = datetime.fromisoformat(lines[0].split(" ", 1)[0])
    t1 = datetime.fromisoformat(lines[-1].split(" ", 1)[0])
    return f"{(t1 - t0).total_seconds() / 60:.0f}"


def _recipe(run: Path, m: dict) -> str:
    ens = m.get("ensemble")
    if ens:  # no config.yaml: the members are the recipe
        return "ensemble (mean probability) of " + " + ".join(x["name"] for x in ens["members"])
    cfg = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8"))  # the recipe as it ran
    d, t = cfg["data"], cfg["train"]
    r = {"model": cfg["model"]["name"], "image_size": d["image_size"], "lung_mask": d["lung_mask"],
         "intensity": d["intensity"], "augment": t["augment"], "balance": t["balance"],
         "acquisition": t.get("acquisition", 0.0), "epochs": t["epochs"], "epoch_size": t.get("epoch_size", 0)}  # fmt: skip
    text = (
        f"{r['model']} {r['image_size']}px lung={r['lung_mask']} {r['intensity']} aug={r['augment']}"
        f" balance={r['balance']} acquisition={r['acquisition']} {r['epochs']}×{r['epoch_size'] or 'all'}"
    )
    for key, name in (
        ("mixstyle", "mixstyle"),
        ("adversary", "adversary"),
        ("align", "align"),
        ("sam", "sam"),
    ):
        if t.get(key):
            text += f" {name}={t[key]}"
    if t.get("objective", "erm") != "erm":
        text += f" objective={t['objective']}"
        if t.get("dro_groups") and t["dro_groups"] != "class_source":
            text += f" dro_groups={t['dro_groups']}"
    if t.get("mixup"):
        text += f" mixup={t['mixup']:g} (mixup α {t.get('mixup_alpha', 0):g}, cutmix α {t.get('cutmix_alpha', 0):g})"
    if t.get("probe", "none") != "none":
        text += f" probe={t['probe']}"
    if t.get("average", "none") != "none":
        text += f" average={t['average']} from {t.get('average_start', 0.5):g}"
    if t.get("schedule", "cosine") != "cosine":
        text += f" schedule={t['schedule']}"
    if d.get("tta", "none") != "none":
        text += f" tta={d['tta']}"
    adapt = d.get("adapt_bn") or 0  # test-time BatchNorm adaptation (True in runs made before its weight)
    if adapt:
        text += f" adapt_bn={float(adapt):g}" + (
            f" (first {d['adapt_bn_layers']})" if d.get("adapt_bn_layers") else ""
        )
    return text


def _run_minutes(run: Path, m: dict) -> str:
    ens = m.get("ensemble")
    if not ens:
        return _minutes(run)
    each = [_minutes(Path(x["run"])) for x in ens["members"]]
    return "—" if "—" in each else str(sum(int(v) for v in each))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=Path)
    args = ap.parse_args(argv)
    rows, src_rows = [], []
    classes = ["covid", "non_covid", "normal"]
    for run in args.runs:
        m = json.loads((run / "metrics.json").read_text(encoding="utf-8"))
        p = m["pooled"]
        ci = p["ci"]["balanced_accuracy"]
        ins = [v["in_source_test"]["macro_f1"] for v in m["per_fold"].values() if v.get("in_source_test")]
        recipe = _recipe(run, m)
        rows.append(
            f"| {run.name} | {recipe} | {_f(p['balanced_accuracy'])} [{_f(ci[0])}–{_f(ci[1])}] | {_f(p['macro_f1'])}"
            + "".join(f" | {_f((p['recall'].get(c) or {}).get('recall'))}" for c in classes)
            + f" | {_f(sum(ins) / len(ins) if ins else None)} | {_f(m['flag']['errors_flagged'])} | {_run_minutes(run, m)} |"
        )
        for s, v in m["per_source"].items():
            cells = "".join(
                f" | {_f(v['recall'][c]['recall'])} ({v['recall'][c]['correct']}/{v['recall'][c]['n']})"
                if c in v["recall"]
                else " | —"
                for c in classes
            )
            src_rows.append(f"| {run.name} | {s} | {v['n']}{cells} | {v['flagged']:.0%} |")
    print("| run | recipe | pooled OOS balanced acc [95% CI] | OOS macro-F1 | recall covid | recall non_covid"
          " | recall normal | in-source test macro-F1 (mean of folds) | OOS errors flagged | minutes |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    print("\n".join(rows))
    print()
    print("| run | held-out source | n | recall covid | recall non_covid | recall normal | flagged |")
    print("| --- | --- | ---: | --- | --- | --- | ---: |")
    print("\n".join(src_rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
