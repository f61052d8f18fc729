"""A child's body by age: growth-chart height, proportions, and the skeleton with every site of sites.tsv.

World frame: RAS+ millimetres (x to the patient's right, y anterior, z superior); soles at z = 0, midline x = 0.
Lengths are fractions of height taken from paediatric anthropometry; adult-leaning proportions are blended
with age (the head is relatively larger and the legs relatively shorter in young children).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from models.sites import VERTEBRAL_LEVELS, site_id
from training.config import BodyConfig

from .render import (BLADDER, BLOOD, BOWEL, BRAIN, CARTILAGE, CORD, CORTEX, CSF, DISC, FAT, JOINT_FLUID, KIDNEY,
                     LIVER, LUNG, MUSCLE, PHYSIS, RED, SKIN, SPLEEN, YELLOW, Canvas, capsule, ellipsoid,
                     paint, rotation, tissue_in)

# CDC 2000 growth charts, 50th percentile stature (cm) at whole years 3..17
_AGES = np.arange(3, 18)
_HEIGHT_BOYS = np.array([95.3, 102.5, 109.2, 115.5, 121.9, 128.0, 133.3, 138.4, 143.5, 149.1, 156.0, 163.8, 170.1,
                         173.4, 175.2])
_HEIGHT_GIRLS = np.array([94.1, 101.6, 108.4, 115.1, 121.1, 127.2, 132.6, 138.2, 144.8, 151.5, 157.1, 159.6, 161.7,
                          162.5, 162.9])


KNEE_GAP = 0.004       # of body height: femoral condyles to tibial plateau (cartilage and joint space), ~5 mm at 10 y
PATELLA_POLE = 0.008   # of body height: the patella's lower pole above the knee joint line, ~11 mm at 10 y
ELBOW_GAP = 0.003      # of body height: distal humerus to radial head, ~4 mm at 10 y


def median_height_mm(age: float, sex: str) -> float:
    table = _HEIGHT_GIRLS if sex == "F" else _HEIGHT_BOYS
    return float(np.interp(age, _AGES, table)) * 10.0


@dataclass
class LongBone:
    """Geometry of a tubular bone: proximal end P, distal end D, physis positions as fractions from P."""
    code: str
    P: np.ndarray
    D: np.ndarray
    r_shaft: float
    r_prox: float
    r_dist: float
    t_phys: tuple[float | None, float | None]
    end_scale: tuple[float, float] = (1.0, 1.0)  # axial depth of the end caps over their radius (1: hemispheres)

    @property
    def length(self) -> float:
        return float(np.linalg.norm(self.D - self.P))

    def point(self, t: float) -> np.ndarray:
        return self.P + t * (self.D - self.P)

    def radius(self, t: float | np.ndarray):
        t = np.clip(t, 0.0, 1.0)
        flare_p = np.clip(1.0 - t / 0.22, 0, 1) ** 2
        flare_d = np.clip(1.0 - (1.0 - t) / 0.22, 0, 1) ** 2
        return self.r_shaft + (self.r_prox - self.r_shaft) * flare_p + (self.r_dist - self.r_shaft) * flare_d


@dataclass
class Vertebra:
    code: str
    centre: np.ndarray      # body centre
    half_width: float
    half_depth: float
    height: float
    canal: np.ndarray       # canal centre


@dataclass
class Synchondrosis:
    """One side's ischiopubic synchondrosis (:func:`ischiopubic_synchondroses`): where it lies and how it looks."""
    side: str
    fusion_age: float
    centre: np.ndarray       # where the inferior pubic ramus meets the ischium (world mm)
    axis: np.ndarray         # unit vector along the ramus, towards the ischium
    radius: float            # the ramus's radius (mm)
    open: bool               # a cartilage plate across the ramus (before fusion)
    swollen: bool            # fusiform swelling of the fusion zone
    bright_marrow: bool      # the fusion zone's marrow bright on STIR (contrast.synchondrosis_gain)
    bright_soft_tissue: bool  # the muscle beside it too

    def as_dict(self) -> dict:
        return {"side": self.side, "fusion_age": round(self.fusion_age, 2), "open": self.open,
                "swollen": self.swollen, "bright_marrow": self.bright_marrow,
                "bright_soft_tissue": self.bright_soft_tissue}


@dataclass
class Body:
    age: float
    sex: str
    height: float
    fat: float
    red_w_diaphysis: float
    physis_open: float
    spine: str              # BodyConfig.spine: proportions of the vertebral levels (SPINE_SEGMENTS)
    apophyses: bool = True  # BodyConfig.apophyses: calcaneal, tibial-tuberosity and ischial apophyses (1.8)
    calcaneus_pitch_deg: float = 18.0  # BodyConfig.calcaneus_pitch_deg (1.8; 1.7 drew -15)
    ischiopubic: bool = True  # BodyConfig.ischiopubic_synchondrosis (1.10)
    # per side: the inferior pubic ramus (from the symphysis to the ischium, its radius) and the ischium (its top,
    # the tuberosity, its radius), where the ischiopubic synchondrosis lies (_pelvis records them)
    rami: dict[str, tuple] = field(default_factory=dict)
    synchondroses: list[Synchondrosis] = field(default_factory=list)
    long_bones: dict[str, LongBone] = field(default_factory=dict)
    vertebrae: dict[str, Vertebra] = field(default_factory=dict)
    landmarks: dict[str, float] = field(default_factory=dict)

    @property
    def H(self) -> float:
        return self.height


def sample_body(rng: np.random.Generator, cfg: BodyConfig) -> Body:
    """Age, sex, height, habitus and marrow state of one child."""
    age = float(rng.uniform(*cfg.age_years))
    sex = "F" if rng.random() < cfg.female_p else "M"
    height = median_height_mm(age, sex) * float(np.clip(rng.normal(1.0, cfg.height_sd), 0.85, 1.15))
    fat = float(rng.uniform(*cfg.fat_mm))
    closure = 15.0 if sex == "F" else 16.5
    physis_open = float(np.clip((closure + 1.0 - age) / 3.0, 0.15, 1.0))
    red_w_diaphysis = float(np.clip(1.0 - (age - 2.0) / 8.0, 0.05, 0.9))
    return Body(age, sex, height, fat, red_w_diaphysis, physis_open, cfg.spine, cfg.apophyses, cfg.calcaneus_pitch_deg,
                cfg.ischiopubic_synchondrosis)


# --------------------------------------------------------------------------------------------- shape helpers
def _marrow_weight(body: Body, t: np.ndarray, bone: LongBone, rng: np.random.Generator) -> np.ndarray:
    """Red-marrow weight along a long bone: metaphyses red longest, diaphysis converts first, epiphyses fatty."""
    tp, td = bone.t_phys
    w = np.full(t.shape, body.red_w_diaphysis, np.float32)
    meta = np.zeros(t.shape, np.float32)
    if tp is not None:
        meta = np.maximum(meta, np.clip(1.0 - (t - tp) / 0.2, 0, 1) * (t >= tp))
    if td is not None:
        meta = np.maximum(meta, np.clip(1.0 - (td - t) / 0.2, 0, 1) * (t <= td))
    red_meta = float(np.clip(1.0 - (body.age - 6.0) / 16.0, 0.3, 0.95)) * float(rng.uniform(0.6, 1.0))
    w = np.maximum(w, meta * red_meta)
    epi = np.zeros(t.shape, bool)
    if tp is not None:
        epi |= t < tp
    if td is not None:
        epi |= t > td
    w[epi] = 0.15 if body.age < 4 else 0.0
    return w


