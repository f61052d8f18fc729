"""Evaluate prediction folders (``wbmri predict`` output) against reference folders (contract layout or phantom cases).

Writes ``per_case.csv``, ``lesions.csv`` (every reference lesion, found or missed, and every false positive),
``sites.csv`` (mean Dice of each bone site, worst first), ``site_confusion.csv`` (where the bone map names one
bone another, largest first), ``summary.json`` and ``froc.png`` (see :func:`evaluate_folders`).
"""
from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from models.lesions import lesion_ids, voxel_volume_ml
from models.sites import SOFT_TISSUE, by_code, by_id
from training.metrics import (MATCHING_RULE, DetectionCounts, FrocCase, Matching, SiteAgreement,
                              SubregionAgreement, bootstrap_ci, confusion_of, detection_counts, dice, dice_by_site,
                              froc, froc_case, level_agreement, majority_labels, match_lesions, matched_site_pairs,
                              sensitivity_at_fp, site_agreement, site_histogram, subregion_agreement,
                              volumes_by_site)

LEVEL_RULE = ("Vertebral level: of the voxels that are a vertebra (any level) in both the prediction and the "
              "reference, the share whose level (C1-L5) is the same, pooled over cases.")
AFFINE_TOL = 1e-3
TARGET_SENSITIVITY = 0.90
TARGET_FP_PER_SCAN = 0.5
SUBREGION_RULE = ("Part of the bone: among true-positive predictions whose site (with side) equals their reference "
                  "lesion's and whose reference names a subregion, the share whose subregion is the same.")
FAILURE_RULE = ("A case whose prediction is missing or unusable (unreadable, wrong grid) is listed in `failures` "
                "and scored as an empty prediction: all its reference lesions are missed, Dice is 0 where the "
                "reference has edema or sites.")


class GridMismatchError(ValueError):
    """Prediction and reference are not on the same voxel grid."""


