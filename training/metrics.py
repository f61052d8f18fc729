"""Evaluation metrics: voxel Dice, lesion matching, lesion-level detection scores, FROC and site agreement.

Pure numpy; label maps follow the output contract (``lesions``: uint16 instance ids, ``sites``: uint8 site ids,
0 is background in both).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Collection, Iterable, Mapping, NamedTuple, Sequence

import numpy as np

from models.lesions import volume_ml
from models.sites import by_code, vertebral_level_ids

MIN_OVERLAP_FRACTION = 0.1

MATCHING_RULE = (
    "A predicted lesion P and a reference lesion R match when they share at least `min_overlap_voxels` voxels "
    "(default 1) and the shared voxels are at least 10% of the smaller of the two lesions. "
    "A predicted lesion is a true positive when it matches any reference lesion and a false positive otherwise; "
    "it is assigned to the matching reference lesion it overlaps most (ties: lowest reference id). "
    "A reference lesion is detected when any predicted lesion matches it, so a lesion split into several "
    "predictions is one detection with several true-positive predictions, and one prediction spanning several "
    "reference lesions detects all of them (`sensitivity_one_per_prediction` counts one of them). "
    "Size-restricted scores (e.g. reference >= 0.5 mL) count only reference lesions of that size for sensitivity; "
    "predictions matching a reference lesion of that size are true positives, predictions matching only reference "
    "lesions outside the size range are ignored, and every unmatched prediction (of any size) is a false positive."
)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two boolean masks of the same shape; 1.0 when both are empty."""
    a = np.asarray(a, dtype=bool)
    b = np.asarray(b, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"dice: shapes differ {a.shape} vs {b.shape}")
    total = int(np.count_nonzero(a)) + int(np.count_nonzero(b))
    if total == 0:
        return 1.0
    return 2.0 * int(np.count_nonzero(a & b)) / total


@dataclass(frozen=True)
class SiteHistogram:
    """Voxel counts by (reference label, predicted label) over the labels present in either map, 0 = no bone."""
    ids: np.ndarray     # labels, ascending: every one present in either map (some absent ones may be listed too)
    counts: np.ndarray  # counts[i, j]: voxels whose reference is ids[i] and prediction ids[j]


def site_histogram(pred_sites: np.ndarray, ref_sites: np.ndarray) -> SiteHistogram:
    """One pass over both maps, from which the per-site Dice (:func:`dice_by_site`), the disagreements
    (:func:`confusion_of`) and each reference site's volume (:func:`volumes_by_site`) are read."""
    if pred_sites.shape != ref_sites.shape:
        raise ValueError(f"site maps: shapes differ {pred_sites.shape} vs {ref_sites.shape}")
    p = np.asarray(pred_sites).ravel().astype(np.intp, copy=False)
    r = np.asarray(ref_sites).ravel().astype(np.intp, copy=False)
    if (p.size and p.min() < 0) or (r.size and r.min() < 0):
        raise ValueError("site maps: label maps must be non-negative")
    n = int(max(p.max(initial=0), r.max(initial=0))) + 1
    if n <= 256:  # the contract's uint8 site ids: count the (reference, prediction) pairs directly
        ids, key = np.arange(n), r * n + p
    else:  # a foreign map with large labels: number the labels present first (n x n counts could fill memory)
        ids = np.flatnonzero(np.bincount(r, minlength=n) + np.bincount(p, minlength=n))
        index = np.zeros(n, np.intp)
        index[ids] = np.arange(len(ids))
        key = index[r] * len(ids) + index[p]
    k = len(ids)
    return SiteHistogram(ids, np.bincount(key, minlength=k * k).reshape(k, k))