def render_long_bone(cv: Canvas, body: Body, bone: LongBone, rng: np.random.Generator,
                     cortex_mm: float | None = None) -> None:
    """Cortex, marrow (red/yellow by position and age), physes and epiphyses of a tubular bone."""
    sid = site_id(bone.code)
    rmax = max(bone.r_prox, bone.r_dist, bone.r_shaft)
    res = capsule(cv, bone.P, bone.D, rmax, rmax)
    if res is None:
        return
    b, _, t_raw, rho, _ = res
    t = np.clip(t_raw, 0, 1)
    r = bone.radius(t)
    flat = bone.end_scale != (1.0, 1.0)
    inside = _within_caps(t_raw, rho, bone, r, 0.0) if flat else rho <= r
    if not inside.any():
        return
    cortex = cortex_mm if cortex_mm is not None else max(1.6, 0.28 * bone.r_shaft)
    ends = np.minimum(t, 1 - t) * bone.length
    c = np.where(ends < 0.18 * bone.length, np.maximum(1.2, 0.35 * cortex), cortex)
    marrow = inside & (_within_caps(t_raw, rho, bone, r, c) if flat else rho <= r - c)
    paint(cv, b, inside, CORTEX, sid)
    w = _marrow_weight(body, t, bone, rng)
    paint(cv, b, marrow & (w >= 0.5), RED, None, marrow_w=w)
    paint(cv, b, marrow & (w < 0.5), YELLOW, None, marrow_w=w)
    if body.physis_open > 0.3:
        thick = physis_mm(body)
        for tp in bone.t_phys:
            if tp is None:
                continue
            dome = _dome(tp, rho, r)
            plate = np.abs((t_raw - tp + dome) * bone.length) <= thick / 2
            paint(cv, b, plate & (rho <= r - 0.6), PHYSIS, sid)
    if body.age < 6:  # unossified epiphyseal cartilage around small ossification centres
        for tp, end in zip(bone.t_phys, (0.0, 1.0)):
            if tp is None:
                continue
            epi = (t_raw < tp) if end == 0.0 else (t_raw > tp)
            core = rho <= (r - c) * (0.45 + 0.09 * body.age)
            paint(cv, b, inside & epi & ~core, CARTILAGE, sid)


def _within_caps(t_raw: np.ndarray, rho: np.ndarray, bone: LongBone, r: np.ndarray, shrink) -> np.ndarray:
    """Inside the bone's surface moved in by ``shrink`` mm, its end caps squashed along the axis to
    ``bone.end_scale`` of their radius (a flat tibial plateau or radial head, broad femoral condyles) instead of
    the hemispheres of ``rho <= r - shrink``."""
    beyond = np.where(t_raw < 0, -t_raw, np.maximum(t_raw - 1, 0)) * bone.length
    depth = np.where(t_raw < 0, bone.end_scale[0], bone.end_scale[1]) * r - shrink
    radial2 = np.maximum(rho ** 2 - beyond ** 2, 0)
    across = np.maximum(r - shrink, 1e-3)
    return radial2 / across ** 2 + beyond ** 2 / np.maximum(depth, 1e-3) ** 2 <= 1.0


def _joint_space(cv: Canvas, centre, radii) -> None:
    """Articular cartilage (intermediate on STIR) across a joint, with a thin film of fluid in its middle; the bones
    painted afterwards keep their own voxels."""
    res = ellipsoid(cv, centre, radii)
    if res:
        paint(cv, res[0], res[1], CARTILAGE, 0)
    res = ellipsoid(cv, centre, [radii[0] * 0.7, radii[1] * 0.7, 0.8])
    if res:
        paint(cv, res[0], res[1], JOINT_FLUID, 0)


def _add_long_bones(cv: Canvas, body: Body, rng: np.random.Generator, *bones: LongBone) -> None:
    """Register long bones (lesions are placed along their axes) and render them."""
    for bone in bones:
        body.long_bones[bone.code] = bone
        render_long_bone(cv, body, bone, rng)


def _ell_plate(cv: Canvas, centre, radii, rot, sid: int, red_w: float, cortex_mm: float = 1.6) -> None:
    """A flat or irregular bone as an ellipsoid: cortex shell, red/yellow marrow core."""
    res = ellipsoid(cv, centre, radii, rot)
    if res is None:
        return
    b, m, q = res
    paint(cv, b, m, CORTEX, sid)
    inner = q <= (1.0 - cortex_mm / max(1.0, float(np.min(radii)))) ** 2
    paint(cv, b, m & inner, RED if red_w >= 0.5 else YELLOW, None, marrow_w=red_w)


def _tube(cv: Canvas, pts, r: float, sid: int, red_w: float, tissue_core: int | None = None) -> None:
    """A chain of capsules (rib, ramus, phalanx): cortex with a marrow core."""
    core_t = tissue_core if tissue_core is not None else (RED if red_w >= 0.5 else YELLOW)
    for p0, p1 in zip(pts[:-1], pts[1:]):
        res = capsule(cv, p0, p1, r, r)
        if res is None:
            continue
        b, m, _, rho, _ = res
        paint(cv, b, m, CORTEX, sid)
        paint(cv, b, m & (rho <= r * 0.62), core_t, None, marrow_w=red_w)


def _plate_mm(openness: float) -> float:
    """Thickness (mm) of a growth or apophyseal plate that is ``openness`` (0..1) open."""
    return 1.6 + 1.8 * openness


def physis_mm(body: Body) -> float:
    """Thickness of the child's open long-bone growth plates: thicker the younger the child."""
    return _plate_mm(body.physis_open)


# Ages (years) from which an apophysis is ossified, around a bright cartilage plate, and at which that plate has
# fused, by sex (girls first): the calcaneal apophysis ossifies at a mean 5.2 y in girls and 7.2 y in boys and its
# fusion begins at about 11 / 13 y and is mostly complete by 14-15 y; the tibial tuberosity ossifies at about 8-11 y
# and its plate closes at 13-15 y in girls and 15-19 y in boys; the ischial tuberosity's apophysis ossifies at
# 13-16 y and fuses at 18-25 y, after every age the phantom draws. Before ossification the apophysis is cartilage,
# which the phantom does not draw (the bone's marrow reaches its surface there). A plate thins over its last three
# years (apophysis_mm), but how bright it is follows the child's long-bone growth plates (Body.physis_open, see
# contrast.synthesize): an older teenager's ischial plate is drawn dimmer than a real one.
APOPHYSIS_AGES = {"calcaneus": {"F": (5.0, 13.5), "M": (7.0, 15.5)},
                  "tibial_tuberosity": {"F": (8.5, 15.0), "M": (10.5, 17.0)},
                  "ischium": {"F": (13.0, 22.0), "M": (14.0, 23.0)}}


def apophysis_open(body: Body, which: str) -> bool:
    """Whether the child has an ossified apophysis with an open plate (always False with body.apophyses off)."""
    ossified, fused = APOPHYSIS_AGES[which][body.sex]
    return body.apophyses and ossified <= body.age < fused


def apophysis_mm(body: Body, which: str) -> float:
    """Thickness of an apophyseal plate: as a growth plate's, thinning over its last three years before fusion."""
    fused = APOPHYSIS_AGES[which][body.sex][1]
    return _plate_mm(float(np.clip((fused - body.age) / 3.0, 0.15, 1.0)))


def _dome(tp: float, rho: np.ndarray, r: np.ndarray) -> np.ndarray:
    """A long bone's growth plate bulges towards the epiphysis at its centre: the axial offset (fraction of the
    bone's length) of the plate at ``rho`` mm from the axis, as render_long_bone draws it."""
    return 0.04 * (rho / np.maximum(r, 1e-3)) ** 2 * (1 if tp > 0.5 else -1)


