"""Read the run.json that chunkft-run writes (executor/train.py) into a RunRecord.

The shape it writes: {"plan": {"model_fingerprint", "num_chunks", ...}, "measured": {"device",
"memory_method", "peak_bytes" (null when no step was measured), "reserved_bytes", "peak_by_category"
(empty on CUDA: the allocator gives no breakdown), "step_seconds", "tokens_per_second", ...},
"predicted": {...}, "losses": {"train": [loss per optimizer step, step 1 first], "eval": [{"step",
"eval_loss", "eval_accuracy"}, ...]}}. A run of a different model than the plan, or of another plan
(plan.sha256, the digest of the plan's canonical JSON), is refused: its comparison would mislead.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from chunkft.timeline import CATEGORIES

from .data import RunRecord

if TYPE_CHECKING:
    from chunkft.plan_format import Plan

NO_PLAN_HASH_NOTE = (
    "The run.json records no plan sha256 (written before chunkft-run recorded it), so only its model "
    "was checked against this plan: make sure it is the run of this plan."
)


class RunFileError(ValueError):
    """run.json is missing, not JSON, or lacks a field; the message names the field."""


def plan_sha256(plan: Plan) -> tuple[str, ...]:
    """The digests a run.json of this plan may record as plan.sha256 (chunkft.plan_format.plan_digests: of the
    plan's content, not the file's bytes; the first is what chunkft-run records now)."""
    from chunkft.plan_format import plan_digests

    return plan_digests(plan)


def load_run(
    path: str | Path,
    fingerprint: str | None = None,
    *,
    plan_digest: str | tuple[str, ...] | None = None,
    plan_where: str = "PLAN.json",
) -> RunRecord:
    """fingerprint: the plan's model fingerprint; a run.json of another model is refused. plan_digest:
    plan_sha256 of the plan (plan_where names its file); a run.json of another plan is refused."""
    p = Path(path)
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RunFileError(f"run file {p} does not exist; pass the run.json that chunkft-run wrote") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RunFileError(f"cannot read run file {p}: {exc}") from None
    except json.JSONDecodeError as exc:
        raise RunFileError(f"run file {p} is not valid JSON (line {exc.lineno}: {exc.msg})") from None
    return run_from_dict(doc, str(p), fingerprint, plan_digest=plan_digest, plan_where=plan_where)


def run_from_dict(
    doc: Any,
    where: str = "run.json",
    fingerprint: str | None = None,
    *,
    plan_digest: str | tuple[str, ...] | None = None,
    plan_where: str = "PLAN.json",
) -> RunRecord:
    if not isinstance(doc, dict):
        raise RunFileError(f"{where}: expected a JSON object at the top level")
    plan_info = doc.get("plan")
    plan_info = plan_info if isinstance(plan_info, dict) else {}
    got = plan_info.get("model_fingerprint")
    if fingerprint is not None and got is not None and got != fingerprint:
        raise RunFileError(
            f"{where} was measured on a different model than the plan (fingerprint {str(got)[:12]}... "
            f"!= {fingerprint[:12]}...); pass the run.json that chunkft-run wrote for this plan"
        )
    notes = _check_plan_digest(plan_info.get("sha256"), plan_digest, where, plan_where)
    measured = doc.get("measured", doc)
    if not isinstance(measured, dict):
        raise RunFileError(f"{where}: 'measured' must be an object")
    if "peak_bytes" in measured and measured["peak_bytes"] is None:
        peak = None  # the run measured no step (e.g. it stopped after the warm-up step)
    else:
        peak = _number(measured, "peak_bytes", where, integer=True)
    train, evals = _loss_curves(doc.get("losses", {}), where)
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
        train_losses=train,
        eval_losses=evals,
        memory_method=str(measured.get("memory_method") or ""),
        device=str(measured.get("device") or ""),
        reserved_bytes=_optional_int(measured, "reserved_bytes", where),
        notes=notes,
    )


def _check_plan_digest(
    got: Any, want: str | tuple[str, ...] | None, where: str, plan_where: str
) -> tuple[str, ...]:
    """Refuse a run of another plan; a run.json without plan.sha256 (older files) passes with a note.
    want: the plan's digest, or every digest a run of it may record (plan_sha256)."""
    if want is None:
        return ()
    accepted = (want,) if isinstance(want, str) else want
    if got is None:
        return (NO_PLAN_HASH_NOTE,)
    if not isinstance(got, str):
        raise RunFileError(f"{where}: plan.sha256 must be a hex string, got {got!r}")
    if got not in accepted:
        raise RunFileError(
            f"{where} was made from another plan (sha256 {got[:12]}..., {plan_where} {accepted[0][:12]}...); "
            "pass the plan the run replayed, or the run.json of this plan"
        )
    return ()


def _number(d: dict, key: str, where: str, integer: bool = False) -> Any:
    if key not in d:
        raise RunFileError(f"{where}: missing measured.{key}")
    v = d[key]
    ok = isinstance(v, int) if integer else isinstance(v, int | float)
    if not ok or isinstance(v, bool) or not math.isfinite(v) or v < 0:
        kind = "a non-negative integer" if integer else "a non-negative number"
        raise RunFileError(f"{where}: measured.{key} must be {kind}, got {v!r}")
    return v


def _optional_int(d: dict, key: str, where: str) -> int | None:
    return None if d.get(key) is None else _number(d, key, where, integer=True)


def _loss_curves(raw: Any, where: str) -> tuple[tuple[tuple[int, float], ...], tuple[tuple[int, float], ...]]:
    """(train, eval) as (optimizer step, loss); train losses are one per step, step 1 first."""
    if not isinstance(raw, dict):
        raise RunFileError(f'{where}: losses must be an object {{"train": [...], "eval": [...]}}')
    train_raw, eval_raw = raw.get("train", []), raw.get("eval", [])
    if not isinstance(train_raw, list) or not isinstance(eval_raw, list):
        raise RunFileError(f"{where}: losses.train and losses.eval must be lists")
    train = []
    for i, loss in enumerate(train_raw):
        if not _finite_number(loss) and loss is not None:
            raise RunFileError(f"{where}: losses.train[{i}] must be a number, got {loss!r}")
        if loss is not None and math.isfinite(loss):  # a skipped (non-finite) step is not drawn
            train.append((i + 1, float(loss)))
    evals = []
    for i, rec in enumerate(eval_raw):
        ok = isinstance(rec, dict) and isinstance(rec.get("step"), int)
        if not (ok and _finite_number(rec.get("eval_loss"))):
            raise RunFileError(f'{where}: losses.eval[{i}] must be {{"step": int, "eval_loss": number, ...}}')
        evals.append((rec["step"], float(rec["eval_loss"])))
    return tuple(train), tuple(evals)


def _finite_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)
