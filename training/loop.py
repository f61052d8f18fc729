"""The training loop: phantom pool and/or real data, two-head loss, checkpoints, resume, validation, DDP."""
from __future__ import annotations

import copy
import csv
import json
import math
import os
import platform
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from scipy import ndimage

from models.card import load_bundle, locate_bundle, save_bundle
from models.lesions import MIN_SIGNAL_RATIO, Components, components, near_bone
from models.site_rules import BONE_THRESHOLD, bone_thresholds, sites_in_bone
from models.networks import (BONE, EDEMA, PHYSIS, autocast_for, build_network, cpu_supports_bf16, fixed_modules,
                             resolve_device, upsample_site_ids, widen_input_weights)
from training.config import ConfigError, TrainConfig
from training.data import (UNKNOWN, BatchStream, PhantomPool, augment_batch, build_augment, load_npz, nnunet_cases,
                           phantom_cache_name, ready_files, with_reference)
from training.nnunet import DatasetError
from training.phantom.generate import generator_version_of


def _dist() -> tuple[int, int]:
    if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def use_bf16(cfg: TrainConfig, device: torch.device) -> bool:
    if cfg.precision == "fp32":
        return False
    if cfg.precision == "bf16":
        return True
    return device.type == "cuda" or cpu_supports_bf16()


