"""How far from a growth plate or apophysis do an evaluation's plate-touching false positives reach? For each false
positive that touches a plate voxel (physis.nii.gz of the evaluated set), the share of its voxels within 3, 6 and
9 mm of a plate (in the input grid's millimetres). Chose stage 31's `loss.plate_margin` (configs/train/stage31.yaml).

    .venv/bin/python tests/benchmarks/plate_false_positive_distances.py eval/t_wb_g18 data/test_wb_g18
"""
from __future__ import annotations

import argparse
import csv
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy.ndimage import distance_transform_edt, find_objects

PAD = 15  # voxels around the false positive's box in which its distances are measured


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("eval_dir", type=Path)
    ap.add_argument("data", type=Path)
    args = ap.parse_args()
    with open(args.eval_dir / "lesions.csv", newline="") as fh:
        false_positives = [r for r in csv.DictReader(fh) if r["kind"] == "false_positive"]
    for row in false_positives:
        img = nib.load(args.eval_dir / "predictions" / row["case"] / "lesions.nii.gz")
        pred = np.asanyarray(img.dataobj) == int(row["id"])
        plate = np.asanyarray(nib.load(args.data / "cases" / row["case"] / "physis.nii.gz").dataobj) > 0
        box = tuple(slice(max(s.start - PAD, 0), s.stop + PAD) for s in find_objects(pred.astype(np.uint8))[0])
        if not plate[box].any():
            continue
        mm = distance_transform_edt(~plate[box], sampling=img.header.get_zooms()[:3])[pred[box]]
        if mm.min() > 0:
            continue  # near a plate but not touching it
        print(f"{row['case']} {row['pred_site']} {float(row['volume_ml']):.2f} mL: within 3 mm {(mm <= 3).mean():.2f}, "
              f"6 mm {(mm <= 6).mean():.2f}, 9 mm {(mm <= 9).mean():.2f}")


if __name__ == "__main__":
    main()