def dice_by_site(hist: SiteHistogram, ids: Iterable[int] | None = None) -> dict[int, float]:
    """Dice per site id, only for ids present in the reference or the prediction (``ids`` None: all present)."""
    at = {int(sid): i for i, sid in enumerate(hist.ids)}
    n_pred, n_ref, inter = hist.counts.sum(0), hist.counts.sum(1), np.diagonal(hist.counts)
    wanted = hist.ids if ids is None else ids
    return {sid: 2.0 * float(inter[at[sid]]) / float(n_pred[at[sid]] + n_ref[at[sid]])
            for sid in map(int, wanted) if sid > 0 and sid in at and n_pred[at[sid]] + n_ref[at[sid]]}


def level_agreement(hist: SiteHistogram) -> tuple[int, int]:
    """(voxels whose vertebral level agrees, voxels that are a vertebra in both maps): vertebral-level accuracy,
    the share of the spine both maps see whose level is named right, apart from how much spine each found."""
    level = np.isin(hist.ids, vertebral_level_ids())
    both = hist.counts[np.ix_(level, level)]
    return int(np.trace(both)), int(both.sum())


def per_site_dice(pred_sites: np.ndarray, ref_sites: np.ndarray,
                  ids: Iterable[int] | None = None) -> dict[int, float]:
    """:func:`dice_by_site` of two site maps."""
    return dice_by_site(site_histogram(pred_sites, ref_sites), ids)


def confusion_of(hist: SiteHistogram) -> dict[tuple[int, int], int]:
    """Voxels per (reference site id, predicted site id) pair where the two maps disagree (0: no bone), e.g. a
    femur's epiphysis named tibia, or bone the prediction left out."""
    wrong = hist.counts.copy()
    np.fill_diagonal(wrong, 0)
    return {(int(hist.ids[r]), int(hist.ids[p])): int(wrong[r, p]) for r, p in zip(*np.nonzero(wrong))}


def site_confusion(pred_sites: np.ndarray, ref_sites: np.ndarray) -> dict[tuple[int, int], int]:
    """:func:`confusion_of` two site maps."""
    return confusion_of(site_histogram(pred_sites, ref_sites))


def volumes_by_site(hist: SiteHistogram) -> dict[int, int]:
    """Reference voxels per site id (no bone left out)."""
    return {int(sid): int(n) for sid, n in zip(hist.ids, hist.counts.sum(1)) if sid > 0 and n}


def _volumes(labels: np.ndarray) -> dict[int, int]:
    """Voxel count per nonzero label."""
    ids, counts = np.unique(labels[labels > 0], return_counts=True)
    return {int(i): int(c) for i, c in zip(ids, counts)}


def majority_labels(instances: np.ndarray, labels: np.ndarray) -> dict[int, int]:
    """For each nonzero instance, the nonzero label it overlaps most (ties: lowest label); 0 when it overlaps none."""
    if instances.shape != labels.shape:
        raise ValueError(f"majority_labels: shapes differ {instances.shape} vs {labels.shape}")
    out = {i: 0 for i in _volumes(instances)}
    both = (instances > 0) & (labels > 0)
    if not both.any():
        return out
    inst = instances[both].astype(np.int64)
    lab = labels[both].astype(np.int64)
    base = int(lab.max()) + 1
    pairs, counts = np.unique(inst * base + lab, return_counts=True)
    best: dict[int, tuple[int, int]] = {}
    for key, c in zip(pairs.tolist(), counts.tolist()):
        i, lbl = divmod(key, base)
        if i not in best or c > best[i][0]:  # pairs are sorted by label within an instance: ties keep the lowest
            best[i] = (c, lbl)
    out.update({i: lbl for i, (_, lbl) in best.items()})
    return out