def _calcaneal_apophysis(cv: Canvas, body: Body, centre, radii, rot: np.ndarray, sid: int) -> None:
    """The plate between the calcaneal body and its posterior apophysis (the heel), a fifth of the bone's length
    from its back: bright on STIR in most school-age children (clinical notes: normal findings)."""
    res = ellipsoid(cv, centre, radii, rot)
    if res is None:
        return
    b, m, _ = res
    along = (b.x - centre[0]) * rot[0, 1] + (b.y - centre[1]) * rot[1, 1] + (b.z - centre[2]) * rot[2, 1]
    plate = np.abs(along + 0.62 * radii[1]) <= apophysis_mm(body, "calcaneus") / 2
    paint(cv, b, m & plate & (cv.sites[b.sl] == sid), PHYSIS, sid)


def _tibial_tuberosity(cv: Canvas, body: Body, tib: LongBone) -> None:
    """The tongue of the proximal tibial growth plate that runs down under the tuberosity (Osgood-Schlatter's
    site): a band about 4 mm under the front of the tibia, from the domed plate itself down 8% of the bone's
    length (20-30 mm), never above the plate."""
    tp = tib.t_phys[0]
    res = capsule(cv, tib.P, tib.D, tib.r_prox, tib.r_prox)
    if res is None or tp is None:
        return
    b, m, t_raw, rho, _ = res
    t, d = np.clip(t_raw, 0, 1), tib.D - tib.P
    front = b.y - (tib.P[1] + t * d[1])  # from the nearest axis point; anterior is +y
    across = np.abs(b.x - (tib.P[0] + t * d[0]))
    r = tib.radius(t_raw)
    below_plate = t_raw - (tp - _dome(tp, rho, r))  # >= 0 distal to the plate in this voxel's own column
    band = (below_plate * tib.length >= physis_mm(body) / 2) & (below_plate <= 0.08) & (across <= 0.45 * r)
    band &= np.abs(front - (r - 4.0)) <= apophysis_mm(body, "tibial_tuberosity") / 2
    sid = site_id(tib.code)
    paint(cv, b, m & band & (cv.sites[b.sl] == sid), PHYSIS, sid)


def _ischial_apophysis(cv: Canvas, body: Body, start, tub, r: float, sid: int) -> None:
    """The ischial tuberosity's apophysis, where the hamstrings attach: a curved plate about 4.5 mm under the
    bone's surface where it faces backwards and down, over the ischium's last radius and its rounded end (a bright
    crescent on STIR, not a band across the bone)."""
    res = capsule(cv, start, tub, r, r)
    if res is None:
        return
    b, m, t_raw, rho, _ = res
    start, tub = np.asarray(start, np.float32), np.asarray(tub, np.float32)
    d = tub - start
    t = np.clip(t_raw, 0.0, 1.0)
    out_y = b.y - (start[1] + t * d[1])  # from the nearest axis point outwards
    out_z = b.z - (start[2] + t * d[2])
    facing = (-out_y - out_z) >= np.maximum(rho, 1e-3)  # within 45 degrees of backwards-and-down
    near_end = (1.0 - t_raw) * float(np.linalg.norm(d)) <= r
    shell = np.abs((r - rho) - 4.5) <= apophysis_mm(body, "ischium") / 2
    paint(cv, b, m & shell & facing & near_end & (cv.sites[b.sl] == sid), PHYSIS, sid)


# The ischiopubic synchondrosis, the cartilage joint between the inferior pubic ramus and the ischium, fuses between 4
# and 9 years in girls and between 7 and 13 in boys (CT of 184 children, most often at 7-10; Clin Anat 2019), often
# one side before the other. Around its fusion it is a classic mimic of osteomyelitis on MRI: of 28 children of 4-16
# years (Herneth et al. 2000), 61% showed it, with the fusion zone bright on STIR or T2 FS (74-89% of those),
# fusiform swelling (68%) and bright adjacent soft tissue (57%).
ISC_FUSION_AGES = {"F": (4.0, 9.0), "M": (7.0, 13.0)}
ISC_FLARE_YEARS = (2.5, 1.5)  # how long before and after its fusion the fusion zone can be swollen and bright
ISC_SWELLING_P, ISC_MARROW_P, ISC_SOFT_TISSUE_P = 0.68, 0.8, 0.57  # within that window (Herneth et al.)


def ischiopubic_synchondroses(cv: Canvas, body: Body, rng: np.random.Generator) -> None:
    """Draw both ischiopubic synchondroses (:data:`ISC_FUSION_AGES`): a cartilage plate across the ramus where it
    meets the ischium while open, and around fusion a fusiform swelling; the bright marrow and muscle are drawn with
    the contrast (``contrast.synchondrosis_gain``). Each side fuses at its own age, near the other's. Every draw is
    made whatever the child's age, so a child's draws do not depend on it."""
    lo, hi = ISC_FUSION_AGES[body.sex]
    base = rng.uniform(lo, hi)
    for side in ("right", "left"):
        fusion = float(np.clip(base + rng.normal(0.0, 0.75), lo - 0.5, hi + 0.5))
        u_swell, u_marrow, u_soft = rng.random(3)
        near_fusion = fusion - ISC_FLARE_YEARS[0] <= body.age < fusion + ISC_FLARE_YEARS[1]
        sym, end, r, isch_top, tub, r_isch = body.rami[side]
        axis = (end - sym) / np.linalg.norm(end - sym)
        # the junction: the first point of the ramus, from the symphysis, within the ischium's radius of its axis
        steps = np.linspace(0.0, float(np.linalg.norm(end - sym)), 200)
        pts = sym + steps[:, None] * axis
        d = isch_top - tub
        t = np.clip((pts - tub) @ d / float(d @ d), 0.0, 1.0)
        inside = np.linalg.norm(pts - (tub + t[:, None] * d), axis=1) <= r_isch
        centre = pts[int(np.argmax(inside))] if inside.any() else end
        sc = Synchondrosis(side, fusion, centre, axis, r, open=body.age < fusion,
                           swollen=bool(near_fusion and u_swell < ISC_SWELLING_P),
                           bright_marrow=bool(near_fusion and u_marrow < ISC_MARROW_P),
                           bright_soft_tissue=bool(near_fusion and u_soft < ISC_SOFT_TISSUE_P))
        _draw_synchondrosis(cv, body, sc)
        body.synchondroses.append(sc)


def _draw_synchondrosis(cv: Canvas, body: Body, sc: Synchondrosis) -> None:
    """The swelling (a spindle of 1.4x the ramus's radius over 2.5 radii each way, pubis on the symphysis's side
    of the plate and ischium beyond) and, while open, the plate across it (growth-plate thickness, its site kept)."""
    s = sc.side
    pid, iid = site_id(f"pubis_{s}"), site_id(f"ischium_{s}")
    reach = 2.5 * sc.radius
    if sc.swollen:
        for sign, sid in ((-1.0, pid), (1.0, iid)):
            res = capsule(cv, sc.centre, sc.centre + sign * reach * sc.axis, 1.4 * sc.radius, sc.radius)
            if res is None:
                continue
            b, m, _, rho, rad = res
            paint(cv, b, m & (cv.sites[b.sl] == 0), CORTEX, sid)  # outside any bone: the ramus keeps its sites
            paint(cv, b, m & (rho <= rad - 1.6) & tissue_in(cv.sites[b.sl], (pid, iid)), RED, None, marrow_w=0.8)
    if sc.open:
        half = 0.5 * _plate_mm(1.0) if body.age < sc.fusion_age - 2 else 0.5 * _plate_mm(0.3)
        res = capsule(cv, sc.centre - half * sc.axis, sc.centre + half * sc.axis, 1.4 * sc.radius, 1.4 * sc.radius)
        if res is not None:
            b, m, t_raw, _, _ = res
            plate = m & (t_raw >= 0) & (t_raw <= 1) & tissue_in(cv.sites[b.sl], (pid, iid))
            paint(cv, b, plate, PHYSIS, None)


