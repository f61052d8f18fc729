"""One phantom case from a seed, written as NIfTI + case.json, and datasets in nnU-Net's raw layout."""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydantic import ValidationError

from models.lesions import voxel_volume_ml
from models.nifti import atomic_dir, save_nifti
from training.config import BodyConfig, SynthConfig, apply_overrides, load_config

from .acquire import Dixon, acquire
from .body import Body, build_skeleton, ischiopubic_synchondroses, sample_body
from .contrast import mimic_masks, synthesize, tissue_means
from .lesions import apply_collapse, plan_lesions, render_lesion
from .render import MUSCLE, PHYSIS, Canvas, drawn_or_only

GENERATOR_VERSION = "1.10"  # 1.1: skull base/face inside the head (1.0 put it in the neck); 1.2: contrast.gamma
# applied (cases without contrast randomisation are bit-identical to 1.1); 1.3: normal foot foci symmetric left-right
# (1.2 drew each foot's pattern independently; cases without foot foci are bit-identical to 1.2)
# 1.4: knee and elbow joints: flat tibial plateau and radial head, broad femoral and humeral condyles, a joint
# space, the patella's lower pole above the knee joint line, the olecranon behind the humerus (1.3's tibial
# dome reached 0.011 H into the femur and its radial head 0.0085 H into the humerus); each stage after the skeleton
# draws from its own random stream (STREAMS), so the same seed keeps its child and lesion plan but not 1.3's
# texture, noise or acquisition
# 1.5: the sequence (acquisition.sequence_p, its own stream): STIR 70% with even fat suppression, T2 FS 15% with 1.4's
# patchy fat-suppression failure, T2 Dixon water-only 15% with fat-water swaps; 1.4 drew patchy failure in 35% of
# every scan it called STIR. With sequence_p {t2_fs: 1} a 1.5 case is 1.4's bit for bit (images and labels)
# 1.6: spinal proportions (body.spine: graded): thoracic levels grow from T1 to T12 and lumbar discs are thicker
# (body.SPINE_SEGMENTS); 1.5 drew every thoracic level alike and every disc a quarter of its level. With
# body.spine=uniform a 1.6 case is 1.5's bit for bit
# 1.7: edema no brighter than free fluid (lesions.fluid_ceiling; 1.6 multiplied a physis under a lesion by the
# lesion's ratio, up to 3-4x fluid), a collapsed vertebral body filled by its disc with a new endplate
# (lesions.collapse_fill; 1.6 painted muscle), clavicular lesions never epiphyseal (lesions.clavicle_epiphysis), and
# case.json without the timings (the same seed, the same bytes) and with lesions.in_view. With
# lesions.{fluid_ceiling: false, collapse_fill: muscle, clavicle_epiphysis: true} a 1.7 case's images and labels are
# 1.6's bit for bit
# 1.8: the calcaneal, tibial-tuberosity and ischial apophyses, bright on STIR from their ossification until they
# fuse, by sex (body.apophyses; 1.7 drew none, so its only normal bright plates were the long bones' physes, the
# iliac crest, the vertebral ring apophyses and the triradiate cartilage), and the calcaneus pitched as in a real
# foot, its front 18 degrees above the heel (body.calcaneus_pitch_deg; 1.7 tilted it the other way). Drawn without
# random draws: with body.apophyses=false and body.calcaneus_pitch_deg=-15 a 1.8 case is 1.7's bit for bit
# 1.9: normal bright marrow foci around the knees (femoral and tibial metaphyses) and in the pelvis (around the
# acetabulum and the ischiopubic junction), symmetric left-right like the foot foci, in a quarter of children under
# 16 each (mimics.knee_foci_p_under16, mimics.pelvic_foci_p_under16; the clinical notes: 58.7% of healthy children
# have a major bright focus in the limbs, 29.6% in the axial skeleton, mostly the pelvis; 1.8 drew bright foci only
# in the feet). They are drawn after every other draw of their streams: with both shares 0 a 1.9 case is 1.8's bit
# for bit
# 1.10: the ischiopubic synchondroses (body.ischiopubic_synchondrosis; 1.9 drew the inferior pubic ramus as one
# bone with the ischium at every age): a cartilage plate across the ramus where it meets the ischium until it fuses
# (4-9 y in girls, 7-13 y in boys, each side at its own age), and from 2.5 years before to 1.5 after fusion a
# fusiform swelling (68%), bright marrow (80%) and bright muscle beside it (57%), the commonest mimic of osteomyelitis
# in a child's pelvis (body.ISC_FUSION_AGES). Drawn from streams of their own after everything else of their stage:
# with body.ischiopubic_synchondrosis=false a 1.10 case is 1.9's bit for bit
GENERATOR_1_9_SETTINGS = ("body.ischiopubic_synchondrosis=false",)  # 1.10 -> 1.9
GENERATOR_1_8_SETTINGS = (*GENERATOR_1_9_SETTINGS, "mimics.knee_foci_p_under16=0",
                          "mimics.pelvic_foci_p_under16=0")  # 1.10 -> 1.8
