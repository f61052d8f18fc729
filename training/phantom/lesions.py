"""CNO lesion planning (site and pattern frequencies from the series in the clinical notes) and rendering.

Planning draws only numbers (sites, subregions, sizes, flags) so it can be tested over many cases cheaply;
rendering turns a plan into a soft-edged, heterogeneous marrow-edema blob inside the planned bone.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from models.sites import by_code, site_id
from training.config import LesionConfig

from .body import Body, LongBone
from .render import CORTEX, DISC, FAT, MARROW, MUSCLE, PHYSIS, SKIN, Canvas, smooth_field, weighted_choice

PAIRED = {"tibia", "femur", "fibula", "humerus", "radius", "ulna", "clavicle", "talus", "calcaneus", "metatarsals",
          "ilium", "ischium", "pubis", "ribs", "scapula", "midfoot"}
LONG = {"tibia", "femur", "fibula", "humerus", "radius", "ulna", "clavicle", "metatarsals"}
PELVIS = {"ilium", "ischium", "pubis", "sacrum"}
VERT_WEIGHTS = {"C": 0.5, "T": 1.0, "L": 1.2}  # thoracic and lumbar involvement dominate in the series


@dataclass
class LesionPlan:
    id: int
    site: str
    bone: str
    subregion: str | None
    juxtaphyseal: bool | None
    volume_ml: float
    ratio_to_marrow: float
    soft_tissue: bool
    periosteal: bool
    collapse: bool
    mirror_of: int | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def _vertebra(rng: np.random.Generator) -> str:
    region = weighted_choice(rng, VERT_WEIGHTS)
    n = {"C": 7, "T": 12, "L": 5}[region]
    return f"vertebra_{region}{int(rng.integers(1, n + 1))}"


def _site_code(bone: str, side: str) -> str:
    if bone == "vertebra":
        raise ValueError("vertebra needs a level")
    return f"{bone}_{side}" if bone in PAIRED else bone


def _subregion(rng, cfg: LesionConfig, bone: str) -> tuple[str | None, bool | None]:
    if bone in LONG:
        kind = weighted_choice(rng, cfg.long_subregion_p)
        if bone == "clavicle":  # medial clavicle: the classic site
            kind = "metaphysis" if kind == "diaphysis" and rng.random() < 0.5 else kind
            # a child's clavicular epiphyses are cartilage (the medial one ossifies at 18-20 y): metaphysis instead
            kind = "metaphysis" if kind == "epiphysis" and not cfg.clavicle_epiphysis else kind
        end = "distal" if rng.random() < cfg.distal_p.get(bone, 0.5) else "proximal"
        if bone == "metatarsals" and kind == "epiphysis":
            kind = "metaphysis"
        sub = "diaphysis" if kind == "diaphysis" else f"{kind}_{end}"
        juxta = kind == "epiphysis" or (kind == "metaphysis" and rng.random() < cfg.juxtaphyseal_p)
        return sub, bool(juxta)
    if bone == "vertebra":
        return ("vertebral_body" if rng.random() < 0.9 else "posterior_elements"), None
    return None, None


def _ratio(rng, cfg: LesionConfig) -> float:
    lo, hi = cfg.ratio_to_marrow
    if rng.random() < cfg.faint_p:
        return float(rng.uniform(lo, min(2.0, hi)))
    return float(np.exp(rng.uniform(np.log(max(lo, 2.0)), np.log(hi))))


def plan_lesions(rng: np.random.Generator, cfg: LesionConfig) -> tuple[str | None, list[LesionPlan]]:
    """Draw the disease pattern and the lesion list of one case (no rendering)."""
    if rng.random() < cfg.none_p:
        return None, []
    pattern = weighted_choice(rng, cfg.pattern_p)
    n = int(np.clip(rng.poisson(cfg.count_mean if pattern != "claviculo_spinal" else cfg.count_mean * 0.5), 1,
                    cfg.count_max))
    plans: list[LesionPlan] = []
    used: set[tuple[str, str | None]] = set()
    tries = 0
    while len(plans) < n and tries < 20 * n:
        tries += 1
        bone = weighted_choice(rng, cfg.site_weights[pattern])
        side = "right" if rng.random() < 0.5 else "left"
        site = _vertebra(rng) if bone == "vertebra" else _site_code(bone, side)
        sub, juxta = _subregion(rng, cfg, bone)
        if (site, sub) in used:
            continue
        vol = float(np.exp(rng.uniform(np.log(cfg.volume_ml[0]), np.log(cfg.volume_ml[1]))))
        if bone in {"ribs", "metatarsals", "fibula", "radius", "ulna", "mandible", "sternum", "clavicle"} or \
                (bone == "vertebra" and site.startswith("vertebra_C")):
            vol = min(vol, float(rng.uniform(0.4, 3.0)))
        plan = LesionPlan(len(plans) + 1, site, bone, sub, juxta, vol, _ratio(rng, cfg),
                          bool(rng.random() < cfg.soft_tissue_p), bool(bone in LONG and rng.random() < cfg.periosteal_p),
                          bool(bone == "vertebra" and sub == "vertebral_body" and rng.random() < cfg.collapse_p))
        plans.append(plan)
        used.add((site, sub))
        if bone in PAIRED and len(plans) < n and rng.random() < cfg.symmetric_p:
            mirror = by_code()[site].mirror_code
            if mirror and (mirror, sub) not in used:
                m = LesionPlan(len(plans) + 1, mirror, bone, sub, juxta, vol * float(rng.uniform(0.6, 1.4)),
                               _ratio(rng, cfg), False, False, False, mirror_of=plan.id)
                plans.append(m)
                used.add((mirror, sub))
        if bone == "vertebra" and len(plans) < n and rng.random() < cfg.vertebra_multifocal_p:
            level = site.split("_")[1]
            idx = int(level[1:]) + int(rng.choice([-2, -1, 1, 2]))
            maxn = {"C": 7, "T": 12, "L": 5}[level[0]]
            if 1 <= idx <= maxn:
                other = f"vertebra_{level[0]}{idx}"
                if (other, "vertebral_body") not in used:
                    plans.append(LesionPlan(len(plans) + 1, other, bone, "vertebral_body", None,
                                            float(rng.uniform(0.5, 4.0)), _ratio(rng, cfg), False, False, False))
                    used.add((other, "vertebral_body"))
    return pattern, plans


# --------------------------------------------------------------------------------------------------- rendering
def _long_bone_centre(bone: LongBone, sub: str, juxta: bool | None, rng) -> np.ndarray:
    tp, td = bone.t_phys
    tp = tp if tp is not None else 0.04
    td = td if td is not None else 0.96
    if sub == "epiphysis_proximal":
        t = tp * rng.uniform(0.3, 0.7)
    elif sub == "epiphysis_distal":
        t = td + (1 - td) * rng.uniform(0.3, 0.7)
    elif sub == "metaphysis_proximal":
        t = tp + (rng.uniform(0.02, 0.05) if juxta else rng.uniform(0.06, 0.14))
    elif sub == "metaphysis_distal":
        t = td - (rng.uniform(0.02, 0.05) if juxta else rng.uniform(0.06, 0.14))
    else:
        t = rng.uniform(0.35, 0.65)
    return bone.point(float(t))


def _bone_marrow_points(cv: Canvas, sid: int) -> np.ndarray:
    """World coordinates of the marrow voxels of a site (coarsely strided for speed)."""
    idx = np.argwhere((cv.sites == sid) & np.isin(cv.tissue, MARROW))
    if len(idx) == 0:
        idx = np.argwhere(cv.sites == sid)
    return cv.origin + cv.spacing * idx


def lesion_centre(cv: Canvas, body: Body, plan: LesionPlan, rng) -> np.ndarray | None:
    """A world point inside the planned bone and subregion."""
    if plan.bone in LONG and plan.site in body.long_bones and plan.subregion:
        return _long_bone_centre(body.long_bones[plan.site], plan.subregion, plan.juxtaphyseal, rng)
    if plan.bone == "vertebra" and plan.site in body.vertebrae:
        v = body.vertebrae[plan.site]
        if plan.subregion == "posterior_elements":
            return v.canal + np.array([0, -0.9 * (v.canal[1] - v.centre[1]) * 0.8, 0])
        return v.centre + np.array([rng.uniform(-0.4, 0.4) * v.half_width, rng.uniform(-0.3, 0.4) * v.half_depth,
                                    rng.uniform(-0.2, 0.2) * v.height])
    sid = site_id(plan.site)
    pts = _bone_marrow_points(cv, sid)
    if len(pts) == 0:
        return None
    return pts[int(rng.integers(len(pts)))]


def render_lesion(cv: Canvas, body: Body, plan: LesionPlan, label: np.ndarray, edema: np.ndarray,
                  rng: np.random.Generator) -> int:
    """Draw one lesion into ``label`` (instance id) and ``edema`` (0..1 strength); returns voxels labelled."""
    centre = lesion_centre(cv, body, plan, rng)
    if centre is None:
        return 0
    sid = site_id(plan.site)
    vox_ml = cv.spacing ** 3 / 1000.0
    r_eq = (3 * plan.volume_ml * 1000 / (4 * np.pi)) ** (1 / 3)
    radii = r_eq * rng.uniform(0.7, 1.4, 3)
    if plan.site in body.long_bones:  # elongate along the bone axis a little
        radii[2] *= 1.2
    ext = radii.max() * 2.2 + 8
    b = cv.box(centre - ext, centre + ext)
    if b is None:
        return 0
    shape = tuple(s.stop - s.start for s in b.sl)
    q = np.sqrt(((b.x - centre[0]) / radii[0]) ** 2 + ((b.y - centre[1]) / radii[1]) ** 2 +
                ((b.z - centre[2]) / radii[2]) ** 2)
    wobble = smooth_field(shape, rng, cells=4, lo=-0.45, hi=0.45)
    profile = np.clip(1.6 - (q + wobble), 0.0, 1.0)          # 1 in the core, soft falloff
    sites, tissue = cv.sites[b.sl], cv.tissue[b.sl]
    in_bone = (sites == sid) & np.isin(tissue, (*MARROW, PHYSIS))
    core = in_bone & (profile > 0.45)
    if core.sum() < 3:
        in_bone = sites == sid
        core = in_bone & (profile > 0.45)
    if plan.soft_tissue:  # edema beyond the cortex into the adjacent muscle / fat
        from scipy.ndimage import binary_dilation
        near = binary_dilation(sites == sid, iterations=max(2, int(6 / cv.spacing)))
        st = near & (sites == 0) & np.isin(tissue, (MUSCLE, FAT)) & (profile > 0.55)
        core = core | st
    if plan.periosteal:
        from scipy.ndimage import binary_dilation
        rim = binary_dilation(sites == sid, iterations=1) & (sites == 0) & np.isin(tissue, (MUSCLE, FAT))
        core = core | (rim & (profile > 0.3))
    free = label[b.sl] == 0
    core &= free
    n = int(core.sum())
    if n == 0:
        return 0
    label[b.sl][core] = plan.id
    soft = np.where(np.isin(tissue, (CORTEX, SKIN)), 0.0, profile ** 0.7)
    edema[b.sl] = np.maximum(edema[b.sl], (soft * (sites == sid) + soft * core).clip(0, 1).astype(np.float32))
    plan.volume_ml = round(n * vox_ml, 3)
    return n


def apply_collapse(cv: Canvas, body: Body, plan: LesionPlan, fill: str = "disc") -> None:
    """Vertebral height loss: the upper part of the body gives way to the disc above (disc signal, no bone
    label), and a cortical endplate closes the rest of the body. ``fill="muscle"``: generator 1.6, which painted
    muscle there, without an endplate."""
    from scipy.ndimage import binary_dilation
    v = body.vertebrae.get(plan.site)
    if v is None:
        return
    sid = site_id(plan.site)
    b = cv.box(v.centre - [v.half_width, v.half_depth, v.height / 2], v.centre + [v.half_width, v.half_depth, v.height / 2])
    if b is None:
        return
    mine = cv.sites[b.sl] == sid
    top = (b.z > v.centre[2] + v.height * 0.15) & mine & (b.y > v.centre[1] - v.half_depth)
    endplate = binary_dilation(top, iterations=1) & mine & ~top  # the remaining body's new upper surface
    cv.tissue[b.sl][top] = DISC if fill == "disc" else MUSCLE
    cv.sites[b.sl][top] = 0
    cv.marrow_w[b.sl][top] = 0
    if fill == "disc":
        cv.tissue[b.sl][endplate] = CORTEX
        cv.marrow_w[b.sl][endplate] = 0