@dataclass(frozen=True)
class Matching:
    """Result of :func:`match_lesions` for one scan (ids are the values in the label maps)."""
    pred_to_ref: dict[int, int | None]  # best-overlap matching reference per prediction, None: false positive
    pred_hits: dict[int, tuple[int, ...]]  # every matching reference per prediction
    ref_detected: dict[int, bool]
    ref_volume_ml: dict[int, float]
    pred_volume_ml: dict[int, float]

    @property
    def tp_preds(self) -> list[int]:
        return [p for p, r in self.pred_to_ref.items() if r is not None]

    @property
    def fp_preds(self) -> list[int]:
        return [p for p, r in self.pred_to_ref.items() if r is None]

    @property
    def missed_refs(self) -> list[int]:
        return [r for r, d in self.ref_detected.items() if not d]


def match_lesions(pred: np.ndarray, ref: np.ndarray, voxel_ml: float = 1e-3, min_overlap_voxels: int = 1,
                  min_overlap_fraction: float = MIN_OVERLAP_FRACTION) -> Matching:
    """Match predicted to reference lesion instances (rule: :data:`MATCHING_RULE`).

    A pair matches when overlap >= ``min_overlap_voxels`` and overlap >= ``min_overlap_fraction`` x the smaller
    lesion's voxel count. ``voxel_ml`` is one voxel's volume in mL (default 1 mm^3).
    """
    if pred.shape != ref.shape:
        raise ValueError(f"match_lesions: shapes differ {pred.shape} vs {ref.shape}")
    pv = _volumes(pred)
    rv = _volumes(ref)
    hits: dict[int, list[tuple[int, int]]] = {p: [] for p in pv}  # pred -> [(overlap, ref)]
    both = (pred > 0) & (ref > 0)
    if both.any():
        p_ids = pred[both].astype(np.int64)
        r_ids = ref[both].astype(np.int64)
        base = int(r_ids.max()) + 1
        pairs, overlaps = np.unique(p_ids * base + r_ids, return_counts=True)
        for key, ov in zip(pairs.tolist(), overlaps.tolist()):
            p, r = divmod(key, base)
            if ov >= min_overlap_voxels and ov >= min_overlap_fraction * min(pv[p], rv[r]):
                hits[p].append((ov, r))
    pred_to_ref: dict[int, int | None] = {}
    pred_hits: dict[int, tuple[int, ...]] = {}
    detected = {r: False for r in rv}
    for p, lst in hits.items():
        pred_hits[p] = tuple(sorted(r for _, r in lst))
        pred_to_ref[p] = min(lst, key=lambda t: (-t[0], t[1]))[1] if lst else None
        for _, r in lst:
            detected[r] = True
    return Matching(pred_to_ref=pred_to_ref, pred_hits=pred_hits, ref_detected=detected,
                    ref_volume_ml={r: float(volume_ml(c, voxel_ml)) for r, c in rv.items()},
                    pred_volume_ml={p: float(volume_ml(c, voxel_ml)) for p, c in pv.items()})


def _ratio(num: float, den: float) -> float | None:
    return num / den if den else None


def _f1(sensitivity: float | None, precision: float | None) -> float | None:
    """Their harmonic mean; None when either is undefined."""
    if sensitivity is None or precision is None:
        return None
    s, p = sensitivity, precision
    return 2 * s * p / (s + p) if s + p else 0.0