GENERATOR_1_7_SETTINGS = (*GENERATOR_1_8_SETTINGS, "body.apophyses=false",
                          "body.calcaneus_pitch_deg=-15")  # --set these: 1.10 -> 1.7
GENERATOR_1_6_SETTINGS = (*GENERATOR_1_7_SETTINGS, "lesions.fluid_ceiling=false", "lesions.collapse_fill=muscle",
                          "lesions.clavicle_epiphysis=true")  # --set these: a 1.10 case is 1.6's bit for bit
# the older generators whose cases these settings reproduce bit for bit, newest first
REPRODUCED = (("1.9", GENERATOR_1_9_SETTINGS), ("1.8", GENERATOR_1_8_SETTINGS), ("1.7", GENERATOR_1_7_SETTINGS),
              ("1.6", GENERATOR_1_6_SETTINGS))
DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "synth" / "default.yaml"


def generator_version_of(cfg: SynthConfig) -> str:
    """The generator whose cases ``cfg`` makes: GENERATOR_VERSION, or the oldest of :data:`REPRODUCED` whose
    settings it holds (1.10 with ``body.ischiopubic_synchondrosis=false`` makes 1.9's cases, case.json included),
    as case.json and dataset.json record it."""
    version = GENERATOR_VERSION
    for older, settings in REPRODUCED:
        if SynthConfig.model_validate(apply_overrides(json.loads(cfg.model_dump_json()), list(settings))) != cfg:
            break
        version = older
    return version


@dataclass
class Case:
    name: str
    image: np.ndarray          # acquisition grid, float32 or int16
    sites: np.ndarray          # uint8
    lesions: np.ndarray        # uint16
    physis: np.ndarray         # uint8 0/1 (growth plates and apophyses: a training target, not a contract file)
    affine: np.ndarray
    meta: dict


def canvas_for(body, spacing: float) -> Canvas:
    H = body.H
    lo = np.array([-0.21 * H - 20, -0.11 * H - 10, -12.0])
    hi = np.array([0.21 * H + 20, 0.13 * H + 10, H + 12.0])
    shape = tuple(int(v) for v in np.ceil((hi - lo) / spacing))
    return Canvas(shape, lo, spacing)


def draw_skeleton(seed: int, body_cfg: BodyConfig, spacing_mm: float) -> tuple[Body, Canvas]:
    """The child of a seed and its skeleton on an anatomy canvas of ``spacing_mm``, drawn from the seed's own stream
    as :func:`generate_case` draws them."""
    rng = np.random.default_rng(seed)
    body = sample_body(rng, body_cfg)
    cv = canvas_for(body, spacing_mm)
    build_skeleton(cv, body, rng, body_cfg)
    if body.ischiopubic:  # generator 1.10, from its own stream: the rest of the skeleton is 1.9's
        ischiopubic_synchondroses(cv, body, _stream(seed, "synchondrosis"))
    return body, cv


# the random stream of each stage of a case after the body and skeleton (which draw from the seed alone); since
# generator 1.4 (1.0-1.3 drew everything but the lesion plan from the seed's stream, one stage after another)
STREAMS = {"lesion_plan": 1, "mimics": 2, "lesions": 3, "contrast": 4, "acquisition": 5, "sequence": 6, "dixon": 7,
           "synchondrosis": 8, "synchondrosis_signal": 9}


