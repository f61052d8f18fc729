"""The study report (``report.json``): assembly and validation against the contract's JSON Schema."""
from __future__ import annotations

import json
import math
from functools import lru_cache
from pathlib import PurePath
from typing import Any, Mapping, Sequence

from jsonschema import Draft202012Validator

from models.sites import REGIONS, REPORT_SCHEMA, by_code

SCHEMA_VERSION = "1.0"
DISCLAIMER = (
    "Decision support only, not a diagnosis. This tool supports and does not replace clinical judgement: "
    "every finding must be reviewed by a qualified radiologist together with the clinical picture. Bone-marrow "
    "edema is not specific to CNO/CRMO; mimics such as bacterial osteomyelitis (infection), leukaemia, "
    "Langerhans cell histiocytosis (LCH) and tumours must be excluded clinically. Normal findings in children "
    "(growth plates, residual red marrow, foot marrow foci) can look like edema; lesions can also be missed.")


def model_caution(card: Mapping[str, Any]) -> str:
    """What a reader must know of the model behind a finding, from its card: trained on phantoms alone, and how
    many of its accuracy targets it misses (the card's first limitation); empty when the card says neither."""
    notes = []
    if (card.get("data") or {}).get("synthetic_only"):
        notes.append(f"The model ({card.get('name', '?')} {card.get('version', '')}) was trained on synthetic "
                     "phantoms only, never on a patient scan: its accuracy on patient scans is unknown until "
                     "measured on local labelled scans.")
    first = next(iter(card.get("limitations") or []), "")
    if "NOT meet" in first:
        notes.append(first.split(":")[0] + " (the model card lists them).")
    return " ".join(notes)


LOW_REGION_SENSITIVITY = 0.5  # a region where the model found fewer of its test sets' lesions is named
MIN_REGION_LESIONS = 5  # ... when its test sets held at least this many lesions there


def _region_words(region: str) -> str:
    """``spine_thoracic`` -> ``thoracic spine``, ``chest_wall`` -> ``chest wall``."""
    return f"{region[6:]} spine" if region.startswith("spine_") else region.replace("_", " ")


def region_detection(card: Mapping[str, Any]) -> dict[str, tuple[int, int]]:
    """Per region, (reference lesions, found) pooled over the card's test sets (each evaluation's own size cut,
    0.5 mL for ``wbmri card``); a card's odd entries are left out, never an error."""
    pooled: dict[str, tuple[int, int]] = {}
    test_sets = (card.get("metrics") or {}).get("frozen_synthetic_test_set")
    for evaluation in test_sets.values() if isinstance(test_sets, Mapping) else ():
        by_region = evaluation.get("by_region") if isinstance(evaluation, Mapping) else None
        for region, r in by_region.items() if isinstance(by_region, Mapping) else ():
            counts = (r.get("n_ref"), r.get("detected")) if isinstance(r, Mapping) else (None, None)
            if all(isinstance(c, int) and c >= 0 for c in counts):
                n, found = pooled.get(region, (0, 0))
                pooled[region] = (n + counts[0], found + counts[1])
    return pooled


def unreliable_regions(pooled: Mapping[str, tuple[int, int]], in_view: Sequence[str]) -> tuple[list[str], list[str]]:
    """The regions in view (``in_view``: site codes), in sites.tsv order, where the model found fewer than
    :data:`LOW_REGION_SENSITIVITY` of its card's test-set lesions (``pooled``: :func:`region_detection`; at least
    :data:`MIN_REGION_LESIONS` there), and those with fewer test lesions than that (not measured); both empty for a
    card without figures per region."""
    if not pooled:
        return [], []
    shown = {by_code()[c].region for c in in_view if c in by_code()}
    weak = [r for r in REGIONS if r in shown and pooled.get(r, (0, 0))[0] >= MIN_REGION_LESIONS
            and pooled[r][1] < LOW_REGION_SENSITIVITY * pooled[r][0]]
    unmeasured = [r for r in REGIONS if r in shown and pooled.get(r, (0, 0))[0] < MIN_REGION_LESIONS]
    return weak, unmeasured