# --------------------------------------------------------------------------------------------- the body plan
def landmarks(body: Body, rng: np.random.Generator, cfg: BodyConfig) -> dict[str, float]:
    H, a = body.H, body.age
    head_frac = float(np.interp(a, [3, 17], [0.195, 0.135]))
    hip_frac = float(np.interp(a, [3, 17], [0.435, 0.505]))
    L = dict(
        head_h=head_frac * H,
        z_vertex=H,
        z_chin=H * (1 - head_frac),
        z_sh=H * (1 - head_frac) - 0.048 * H,
        z_hip=hip_frac * H,
        z_ankle=0.048 * H,
        sh_hw=0.112 * H,
        hip_hw=0.056 * H,
        arm_abd=np.radians(rng.uniform(*cfg.arm_abduction_deg)),
        leg_abd=np.radians(rng.uniform(*cfg.leg_abduction_deg)),
        jit=np.radians(cfg.pose_jitter_deg),
    )
    L["z_knee"] = L["z_ankle"] + 0.45 * (L["z_hip"] - L["z_ankle"])
    L["z_diaph"] = L["z_hip"] + 0.52 * (L["z_sh"] - L["z_hip"])
    L["z_c7"] = L["z_sh"] + 0.012 * H
    L["z_c1"] = L["z_chin"] + 0.35 * L["head_h"]
    L["z_coccyx"] = L["z_hip"] - 0.03 * H
    return L


