"""The one inference code path: ``Predictor.load(...).predict(path_or_image) -> Result``; ``Result.save(dir)``.

The CLI (``wbmri predict``), scripts and the HTTP service all call this.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple

import nibabel as nib
import numpy as np
import torch

from models import SOFTWARE
from models.card import ModelBundle, load_bundle, sha256_file
from models.networks import (BONE, EDEMA, PHYSIS, TTA_MODES, autocast_for, cpu_supports_bf16, forward_tta,
                             resolve_device, size_divisor, upsample_site_ids)
from models.lesions import components, near_bone, voxel_volume_ml
from models.nifti import DEFAULT_MAX_VOXELS, Volume, case_name, load_volume, result_dir, save_nifti
from models.preprocessing import GridMap, normalise, plan_grid, to_input_grid, to_model_grid
from models.site_rules import BONE_THRESHOLD, apply_site_rules, bone_thresholds, sites_in_bone
from models.spine import level_count_anchors

Progress = Callable[[str, float], None]
WHOLE_VOLUME_MAX_VOXELS = 12_000_000  # model-grid voxels for one pass; larger inputs use a sliding window


class OptionError(ValueError):
    """A run option (device, precision, test-time augmentation) that cannot be used; the model itself is fine."""


class NetworkOutputs(NamedTuple):
    """The network's raw outputs on the model grid, before any post-processing."""
    edema: np.ndarray   # float32 probability
    bone: np.ndarray    # float32 probability
    physis: np.ndarray  # float32 probability
    sites: np.ndarray   # uint8 site ids as the network labels them (0 outside predicted bone)
    site_ids: np.ndarray  # uint8 site id of every voxel, bone or not (for choosing the bone thresholds)


@dataclass
class Result:
    """Everything one study produced; arrays are on the input's own grid."""
    name: str
    report: dict
    lesions: np.ndarray
    sites: np.ndarray
    affine: np.ndarray
    image: np.ndarray = field(repr=False)
    timings: dict[str, float] = field(default_factory=dict)

    def save(self, out_dir: str | Path, overwrite: bool = True) -> Path:
        """Write ``out_dir/<name>/`` with the contract files, atomically (complete or absent)."""
        from models.viz import render_overlay
        final = Path(out_dir) / self.name
        if final.exists() and not overwrite:
            raise FileExistsError(f"{final} exists (use overwrite)")
        t0 = time.perf_counter()
        png = render_overlay(self.image, self.lesions, self.sites, self.affine, self.report)
        with result_dir(final) as tmp:
            save_nifti(tmp / "lesions.nii.gz", self.lesions, self.affine, np.uint16)
            save_nifti(tmp / "sites.nii.gz", self.sites, self.affine, np.uint8)
            (tmp / "overlay.png").write_bytes(png)
            self.timings["write"] = round(time.perf_counter() - t0, 3)
            timings_s = self.report.setdefault("timings_s", {})
            timings_s["write"] = self.timings["write"]
            if "total" in timings_s:  # read to written: the total moves after the write
                timings_s["total"] = round(timings_s.pop("total") + self.timings["write"], 3)
            (tmp / "report.json").write_text(json.dumps(self.report, indent=2) + "\n")
        return final