def soft_dice_loss(prob: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Batch soft Dice (nnU-Net style: summed over the whole batch) of probabilities against a 0/1 target."""
    p, t = prob * mask, target * mask
    inter = (p * t).sum()
    return 1 - (2 * inter + 1) / (p.sum() + t.sum() + 1)


def blob_dice_loss(prob: torch.Tensor, blobs: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
    """Lesion-wise soft Dice (blob loss): for each lesion k of each patch, the soft Dice of the prediction against
    lesion k alone, over the patch without the other lesions (so a prediction elsewhere still costs), averaged
    over all lesions of the batch. Zero when the batch has no lesion."""
    losses = []
    for b in range(prob.shape[0]):
        ids = torch.unique(blobs[b])
        ids = ids[ids > 0]
        if not len(ids):
            continue
        p_all = prob[b] * known[b]
        for k in ids:
            t = (blobs[b] == k).float()
            p = p_all * ((blobs[b] == 0) | (blobs[b] == k)).float()
            losses.append(1 - (2 * (p * t).sum() + 1) / (p.sum() + t.sum() + 1))
    return torch.stack(losses).mean() if losses else prob.sum() * 0


def _bce(logits: torch.Tensor, target: torch.Tensor, known: torch.Tensor, pos_weight: float = 1.0) -> torch.Tensor:
    loss = F.binary_cross_entropy_with_logits(logits, target, pos_weight=torch.tensor(pos_weight, device=logits.device),
                                              reduction="none")
    return (loss * known).sum() / known.sum().clamp(min=1)


def sites_loss(logits: torch.Tensor, target: torch.Tensor, dice: bool) -> torch.Tensor:
    """Which bone, asked only inside bone: cross-entropy over the 66 site classes on bone voxels (target > 0),
    plus the mean soft Dice of the sites present. Where bone is, is the full-resolution bone channel's job;
    with the background in the softmax, 97% of voxels taught the head to say "no bone" and it never learned
    which bone (the first runs' site loss stayed flat)."""
    inside = target > 0
    if not inside.any():
        return logits.sum() * 0
    bone_logits = logits[:, 1:].movedim(1, -1)[inside].float()  # (bone voxels, 66): a few % of the patch, not all of it
    t = target[inside] - 1
    ce = F.cross_entropy(bone_logits, t)
    if not dice:
        return ce
    prob = torch.softmax(bone_logits, 1)
    onehot = F.one_hot(t, prob.shape[1]).to(prob.dtype)
    present = onehot.sum(0) > 0
    dsc = (2 * (prob * onehot).sum(0) + 1) / (prob.sum(0) + onehot.sum(0) + 1)
    return ce + (1 - dsc[present]).mean()


def _near(mask: torch.Tensor, margin: int) -> torch.Tensor:
    """1 on voxels within ``margin`` voxels (a cube) of ``mask``'s, as float."""
    mask = mask.float()
    return F.max_pool3d(mask, 2 * margin + 1, stride=1, padding=margin) if margin else mask


def anchor_mask(edema: torch.Tensor, margin: int) -> torch.Tensor:
    """Where ``loss.anchor_weight`` holds the edema output: everywhere (margin -1), or only on voxels more than
    ``margin`` voxels from any lesion voxel (and not unknown), so the lesions themselves learn from their labels."""
    if margin < 0:
        return torch.ones_like(edema, dtype=torch.float32)
    return (1 - _near(edema == 1, margin)) * (edema != UNKNOWN).float()


def compute_loss(voxel: torch.Tensor, sites: torch.Tensor, batch: dict[str, torch.Tensor], cfg: TrainConfig,
                 anchor: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """BCE + batch Dice for edema and bone, BCE for physis, CE + Dice for sites at half resolution (nnU-Net's
    compound loss per head); voxels whose target is unknown (255) are masked out. ``anchor``: the --init
    network's voxel probabilities on the same patch (edema first; ``loss.anchor_weight``): its edema is matched by
    BCE + soft Dice over every voxel or, with ``loss.anchor_outside_lesions``, only away from the lesions, and its
    bone and physis by BCE everywhere (``loss.anchor_anatomy_weight``); ``loss.plate_weight`` teaches the edema
    output on and beside the growth plates and apophyses, which the anchor then lets go of."""
    lc = cfg.loss
    voxel = voxel.float()  # sites are cast after gathering the bone voxels (sites_loss)
    parts: dict[str, torch.Tensor] = {}
    known = (batch["edema"] != UNKNOWN).float()
    edema_t = batch["edema"].float() * known
    parts["edema_bce"] = _bce(voxel[:, EDEMA:EDEMA + 1], edema_t, known, lc.edema_pos_weight)
    site_t = batch["sites"].long()
    known_s = (site_t != UNKNOWN).float()
    bone_t = ((site_t > 0) & (site_t != UNKNOWN)).float()
    parts["bone"] = _bce(voxel[:, BONE:BONE + 1], bone_t, known_s)
    if lc.dice:
        parts["edema_dice"] = soft_dice_loss(torch.sigmoid(voxel[:, EDEMA:EDEMA + 1]), edema_t, known)
        parts["bone"] = parts["bone"] + soft_dice_loss(torch.sigmoid(voxel[:, BONE:BONE + 1]), bone_t, known_s)
    if lc.blob_weight > 0 and "blobs" in batch:
        parts["edema_blob"] = blob_dice_loss(torch.sigmoid(voxel[:, EDEMA:EDEMA + 1]), batch["blobs"], known)
    phys = batch["physis"].float()
    known_p = (batch["physis"] != UNKNOWN).float()
    parts["physis"] = _bce(voxel[:, PHYSIS:PHYSIS + 1], phys * known_p, known_p, 4.0)
    half = site_t[:, 0, ::2, ::2, ::2]
    half = torch.where(half == UNKNOWN, torch.full_like(half, -100), half)
    half = half[:, : sites.shape[2], : sites.shape[3], : sites.shape[4]]
    parts["sites"] = sites_loss(sites, half, lc.dice) if (half >= 0).any() else sites.sum() * 0
    plates = None  # loss.plate_weight: voxels within plate_margin of a growth plate or apophysis, edema label known
    if lc.plate_weight > 0:
        plates = _near(batch["physis"] == 1, lc.plate_margin) * known
        parts["edema_plates"] = _bce(voxel[:, EDEMA:EDEMA + 1], edema_t, plates, lc.plate_pos_weight)
    if anchor is not None:
        edema_logits, held = voxel[:, EDEMA:EDEMA + 1], anchor_mask(batch["edema"], lc.anchor_outside_lesions)
        held = held if plates is None else held * (1 - plates)
        kept = anchor[:, EDEMA:EDEMA + 1]
        parts["edema_anchor"] = _bce(edema_logits, kept, held) + soft_dice_loss(torch.sigmoid(edema_logits), kept, held)
        if lc.anchor_anatomy_weight > 0:
            everywhere = torch.ones_like(kept)
            parts["anatomy_anchor"] = sum(_bce(voxel[:, c:c + 1], anchor[:, c:c + 1], everywhere) for c in (BONE, PHYSIS))
    total = lc.edema_weight * (parts["edema_bce"] + parts.get("edema_dice", 0)) + lc.bone_weight * parts["bone"] \
        + lc.physis_weight * parts["physis"] + lc.sites_weight * parts["sites"] \
        + lc.blob_weight * parts.get("edema_blob", 0) + lc.anchor_weight * parts.get("edema_anchor", 0) \
        + lc.plate_weight * parts.get("edema_plates", 0) + lc.anchor_anatomy_weight * parts.get("anatomy_anchor", 0)
    return total, {k: float(v.detach()) for k, v in parts.items()}


MAX_FP_PER_SCAN = 0.5  # the detection target: sensitivity is judged at <= 0.5 false positives per scan


def validation_groups(case: dict) -> list[str]:
    """The test sets a validation case stands for, for reporting false positives per kind of scan: its field of view
    (whole body or partial; ``scan`` when the case does not say, as for a user's dataset) and, when it has no
    lesion, the lesion-free scans."""
    fov = str(case["fov"]) if "fov" in case else None
    groups = ["scan" if fov is None else "whole_body" if fov == "whole_body" else "partial_fov"]
    if not np.any(case["instances"]):
        groups.append("lesion_free")
    return groups


def operating_point(results: list[dict], max_fp_per_scan: float = MAX_FP_PER_SCAN) -> dict:
    """The validation operating point: the most sensitive (edema threshold, bone share, lesion size, confidence)
    with at most ``max_fp_per_scan`` false positives per scan over all validation scans (ties: F1, then edema Dice,
    then the strictest rule: :func:`_strictness`); the best F1 if none is that clean. A budget below the target's
    0.5 picks a stricter rule (validation has underestimated the test sets' rate). A budget kept per kind of scan
    (whole body, partial, lesion-free at 0.3) was tried and not adopted. Both: models/default/HISTORY.md."""
    clean = [r for r in results if r["fp_per_scan"] is not None and r["fp_per_scan"] <= max_fp_per_scan]
    if clean:
        return max(clean, key=lambda r: (r["lesion_sens"] or 0, r["lesion_f1"], r["edema_dice"] or 0, *_strictness(r)))
    return max(results, key=lambda r: (r["lesion_f1"], r["edema_dice"] or 0, *_strictness(r)))


def _strictness(rule: dict) -> tuple[float, ...]:
    """Higher for a rule that flags less (confidence, edema threshold, lesion size, bone share): among rules the
    validation scans cannot tell apart (a few held-out scans often tie hundreds), the one least likely to flag
    normal marrow on scans it has not seen. The loosest came first before (edema 0.03, no confidence floor)."""
    return (rule.get("min_confidence") or 0.0, rule.get("threshold") or 0.0, rule.get("min_lesion_ml") or 0.0,
            rule.get("min_bone_fraction") or 0.0)


def operating_point_ci(per_case: np.ndarray) -> dict[str, tuple[float, float] | None]:
    """95% bootstrap intervals over the validation cases (:func:`training.metrics.bootstrap_ci`, as ``wbmri
    evaluate`` reports them) of the operating point's sensitivity for lesions >= 0.5 mL and its false positives
    per scan, from per-case (detected, reference lesions, false positives) rows. With tens of cases the false
    positive rate is known only roughly, and a rule picked as the most sensitive under its limit tends to be
    one whose rate was underestimated."""
    from training.metrics import bootstrap_ci
    detected, ref, fp = np.asarray(per_case, float).reshape(-1, 3).T
    return {"lesion_sens": bootstrap_ci(detected, ref), "fp_per_scan": bootstrap_ci(fp, np.ones_like(fp))}


SELECTION_METRIC = "lesion_f1_selection"  # the validation figure best/ is kept on (recorded in last.pt)
VAL_RULES = ("val_threshold", "val_min_ml", "val_bone_fraction", "val_min_confidence")  # set by validate()


def improves(candidate: tuple[float, float], best: tuple[float, float]) -> bool:
    """Whether a checkpoint's validation (selection F1, edema Dice) beats the best so far: higher F1, or the same F1
    with a higher Dice (8 validation cases give few distinct F1 values: stage 5 reached its best F1 at four steps).
    The selection F1 (:attr:`training.metrics.DetectionCounts.selection_f1`) lets each prediction detect one lesion:
    with the evaluation's rule an untrained network, flagging most of the volume, scored 1.0 and was kept as best."""
    return candidate[0] > best[0] or (candidate[0] == best[0] and candidate[1] > best[1])


def _bbox(mask: np.ndarray, margin: int = 0) -> tuple[slice, ...]:
    """The smallest box holding every True voxel of ``mask`` (grown by ``margin``); one corner voxel when none."""
    found = ndimage.find_objects(mask.astype(np.uint8))
    if not found:
        return tuple(slice(0, 1) for _ in mask.shape)
    return tuple(slice(max(0, sl.start - margin), min(n, sl.stop + margin)) for sl, n in zip(found[0], mask.shape))


def _trim_csv(path: Path, last_step: int) -> None:
    """Keep the header and the rows up to ``last_step`` (atomically)."""
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    kept = rows[:1] + [r for r in rows[1:] if r and r[0].isdigit() and int(r[0]) <= last_step]
    if len(kept) == len(rows):
        return
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="") as fh:
        csv.writer(fh).writerows(kept)
    os.replace(tmp, path)


def schedule_share(step: int, optim) -> float:
    """The share of the schedule after warm-up that ``step`` has reached with a fixed ``optim.steps``."""
    return max(0, step - optim.warmup) / max(1, optim.steps - optim.warmup)


def lr_at(step: int, cfg: TrainConfig, frac: float | None = None) -> float:
    """The learning rate at ``step``: linear warm-up, then the schedule at ``frac`` of its way (default: the share
    of the steps after warm-up taken; ``optim.minutes`` passes the Trainer's :func:`advance_schedule` instead)."""
    o = cfg.optim
    if step < o.warmup:
        return o.lr * (step + 1) / o.warmup
    if o.schedule == "constant":
        return o.lr
    if frac is None:
        frac = schedule_share(step, o)
    if o.schedule == "poly":
        return o.lr * (1 - frac) ** 0.9
    return o.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))


