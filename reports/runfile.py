"""Read the measurements chunkft-run writes (run.json) into a RunRecord.

Expected shape (executor's run.json): {"measured": {"peak_bytes", "peak_by_category": {category: bytes},
"step_seconds", "tokens_per_second"}, "losses": [...], "eval_losses": [...]}; losses are either
[{"step": s, "loss": x}, ...] or a plain list (one per optimizer step, counted from 1). The measured keys
are also accepted at the top level.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from planner.timeline import CATEGORIES

from .data import RunRecord


class RunFileError(ValueError):
    """run.json is missing, not JSON, or lacks a field; the message names the field."""


def load_run(path: str | Path) -> RunRecord:
    p = Path(path)
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RunFileError(f"run file {p} does not exist; pass the run.json that chunkft-run wrote") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RunFileError(f"cannot read run file {p}: {exc}") from None
    except json.JSONDecodeError as exc:
        raise RunFileError(f"run file {p} is not valid JSON (line {exc.lineno}: {exc.msg})") from None
    return run_from_dict(doc, str(p))


def run_from_dict(doc: Any, where: str = "run.json") -> RunRecord:
    if not isinstance(doc, dict):
        raise RunFileError(f"{where}: expected a JSON object at the top level")
    measured = doc.get("measured", doc)
    if not isinstance(measured, dict):
        raise RunFileError(f"{where}: 'measured' must be an object")
    peak = _number(measured, "peak_bytes", where, integer=True)
    by_cat_raw = measured.get("peak_by_category", {})
    if isinstance(by_cat_raw, dict):
        items = list(by_cat_raw.items())
    elif isinstance(by_cat_raw, list) and all(
        isinstance(x, list | tuple) and len(x) == 2 for x in by_cat_raw
    ):
        items = [tuple(x) for x in by_cat_raw]
    else:
        raise RunFileError(f"{where}: measured.peak_by_category must map category names to bytes")
    by_cat = dict(items)
    unknown = sorted(set(by_cat) - set(CATEGORIES) - {"reserve"})
    if unknown:
        raise RunFileError(
            f"{where}: measured.peak_by_category has unknown categories {unknown}; "
            f"known: {', '.join(CATEGORIES)}"
        )
    for cat, v in by_cat.items():
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise RunFileError(
                f"{where}: measured.peak_by_category.{cat} must be a non-negative integer of bytes"
            )
    return RunRecord(
        peak_bytes=peak,
        peak_by_category=tuple((c, by_cat[c]) for c in CATEGORIES if c in by_cat),
        step_seconds=_number(measured, "step_seconds", where),
        tokens_per_second=_number(measured, "tokens_per_second", where),
        train_losses=_losses(doc.get("losses", []), "losses", where),
        eval_losses=_losses(doc.get("eval_losses", []), "eval_losses", where),
    )


def _number(d: dict, key: str, where: str, integer: bool = False) -> Any:
    if key not in d:
        raise RunFileError(f"{where}: missing measured.{key}")
    v = d[key]
    ok = isinstance(v, int) if integer else isinstance(v, int | float)
    if not ok or isinstance(v, bool) or not math.isfinite(v) or v < 0:
        kind = "a non-negative integer" if integer else "a non-negative number"
        raise RunFileError(f"{where}: measured.{key} must be {kind}, got {v!r}")
    return v


def _losses(raw: Any, key: str, where: str) -> tuple[tuple[int, float], ...]:
    if not isinstance(raw, list):
        raise RunFileError(f"{where}: {key} must be a list")
    out = []
    for i, item in enumerate(raw):
        if isinstance(item, dict) and "step" in item and "loss" in item:
            step, loss = item["step"], item["loss"]
        elif isinstance(item, int | float) and not isinstance(item, bool):
            step, loss = i + 1, item
        else:
            raise RunFileError(f'{where}: {key}[{i}] must be a number or {{"step": ..., "loss": ...}}')
        if not isinstance(step, int) or not isinstance(loss, int | float) or isinstance(loss, bool):
            raise RunFileError(f"{where}: {key}[{i}] has a non-numeric step or loss")
        out.append((step, float(loss)))
    return tuple(out)
