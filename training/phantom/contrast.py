"""STIR contrast: tissue means, texture, marrow by age, normal mimics, lesion edema, contrast randomisation."""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from models.sites import site_id
from training.config import ContrastRandomisation, MimicConfig, StirConfig

from .body import Body, Synchondrosis
from .render import (BLADDER, BLOOD, BOWEL, BRAIN, CARTILAGE, CORD, CORTEX, CSF, DISC, FAT, JOINT_FLUID, KIDNEY,
                     LIVER, LUNG, MUSCLE, PHYSIS, RED, SKIN, SPLEEN, TISSUES, YELLOW, Canvas, ellipsoid,
                     field_at, smooth_field, tissue_in)

_FIELD = {FAT: "fat", MUSCLE: "muscle", CORTEX: "cortex", YELLOW: "yellow_marrow", RED: "red_marrow",
          PHYSIS: "physis", CSF: "fluid", BRAIN: "brain", CORD: "brain", LUNG: "lung", BLOOD: "blood",
          LIVER: "liver", SPLEEN: "spleen", KIDNEY: "kidney", BLADDER: "fluid", BOWEL: "bowel",
          JOINT_FLUID: "fluid", DISC: "disc", CARTILAGE: "cartilage", SKIN: "muscle"}


def tissue_means(rng: np.random.Generator, stir: StirConfig, rand: ContrastRandomisation) -> np.ndarray:
    """Mean signal per tissue class for this case (STIR ranges, optionally SynthSeg-style jittered)."""
    lut = np.zeros(len(TISSUES), np.float32)
    for t, name in _FIELD.items():
        lo, hi = getattr(stir, name)
        lut[t] = rng.uniform(lo, hi)
    lut[SKIN] *= 1.3
    if rand.enabled and rng.random() < rand.p:
        lut[1:] *= rng.uniform(1 - rand.jitter, 1 + rand.jitter, len(lut) - 1).astype(np.float32)
        # a gamma on the means (fluid about 1): the tissue order stays, the spread between dark and bright changes
        gamma = np.exp(rng.uniform(*np.log(rand.gamma)))
        lut[1:] = np.clip(lut[1:], 1e-4, None) ** np.float32(gamma)
        # keep what defines edema and fat suppression: fat and fatty marrow stay dark, fluid bright
        lut[FAT] = min(lut[FAT], 0.6 * lut[MUSCLE])
        lut[YELLOW] = min(lut[YELLOW], 0.7 * lut[MUSCLE])
        lut[RED] = float(np.clip(lut[RED], lut[YELLOW] * 1.3, 0.6 * lut[CSF]))
    return lut


FOOT_FOCUS_BONES = ("calcaneus", "talus", "midfoot")  # where children's normal bright foot foci lie
class FocusRegion(NamedTuple):
    """Where normal bright marrow foci lie: the bones, the landmark (per side) their pattern is laid out around,
    mirrored left-right, how far from it they reach (a share of body height; None: the whole bones) and the share
    of the pattern's field below which marrow stays normal (higher: fewer, smaller foci)."""
    bones: tuple[str, ...]
    landmark: str
    reach: float | None
    level: float


MARROW_FOCUS_REGIONS = {
    "foot": FocusRegion(FOOT_FOCUS_BONES, "ankle", None, 0.55),
    "knee": FocusRegion(("femur", "tibia"), "knee", 0.05, 0.7),  # the metaphyses on both sides of the knee
    # around the acetabulum and the ischiopubic junction
    "pelvis": FocusRegion(("ilium", "ischium", "pubis"), "hip", 0.07, 0.7),
}


def _region_ids(region: str, side: str) -> list[int]:
    return [site_id(f"{b}_{side}") for b in MARROW_FOCUS_REGIONS[region].bones]


def region_marrow(cv: Canvas, body: Body, region: str) -> np.ndarray:
    """Marrow voxels of both sides of ``region`` (:data:`MARROW_FOCUS_REGIONS`) where normal bright foci can lie."""
    landmark, reach = MARROW_FOCUS_REGIONS[region].landmark, MARROW_FOCUS_REGIONS[region].reach
    out = np.zeros(cv.shape, bool)
    marrow = tissue_in(cv.tissue, (RED, YELLOW))
    for side in ("left", "right"):
        sel = tissue_in(cv.sites, _region_ids(region, side)) & marrow
        if reach is not None and sel.any():
            idx = np.nonzero(sel)
            world = cv.origin + cv.spacing * np.stack(idx, axis=1).astype(np.float32)
            far = np.linalg.norm(world - np.asarray(body.landmarks[f"{landmark}_{side}"], np.float32), axis=1) \
                > reach * body.H
            sel[tuple(i[far] for i in idx)] = False
        out |= sel
    return out