def advance_schedule(frac: float, step: int, steps: int) -> float:
    """One step further along the schedule: the way left over the steps left. With a fixed ``steps`` this is the
    same straight line as ``lr_at``'s default; when ``optim.minutes`` re-counts the steps as the pace changes,
    the learning rate bends smoothly instead of jumping to the new count's curve."""
    return min(1.0, frac + (1.0 - frac) / max(1, steps - step))


def share_workers(pools: list[PhantomPool], workers: int) -> None:
    """Split ``workers`` generator processes over the pools by the cases each still lacks (at least one each)."""
    missing = [len(p.missing()) for p in pools]
    total = sum(missing)
    shares = [workers * n / total if total else 0.0 for n in missing]
    counts = [int(x) for x in shares]
    for i in sorted(range(len(pools)), key=lambda i: shares[i] - counts[i], reverse=True)[:workers - sum(counts)]:
        counts[i] += 1  # the largest remainders get the processes left over
    for pool, n, count in zip(pools, missing, counts):
        pool.workers = max(1, count) if n else 0


# what a resumed run must share with the run it continues (its weights and optimiser state were made for them)
RESUME_KEYS = ("network", "init", "optim.train_only", "loss.anchor_from")


def resume_config(cfg: TrainConfig, checkpoint: Path) -> tuple[TrainConfig, list[str]]:
    """The config to resume ``checkpoint`` with: ``cfg``, with the run's own ``init`` when ``cfg`` names none (its
    lesion rules, TTA and lineage come from it), and notes saying so. A :class:`ConfigError` names every key of
    :data:`RESUME_KEYS` in which ``cfg`` differs from the run's (steps, time, validation and logging may change).
    The run's config is read as the schema reads it, so settings added since it started take their defaults; bundle
    paths are compared where training finds them (:func:`models.card.locate_bundle`)."""
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True).get("config")
    if not saved:
        return cfg, []
    from pydantic import ValidationError
    try:
        saved = json.loads(TrainConfig.model_validate(saved).model_dump_json())
    except ValidationError:  # a setting since removed or renamed: compare what is there as it is
        pass
    now = json.loads(cfg.model_dump_json())
    notes = []
    if now.get("init") is None and saved.get("init") is not None:
        cfg = cfg.model_copy(update={"init": Path(saved["init"])})
        now["init"] = saved["init"]
        notes.append(f"--resume: the run was started with --init {saved['init']}; continuing with it")

    def at(d: dict, key: str):
        for part in key.split("."):
            d = d.get(part) if isinstance(d, dict) else None
        return d

    def same(key: str) -> bool:
        a, b = at(saved, key), at(now, key)
        if key in ("init", "loss.anchor_from") and a is not None and b is not None:
            return locate_bundle(a).resolve() == locate_bundle(b).resolve()
        return a == b
    differ = [f"{k} (the run: {at(saved, k)!r}; now: {at(now, k)!r})" for k in RESUME_KEYS if not same(k)]
    if differ:
        raise ConfigError(f"--resume: this config differs from the run in {checkpoint.parent} in "
                          f"{'; '.join(differ)}. Resume with the run's own config (--config "
                          f"{checkpoint.parent / 'config.yaml'}), or start a new run")
    return cfg, notes


