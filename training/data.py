"""Training data: cases on the model grid (phantom pool or nnU-Net raw folders), patch sampling, augmentation.

A case on the model grid is a dict of arrays (MONAI style):
``image`` float16 (normalised), ``edema`` uint8 0/1, ``sites`` uint8 (255 = unknown), ``physis`` uint8 (255 = unknown).
"""
from __future__ import annotations

import hashlib
import json
import math
import multiprocessing as mp
import os
import time
from collections import OrderedDict
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from models.lesions import components
from models.nifti import InputError
from models.preprocessing import normalise, plan_grid, rereference, to_model_grid
from models.sites import by_id
from training.config import AugmentConfig, SamplingConfig, SynthConfig, TrainConfig
from training.metrics import majority_labels
from training.nnunet import dataset_files, raise_problems, read_case

UNKNOWN = 255


def to_model_case(image: np.ndarray, affine: np.ndarray, spacing, lesions: np.ndarray | None,
                  sites: np.ndarray | None, physis: np.ndarray | None) -> dict[str, np.ndarray]:
    """Bring a labelled case onto the model grid with the same preprocessing as inference."""
    grid = plan_grid(image.shape, affine, tuple(spacing))
    img = normalise(to_model_grid(image.astype(np.float32), grid, "trilinear"))
    out = {"image": img.astype(np.float16)}
    for key, arr in (("edema", lesions), ("sites", sites), ("physis", physis)):
        if arr is None:
            out[key] = np.full(grid.model_shape, UNKNOWN, np.uint8)
        else:
            lab = to_model_grid(arr.astype(np.int32 if key == "edema" else np.uint8), grid, "nearest-exact")
            if key == "edema":
                lab = lab > 0
            out[key] = lab.astype(np.uint8)
    if lesions is not None:
        out["instances"] = to_model_grid(lesions.astype(np.int32), grid, "nearest-exact").astype(np.uint16)
    return out


def with_reference(case: dict[str, np.ndarray], reference: str) -> dict[str, np.ndarray]:
    """A cached case (normalised to ``p99``, whatever the network) with its image re-scaled to ``reference``."""
    if reference == "p99":
        return case
    return {**case, "image": rereference(case["image"].astype(np.float32), reference).astype(np.float16)}


def phantom_model_case(seed: int, synth: SynthConfig, spacing) -> dict[str, np.ndarray]:
    from training.phantom.generate import generate_case
    case = generate_case(seed, synth)
    out = to_model_case(np.asarray(case.image, np.float32), case.affine, spacing, case.lesions, case.sites, case.physis)
    out["fov"] = np.array(case.meta["acquisition"]["fov"])
    return out


def phantom_cache_name(kind: str, synth: SynthConfig, first_seed: int, spacing) -> str:
    """Folder name of cached phantom cases: changes with the generator version, the synth config and the grid, so
    a stale cache is never reused after the phantom changes."""
    from training.phantom.generate import GENERATOR_VERSION
    return f"{kind}_g{GENERATOR_VERSION}_{synth_digest(synth)}_{first_seed}_{grid_tag(spacing)}"


# Settings added after generator 1.3, each with the value that reproduces the cases made before it existed (the
# default, except sequence_p, whose {t2_fs: 1} is generator 1.4, and body.spine, whose uniform is 1.5): left out of
# the digest at that value, so caches made before the setting existed stay valid.
_DIGEST_SILENT_DEFAULTS = {("lesions", "muscle_floor"): 1.0, ("acquisition", "plane_p"): {"coronal": 1.0},
                           ("acquisition", "sequence_p"): {"t2_fs": 1.0}, ("body", "spine"): "uniform",
                           ("acquisition", "dixon"): {"snr_gain": 1.5, "swap_p": 0.2, "swap_radius_mm": [40.0, 120.0],
                                                      "fat_signal": [0.6, 0.9]}}  # literals: a changed default must change the digest