def mimic_masks(cv: Canvas, body: Body, rng: np.random.Generator, cfg: MimicConfig) -> dict:
    """Normal bright findings: symmetric foot foci (< 15 y), joint effusions, slow-flow vessels, and symmetric
    knee and pelvic marrow foci (< 16 y; drawn last, so a case without them is generator 1.8's)."""
    out: dict[str, np.ndarray | None] = {"foot": None}
    if body.age < 15 and rng.random() < cfg.foot_foci_p_under15:
        out["foot"] = region_marrow(cv, body, "foot")
    if rng.random() < cfg.effusion_p:
        for side in ("left", "right"):
            if rng.random() < 0.7:
                k = np.array(body.landmarks[f"knee_{side}"])
                H = body.H
                res = ellipsoid(cv, k + [0, 0.016 * H, 0.03 * H], np.array([0.014, 0.006, 0.022]) * H * rng.uniform(0.6, 1.2))
                if res:
                    b, m, _ = res
                    sel = m & tissue_in(cv.tissue[b.sl], (MUSCLE, FAT))
                    cv.tissue[b.sl][sel] = JOINT_FLUID
    for region, p in (("knee", cfg.knee_foci_p_under16), ("pelvis", cfg.pelvic_foci_p_under16)):
        if p > 0 and body.age < 16 and rng.random() < p:
            out[region] = region_marrow(cv, body, region)
            # the foci's own pattern stream: the rest of the case's contrast draws stay those of the case without
            out[f"{region}_rng"] = np.random.default_rng(int(rng.integers(2 ** 63)))
    return out


FOCUS_CELL_MM = 12.0  # size of the foci's random pattern (a cell of the low-frequency field)


def marrow_foci_gain(cv: Canvas, body: Body, mask: np.ndarray, rng: np.random.Generator, boost: float,
                     region: str) -> np.ndarray:
    """Signal gain at the ``mask`` voxels of ``region``: bright foci (x ``boost``) where one random low-frequency
    pattern, laid out in coordinates centred on the region's landmark and mirrored left-right, exceeds a level.
    Both sides share the pattern, so the foci are symmetric, as the normal foci of children's marrow are (clinical
    notes); each side's level and boost are jittered a little so the two sides are alike, not identical."""
    from scipy.ndimage import map_coordinates
    landmark = MARROW_FOCUS_REGIONS[region].landmark
    idx = np.nonzero(mask)
    world = cv.origin + cv.spacing * np.stack(idx, axis=1).astype(np.float32)
    local = np.zeros_like(world)
    side_of = np.zeros(len(world), np.int8)
    mask_sites = cv.sites[idx]
    for k, side in enumerate(("left", "right")):
        sel = np.isin(mask_sites, _region_ids(region, side))
        mirror = np.array([1.0 if side == "right" else -1.0, 1.0, 1.0], np.float32)  # lateral is +x on both sides
        local[sel] = (world[sel] - np.asarray(body.landmarks[f"{landmark}_{side}"], np.float32)) * mirror
        side_of[sel] = k
    lo = local.min(axis=0)
    coarse_shape = tuple(int(n) for n in np.ceil((local.max(axis=0) - lo) / FOCUS_CELL_MM) + 2)
    pattern = rng.uniform(0.0, 1.0, coarse_shape).astype(np.float32)
    field = map_coordinates(pattern, list(((local - lo) / FOCUS_CELL_MM).T), order=1, mode="nearest")
    level = MARROW_FOCUS_REGIONS[region].level + rng.uniform(-0.03, 0.03, 2)
    gain = boost * rng.uniform(0.9, 1.1, 2)
    return np.where(field > level[side_of], gain[side_of], 1.0).astype(np.float32)


def synchondrosis_gain(cv: Canvas, sc: Synchondrosis, img: np.ndarray, marrow_boost: float,
                       muscle_boost: float) -> None:
    """Brighten an ischiopubic fusion zone in place: its marrow (pubis and ischium) by up to ``marrow_boost``, full
    within 1.5 ramus radii of the junction and fading to none at 3.5, and the muscle against it by up to
    ``muscle_boost``, full within 1 radius and none at 2; only what the synchondrosis draws (``bright_marrow``,
    ``bright_soft_tissue``)."""
    far = 3.5 * sc.radius
    b = cv.box(sc.centre - far, sc.centre + far)
    if b is None:
        return
    d = np.sqrt((b.x - sc.centre[0]) ** 2 + (b.y - sc.centre[1]) ** 2 + (b.z - sc.centre[2]) ** 2) / sc.radius
    tissue, sites, sub = cv.tissue[b.sl], cv.sites[b.sl], img[b.sl]
    for bright, m, boost, (near_r, far_r) in (
            (sc.bright_marrow, tissue_in(tissue, (RED, YELLOW))
             & tissue_in(sites, (site_id(f"pubis_{sc.side}"), site_id(f"ischium_{sc.side}"))), marrow_boost, (1.5, 3.5)),
            (sc.bright_soft_tissue, (tissue == MUSCLE) & (sites == 0), muscle_boost, (1.0, 2.0))):
        if bright:
            weight = np.clip((far_r - d[m]) / (far_r - near_r), 0.0, 1.0)
            sub[m] *= (1.0 + (boost - 1.0) * weight).astype(sub.dtype)


