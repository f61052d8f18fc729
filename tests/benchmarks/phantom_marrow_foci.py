"""A picture of generator 1.9's knee and pelvic marrow foci on the phantom's STIR, beside the same child without them.

    .venv/bin/python tests/benchmarks/phantom_marrow_foci.py [--seed 500002] [--png data/phantom_marrow_foci.png]

One child (the seed's, its age held under 16) is made as a knees and a pelvis view, once with both foci drawn
(`mimics.knee_foci_p_under16=1`, `mimics.pelvic_foci_p_under16=1`, and `GENERATOR_1_9_SETTINGS`, so that only
the foci differ) and once with `GENERATOR_1_8_SETTINGS` (none),
no lesions. For each view the coronal slice (as acquired) that the foci change most is drawn from both images on
one grey scale (0 to the brightest voxel shown). Prints, per view, the share of the region's marrow the foci
brighten, their median signal over the same voxels without them, and against the median of the view's physes
(the brightest normal marrow a model already has to ignore).
"""
from __future__ import annotations

import argparse

import nibabel as nib
import numpy as np

from training.config import SynthConfig, load_config
from training.phantom.generate import GENERATOR_1_8_SETTINGS, GENERATOR_1_9_SETTINGS, generate_case

from phantom_apophyses import in_ras  # this folder: the scripts run as scripts

VIEWS = ("knees", "pelvis")
BOTH = ["mimics.knee_foci_p_under16=1", "mimics.pelvic_foci_p_under16=1", "lesions.none_p=1"]
VERSION = "1.9"  # the generator whose foci this draws (GENERATOR_1_9_SETTINGS: 1.10's synchondroses off)


def view(seed: int, fov: str, age: float | None):
    """Both images of one view in RAS order, the physis labels, the voxel sizes, and the child's age."""
    extra = [f"body.age_years=[{age}, {age}]"] if age is not None else []
    now = generate_case(seed, load_config(SynthConfig, None, BOTH + extra + list(GENERATOR_1_9_SETTINGS)), fov=fov)
    old = generate_case(seed, load_config(SynthConfig, None, BOTH + extra + list(GENERATOR_1_8_SETTINGS)), fov=fov)
    zooms = nib.as_closest_canonical(nib.Nifti1Image(now.sites, now.affine)).header.get_zooms()
    return (in_ras(now.image, now.affine).astype(np.float64), in_ras(old.image, old.affine).astype(np.float64),
            in_ras(now.physis, now.affine), zooms, now.meta["age_years"])


def draw(rows, seed: int, age: float, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(len(rows), 2, figsize=(8, 4.5 * len(rows)))
    for (fov, new, old, zooms, foci), ax_row in zip(rows, axes):
        k = int(np.argmax(foci.sum(axis=(0, 2))))  # the coronal slice the foci change most
        where = np.argwhere(foci[:, k])
        margin = (np.array([30.0, 30.0]) / np.asarray(zooms)[[0, 2]]).astype(int)  # 30 mm around the foci
        lo, hi = np.maximum(where.min(0) - margin, 0), where.max(0) + margin + 1
        crop = (slice(lo[0], hi[0]), k, slice(lo[1], hi[1]))
        vmax = float(new[crop].max())
        for ax, img, title in ((ax_row[0], old, "1.8"), (ax_row[1], new, VERSION)):
            ax.imshow(img[crop].T[::-1, ::-1], cmap="gray", vmin=0, vmax=vmax, interpolation="nearest",
                      aspect=zooms[2] / zooms[0])
            ax.set_title(f"{title}: {fov}, coronal, patient's right on the left", fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(f"seed {seed} ({age:.0f} y), no lesions: one slice per view, head at the top, each row on one grey "
                 f"scale; right: generator {VERSION}'s normal marrow foci", fontsize=9)
    fig.savefig(path, dpi=90, bbox_inches="tight")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=500002)
    ap.add_argument("--age", type=float, default=None, help="hold the child's age (default: the seed's; the foci "
                    "are drawn under 16 only)")
    ap.add_argument("--png", default=None, help="write the picture here")
    args = ap.parse_args()
    rows, age = [], args.age
    for fov in VIEWS:
        new, old, physis, zooms, age = view(args.seed, fov, args.age)
        if age >= 16:
            raise SystemExit(f"seed {args.seed}'s child is {age:.1f} y: no foci after 16; pass --age")
        foci = new > 1.05 * old + 1e-6
        plates = physis > 0
        ratio = float(np.median(new[foci] / np.maximum(old[foci], 1e-6))) if foci.any() else float("nan")
        vs_plates = float(np.median(new[foci]) / np.median(new[plates])) if plates.any() and foci.any() else float("nan")
        print(f"{fov:7} voxels brightened {int(foci.sum()):6d}; median gain {ratio:.2f}x; their median signal "
              f"{vs_plates:.2f}x the view's physes'; voxels not brightened that changed: "
              f"{int((np.abs(new - old) > 1e-6 * np.abs(old) + 1e-6)[~foci].sum())}")
        rows.append((fov, new, old, zooms, foci))
    if args.png:
        draw(rows, args.seed, age, args.png)
        print(f"picture: {args.png}")


if __name__ == "__main__":
    main()
