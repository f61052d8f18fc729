"""The one configuration schema of wbmri (phantom and training), YAML loading and ``--set key=value`` overrides."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from models.networks import NetworkConfig, NetworkPart
from models.sites import by_code

Range = tuple[float, float]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ---------------------------------------------------------------------------------------------------- phantom
class BodyConfig(Strict):
    age_years: Range = (3.0, 17.0)
    female_p: float = Field(0.67, ge=0, le=1, description="girls outnumber boys about 2:1 in CNO")
    height_sd: float = Field(0.045, ge=0, le=0.2, description="relative SD of height around the growth-chart median")
    fat_mm: Range = (4.0, 22.0)
    arm_abduction_deg: Range = (2.0, 12.0)
    leg_abduction_deg: Range = (0.0, 8.0)
    pose_jitter_deg: float = Field(4.0, ge=0, le=20)
    spine: Literal["graded", "uniform"] = Field("graded", description="vertebral proportions: graded (generator "
                                                "1.6: thoracic bodies growing towards the lumbar spine, lumbar "
                                                "discs thicker) or uniform (generators up to 1.5)")
    apophyses: bool = Field(True, description="calcaneal, tibial-tuberosity and ischial apophyses, bright on STIR "
                            "while open (generator 1.8; false: generators up to 1.7)")
    calcaneus_pitch_deg: float = Field(18.0, ge=-30, le=40, description="how steeply the calcaneus's long axis rises "
                                       "from the heel forward (calcaneal pitch, about 20 degrees in a standing foot; "
                                       "generator 1.8); generators up to 1.7 drew -15, the heel higher than the front")
    ischiopubic_synchondrosis: bool = Field(True, description="the ischiopubic synchondroses: a cartilage plate "
                                            "until they fuse (4-9 y in girls, 7-13 y in boys) and, around fusion, "
                                            "a swollen fusion zone with bright marrow and muscle (generator 1.10; "
                                            "false: generators up to 1.9)")


class StirConfig(Strict):
    """Mean STIR signal per tissue, relative to free fluid = 1.0 (ranges sampled per case)."""
    fat: Range = (0.05, 0.11)
    muscle: Range = (0.17, 0.26)
    cortex: Range = (0.01, 0.04)
    yellow_marrow: Range = (0.06, 0.12)
    red_marrow: Range = (0.24, 0.40)
    physis: Range = (0.50, 0.85)
    cartilage: Range = (0.30, 0.45)
    fluid: Range = (0.85, 1.0)
    disc: Range = (0.40, 0.65)
    brain: Range = (0.30, 0.42)
    lung: Range = (0.02, 0.06)
    liver: Range = (0.15, 0.24)
    spleen: Range = (0.38, 0.55)
    kidney: Range = (0.40, 0.60)
    bowel: Range = (0.15, 0.40)
    blood: Range = (0.04, 0.30)
    texture_cv: Range = (0.06, 0.14)


class MimicConfig(Strict):
    """Normal findings that look like disease (clinical notes)."""
    red_marrow_patch_p: float = Field(0.6, ge=0, le=1)
    foot_foci_p_under15: float = Field(0.59, ge=0, le=1)
    foot_foci_boost: Range = (1.6, 3.0)
    knee_foci_p_under16: float = Field(0.25, ge=0, le=1, description="share of children under 16 with symmetric "
                                       "bright marrow foci in the metaphyses around both knees (generator 1.9; the "
                                       "clinical notes: 58.7% of healthy children have a major bright focus in the "
                                       "limbs, the feet's foci being most of them)")
    pelvic_foci_p_under16: float = Field(0.25, ge=0, le=1, description="share of children under 16 with symmetric "
                                         "bright marrow foci around both acetabula and ischiopubic junctions "
                                         "(generator 1.9; the clinical notes: 29.6% have one in the axial "
                                         "skeleton, mostly the pelvis)")
    marrow_foci_boost: Range = Field((1.4, 2.4), description="signal gain of the knee and pelvic foci over their "
                                     "marrow: the range of real faint edema (median lesion 1.05-2.27 x normal "
                                     "marrow), which is what makes them traps")
    synchondrosis_boost: Range = Field((1.4, 2.4), description="signal gain of the ischiopubic fusion zone's "
                                       "marrow where it is bright (generator 1.10; as marrow_foci_boost)")
    synchondrosis_muscle_boost: Range = Field((1.3, 1.8), description="signal gain of the muscle beside a bright "
                                              "ischiopubic fusion zone (generator 1.10)")
    effusion_p: float = Field(0.35, ge=0, le=1)
    slow_flow_p: float = Field(0.4, ge=0, le=1)


class LesionConfig(Strict):
    """Lesion planner; frequencies from the series in the clinical notes (see data/README.md)."""
    none_p: float = Field(0.2, ge=0, le=1, description="share of cases without any lesion")
    count_mean: float = Field(6.0, gt=0, description="mean lesions in a case with lesions (Poisson, 1..max)")
    count_max: int = Field(15, ge=1, le=40)
    pattern_p: dict[str, float] = {"tibio_appendicular": 0.54, "claviculo_spinal": 0.24, "mixed": 0.22}
    site_weights: dict[str, dict[str, float]] = {
        "tibio_appendicular": {"tibia": 30, "femur": 22, "fibula": 10, "talus": 4, "calcaneus": 5, "metatarsals": 5,
                               "ilium": 3, "ischium": 2, "pubis": 2, "humerus": 4, "radius": 3, "ulna": 2,
                               "sacrum": 2, "clavicle": 2, "vertebra": 2, "midfoot": 2},
        "claviculo_spinal": {"clavicle": 35, "vertebra": 35, "sternum": 8, "ribs": 6, "mandible": 4, "sacrum": 4,
                             "tibia": 5, "femur": 3},
        "mixed": {"tibia": 14, "femur": 12, "fibula": 5, "ilium": 8, "ischium": 5, "pubis": 5, "sacrum": 6,
                  "vertebra": 10, "clavicle": 8, "ribs": 5, "sternum": 4, "mandible": 3, "humerus": 5, "radius": 2,
                  "ulna": 2, "talus": 3, "calcaneus": 4, "metatarsals": 4, "scapula": 2, "midfoot": 2},
    }
    long_subregion_p: dict[str, float] = {"metaphysis": 0.65, "epiphysis": 0.25, "diaphysis": 0.10}
    distal_p: dict[str, float] = {"femur": 0.8, "tibia": 0.5, "fibula": 0.75, "humerus": 0.5, "radius": 0.7,
                                  "ulna": 0.6, "clavicle": 0.3, "metatarsals": 0.5}
    juxtaphyseal_p: float = Field(0.85, ge=0, le=1, description="metaphyseal lesions that touch the physis")
    symmetric_p: float = Field(0.55, ge=0, le=1, description="a paired-site lesion gets a mirror lesion")
    vertebra_multifocal_p: float = Field(0.6, ge=0, le=1)
    soft_tissue_p: float = Field(0.3, ge=0, le=1)
    periosteal_p: float = Field(0.3, ge=0, le=1)
    collapse_p: float = Field(0.12, ge=0, le=1, description="vertebral lesions with height loss")
    volume_ml: Range = (0.4, 20.0)
    ratio_to_marrow: Range = (1.4, 6.0)
    faint_p: float = Field(0.35, ge=0, le=1, description="lesions drawn from the faint end (ratio < 2)")
    muscle_floor: float = Field(1.0, ge=0, le=2, description="edema signal is at least muscle_floor x muscle x "
                                "(0.6 + 0.25 ratio); 0: edema follows its marrow ratio alone, even in dark fatty marrow")
    fluid_ceiling: bool = Field(True, description="edema no brighter than free fluid (bent toward it above 0.8 x "
                                "fluid); false: generator 1.6's unbounded edema (a lesion over a physis reached 3-4x fluid)")
    collapse_fill: Literal["disc", "muscle"] = Field("disc", description="what replaces a collapsed vertebral body's "
                                                     "upper part: the disc above, with a new endplate (1.7), or 1.6's muscle")
    clavicle_epiphysis: bool = Field(False, description="plan clavicular epiphyseal lesions (1.6); a child's clavicular "
                                     "epiphyses are cartilage, so by default they are metaphyseal")
    expected: dict[str, Range] = Field(
        default={"tibia": (0.40, 0.80), "femur": (0.30, 0.70), "clavicle": (0.15, 0.50), "vertebra": (0.12, 0.45),
                 "pelvis": (0.15, 0.55), "metaphysis_share": (0.45, 0.80), "bilateral": (0.35, 0.85),
                 "tibio_appendicular": (0.44, 0.64), "claviculo_spinal": (0.15, 0.33)},
        description="checked by the tests: share of lesional cases with a site, and shares of patterns")


class FovConfig(Strict):
    p: dict[str, float] = {"whole_body": 0.6, "pelvis": 0.08, "knees": 0.1, "legs": 0.08, "spine": 0.07, "feet": 0.07}


class DixonConfig(Strict):
    """T2 Dixon water-only images, which some centres use instead of STIR (clinical notes). Fat is removed by
    fat-water separation rather than an inversion pulse: evenly (no patchy failure), at a higher signal-to-noise
    ratio, but where the separation fails the water image shows fat (a fat-water swap: subcutaneous fat and fatty
    marrow bright, edema darker than the marrow around it). The tissue contrast stays STIR's (the notes: the two
    agreed on 89.9% of bright areas in 77 healthy children). The SNR gain and the swap rate and size are
    assumptions, not figures from the notes."""
    snr_gain: float = Field(1.5, ge=1, le=4, description="x the STIR SNR drawn for the case")
    swap_p: float = Field(0.2, ge=0, le=1, description="share of Dixon scans with one fat-water swap region")
    swap_radius_mm: Range = Field((40.0, 120.0), description="radius of the swapped region (irregular, centred "
                                  "toward the edge of the field of view, where the field is least even)")
    fat_signal: Range = Field((0.6, 0.9), description="pure fat's signal where water and fat are swapped (fluid "
                              "about 0.85-1.0 on the STIR scale; fat is bright on T2 turbo spin echo)")


class AcquisitionConfig(Strict):
    inplane_mm: Range = (1.0, 1.9)
    slice_mm: Range = (3.0, 6.0)
    stations: tuple[int, int] = (3, 6)
    station_gain: Range = (0.85, 1.15)
    bias_amplitude: Range = (0.05, 0.3)
    snr: Range = (12.0, 40.0)
    fat_sat_failure_p: float = Field(0.35, ge=0, le=1, description="share of T2 FS (spectral fat saturation) scans "
                                     "with patchy failure on fat and fatty marrow; STIR and Dixon do not fail so")
    motion_blur_p: float = Field(0.3, ge=0, le=1)
    oblique_p: float = Field(0.2, ge=0, le=1)
    oblique_max_deg: float = Field(12.0, ge=0, le=45)
    orientation_p: dict[str, float] = {"RAS": 0.3, "LPS": 0.3, "coronal_stack": 0.4}
    plane_p: dict[Literal["coronal", "sagittal", "axial"], float] = Field(
        {"coronal": 1.0}, description="slice plane of the acquisition (the thick slices run across it): whole-body "
        "CNO protocols are coronal, spines are often added sagittal, pelvis or knees axial. With one plane no random "
        "draw is made, so the default reproduces generator 1.3 cases bit for bit")
    intensity_scale: Range = (50.0, 4000.0)
    integer_p: float = Field(0.4, ge=0, le=1)
    sequence_p: dict[Literal["stir", "t2_fs", "dixon_water"], float] = Field(
        {"stir": 0.7, "t2_fs": 0.15, "dixon_water": 0.15},
        description="the fluid-sensitive fat-suppressed sequence. STIR nulls fat by its T1, which is insensitive to "
        "field inhomogeneity, so its fat suppression is even; T2 FS (spectral fat saturation) is sensitive to it and "
        "fails in patches in fat_sat_failure_p of scans; T2 Dixon water-only (``dixon``) is even but can swap fat "
        "and water. The sequence is drawn from its own random stream, and each sequence makes every other draw of "
        "its seed alike, so the three versions of a seed form pairs. ``{t2_fs: 1}`` makes generator 1.4's cases "
        "bit for bit (1.4 called them STIR)")
    dixon: DixonConfig = DixonConfig()

    @model_validator(mode="after")
    def _choices_drawable(self) -> "AcquisitionConfig":
        for name, p in (("plane_p", self.plane_p), ("sequence_p", self.sequence_p)):
            if not p or min(p.values()) < 0 or sum(p.values()) <= 0:
                raise ValueError(f"{name} needs non-negative weights with a positive sum, got {p}")
        return self


class ContrastRandomisation(Strict):
    """SynthSeg-style: tissue means re-drawn at random, keeping edema brighter than marrow and fat suppressed."""
    enabled: bool = False
    p: float = Field(0.5, ge=0, le=1)
    jitter: float = Field(0.35, ge=0, le=1)
    gamma: Range = Field((0.7, 1.5), description="exponent on the jittered tissue means (fluid about 1), "
                         "log-uniform; applied since generator 1.2")

    @model_validator(mode="after")
    def _gamma_positive(self) -> "ContrastRandomisation":
        lo, hi = self.gamma
        if not 0 < lo <= hi:
            raise ValueError(f"gamma must be 0 < low <= high, got {list(self.gamma)}")
        return self


class SynthConfig(Strict):
    version: str = "1.0"
    anatomy_mm: float = Field(2.0, ge=1.0, le=4.0)
    body: BodyConfig = BodyConfig()
    stir: StirConfig = StirConfig()
    mimics: MimicConfig = MimicConfig()
    lesions: LesionConfig = LesionConfig()
    fov: FovConfig = FovConfig()
    acquisition: AcquisitionConfig = AcquisitionConfig()
    contrast: ContrastRandomisation = ContrastRandomisation()


# ---------------------------------------------------------------------------------------------------- training
class PhantomPoolConfig(Strict):
    """A further phantom pool with its own generator settings (e.g. faint edema, randomised contrast), trained on
    beside the main pool and cached like it."""
    cases: int = Field(..., ge=1, description="phantoms in this pool (seeds from seed)")
    seed: int = Field(..., ge=0, description="first seed; keep the pools' seed ranges apart")
    synth: SynthConfig = Field(SynthConfig(), description="the generator settings of this pool (defaults where unset)")


class DataConfig(Strict):
    phantom_cases: int = Field(160, ge=0, description="size of the phantom pool (0: real data only); cases are generated "
                               "by background workers into cache_dir and training starts once a few are ready")
    phantom_seed: int = 100_000
    extra_pools: list[PhantomPoolConfig] = Field([], description="further phantom pools, each with its own "
                                                "generator settings, sampled beside the main pool case for case")
    dataset_dirs: list[Path] = []
    val_cases: int = Field(8, ge=0, description="validation phantoms (seeds from val_seed)")
    val_dataset_dirs: list[Path] = Field([], description="labelled nnU-Net folders validated on beside (or, with "
                                         "val_cases 0, instead of) the phantoms: they pick the best checkpoint "
                                         "and the lesion rules; keep them apart from dataset_dirs")
    val_seed: int = 900_000
    cache_dir: Path = Path("data/cache")
    workers: int = Field(1, ge=0, description="phantom generator processes, shared by the pools (0: generate in the training process first)")
    ram_cache_gb: float = Field(8.0, ge=0, description="training cases kept in memory per process (GiB); the least recently used "
                                "beyond it are re-read from their npz files")
    loader_workers: int = Field(0, ge=0, description="processes that make the augmented batches (0: the training "
                                "process makes them). On a GPU, batch making rather than the network sets the pace")

    @model_validator(mode="after")
    def _pools_apart(self) -> "DataConfig":
        ranges = [(self.phantom_seed, self.phantom_cases)] + [(p.seed, p.cases) for p in self.extra_pools]
        ranges = sorted((s, s + n) for s, n in ranges if n)
        for (a0, a1), (b0, b1) in zip(ranges, ranges[1:]):
            if b0 < a1:
                raise ValueError(f"phantom pools overlap: seeds {a0}-{a1 - 1} and {b0}-{b1 - 1}")
        return self

    @model_validator(mode="after")
    def _validation_apart(self) -> "DataConfig":
        both = {d.resolve() for d in self.dataset_dirs} & {d.resolve() for d in self.val_dataset_dirs}
        if both:
            raise ValueError(f"{', '.join(sorted(map(str, both)))} is in both dataset_dirs and val_dataset_dirs: "
                             "scans validated on must not be trained on (their F1 would say nothing)")
        return self


class SamplingConfig(Strict):
    lesion_p: float = Field(0.5, ge=0, le=1, description="patches centred on a lesion")
    lesion_pick: Literal["voxel", "lesion", "region"] = Field("voxel", description="voxel: a random edema voxel "
                                                              "(large lesions get most patches); lesion: a random "
                                                              "voxel of a uniformly chosen lesion (small and faint "
                                                              "ones get their share); region: of a uniformly chosen "
                                                              "lesion in a uniformly chosen body region among the "
                                                              "case's lesions' (pelvis, feet, spine get theirs)")
    rare_site_p: float = Field(0.2, ge=0, le=1, description="patches centred on a random site (uniform over sites)")
    focus_sites: list[str] = Field(default_factory=list, description="site codes or code prefixes of sites.tsv "
                                   "(e.g. ulna, vertebra_C): the rare-site patches draw among these sites where the "
                                   "case holds any, so anatomy the network names worst gets most of them")
    mimic_p: float = Field(0.0, ge=0, le=1, description="patches centred on bright marrow outside any lesion (hard "
                           "negatives: red marrow, physes, foot foci, fat-suppression failure); needs a site map")
    mimic_quantile: float = Field(0.9, ge=0.5, lt=1, description="marrow brighter than this quantile of the case's "
                                  "lesion-free marrow counts as a mimic")
    mimic_margin: int = Field(0, ge=0, le=10, description="mimic voxels lie at least this many model-grid voxels "
                              "from any edema (0: lesion rims count too)")
    centre_jitter: float = Field(1.0, ge=0, le=1, description="move each patch off its chosen voxel by up to this "
                                 "share of the half patch (uniform per axis; the voxel stays 8 voxels inside). 0 "
                                 "puts the voxel at the patch centre, as models up to 1.2.13550 were trained: they "
                                 "learned where lesions sit relative to the strides, and a few voxels' shift of "
                                 "the input changes their answer for some lesions")
    batch_size: int = Field(2, ge=1)

    @model_validator(mode="after")
    def _focus_known(self) -> "SamplingConfig":
        unknown = [f for f in self.focus_sites if not any(code.startswith(f) for code in by_code())]
        if unknown:
            raise ValueError(f"focus_sites {unknown} match no site code of sites.tsv (e.g. ulna, vertebra_C, sternum)")
        return self

    @model_validator(mode="after")
    def _shares(self) -> "SamplingConfig":
        total = self.lesion_p + self.rare_site_p + self.mimic_p
        if total > 1 + 1e-9:
            raise ValueError(f"lesion_p + rare_site_p + mimic_p = {total:.3g} must be <= 1 (the rest: random body patches)")
        return self


class AugmentConfig(Strict):
    rotate_deg: float = Field(10.0, ge=0, le=45)
    scale: Range = (0.9, 1.1)
    gamma: Range = (0.75, 1.35)
    intensity_scale: Range = (0.6, 1.6)
    noise_std: Range = (0.0, 0.04)
    on_device: bool = Field(False, description="augment whole batches on the training device (a GPU) instead of "
                            "patch by patch in the processes that make batches, where rotation and scaling take "
                            "about 90% of the time; the same transforms and ranges")
    p: float = Field(0.8, ge=0, le=1)


class LossConfig(Strict):
    edema_weight: float = 1.0
    edema_pos_weight: float = Field(1.0, gt=0, description="BCE weight of lesion voxels (the Dice term already "
                                    "balances the classes; >1 trades precision for sensitivity)")
    bone_weight: float = 0.5
    physis_weight: float = 0.3
    sites_weight: float = 0.5
    dice: bool = Field(True, description="add soft Dice to the edema and bone BCE and to the sites CE")
    blob_weight: float = Field(0.0, ge=0, description="weight of a lesion-wise edema Dice (blob loss, Kofler et al. "
                               "2022): each connected lesion of a patch scored on its own, the other lesions masked "
                               "out, and averaged, so a small or faint lesion counts as much as a large one (the "
                               "batch Dice lets large lesions dominate); 0 = off")
    anchor_weight: float = Field(0.0, ge=0, description="hold the edema channel to the --init model's (learning "
                                 "without forgetting, Li and Hoiem 2016): BCE and soft Dice of the edema output "
                                 "against the --init network's edema probabilities on the same patch. With "
                                 "edema_weight 0 and blob_weight 0 a fine-tune learns new anatomy (bone, physis, "
                                 "sites) while lesion detection stays near the --init model's; 0 = off, needs init")
    anchor_from: Optional[Path] = Field(None, description="the model whose edema output anchor_weight holds "
                                        "(default: the --init model as it was); e.g. a run that continues an "
                                        "earlier fine-tune from its weights but keeps the shipped model's edema")
    anchor_outside_lesions: int = Field(-1, ge=-1, le=10, description="-1: the anchor holds every voxel; n >= 0: "
                                        "only voxels more than n model-grid voxels from any lesion of the target, so "
                                        "edema_weight teaches the lesions (e.g. fainter ones) while normal marrow, "
                                        "where false positives arise, keeps the anchor model's answer")
    plate_weight: float = Field(0.0, ge=0, description="edema BCE averaged over the voxels on or beside a growth "
                                "plate or apophysis (the physis target, within plate_margin): teaches that normal "
                                "plates are not edema and that lesions over them are, with a weight that does not "
                                "shrink with the plates' few voxels; with anchor_weight the anchor lets go of these "
                                "voxels. 0 = off")
    anchor_anatomy_weight: float = Field(0.0, ge=0, description="hold the bone and physis outputs to the anchor "
                                         "model's too (BCE against its probabilities on every voxel), so a fine-tune "
                                         "of the edema output leaves the bone map, and with it the site map's extent, "
                                         "where it was; 0 = off, needs anchor_weight")
    plate_margin: int = Field(1, ge=0, le=5, description="plate_weight's voxels lie within this many model-grid "
                              "voxels of a plate")
    plate_pos_weight: float = Field(1.0, gt=0, description="BCE weight of lesion voxels within plate_weight's "
                                    "zone: the zone holds many more normal plate voxels than lesion voxels, and "
                                    "teaching the plates alone made lesions beside them less confident (weighted 4x in "
                                    "stage 33, they lost more: models/default/HISTORY.md)")


class OptimConfig(Strict):
    lr: float = Field(2e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    steps: int = Field(3000, ge=1)
    warmup: int = Field(100, ge=0)
    schedule: Literal["cosine", "constant", "poly"] = "cosine"
    grad_clip: float = Field(12.0, gt=0)
    train_only: list[NetworkPart] = Field(
        [], description="train only these parts of the network (body: the U-Net; voxel: the edema, bone and physis "
        "head; sites: the site head) and hold the rest fixed, batch-norm statistics included; e.g. [sites] with "
        "--init teaches the site head anew while every edema, bone and physis output stays the --init model's "
        "to the bit; [top, voxel]: the last full-resolution up block and the voxel head, which the site head does "
        "not read (arch unet), so the site logits stay to the bit. Empty: the whole network")
    minutes: float = Field(0.0, ge=0, description="train for about this long instead (0: exactly `steps`): the step "
                           "count is set from the pace measured once the batch queue is full and re-set as the pace "
                           "changes, the schedule bending smoothly to end on time, and training stops, exporting as "
                           "usual, when the time is up (a GPU lease)")


class TrainConfig(Strict):
    name: str = "wbmri-default"
    out_dir: Path = Path("runs/default")
    seed: int = Field(0, ge=0)
    device: str = "auto"
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    threads: int = Field(0, ge=0, description="torch threads (0: all cores)")
    network: NetworkConfig = NetworkConfig()
    synth: SynthConfig = SynthConfig()
    data: DataConfig = DataConfig()
    sampling: SamplingConfig = SamplingConfig()
    augment: AugmentConfig = AugmentConfig()
    loss: LossConfig = LossConfig()
    optim: OptimConfig = OptimConfig()
    checkpoint_every: int = Field(200, ge=1)
    val_every: int = Field(400, ge=1)
    early_stop_patience: int = Field(0, ge=0, description="validations without improvement before stopping (0: off)")
    precise_bn_batches: int = Field(0, ge=0, description="before each validation and the final export, re-estimate the "
                                    "batch-norm statistics as the plain average over this many training batches "
                                    "(precise BN; 0: keep the running averages training leaves)")
    init: Optional[Path] = None
    edema_threshold: float = Field(0.5, gt=0, lt=1)
    min_lesion_ml: float = Field(0.1, ge=0)

    @model_validator(mode="after")
    def _anchor_needs_init(self) -> "TrainConfig":
        if self.loss.anchor_weight > 0 and self.init is None:
            raise ValueError("loss.anchor_weight holds the edema output to the --init model's: set init too")
        if self.loss.anchor_anatomy_weight > 0 and self.loss.anchor_weight <= 0:
            raise ValueError("loss.anchor_anatomy_weight holds bone and physis to the anchor model: set "
                             "loss.anchor_weight too")
        if "top" in self.optim.train_only and self.network.arch != "unet":
            raise ValueError("optim.train_only 'top' (the U-Net's last up block) needs network.arch unet")
        return self

    @model_validator(mode="after")
    def _patch_fits(self) -> "TrainConfig":
        div = 1
        for s in self.network.strides:
            div *= s
        if any(p % (2 * div) for p in self.network.patch):
            raise ValueError(f"network.patch {self.network.patch} must be multiples of {2 * div}")
        return self


class ConfigError(ValueError):
    """A config file or override that does not fit the schema; the message lists every problem."""


def _parse_value(text: str) -> Any:
    """An override's value as YAML; a number in exponent notation without a dot (``1e9``, which YAML 1.1 reads as
    a string) as a number."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{text!r} is not a valid YAML value ({str(exc).splitlines()[0]})") from None
    if isinstance(value, str) and re.fullmatch(r"[+-]?\d+(\.\d*)?[eE][+-]?\d+", value):
        return float(value)
    return value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` strings (values parsed as YAML) to a nested dict."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.path=value")
        key, value = item.split("=", 1)
        if not key.strip():
            raise ConfigError(f"override {item!r} must look like key.path=value")
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
        try:
            node[parts[-1]] = _parse_value(value)
        except ConfigError as exc:
            raise ConfigError(f"override {item!r}: {exc}") from None
    return data


def _format_errors(exc: ValidationError, source: str, overrides: list[str] = ()) -> str:
    """Every problem on its own line; one that an override set names its ``--set`` (a list given without brackets
    gets the YAML list form to use)."""
    given = {item.split("=", 1)[0].strip(): item for item in overrides if "=" in item}
    lines = [f"{source}: {len(exc.errors())} problem(s) in the configuration"]
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
        item = next((given[k] for k in given if loc == k or loc.startswith(k + ".")), None)
        if item is not None:
            msg += f" (from --set {item}"
            if err["type"] == "list_type":
                msg += f"; a list is written {item.split('=', 1)[0]}=[a,b]"
            msg += ")"
        lines.append(f"  - {loc}: {msg}")
    return "\n".join(lines)


def load_config(kind: type[BaseModel], path: Path | None = None, overrides: list[str] | None = None):
    """Load YAML (optional), apply overrides, validate against ``kind``; raise ConfigError with every problem."""
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({exc})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
        source = str(path)
    data = apply_overrides(data, list(overrides or []))
    try:
        return kind.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, source, list(overrides or []))) from None