def _stream(seed: int, stage: str) -> np.random.Generator:
    return np.random.default_rng([seed, STREAMS[stage]])


def generate_case(seed: int, cfg: SynthConfig, fov: str | None = None, name: str | None = None) -> Case:
    """Render one child, plan and draw lesions, synthesise STIR contrast and acquire it. Same seed, same case.
    Each stage draws from its own random stream of the seed (``STREAMS``), so a change to one stage (a bone's
    shape, say) leaves the other stages' draws (the lesion plan, texture, noise and acquisition) as they were."""
    t0 = time.perf_counter()
    body, cv = draw_skeleton(seed, cfg.body, cfg.anatomy_mm)
    t_anat = time.perf_counter()
    pattern, plans = plan_lesions(_stream(seed, "lesion_plan"), cfg.lesions)
    label = np.zeros(cv.shape, np.uint16)
    edema = np.zeros(cv.shape, np.float32)
    mimics = mimic_masks(cv, body, _stream(seed, "mimics"), cfg.mimics)
    mimics["synchondrosis_rng"] = _stream(seed, "synchondrosis_signal")
    draw = _stream(seed, "lesions")
    kept = []
    for plan in plans:
        if plan.collapse:
            apply_collapse(cv, body, plan, cfg.lesions.collapse_fill)
        n = render_lesion(cv, body, plan, label, edema, draw)
        if n > 0:
            kept.append(plan)
    # renumber lesions 1..K in plan order
    lut_ids = np.zeros(max([p.id for p in plans], default=0) + 1, np.uint16)
    for new, plan in enumerate(kept, start=1):
        lut_ids[plan.id] = new
        plan.mirror_of = next((k for k, q in enumerate(kept, 1) if q.id == plan.mirror_of), None) if plan.mirror_of else None
    _measure_flags(cv, label, kept)
    ratios = {plan.id: plan.ratio_to_marrow for plan in kept}
    contrast = _stream(seed, "contrast")
    lut = tissue_means(contrast, cfg.stir, cfg.contrast)
    img = synthesize(cv, body, lut, edema, ratios, label, mimics, contrast, cfg.stir, cfg.mimics,
                     muscle_floor=cfg.lesions.muscle_floor, fluid_ceiling=cfg.lesions.fluid_ceiling)
    label = lut_ids[label]
    for new, plan in enumerate(kept, start=1):
        plan.id = new
    t_con = time.perf_counter()
    sequence = drawn_or_only(_stream(seed, "sequence"), cfg.acquisition.sequence_p)
    # the swap draws from a stream of its own, so a seed's swap is the same whatever the mix of sequences
    dixon = Dixon(edema, _stream(seed, "dixon")) if sequence == "dixon_water" else None
    acq = acquire(cv, body, img, {"sites": cv.sites, "lesions": label, "physis": (cv.tissue == PHYSIS).astype(np.uint8)},
                  _stream(seed, "acquisition"), cfg.acquisition, cfg.fov, fov, muscle_mean=float(lut[MUSCLE]),
                  sequence=sequence, dixon=dixon)
    lesions = acq.labels["lesions"].astype(np.uint16)
    vox_ml = voxel_volume_ml(acq.affine)
    counts = np.bincount(lesions.ravel(), minlength=len(kept) + 1)
    lesion_meta = []
    for plan in kept:
        d = plan.as_dict()
        d["volume_ml"] = round(float(counts[plan.id]) * vox_ml, 3)
        d["in_view"] = bool(counts[plan.id] > 0)  # a lesion drawn outside the field of view stays listed, at 0 mL
        d["ratio_to_marrow"] = round(d["ratio_to_marrow"], 3)
        lesion_meta.append(d)
    t_acq = time.perf_counter()
    meta = {
        "generator": "wbmri-phantom", "generator_version": generator_version_of(cfg), "config_version": cfg.version,
        "seed": int(seed), "age_years": round(body.age, 2), "sex": body.sex, "height_cm": round(body.H / 10, 1),
        "subcutaneous_fat_mm": round(body.fat, 1), "physis_open": round(body.physis_open, 2),
        "pattern": pattern, "acquisition": acq.params, "foot_foci": mimics.get("foot") is not None,
        "knee_foci": mimics.get("knee") is not None, "pelvic_foci": mimics.get("pelvis") is not None,
        **({"ischiopubic_synchondroses": [sc.as_dict() for sc in body.synchondroses]} if body.ischiopubic else {}),
        "lesions": lesion_meta,
        "timings_s": {"anatomy": round(t_anat - t0, 3), "lesions_contrast": round(t_con - t_anat, 3),
                      "acquisition": round(t_acq - t_con, 3)},
    }
    return Case(name or f"case_{seed:06d}", acq.image, acq.labels["sites"].astype(np.uint8), lesions,
                acq.labels["physis"].astype(np.uint8), acq.affine, meta)