class Predictor:
    """A loaded model, reused across studies."""

    def __init__(self, bundle: ModelBundle, device: torch.device, bf16: bool, max_voxels: int = DEFAULT_MAX_VOXELS,
                 tta: str | None = None):
        from inference.report import region_detection
        self.bundle = bundle
        self.region_figures = region_detection(bundle.card)  # the card's detection per body region, for reports
        self.device = device
        self.bf16 = bf16
        self.max_voxels = max_voxels
        self.net = bundle.net.to(device).to(memory_format=torch.channels_last_3d).eval()
        th = bundle.card.get("thresholds", {})
        self.threshold = float(th.get("edema", 0.5))
        self.min_lesion_ml = float(th.get("min_lesion_ml", 0.1))
        self.min_bone_fraction = float(th.get("min_bone_fraction", 0.0))
        self.min_confidence = float(th.get("min_confidence", 0.0))  # older bundles have none: keep every lesion
        self.min_signal_ratio = float(th.get("min_signal_ratio", 0.0))  # 0: keep lesions that are not bright too
        self.bone_threshold, self.bone_thin_threshold = bone_thresholds(th)
        # test-time augmentation: the card's (its thresholds were chosen with it) unless the caller overrides
        self.tta = tta or bundle.tta
        if self.tta not in TTA_MODES:
            raise ValueError(f"tta must be one of {TTA_MODES}, not {self.tta!r}")

    @classmethod
    def load(cls, model: str | Path | None = None, device: str = "auto", precision: str = "auto",
             threads: int | None = None, max_voxels: int = DEFAULT_MAX_VOXELS, tta: str | None = None) -> "Predictor":
        """Load a bundle (default: the shipped model) onto ``device`` (auto | cpu | cuda); ``tta`` (one of
        :data:`models.networks.TTA_MODES`) overrides the card's test-time augmentation."""
        try:
            dev = resolve_device(device)
        except ValueError as exc:
            raise OptionError(str(exc)) from None
        if precision not in ("auto", "bf16", "fp32"):
            raise OptionError(f"precision must be auto, bf16 or fp32, not {precision!r}")
        if tta is not None and tta not in TTA_MODES:
            raise OptionError(f"tta must be one of {TTA_MODES}, not {tta!r}")
        if threads:
            torch.set_num_threads(threads)
        bf16 = precision == "bf16" or (precision == "auto" and (dev.type == "cuda" or cpu_supports_bf16()))
        return cls(load_bundle(model), dev, bf16, max_voxels, tta)

    @property
    def model_info(self) -> dict:
        return {"name": self.bundle.name, "version": self.bundle.version, "sha256": self.bundle.sha256,
                "device": f"{self.device.type}{' bf16' if self.bf16 else ' fp32'}", "tta": self.tta,
                "thresholds": {"edema": self.threshold, "min_lesion_ml": self.min_lesion_ml,
                               "min_bone_fraction": self.min_bone_fraction, "min_confidence": self.min_confidence,
                               "min_signal_ratio": self.min_signal_ratio, "bone": self.bone_threshold,
                               "bone_thin": self.bone_thin_threshold},
                "software": SOFTWARE}

    # ------------------------------------------------------------------------------------------------ steps
    def model_input(self, vol: Volume) -> tuple[GridMap, np.ndarray]:
        """The model grid of a loaded volume and the volume on it, normalised as the network expects."""
        grid = plan_grid(vol.data.shape, vol.affine, self.bundle.config.spacing_mm)
        return grid, normalise(to_model_grid(vol.data, grid, "trilinear"), self.bundle.config.intensity_reference)

    def network_outputs(self, img: np.ndarray) -> NetworkOutputs:
        """The raw network outputs for a normalised volume on the model grid (no vertebral fit, sides or lesions):
        for benchmarks and for users who post-process themselves."""
        cfg = self.bundle.config
        div = size_divisor(cfg) * 2
        body = img > 0.05
        lo, hi = np.zeros(3, int), np.array(img.shape)
        if body.any():
            idx = np.nonzero(body.any(axis=(1, 2)))[0], np.nonzero(body.any(axis=(0, 2)))[0], np.nonzero(body.any(axis=(0, 1)))[0]
            lo = np.array([max(0, i[0] - 6) for i in idx])
            hi = np.array([min(s, i[-1] + 7) for i, s in zip(idx, img.shape)])
        crop = img[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
        pad = [(0, (-s) % div) for s in crop.shape]
        x = torch.from_numpy(np.pad(crop, pad))[None, None].to(self.device).to(memory_format=torch.channels_last_3d)
        with torch.inference_mode(), autocast_for(self.device, self.bf16):
            if x[0, 0].numel() <= WHOLE_VOLUME_MAX_VOXELS:
                voxel, sites = forward_tta(self.net, x, self.tta)
            else:
                from monai.inferers import sliding_window_inference
                roi = tuple(min(s, 2 * p) for s, p in zip(x.shape[2:], cfg.patch))
                voxel, sites = sliding_window_inference(x, roi, 1, lambda t: forward_tta(self.net, t, self.tta),
                                                        overlap=0.25, mode="gaussian")
            probs = torch.sigmoid(voxel[0].float())
            site_ids = upsample_site_ids(sites)
        sl = tuple(slice(0, s) for s in crop.shape)
        out = []
        for ch in (EDEMA, BONE, PHYSIS):
            full = np.zeros(img.shape, np.float32)
            full[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = probs[ch].cpu().numpy()[sl]
            out.append(full)
        all_ids = np.zeros(img.shape, np.uint8)
        all_ids[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = site_ids.cpu().numpy()[sl]
        site_map = sites_in_bone(all_ids, out[1], self.bone_threshold, self.bone_thin_threshold)
        return NetworkOutputs(out[0], out[1], out[2], site_map, all_ids)

    def _components(self, prob: np.ndarray, edema: np.ndarray, bone: np.ndarray,
                    grid: GridMap) -> tuple[np.ndarray, dict[int, float]]:
        """Lesion instances on the model grid (see :mod:`models.lesions`) from the edema mask (``prob`` above the
        threshold) and their confidences (mean probability)."""
        vox_ml = float(np.prod(grid.model_spacing)) / 1000.0
        near = near_bone(bone > BONE_THRESHOLD) if self.min_bone_fraction > 0 else None
        comp = components(edema, near, prob)
        keep = comp.keep(vox_ml, self.min_lesion_ml, self.min_bone_fraction, self.min_confidence)
        confidence = np.clip(comp.confidence[keep], 0, 1)  # instance k + 1 is the k-th kept component
        return comp.instances(keep), {k + 1: float(c) for k, c in enumerate(confidence)}

    def predict(self, source: str | Path | nib.Nifti1Image, name: str | None = None,
                progress: Progress | None = None) -> Result:
        """Analyse one study. Raises :class:`models.nifti.InputError` with a clear message for bad input."""
        from inference.postprocess import level_warning, site_table, sites_in_view, study_warnings, summarise
        from models.measure import measure_hyperintense
        from inference.report import (build_report, model_caution, region_caution, unreliable_regions,
                                      validate_report)
        tick = progress or (lambda stage, frac: None)
        t = {"start": time.perf_counter()}
        timings: dict[str, float] = {}

        def lap(stage: str) -> None:
            now = time.perf_counter()
            timings[stage] = round(now - t["last"], 3)
            t["last"] = now

        t["last"] = t["start"]
        tick("read", 0.0)
        if isinstance(source, (str, Path)):
            path = Path(source)
            name = name or case_name(path)
            vol = load_volume(path, self.max_voxels)
            digest, filename = sha256_file(path), path.name
        else:  # an in-memory image: named after the file nibabel read it from, if any
            vol = load_volume(source, self.max_voxels)
            origin = source.get_filename()
            name = name or (case_name(origin) if origin else "study")
            digest = hashlib.sha256(np.ascontiguousarray(vol.data).tobytes()).hexdigest()
            filename = Path(origin).name if origin else f"{name}.nii.gz"
        lap("read")
        tick("preprocess", 0.1)
        grid, img = self.model_input(vol)
        lap("preprocess")
        tick("network", 0.2)
        prob, bone_p, physis_p, site_map, _ = self.network_outputs(img)
        lap("network")
        tick("postprocess", 0.7)
        edema = prob > self.threshold
        site_map = apply_site_rules(site_map, img, grid.model_spacing, edema)
        anchors = level_count_anchors(site_map, grid.model_spacing)
        inst, conf = self._components(prob, edema, bone_p, grid)
        lesions = to_input_grid(inst, grid).astype(np.uint16)
        sites = to_input_grid(site_map, grid).astype(np.uint8)
        physis = to_input_grid((physis_p > 0.5).astype(np.uint8), grid).astype(bool)
        lesions, conf, items = measure_hyperintense(lesions, sites, vol.data, vol.affine, physis, conf,
                                                    self.min_signal_ratio)
        spacing = vol.spacing
        vox_ml = voxel_volume_ml(vol.affine)
        warnings = study_warnings(vol.data, sites, lesions, spacing)
        level_note = level_warning(anchors, items)
        if level_note:
            warnings.append(level_note)
        lap("postprocess")
        study = {"filename": Path(filename).name, "sha256": digest, "shape": [int(s) for s in vol.data.shape],
                 "spacing_mm": [round(float(s), 4) for s in spacing], "orientation": vol.orientation}
        timings["total"] = round(time.perf_counter() - t["start"], 3)
        in_view = sites_in_view(sites, vox_ml)
        regions_note = region_caution(self.region_figures, in_view)
        if regions_note:
            warnings.append(regions_note)
        summary = {**summarise(items, in_view),
                   "low_sensitivity_regions": unreliable_regions(self.region_figures, in_view)[0]}
        report = build_report(study, self.model_info, items, summary, site_table(items), warnings,
                              timings, in_view, model_caution(self.bundle.card))
        validate_report(report)
        tick("done", 1.0)
        return Result(name, report, lesions, sites, vol.affine, vol.data, timings)

