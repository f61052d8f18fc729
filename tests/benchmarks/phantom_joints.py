"""Where the phantom's bones end at the knee and elbow, and a picture of both joints.

    .venv/bin/python tests/benchmarks/phantom_joints.py [SEED ...] [--png FILE]

For each seed (default 500000-500002 and 500013, test-set children) the skeleton is drawn on the 2 mm anatomy grid,
as ``wbmri synth`` draws it, and the head-to-feet extent of each bone near the right knee and elbow is printed in mm
from the joint's landmark (the joint line): the femur's lowest and the tibia's highest voxel, the patella's span,
the humerus's lowest, the radius's and the ulna's highest voxel, and how far behind the elbow the olecranon lies
(mean anterior-posterior position of the ulna above the humerus's lowest voxel). Generator 1.3 gave a tibia reaching
+13 to +17 mm into the femur and a radius at +11 to +13 mm; generator 1.4 keeps a joint space at both
(``models/default/HISTORY.md``, session 36). ``--png`` draws the right knee and elbow of the first seed: site labels
over the tissue map, one coronal and one sagittal slice of each.
"""
from __future__ import annotations

import argparse

import numpy as np

from models.sites import site_id
from training.config import BodyConfig
from training.phantom.generate import GENERATOR_VERSION, draw_skeleton

SIDE = "right"


def voxels_mm(cv, bone: str) -> np.ndarray:
    return cv.origin + cv.spacing * np.argwhere(cv.sites == site_id(f"{bone}_{SIDE}"))


def joint_extents(body, cv) -> dict[str, float]:
    """mm from the knee and elbow landmarks along head-to-feet, to the outer faces of the bones' end voxels (and
    behind the elbow for the olecranon)."""
    knee = body.landmarks[f"knee_{SIDE}"][2]
    elbow = np.array(body.landmarks[f"elbow_{SIDE}"])
    femur, tibia, patella = (voxels_mm(cv, b) for b in ("femur", "tibia", "patella"))
    humerus, radius, ulna = (voxels_mm(cv, b) for b in ("humerus", "radius", "ulna"))
    olecranon = ulna[ulna[:, 2] > humerus[:, 2].min()]
    face = cv.spacing / 2  # extents to the voxels' outer faces
    return {"femur_low": femur[:, 2].min() - face - knee, "tibia_high": tibia[:, 2].max() + face - knee,
            "patella_low": patella[:, 2].min() - face - knee, "patella_high": patella[:, 2].max() + face - knee,
            "humerus_low": humerus[:, 2].min() - face - elbow[2], "radius_high": radius[:, 2].max() + face - elbow[2],
            "ulna_high": ulna[:, 2].max() + face - elbow[2],
            "olecranon_behind": elbow[1] - olecranon[:, 1].mean() if len(olecranon) else float("nan")}


def draw(body, cv, seed: int, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = ["femur", "tibia", "fibula", "patella", "humerus", "radius", "ulna"]
    lut = np.zeros(256, int)
    for k, name in enumerate(names, 1):
        lut[site_id(f"{name}_{SIDE}")] = k
    fig, axes = plt.subplots(1, 4, figsize=(14, 4.2))
    for row, (joint, bone, half) in enumerate((("knee", "femur", 50), ("elbow", "ulna", 30))):
        c = np.array(body.landmarks[f"{joint}_{SIDE}"])
        i = np.round((c - cv.origin) / cv.spacing).astype(int)
        h = int(half / cv.spacing)
        near = voxels_mm(cv, bone)
        near = near[np.abs(near[:, 2] - c[2]) < half]
        x = int(round((np.median(near[:, 0]) - cv.origin[0]) / cv.spacing))  # sagittal slice through that bone
        views = {"coronal": (slice(i[0] - h, i[0] + h), i[1], slice(i[2] - h, i[2] + h)),
                 "sagittal": (x, slice(i[1] - h, i[1] + h), slice(i[2] - h, i[2] + h))}
        for col, (plane, sl) in enumerate(views.items()):
            ax = axes[2 * row + col]
            labels = np.ma.masked_equal(lut[cv.sites[sl]].T[::-1], 0)
            ax.imshow(cv.tissue[sl].T[::-1], cmap="gray", interpolation="nearest")
            ax.imshow(labels, cmap="tab10", vmin=0, vmax=9, alpha=0.75, interpolation="nearest")
            ax.axhline(h, color="w", lw=0.6, ls=":")
            where = f"through the {bone}, anterior to the right" if plane == "sagittal" else "at the landmark"
            ax.set_title(f"{joint}, {plane} {where}", fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
    handles = [plt.Rectangle((0, 0), 1, 1, color=plt.get_cmap("tab10")(k / 9)) for k in range(1, len(names) + 1)]
    fig.legend(handles, names, loc="lower center", ncol=len(names), fontsize=8, frameon=False)
    fig.suptitle(f"phantom generator {GENERATOR_VERSION}, seed {seed}: right knee and elbow on the 2 mm anatomy grid "
                 "(tissue map in grey; dotted: the joint landmark)", fontsize=10)
    fig.savefig(path, dpi=90, bbox_inches="tight")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("seeds", nargs="*", type=int, default=[500000, 500001, 500002, 500013])
    ap.add_argument("--png", help="write a picture of the first seed's right knee and elbow")
    args = ap.parse_args()
    print(f"generator {GENERATOR_VERSION}; mm from the joint landmark (+: towards the head), right side")
    for k, seed in enumerate(args.seeds):
        body, cv = draw_skeleton(seed, BodyConfig(), 2.0)
        ext = joint_extents(body, cv)
        print(f"seed {seed} ({body.age:.1f} y, {body.H / 10:.0f} cm): " + ", ".join(f"{n} {v:+.0f}" for n, v in ext.items()))
        if k == 0 and args.png:
            draw(body, cv, seed, args.png)
            print(f"picture: {args.png}")


if __name__ == "__main__":
    main()
