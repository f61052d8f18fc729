"""Does validation drop the lesions inference drops? The hyperintensity rule measured on the model grid's
normalised image (as `wbmri validate` applies it) against the input grid's signal (as inference applies it).

    .venv/bin/python tests/benchmarks/signal_rule_grids.py data/dev_partial_g14 data/dev_wb_g14 [--model models/default]

For every case of each folder (``cases/*/image.nii.gz``) the model's candidates under its card's lesion rules are
found once; the rule (the card's ``min_signal_ratio``) is then applied on each grid by
:func:`models.measure.measure_hyperintense`, and the candidates each grid drops are counted and compared.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from inference.predictor import Predictor  # noqa: E402
from models.measure import measure_hyperintense  # noqa: E402
from models.nifti import load_volume  # noqa: E402
from models.preprocessing import to_input_grid  # noqa: E402
from models.site_rules import apply_site_rules  # noqa: E402


def survivors(kept: np.ndarray, candidates: np.ndarray) -> set[int]:
    """Candidate ids (of ``candidates``) that overlap a kept lesion."""
    return {int(i) for i in np.unique(candidates[kept > 0]) if i}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folders", nargs="+", type=Path)
    ap.add_argument("--model", default="models/default")
    args = ap.parse_args()
    pred = Predictor.load(args.model, device="cpu")
    ratio = pred.min_signal_ratio
    totals = {"candidates": 0, "input": 0, "model": 0, "both": 0}
    for folder in args.folders:
        for case in sorted((folder / "cases").iterdir()):
            vol = load_volume(case / "image.nii.gz")
            grid, img = pred.model_input(vol)
            out = pred.network_outputs(img)
            edema = out.edema > pred.threshold
            site_map = apply_site_rules(out.sites, img, grid.model_spacing, edema)  # as Predictor.predict
            inst, conf = pred._components(out.edema, edema, out.bone, grid)
            ids = set(range(1, int(inst.max()) + 1))
            if not ids:
                continue
            physis = out.physis > 0.5
            on_model, _, _ = measure_hyperintense(inst, site_map, img, np.diag([*grid.model_spacing, 1.0]), physis,
                                                  conf, ratio)
            up = to_input_grid(inst, grid).astype(np.uint16)
            on_input, _, _ = measure_hyperintense(up, to_input_grid(site_map, grid).astype(np.uint8), vol.data,
                                                  vol.affine, to_input_grid(physis.astype(np.uint8), grid) > 0,
                                                  {k: conf[k] for k in ids}, ratio)
            ids &= {int(i) for i in np.unique(up) if i}  # a candidate too small for the input grid is not compared
            dropped_model = ids - survivors(on_model, inst)
            dropped_input = ids - survivors(on_input, up)
            totals["candidates"] += len(ids)
            totals["input"] += len(dropped_input)
            totals["model"] += len(dropped_model)
            totals["both"] += len(dropped_input & dropped_model)
            if dropped_input ^ dropped_model:
                print(f"{folder.name}/{case.name}: input grid drops {sorted(dropped_input)}, "
                      f"model grid {sorted(dropped_model)}", flush=True)
    print(f"min_signal_ratio {ratio}: {totals['candidates']} candidates; dropped on the input grid (inference) "
          f"{totals['input']}, on the model grid (validation) {totals['model']}, by both {totals['both']}")


if __name__ == "__main__":
    main()
