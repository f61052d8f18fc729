"""Does the current phantom generator, with an older generator's settings, remake that generator's stored cases bit
for bit? And which of them does the current default change? Prints one line per case and setting.

    python tests/benchmarks/generator_compat.py data/test_wb_g16 500000 500001 500003
    python tests/benchmarks/generator_compat.py data/test_partial_g16 600012 600047

The folder is a `wbmri synth` set (its dataset.json holds the settings it was made with); the older generator's
settings are `training.phantom.generate.GENERATOR_1_6_SETTINGS` (1.7 -> 1.6).
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import yaml

from training.config import SynthConfig, load_config
from training.phantom.generate import GENERATOR_1_6_SETTINGS, generate_case


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", type=Path)
    ap.add_argument("seeds", type=int, nargs="+")
    args = ap.parse_args()
    stored = Path(tempfile.mkdtemp()) / "stored.yaml"  # the settings the set was made with
    made_with = json.loads((args.folder / "dataset.json").read_text())["config"]
    stored.write_text(yaml.safe_dump(made_with, sort_keys=False))  # in order: a probability table's order counts
    settings = {"1.6 settings": list(GENERATOR_1_6_SETTINGS), "current default": []}
    for seed in args.seeds:
        name = f"case_{seed:06d}"
        old = args.folder / "cases" / name
        meta = json.loads((old / "case.json").read_text())
        for label, overrides in settings.items():
            cfg = load_config(SynthConfig, stored, overrides)
            case = generate_case(seed, cfg, name=name)
            same = {k: bool(np.array_equal(np.asanyarray(nib.load(str(old / f"{k}.nii.gz")).dataobj), getattr(case, k)))
                    for k in ("image", "sites", "lesions", "physis")}
            plans = [m["subregion"] for m in meta["lesions"]] == [m["subregion"] for m in case.meta["lesions"]]
            print(f"{seed} {label}: {same}, lesion subregions as stored: {plans}, "
                  f"collapse planned: {any(m['collapse'] for m in meta['lesions'])}", flush=True)


if __name__ == "__main__":
    main()