def synthesize(cv: Canvas, body: Body, lut: np.ndarray, edema: np.ndarray, ratios: dict[int, float],
               lesion_labels: np.ndarray, mimics: dict, rng: np.random.Generator, stir: StirConfig,
               cfg: MimicConfig, muscle_floor: float = 1.0, fluid_ceiling: bool = True) -> np.ndarray:
    """The anatomy-grid STIR image (before acquisition)."""
    shape = cv.shape
    img = lut[cv.tissue]
    # marrow: yellow..red by the red-marrow weight, with patchy residual red marrow
    marrow = tissue_in(cv.tissue, (RED, YELLOW))
    w = cv.marrow_w[marrow]
    if rng.random() < cfg.red_marrow_patch_p:
        w = np.clip(w + field_at(marrow, rng, cells=max(8, int(shape[2] / 10)), lo=-0.35, hi=0.35), 0, 1)
    img[marrow] = lut[YELLOW] + w * (lut[RED] - lut[YELLOW])
    # physes fade toward marrow as they close
    img[cv.tissue == PHYSIS] = lut[RED] + body.physis_open * (lut[PHYSIS] - lut[RED])
    if mimics.get("foot") is not None:
        img[mimics["foot"]] *= marrow_foci_gain(cv, body, mimics["foot"], rng, rng.uniform(*cfg.foot_foci_boost),
                                                "foot")
    for region in ("knee", "pelvis"):  # generator 1.9, from their own streams: every other voxel stays 1.8's
        if mimics.get(region) is not None and mimics[region].any():
            own = mimics[f"{region}_rng"]
            img[mimics[region]] *= marrow_foci_gain(cv, body, mimics[region], own,
                                                    own.uniform(*cfg.marrow_foci_boost), region)
    synchondroses = [sc for sc in body.synchondroses if sc.bright_marrow or sc.bright_soft_tissue]
    if synchondroses:  # generator 1.10, from its own stream
        own = mimics["synchondrosis_rng"]
        for sc in synchondroses:
            synchondrosis_gain(cv, sc, img, own.uniform(*cfg.synchondrosis_boost),
                               own.uniform(*cfg.synchondrosis_muscle_boost))
    # slow flow: vessels sometimes bright
    if rng.random() < cfg.slow_flow_p:
        img[cv.tissue == BLOOD] *= rng.uniform(1.5, 3.0)
    # tissue texture: multiplicative smooth noise at two scales
    cv_tex = rng.uniform(*stir.texture_cv)
    img *= 1.0 + cv_tex * smooth_field(shape, rng, cells=int(shape[2] / 3), lo=-1.7, hi=1.7)
    # bowel: strongly heterogeneous (fluid and gas)
    bowel = cv.tissue == BOWEL
    if bowel.any():
        img[bowel] *= np.clip(field_at(bowel, rng, cells=int(shape[2] / 8), lo=0.3, hi=2.0), 0.2, 2.0)
    # lesion edema: local marrow signal scaled toward its ratio, soft at the margins
    if lesion_labels.any() or edema.any():
        img = apply_edema(img, edema, ratios, lesion_labels, lut, rng, muscle_floor, fluid_ceiling)
    return img


def apply_edema(img: np.ndarray, edema: np.ndarray, ratios: dict[int, float], labels: np.ndarray, lut: np.ndarray,
                rng: np.random.Generator, muscle_floor: float, fluid_ceiling: bool = True) -> np.ndarray:
    """Brighten each labelled lesion's marrow to ``ratio`` x its own signal (at least ``muscle_floor`` x a
    muscle-level edema signal), weighted by the soft edema map and with 18% voxel heterogeneity; with
    ``fluid_ceiling`` no brighter than free fluid (:func:`at_most_fluid`)."""
    from scipy.ndimage import find_objects
    pad = 3
    for lid, sl in enumerate(find_objects(labels), start=1):
        if sl is None or lid not in ratios:
            continue
        sl = tuple(slice(max(0, s.start - pad), min(n, s.stop + pad)) for s, n in zip(sl, labels.shape))
        own = np.isin(labels[sl], (0, lid))
        e = edema[sl] * own
        base = img[sl]
        # brightness relative to the lesion's normal marrow, by default never below a muscle-level edema signal
        target = np.maximum(base * ratios[lid], muscle_floor * lut[MUSCLE] * (0.6 + 0.25 * ratios[lid]))
        het = 1.0 + 0.18 * rng.standard_normal(base.shape).astype(np.float32)
        edema_signal = at_most_fluid(target * het, float(lut[CSF])) if fluid_ceiling else target * het
        img[sl] = np.where(e > 0, base + e * (edema_signal - base), base)
    return img


def at_most_fluid(signal: np.ndarray, fluid: float, knee: float = 0.8) -> np.ndarray:
    """Edema signal no brighter than free fluid (on STIR edema is at most fluid-bright): unchanged up to
    ``knee`` x ``fluid``, then bent smoothly toward ``fluid``. Generator 1.6 let a lesion over a growth plate (the
    physis' signal times the lesion's ratio) reach several times fluid."""
    k = knee * fluid
    over = np.maximum(signal - k, 0.0)
    return np.where(signal > k, k + (fluid - k) * np.tanh(over / (fluid - k)), signal).astype(signal.dtype)
