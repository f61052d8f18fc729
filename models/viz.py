"""Pictures of a study for people: coronal views, case previews and the report's ``overlay.png``.

Radiological convention: coronal images with superior up and the patient's right on the viewer's left,
pixels drawn with their true physical aspect. Matplotlib is used through ``Figure`` and the Agg canvas only
(no pyplot), so nothing leaks into global state and it is safe in servers and worker threads.
"""
from __future__ import annotations

import io
import json
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import nibabel as nib
import numpy as np
from matplotlib import colormaps, patheffects
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_rgba
from matplotlib.figure import Figure
from scipy import ndimage

from .sites import by_code, by_id

LESION_COLOURS = ("#ff3b30", "#ffd60a", "#00e5ff", "#ff40ff", "#7cff00", "#ff9500", "#00ffa8", "#ff7eb6",
                  "#5ac8fa", "#c9a0ff")
SITE_OUTLINE = "#7f9fbf"
BACKGROUND = "#111111"
TEXT = "#e8e8e8"
MUTED_TEXT = "#a0a0a0"
VERTEBRA_IDS = tuple(s.id for s in by_id().values() if s.kind == "vertebra")
LONG_BONE_IDS = tuple(s.id for s in by_id().values() if s.kind == "long")
_SUBREGION_SHORT = {"epiphysis_proximal": "prox. epiphysis", "metaphysis_proximal": "prox. metaphysis",
                    "diaphysis": "diaphysis", "metaphysis_distal": "dist. metaphysis",
                    "epiphysis_distal": "dist. epiphysis", "vertebral_body": "vert. body",
                    "posterior_elements": "post. elements"}
SHORT_DISCLAIMER = ("Decision support only, not a diagnosis; does not replace clinical judgement. "
                    "Exclude mimics (infection, leukaemia, LCH, tumour) clinically. Lesions can be missed.")
_STROKE = [patheffects.withStroke(linewidth=2.5, foreground="black")]


def lesion_colour(lesion_id: int) -> str:
    """The bright colour of a lesion, the same in every picture and table."""
    return LESION_COLOURS[(int(lesion_id) - 1) % len(LESION_COLOURS)]


def site_label(code: str) -> str:
    """A short readable site name without the side: 'femur', 'vertebra L3', 'soft tissue'."""
    site = by_code().get(code)
    return (site.bone if site else str(code)).replace("_", " ")


# ---------------------------------------------------------------- geometry