def _measure_flags(cv: Canvas, label: np.ndarray, plans) -> None:
    """Replace the planned soft-tissue and juxtaphyseal flags by what was drawn (the label is the reference)."""
    from scipy.ndimage import binary_dilation, find_objects
    from models.sites import site_id
    boxes = find_objects(label)
    for plan in plans:
        sl = boxes[plan.id - 1] if plan.id - 1 < len(boxes) else None
        if sl is None:
            continue
        sl = tuple(slice(max(0, s.start - 3), min(n, s.stop + 3)) for s, n in zip(sl, label.shape))
        mine = label[sl] == plan.id
        plan.soft_tissue = bool((mine & (cv.sites[sl] == 0)).any())  # any edema drawn outside the bone
        if plan.juxtaphyseal is not None:
            physis = (cv.tissue[sl] == PHYSIS) & (cv.sites[sl] == site_id(plan.site))
            plan.juxtaphyseal = bool((binary_dilation(mine, iterations=2) & physis).any())


def write_case(case: Case, folder: Path, preview: bool = False) -> Path:
    """Write a case folder atomically: image, sites, lesions (contract dtypes), physis and case.json."""
    with atomic_dir(folder) as tmp:
        save_nifti(tmp / "image.nii.gz", case.image, case.affine)
        save_nifti(tmp / "sites.nii.gz", case.sites, case.affine, np.uint8)
        save_nifti(tmp / "lesions.nii.gz", case.lesions, case.affine, np.uint16)
        save_nifti(tmp / "physis.nii.gz", case.physis, case.affine, np.uint8)
        # the timings stay out of the file, so that one seed gives the same bytes on any machine
        meta = {k: v for k, v in case.meta.items() if k != "timings_s"}
        (tmp / "case.json").write_text(json.dumps(meta, indent=2) + "\n")
        if preview:
            from models.viz import preview_case
            preview_case(tmp, tmp / "preview.png", name=folder.name)
    return folder


def _one(args) -> tuple[str, dict]:
    seed, cfg_json, out, preview = args
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    cfg = SynthConfig.model_validate_json(cfg_json)
    case = generate_case(seed, cfg)
    write_case(case, Path(out) / "cases" / case.name, preview)
    _link_nnunet(Path(out), case.name)
    return case.name, case.meta


def _link_nnunet(out: Path, name: str) -> None:
    """nnU-Net's raw layout: imagesTr/NAME_0000.nii.gz and labelsTr/NAME.nii.gz (binary edema), plus wbmri's
    optional sitesTr/NAME.nii.gz and physisTr/NAME.nii.gz, so that ``data.dataset_dirs`` trains every head on it."""
    import nibabel as nib
    src = out / "cases" / name
    links = {out / "imagesTr" / f"{name}_0000.nii.gz": src / "image.nii.gz",
             out / "sitesTr" / f"{name}.nii.gz": src / "sites.nii.gz",
             out / "physisTr" / f"{name}.nii.gz": src / "physis.nii.gz"}
    for dst, target in links.items():
        dst.parent.mkdir(exist_ok=True)
        if dst.exists() or dst.is_symlink():
            dst.unlink()
        os.symlink(os.path.relpath(target, dst.parent), dst)
    (out / "labelsTr").mkdir(exist_ok=True)
    les = nib.load(str(src / "lesions.nii.gz"))
    save_nifti(out / "labelsTr" / f"{name}.nii.gz", (np.asarray(les.dataobj) > 0).astype(np.uint8), les.affine, np.uint8)


