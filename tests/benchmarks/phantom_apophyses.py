"""A picture of generator 1.8's apophyses on the phantom's STIR, beside the same child drawn without them (1.7).

    .venv/bin/python tests/benchmarks/phantom_apophyses.py [--seed 500008] [--png data/phantom_apophyses.png]

The same test-set child (seed 500008: a 14-year-old boy) is made as a feet, a knees and a pelvis view, each once
with generator 1.8 (`GENERATOR_1_8_SETTINGS`: 1.9's knee and pelvic foci off, so that only the plates
differ) and once with `GENERATOR_1_7_SETTINGS`. For each view the slice that holds most of the
plate 1.8 added to the bone of the side without a lesion (calcaneal and ischial: coronal, as acquired; tibial tuberosity: sagittal, where its
tongue shows) is drawn from both images, on one grey
scale (0 to the brightest voxel shown), that plate outlined on the 1.8 image. Prints the number of added plate voxels per bone,
their median signal over the median of that bone's other voxels (how bright the apophyses are against their own
marrow), how far from a plate the image changed at all (the slice profile and resampling spread a plate over
neighbouring voxels; the calcaneus's new pitch moves the whole heel bone), and whether the lesion labels are
1.7's (a calcaneal lesion takes its centre from the bone's marrow, which the plate and the pitch change).
"""
from __future__ import annotations

import argparse

import nibabel as nib
import numpy as np
from scipy.ndimage import distance_transform_edt

from models.sites import site_id
from training.config import SynthConfig, load_config
from training.phantom.generate import GENERATOR_1_7_SETTINGS, GENERATOR_1_8_SETTINGS, generate_case

VERSION = "1.8"  # the generator whose plates this draws (GENERATOR_1_8_SETTINGS)

VIEWS = (("feet", "calcaneus", "coronal"), ("knees", "tibia", "sagittal"), ("pelvis", "ischium", "coronal"))
AXIS = {"sagittal": 0, "coronal": 1}  # RAS axes


def added_plates(seed: int, fov: str, bone: str):
    """Both images of one view, and the voxels of ``bone`` (either side) whose physis label only the current
    generator has."""
    now = generate_case(seed, load_config(SynthConfig, None, list(GENERATOR_1_8_SETTINGS)), fov=fov)
    old = generate_case(seed, load_config(SynthConfig, None, list(GENERATOR_1_7_SETTINGS)), fov=fov)
    arrays = {"zooms": nib.as_closest_canonical(nib.Nifti1Image(now.sites, now.affine)).header.get_zooms()}
    arrays |= {k: in_ras(v, now.affine) for k, v in (("image", now.image), ("old", old.image), ("sites", now.sites),
                                                   ("lesions", now.lesions), ("lesions_old", old.lesions), ("physis", now.physis),
                                                   ("physis_old", old.physis))}
    in_bone = np.isin(arrays["sites"], [site_id(f"{bone}_{s}") for s in ("left", "right")])
    added = in_bone & (arrays["physis"] > 0) & (arrays["physis_old"] == 0)
    return arrays, added, in_bone, now.meta["age_years"]


def in_ras(array: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """The array in RAS+ axis order (the generator draws the header orientation at random)."""
    return np.asanyarray(nib.as_closest_canonical(nib.Nifti1Image(np.asarray(array), affine)).dataobj)


def draw(rows, seed: int, age: float, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(len(rows), 2, figsize=(6.5, 3.3 * len(rows)))
    for (fov, bone, plane, arrays, added), ax_row in zip(rows, axes):
        axis = AXIS[plane]
        side = min(("right", "left"), key=lambda sd: int(((arrays["sites"] == site_id(f"{bone}_{sd}"))
                                                          & (arrays["lesions"] > 0)).sum()))  # the side without a lesion
        mine = added & (arrays["sites"] == site_id(f"{bone}_{side}"))
        other = tuple(a for a in range(3) if a != axis)
        k = int(np.argmax(mine.sum(axis=other)))  # the slice holding most of that plate
        centre = np.argwhere(np.take(mine, k, axis=axis)).mean(axis=0).astype(int)
        zooms = np.asarray(arrays["zooms"])[list(other)]
        half = (40.0 / zooms).astype(int)  # 80 mm square
        crop = tuple(slice(max(0, c - h), c + h) for c, h in zip(centre, half))
        vmax = float(np.take(arrays["image"], k, axis=axis)[crop].max())  # the brightest voxel shown
        for ax, key, title in ((ax_row[0], "old", "1.7"), (ax_row[1], "image", VERSION)):
            sl = np.take(arrays[key], k, axis=axis)[crop]
            ax.imshow(sl.T[::-1], cmap="gray", vmin=0, vmax=vmax, interpolation="nearest", aspect=zooms[1] / zooms[0])
            if key == "image":
                ax.contour(np.take(mine, k, axis=axis)[crop].T[::-1].astype(float), levels=[0.5], colors="orange",
                           linewidths=0.8)
            where = ", front right" if plane == "sagittal" else ""
            ax.set_title(f"{title}: {side} {bone}, {plane}{where}", fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(f"seed {seed} ({age:.0f} y): one slice per view, head at the top, each row on one grey scale; "
                 f"orange: the apophyseal plates generator {VERSION} adds", fontsize=9)
    fig.savefig(path, dpi=80, bbox_inches="tight")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=500008)
    ap.add_argument("--png", default=None, help="write the picture here")
    args = ap.parse_args()
    rows = []
    for fov, bone, plane in VIEWS:
        arrays, added, in_bone, age = added_plates(args.seed, fov, bone)
        rest = in_bone & ~added & (arrays["lesions"] == 0)
        img = arrays["image"].astype(np.float64)
        ratio = float(np.median(img[added]) / np.median(img[rest])) if added.any() else float("nan")
        any_plate = (arrays["physis"] > 0) & (arrays["physis_old"] == 0)  # every bone's added plates
        moved = np.abs(img - arrays["old"]) > 0.01 * np.abs(arrays["old"].astype(np.float64)) + 1e-6
        reach = distance_transform_edt(~any_plate, sampling=arrays["zooms"])[moved].max() if moved.any() else 0.0
        print(f"{fov:7} {bone:10} added plate voxels {int(added.sum()):5d}, median signal {ratio:.2f}x the bone's "
              f"other voxels; voxels changed by > 1%: {int(moved.sum())}, the farthest {reach:.1f} mm from a plate; "
              f"lesion labels identical: {bool(np.array_equal(arrays['lesions'], arrays['lesions_old']))}")
        if added.any():
            rows.append((fov, bone, plane, arrays, added))
    if args.png and not rows:
        raise SystemExit(f"seed {args.seed}'s child has none of these apophyses (too young or fused): no picture")
    if args.png:
        draw(rows, args.seed, age, args.png)
        print(f"picture: {args.png}")


if __name__ == "__main__":
    main()