def synth_digest(synth: SynthConfig) -> str:
    """Eight hex digits of the phantom config (compact JSON, as pydantic writes it)."""
    data = synth.model_dump(mode="json")
    for (section, key), default in _DIGEST_SILENT_DEFAULTS.items():
        if data[section][key] == default:
            del data[section][key]
    return hashlib.sha256(json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode()).hexdigest()[:8]


def grid_tag(spacing) -> str:
    """The model grid in a cache folder's name, e.g. ``3x3x3mm``."""
    return "x".join(f"{s:g}" for s in spacing) + "mm"


def dataset_cache_dir(folder: Path, spacing, cache_dir: Path) -> Path:
    """Where a dataset's cases on the model grid are cached: one folder per dataset path and grid, so two datasets
    with the same folder name, or one dataset on two grids, never share cached cases."""
    folder = Path(folder)
    digest = hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:8]
    return Path(cache_dir) / f"{folder.name}_{digest}_{grid_tag(spacing)}"


def save_npz(path: Path, case: dict[str, np.ndarray]) -> None:
    tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")  # unique: two producers may race for one case
    np.savez(tmp, **case)
    os.replace(tmp, path)


def load_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def _producer(seeds: list[int], synth_json: str, spacing, folder: str, threads: int = 1, nice: int = 0,
              parent: int | None = None) -> None:
    if nice:
        os.nice(nice)  # background filler: training keeps the cores
    torch.set_num_threads(threads)
    synth = SynthConfig.model_validate_json(synth_json)
    for seed in seeds:
        if parent is not None and os.getppid() != parent:
            return  # the training process is gone (e.g. killed): stop filling its pool
        path = Path(folder) / f"{seed}.npz"
        if path.exists():
            continue
        save_npz(path, phantom_model_case(seed, synth, spacing))


class PhantomPool:
    """A folder of phantom cases on the model grid, filled by worker processes (resumable: files persist)."""

    def __init__(self, folder: Path, seeds: list[int], synth: SynthConfig, spacing, workers: int = 1):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.seeds = seeds
        self.synth, self.spacing, self.workers = synth, spacing, workers
        self.procs: list[mp.Process] = []

    def __getstate__(self) -> dict:
        return {**self.__dict__, "procs": []}  # a copy in another process (a batch loader) only reads the folder

    def missing(self) -> list[int]:
        return [s for s in self.seeds if not (self.folder / f"{s}.npz").exists()]

    def start(self, nice: int = 19) -> None:
        """Fill the folder in ``workers`` processes: at nice 19 beside training (the default), at 0 to prepare."""
        todo = self.missing()
        if not todo:
            return
        ctx = mp.get_context("spawn")
        n = max(1, min(self.workers, len(todo)))
        for w in range(n):
            p = ctx.Process(target=_producer, args=(todo[w::n], self.synth.model_dump_json(), tuple(self.spacing),
                                                    str(self.folder), 1, nice, os.getpid()), daemon=True)
            p.start()
            self.procs.append(p)

    def fill_now(self) -> None:
        """Generate every missing case in this process (tests, small pools)."""
        _producer(self.seeds, self.synth.model_dump_json(), tuple(self.spacing), str(self.folder),
                  torch.get_num_threads())

    def ready(self) -> list[Path]:
        return [self.folder / f"{s}.npz" for s in self.seeds if (self.folder / f"{s}.npz").exists()]

    def alive(self) -> bool:
        return any(p.is_alive() for p in self.procs)

    def wait(self, n: int, timeout_s: float = 3600) -> None:
        t0 = time.time()
        while len(self.ready()) < min(n, len(self.seeds)):
            if time.time() - t0 > timeout_s:
                raise TimeoutError(f"phantom pool: only {len(self.ready())} of {n} cases after {timeout_s:.0f} s")
            if self.procs and not self.alive() and len(self.ready()) < n:
                raise RuntimeError("phantom pool producer died; see its traceback above")
            time.sleep(2)

    def stop(self) -> None:
        for p in self.procs:
            if p.is_alive():
                p.terminate()


def _nbytes(case: dict[str, np.ndarray]) -> int:
    return sum(a.nbytes for a in case.values())


