"""A picture of generator 1.10's ischiopubic synchondroses on the phantom's STIR, beside the same child without them.

    .venv/bin/python tests/benchmarks/phantom_synchondrosis.py [--seed 34] [--age 9] [--png data/phantom_synchondrosis.png]

One child (the seed's, at ``--age``) is made as a pelvis view, once with the synchondroses (generator 1.10) and once
with `GENERATOR_1_9_SETTINGS` (none), no lesions. The axial and coronal slices (as resampled to RAS) that the
synchondroses change most are drawn from both images on one grey scale. Prints what each side drew
(`case.json`'s `ischiopubic_synchondroses`), how many voxels changed, and the median signal of the brightened
marrow against the same voxels without it and against the view's physes.
"""
from __future__ import annotations

import argparse

import nibabel as nib
import numpy as np

from models.sites import site_id
from training.config import SynthConfig, load_config
from training.phantom.generate import GENERATOR_1_9_SETTINGS, GENERATOR_VERSION, generate_case

from phantom_apophyses import in_ras  # this folder: the scripts run as scripts

BASE = ["lesions.none_p=1", "acquisition.sequence_p={stir: 1}"]


def pelvis(seed: int, age: float):
    """Both images of the pelvis view in RAS order, the new sites and physes, voxel sizes and case.json."""
    settings = BASE + [f"body.age_years=[{age}, {age}]"]
    now = generate_case(seed, load_config(SynthConfig, None, settings), fov="pelvis")
    old = generate_case(seed, load_config(SynthConfig, None, settings + list(GENERATOR_1_9_SETTINGS)), fov="pelvis")
    zooms = nib.as_closest_canonical(nib.Nifti1Image(now.sites, now.affine)).header.get_zooms()
    return (in_ras(now.image, now.affine).astype(np.float64), in_ras(old.image, old.affine).astype(np.float64),
            in_ras(now.sites, now.affine), in_ras(now.physis, now.affine), zooms, now.meta)


def draw(new, old, changed, zooms, meta, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(2, 2, figsize=(8, 8))
    margin_mm = 35.0
    for row, (axis, name) in enumerate(((2, "axial"), (1, "coronal"))):
        k = int(np.argmax(changed.sum(axis=tuple(a for a in range(3) if a != axis))))
        plane = [a for a in range(3) if a != axis]
        where = np.argwhere(changed.take(k, axis=axis))
        margin = (margin_mm / np.asarray(zooms)[plane]).astype(int)
        lo = np.maximum(where.min(0) - margin, 0)
        hi = np.minimum(where.max(0) + margin + 1, np.asarray(new.shape)[plane])
        crop: list = [slice(None)] * 3
        crop[axis] = k
        crop[plane[0]], crop[plane[1]] = slice(lo[0], hi[0]), slice(lo[1], hi[1])
        vmax = float(new[tuple(crop)].max())
        for col, (img, title) in enumerate(((old, "1.9"), (new, GENERATOR_VERSION))):
            ax = axes[row, col]
            ax.imshow(img[tuple(crop)].T[::-1, ::-1], cmap="gray", vmin=0, vmax=vmax, interpolation="nearest",
                      aspect=zooms[plane[1]] / zooms[plane[0]])
            ax.set_title(f"{title}: {name}, patient's right on the left", fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
    drawn = "; ".join(f"{s['side']}: fuses at {s['fusion_age']:.1f} y, " + (", ".join(
        k for k in ("open", "swollen", "bright_marrow", "bright_soft_tissue") if s[k]) or "nothing drawn")
        for s in meta["ischiopubic_synchondroses"])
    fig.suptitle(f"seed {meta['seed']} ({meta['age_years']:.1f} y, {meta['sex']}), no lesions, pelvis view; each row "
                 f"on one grey scale\n{drawn}", fontsize=8)
    fig.savefig(path, dpi=90, bbox_inches="tight")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=34)
    ap.add_argument("--age", type=float, default=9.0)
    ap.add_argument("--png", default=None, help="write the picture here")
    args = ap.parse_args()
    new, old, sites, physis, zooms, meta = pelvis(args.seed, args.age)
    for s in meta["ischiopubic_synchondroses"]:
        print(s)
    changed = np.abs(new - old) > 1e-6 * np.abs(old) + 1e-6
    if not changed.any():
        raise SystemExit(f"seed {args.seed} at {args.age} y: both synchondroses fused long ago, nothing differs; "
                         "try another --age")
    bright = changed & (new > old) & np.isin(sites, [site_id(f"{b}_{s}") for b in ("pubis", "ischium")
                                                     for s in ("left", "right")])
    print(f"voxels changed {int(changed.sum())}, of them brighter pubic or ischial bone {int(bright.sum())}")
    if bright.any() and (physis > 0).any():
        print(f"brightened bone: median {np.median(new[bright] / np.maximum(old[bright], 1e-6)):.2f}x the same voxels "
              f"in 1.9; median signal {np.median(new[bright]) / np.median(new[physis > 0]):.2f}x the view's physes")
    if args.png:
        draw(new, old, changed, zooms, meta, args.png)
        print(f"picture: {args.png}")


if __name__ == "__main__":
    main()