@dataclass(frozen=True)
class DetectionCounts:
    """Lesion-level counts over one or more scans; add instances to pool scans."""
    n_scans: int = 0
    n_ref: int = 0  # reference lesions in the size range
    n_detected: int = 0  # of those, detected
    n_tp: int = 0  # predictions matching a reference lesion in the size range
    n_fp: int = 0  # predictions matching no reference lesion
    n_ignored: int = 0  # predictions matching only reference lesions outside the size range
    n_credited: int = 0  # detected reference lesions, each prediction detecting one at most (detection_counts)

    def __add__(self, other: DetectionCounts) -> DetectionCounts:
        return DetectionCounts(*(a + b for a, b in zip(self.astuple(), other.astuple())))

    def astuple(self) -> tuple[int, ...]:
        return (self.n_scans, self.n_ref, self.n_detected, self.n_tp, self.n_fp, self.n_ignored, self.n_credited)

    @property
    def sensitivity(self) -> float | None:
        """Detected / reference lesions; None without reference lesions."""
        return _ratio(self.n_detected, self.n_ref)

    @property
    def precision(self) -> float | None:
        """True-positive / (true-positive + false-positive) predictions; None without predictions."""
        return _ratio(self.n_tp, self.n_tp + self.n_fp)

    @property
    def f1(self) -> float | None:
        """Harmonic mean of sensitivity and precision; None when either is undefined."""
        return _f1(self.sensitivity, self.precision)

    @property
    def fp_per_scan(self) -> float | None:
        return _ratio(self.n_fp, self.n_scans)

    @property
    def selection_f1(self) -> float | None:
        """F1 with each prediction detecting at most one reference lesion (``n_credited``), for choosing checkpoints:
        under :data:`MATCHING_RULE` one prediction covering the whole volume detects every lesion without a false
        positive (an untrained network scores F1 1.0). Equal to :attr:`f1` while no prediction spans two lesions."""
        return _f1(_ratio(self.n_credited, self.n_ref), self.precision)

    def scores(self) -> dict[str, float | int | None]:
        """Counts and scores as a flat dict (JSON-ready)."""
        return {"n_scans": self.n_scans, "n_ref": self.n_ref, "n_detected": self.n_detected, "n_tp": self.n_tp,
                "n_fp": self.n_fp, "n_ignored": self.n_ignored, "sensitivity": self.sensitivity,
                "precision": self.precision, "f1": self.f1, "fp_per_scan": self.fp_per_scan,
                "n_credited": self.n_credited, "sensitivity_one_per_prediction": _ratio(self.n_credited, self.n_ref)}


def _in_range(v: float, min_ml: float, max_ml: float) -> bool:
    return min_ml <= v < max_ml


def detection_counts(m: Matching, min_ml: float = 0.0, max_ml: float = math.inf) -> DetectionCounts:
    """Counts for one scan, reference lesions restricted to ``min_ml <= volume < max_ml``.

    Predictions matching a reference lesion in range are true positives, those matching only out-of-range reference
    lesions are ignored, unmatched predictions (any size) are false positives. ``n_credited`` counts the reference
    lesions in range detected when each prediction may detect one of them only: the largest such matching
    (:func:`_one_each`)."""
    refs = {r for r, v in m.ref_volume_ml.items() if _in_range(v, min_ml, max_ml)}
    tp = fp = ignored = 0
    pairs: dict[int, set[int]] = {}
    for p, hits in m.pred_hits.items():
        in_range = refs.intersection(hits)
        if not hits:
            fp += 1
        elif in_range:
            tp += 1
            pairs[p] = in_range
        else:
            ignored += 1
    return DetectionCounts(n_scans=1, n_ref=len(refs), n_detected=sum(m.ref_detected[r] for r in refs),
                           n_tp=tp, n_fp=fp, n_ignored=ignored, n_credited=_one_each(pairs))


def _one_each(hits: Mapping[int, Collection[int]]) -> int:
    """The most reference lesions that predictions can detect when each prediction detects one (a maximum matching
    of predictions to the reference lesions they match, ``hits``)."""
    refs = sorted({r for rs in hits.values() for r in rs})
    if all(len(rs) == 1 for rs in hits.values()):  # no prediction matches two: each reference found counts
        return len(refs)
    from scipy.optimize import linear_sum_assignment
    col = {r: j for j, r in enumerate(refs)}
    match = np.zeros((len(hits), len(refs)))
    for i, rs in enumerate(hits.values()):
        match[i, [col[r] for r in rs]] = 1.0
    rows, cols = linear_sum_assignment(match, maximize=True)
    return int(match[rows, cols].sum())


class FrocCase(NamedTuple):
    """One scan for :func:`froc`: ``preds`` holds (confidence, ids of the reference lesions it matches; empty for a
    false positive) per prediction; ``n_ref`` counts the reference lesions those ids come from."""
    preds: Sequence[tuple[float, Collection[int]]]
    n_ref: int