class CaseCache:
    """Training cases read from their npz files; the most recently used stay in memory up to ``max_bytes`` (a pool
    of hundreds of cases no longer has to fit in RAM: the rest are re-read, usually from the OS page cache)."""

    def __init__(self, max_bytes: int, prepare: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]] | None = None):
        self.max_bytes = max_bytes
        self.prepare = prepare  # applied once per read (e.g. the network's intensity reference)
        self._items: OrderedDict[Path, dict[str, np.ndarray]] = OrderedDict()
        self.bytes = 0
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._items)

    def get(self, path: Path) -> dict[str, np.ndarray]:
        case = self._items.get(path)
        if case is not None:
            self._items.move_to_end(path)
            self.hits += 1
            return case
        self.misses += 1
        case = load_npz(path)
        if self.prepare is not None:
            case = self.prepare(case)
        size = _nbytes(case)
        if size <= self.max_bytes:
            self._items[path] = case
            self.bytes += size
            while self.bytes > self.max_bytes:
                _, old = self._items.popitem(last=False)
                self.bytes -= _nbytes(old)
        return case


# Bumped when a dataset's cached cases change meaning, so older caches are made again. 2: a binary label's lesions
# are its 26-connected components (format 1 kept the whole mask as one lesion, so validation on a user's held-out
# scans counted every lesion of a scan as found when one was).
DATASET_CACHE_FORMAT = 2


def _cache_case(case, dst: Path, sources: dict, spacing) -> str | None:
    """Read one nnU-Net case, bring it onto the model grid and cache it; the problem's text if it cannot be used."""
    try:
        vol, lesions, sites, physis = read_case(case)
    except InputError as exc:
        return str(exc)
    save_npz(dst, to_model_case(vol.data, vol.affine, spacing, lesions, sites, physis))
    dst.with_suffix(".sources.json").write_text(json.dumps(sources))
    return None