def write_dataset_json(out: Path, names: list[str], cfg: SynthConfig, seed: int) -> None:
    ds = {
        "name": "wbmri-phantom", "description": "Synthetic paediatric whole-body STIR with CNO marrow edema",
        "channel_names": {"0": "STIR"}, "labels": {"background": 0, "edema": 1},
        "numTraining": len(names), "file_ending": ".nii.gz",
        "generator_version": generator_version_of(cfg), "config": json.loads(cfg.model_dump_json()), "first_seed": seed,
        "extra": {"cases/<name>/sites.nii.gz": "bone sites (models/contract/sites.tsv)",
                  "cases/<name>/lesions.nii.gz": "lesion instances", "cases/<name>/physis.nii.gz": "growth plates"},
    }
    (out / "dataset.json").write_text(json.dumps(ds, indent=2) + "\n")


def _changed_settings(old: dict, new: dict, prefix: str = "") -> list[str]:
    """The dotted names of the settings that differ between two configs (as dicts)."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _changed_settings(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}")
    return out


SYNTH_ENTRIES = ("cases", "imagesTr", "labelsTr", "sitesTr", "physisTr", "dataset.json")  # what a set holds


def existing_cases(out: Path, cfg: SynthConfig) -> tuple[list[str], int | None]:
    """The case names already in a synth folder and its first seed, if the folder was made by this generator
    version with the same configuration; an error if it was not (a set must not mix cases of two recipes)."""
    ds_path = Path(out) / "dataset.json"
    if not ds_path.is_file():
        others = sorted(p.name for p in Path(out).iterdir() if p.name not in SYNTH_ENTRIES) if Path(out).is_dir() \
            else []
        if others:  # a run stopped before its dataset.json may be run again; a folder of other files is not ours
            raise ValueError(f"{out} holds files that wbmri synth did not write ({', '.join(others[:3])}"
                             f"{', ...' if len(others) > 3 else ''}): use a new or empty folder")
        return [], None
    ds = json.loads(ds_path.read_text())
    try:  # settings added since the folder was made take their defaults
        stored = SynthConfig.model_validate(ds.get("config"))
    except ValidationError:
        stored = None
    version = generator_version_of(cfg)
    if ds.get("generator_version") != version:
        raise ValueError(f"{out} holds cases of phantom generator {ds.get('generator_version')}, these settings "
                         f"make {version}'s: a set must not mix them; use a new folder")
    if stored != cfg:
        changed = _changed_settings(json.loads(stored.model_dump_json()) if stored else {},
                                    json.loads(cfg.model_dump_json()))
        changed = changed if stored else ["settings unreadable"]
        raise ValueError(f"{out} holds cases made with other settings ({', '.join(changed[:5])}"
                         f"{', ...' if len(changed) > 5 else ''}); add cases only with the same --config/--set, or "
                         "use a new folder")
    names = sorted(p.name for p in (Path(out) / "cases").glob("*") if (p / "image.nii.gz").is_file())
    return names, ds.get("first_seed")


def synth_dataset(n: int, out: Path, seed: int = 0, config: Path | None = None, overrides: list[str] | None = None,
                  workers: int = 1, preview: bool = False) -> list[str]:
    """Generate N cases (seeds seed..seed+N-1) into OUT with a progress bar. A folder made before with the same
    generator and configuration is extended (dataset.json then lists all its cases); one made otherwise is an
    error."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
    cfg = load_config(SynthConfig, config or (DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else None), overrides)
    out = Path(out)
    before, first_seed = existing_cases(out, cfg)
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(seed + i, cfg.model_dump_json(), str(out), preview) for i in range(n)]
    names = []
    # the pool is shut down before exit (a pool left open printed an OSError traceback when the program ended);
    # spawned, not forked: a forked child of a process whose torch threads have run can hang (the Python API may
    # call this after a prediction)
    with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) if workers > 1 \
            else nullcontext() as pool, \
            Progress(TextColumn("synth"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()) as bar:
        task = bar.add_task("synth", total=n)
        for name, _ in (pool.map(_one, jobs) if pool else map(_one, jobs)):
            names.append(name)
            bar.advance(task)
    write_dataset_json(out, sorted(set(before) | set(names)), cfg, seed if first_seed is None else min(first_seed, seed))
    return names
