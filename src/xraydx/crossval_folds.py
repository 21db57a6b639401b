"""A crossval's folds: which sources each holds out, the copies of held-out images in other sources, and
each fold's manifest (:mod:`xraydx.crossval` runs them).

``'a;b;c+d'`` names folds [a], [b], [c, d]. Public collections re-distribute each other's images, so the whole
manifest is searched for exact and near duplicates first (as ``xraydx data inspect``); a held-out image's
copies in other sources are left out of its fold, so "never saw its source" also means "never saw this
radiograph".
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from xraydx.data import CLASSES, Manifest
from xraydx.errors import DatasetError, UsageError
from xraydx.fsutil import printable_path

FOLD_SEP = ";"
JOIN = "+"


@dataclass(frozen=True)
class Fold:
    index: int
    sources: tuple[str, ...]

    @property
    def name(self) -> str:
        return f"{self.index}-{JOIN.join(self.sources)}"


def parse_folds(spec: str | None, manifest: Manifest) -> list[Fold]:
    """``'a;b;c+d'`` -> folds [a], [b], [c, d]; None or '' -> one fold per source. Every named source must
    be in the data; a source named in two folds is an error. Sources in no fold are always trained on."""
    known = sorted({r.source for r in manifest.records if r.source})
    if not known:
        raise DatasetError(
            f"{manifest.root}: no image has a source (hospital / collection); crossval needs one per image"
            " (a 'source' column, or file names '<source>__<name>')"
        )
    if not spec:
        groups = [[s] for s in known]
    else:
        groups = [[s.strip() for s in part.split(JOIN) if s.strip()] for part in spec.split(FOLD_SEP)]
        groups = [g for g in groups if g]
    seen: set[str] = set()
    for g in groups:
        for s in g:
            if s not in known:
                raise UsageError(f"--folds: source {s!r} is not in the data; sources: {', '.join(known)}")
            if s in seen:
                raise UsageError(f"--folds: source {s!r} is in more than one fold")
            seen.add(s)
    if not groups:
        raise UsageError("--folds: no fold given")
    return [Fold(i + 1, tuple(g)) for i, g in enumerate(groups)]


def cross_source_copies(manifest: Manifest, progress: bool = True) -> list[list[str]]:
    """Groups of images that are copies of each other (the same pixels, or near duplicates as ``xraydx data
    inspect`` finds them) and lie in more than one source: public collections re-distribute each other's
    images (ieee8023 COVID-19 radiographs are also in the COVID-19 Radiography Database), and a fold that
    holds one copy out while training on the other would measure a seen image as an unseen hospital's."""
    from xraydx.data.inspect import _UnionFind, inspect

    report = inspect(manifest, progress=progress)
    paths = [str(r.path) for r in manifest.records]
    index = {p: i for i, p in enumerate(paths)}
    uf = _UnionFind(len(paths))
    for g in report.exact_duplicates + report.near_duplicates:  # an exact pair may also be in a near group
        for p in g[1:]:
            uf.union(index[str(g[0])], index[str(p)])
    groups: dict[int, list[str]] = {}
    for i, p in enumerate(paths):
        groups.setdefault(uf.find(i), []).append(p)
    source = [r.source for r in manifest.records]
    return sorted(sorted(g) for g in groups.values() if len({source[index[p]] for p in g}) > 1)


def held_out_copies(manifest: Manifest, fold: Fold, copies: list[list[str]]) -> set[str]:
    """The paths of the copies (:func:`cross_source_copies`) of ``fold``'s held-out images in other sources."""
    held = {str(r.path) for r in manifest.records if r.source in set(fold.sources)}
    return {p for g in copies if held.intersection(g) for p in g if p not in held}


def fold_manifest(manifest: Manifest, fold: Fold, copies: list[list[str]] | None = None) -> Manifest:
    """The data of one fold: the fold's sources in split 'external', every other image in its own split,
    except the copies (:func:`cross_source_copies`) of a held-out image, which are left out of the fold.
    Refuses a fold whose remaining train or val split lacks a class (the recipe could not learn it)."""
    held = set(fold.sources)
    drop = held_out_copies(manifest, fold, copies or [])
    recs = [
        replace(r, split="external") if r.source in held else r
        for r in manifest.records
        if str(r.path) not in drop
    ]
    for split in ("train", "val"):
        have = {r.label for r in recs if r.split == split}
        missing = [c for c in CLASSES if c not in have]
        if missing:
            raise UsageError(
                f"fold {fold.name}: without {', '.join(fold.sources)} the {split} split has no "
                f"{', '.join(missing)} images; join that source with another in one fold, or leave it out"
                " of --folds (then it is always trained on)"
            )
    note = f"crossval fold {fold.name}: {sum(r.split == 'external' for r in recs)} images held out"
    if drop:
        note += (
            f"; {len(drop)} copies of them in other sources left out of the fold (never trained, validated or"
            f" tested on; e.g. {printable_path(min(drop))})"
        )
    return replace(manifest, records=recs, notes=[*manifest.notes, note])