def region_caution(pooled: Mapping[str, tuple[int, int]], in_view: Sequence[str]) -> str:
    """A warning naming the regions in view where the model found fewer than half of its card's test-set lesions
    (``pooled``: :func:`region_detection`), and those its test sets held too few lesions in to say
    (:func:`unreliable_regions`); empty when there are none. A region without findings there has not been shown to
    be free of lesions."""
    weak, unmeasured = unreliable_regions(pooled, in_view)
    parts = []
    if weak:
        parts.append("On its synthetic test sets the model found fewer than half of the lesions in: " +
                     ", ".join(f"{_region_words(r)} ({pooled[r][1]} of {pooled[r][0]})" for r in weak) + ".")
    if unmeasured:
        parts.append("Its test sets held too few lesions to measure it in: " +
                     ", ".join(_region_words(r) for r in unmeasured) + ".")
    if not parts:
        return ""
    return " ".join(parts) + (" No lesion reported there does not mean none is present: review these regions on "
                              "the images.")


def build_report(study: Mapping[str, Any], model: Mapping[str, Any], lesions: Sequence[Mapping[str, Any]],
                 summary: Mapping[str, Any], sites: Sequence[Mapping[str, Any]], warnings: Sequence[str],
                 timings: Mapping[str, float], sites_in_view: Sequence[str], caution: str = "") -> dict:
    """Assemble a report dict (schema_version 1.0). ``study['filename']`` is reduced to its base name; the
    sites in view go into ``study.sites_in_view``; timings are rounded to milliseconds; ``caution``
    (:func:`model_caution`) follows the disclaimer and is ``model.caution`` (for the overlay and the web page)."""
    study_out = dict(study)
    if "filename" in study_out:
        study_out["filename"] = PurePath(str(study_out["filename"]).replace("\\", "/")).name
    study_out["sites_in_view"] = [str(s) for s in sites_in_view]
    return {
        "schema_version": SCHEMA_VERSION,
        "study": study_out,
        "model": {**model, "caution": caution} if caution else dict(model),
        "timings_s": {str(k): round(max(0.0, float(v)), 3) for k, v in timings.items()},
        "lesions": [dict(les) for les in lesions],
        "sites": [dict(s) for s in sites],
        "summary": dict(summary),
        "warnings": [str(w) for w in warnings],
        "disclaimer": f"{DISCLAIMER} {caution}" if caution else DISCLAIMER,
    }


@lru_cache(maxsize=1)
def _validator() -> Draft202012Validator:
    schema = json.loads(REPORT_SCHEMA.read_text())
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


def _where(path: Sequence[Any]) -> str:
    out = "report"
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else f".{p}"
    return out


def validate_report(report: Mapping[str, Any]) -> None:
    """Raise ValueError listing every problem when ``report`` breaks the schema, is not plain JSON (NaN,
    numpy types) or is inconsistent (duplicate lesion ids, summary count differs from the lesion list)."""
    problems = [f"{_where(e.absolute_path)}: {e.message}"
                for e in sorted(_validator().iter_errors(report), key=lambda e: list(map(str, e.absolute_path)))]
    try:
        json.dumps(report, allow_nan=False)
    except (TypeError, ValueError) as exc:
        problems.append(f"report is not plain JSON: {exc}")
    lesions = report.get("lesions")
    if isinstance(lesions, list):
        ids = [les.get("id") for les in lesions if isinstance(les, Mapping)]
        dups = sorted({i for i in ids if ids.count(i) > 1}, key=str)
        if dups:
            problems.append(f"report.lesions: duplicate ids {dups}")
        summary = report.get("summary")
        if isinstance(summary, Mapping) and isinstance(summary.get("lesion_count"), int) \
                and summary["lesion_count"] != len(lesions):
            problems.append(f"report.summary.lesion_count is {summary['lesion_count']} but there are "
                            f"{len(lesions)} lesions")
        for i, les in enumerate(lesions):
            for key in ("volume_ml", "max_diameter_mm", "signal_ratio_marrow", "signal_ratio_muscle"):
                v = les.get(key) if isinstance(les, Mapping) else None
                if isinstance(v, float) and not math.isfinite(v):
                    problems.append(f"report.lesions[{i}].{key}: {v} is not a finite number")
    if problems:
        raise ValueError("invalid report:\n  " + "\n  ".join(problems))