def froc_case(m: Matching, confidence: Mapping[int, float], min_ml: float = 0.0,
              max_ml: float = math.inf) -> FrocCase:
    """A :class:`FrocCase` from a matching, restricted like :func:`detection_counts` (ignored predictions dropped).

    Predictions without a confidence count with confidence 1.0."""
    refs = {r for r, v in m.ref_volume_ml.items() if _in_range(v, min_ml, max_ml)}
    preds: list[tuple[float, Collection[int]]] = []
    for p, hits in m.pred_hits.items():
        kept = refs.intersection(hits)
        if hits and not kept:
            continue
        preds.append((float(confidence.get(p, 1.0)), frozenset(kept)))
    return FrocCase(preds=preds, n_ref=len(refs))


def froc(cases: Sequence[FrocCase | tuple[Sequence[tuple[float, Collection[int]]], int]],
         thresholds: Iterable[float] | None = None) -> list[tuple[float, float, float]]:
    """FROC points ``(fp_per_scan, sensitivity, threshold)``, one per threshold, highest threshold first.

    At threshold t the predictions with confidence >= t are kept; sensitivity is the share of all reference lesions
    matched by a kept prediction (each counted once), fp_per_scan the kept false positives / number of cases.
    ``thresholds`` None: every distinct confidence. Sensitivity is 0 when there is no reference lesion.
    """
    cases = [FrocCase(*c) for c in cases]
    if thresholds is None:
        thresholds = {c for case in cases for c, _ in case.preds}
    ts = sorted({float(t) for t in thresholds}, reverse=True)
    n_ref = sum(c.n_ref for c in cases)
    n_scans = len(cases)
    points: list[tuple[float, float, float]] = []
    for t in ts:
        fp = det = 0
        for case in cases:
            found: set[int] = set()
            for conf, hits in case.preds:
                if conf >= t:
                    if len(hits):
                        found.update(hits)
                    else:
                        fp += 1
            det += len(found)
        points.append((fp / n_scans if n_scans else 0.0, det / n_ref if n_ref else 0.0, t))
    return points


def sensitivity_at_fp(points: Sequence[tuple[float, float, float]], max_fp_per_scan: float) -> float | None:
    """Best sensitivity among FROC points with fp_per_scan <= ``max_fp_per_scan``; None when no point qualifies."""
    ok = [s for fp, s, _ in points if fp <= max_fp_per_scan + 1e-12]
    return max(ok) if ok else None


def side_of(code: str) -> str | None:
    """Side of a site code (left/right/midline); None for codes outside the vocabulary (e.g. soft_tissue)."""
    site = by_code().get(code)
    return site.side if site else None


@dataclass(frozen=True)
class SiteAgreement:
    """Site and side agreement over (predicted site, reference site) pairs of matched lesions."""
    n: int = 0
    n_site: int = 0
    n_side: int = 0

    def __add__(self, other: SiteAgreement) -> SiteAgreement:
        return SiteAgreement(self.n + other.n, self.n_site + other.n_site, self.n_side + other.n_side)

    @property
    def site_accuracy(self) -> float | None:
        return _ratio(self.n_site, self.n)

    @property
    def side_accuracy(self) -> float | None:
        return _ratio(self.n_side, self.n)


SitePair = tuple  # (predicted code, reference code[, predicted side, reference side]): sides as the JSON gives them


def site_agreement(pairs: Iterable[SitePair]) -> SiteAgreement:
    """Compare (predicted, reference) site codes: the site is right when the codes are equal (the code includes the
    side, e.g. femur_left). The side is the code's; for a code without one (soft_tissue) the side the pair carries
    (the report's ``side``), if any. It is right when both sides are known and equal, or else when the codes are."""
    n = n_site = n_side = 0
    for pred_code, ref_code, *sides in pairs:
        n += 1
        same = pred_code == ref_code
        n_site += same
        given = (sides + [None, None])[:2]
        ps, rs = side_of(pred_code) or given[0], side_of(ref_code) or given[1]
        n_side += (ps == rs) if ps is not None and rs is not None else same
    return SiteAgreement(n, n_site, n_side)


