"""Were the lesions one model found and another missed lost outright, or dropped by the confidence rule?

    .venv/bin/python tests/benchmarks/missed_lesion_confidence.py --data DIR --found EVAL_A --missed EVAL_B \
        --model BUNDLE_B [--min-ml 0.5]

EVAL_A and EVAL_B are ``wbmri evaluate`` folders of two models on the same cases of DIR (contract layout,
``cases/<case>/image.nii.gz`` and ``lesions.nii.gz``). For each reference lesion of at least ``--min-ml`` that A
found and B missed, B predicts the case again with its confidence rule off (``min_confidence`` 0, every other rule
the card's) and the script prints the components that overlap the lesion with their confidence (mean edema
probability) and volume: a lesion outlined just under the card's cut is a calibration question for ``wbmri
validate``; one with no component was lost by the network.
"""
from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

import nibabel as nib
import numpy as np

from inference.predictor import Predictor
from training.evaluate import reference_detections


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--found", type=Path, required=True, help="evaluation of the model that found them")
    ap.add_argument("--missed", type=Path, required=True, help="evaluation of the model that missed them")
    ap.add_argument("--model", type=Path, required=True, help="the bundle behind --missed")
    ap.add_argument("--min-ml", type=float, default=0.5)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    a, b = (reference_detections(d / "lesions.csv", args.min_ml) for d in (args.found, args.missed))
    lost = defaultdict(list)
    for key, found in a.items():
        if found and not b.get(key, False):
            lost[key[0]].append(key[1])
    predictor = Predictor.load(args.model, device=args.device)
    cut, predictor.min_confidence = predictor.min_confidence, 0.0
    print(f"{sum(map(len, lost.values()))} lesions >= {args.min_ml} mL found by {args.found} and missed by "
          f"{args.missed}; {args.model} with its confidence rule ({cut}) off:")
    for case, ids in sorted(lost.items()):
        folder = args.data / "cases" / case
        result = predictor.predict(folder / "image.nii.gz")
        ref = np.asarray(nib.load(folder / "lesions.nii.gz").dataobj)
        for rid in ids:
            hit = set(np.unique(result.lesions[ref == rid])) - {0}
            parts = [f"confidence {les['confidence']:.3f}, {les['volume_ml']:.2f} mL"
                     for les in result.report["lesions"] if les["id"] in hit]
            print(f"  {case} lesion {rid}: " + ("; ".join(parts) if parts else "no component (lost by the network)"))


if __name__ == "__main__":
    main()