def nnunet_cases(folder: Path, spacing, cache_dir: Path, workers: int = 1) -> list[Path]:
    """Preprocess an nnU-Net raw dataset (:mod:`training.nnunet`: imagesTr/NAME_0000.nii.gz, labelsTr/NAME.nii.gz,
    optional sitesTr/ and physisTr/; without those, their losses are masked for the case) into cached npz files,
    ``workers`` cases at a time.

    A case is cached again whenever its set of files or any file's size or modification time changes (a label
    replaced by an older copy too), or the cache format (DATASET_CACHE_FORMAT). Every case is checked before an
    error is raised, which lists them all.
    """
    folder = Path(folder)
    cases = dataset_files(folder)
    cache = dataset_cache_dir(folder, spacing, cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    todo = []
    for case in cases:
        dst = cache / f"{case.name}.npz"
        stamp = dst.with_suffix(".sources.json")
        sources = {str(p.relative_to(folder)): [p.stat().st_size, p.stat().st_mtime_ns] for p in case.sources}
        sources["format"] = DATASET_CACHE_FORMAT
        if not (dst.exists() and stamp.exists() and json.loads(stamp.read_text()) == sources):
            todo.append((case, dst, sources, tuple(spacing)))
    if workers > 1 and len(todo) > 1:
        from concurrent.futures import ProcessPoolExecutor
        with ProcessPoolExecutor(min(workers, len(todo)), mp_context=mp.get_context("spawn")) as ex:
            problems = list(ex.map(_cache_case, *zip(*todo)))
    else:
        problems = [_cache_case(*args) for args in todo]
    failed = {args[1] for args, problem in zip(todo, problems) if problem}
    problems = [p for p in problems if p]
    raise_problems(problems, f"{folder}: {len(problems)} of {len(cases)} cases cannot be used")
    return [cache / f"{case.name}.npz" for case in cases if cache / f"{case.name}.npz" not in failed]


# ------------------------------------------------------------------------------------------------ patches
def _pick(rng: np.random.Generator, mask: np.ndarray, stride: int) -> np.ndarray | None:
    """A random True voxel of ``mask`` (searched on a strided grid, then at full resolution), or None."""
    for step in (stride, 1):
        idx = np.argwhere(mask[::step, ::step, ::step])
        if len(idx):
            return idx[rng.integers(len(idx))] * step
    return None


def mimic_mask(case: dict[str, np.ndarray], quantile: float, margin: int = 0) -> np.ndarray | None:
    """Bright bone voxels outside any lesion: those above ``quantile`` of the case's lesion-free bone signal (red
    marrow, physes, foot foci, patchy fat-suppression failure: what the network must learn to leave alone),
    at least ``margin`` voxels from any edema (a lesion's own fading rim is not a mimic). None when the case has
    no site map or no such voxel."""
    from scipy.ndimage import binary_dilation
    sites, edema = case["sites"], case["edema"]
    if sites.flat[0] == UNKNOWN and (sites == UNKNOWN).all():
        return None
    calm = (sites > 0) & (sites != UNKNOWN) & (edema == 0)
    if margin > 0 and (edema == 1).any():
        calm &= ~binary_dilation(edema == 1, iterations=margin)
    values = case["image"][calm]
    if values.size == 0:
        return None
    return calm & (case["image"] > np.quantile(values.astype(np.float32), quantile))


def pick_lesion_voxel(case: dict[str, np.ndarray], rng: np.random.Generator, by_region: bool = False) -> np.ndarray | None:
    """A voxel of a lesion chosen uniformly among the case's lesions, so a small or faint lesion is a patch centre
    as often as a large one; with ``by_region``, of a lesion chosen uniformly within a body region (sites.tsv's
    ``region`` of the lesion's majority site) chosen uniformly among the regions that hold the case's lesions, so a
    pelvic or foot lesion is a centre as often as the knee lesions beside it (where the case has no site reference,
    every lesion is one region). Lesions are the case's ``instances`` or, where those are not known (binary labels
    of the nnU-Net layout), the connected components of its edema (:func:`models.lesions.components`)."""
    edema = case["edema"] == 1
    labels, box = case.get("instances"), tuple(slice(0, s) for s in edema.shape)
    flat = np.flatnonzero((labels > 0) & edema) if labels is not None else np.empty(0, np.int64)
    ids = labels.ravel()[flat] if labels is not None else flat
    if len(np.unique(ids)) < 2:  # one id may be a binary label holding several lesions: label the edema's box
        where = np.argwhere(edema)
        if len(where) == 0:
            return None
        box = tuple(slice(a, b + 1) for a, b in zip(where.min(axis=0), where.max(axis=0)))
        labels = components(edema[box]).labels
        flat = np.flatnonzero(labels)
        ids = labels.ravel()[flat]
    lesions = np.unique(ids)
    if by_region and "sites" in case:
        regions = lesion_regions(case["sites"][box].ravel()[flat], ids, lesions)
        region = rng.choice(np.unique(regions))
        lesions = lesions[regions == region]
    chosen = rng.choice(lesions)
    lo = np.array([sl.start for sl in box])
    return lo + np.array(np.unravel_index(rng.choice(flat[ids == chosen]), labels.shape))


def lesion_regions(sites: np.ndarray, ids: np.ndarray, lesions: np.ndarray) -> np.ndarray:
    """Per lesion id of ``lesions``, the body region of its majority site among its voxels' ``sites`` (``ids``: each
    voxel's lesion id); "none" for a lesion outside bone or without a site reference."""
    table = by_id()
    majority = majority_labels(ids, np.where(sites == UNKNOWN, 0, sites))
    return np.array([table[majority[lid]].region if majority[lid] in table else "none" for lid in lesions])


@lru_cache(maxsize=None)
def focus_ids(prefixes: tuple[str, ...]) -> np.ndarray:
    """Site ids whose code starts with any of ``prefixes`` (``sampling.focus_sites``)."""
    return np.array([sid for sid, site in by_id().items() if site.code.startswith(prefixes)], np.int64) \
        if prefixes else np.empty(0, np.int64)


def sample_centre(case: dict[str, np.ndarray], rng: np.random.Generator, sp: SamplingConfig) -> np.ndarray:
    """Patch centre, with the shares of ``sp``: on a lesion (a random edema voxel; with ``lesion_pick: lesion`` a
    voxel of a uniformly chosen lesion, with ``region`` of a lesion of a uniformly chosen body region), on a
    uniformly chosen bone site (rare sites get their share; among ``focus_sites`` where the case has any), on
    bright lesion-free marrow (:func:`mimic_mask`), or anywhere in the body."""
    u = rng.random()
    centre = None
    if u < sp.lesion_p:
        if sp.lesion_pick == "voxel":
            centre = _pick(rng, case["edema"] == 1, 2)
        else:
            centre = pick_lesion_voxel(case, rng, by_region=sp.lesion_pick == "region")
    elif u < sp.lesion_p + sp.rare_site_p:
        sites = case["sites"]
        present = np.unique(sites[::3, ::3, ::3])
        present = present[(present > 0) & (present != UNKNOWN)]
        focus = present[np.isin(present, focus_ids(tuple(sp.focus_sites)))]
        present = focus if len(focus) else present
        if len(present):
            centre = _pick(rng, sites == rng.choice(present), 2)
    elif u < sp.lesion_p + sp.rare_site_p + sp.mimic_p:
        mask = mimic_mask(case, sp.mimic_quantile, sp.mimic_margin)
        if mask is not None:
            centre = _pick(rng, mask, 2)
    if centre is None:
        centre = _pick(rng, case["image"] > 0.05, 4)
    return centre if centre is not None else np.array(case["image"].shape) // 2


JITTER_MARGIN = 8  # voxels a jittered patch keeps between its chosen voxel and its faces


def jitter_centre(centre: np.ndarray, patch, rng: np.random.Generator, fraction: float) -> np.ndarray:
    """``centre`` moved by a uniform integer offset of up to ``fraction`` of (half the patch - the margin) per axis,
    so the chosen voxel lands anywhere in the patch (nnU-Net's way) rather than always at its centre, where a
    network learns its position relative to the strided convolutions."""
    reach = np.floor(fraction * np.maximum(np.asarray(patch) // 2 - JITTER_MARGIN, 0)).astype(int)
    return np.asarray(centre) + rng.integers(-reach, reach + 1)


def crop(case: dict[str, np.ndarray], centre: np.ndarray, patch) -> dict[str, np.ndarray]:
    """A patch around centre, zero-padded (labels: image 0, sites 0, unknown stays unknown) where it leaves the volume."""
    shape = np.array(case["image"].shape)
    patch = np.array(patch)
    lo = centre - patch // 2
    out = {}
    src_lo = np.maximum(lo, 0)
    src_hi = np.minimum(lo + patch, shape)
    dst_lo = src_lo - lo
    dst_hi = dst_lo + (src_hi - src_lo)
    for key in ("image", "edema", "sites", "physis"):
        arr = case[key]
        fill = UNKNOWN if key != "image" and arr.flat[0] == UNKNOWN else 0  # absent targets are all-UNKNOWN maps
        buf = np.full(tuple(patch), fill, np.float32 if key == "image" else np.uint8)
        buf[dst_lo[0]:dst_hi[0], dst_lo[1]:dst_hi[1], dst_lo[2]:dst_hi[2]] = \
            arr[src_lo[0]:src_hi[0], src_lo[1]:src_hi[1], src_lo[2]:src_hi[2]]
        out[key] = buf
    return out


# shares of ``augment.p`` for the gamma and noise transforms (both augmentation paths)
GAMMA_SHARE, NOISE_SHARE = 0.6, 0.5


def build_augment(cfg: TrainConfig):
    """MONAI dictionary transforms: small rotations/scaling (no flips: left and right must stay), intensity."""
    from monai.transforms import (Compose, RandAdjustContrastd, RandAffined, RandGaussianNoised,
                                  RandScaleIntensityd)
    a = cfg.augment
    rot = np.radians(a.rotate_deg)
    keys = ["image", "edema", "sites", "physis"]
    return Compose([
        RandAffined(keys=keys, mode=["bilinear", "nearest", "nearest", "nearest"], prob=a.p,
                    rotate_range=(rot, rot, rot), scale_range=[(a.scale[0] - 1, a.scale[1] - 1)] * 3,
                    padding_mode="zeros", cache_grid=False),
        RandAdjustContrastd(keys=["image"], prob=a.p * GAMMA_SHARE, gamma=a.gamma),
        RandScaleIntensityd(keys=["image"], factors=(a.intensity_scale[0] - 1, a.intensity_scale[1] - 1), prob=a.p),
        RandGaussianNoised(keys=["image"], prob=a.p * NOISE_SHARE, std=a.noise_std[1]),
    ])


def make_batch(cases: list[dict[str, np.ndarray]], rng: np.random.Generator, cfg: TrainConfig, augment) -> dict[str, torch.Tensor]:
    """Stack augmented patches into tensors: image (B,1,D,H,W) and targets. ``augment`` None: patches as cropped
    (with ``augment.on_device`` the training process augments the batch: :func:`augment_batch`)."""
    items = []
    for case in cases:
        centre = jitter_centre(sample_centre(case, rng, cfg.sampling), cfg.network.patch, rng,
                               cfg.sampling.centre_jitter)
        patch = crop(case, centre, cfg.network.patch)
        d = {k: v[None] for k, v in patch.items()}
        if augment is not None:
            augment.set_random_state(seed=int(rng.integers(2 ** 31)))
            d = augment(d)
        item = {k: torch.as_tensor(np.asarray(v)) for k, v in d.items()}
        if cfg.loss.blob_weight > 0:
            item["blobs"] = torch.from_numpy(lesion_blobs(np.asarray(d["edema"])))
        items.append(item)
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


def ready_files(pools: list[PhantomPool], files: list[Path]) -> list[Path]:
    """The training cases there are now: the pools' cases made so far, then the dataset folders' cached cases."""
    return [f for pool in pools for f in pool.ready()] + files


class BatchStream(torch.utils.data.IterableDataset):
    """Endless training batches, made in the training process or by DataLoader workers: each iterator has its
    own random stream (``seed`` and its worker id) and case cache, and sees phantom pool cases as they are made.
    ``augment``: :func:`build_augment`'s transforms, or None (``augment.on_device``: :func:`augment_batch`)."""

    def __init__(self, pools: list[PhantomPool], files: list[Path], cfg: TrainConfig, augment, seed: int):
        self.pools, self.files, self.cfg, self.augment, self.seed = pools, files, cfg, augment, seed

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = torch.utils.data.get_worker_info()
        rng = np.random.default_rng([self.seed, info.id if info else 0])
        ref, n = self.cfg.network.intensity_reference, self.cfg.sampling.batch_size
        cache = CaseCache(int(self.cfg.data.ram_cache_gb * 2**30), prepare=lambda case: with_reference(case, ref))
        files, checked = ready_files(self.pools, self.files), time.time()
        while True:
            if time.time() - checked > 10:  # a growing pool: look for new cases now and then
                files, checked = ready_files(self.pools, self.files), time.time()
            picks = rng.choice(len(files), size=n, replace=len(files) < n)
            yield make_batch([cache.get(files[i]) for i in picks], rng, self.cfg, self.augment)


LABEL_KEYS = ("edema", "sites", "physis", "blobs")


def _rotation(angles: torch.Tensor) -> torch.Tensor:
    """(B, 3) angles in radians about x, y, z -> (B, 3, 3) rotation matrices Rz @ Ry @ Rx."""
    c, s = torch.cos(angles), torch.sin(angles)
    one, zero = torch.ones_like(c[:, 0]), torch.zeros_like(c[:, 0])
    rx = torch.stack([one, zero, zero, zero, c[:, 0], -s[:, 0], zero, s[:, 0], c[:, 0]], 1).view(-1, 3, 3)
    ry = torch.stack([c[:, 1], zero, s[:, 1], zero, one, zero, -s[:, 1], zero, c[:, 1]], 1).view(-1, 3, 3)
    rz = torch.stack([c[:, 2], -s[:, 2], zero, s[:, 2], c[:, 2], zero, zero, zero, one], 1).view(-1, 3, 3)
    return rz @ ry @ rx


def affine_theta(shape, angles: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """(B, 3, 4) ``affine_grid`` matrices of a rotation by ``angles`` (B, 3: about x, y, z) and scaling by
    ``scales`` (B, 3) about the centre of a (D, H, W) patch, in voxel units: the rotation is rigid even where the
    patch is not a cube (``affine_grid`` works in coordinates normalised to each side)."""
    m = _rotation(angles) @ torch.diag_embed(scales)
    half = torch.tensor([shape[2], shape[1], shape[0]], dtype=m.dtype, device=m.device) / 2  # x, y, z = W, H, D
    return torch.cat([m * half[None, None, :] / half[None, :, None], torch.zeros(len(m), 3, 1, dtype=m.dtype,
                                                                                   device=m.device)], 2)


def augment_batch(batch: dict[str, torch.Tensor], gen: torch.Generator, a: AugmentConfig) -> dict[str, torch.Tensor]:
    """The transforms of :func:`build_augment`, with its probabilities and ranges, applied to a whole batch on the
    device its tensors are on: rotation (up to ``rotate_deg`` about each axis) and per-axis scaling about the patch
    centre in voxel units (the grid is isotropic), bilinear for the image and nearest for the labels and lesion ids
    (zeros outside); then gamma on the sample's own range, intensity scaling and Gaussian noise. ``gen``: a CPU
    generator, so a run's draws do not depend on the device."""
    import torch.nn.functional as F
    img = batch["image"].float()
    n, dev = img.shape[0], img.device
    u = lambda *shape: torch.rand(*shape, generator=gen).to(dev)  # noqa: E731
    out = dict(batch)
    moved = torch.nonzero(u(n) < a.p).flatten()
    if len(moved):
        angles = (u(len(moved), 3) * 2 - 1) * math.radians(a.rotate_deg)
        scales = a.scale[0] + u(len(moved), 3) * (a.scale[1] - a.scale[0])
        grid = F.affine_grid(affine_theta(img.shape[2:], angles, scales), [len(moved), 1, *img.shape[2:]],
                             align_corners=False)
        img = img.clone()
        img[moved] = F.grid_sample(img[moved], grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        for key in LABEL_KEYS:
            if key in batch:
                lab = batch[key].clone()
                lab[moved] = F.grid_sample(batch[key][moved].float(), grid, mode="nearest", padding_mode="zeros",
                                           align_corners=False).to(lab.dtype)
                out[key] = lab
    lo = img.amin(dim=(1, 2, 3, 4), keepdim=True)
    span = img.amax(dim=(1, 2, 3, 4), keepdim=True) - lo
    gamma = (a.gamma[0] + u(n) * (a.gamma[1] - a.gamma[0])).view(-1, 1, 1, 1, 1)
    adjusted = ((img - lo) / (span + 1e-7)) ** gamma * span + lo
    img = torch.where((u(n) < a.p * GAMMA_SHARE).view(-1, 1, 1, 1, 1), adjusted, img)
    factor = (a.intensity_scale[0] + u(n) * (a.intensity_scale[1] - a.intensity_scale[0])).view(-1, 1, 1, 1, 1)
    img = torch.where((u(n) < a.p).view(-1, 1, 1, 1, 1), img * factor, img)
    std = (u(n) * a.noise_std[1] * (u(n) < a.p * NOISE_SHARE)).view(-1, 1, 1, 1, 1)
    on_dev = torch.Generator(device=dev)  # noise drawn where the batch is, seeded from ``gen``
    on_dev.manual_seed(int(torch.randint(2 ** 62, (1,), generator=gen)))
    noise = torch.randn(img.shape, generator=on_dev, device=dev)
    out["image"] = img + noise * std
    return out


def lesion_blobs(edema: np.ndarray) -> np.ndarray:
    """The lesions (as :func:`models.lesions.components` defines them) of an augmented (1, D, H, W) edema patch,
    ids 1..K, int16, same shape; unknown targets give none. Made from the binary target, so it works for datasets
    whose labels do not keep lesion instances (nnU-Net layout)."""
    return components(edema[0] == 1).labels[None].astype(np.int16)