def to_ras(arr: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reorient an array to the closest RAS axes (axis flips and swaps only); returns it with its new affine."""
    ornt = nib.orientations.io_orientation(affine)
    out = nib.orientations.apply_orientation(np.asarray(arr), ornt)
    return out, np.asarray(affine, float) @ nib.orientations.inv_ornt_aff(ornt, arr.shape[:3])


def _display(a_xz: np.ndarray) -> np.ndarray:
    """(x, z) RAS plane -> display rows (superior at the top) and columns (patient's right on the left)."""
    return np.ascontiguousarray(a_xz.T[::-1, ::-1])


def _weighted_percentile(weights: np.ndarray, q: float) -> int:
    c = np.cumsum(weights, dtype=float)
    return int(np.searchsorted(c, q / 100.0 * c[-1]))


Masks = list[tuple[int, tuple[slice, slice], np.ndarray]]   # (label, display box, boolean mask in that box)


@dataclass
class CoronalView:
    """One coronal picture, ready to draw: rows superior -> inferior, columns patient's right -> left."""
    kind: str                    # 'limbs', 'spine', 'anterior', 'mip' or 'lesion'
    title: str
    image: np.ndarray | None     # grey values, or None when there is no image
    window: tuple[float, float]  # display range (1st - 99.5th percentile)
    site_labels: np.ndarray | None  # site ids (for 'mip' the maximum over the slab)
    lesions: np.ndarray | None   # lesion labels (for 'mip' the projection, where overlaps keep the larger id)
    aspect: float                # pixel height / pixel width (physical)
    site_masks: Masks            # per site (for 'mip' its projection over the slab)
    lesion_masks: Masks          # per lesion (for 'mip' its projection over the whole depth)

    @property
    def shape(self) -> tuple[int, int]:
        return next(a for a in (self.image, self.site_labels, self.lesions) if a is not None).shape


def _views_geometry(sites: np.ndarray | None, image: np.ndarray | None, ny: int) -> dict[str, tuple[int, str]]:
    """Coronal positions (RAS y indices) and names of the slices, and the bone slab of the MIP."""
    bone_prof = (sites > 0).sum(axis=(0, 2)) if sites is not None else np.zeros(ny)
    if bone_prof.sum() == 0 and image is not None:
        body = image > np.percentile(image[:: 2, :: 2, :: 2], 60)
        bone_prof = body.sum(axis=(0, 2))
    if bone_prof.sum() == 0:
        mid = (ny // 2, "mid-depth slice")
        return {"limbs": mid, "spine": mid, "anterior": (int(ny * 0.7), "anterior slice"), "slab": (0, ny)}
    pct = lambda prof, q: _weighted_percentile(prof, q)  # noqa: E731
    lo, hi = pct(bone_prof, 1), pct(bone_prof, 99)
    geo: dict[str, Any] = {"slab": (max(0, lo - 2), min(ny, hi + 3))}
    long_prof = np.zeros(ny)
    if sites is not None:
        is_long = np.zeros(max(int(sites.max()), len(by_id())) + 1, bool)
        is_long[list(LONG_BONE_IDS)] = True
        long_prof = is_long[np.maximum(sites, 0)].sum(axis=(0, 2))
    geo["limbs"] = (pct(long_prof, 50), "slice through the long bones") if long_prof.sum() else \
        (pct(bone_prof, 50), "mid-depth slice through the bones")
    anterior = next((a for q in (85, 92, 97, 99.5) if (a := pct(bone_prof, q)) > geo["limbs"][0]),
                    min(ny - 1, geo["limbs"][0] + 1))  # anterior to the limbs slice, still through bone
    geo["anterior"] = (anterior, "anterior slice")
    vert = ((sites >= min(VERTEBRA_IDS)) & (sites <= max(VERTEBRA_IDS))).sum(axis=(0, 2)) if sites is not None else None
    if vert is not None and vert.sum() > 0:
        geo["spine"] = (pct(vert, 65), "slice through the spine")
    else:  # no spine in view: show another depth instead of repeating the limbs slice
        geo["spine"] = geo["anterior"]
    return geo


def _window(img: np.ndarray | None, top: float = 99.5) -> tuple[float, float]:
    """Robust grey window: 1st to ``top`` percentile (slices use the volume's 99.9th so that normal marrow
    is not saturated and the rare bright voxels -- edema, fluid -- stay brightest)."""
    if img is None:
        return (0.0, 1.0)
    lo, hi = (float(v) for v in np.percentile(img, [1.0, top]))
    return (lo, hi if hi > lo else lo + 1.0)


def _masks_2d(lab: np.ndarray) -> Masks:
    """Per-label masks of a 2D display label map."""
    return [(int(i), sl, lab[sl] == i) for i, sl in enumerate(ndimage.find_objects(lab), start=1) if sl is not None]


def _masks_projected(labels: np.ndarray) -> Masks:
    """Per-label projections of a RAS label array over its y axis, in display coordinates: labels behind one
    another all stay visible."""
    nx, nz = labels.shape[0], labels.shape[2]
    out = []
    for lid, sl in enumerate(ndimage.find_objects(labels), start=1):
        if sl is None:
            continue
        proj = (labels[sl] == lid).any(axis=1)
        box = (slice(nz - sl[2].stop, nz - sl[2].start), slice(nx - sl[0].stop, nx - sl[0].start))
        out.append((lid, box, _display(proj)))
    return out


def coronal_views(image: np.ndarray | None, affine: np.ndarray, sites: np.ndarray | None = None,
                  lesions: np.ndarray | None = None, kinds: Sequence[str] = ("limbs", "spine", "mip"),
                  focus_lesion: int | None = None) -> list[CoronalView]:
    """Coronal views of a study in radiological display orientation.

    ``kinds``: 'anterior' (a slice through the anterior bones), 'spine' (a slice through the vertebral
    bodies, or mid-bone depth), 'mip' (maximum-intensity projection of the bone slab; lesions projected over
    the whole depth so none is hidden) and 'lesion' (a slice through ``focus_lesion``'s centroid)."""
    ref = next(a for a in (image, sites, lesions) if a is not None)
    img_r = to_ras(np.asarray(image, np.float32), affine)[0] if image is not None else None
    sit_r = to_ras(np.asarray(sites).astype(np.int32, copy=False), affine)[0] if sites is not None else None
    les_r = to_ras(np.asarray(lesions).astype(np.int32, copy=False), affine)[0] if lesions is not None else None
    ras_aff = to_ras(ref, affine)[1]
    sp = np.sqrt((ras_aff[:3, :3] ** 2).sum(axis=0))
    ny = (img_r if img_r is not None else sit_r if sit_r is not None else les_r).shape[1]
    geo = _views_geometry(sit_r, img_r, ny)
    y_mm = lambda y: float((ras_aff @ np.array([0, y, 0, 1.0]))[1])  # noqa: E731
    slice_window = _window(img_r[:: 2, :: 2, :: 2] if img_r is not None and img_r.size > 4_000_000 else img_r, 99.9)
    views = []
    for kind in kinds:
        if kind == "mip":
            y0, y1 = geo["slab"]
            img2 = img_r[:, y0:y1, :].max(axis=1) if img_r is not None else None
            lab2 = sit_r[:, y0:y1, :].max(axis=1) if sit_r is not None else None
            smasks = _masks_projected(sit_r[:, y0:y1, :]) if sit_r is not None else []
            l2 = les_r.max(axis=1) if les_r is not None else None
            lmasks = _masks_projected(les_r) if les_r is not None else []
            title = f"MIP of the bone slab, y {y_mm(y0):.0f} to {y_mm(y1 - 1):.0f} mm"
            window = _window(img2)
        else:
            y, name = geo.get(kind, geo["limbs"])
            if kind == "lesion" and les_r is not None and focus_lesion:
                ys = np.nonzero((les_r == focus_lesion).any(axis=(0, 2)))[0]
                if len(ys):
                    w = (les_r[:, ys, :] == focus_lesion).sum(axis=(0, 2))
                    y, name = int(ys[_weighted_percentile(w, 50)]), f"slice through lesion {focus_lesion}"
            y = int(np.clip(y, 0, ny - 1))
            img2 = img_r[:, y, :] if img_r is not None else None
            lab2 = sit_r[:, y, :] if sit_r is not None else None
            l2 = les_r[:, y, :] if les_r is not None else None
            smasks = _masks_2d(_display(lab2)) if lab2 is not None else []
            lmasks = _masks_2d(_display(l2)) if l2 is not None else []
            title = f"Coronal {name}, y {y_mm(y):.0f} mm"
            window = slice_window
        disp = lambda a: _display(a) if a is not None else None  # noqa: E731
        views.append(CoronalView(kind, title, disp(img2), window, disp(lab2), disp(l2), float(sp[2] / sp[0]),
                                 smasks, lmasks))
    return views


# ---------------------------------------------------------------- drawing

def _site_colours() -> np.ndarray:
    """Muted RGBA colour per site id (row 0 unused)."""
    cmap = colormaps["tab20"]
    grey = np.array([0.6, 0.6, 0.6])
    rows = [np.zeros(4)]
    for sid in range(1, len(by_id()) + 1):
        rgb = 0.55 * np.array(cmap((sid * 7) % 20)[:3]) + 0.45 * grey
        rows.append(np.r_[rgb, 0.85])
    return np.array(rows)


def _draw_view(ax, view: CoronalView, per_site_colours: bool, label_ids: bool) -> None:
    """Image, thin muted site outlines, lesions filled and outlined in bright colours, R/L markers."""
    h, w = view.shape
    ax.set_facecolor(BACKGROUND)
    if view.image is not None:
        ax.imshow(view.image, cmap="gray", vmin=view.window[0], vmax=view.window[1], aspect=view.aspect,
                  interpolation="antialiased")
    else:
        ax.imshow(np.zeros((h, w)), cmap="gray", vmin=0, vmax=1, aspect=view.aspect)
    colours = _site_colours()
    if view.image is None and view.site_labels is not None:  # no image: fill the bones faintly
        fill = colours[np.clip(view.site_labels, 0, len(by_id()))] * [1, 1, 1, 0.35]
        ax.imshow(fill, aspect=view.aspect, interpolation="nearest")
    for sid, sl, m in view.site_masks:
        _contour(ax, sl, m, colours[sid] if per_site_colours else to_rgba(SITE_OUTLINE, 0.8), 0.7)
    if view.lesion_masks:
        _draw_lesions(ax, view, h, w, label_ids)
    ax.set_xlim(-0.5, w - 0.5)
    ax.set_ylim(h - 0.5, -0.5)
    ax.set_xticks([])
    ax.set_yticks([])
    for txt, x, ha in (("R", 0.01, "left"), ("L", 0.99, "right")):
        ax.text(x, 0.99, txt, transform=ax.transAxes, ha=ha, va="top", color="white", fontsize=13,
                fontweight="bold", path_effects=_STROKE)
    ax.set_title(view.title, color=TEXT, fontsize=9)


def _contour(ax, sl: tuple[slice, slice], mask: np.ndarray, colour: Any, width: float) -> None:
    """Outline of a boolean mask placed at display box ``sl`` (vector lines: thin at any zoom)."""
    r0, c0 = sl[0].start - 1, sl[1].start - 1
    pad = np.pad(mask.astype(np.float32), 1)
    ax.contour(np.arange(c0, c0 + pad.shape[1]), np.arange(r0, r0 + pad.shape[0]), pad, levels=[0.5],
               colors=[colour], linewidths=width)


def _draw_lesions(ax, view: CoronalView, h: int, w: int, label_ids: bool) -> None:
    """Each lesion filled semi-transparent and outlined in its colour; optionally its id beside it."""
    fill = np.zeros((h, w, 4))
    for lid, sl, m in view.lesion_masks:
        colour = lesion_colour(lid)
        fill[sl][m] = to_rgba(colour, 0.38)
        _contour(ax, sl, m, colour, 1.4)
        if label_ids:
            rr, cc = np.nonzero(m)
            ax.text(sl[1].start + cc.max() + 1.5, sl[0].start + rr.mean(), str(lid), color=colour, fontsize=8,
                    fontweight="bold", va="center", ha="left", path_effects=_STROKE)
    ax.imshow(fill, aspect=view.aspect, interpolation="nearest")


def _label_in_margins(fig: Figure, ax, view: CoronalView, names: Mapping[int, str]) -> None:
    """Label each lesion with id and site in the margins beside the image, with leader lines, stacked
    without overlap: lesions on the patient's right (viewer's left) in the left margin and vice versa."""
    h, w = view.shape
    ids, centres = [], []
    for lid, sl, m in view.lesion_masks:
        rr, cc = np.nonzero(m)
        ids.append(lid)
        centres.append((sl[0].start + rr.mean(), sl[1].start + cc.mean()))
    if not ids:
        return
    ax.apply_aspect()  # fix the axes box so text heights in data units are known
    height_px = ax.get_position().height * fig.get_figheight() * fig.dpi
    rows_per_px = h / max(height_px, 1.0)
    step = 13 * rows_per_px
    for side in ("left", "right"):
        items = sorted((c[0], c[1], i) for c, i in zip(centres, ids) if (c[1] < w / 2) == (side == "left"))
        ys: list[float] = []
        for r, _, _ in items:
            ys.append(max(r, ys[-1] + step) if ys else max(r, step / 2))
        overflow = (ys[-1] - (h - step / 2)) if ys else 0
        if overflow > 0:  # push the stack back up, keeping the spacing
            ys = [max(y - overflow, step / 2 + k * step) for k, y in enumerate(ys)]
        for (r, c, lid), y in zip(items, ys):
            x_text = -0.02 * w if side == "left" else 1.02 * w - 1
            colour = lesion_colour(lid)
            ax.annotate(f"{lid} {names.get(lid, '')}".strip(), xy=(c, r), xytext=(x_text, y),
                        ha="right" if side == "left" else "left", va="center", fontsize=8.5, color=colour,
                        fontweight="bold", annotation_clip=False, path_effects=_STROKE,
                        arrowprops=dict(arrowstyle="-", color=colour, lw=0.8, alpha=0.9, shrinkA=1, shrinkB=2))


def _new_figure(width_in: float, height_in: float) -> Figure:
    fig = Figure(figsize=(width_in, height_in), dpi=100, facecolor=BACKGROUND)
    FigureCanvasAgg(fig)
    return fig


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, facecolor=fig.get_facecolor())
    return buf.getvalue()


# ---------------------------------------------------------------- overlay.png

def _fmt(v: Any, nd: int = 1) -> str:
    return "–" if v is None else f"{float(v):.{nd}f}"


def _table_lines(lesions: Sequence[Mapping[str, Any]], max_rows: int) -> list[tuple[str, str]]:
    """(text, colour) rows of the lesion table."""
    head = (f"{'#':>3} {'site':<13}{'side':<5}{'subregion':<17}{'mL':>6}{'diam':>5}{'SRma':>5}{'SRmu':>5}"
            f"{'conf':>5} flags")
    rows = [(head, TEXT)]
    side_short = {"left": "L", "right": "R", "midline": "mid"}
    for les in sorted(lesions, key=lambda x: int(x["id"]))[:max_rows]:
        flags = " ".join(f for f, key in (("JP", "juxtaphyseal"), ("ST", "soft_tissue_extension")) if les.get(key))
        if les.get("juxtaphyseal") is None and str(les.get("subregion")).startswith(("metaphysis", "epiphysis")):
            flags = " ".join(("JP?", flags)).strip()  # next to a growth plate or not: unknown, not "no"
        sub = _SUBREGION_SHORT.get(les.get("subregion"), "–") + ("+" if len(les.get("subregions") or []) > 1 else "")
        rows.append((f"{les['id']:>3} {site_label(str(les['site']))[:12]:<13}{side_short.get(les['side'], '?'):<5}"
                     f"{sub:<17}{_fmt(les.get('volume_ml'), 1):>6}{_fmt(les.get('max_diameter_mm'), 0):>5}"
                     f"{_fmt(les.get('signal_ratio_marrow')):>5}{_fmt(les.get('signal_ratio_muscle')):>5}"
                     f"{_fmt(les.get('confidence'), 2):>5} {flags}",
                     lesion_colour(int(les["id"]))))
    if len(lesions) > max_rows:
        rows.append((f"     ... and {len(lesions) - max_rows} more lesions: see report.json", MUTED_TEXT))
    return rows


def _summary_lines(report: Mapping[str, Any]) -> list[str]:
    s = report.get("summary", {})
    n = s.get("lesion_count", len(report.get("lesions", [])))
    largest = s.get("largest_lesion_ml")
    lines = [f"Lesions: {n}    total {_fmt(s.get('total_volume_ml'), 1)} mL    "
             f"largest {'–' if largest is None else _fmt(largest, 1) + ' mL'}    "
             f"affected sites: {s.get('affected_sites', '–')}"]
    pairs = ", ".join(f"{a}–{b}" for a, b in s.get("symmetric_pairs", [])) or "none"
    lines.append(f"Spine: {spine_finding(s)}")
    lines.append(f"Soft tissue: {'yes' if s.get('soft_tissue_involved') else 'none flagged'}")
    lines.append(_wrap(f"Symmetric pairs (mirror sites, same subregion): {pairs}", 80))
    return lines


def spine_finding(summary: Mapping[str, Any]) -> str:
    """The spine in words: ``yes``, ``no lesion found`` (with the model's weakness there when the report names a
    spinal region in ``low_sensitivity_regions``), or ``not in view`` when no vertebra was imaged (a report without
    ``spine_in_view`` is taken to show the spine)."""
    if summary.get("spine_involved"):
        return "yes"
    if not summary.get("spine_in_view", True):
        return "not in view"
    weak = any(str(r).startswith("spine_") for r in summary.get("low_sensitivity_regions") or [])
    return "no lesion found (the model finds few spine lesions)" if weak else "no lesion found"


WARNING_ROOM = 0.30  # the most of the table's height the warnings take; the lesion rows get the rest


def _warning_texts(warnings: Sequence[str], room: float) -> tuple[list[str], float]:
    """The wrapped warnings that fit in ``room`` (axes height; at most 5, the rest named as more in report.json) and
    the height they take, the heading included."""
    texts, height = [], 0.028
    for k, w in enumerate(warnings[:5]):
        text = _wrap(f"• {w}", 95)
        need = 0.02 * (1 + text.count("\n")) + 0.006
        if height + need + 0.026 > room and k > 0:
            break
        texts.append(text)
        height += need
    if len(texts) < len(warnings):
        texts.append(f"… and {len(warnings) - len(texts)} more warning(s): see report.json")
        height += 0.026
    return texts, height


def _draw_table(ax, report: Mapping[str, Any]) -> None:
    """Summary, lesion table with its legend, and warnings, top to bottom inside ``ax``: the warnings get up to
    WARNING_ROOM of the height and the lesion rows what is left, so nothing runs below the axes (into the
    disclaimer and the model's caution under them)."""
    ax.set_axis_off()
    lesions = list(report.get("lesions", []))
    warnings, warnings_height = _warning_texts(list(report.get("warnings", [])), WARNING_ROOM)
    y = 1.0
    for line in _summary_lines(report):
        ax.text(0, y, line, transform=ax.transAxes, color=TEXT, fontsize=10, va="top")
        y -= 0.03 * (1 + line.count("\n"))
    y -= 0.015
    if not lesions:
        ax.text(0, y, "No lesions detected", transform=ax.transAxes, color=TEXT, fontsize=16, va="top",
                fontweight="bold")
        y -= 0.045
        ax.text(0, y, "Lesions can be missed: review the images.", transform=ax.transAxes, color=TEXT, fontsize=10,
                va="top")
        y -= 0.04
    else:
        size = 9.0 if len(lesions) <= 22 else 8.0
        dy = 0.026 if len(lesions) <= 22 else 0.022
        legend = 0.15
        # rows that fit above the legend and the warnings: the header, the lesions, and a "more" line if cut
        fit = int((y - legend - (warnings_height if warnings else 0.0)) / dy) - 1
        max_rows = max(3, min(30, fit if fit >= len(lesions) else fit - 1))
        for text, colour in _table_lines(lesions, max_rows):
            ax.text(0, y, text, transform=ax.transAxes, color=colour, fontsize=size, va="top", family="monospace")
            y -= dy
        y -= 0.01
        floor = (report.get("model", {}).get("thresholds") or {}).get("min_confidence")
        cut = f"\n(lesions under {float(floor):.2f} are not reported)" if floor else ""
        ax.text(0, y, "mL: volume.  diam: largest diameter (mm).  SRma / SRmu: median lesion signal divided by\n"
                      "normal marrow of the same bone / by the soft tissue around the bone.\n"
                      "conf: mean edema output of the network in the lesion, not a calibrated probability"
                      f"{cut}.\n"
                      "JP: juxtaphyseal (next to a growth plate); JP?: no growth plate found in that bone.\n"
                      "subregion+: the lesion also involves another part of the bone (report.json subregions).\n"
                      "ST: extends into soft tissue.  L/R: patient's side.",
                transform=ax.transAxes, color=MUTED_TEXT, fontsize=8, va="top")
        y -= 0.14
    if warnings:
        ax.text(0, y, "Warnings:", transform=ax.transAxes, color="#ffb340", fontsize=9, va="top", fontweight="bold")
        y -= 0.028
        for text in warnings:
            ax.text(0, y, text, transform=ax.transAxes, color="#ffb340", fontsize=8, va="top")
            y -= 0.02 * (1 + text.count("\n")) + 0.006


def _wrap(text: str, width: int) -> str:
    return "\n  ".join(textwrap.wrap(text, width))


def render_overlay(image: np.ndarray, lesions: np.ndarray, sites: np.ndarray | None, affine: np.ndarray,
                   report: Mapping[str, Any]) -> bytes:
    """The contract's ``overlay.png`` (1600 x 1000 px): a bone-slab MIP with every lesion filled, outlined and
    labelled (id + site), a coronal slice through the largest lesion, a lesion table, warnings, and a footer
    with the disclaimer and the model."""
    les_list = list(report.get("lesions", []))
    names = {int(x["id"]): f"{site_label(str(x['site']))}{_side_suffix(x.get('side'))}" for x in les_list}
    largest = max(les_list, key=lambda x: float(x.get("volume_ml", 0)))["id"] if les_list else None
    if largest is None and lesions is not None and np.any(lesions):
        largest = int(np.argmax(np.bincount(np.asarray(lesions).ravel())[1:])) + 1
    kinds = ("mip", "lesion") if largest else ("mip", "spine" if _mostly_spine(sites) else "limbs")
    views = coronal_views(image, affine, sites, lesions, kinds=kinds, focus_lesion=largest)
    if kinds[1] == "lesion":
        views[1].title = views[1].title.replace(f"lesion {largest}", f"the largest lesion ({largest})")
    views[0].title += " (head at the top)"
    fig = _new_figure(16, 10)
    study = report.get("study", {})
    n = len(les_list)
    name = str(study.get("filename", ""))
    name = name if len(name) <= 60 else name[:40] + "…" + name[-19:]  # the lesion count beside it stays readable
    fig.text(0.01, 0.975, f"Bone-marrow edema, MRI — {name}", color=TEXT, fontsize=15, fontweight="bold", va="top")
    fig.text(0.99, 0.975, f"{n} lesion{'s' if n != 1 else ''} detected", color=TEXT, fontsize=15, va="top", ha="right")
    rows, cols = views[0].shape
    if rows * views[0].aspect < 1.3 * cols:  # a wide partial view (knees, pelvis, feet): the two views stacked
        ax_mip = fig.add_axes((0.005, 0.50, 0.62, 0.42))
        ax_sl = fig.add_axes((0.005, 0.065, 0.62, 0.40))
    else:  # a tall one (whole body, legs, spine): side by side
        ax_mip = fig.add_axes((0.005, 0.065, 0.41, 0.855))
        ax_sl = fig.add_axes((0.415, 0.065, 0.21, 0.855))
    ax_tab = fig.add_axes((0.635, 0.065, 0.36, 0.855))
    _draw_view(ax_mip, views[0], per_site_colours=False, label_ids=False)
    _draw_view(ax_sl, views[1], per_site_colours=False, label_ids=True)
    ax_mip.set_xlim(-0.5 - 0.32 * views[0].shape[1], views[0].shape[1] * 1.32)
    if views[0].lesion_masks:
        _label_in_margins(fig, ax_mip, views[0], names)
    _draw_table(ax_tab, report)
    model = report.get("model", {})
    fig.text(0.01, 0.058, f"{SHORT_DISCLAIMER}    Model: {model.get('name', '?')} {model.get('version', '')}",
             color=MUTED_TEXT, fontsize=9, va="top")
    if model.get("caution"):  # trained on phantoms only, targets missed: on the picture that is read alone too
        fig.text(0.01, 0.038, "\n".join(textwrap.wrap(str(model["caution"]), 190)[:2]), color="#ffb340", fontsize=9,
                 va="top")
    return _png(fig)


def _mostly_spine(sites: np.ndarray | None) -> bool:
    """Whether a study shows more vertebra than long bone (a spine view: its slice goes through the spine)."""
    if sites is None:
        return False
    counts = np.bincount(np.asarray(sites).ravel().astype(np.int64), minlength=len(by_id()) + 1)
    return int(counts[list(VERTEBRA_IDS)].sum()) > int(counts[list(LONG_BONE_IDS)].sum())


def _side_suffix(side: Any) -> str:
    return {"left": " L", "right": " R"}.get(str(side), "")


# ---------------------------------------------------------------- case preview

def _load(path: Path) -> tuple[np.ndarray, np.ndarray]:
    img = nib.load(str(path))
    return np.asanyarray(img.dataobj), np.asarray(img.affine, float)


def _case_title(case_dir: Path, n_lesions: int, name: str | None = None) -> str:
    parts = [name or case_dir.name]
    meta_path = case_dir / "case.json"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        age = meta.get("age_years", meta.get("age"))
        if isinstance(age, (int, float)):
            parts.append(f"age {age:.1f} y")
        if meta.get("sex"):
            parts.append(str(meta["sex"]))
        acq = meta.get("acquisition") if isinstance(meta.get("acquisition"), Mapping) else {}
        fov = meta.get("fov", meta.get("field_of_view", acq.get("fov")))
        if isinstance(fov, Mapping):
            fov = fov.get("kind", fov.get("name", fov.get("region")))
        if fov:
            parts.append(f"FOV {fov}")
    parts.append(f"{n_lesions} lesion{'s' if n_lesions != 1 else ''}")
    return " — ".join(parts)


def preview_case(case_dir: Path, out: Path | None = None, image: Path | None = None, name: str | None = None) -> Path:
    """Write a PNG montage of a case folder (``image.nii.gz``, ``sites.nii.gz``, ``lesions.nii.gz``; a predict
    output folder has no image: pass ``image``, else the sites are drawn alone): a slice through the long
    bones, one through the spine (or an anterior one) and a bone-slab MIP, with site outlines and lesions.
    Default ``case_dir/preview.png``; the title names the case ``name`` (default: the folder's name)."""
    case_dir = Path(case_dir)
    out = Path(out) if out else case_dir / "preview.png"
    img_path = Path(image) if image else case_dir / "image.nii.gz"
    if image and not img_path.is_file():
        raise FileNotFoundError(f"no such image: {img_path}")
    arrays: dict[str, np.ndarray | None] = {"image": None, "sites": None, "lesions": None}
    affine = None
    paths = {"image": img_path, "sites": case_dir / "sites.nii.gz", "lesions": case_dir / "lesions.nii.gz"}
    for key, path in paths.items():
        if path.is_file():
            arrays[key], aff = _load(path)
            affine = aff if affine is None else affine
    present = {k: v for k, v in arrays.items() if v is not None}
    if not present:
        raise FileNotFoundError(f"{case_dir}: no image.nii.gz, sites.nii.gz or lesions.nii.gz")
    if len({v.shape[:3] for v in present.values()}) != 1:
        raise ValueError(f"{case_dir}: image, sites and lesions have different shapes "
                         f"{ {k: v.shape for k, v in present.items()} }")
    arrays = {k: (v.reshape(v.shape[:3]) if v is not None else None) for k, v in arrays.items()}
    views = coronal_views(arrays["image"], affine, arrays["sites"], arrays["lesions"])
    n_les = len(np.unique(arrays["lesions"])) - 1 if arrays["lesions"] is not None else 0
    fig = _new_figure(15, 9.5)
    fig.text(0.01, 0.985, _case_title(case_dir, max(n_les, 0), name), color=TEXT, fontsize=13, fontweight="bold", va="top")
    if arrays["image"] is None:
        fig.text(0.99, 0.985, "no image: sites only", color=MUTED_TEXT, fontsize=11, va="top", ha="right")
    for k, view in enumerate(views):
        ax = fig.add_axes((0.005 + k * 0.33, 0.02, 0.325, 0.91))
        _draw_view(ax, view, per_site_colours=True, label_ids=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(_png(fig))
    return out
