"""Head-feet distances on reference site maps that place the site rules' gaps (``models/site_rules.py``): from the
head bones down to the pelvis or lower (``HEAD_GAP_MM``: a "skull" less than that above a pelvic or lower bone is
dropped), and from the pelvic bones down to the patellae (``PATELLA_GAP_MM``: the femur lies between them).

    .venv/bin/wbmri synth --n 6 --seed 960000 --out /tmp/young --set 'fov.p={whole_body: 1.0}' \\
        --set 'body.age_years=[3.0, 3.1]' --set body.height_sd=0.0001 --set lesions.none_p=1
    .venv/bin/python tests/benchmarks/head_gap.py /tmp/young

For each whole-body case: the lowest head-bone centroid (skull, mandible) minus the highest centroid of a pelvic or
lower bone, and the lowest pelvic centroid (ilium, ischium, pubis, sacrum) minus the highest patella centroid, in mm,
with the child's age and height. Session 47: head gap 313-319 mm on six 3-year-olds of 94-96 cm (the youngest the
phantom draws), so 200 mm is 0.7 of it scaled to -2 SD height (86 cm). Session 49: patella gap 153-157 mm on the
same six (lowest pelvic centroid to the highest patella's), so 80 mm is about 0.57 of it at 86 cm.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import nibabel as nib
import numpy as np

from models.site_rules import HEAD_GAP_MM, PATELLA_GAP_MM, PATELLA_TIER, PELVIS_TIER, head_to_feet_tier
from models.sites import by_id


def gaps_mm(sites_path: Path) -> tuple[float | None, float | None]:
    """(lowest head-bone centroid minus the highest pelvic-or-lower centroid, lowest pelvic centroid minus the highest
    patella centroid), world mm; None where a map lacks either side."""
    img = nib.as_closest_canonical(nib.load(str(sites_path)))
    labels = np.asarray(img.dataobj)
    sites = by_id()
    z_by_tier: dict[str, list[float]] = {"head": [], "low": [], "pelvis": [], "patella": []}
    for sid in np.unique(labels):
        if sid not in sites:
            continue
        z = float(nib.affines.apply_affine(img.affine, np.argwhere(labels == sid))[:, 2].mean())
        tier = head_to_feet_tier(sites[sid])
        if sites[sid].region == "head":
            z_by_tier["head"].append(z)
        elif tier is not None and tier >= PELVIS_TIER:
            z_by_tier["low"].append(z)
        if tier == PELVIS_TIER:
            z_by_tier["pelvis"].append(z)
        elif tier == PATELLA_TIER:
            z_by_tier["patella"].append(z)

    def gap(upper: str, lower: str) -> float | None:
        return min(z_by_tier[upper]) - max(z_by_tier[lower]) if z_by_tier[upper] and z_by_tier[lower] else None
    return gap("head", "low"), gap("pelvis", "patella")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folders", nargs="+", type=Path, help="wbmri synth folders of whole-body cases")
    args = p.parse_args()
    for folder in args.folders:
        for case in sorted((folder / "cases").glob("*/")):
            head, patella = gaps_mm(case / "sites.nii.gz")
            meta = json.loads((case / "case.json").read_text())
            shown = ", ".join(f"{name} {value:.0f} mm (rule {rule:g})" for name, value, rule in
                              (("head gap", head, HEAD_GAP_MM), ("patella gap", patella, PATELLA_GAP_MM))
                              if value is not None)
            print(f"{case.name}: {shown} (age {meta['age_years']:.1f}, {meta['height_cm']:.0f} cm)")


if __name__ == "__main__":
    main()
