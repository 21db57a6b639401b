"""Find chest X-ray datasets on disk, turn them into one manifest, and inspect them.

The package face: everything callers use is importable from ``xraydx.data``.

- :mod:`~xraydx.data.records`: :class:`Record` (one image: path, label, split, group, source, mask),
  :class:`Manifest` (the table, its counts and CSV form), label and split names.
- :mod:`~xraydx.data.layouts`: one detector class per layout on disk (COVID-QU-Ex, COVID-19
  Radiography Database, class folders with or without split folders, a CSV manifest) behind one
  interface, :class:`~xraydx.data.layouts.Layout`; :mod:`~xraydx.data.walk` lists their folders.
- :mod:`~xraydx.data.manifest`: :func:`discover` (find the layout, collect, make missing splits),
  :func:`hold_out_source`, :func:`checkpoint_split`.
- :mod:`~xraydx.data.inspect`: :func:`inspect` and :func:`format_report` (``xraydx data inspect``).
- :mod:`~xraydx.data.lungseg`: image + lung-mask pairs for the segmenter (:func:`collect_samples`).
"""

from __future__ import annotations

from xraydx.constants import ALL_SPLITS, CLASSES, SPLITS
from xraydx.data.inspect import NEAR_DUPLICATE_MAD, InspectReport, format_report, inspect
from xraydx.data.layouts import CSV_COLUMN_ALIASES, DETECTORS, LAYOUTS, Layout
from xraydx.data.lungseg import SegSample, collect_samples
from xraydx.data.manifest import checkpoint_split, discover, hold_out_source, read_csv_manifest
from xraydx.data.records import (
    CLASS_ALIASES,
    SPLIT_ALIASES,
    Manifest,
    Record,
    _show,
    normalize_label,
    normalize_split,
)
from xraydx.errors import DatasetError

__all__ = [
    "ALL_SPLITS",
    "CLASSES",
    "CLASS_ALIASES",
    "CSV_COLUMN_ALIASES",
    "DETECTORS",
    "LAYOUTS",
    "NEAR_DUPLICATE_MAD",
    "SPLITS",
    "SPLIT_ALIASES",
    "DatasetError",
    "InspectReport",
    "Layout",
    "Manifest",
    "Record",
    "SegSample",
    "_show",
    "checkpoint_split",
    "collect_samples",
    "discover",
    "format_report",
    "hold_out_source",
    "inspect",
    "normalize_label",
    "normalize_split",
    "read_csv_manifest",
]