@dataclass
class LabelCase:
    """One case folder loaded: instance labels, site labels (or None), per-lesion site code, subregion (where the
    JSON names one) and confidence."""
    lesions: np.ndarray
    affine: np.ndarray
    sites: np.ndarray | None
    lesion_site: dict[int, str] = field(default_factory=dict)
    lesion_subregion: dict[int, str] = field(default_factory=dict)
    lesion_side: dict[int, str] = field(default_factory=dict)
    confidence: dict[int, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def size_tag(ml: float) -> str:
    """Key suffix for a volume threshold: 0.5 -> '0p5ml'."""
    return f"{ml:g}".replace(".", "p") + "ml"


def _read_labels(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """An integer label map and its affine; refuses non-3D or non-integer data."""
    try:
        img = nib.load(str(path))
    except Exception as exc:
        raise ValueError(f"{path.name}: not a readable NIfTI file ({type(exc).__name__})") from None
    data = np.asarray(img.dataobj)
    if data.ndim > 3 and all(s == 1 for s in data.shape[3:]):
        data = data.reshape(data.shape[:3])
    if data.ndim != 3:
        raise ValueError(f"{path.name}: label map must be 3D, got shape {data.shape}")
    if not np.issubdtype(data.dtype, np.integer):
        rounded = np.rint(data)
        if not np.array_equal(rounded, data):
            raise ValueError(f"{path.name}: label map holds non-integer values")
        data = rounded
    if data.size and data.min() < 0:
        raise ValueError(f"{path.name}: label map holds negative values")
    return data.astype(np.int32, copy=False), np.asarray(img.affine, dtype=np.float64)


def check_same_grid(shape_a: tuple[int, ...], affine_a: np.ndarray, shape_b: tuple[int, ...],
                    affine_b: np.ndarray, what: str = "prediction vs reference") -> None:
    """Raise :class:`GridMismatchError` unless shapes are equal and affines agree within 1e-3."""
    if tuple(shape_a) != tuple(shape_b):
        raise GridMismatchError(f"grid mismatch ({what}): shape {tuple(shape_a)} vs {tuple(shape_b)}")
    diff = float(np.max(np.abs(np.asarray(affine_a) - np.asarray(affine_b))))
    if diff > AFFINE_TOL:
        raise GridMismatchError(f"grid mismatch ({what}): affines differ by up to {diff:.4g} (tolerance {AFFINE_TOL})")


def _json_lesions(folder: Path) -> list[dict[str, Any]] | None:
    """The lesion list of report.json, else case.json, else None."""
    for name in ("report.json", "case.json"):
        path = folder / name
        if path.is_file():
            data = json.loads(path.read_text())
            lesions = data.get("lesions", [])
            if not isinstance(lesions, list):
                raise ValueError(f"{name}: 'lesions' is not a list")
            return lesions
    return None


def _site_code(site_id: int) -> str:
    return by_id()[site_id].code if site_id in by_id() else SOFT_TISSUE


def load_case(folder: Path) -> LabelCase:
    """Load ``lesions.nii.gz``, ``sites.nii.gz`` (optional) and the lesion list of report.json / case.json.

    Lesions without a site in the JSON get the site they overlap most in the sites map (soft_tissue when none;
    unknown, and left out of the site figures, when there is no sites map); lesions without a confidence get 1.0.
    A binary map (0/1) with no JSON beside it, as other tools write, is taken as its 26-connected lesions.
    """
    lesions, affine = _read_labels(folder / "lesions.nii.gz")
    case = LabelCase(lesions=lesions, affine=affine, sites=None)
    sites_path = folder / "sites.nii.gz"
    if sites_path.is_file():
        sites, s_aff = _read_labels(sites_path)
        check_same_grid(sites.shape, s_aff, lesions.shape, affine, "sites vs lesions")
        case.sites = sites
    listed = _json_lesions(folder)
    if listed is None:
        case.warnings.append("no report.json or case.json: lesion sites derived from sites.nii.gz")
        listed = []
        if lesions.max(initial=0) == 1:  # another tool's binary mask: one lesion per 26-connected component
            case.lesions = lesions = lesion_ids(lesions)
            case.warnings.append(f"lesions.nii.gz is a binary mask: taken as its {int(lesions.max())} "
                                 "26-connected lesions")
    ids = {int(i) for i in np.unique(lesions[lesions > 0])}
    for entry in listed:
        lid = int(entry["id"])
        if lid not in ids:
            continue
        if entry.get("site"):
            case.lesion_site[lid] = str(entry["site"])
        if entry.get("subregion"):
            case.lesion_subregion[lid] = str(entry["subregion"])
        if entry.get("side") in ("left", "right", "midline"):
            case.lesion_side[lid] = str(entry["side"])
        if entry.get("confidence") is not None:
            case.confidence[lid] = float(entry["confidence"])
    missing = ids - case.lesion_site.keys()
    if missing and case.sites is not None:  # without a site map a lesion's site is unknown, not soft tissue
        derived = majority_labels(lesions, case.sites)
        for lid in missing:
            case.lesion_site[lid] = _site_code(derived.get(lid, 0))
    for lid in ids - case.confidence.keys():
        case.confidence[lid] = 1.0
    return case


def _nan_to_none(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _nan_to_none(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_nan_to_none(v) for v in x]
    return x


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def _median(values: list[float]) -> float | None:
    return float(np.median(values)) if values else None


def _size_bins(min_ref_ml: float) -> dict[str, tuple[float, float]]:
    return {"all": (0.0, math.inf), "lt_1ml": (0.0, 1.0), "ge_1ml": (1.0, math.inf),
            f"ge_{size_tag(min_ref_ml)}": (min_ref_ml, math.inf)}


@dataclass
class CaseScore:
    """One case scored: detection counts by size bin, FROC input, site and subregion agreement, its per_case.csv
    row, one lesions.csv row per reference lesion and per false-positive prediction, the Dice of each site, and
    the bone map's disagreements in mL by (reference, predicted) site id with each reference site's volume."""
    bins: dict[str, DetectionCounts]
    froc: FrocCase
    agree: SiteAgreement
    parts: SubregionAgreement
    row: dict[str, Any]
    lesion_rows: list[dict[str, Any]]
    site_dices: dict[int, float]
    confusion_ml: dict[tuple[int, int], float] = field(default_factory=dict)
    ref_site_ml: dict[int, float] = field(default_factory=dict)


def _lesion_rows(m: Matching, pred: LabelCase, ref: LabelCase) -> list[dict[str, Any]]:
    """Each reference lesion (found or missed, by which prediction, with which site) and each false positive."""
    found_by: dict[int, list[int]] = {r: [] for r in m.ref_detected}
    for p, hits in m.pred_hits.items():
        for r in hits:
            found_by[r].append(p)
    rows = []
    for r in sorted(m.ref_detected):
        best = [p for p in found_by[r] if m.pred_to_ref.get(p) == r] or found_by[r]
        p = best[0] if best else None
        rows.append({"kind": "reference", "id": r, "volume_ml": m.ref_volume_ml[r], "site": ref.lesion_site.get(r, ""),
                     "subregion": ref.lesion_subregion.get(r, ""),
                     "detected": bool(m.ref_detected[r]), "pred_ids": " ".join(map(str, sorted(found_by[r]))),
                     "pred_site": pred.lesion_site.get(p, "") if p is not None else "",
                     "pred_subregion": pred.lesion_subregion.get(p, "") if p is not None else "",
                     "pred_volume_ml": m.pred_volume_ml.get(p) if p is not None else None,
                     "confidence": pred.confidence.get(p) if p is not None else None})
    for p, r in sorted(m.pred_to_ref.items()):
        if r is None:
            rows.append({"kind": "false_positive", "id": p, "volume_ml": m.pred_volume_ml[p],
                         "site": pred.lesion_site.get(p, ""), "subregion": pred.lesion_subregion.get(p, ""),
                         "detected": None, "pred_ids": str(p), "pred_site": pred.lesion_site.get(p, ""),
                         "pred_subregion": pred.lesion_subregion.get(p, ""), "pred_volume_ml": m.pred_volume_ml[p],
                         "confidence": pred.confidence.get(p)})
    return rows


SITE_NOT_LABELLED = "site_not_labelled"  # by_region's key for reference lesions of a scan without a sites map


def _region(code: str) -> str:
    """The body region (sites.tsv) of a site code; ``soft_tissue`` for that code or an unknown one; for no code
    (a reference without a sites map), :data:`SITE_NOT_LABELLED`."""
    if not code:
        return SITE_NOT_LABELLED
    site = by_code().get(code)
    return site.region if site is not None else SOFT_TISSUE


def by_region(lesion_rows: list[dict[str, Any]], min_ref_ml: float, n_scans: int) -> dict[str, dict[str, Any]]:
    """Per body region of the reference site: reference lesions >= ``min_ref_ml``, how many were found and the
    sensitivity; and false positives (by their predicted site's region) per scan. Where a model misses or
    over-calls, not only how much."""
    out: dict[str, dict[str, Any]] = {}
    for r in lesion_rows:
        if r["kind"] == "reference" and r["volume_ml"] >= min_ref_ml:
            row = out.setdefault(_region(r["site"]), {"n_ref": 0, "detected": 0, "fp": 0})
            row["n_ref"] += 1
            row["detected"] += int(bool(r["detected"]))
        elif r["kind"] == "false_positive":
            out.setdefault(_region(r["site"]), {"n_ref": 0, "detected": 0, "fp": 0})["fp"] += 1
    for row in out.values():
        row["sensitivity"] = row["detected"] / row["n_ref"] if row["n_ref"] else None
        row["fp_per_scan"] = row["fp"] / n_scans if n_scans else None
    return dict(sorted(out.items()))


def _score_case(pred: LabelCase | None, ref: LabelCase, voxel_ml: float, min_ref_ml: float) -> CaseScore:
    """Score one case; ``pred`` None scores an empty prediction."""
    if pred is None:
        pred = LabelCase(lesions=np.zeros_like(ref.lesions), affine=ref.affine,
                         sites=None if ref.sites is None else np.zeros_like(ref.sites))
    m = match_lesions(pred.lesions, ref.lesions, voxel_ml=voxel_ml)
    bins = {k: detection_counts(m, lo, hi) for k, (lo, hi) in _size_bins(min_ref_ml).items()}
    fc = froc_case(m, pred.confidence, min_ml=min_ref_ml)
    agree = site_agreement(matched_site_pairs(m, pred.lesion_site, ref.lesion_site, pred.lesion_side, ref.lesion_side))
    parts = subregion_agreement(m, pred.lesion_site, ref.lesion_site, pred.lesion_subregion, ref.lesion_subregion)
    site_dices: dict[int, float] = {}
    confusion: dict[tuple[int, int], float] = {}
    ref_site_ml: dict[int, float] = {}
    level_right, level_scored = 0, 0
    if ref.sites is not None and pred.sites is not None:
        hist = site_histogram(pred.sites, ref.sites)
        level_right, level_scored = level_agreement(hist)
        site_dices = dice_by_site(hist)
        confusion = {k: v * voxel_ml for k, v in confusion_of(hist).items()}
        ref_site_ml = {sid: n * voxel_ml for sid, n in volumes_by_site(hist).items()}
    tag = size_tag(min_ref_ml)
    ge = bins[f"ge_{tag}"]
    row = {"n_ref": bins["all"].n_ref, f"n_ref_ge_{tag}": ge.n_ref, "n_pred": len(m.pred_to_ref),
           "tp": bins["all"].n_tp, "fp": bins["all"].n_fp, "fn": bins["all"].n_ref - bins["all"].n_detected,
           "detected": bins["all"].n_detected, f"detected_ge_{tag}": ge.n_detected,
           "edema_dice": dice(pred.lesions > 0, ref.lesions > 0),
           "mean_site_dice": _mean(list(site_dices.values())),
           "site_accuracy": agree.site_accuracy, "side_accuracy": agree.side_accuracy,
           "n_site_scored": agree.n, "n_site_right": agree.n_site,
           "subregion_accuracy": parts.accuracy, "n_subregion_scored": parts.n, "n_subregion_right": parts.n_right,
           "level_accuracy": level_right / level_scored if level_scored else None,
           "n_level_voxels": level_scored, "n_level_right": level_right,
           "ref_volume_ml": sum(m.ref_volume_ml.values()), "pred_volume_ml": sum(m.pred_volume_ml.values())}
    return CaseScore(bins, fc, agree, parts, row, _lesion_rows(m, pred, ref), site_dices, confusion, ref_site_ml)


CI_METHOD = ("95% percentile bootstrap over cases (2,000 resamples with replacement, seed 0): each statistic is "
             "recomputed on every resample of the scored cases; pooled rates (sensitivity, site accuracy) as sums "
             "over the resampled cases. With tens of cases the intervals are wide; `wbmri compare` tests two releases "
             "on the same cases (paired).")


def interval_statistics(tag: str) -> dict[str, tuple[str, str | None, str]]:
    """Statistic name -> (numerator column, denominator column or None for a per-case mean, which cases count:
    all | no_reference | with_value), as per_case.csv names them."""
    return {f"sensitivity_ge_{tag}": (f"detected_ge_{tag}", f"n_ref_ge_{tag}", "all"),
            "fp_per_scan": ("fp", None, "all"),
            "fp_per_scan_no_reference_lesions": ("fp", None, "no_reference"),
            "edema_dice": ("edema_dice", None, "all"),
            "site_accuracy": ("n_site_right", "n_site_scored", "all"),
            "subregion_accuracy": ("n_subregion_right", "n_subregion_scored", "all"),
            "vertebral_level_accuracy": ("n_level_right", "n_level_voxels", "all"),
            "mean_site_dice": ("mean_site_dice", None, "with_value")}


def _num(v: Any) -> float:
    return math.nan if v is None or v == "" else float(v)


def _interval_inputs(rows: list[dict[str, Any]], name: str, tag: str) -> tuple[list[str], list[float], list[float]]:
    """(case names, numerators, denominators) of the cases that count for one statistic."""
    num_col, den_col, which = interval_statistics(tag)[name]
    keep = [r for r in rows if (which != "no_reference" or _num(r["n_ref"]) == 0)
            and (which != "with_value" or math.isfinite(_num(r[num_col])))]
    return ([r["case"] for r in keep], [_num(r[num_col]) for r in keep],
            [1.0 if den_col is None else _num(r[den_col]) for r in keep])


def case_interval(rows: list[dict[str, Any]], name: str, tag: str) -> list[float] | None:
    """95% bootstrap interval of one statistic over the scored cases (:data:`CI_METHOD`)."""
    _, num, den = _interval_inputs(rows, name, tag)
    ci = bootstrap_ci(num, den)
    return None if ci is None else [ci[0], ci[1]]


def read_per_case(eval_dir: Path) -> tuple[list[dict[str, Any]], str]:
    """The scored rows of an evaluation folder's per_case.csv and its size tag (from summary.json)."""
    eval_dir = Path(eval_dir)
    summary = json.loads((eval_dir / "summary.json").read_text())
    with open(eval_dir / "per_case.csv", newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["status"] in ("ok", "failed")]
    if rows and "n_site_scored" not in rows[0]:
        raise ValueError(f"{eval_dir}/per_case.csv predates per-case site counts; run `wbmri evaluate` on it again")
    return rows, size_tag(float(summary["min_ref_ml"]))


def compare_evaluations(a_dir: Path, b_dir: Path) -> dict[str, Any]:
    """Paired comparison of two evaluations of the same reference cases (B minus A), each statistic with a 95%
    bootstrap interval of the difference in which both are resampled with the same cases."""
    rows_a, tag = read_per_case(a_dir)
    rows_b, tag_b = read_per_case(b_dir)
    if tag != tag_b:
        raise ValueError(f"the two evaluations used different lesion sizes ({tag} vs {tag_b})")
    common = sorted({r["case"] for r in rows_a} & {r["case"] for r in rows_b})
    if not common:
        raise ValueError("the two evaluations share no scored case")
    by_a = {r["case"]: r for r in rows_a}
    by_b = {r["case"]: r for r in rows_b}
    ra, rb = [by_a[c] for c in common], [by_b[c] for c in common]
    out: dict[str, Any] = {"n_cases": len(common), "only_a": sorted(set(by_a) - set(common)),
                           "only_b": sorted(set(by_b) - set(common)), "statistics": {}, "skipped": []}
    for name, (num_col, _, _) in interval_statistics(tag).items():
        if num_col not in ra[0] or num_col not in rb[0]:
            out["skipped"].append(name)  # an evaluation made before this statistic existed
            continue
        cases_a, num_a, den_a = _interval_inputs(ra, name, tag)
        cases_b, num_b, den_b = _interval_inputs(rb, name, tag)
        pos_a = {c: i for i, c in enumerate(cases_a)}
        pos_b = {c: i for i, c in enumerate(cases_b)}
        shared = [c for c in cases_a if c in pos_b]
        ia, ib = [pos_a[c] for c in shared], [pos_b[c] for c in shared]
        na, da = np.asarray(num_a)[ia], np.asarray(den_a)[ia]
        nb, db = np.asarray(num_b)[ib], np.asarray(den_b)[ib]
        va = float(na.sum() / da.sum()) if len(shared) and da.sum() > 0 else None
        vb = float(nb.sum() / db.sum()) if len(shared) and db.sum() > 0 else None
        ci = bootstrap_ci(nb, db, minus=(na, da)) if len(shared) else None
        out["statistics"][name] = {"n_cases": len(shared), "a": va, "b": vb,
                                   "b_minus_a": None if va is None or vb is None else vb - va,
                                   "ci95": None if ci is None else [ci[0], ci[1]]}
    return out


def _write_froc_png(path: Path, points: list[tuple[float, float, float]], min_ref_ml: float, n_ref: int,
                    n_cases: int) -> None:
    """FROC curve (sensitivity vs mean FP per scan) with the target point marked; no pyplot state."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    curve = [(0.0, 0.0)] + [(fp, s) for fp, s, _ in points]  # lowest thresholds last: FP and sensitivity grow
    ax.plot([c[0] for c in curve], [c[1] for c in curve], drawstyle="steps-post", marker=".", label="model")
    ax.plot([TARGET_FP_PER_SCAN], [TARGET_SENSITIVITY], marker="*", markersize=14, color="crimson", linestyle="none",
            label=f"target: sensitivity {TARGET_SENSITIVITY:.2f} at {TARGET_FP_PER_SCAN} FP/scan")
    ax.axvline(TARGET_FP_PER_SCAN, color="crimson", linestyle=":", linewidth=0.8)
    ax.axhline(TARGET_SENSITIVITY, color="crimson", linestyle=":", linewidth=0.8)
    max_fp = max([c[0] for c in curve] + [TARGET_FP_PER_SCAN * 2])
    ax.set_xlim(0, max_fp * 1.05)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("mean false positives per scan")
    ax.set_ylabel("lesion sensitivity")
    ax.set_title(f"FROC, reference lesions >= {min_ref_ml:g} mL (n={n_ref}, {n_cases} scans)")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(str(path), format="png")


def site_confusion_rows(confusion_ml: dict[tuple[int, int], float], ref_site_ml: dict[int, float],
                        n_cases: int) -> list[dict[str, Any]]:
    """``site_confusion.csv``: each (reference, predicted) site pair the bone maps disagree on ("none": no bone),
    of kind ``named_wrong`` (bone named another bone), ``missed`` (bone left out) or ``extra`` (bone where the
    reference has none), in mL per scored case and as a share of that reference site's volume, largest first."""
    rows = [{"reference_site": _site_code(r) if r else "none", "predicted_site": _site_code(p) if p else "none",
             "kind": "named_wrong" if r and p else "missed" if r else "extra",
             "ml_per_case": ml / max(n_cases, 1),
             "share_of_reference": ml / ref_site_ml[r] if ref_site_ml.get(r) else None}
            for (r, p), ml in confusion_ml.items()]
    return sorted(rows, key=lambda row: -row["ml_per_case"])


def _write_csv(path: Path, columns: list[str], rows: list[dict[str, Any]]) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, restval="")
        writer.writeheader()
        for r in rows:
            writer.writerow({k: ("" if v is None else round(v, 6) if isinstance(v, float) else v) for k, v in r.items()})


def reference_detections(lesions_csv: Path, min_ml: float = 0.0) -> dict[tuple[str, int], bool]:
    """(case, reference lesion id) -> found, for the reference lesions of at least ``min_ml`` of an evaluation's
    ``lesions.csv``."""
    with open(lesions_csv, newline="") as fh:
        return {(r["case"], int(r["id"])): r["detected"] == "True" for r in csv.DictReader(fh)
                if r["kind"] == "reference" and float(r["volume_ml"]) >= min_ml}


def _case_dirs(root: Path) -> dict[str, Path]:
    """The case folders of ``root``: those holding a lesions.nii.gz, hidden ones (a ``.NAME.xxxx.partial`` folder
    that a killed run left) not counted."""
    return {p.name: p for p in sorted(root.iterdir())
            if p.is_dir() and not p.name.startswith(".") and (p / "lesions.nii.gz").is_file()}


def _predictions_of(name: str, preds: dict[str, Path]) -> list[str]:
    """The prediction folders of reference case ``name``: ``name`` and/or ``name_0000``, as ``wbmri predict`` names
    the output of an nnU-Net image ``imagesTs/name_0000.nii.gz`` (the output contract: the file name, whole). Two
    are ambiguous (an older run's folder beside a newer one): the case is not scored."""
    return [n for n in (name, f"{name}_0000") if n in preds]


def reference_source(ref_dir: Path, n_cases: int) -> dict[str, Any]:
    """Where the reference cases came from: the folder, and for a phantom set made by ``wbmri synth`` (its
    dataset.json beside or above the case folders) the generator version and seed range, for the model card."""
    out: dict[str, Any] = {"path": str(ref_dir)}
    for meta_path in (ref_dir / "dataset.json", ref_dir.parent / "dataset.json"):
        if meta_path.is_file():
            meta = json.loads(meta_path.read_text())
            if meta.get("name") == "wbmri-phantom" and "first_seed" in meta:
                first = int(meta["first_seed"])
                out.update({"generator_version": meta.get("generator_version"),
                            "seeds": f"{first}..{first + n_cases - 1}"})
            break
    return out


def evaluate_folders(pred_dir: Path, ref_dir: Path, out_dir: Path, min_ref_ml: float = 0.5,
                     quiet: bool = False, prediction_errors: dict[str, str] | None = None) -> dict[str, Any]:
    """Score every reference case in ``ref_dir`` against the same-named folder in ``pred_dir`` (or with nnU-Net's
    channel suffix: :func:`_predictions_of`)
    (``prediction_errors``: why a case has no prediction, by case name, where it was just predicted).

    Writes ``out_dir/per_case.csv``, ``lesions.csv``, ``sites.csv``, ``site_confusion.csv``, ``summary.json`` and
    ``froc.png``; returns the summary.
    Matching rule: :data:`training.metrics.MATCHING_RULE`; failed cases: :data:`FAILURE_RULE`.
    """
    from rich.progress import Progress

    pred_dir, ref_dir, out_dir = Path(pred_dir), Path(ref_dir), Path(out_dir)
    refs = _case_dirs(ref_dir)
    if not refs:
        raise FileNotFoundError(f"no reference case folders (with lesions.nii.gz) in {ref_dir}")
    preds = _case_dirs(pred_dir) if pred_dir.is_dir() else {}
    tag = size_tag(min_ref_ml)
    bins_total = {k: DetectionCounts() for k in _size_bins(min_ref_ml)}
    no_ref_counts = DetectionCounts()
    agree_total = SiteAgreement()
    parts_total = SubregionAgreement()
    froc_cases: list[FrocCase] = []
    rows: list[dict[str, Any]] = []
    lesion_rows: list[dict[str, Any]] = []
    per_site: dict[int, list[float]] = {}
    confusion_ml: dict[tuple[int, int], float] = {}
    ref_site_ml: dict[int, float] = {}
    failures: list[dict[str, str]] = []
    warnings: list[dict[str, str]] = []
    with Progress(disable=quiet, transient=True) as progress:
        task = progress.add_task("evaluating", total=len(refs))
        for name, ref_path in refs.items():
            progress.update(task, description=f"evaluating {name}")
            try:
                ref = load_case(ref_path)
            except Exception as exc:
                failures.append({"case": name, "error": f"reference unusable, case not scored: {exc}"})
                rows.append({"case": name, "status": "reference_error", "error": str(exc)})
                progress.advance(task)
                continue
            warnings += [{"case": name, "warning": f"reference: {w}"} for w in ref.warnings]
            pred: LabelCase | None = None
            error = ""
            why = (prediction_errors or {}).get(name)
            found = _predictions_of(name, preds)
            if why:  # a folder left by an earlier run of other weights or rules is not this prediction
                error = f"prediction failed: {why}"
            elif not found:
                error = "prediction missing"
            elif len(found) > 1:
                error = f"two predictions, {' and '.join(found)}: remove the one of another run"
            else:
                try:
                    pred = load_case(preds[found[0]])
                    check_same_grid(pred.lesions.shape, pred.affine, ref.lesions.shape, ref.affine)
                    warnings += [{"case": name, "warning": f"prediction: {w}"} for w in pred.warnings]
                except Exception as exc:
                    pred, error = None, str(exc)
            if error:
                failures.append({"case": name, "error": error})
            voxel_ml = voxel_volume_ml(ref.affine)
            score = _score_case(pred, ref, voxel_ml, min_ref_ml)
            bins, fc, agree, row = score.bins, score.froc, score.agree, score.row
            lesion_rows += [{"case": name, **r} for r in score.lesion_rows]
            for sid, d in score.site_dices.items():
                per_site.setdefault(sid, []).append(d)
            for pair, ml in score.confusion_ml.items():
                confusion_ml[pair] = confusion_ml.get(pair, 0.0) + ml
            for sid, ml in score.ref_site_ml.items():
                ref_site_ml[sid] = ref_site_ml.get(sid, 0.0) + ml
            for k, c in bins.items():
                bins_total[k] = bins_total[k] + c
            if bins["all"].n_ref == 0:
                no_ref_counts = no_ref_counts + bins["all"]
            agree_total = agree_total + agree
            parts_total = parts_total + score.parts
            froc_cases.append(fc)
            rows.append({"case": name, "status": "failed" if error else "ok", "error": error, **row})
            progress.advance(task)

    scored = [r for r in rows if r["status"] in ("ok", "failed")]
    dices = [r["edema_dice"] for r in scored]
    level_right, level_voxels = sum(r["n_level_right"] for r in scored), sum(r["n_level_voxels"] for r in scored)
    site_dices = [r["mean_site_dice"] for r in scored if r["mean_site_dice"] is not None]
    points = froc(froc_cases)
    ge = bins_total[f"ge_{tag}"]
    at_target = sensitivity_at_fp(points, TARGET_FP_PER_SCAN)
    summary: dict[str, Any] = {
        "n_cases": len(refs),
        "n_scored": len(scored),
        "n_ok": sum(r["status"] == "ok" for r in rows),
        "n_failed": len(failures),
        "failures": failures,
        "unpaired_predictions": sorted(set(preds) - {p for name in refs for p in _predictions_of(name, preds)}),
        "warnings": warnings,
        "matching_rule": MATCHING_RULE,
        "failure_rule": FAILURE_RULE,
        "min_ref_ml": min_ref_ml,
        "edema_dice": {"mean": _mean(dices), "median": _median(dices), "n": len(dices)},
        "lesions": {k: c.scores() for k, c in bins_total.items()},
        f"sensitivity_ge_{tag}": ge.sensitivity,
        "fp_per_scan_no_reference_lesions": {"value": no_ref_counts.fp_per_scan, "n_cases": no_ref_counts.n_scans},
        "by_region": by_region(lesion_rows, min_ref_ml, len(scored)),
        "site_accuracy": {"n_matched": agree_total.n, "site": agree_total.site_accuracy,
                          "side": agree_total.side_accuracy},
        "subregion_accuracy": {"n_scored": parts_total.n, "value": parts_total.accuracy,
                               "rule": SUBREGION_RULE},
        "mean_site_dice": {"mean": _mean(site_dices), "n": len(site_dices)},
        "vertebral_level_accuracy": {"value": level_right / level_voxels if level_voxels else None,
                                     "n_voxels": level_voxels, "rule": LEVEL_RULE},
        "froc": {"min_ref_ml": min_ref_ml, "n_ref": ge.n_ref,
                 "points": [{"fp_per_scan": fp, "sensitivity": s, "threshold": t} for fp, s, t in points],
                 "sensitivity_at_target_fp": at_target,
                 "target": {"sensitivity": TARGET_SENSITIVITY, "fp_per_scan": TARGET_FP_PER_SCAN},
                 "target_met": at_target is not None and at_target >= TARGET_SENSITIVITY},
        "ci95": {name: case_interval(scored, name, tag) for name in interval_statistics(tag)},
        "ci_method": CI_METHOD,
        "reference": reference_source(ref_dir, len(refs)),
    }

    out_dir.mkdir(parents=True, exist_ok=True)
    columns = ["case", "status", "error", "n_ref", f"n_ref_ge_{tag}", "n_pred", "tp", "fp", "fn", "detected",
               f"detected_ge_{tag}", "edema_dice", "mean_site_dice", "site_accuracy", "side_accuracy",
               "n_site_scored", "n_site_right", "subregion_accuracy", "n_subregion_scored", "n_subregion_right",
               "level_accuracy", "n_level_voxels", "n_level_right", "ref_volume_ml", "pred_volume_ml"]
    _write_csv(out_dir / "per_case.csv", columns, rows)
    _write_csv(out_dir / "lesions.csv", ["case", "kind", "id", "volume_ml", "site", "subregion", "detected", "pred_ids",
                                         "pred_site", "pred_subregion", "pred_volume_ml", "confidence"], lesion_rows)
    _write_csv(out_dir / "sites.csv", ["site", "n_cases", "mean_dice"],
               [{"site": _site_code(sid), "n_cases": len(d), "mean_dice": float(np.mean(d))}
                for sid, d in sorted(per_site.items(), key=lambda kv: float(np.mean(kv[1])))])
    _write_csv(out_dir / "site_confusion.csv",
               ["reference_site", "predicted_site", "kind", "ml_per_case", "share_of_reference"],
               site_confusion_rows(confusion_ml, ref_site_ml, len(scored)))
    (out_dir / "summary.json").write_text(json.dumps(_nan_to_none(summary), indent=2) + "\n")
    _write_froc_png(out_dir / "froc.png", points, min_ref_ml, ge.n_ref, len(froc_cases))
    return summary