class Trainer:
    def __init__(self, cfg: TrainConfig, resume: bool = False, quiet: bool = False):
        self.cfg = cfg
        self.rank, self.world = _dist()
        self.quiet = quiet or self.rank != 0
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        try:
            self.device = resolve_device(cfg.device)
        except ValueError as exc:
            raise ConfigError(f"device: {exc}") from None
        torch.backends.cudnn.benchmark = self.device.type == "cuda"  # fixed patch size: pick the fastest kernels once
        self.bf16 = use_bf16(cfg, self.device)
        torch.manual_seed(cfg.seed + self.rank)
        self.rng = np.random.default_rng([cfg.seed, self.rank, int(time.time()) if resume else 0])
        self.out = Path(cfg.out_dir)
        self.net = build_network(cfg.network)
        self.init_card: dict = {}  # the --init model's card (its lesion rules, bone thresholds and TTA)
        if cfg.init:
            self._init_from(cfg.init)
        self.net = self.net.to(self.device).to(memory_format=torch.channels_last_3d)
        self.teacher = None  # loss.anchor_weight: the network whose edema output training keeps (anchor_from or --init)
        if cfg.loss.anchor_weight > 0:
            self.teacher = (self._anchor_net(cfg.loss.anchor_from) if cfg.loss.anchor_from
                            else copy.deepcopy(self.net)).eval().requires_grad_(False)
        self.fixed = fixed_modules(self.net, cfg.optim.train_only)  # held in eval mode: see train_mode
        self.model = self.net
        if self.world > 1:
            self.model = torch.nn.parallel.DistributedDataParallel(self.net)
        self.opt = torch.optim.AdamW([p for p in self.net.parameters() if p.requires_grad], lr=cfg.optim.lr,
                                     weight_decay=cfg.optim.weight_decay)
        self.step = 0
        self.best = -1.0        # validation selection F1 (DetectionCounts.selection_f1) of the best checkpoint
        self.best_dice = -1.0   # and its edema Dice, which breaks ties
        self.bad_vals = 0
        self.sched_frac = 0.0   # how far along the schedule after warm-up (optim.minutes, see advance_schedule)
        self.bn_step = -1       # the step whose batch-norm statistics precise_bn last re-estimated
        self.last_val: dict = {}  # the latest validation's figures (kept in last.pt, so a resumed run has them)
        if resume and (self.out / "last.pt").exists():
            self._load(self.out / "last.pt")

    def _bundle(self, folder: Path, flag: str):
        """A model bundle named by ``flag`` (``--init``, ``loss.anchor_from``); relative paths may also be read from
        the repository root (e.g. finetune.yaml's models/default, run from elsewhere). The spacing must match."""
        folder = locate_bundle(folder)
        try:
            bundle = load_bundle(folder)
        except (FileNotFoundError, ValueError) as exc:  # missing, or weights that fail the card's sha256
            raise ConfigError(f"{flag}: {exc}") from None
        if tuple(bundle.config.spacing_mm) != tuple(self.cfg.network.spacing_mm):
            raise ConfigError(f"{flag} {folder}: trained at {bundle.config.spacing_mm} mm, this run uses "
                             f"{self.cfg.network.spacing_mm} mm")
        return bundle

    def _anchor_net(self, folder: Path) -> torch.nn.Module:
        """``loss.anchor_from``'s network; it is fed this run's normalised patches, so its intensity reference must
        be this run's (a log channel it makes itself)."""
        bundle = self._bundle(folder, "loss.anchor_from")
        if bundle.config.intensity_reference != self.cfg.network.intensity_reference:
            raise ConfigError(f"loss.anchor_from {folder}: normalises by the {bundle.config.intensity_reference} "
                              f"intensity reference, this run by {self.cfg.network.intensity_reference}")
        return bundle.net.to(self.device).to(memory_format=torch.channels_last_3d)

    def _init_from(self, folder: Path) -> None:
        """Start from a bundle's weights (fine-tuning). Tensors whose name and shape match are copied; the rest
        (e.g. a re-designed head) keep their fresh initialisation and are listed; input convolutions of a network
        that gained the log channel are widened with zeros."""
        init = self._bundle(folder, "--init")
        self.init_card = init.card
        own = self.net.state_dict()
        same, widened = widen_input_weights(init.net.state_dict(), own)
        if not same:
            raise ConfigError(f"--init {folder}: no weights fit this run's network section")
        self.net.load_state_dict(same, strict=False)
        fresh = sorted(k for k in own if k not in same)
        if (fresh or widened) and not self.quiet:
            print(f"--init {folder}: {len(same)} tensors loaded"
                  + (f", {len(widened)} widened to the new input channel(s) with zero weights" if widened else "")
                  + (f", {len(fresh)} start fresh: {', '.join(fresh)}" if fresh else ""))

    # ------------------------------------------------------------------ data
    def _pools(self) -> tuple[list[PhantomPool], PhantomPool]:
        """The training phantom pools (the main one, then ``data.extra_pools``; none without phantom cases) and the
        validation phantoms, as cache folders."""
        cfg, sp = self.cfg, self.cfg.network.spacing_mm
        cache = Path(cfg.data.cache_dir)
        specs = ([(cfg.data.phantom_cases, cfg.data.phantom_seed, cfg.synth)] if cfg.data.phantom_cases else []) \
            + [(p.cases, p.seed, p.synth) for p in cfg.data.extra_pools]
        pools = [PhantomPool(cache / phantom_cache_name("pool", synth, seed, sp), [seed + i for i in range(n)], synth,
                             sp, cfg.data.workers) for n, seed, synth in specs]
        val = PhantomPool(cache / phantom_cache_name("val", cfg.synth, cfg.data.val_seed, sp),
                          [cfg.data.val_seed + i for i in range(cfg.data.val_cases)], cfg.synth, sp, cfg.data.workers)
        return pools, val

    def prepare(self, progress: bool = True) -> dict:
        """Make every cached case this run reads (phantom pool, validation phantoms, dataset folders) and return:
        ``data.workers`` processes at full priority, which is faster than filling the pool beside training."""
        t0 = time.time()
        # dataset folders first, held-out ones too: a bad one stops before any phantom is made
        dataset = len(self._dataset_cases(self.cfg.data.dataset_dirs, self.cfg.data.val_dataset_dirs)[0])
        train_pools, val = self._pools()
        pools = train_pools + [val]
        todo = sum(len(p.missing()) for p in pools)
        if todo and self.cfg.data.workers == 0:
            for p in pools:
                p.fill_now()
        elif todo:
            share_workers(pools, self.cfg.data.workers)
            for p in pools:
                p.start(nice=0)
            bar = None
            if progress and not self.quiet:
                from tqdm import tqdm
                bar = tqdm(total=todo, desc="prepare", unit="case", dynamic_ncols=True)
            try:
                while any(p.alive() for p in pools):
                    time.sleep(1)
                    if bar:
                        bar.n = todo - sum(len(p.missing()) for p in pools)
                        bar.refresh()
            finally:
                if bar:
                    bar.close()
                for p in pools:
                    p.stop()
            left = sum(len(p.missing()) for p in pools)
            if left:
                raise RuntimeError(f"prepare: {left} phantom cases were not made; see the producer's traceback above")
        return {"pool_cases": sum(len(p.ready()) for p in train_pools), "val_cases": len(val.ready()),
                "dataset_cases": dataset, "made": todo, "seconds": round(time.time() - t0, 1)}

    def setup_data(self) -> None:
        cfg = self.cfg
        self.train_files: list[Path] = []
        ref = cfg.network.intensity_reference  # caches hold p99-normalised images; each case is re-referenced on reading
        # dataset folders first, held-out ones too: a bad one stops the run before any phantom is made
        train_files, val_files = self._dataset_cases(cfg.data.dataset_dirs,
                                                     cfg.data.val_dataset_dirs if self.rank == 0 else [])
        self.train_files += train_files
        self.pools, val = self._pools()
        share_workers(self.pools, cfg.data.workers)
        for pool in self.pools:
            if cfg.data.workers == 0:
                pool.fill_now()
            elif self.rank == 0:
                pool.start()
        self.val_cases = []
        if self.rank == 0:
            val.fill_now()
            self.val_cases = [with_reference(load_npz(p), ref) for p in val.ready() + val_files]
        self.augment = None if cfg.augment.on_device else build_augment(cfg)
        self.augment_gen = torch.Generator().manual_seed(int(self.rng.integers(2 ** 62)))

    def _dataset_cases(self, *groups: list[Path]) -> list[list[Path]]:
        """The cached cases of each group of labelled folders (:func:`training.data.nnunet_cases`; e.g. the training
        and the held-out ones), every folder checked before one problem stops the run: all problems come at once."""
        out, problems = [], []
        for dirs in groups:
            out.append([])
            for d in dirs:
                try:
                    out[-1] += nnunet_cases(d, self.cfg.network.spacing_mm, Path(self.cfg.data.cache_dir),
                                            self.cfg.data.workers)
                except (DatasetError, FileNotFoundError) as exc:
                    problems.append(str(exc))
        if problems:
            raise DatasetError("\n".join(problems))
        return out

    def _files(self) -> list[Path]:
        return ready_files(self.pools, self.train_files)

    def _batches(self) -> Iterator[dict[str, torch.Tensor]]:
        """Endless training batches: made here, or with ``data.loader_workers`` in DataLoader processes."""
        stream = BatchStream(self.pools, self.train_files, self.cfg, self.augment, int(self.rng.integers(2 ** 31)))
        if not self.cfg.data.loader_workers:
            return iter(stream)
        return iter(torch.utils.data.DataLoader(stream, batch_size=None, num_workers=self.cfg.data.loader_workers,
                                                pin_memory=self.device.type == "cuda", prefetch_factor=4))

    def train_mode(self) -> None:
        """The network in training mode, but the parts ``optim.train_only`` holds fixed in eval mode, so that
        training does not move their batch-norm statistics either."""
        self.net.train()
        for m in self.fixed:
            m.eval()

    @torch.no_grad()
    def precise_bn(self, batches: int, progress: bool = False) -> int:
        """Re-estimate the statistics of every batch-norm layer that trains (not those ``optim.train_only`` holds
        fixed) as the plain average over ``batches`` training batches
        (drawn and augmented as in training, from a stream seeded by the config's ``seed``, so the same data give the same
        result) instead of the running average of the last few dozen batches that training leaves: precise BN
        (Wu and Johnson 2021). The weights are unchanged. Returns the number of layers re-estimated."""
        held = {id(m) for f in self.fixed for m in f.modules()}
        norms = [m for m in self.net.modules()
                 if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and id(m) not in held]
        if not norms or batches < 1:
            return 0
        momenta = [m.momentum for m in norms]
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # a cumulative average
        was_training = self.net.training
        self.train_mode()
        stream = iter(BatchStream(self.pools, self.train_files, self.cfg, self.augment, self.cfg.seed))
        gen = torch.Generator().manual_seed(self.cfg.seed)
        steps = range(batches)
        if progress and not self.quiet:
            from tqdm import tqdm
            steps = tqdm(steps, desc="precise BN", unit="batch", dynamic_ncols=True)
        for _ in steps:
            batch = {k: v.to(self.device) for k, v in next(stream).items()}
            if self.cfg.augment.on_device:
                batch = augment_batch(batch, gen, self.cfg.augment)
            with autocast_for(self.device, self.bf16):
                self.net(batch["image"].to(memory_format=torch.channels_last_3d))
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        if was_training:
            self.train_mode()
        else:
            self.net.eval()
        self.bn_step = self.step
        return len(norms)

    # ------------------------------------------------------------------ checkpoints
    def _save(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp")
        torch.save({"model": self.net.state_dict(), "opt": self.opt.state_dict(), "step": self.step, "best": self.best,
                    "best_dice": self.best_dice, "best_metric": SELECTION_METRIC,
                    "bad_vals": self.bad_vals, "sched_frac": self.sched_frac, "config": json.loads(self.cfg.model_dump_json()),
                    "val_rules": {k: getattr(self, k) for k in VAL_RULES if hasattr(self, k)},
                    "last_val": json.dumps(self.last_val, default=float)}, tmp)
        os.replace(tmp, path)

    def _load(self, path: Path) -> None:
        ck = torch.load(path, map_location=self.device, weights_only=True)
        self.net.load_state_dict(ck["model"])
        self.opt.load_state_dict(ck["opt"])
        self.step, self.best, self.bad_vals = int(ck["step"]), float(ck["best"]), int(ck.get("bad_vals", 0))
        self.best_dice = float(ck.get("best_dice", -1.0))
        if ck.get("best_metric") != SELECTION_METRIC:  # a run from before wbmri 0.2.17 kept its best by lesion F1,
            self.best, self.best_dice = -1.0, -1.0     # which an untrained network could hold at 1.0: chosen anew
        self.sched_frac = float(ck.get("sched_frac", schedule_share(self.step, self.cfg.optim)))
        for k, v in (ck.get("val_rules") or {}).items():  # the lesion rules its last validation chose
            if k in VAL_RULES:
                setattr(self, k, v)
        self.last_val = json.loads(ck.get("last_val") or "{}")

    def export(self, folder: Path, metrics: dict | None = None, extra: dict | None = None) -> Path:
        """A bundle of the current weights. Lesion rules come from this run's validation; without one, a fine-tuned
        model keeps its --init model's rules and test-time augmentation, a new one the config's threshold."""
        inherited = self.init_card
        fallback = {"edema": self.cfg.edema_threshold, "min_lesion_ml": self.cfg.min_lesion_ml, "min_bone_fraction": 0.0,
                    "min_confidence": 0.0, **inherited.get("thresholds", {})}
        card = {"name": self.cfg.name, "version": f"{self.step}", "training_steps": self.step,
                "precision": "bf16" if self.bf16 else "fp32", "train_config": json.loads(self.cfg.model_dump_json()),
                "thresholds": {"edema": getattr(self, "val_threshold", fallback["edema"]),
                               "min_lesion_ml": getattr(self, "val_min_ml", fallback["min_lesion_ml"]),
                               "min_bone_fraction": getattr(self, "val_bone_fraction", fallback["min_bone_fraction"]),
                               "min_confidence": getattr(self, "val_min_confidence", fallback["min_confidence"])}}
        # the site map's bone thresholds are not chosen by validation: a fine-tuned model keeps its --init model's
        # nor is the hyperintensity rule: a new model takes models.lesions' (a model from before it, none)
        kept = ("bone", "bone_thin", "min_signal_ratio")
        card["thresholds"].update({k: v for k, v in inherited.get("thresholds", {}).items() if k in kept})
        if self.min_signal_ratio:
            card["thresholds"]["min_signal_ratio"] = self.min_signal_ratio
        if "inference" in inherited:
            card["inference"] = inherited["inference"]
        if metrics:
            card["validation"] = metrics
        card["trained_on"] = (f"{self.device.type}: {platform.machine()}, {os.cpu_count()} CPU cores"
                              + (f", {torch.cuda.get_device_name(self.device)}" if self.device.type == "cuda" else "")
                              + f", {self.world} process(es), torch {torch.__version__}")
        if self.cfg.data.phantom_cases or self.cfg.data.val_cases or self.cfg.data.extra_pools:  # phantoms it learned from
            card["generator_version"] = generator_version_of(self.cfg.synth)
        if extra:
            card.update(extra)
        return save_bundle(folder, self.net, self.cfg.network, card)

    # ------------------------------------------------------------------ loop
    def train(self, progress: bool = True) -> dict:
        cfg = self.cfg
        if not cfg.data.phantom_cases and not cfg.data.extra_pools and not cfg.data.dataset_dirs:
            raise DatasetError("no training cases: set data.phantom_cases above 0, add data.extra_pools or name a "
                               "labelled dataset in data.dataset_dirs")
        self.setup_data()
        if self.pools and cfg.data.workers:
            self.pools[0].wait(min(len(self.pools[0].seeds), max(8, cfg.sampling.batch_size * 4)))
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.yaml").write_text(yaml.safe_dump(json.loads(cfg.model_dump_json()), sort_keys=False))
        writer = None
        if self.rank == 0:
            from torch.utils.tensorboard import SummaryWriter
            # events logged after the checkpoint a resumed run starts from are dropped, not shown twice
            writer = SummaryWriter(str(self.out / "tb"), purge_step=self.step + 1 if self.step else None)
        csv_path = self.out / "metrics.csv"
        if csv_path.exists() and self.rank == 0:
            _trim_csv(csv_path, self.step)  # rows logged after the checkpoint we resume from would be repeated
        new_csv = not csv_path.exists()
        bar = None
        if progress and not self.quiet:
            from tqdm import tqdm
            bar = tqdm(total=cfg.optim.steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True)
        last_loss = float("nan")  # stays NaN when a finished run is resumed (no step left to take)
        first_step = self.step
        t_start = time.time()
        self.train_mode()
        batches = self._batches()
        pace_from = self.step + 4 * cfg.data.loader_workers + 20  # loader processes fill their queues first
        pace_t0, first_count = None, True
        while self.step < cfg.optim.steps:
            if cfg.early_stop_patience and self.bad_vals >= cfg.early_stop_patience:
                break  # (also a resumed run that had stopped early: it takes no further step)
            if cfg.optim.minutes:
                if self.step == pace_from:
                    pace_t0 = time.time()
                elif pace_t0 is not None and self._count_due(self.step - pace_from, time.time() - pace_t0, first_count):
                    self._set_steps_for_time(t_start, (time.time() - pace_t0) / (self.step - pace_from), bar)
                    pace_from, pace_t0, first_count = self.step, time.time(), False
                if self.world == 1 and time.time() - t_start > cfg.optim.minutes * 60:
                    break  # (several processes stop together at the step count instead)
            batch = next(batches)
            lr = lr_at(self.step, cfg, self.sched_frac if cfg.optim.minutes else None)
            for g in self.opt.param_groups:
                g["lr"] = lr
            batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
            if cfg.augment.on_device:
                batch = augment_batch(batch, self.augment_gen, cfg.augment)
            x = batch["image"].to(memory_format=torch.channels_last_3d)
            with autocast_for(self.device, self.bf16):
                voxel, sites = self.model(x)
            loss, parts = compute_loss(voxel, sites, batch, cfg, self._anchor(x))
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.net.parameters(), cfg.optim.grad_clip)
            self.opt.step()
            if self.step >= cfg.optim.warmup:
                self.sched_frac = advance_schedule(self.sched_frac, self.step, cfg.optim.steps)
            self.step += 1
            last_loss = loss.item()
            if bar:
                bar.update(1)
                bar.set_postfix(loss=f"{last_loss:.3f}", pool=len(self._files()))
            if self.rank == 0:
                row = {"step": self.step, "time_s": round(time.time() - t_start, 1), "lr": lr,
                       "loss": last_loss, **parts}
                for k, v in row.items():
                    if k != "step":
                        writer.add_scalar(f"train/{k}", v, self.step)
                if self.step % cfg.val_every == 0 or self.step == cfg.optim.steps:
                    self.precise_bn(cfg.precise_bn_batches)
                    self.last_val = last_val = self.validate() if self.val_cases else {}
                    for k, v in last_val.items():
                        if isinstance(v, (int, float)) and v is not None:
                            writer.add_scalar(f"val/{k}", v, self.step)
                        elif isinstance(v, dict):  # fp_per_scan_by_group, sensitivity_by_group
                            for group, x in v.items():
                                if x is not None:
                                    writer.add_scalar(f"val/{k}/{group}", x, self.step)
                    row.update({f"val_{k}": v for k, v in last_val.items()})
                    score = last_val.get(SELECTION_METRIC, -1.0) if last_val else -1.0
                    dice = (last_val.get("edema_dice") or 0.0) if last_val else 0.0
                    if score is not None and improves((score, dice), (self.best, self.best_dice)):
                        self.best, self.best_dice, self.bad_vals = score, dice, 0
                        self.export(self.out / "best", last_val)
                    else:
                        self.bad_vals += 1
                    self.train_mode()
                self._csv(csv_path, row, new_csv)
                new_csv = False
                if self.step % cfg.checkpoint_every == 0 or self.step == cfg.optim.steps:
                    self._save(self.out / "last.pt")
        if bar:
            bar.close()
        if self.rank == 0:
            trained = self.step > first_step
            if trained or not (self.out / "final").exists():  # a finished run resumed: its bundles stay as they are
                if cfg.precise_bn_batches and self.bn_step != self.step:  # stopped between validations
                    self.precise_bn(cfg.precise_bn_batches)
                self._save(self.out / "last.pt")
                self.export(self.out / "final", self.last_val)
            if (trained and not self.val_cases) or not (self.out / "best").exists():  # nothing chose one: the last
                self.export(self.out / "best", self.last_val)
            writer.close()
        for pool in self.pools:
            pool.stop()
        return {"step": self.step, "best_selection_f1": self.best if self.val_cases else None, "loss": last_loss,
                **self.last_val}

    def _anchor(self, x: torch.Tensor) -> torch.Tensor | None:
        """The anchor network's voxel probabilities (edema, bone, physis) on this batch (``loss.anchor_weight``),
        None when off."""
        if self.teacher is None:
            return None
        with torch.no_grad(), autocast_for(self.device, self.bf16):
            voxel, _ = self.teacher(x)
        return torch.sigmoid(voxel.float())

    def _count_due(self, paced_steps: int, paced_s: float, first: bool) -> bool:
        """``optim.minutes``: whether to count the steps again from the pace since the last count. The first count
        comes after 40 paced steps, or after 5 on a machine so slow that they took over a twentieth of the budget;
        then every 200, as machines slow down. Several processes take rank 0's decision, so that they count
        together."""
        if not first:
            return paced_steps >= 200
        due = paced_steps >= 40 or (paced_steps >= 5 and paced_s > self.cfg.optim.minutes * 3)
        if self.world > 1:
            flag = torch.tensor([int(due)], device=self.device)
            torch.distributed.broadcast(flag, 0)
            due = bool(flag.item())
        return due

    def _set_steps_for_time(self, t_start: float, s_per_step: float, bar) -> None:
        """``optim.minutes``: the step count that ends the schedule when the time is up, at the measured pace."""
        left = self.cfg.optim.minutes * 60 - (time.time() - t_start)
        steps = torch.tensor([self.step + max(1, int(left / s_per_step))], device=self.device)
        if self.world > 1:
            torch.distributed.broadcast(steps, 0)  # every process takes rank 0's count
        self.cfg.optim.steps = int(steps.item())
        if bar:
            bar.total = self.cfg.optim.steps
            bar.refresh()
        if self.rank == 0:
            print(f"{s_per_step:.3f} s/step: {self.cfg.optim.steps} steps fit in {self.cfg.optim.minutes:g} min",
                  flush=True)
            (self.out / "config.yaml").write_text(yaml.safe_dump(json.loads(self.cfg.model_dump_json()),
                                                                 sort_keys=False))

    def _csv(self, path: Path, row: dict, new: bool) -> None:
        cols = ["step", "time_s", "lr", "loss", "edema_bce", "edema_dice", "edema_blob", "edema_anchor", "edema_plates",
                "anatomy_anchor", "bone", "physis", "sites", "val_edema_dice", "val_lesion_f1", "val_lesion_f1_selection", "val_lesion_sens",
                "val_lesion_prec", "val_fp_per_scan", "val_site_acc", "val_threshold", "val_min_bone_fraction",
                "val_min_confidence", "val_bone_dice"]
        if not new:  # a run resumed from an older version keeps its file's columns
            with open(path, newline="") as fh:
                cols = next(csv.reader(fh), cols)
        with open(path, "a", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=cols, extrasaction="ignore")
            if new:
                w.writeheader()
            w.writerow(row)

    @torch.no_grad()
    def validate(self, thresholds: tuple[float, ...] = (0.03, 0.05, 0.07, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9),
                 bone_fractions: tuple[float, ...] = (0.0, 0.2, 0.5), min_sizes_ml: tuple[float, ...] = (0.25, 0.5),
                 min_confidences: tuple[float, ...] = (0.0, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9), tta: str = "none",
                 progress: bool = False, max_fp_per_scan: float = MAX_FP_PER_SCAN) -> dict:
        """Whole-volume inference on the fixed validation cases: edema Dice, lesion F1 and site accuracy for each
        edema threshold, minimum share of a lesion in or touching predicted bone, minimum lesion size (the
        config's ``min_lesion_ml`` and ``min_sizes_ml``) and minimum lesion confidence (mean probability); the
        rules chosen by ``operating_point`` are reported and shipped in the card (``thresholds``). Every rule's
        lesions then pass the hyperintensity rule the model ships with (:attr:`min_signal_ratio`) by the code
        inference uses (:func:`models.measure.measure_hyperintense`), measured here on the model grid's normalised
        image rather than the input grid's signal: close to, not always the same as, what inference drops
        (models/default/HISTORY.md counts the agreement). ``tta`` as at inference
        (:func:`models.networks.forward_tta`); ``progress``: a progress bar over the cases; ``max_fp_per_scan``: the
        false-positive budget of :func:`operating_point`."""
        from models.networks import forward_tta, size_divisor
        from training.metrics import DetectionCounts, dice, majority_labels
        self.net.eval()
        div = size_divisor(self.cfg.network) * 2
        vox_ml = float(np.prod(self.cfg.network.spacing_mm)) / 1000
        sizes = sorted({self.cfg.min_lesion_ml, *min_sizes_ml})
        rules = [(f, m, c) for f in bone_fractions for m in sizes for c in min_confidences]
        per_thr = {(t, *r): {"dice": [], "cases": [], "by_group": {}, "site_ok": 0, "site_n": 0}
                   for t in thresholds for r in rules}
        bone_dice: list[float] = []
        cases = self.val_cases
        if progress:
            from tqdm import tqdm
            cases = tqdm(cases, desc="validate", unit="case", dynamic_ncols=True)
        for case in cases:
            img = case["image"].astype(np.float32)
            pad = [(0, (-s) % div) for s in img.shape]
            x = torch.from_numpy(np.pad(img, pad))[None, None].to(self.device).to(memory_format=torch.channels_last_3d)
            with autocast_for(self.device, self.bf16):
                voxel, sites = forward_tta(self.net, x, tta)
            sl = tuple(slice(0, s) for s in img.shape)
            prob = torch.sigmoid(voxel[0, EDEMA].float()).cpu().numpy()[sl]
            ref = case["edema"] == 1
            bone_prob = torch.sigmoid(voxel[0, BONE].float()).cpu().numpy()[sl]
            bone = bone_prob > BONE_THRESHOLD
            edema = prob > min(thresholds)  # every threshold's lesions lie inside it
            site_map = self._site_rules(sites_in_bone(upsample_site_ids(sites).cpu().numpy()[sl], bone_prob,
                                                      *self.site_bone_thresholds), img, edema)
            if not (case["sites"] == UNKNOWN).all():  # a user's case without sitesTr has no bone reference
                bone_dice.append(dice(bone, (case["sites"] > 0) & (case["sites"] != UNKNOWN)))
            near = near_bone(bone)
            # every threshold's lesions and every reference lesion lie in this box: score there (same results, ~10x less work)
            box = _bbox(edema | ref | (case["instances"] > 0), margin=2)
            physis = (voxel[0, PHYSIS].float() > 0).cpu().numpy()[sl]  # probability > 0.5, as at inference
            signal = _SignalRule(self.min_signal_ratio, img, site_map, physis, self.cfg.network.spacing_mm, box)
            prob, ref, near, site_map = prob[box], ref[box], near[box], site_map[box]
            ref_inst, ref_site_map = case["instances"][box], case["sites"][box]
            ref_sites = majority_labels(ref_inst, ref_site_map)
            groups = validation_groups(case)
            for t in thresholds:
                comp = components(prob > t, near, prob)  # labelled once per threshold, then every rule is a remap
                for f, m, c in rules:
                    keep = comp.keep(vox_ml, m, f, c)
                    self._score_rules(per_thr[(t, f, m, c)], signal.hyperintense(comp, keep), ref, ref_inst,
                                      ref_sites, site_map, vox_ml, groups)
        results = {}
        for (t, f, m, c), acc in per_thr.items():
            pooled = sum(acc["cases"], DetectionCounts())
            s = pooled.scores() if acc["cases"] else {}
            results[(t, f, m, c)] = {"edema_dice": float(np.mean(acc["dice"])) if acc["dice"] else None,
                               "lesion_f1": s.get("f1") or 0.0, "lesion_sens": s.get("sensitivity"),
                               "lesion_f1_selection": pooled.selection_f1 or 0.0,
                               "lesion_prec": s.get("precision"), "fp_per_scan": s.get("fp_per_scan"),
                               "fp_per_scan_by_group": {g: n.fp_per_scan for g, n in sorted(acc["by_group"].items())},
                               "sensitivity_by_group": {g: n.sensitivity for g, n in sorted(acc["by_group"].items())},
                               "site_acc": acc["site_ok"] / acc["site_n"] if acc["site_n"] else None,
                               "threshold": t, "min_bone_fraction": f, "min_lesion_ml": m, "min_confidence": c,
                               "min_signal_ratio": self.min_signal_ratio,
                               "bone_dice": float(np.mean(bone_dice)) if bone_dice else None}
        self.val_table = list(results.values())
        best = operating_point(self.val_table, max_fp_per_scan)
        self.val_best_cases = np.array([(c.n_detected, c.n_ref, c.n_fp) for c in per_thr[
            (best["threshold"], best["min_bone_fraction"], best["min_lesion_ml"], best["min_confidence"])]["cases"]],
            dtype=float).reshape(-1, 3)
        self.val_threshold, self.val_bone_fraction = best["threshold"], best["min_bone_fraction"]
        self.val_min_ml, self.val_min_confidence = best["min_lesion_ml"], best["min_confidence"]
        return best

    @property
    def min_signal_ratio(self) -> float:
        """The hyperintensity rule the model ships with: its --init or validated bundle's card's (a bundle from
        before the rule: none, 0), a new model's :data:`models.lesions.MIN_SIGNAL_RATIO`."""
        if not self.init_card:
            return MIN_SIGNAL_RATIO
        return float(self.init_card.get("thresholds", {}).get("min_signal_ratio", 0.0))

    @property
    def site_bone_thresholds(self) -> tuple[float, float]:
        """Bone thresholds of the site map (``bone``, ``bone_thin``): those of the --init or validated model's card,
        else :data:`models.site_rules.BONE_THRESHOLD` for every bone."""
        return bone_thresholds(self.init_card.get("thresholds", {}))

    def _site_rules(self, site_map: np.ndarray, img: np.ndarray, edema: np.ndarray) -> np.ndarray:
        """The site map as inference reports it (:func:`models.site_rules.apply_site_rules`); ``edema``: the
        edema mask at the lowest threshold tried (every threshold's lesions keep their disc voxels)."""
        from models.site_rules import apply_site_rules
        return apply_site_rules(site_map, img, self.cfg.network.spacing_mm, edema)

    @staticmethod
    def _score_rules(acc: dict, inst: np.ndarray, ref: np.ndarray, ref_inst: np.ndarray, ref_sites: dict,
                     site_map: np.ndarray, vox_ml: float, groups: list[str] = ()) -> None:
        """Add one case's edema Dice, detection counts (overall and per validation group) and site hits under one
        set of lesion rules to ``acc``."""
        from training.metrics import detection_counts, dice, majority_labels, match_lesions
        acc["dice"].append(dice(inst > 0, ref))
        match = match_lesions(inst, ref_inst, voxel_ml=vox_ml)
        counts = detection_counts(match, min_ml=0.5)
        acc["cases"].append(counts)
        for group in groups:
            acc["by_group"][group] = acc["by_group"][group] + counts if group in acc["by_group"] else counts
        pred_sites = majority_labels(inst, site_map)
        for pid, rid in match.pred_to_ref.items():
            if rid is not None and ref_sites[rid] != UNKNOWN:  # unknown: a case without a site reference
                acc["site_ok"] += int(ref_sites[rid] == pred_sites[pid])
                acc["site_n"] += 1


