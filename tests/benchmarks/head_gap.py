"""The head-feet distance from the head bones down to the pelvis on reference site maps, to place the site rules'
``HEAD_GAP_MM`` (a "skull" less than that above a pelvic or lower bone is dropped, ``models/site_rules.py``).

    .venv/bin/wbmri synth --n 6 --seed 960000 --out /tmp/young --set 'fov.p={whole_body: 1.0}' \\
        --set 'body.age_years=[3.0, 3.1]' --set body.height_sd=0.0001 --set lesions.none_p=1
    .venv/bin/python tests/benchmarks/head_gap.py /tmp/young

For each whole-body case: the lowest head-bone centroid (skull, mandible) minus the highest centroid of a pelvic or
lower bone, in mm, with the child's age and height. Session 47: 313-319 mm on six 3-year-olds of 94-96 cm (the
youngest the phantom draws), so 200 mm is 0.7 of it scaled to -2 SD height (86 cm).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import nibabel as nib
import numpy as np

from models.site_rules import HEAD_GAP_MM, PELVIS_TIER, head_to_feet_tier
from models.sites import by_id


def head_gap_mm(sites_path: Path) -> float | None:
    """Lowest head-bone centroid minus the highest pelvic-or-lower centroid (world mm); None without both."""
    img = nib.as_closest_canonical(nib.load(str(sites_path)))
    labels = np.asarray(img.dataobj)
    sites = by_id()
    head, low = [], []
    for sid in np.unique(labels):
        if sid not in sites:
            continue
        z = nib.affines.apply_affine(img.affine, np.argwhere(labels == sid))[:, 2].mean()
        tier = head_to_feet_tier(sites[sid])
        if sites[sid].region == "head":
            head.append(z)
        elif tier is not None and tier >= PELVIS_TIER:
            low.append(z)
    return min(head) - max(low) if head and low else None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folders", nargs="+", type=Path, help="wbmri synth folders of whole-body cases")
    args = p.parse_args()
    for folder in args.folders:
        for case in sorted((folder / "cases").glob("*/")):
            gap = head_gap_mm(case / "sites.nii.gz")
            meta = json.loads((case / "case.json").read_text())
            if gap is not None:
                print(f"{case.name}: {gap:.0f} mm (age {meta['age_years']:.1f}, {meta['height_cm']:.0f} cm; "
                      f"HEAD_GAP_MM {HEAD_GAP_MM:g})")


if __name__ == "__main__":
    main()