def torso_ellipse(body: Body, L: dict[str, float], z: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Lean (muscle envelope) half-width, half-depth and centre y of the trunk at heights z."""
    H = body.H
    u = (z - (L["z_hip"] - 0.035 * H)) / (L["z_sh"] + 0.01 * H - (L["z_hip"] - 0.035 * H))
    us = [0.0, 0.15, 0.32, 0.5, 0.68, 0.85, 1.0]
    a = np.interp(u, us, [0.080, 0.092, 0.080, 0.074, 0.084, 0.088, 0.080]) * H
    b = np.interp(u, us, [0.052, 0.060, 0.056, 0.052, 0.058, 0.058, 0.046]) * H
    return a, b, np.zeros_like(a)


def spine_y(body: Body, L: dict[str, float], z: float) -> float:
    """y of the vertebral body centres: cervical lordosis, thoracic kyphosis, lumbar lordosis, sacrum behind."""
    H = body.H
    zs = [L["z_coccyx"], L["z_hip"] + 0.02 * H, L["z_hip"] + 0.09 * H, L["z_diaph"], L["z_c7"], L["z_c1"]]
    ys = [-0.058, -0.040, -0.012, -0.030, -0.018, -0.008]
    return float(np.interp(z, zs, ys)) * H


# Height of each level's segment (its vertebral body and the disc below it) relative to the mean thoracic
# segment, and the disc's share of the segment, C1..L5. "graded" follows typical spinal morphometry: cervical bodies
# about 14 mm with 5-6 mm discs; thoracic bodies growing from about 15 mm (T1) to 23 mm (T12) with 4-6 mm discs;
# lumbar bodies 25-27 mm with 9-12 mm discs (so the lumbar spine is about 30% of C1-L5, the thoracic about 48%).
# "uniform" is generators 1.0-1.5's: every thoracic level alike and every disc a quarter of its level.
SPINE_SEGMENTS = {
    "graded": (np.r_[[0.8] * 7, np.linspace(0.78, 1.22, 12), np.linspace(1.45, 1.6, 5)],
               np.r_[[0.24] * 7, np.linspace(0.18, 0.22, 12), [0.27] * 5]),
    "uniform": (np.r_[[0.75] * 7, [1.0] * 12, [1.25] * 5], np.full(24, 0.24)),
}


def spine_levels(body: Body, L: dict[str, float]) -> list[tuple[str, float, float, float]]:
    """(code, z centre, level height, the disc's share of it) for C1..L5, top to bottom."""
    z_top, z_l5 = L["z_c1"], L["z_hip"] + 0.07 * body.H
    weights, disc_share = SPINE_SEGMENTS[body.spine]
    unit = (z_top - z_l5) / weights.sum()
    out, z = [], z_top
    for code, w, d in zip(VERTEBRAL_LEVELS, weights, disc_share):
        h = float(w) * unit
        out.append((code, z - h / 2, h, float(d)))
        z -= h
    return out


def build_skeleton(cv: Canvas, body: Body, rng: np.random.Generator, cfg: BodyConfig) -> None:
    """Render soft tissue envelope, organs and every bone of sites.tsv onto the canvas."""
    L = landmarks(body, rng, cfg)
    body.landmarks = {k: float(v) for k, v in L.items()}
    _soft_tissue(cv, body, L, rng)
    _head(cv, body, L, rng)
    _spine(cv, body, L, rng)
    _pelvis(cv, body, L, rng)
    _thorax(cv, body, L, rng)
    for side in ("right", "left"):
        _leg(cv, body, L, side, rng)
        _arm(cv, body, L, side, rng)


def _sgn(side: str) -> float:
    return 1.0 if side == "right" else -1.0


def _soft_tissue(cv: Canvas, body: Body, L, rng) -> None:
    H, fat = body.H, body.fat
    # trunk (outer fat envelope, then muscle)
    z0, z1 = L["z_hip"] - 0.06 * H, L["z_sh"] + 0.02 * H
    for grow, tissue in ((fat + 1.5, SKIN), (fat, FAT), (0.0, MUSCLE)):
        b = cv.box(np.array([-0.2 * H, -0.15 * H, z0]), np.array([0.2 * H, 0.15 * H, z1]))
        a, bb, yc = torso_ellipse(body, L, b.z)
        belly = 1.0 + 0.4 * np.clip((b.z - L["z_hip"]) / (0.2 * H), 0, 1) * np.clip((L["z_diaph"] - b.z) / (0.1 * H), 0, 1)
        m = (b.x / (a + grow)) ** 2 + ((b.y - yc) / (bb + grow * belly)) ** 2 <= 1.0
        paint(cv, b, m, tissue)
    # neck and head envelope
    for grow, tissue in ((fat * 0.5 + 1.5, SKIN), (fat * 0.5, FAT), (0.0, MUSCLE)):
        res = capsule(cv, [0, -0.01 * H, L["z_sh"] - 0.01 * H], [0, -0.005 * H, L["z_chin"] + 0.04 * H],
                      0.034 * H + grow, 0.03 * H + grow)
        if res:
            paint(cv, res[0], res[1], tissue)
    # limbs: thighs, calves, feet, arms
    for side in ("right", "left"):
        s = _sgn(side)
        hip = np.array([s * L["hip_hw"], 0.0, L["z_hip"]])
        knee = hip + (L["z_hip"] - L["z_knee"]) * np.array([s * np.sin(L["leg_abd"]), 0.0, -1.0])
        ankle = knee + (L["z_knee"] - L["z_ankle"]) * np.array([s * np.sin(L["leg_abd"]) * 0.5, 0.0, -1.0])
        sh = np.array([s * (L["sh_hw"] - 0.02 * H), -0.005 * H, L["z_sh"] - 0.02 * H])
        d1 = np.array([s * np.sin(L["arm_abd"]), 0.0, -np.cos(L["arm_abd"])])
        elbow = sh + 0.19 * H * d1
        wrist = elbow + 0.15 * H * np.array([s * np.sin(L["arm_abd"] * 0.5), 0.02, -1.0])
        hand = wrist + np.array([0, 0.005 * H, -0.09 * H])
        segs = [(hip + np.array([-s * 0.01 * H, 0, 0.01 * H]), knee, 0.055 * H, 0.036 * H),
                (knee, ankle, 0.034 * H, 0.019 * H),
                (ankle + np.array([0, -0.02 * H, -0.03 * H]), ankle + np.array([0, 0.10 * H, -0.035 * H]), 0.022 * H, 0.018 * H),
                (sh, elbow, 0.028 * H, 0.021 * H), (elbow, wrist, 0.021 * H, 0.014 * H),
                (wrist, hand, 0.016 * H, 0.012 * H)]
        for grow_f, tissue in ((1.0, SKIN), (1.0, FAT), (0.0, MUSCLE)):
            for p0, p1, r0, r1 in segs:
                grow = grow_f * (fat * 0.8 + (1.5 if tissue == SKIN else 0.0))
                res = capsule(cv, p0, p1, r0 + grow, r1 + grow)
                if res:
                    paint(cv, res[0], res[1], tissue)
        body.landmarks.update({f"knee_{side}": knee.tolist(), f"ankle_{side}": ankle.tolist(),
                               f"hip_{side}": hip.tolist(), f"shoulder_{side}": sh.tolist(),
                               f"elbow_{side}": elbow.tolist(), f"wrist_{side}": wrist.tolist()})
    _organs(cv, body, L, rng)


def _organs(cv: Canvas, body: Body, L, rng) -> None:
    H = body.H
    zd, zs, zh = L["z_diaph"], L["z_sh"], L["z_hip"]
    inside_trunk = cv.tissue == MUSCLE
    for s in (1, -1):  # lungs
        res = ellipsoid(cv, [s * 0.045 * H, -0.008 * H, zd + 0.5 * (zs - zd)], [0.038 * H, 0.045 * H, 0.5 * (zs - zd) + 0.01 * H])
        if res:
            paint(cv, res[0], res[1], LUNG, where=inside_trunk[res[0].sl])
    organs = [
        ([-0.012 * H, 0.016 * H, zd + 0.05 * H], [0.036 * H, 0.032 * H, 0.045 * H], BLOOD),          # heart
        ([0.035 * H, 0.0, zd - 0.025 * H], [0.062 * H, 0.045 * H, 0.042 * H], LIVER),
        ([-0.055 * H, -0.022 * H, zd - 0.02 * H], [0.02 * H, 0.03 * H, 0.032 * H], SPLEEN),
        ([0.036 * H, -0.03 * H, zd - 0.075 * H], [0.018 * H, 0.016 * H, 0.03 * H], KIDNEY),
        ([-0.036 * H, -0.03 * H, zd - 0.07 * H], [0.018 * H, 0.016 * H, 0.03 * H], KIDNEY),
        ([0.0, 0.018 * H, zh + 0.11 * H], [0.065 * H, 0.035 * H, 0.07 * H], BOWEL),
        ([0.045 * H, 0.02 * H, zd - 0.05 * H], [0.01 * H, 0.01 * H, 0.018 * H], BLADDER),          # gallbladder
    ]
    fill = rng.uniform(0.5, 1.0)
    organs.append(([0.0, 0.028 * H, zh - 0.008 * H], [0.03 * H * fill, 0.024 * H * fill, 0.026 * H * fill], BLADDER))
    for c, r, tissue in organs:
        res = ellipsoid(cv, c, r)
        if res:
            paint(cv, res[0], res[1], tissue, where=(cv.tissue[res[0].sl] != FAT) & (cv.tissue[res[0].sl] != SKIN))
    # great vessels: aorta and IVC along the spine, femoral vessels down the thighs
    for x in (-0.012 * H, 0.014 * H):
        res = capsule(cv, [x, spine_y(body, L, zd) + 0.032 * H, zd + 0.06 * H],
                      [x, spine_y(body, L, zh + 0.09 * H) + 0.03 * H, zh + 0.09 * H], 0.007 * H, 0.006 * H)
        if res:
            paint(cv, res[0], res[1], BLOOD)
    for side in ("right", "left"):
        hip, knee = np.array(body.landmarks[f"hip_{side}"]), np.array(body.landmarks[f"knee_{side}"])
        off = np.array([-_sgn(side) * 0.012 * H, 0.012 * H, 0])
        res = capsule(cv, hip + off + [0, 0, 0.02 * H], knee + off * 0.3 + [0, -0.02 * H, 0.02 * H], 0.0045 * H, 0.0035 * H)
        if res:
            paint(cv, res[0], res[1], BLOOD)


def _spine(cv: Canvas, body: Body, L, rng) -> None:
    H = body.H
    levels = spine_levels(body, L)
    for i, (code, z, h, disc_share) in enumerate(levels):
        reg = code.split("_")[1][0]
        hw = {"C": 0.0095, "T": 0.0135, "L": 0.0185}[reg] * H * (1 + 0.02 * i if reg == "T" else 1)
        hd = {"C": 0.0085, "T": 0.0125, "L": 0.0145}[reg] * H
        y = spine_y(body, L, z)
        canal_r = {"C": 0.0065, "T": 0.0052, "L": 0.0058}[reg] * H
        canal = np.array([0.0, y - hd - canal_r * 0.9, z])
        bh = (1 - disc_share) * h
        v = Vertebra(code, np.array([0.0, y, z]), hw, hd, (1 - disc_share + 0.02) * h, canal)
        body.vertebrae[code] = v
        sid = site_id(code)
        # disc below the body
        res = capsule(cv, [0, y, z - bh / 2 - disc_share * h], [0, y, z - bh / 2 + 0.01], hd, hd)
        if res:
            b, m, _, rho, _ = res
            paint(cv, b, ((b.x / hw) ** 2 + ((b.y - y) / hd) ** 2 <= 1) & m, DISC)
        # body: elliptic cylinder with thin cortex and red marrow
        b = cv.box(np.array([-hw, y - hd, z - bh / 2]), np.array([hw, y + hd, z + bh / 2]))
        if b is not None:
            q = (b.x / hw) ** 2 + ((b.y - y) / hd) ** 2
            zin = np.abs(b.z - z) <= bh / 2
            paint(cv, b, (q <= 1) & zin, CORTEX, sid)
            paint(cv, b, (q <= 0.72) & (np.abs(b.z - z) <= bh / 2 - 1.2), RED, None, marrow_w=0.9)
            if body.physis_open > 0.3:  # ring apophyses / endplates: bright in children
                paint(cv, b, (q <= 0.9) & (np.abs(np.abs(b.z - z) - (bh / 2 - 1.0)) <= 0.9), PHYSIS, sid)
        # posterior elements: arch around the canal, spinous and transverse processes
        ro = canal_r + 0.32 * hd
        b = cv.box(canal - [ro, ro, 0.35 * h], canal + [ro, ro, 0.35 * h])
        if b is not None:
            rr = np.sqrt(b.x ** 2 + (b.y - canal[1]) ** 2)
            arch = (rr <= ro) & (rr >= canal_r) & (np.abs(b.z - z) <= 0.35 * h)
            paint(cv, b, arch, CORTEX, sid)
            paint(cv, b, arch & (rr >= canal_r + 1.2) & (rr <= ro - 1.2), RED, None, marrow_w=0.8)
        tip = canal + np.array([0, -ro - 1.1 * hd, -0.25 * h])
        _tube(cv, [canal + [0, -ro + 1, 0], tip], max(1.6, 0.22 * hd), sid, 0.8)
        for s in (1, -1):
            _tube(cv, [canal + [s * ro * 0.8, 0, 0], canal + [s * (ro + 0.9 * hw), 0.2 * hd, 0.05 * h]],
                  max(1.5, 0.18 * hd), sid, 0.8)
    # canal: CSF with the cord down to L1
    top, bottom = body.vertebrae["vertebra_C1"], body.vertebrae["vertebra_L5"]
    chain = [body.vertebrae[c].canal for c, *_ in levels]
    cord_end = list(body.vertebrae).index("vertebra_L1")
    for i, (p0, p1) in enumerate(zip(chain[:-1], chain[1:])):
        cr = 0.8 * min(0.0058 * H, 0.5 * np.linalg.norm(p1 - p0) + 3)
        res = capsule(cv, p0, p1, cr, cr)
        if res:
            paint(cv, res[0], res[1], CSF, 0)
        if i < cord_end:
            res = capsule(cv, p0, p1, 0.5 * cr, 0.5 * cr)
            if res:
                paint(cv, res[0], res[1], CORD, 0)
    res = capsule(cv, top.canal, top.canal + [0, 0.01 * H, 0.05 * H], 0.006 * H, 0.006 * H)
    if res:
        paint(cv, res[0], res[1], CSF, 0)
    del bottom


def _pelvis(cv: Canvas, body: Body, L, rng) -> None:
    H = body.H
    zh = L["z_hip"]
    sacrum_pts = []
    y_top = spine_y(body, L, zh + 0.065 * H)
    for k, f in enumerate(np.linspace(0, 1, 6)):
        z = zh + 0.06 * H - f * 0.095 * H
        y = y_top - 0.012 * H * np.sin(f * np.pi * 0.9) - 0.02 * H * f
        sacrum_pts.append((np.array([0.0, y, z]), (0.038 - 0.03 * f) * H, (0.014 - 0.007 * f) * H))
    sid = site_id("sacrum")
    for c, hw, hd in sacrum_pts:
        _ell_plate(cv, c, [hw, hd, 0.012 * H], None, sid, 0.85)
    body.landmarks["sacrum"] = sacrum_pts[1][0].tolist()
    r_head = 0.0115 * H
    for side in ("right", "left"):
        s = _sgn(side)
        hip = np.array(body.landmarks[f"hip_{side}"])
        # ilium: a tilted wing from the sacroiliac joint to the crest, plus the acetabular roof
        rot = rotation([0, 0, 1], s * np.radians(35)) @ rotation([0, 1, 0], -s * np.radians(18))
        wing_c = np.array([s * 0.058 * H, -0.02 * H, zh + 0.062 * H])
        _ell_plate(cv, wing_c, [0.010 * H, 0.052 * H, 0.052 * H], rot, site_id(f"ilium_{side}"), 0.8)
        _ell_plate(cv, hip + [-s * 0.004 * H, -0.004 * H, 0.016 * H], [0.02 * H, 0.02 * H, 0.016 * H], None,
                   site_id(f"ilium_{side}"), 0.8)
        if body.physis_open > 0.3:  # iliac crest apophysis
            res = ellipsoid(cv, wing_c, [0.0105 * H, 0.053 * H, 0.053 * H], rot)
            if res:
                b, m, _ = res
                paint(cv, b, m & (b.z > wing_c[2] + 0.044 * H), PHYSIS, site_id(f"ilium_{side}"))
        # ischium: from the acetabulum down and back to the tuberosity
        tub = np.array([s * 0.042 * H, -0.028 * H, zh - 0.055 * H])
        isch_top = hip + [-s * 0.006 * H, -0.012 * H, -0.008 * H]
        _tube(cv, [isch_top, tub], 0.012 * H, site_id(f"ischium_{side}"), 0.8)
        if apophysis_open(body, "ischium"):
            _ischial_apophysis(cv, body, isch_top, tub, 0.012 * H, site_id(f"ischium_{side}"))
        # pubis: superior ramus to the symphysis, inferior ramus back to the ischium
        sym = np.array([s * 0.009 * H, 0.038 * H, zh - 0.028 * H])
        pid = site_id(f"pubis_{side}")
        _tube(cv, [hip + [-s * 0.01 * H, 0.012 * H, -0.004 * H], sym], 0.0085 * H, pid, 0.8)
        ramus = (sym + [0, -0.004 * H, -0.008 * H], tub + [-s * 0.004 * H, 0.012 * H, 0.004 * H], 0.0065 * H)
        _tube(cv, list(ramus[:2]), ramus[2], pid, 0.8)
        body.rami[side] = (*ramus, isch_top, tub, 0.012 * H)
        # joint: cartilage shell and the triradiate cartilage of the open acetabulum
        res = ellipsoid(cv, hip, [r_head + 2.2] * 3)
        if res:
            paint(cv, res[0], res[1], CARTILAGE, 0)
        if body.age < 14:
            for d in ([-s, 0, 1.2], [-s * 0.6, 1, -1], [-s * 0.6, -1, -1]):
                d = np.array(d, float) / np.linalg.norm(d)
                _tube(cv, [hip + d * (r_head + 2), hip + d * (r_head + 2 + 0.015 * H)], 1.5, site_id(f"ilium_{side}"),
                      0.8, tissue_core=PHYSIS)
        # sacroiliac joint: a thin cartilage band between sacrum ala and ilium
        si = np.array([s * 0.033 * H, sacrum_pts[1][0][1] - 0.002 * H, zh + 0.045 * H])
        res = ellipsoid(cv, si, [1.8, 0.012 * H, 0.022 * H], rotation([0, 0, 1], s * np.radians(25)))
        if res:
            paint(cv, res[0], res[1], CARTILAGE, 0)


def _thorax(cv: Canvas, body: Body, L, rng) -> None:
    H = body.H
    tlev = [(c, v) for c, v in body.vertebrae.items() if c.startswith("vertebra_T")]
    z_top = tlev[1][1].centre[2]
    z_bot = tlev[8][1].centre[2]
    a_front, b_front, _ = torso_ellipse(body, L, np.array([0.5 * (z_top + z_bot)]))
    y_front = float(b_front[0]) - 0.006 * H
    sid = site_id("sternum")
    _ell_plate(cv, [0, y_front, z_top - 0.01 * H], [0.02 * H, 0.0055 * H, 0.022 * H], None, sid, 0.9)
    _ell_plate(cv, [0, y_front + 0.002 * H, 0.5 * (z_top + z_bot) - 0.02 * H],
               [0.013 * H, 0.0052 * H, 0.5 * (z_top - z_bot) - 0.005 * H], None, sid, 0.9)
    body.landmarks["sternum_top"] = [0.0, y_front, z_top + 0.01 * H]
    # ribs follow the inner chest wall and descend anteriorly
    for k, (code, v) in enumerate(tlev, start=1):
        z0 = v.centre[2]
        theta_end = {1: 2.75, 2: 2.8, 3: 2.85, 4: 2.85, 5: 2.85, 6: 2.8, 7: 2.75, 8: 2.45, 9: 2.25, 10: 2.05,
                     11: 1.6, 12: 1.15}[k]
        r = max(1.8, 0.0034 * H)
        for side in ("right", "left"):
            s = _sgn(side)
            pts = []
            for th in np.linspace(0.32, theta_end, 9):
                z = z0 - 0.045 * H * (th - 0.32) / 2.5 * (0.5 if k < 3 else 1.0)
                a, bb, _ = torso_ellipse(body, L, np.array([z]))
                shrink = 0.55 + 0.45 * min(1.0, k / 4)
                pts.append(np.array([s * (float(a[0]) - 0.006 * H) * np.sin(th) * shrink,
                                     -(float(bb[0]) - 0.008 * H) * np.cos(th), z]))
            pts[0] = np.array([s * (v.half_width + 0.8 * r), v.canal[1] + 0.3 * v.half_depth, z0])
            _tube(cv, pts, r, site_id(f"ribs_{side}"), 0.85)
            if k <= 10:  # costal cartilage to the sternum
                end = pts[-1]
                _tube(cv, [end, np.array([s * 0.014 * H, y_front, end[2] + (0.02 * H if k > 7 else 0.004 * H)])],
                      r * 0.9, 0, 0.0, tissue_core=CARTILAGE)
            # clavicle and scapula
    z_clav = z_top + 0.012 * H
    for side in ("right", "left"):
        s = _sgn(side)
        sh = np.array(body.landmarks[f"shoulder_{side}"])
        med = np.array([s * 0.016 * H, y_front - 0.004 * H, z_clav])
        lat = np.array([sh[0] - s * 0.008 * H, sh[1] - 0.006 * H, sh[2] + 0.022 * H])
        bone = LongBone(f"clavicle_{side}", med, lat, 0.0042 * H, 0.0062 * H, 0.0052 * H, (0.05, None))
        _add_long_bones(cv, body, rng, bone)
        scap = site_id(f"scapula_{side}")
        a_s, b_s, _ = torso_ellipse(body, L, np.array([z_top - 0.04 * H]))
        c = np.array([s * 0.062 * H, -float(b_s[0]) + 0.012 * H, z_top - 0.035 * H])
        rot = rotation([0, 0, 1], -s * np.radians(28))
        _ell_plate(cv, c, [0.036 * H, 0.0048 * H, 0.046 * H], rot, scap, 0.7, cortex_mm=1.2)
        glen = sh + np.array([-s * 0.016 * H, -0.004 * H, 0.0])
        _tube(cv, [c + [s * 0.02 * H, 0.004 * H, 0.025 * H], glen], 0.009 * H, scap, 0.7)
        _tube(cv, [c + [-s * 0.02 * H, 0, 0.03 * H], lat + [0, -0.008 * H, 0.002 * H]], 0.0055 * H, scap, 0.7)


def _head(cv: Canvas, body: Body, L, rng) -> None:
    H, a = body.H, body.age
    hh = L["head_h"]
    w = float(np.interp(a, [3, 17], [134, 150]))
    ln = float(np.interp(a, [3, 17], [165, 188]))
    # cranium: vertex down to the foramen magnum (just above C1); the face hangs below it, in front of the spine
    c = np.array([0.0, -0.004 * H, H - 0.34 * hh])
    radii = np.array([w / 2, ln / 2, 0.35 * hh])
    face_c = np.array([0.0, c[1] + 0.2 * ln, H - 0.8 * hh])
    face_r = np.array([0.48 * w, 0.36 * ln, 0.26 * hh])
    thick = float(np.interp(a, [3, 17], [3.5, 6.5]))
    for grow, tissue in ((body.fat * 0.25 + 2.5, SKIN), (body.fat * 0.25 + 1.0, FAT)):
        for cc, rr in ((c, radii), (face_c, face_r)):
            res = ellipsoid(cv, cc, rr + grow)
            if res:
                paint(cv, res[0], res[1], tissue)
    res = ellipsoid(cv, face_c, face_r)
    if res:  # the soft tissues of the face (muscles of mastication, tongue, glands)
        paint(cv, res[0], res[1], MUSCLE)
    res = capsule(cv, [0, 0.02 * H, L["z_chin"] + 0.02 * H], [0, 0.0, c[2] - 0.1 * hh], 0.026 * H, 0.04 * H)
    if res:
        paint(cv, res[0], res[1], MUSCLE, where=cv.tissue[res[0].sl] == 0)
    sid = site_id("skull")
    res = ellipsoid(cv, c, radii)
    if res:
        b, m, q = res
        paint(cv, b, m, CORTEX, sid)
        inner = q <= (1 - thick / radii.min()) ** 2
        diploe = (q <= (1 - 0.3 * thick / radii.min()) ** 2) & ~((q <= (1 - 0.7 * thick / radii.min()) ** 2))
        paint(cv, b, m & diploe, RED if a < 10 else YELLOW, None, marrow_w=0.6 if a < 10 else 0.3)
        paint(cv, b, m & inner, CSF, 0)
        paint(cv, b, q <= (1 - (thick + 2.5) / radii.min()) ** 2, BRAIN, 0)
        for s in (1, -1):  # lateral ventricles
            r2 = ellipsoid(cv, c + [s * 0.012 * hh, 0, 0.03 * hh], [0.03 * hh, 0.12 * hh, 0.05 * hh])
            if r2:
                paint(cv, r2[0], r2[1], CSF, 0)
    # skull base and facial bones (maxilla): a marrow-bearing block under the front of the cranium, above the
    # mandible, counted as skull (v1.0 put it under the chin, in the neck: fixed in phantom 1.1)
    _ell_plate(cv, [0.0, c[1] + 0.2 * ln, H - 0.7 * hh], [0.3 * w, 0.2 * ln, 0.08 * hh], None, sid, 0.5)
    # mandible: a U-shaped bar with rami
    mid = site_id("mandible")
    chin = np.array([0.0, c[1] + 0.42 * ln, L["z_chin"] + 0.045 * hh])
    pts = [np.array([s * 0.33 * w, c[1] + 0.02 * ln, chin[2] + 0.28 * hh]) for s in (1, -1)]
    angle = [np.array([s * 0.34 * w, c[1] + 0.05 * ln, chin[2] + 0.02 * hh]) for s in (1, -1)]
    body_pts = [angle[0], np.array([0.24 * w, c[1] + 0.3 * ln, chin[2]]), chin,
                np.array([-0.24 * w, c[1] + 0.3 * ln, chin[2]]), angle[1]]
    _tube(cv, body_pts, 0.045 * hh, mid, 0.5)
    for p, q in zip(pts, angle):
        _tube(cv, [q, p], 0.035 * hh, mid, 0.5)


def _leg(cv: Canvas, body: Body, L, side: str, rng) -> None:
    H = body.H
    s = _sgn(side)
    hip = np.array(body.landmarks[f"hip_{side}"])
    knee = np.array(body.landmarks[f"knee_{side}"])
    ankle = np.array(body.landmarks[f"ankle_{side}"])
    r_head = 0.0115 * H
    # femur: head, neck, shaft with distal condyles
    top = hip + np.array([s * 0.032 * H, -0.004 * H, -0.012 * H])
    # the knee joint line is the knee landmark: femoral condyles (caps at 0.45 of their radius) end KNEE_GAP / 2
    # above it, the flat tibial plateau (0.25) KNEE_GAP / 2 below; generators before 1.4 drew hemispheres whose
    # tibial dome reached 0.011 H into the femur
    condyles, depth = 0.0155 * H, 0.45  # radius and relative depth of the distal cap
    fem = LongBone(f"femur_{side}", top, knee + [0, 0, KNEE_GAP / 2 * H + depth * condyles], 0.0075 * H, 0.0115 * H,
                   condyles, (0.035, 0.93), end_scale=(1.0, depth))
    _add_long_bones(cv, body, rng, fem)
    fid = site_id(fem.code)
    neck_end = fem.point(0.09)
    res = capsule(cv, hip, neck_end, 0.0068 * H, 0.0085 * H)
    if res:
        b, m, t_raw, rho, r = res
        paint(cv, b, m, CORTEX, fid)
        paint(cv, b, m & (rho <= r - 1.5), RED, None, marrow_w=0.7)
    res = ellipsoid(cv, hip, [r_head] * 3)
    if res:
        b, m, q = res
        paint(cv, b, m, CORTEX, fid)
        paint(cv, b, m & (q <= 0.8), YELLOW if body.age > 4 else CARTILAGE, None, marrow_w=0.1)
        if body.physis_open > 0.3:  # capital femoral physis: a plate across the neck base of the head
            n = (neck_end - hip) / np.linalg.norm(neck_end - hip)
            d = (b.x - hip[0]) * n[0] + (b.y - hip[1]) * n[1] + (b.z - hip[2]) * n[2]
            paint(cv, b, m & (np.abs(d - 0.55 * r_head) <= 1.6), PHYSIS, fid)
    # articular cartilage and a film of joint fluid between the bones (and an effusion sometimes, see contrast)
    _joint_space(cv, knee, [0.016 * H, 0.014 * H, KNEE_GAP / 2 * H + 1.0])
    # tibia and fibula
    plateau, depth = 0.0145 * H, 0.25
    tib = LongBone(f"tibia_{side}", knee - [0, 0, KNEE_GAP / 2 * H + depth * plateau], ankle + [0, 0, 0.003 * H],
                   0.0062 * H, plateau, 0.0095 * H, (0.055, 0.955), end_scale=(depth, 1.0))
    fib = LongBone(f"fibula_{side}", knee + [s * 0.011 * H, -0.006 * H, -0.012 * H],
                   ankle + [s * 0.012 * H, -0.004 * H, -0.006 * H], 0.0026 * H, 0.0042 * H, 0.0042 * H, (0.05, 0.94))
    # patella in front of the distal femur, its lower pole PATELLA_POLE above the joint line (extended knee;
    # generators before 1.4 put the lower pole on the joint line)
    _ell_plate(cv, knee + [0, 0.0195 * H, (PATELLA_POLE + 0.009) * H], [0.0085 * H, 0.0045 * H, 0.009 * H], None,
               site_id(f"patella_{side}"), 0.0 if body.age > 5 else 0.3)
    _add_long_bones(cv, body, rng, tib, fib)
    if apophysis_open(body, "tibial_tuberosity"):
        _tibial_tuberosity(cv, body, tib)
    _foot(cv, body, ankle, side, rng)


def _foot(cv: Canvas, body: Body, ankle: np.ndarray, side: str, rng) -> None:
    H = body.H
    s = _sgn(side)
    fw = 0.025 * H
    sole = 0.004 * H
    red = 0.2 if body.age < 8 else 0.05
    _ell_plate(cv, ankle + [0, 0.002 * H, -0.014 * H], [0.011 * H, 0.013 * H, 0.008 * H], None,
               site_id(f"talus_{side}"), red)
    calc = (ankle + [0, -0.014 * H, -0.03 * H], [0.010 * H, 0.021 * H, 0.010 * H],
            rotation([1, 0, 0], np.radians(body.calcaneus_pitch_deg)))  # the heel lowest, its front rising
    _ell_plate(cv, *calc, site_id(f"calcaneus_{side}"), red)
    if apophysis_open(body, "calcaneus"):
        _calcaneal_apophysis(cv, body, *calc, site_id(f"calcaneus_{side}"))
    _ell_plate(cv, ankle + [0, 0.026 * H, -0.026 * H], [0.014 * H, 0.012 * H, 0.009 * H], None,
               site_id(f"midfoot_{side}"), red)
    toes = site_id(f"toes_{side}")
    for i in range(5):
        x = ankle[0] + s * (-0.6 + 0.3 * i) * fw
        base = np.array([x, ankle[1] + 0.038 * H, ankle[2] - 0.026 * H])
        head = np.array([x + s * 0.1 * fw * (i - 2), ankle[1] + (0.078 - 0.004 * i) * H, sole + 0.004 * H])
        r = (0.0042 if i == 0 else 0.0028) * H
        bone = LongBone(f"metatarsals_{side}", base, head, r, r * 1.15, r * 1.25, (0.07 if i == 0 else None, 0.9 if i else None))
        if i == 1:
            body.long_bones[bone.code] = bone
        render_long_bone(cv, body, bone, rng, cortex_mm=1.0)
        tip = head + [0, (0.028 - 0.003 * i) * H, -0.0]
        _tube(cv, [head + [0, 0.004 * H, 0], tip], r * 0.8, toes, red)


def _arm(cv: Canvas, body: Body, L, side: str, rng) -> None:
    H = body.H
    s = _sgn(side)
    sh = np.array(body.landmarks[f"shoulder_{side}"])
    el = np.array(body.landmarks[f"elbow_{side}"])
    wr = np.array(body.landmarks[f"wrist_{side}"])
    ax = (wr - el) / np.linalg.norm(wr - el)
    lat = np.array([s, 0.0, 0.0])
    back = np.array([0.0, -1.0, 0.0])
    # the elbow joint line is the elbow landmark: the distal humerus (caps at 0.4 of their radius) ends ELBOW_GAP / 2
    # above it, the flat radial head (0.3) ELBOW_GAP / 2 below, under the capitellum; the olecranon rises behind
    # the distal humerus. Before generator 1.4 the radial head reached 0.0085 H above the joint line, into the humerus
    condyles, depth = 0.0105 * H, 0.4
    hum = LongBone(f"humerus_{side}", sh + [0, 0, 0.008 * H], el + [0, 0, ELBOW_GAP / 2 * H + depth * condyles],
                   0.0055 * H, 0.0118 * H, condyles, (0.09, 0.93), end_scale=(1.0, depth))
    head, depth = 0.0045 * H, 0.3
    rad = LongBone(f"radius_{side}", el + lat * 0.006 * H + ax * (ELBOW_GAP / 2 * H + depth * head),
                   wr + lat * 0.008 * H, 0.0033 * H, head, 0.0062 * H, (0.05, 0.95), end_scale=(depth, 1.0))
    uln = LongBone(f"ulna_{side}", el - lat * 0.005 * H + back * 0.008 * H - ax * 0.006 * H, wr - lat * 0.006 * H,
                   0.0033 * H, 0.0062 * H, 0.0038 * H, (0.06, 0.96))
    _joint_space(cv, el, [0.012 * H, 0.008 * H, ELBOW_GAP / 2 * H + 1.0])
    _add_long_bones(cv, body, rng, hum, rad, uln)
    hid = site_id(f"hand_{side}")
    red = 0.15 if body.age < 8 else 0.03
    _ell_plate(cv, wr + ax * 0.012 * H, [0.011 * H, 0.007 * H, 0.008 * H], None, hid, red)
    for i in range(5):
        off = np.array([0, (-0.012 + 0.006 * i) * H, 0])
        b0 = wr + ax * 0.022 * H + off
        b1 = b0 + ax * 0.034 * H + off * 0.15
        _tube(cv, [b0, b1], 0.0026 * H, hid, red)
        _tube(cv, [b1 + ax * 0.003 * H, b1 + ax * (0.03 if i else 0.02) * H], 0.002 * H, hid, red)