class _SignalRule:
    """The hyperintensity rule on one validation case: a selection (``keep``) of the components of one threshold,
    labelled within the scoring ``box``, becomes the instance map there of the lesions left after
    :meth:`models.measure.Study.hyperintense`, which sees the whole case (one study for all selections). A
    selection already measured (several rules keep the same components) is looked up; new components start
    afresh. ``min_ratio`` 0: no rule."""

    def __init__(self, min_ratio: float, img: np.ndarray, site_map: np.ndarray, physis: np.ndarray,
                 spacing_mm, box: tuple[slice, ...]) -> None:
        from models.measure import Study
        self.min_ratio, self.shape, self.box = min_ratio, img.shape, box
        # the model grid: RAS axes
        self.study = Study(site_map, img, np.diag([*map(float, spacing_mm), 1.0]), physis) if min_ratio > 0 else None
        self._comp: Components | None = None  # held, so the cache below belongs to these components alone
        self._seen: dict[bytes, np.ndarray] = {}

    def hyperintense(self, comp: Components, keep: np.ndarray) -> np.ndarray:
        inst = comp.instances(keep)
        if self.min_ratio <= 0 or not inst.any():
            return inst
        if comp is not self._comp:
            self._comp, self._seen = comp, {}
        key = np.packbits(keep).tobytes()
        if key not in self._seen:
            full = np.zeros(self.shape, np.uint16)
            full[self.box] = inst
            kept, _, _ = self.study.hyperintense(full, {i: 0.0 for i in range(1, int(inst.max()) + 1)}, self.min_ratio)
            self._seen[key] = kept[self.box]
        return self._seen[key]