def matched_site_pairs(m: Matching, pred_sites: Mapping[int, str], ref_sites: Mapping[int, str],
                       pred_sides: Mapping[int, str] | None = None,
                       ref_sides: Mapping[int, str] | None = None) -> list[SitePair]:
    """(predicted site, reference site, predicted side, reference side) for every true-positive prediction and the
    reference lesion it is assigned to, where both sites are known (a reference without a site map names none:
    nothing to score); a side is None where the JSON gives none."""
    pred_sides, ref_sides = pred_sides or {}, ref_sides or {}
    return [(pred_sites[p], ref_sites[r], pred_sides.get(p), ref_sides.get(r)) for p, r in m.pred_to_ref.items()
            if r is not None and p in pred_sites and r in ref_sites]


@dataclass(frozen=True)
class SubregionAgreement:
    """Part-of-bone agreement over matched lesions whose site is right and whose reference names a subregion
    (epiphysis / metaphysis / diaphysis with its end, vertebral body / posterior elements)."""
    n: int = 0
    n_right: int = 0

    def __add__(self, other: SubregionAgreement) -> SubregionAgreement:
        return SubregionAgreement(self.n + other.n, self.n_right + other.n_right)

    @property
    def accuracy(self) -> float | None:
        return _ratio(self.n_right, self.n)


def subregion_agreement(m: Matching, pred_sites: Mapping[int, str], ref_sites: Mapping[int, str],
                        pred_subregions: Mapping[int, str | None],
                        ref_subregions: Mapping[int, str | None]) -> SubregionAgreement:
    """Compare subregions of true-positive predictions with their reference lesions; a pair counts only when the
    site is right (a subregion of the wrong bone means nothing) and the reference names a subregion."""
    n = n_right = 0
    for p, r in m.pred_to_ref.items():
        if r is None or ref_subregions.get(r) is None or pred_sites.get(p) != ref_sites.get(r):
            continue
        n += 1
        n_right += pred_subregions.get(p) == ref_subregions[r]
    return SubregionAgreement(n, n_right)


def _ratio_of_sums(num: np.ndarray, den: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """sum(num[i]) / sum(den[i]) for each row i of case indices (NaN where the denominator is 0)."""
    n, d = num[idx].sum(axis=1), den[idx].sum(axis=1)
    return np.where(d > 0, n / np.where(d > 0, d, 1), np.nan)


def bootstrap_ci(num: Sequence[float], den: Sequence[float], minus: tuple[Sequence[float], Sequence[float]] | None = None,
                 n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> tuple[float, float] | None:
    """Percentile bootstrap interval over cases of sum(num) / sum(den) (a mean when ``den`` is all ones, a pooled
    rate such as sensitivity when it counts lesions). With ``minus`` (another method's num, den on the same cases,
    same order) the interval is of the paired difference: both are resampled with the same cases. None when no
    resample has a denominator."""
    num_a, den_a = np.asarray(num, float), np.asarray(den, float)
    if len(num_a) == 0:
        return None
    idx = np.random.default_rng(seed).integers(len(num_a), size=(n_boot, len(num_a)))
    stat = _ratio_of_sums(num_a, den_a, idx)
    if minus is not None:
        stat = stat - _ratio_of_sums(np.asarray(minus[0], float), np.asarray(minus[1], float), idx)
    stat = stat[np.isfinite(stat)]
    if len(stat) == 0:
        return None
    lo, hi = np.percentile(stat, [50 * (1 - level), 50 * (1 + level)])
    return float(lo), float(hi)
