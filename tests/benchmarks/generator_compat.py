"""Does the current phantom generator, with an older generator's settings, remake that generator's stored cases bit
for bit? And which of them does the current default change? Prints one line per case and setting.

    python tests/benchmarks/generator_compat.py data/test_wb_g17 500000 500001 500003
    python tests/benchmarks/generator_compat.py data/test_partial_g16 600012 600047

The folder is a `wbmri synth` set (its dataset.json holds the settings and the generator version it was made
with); the older generator's settings are `training.phantom.generate.GENERATOR_1_7_SETTINGS` (current -> 1.7) or
`GENERATOR_1_6_SETTINGS` (current -> 1.6), picked by that version.
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
from training.phantom.generate import (GENERATOR_1_6_SETTINGS, GENERATOR_1_7_SETTINGS, GENERATOR_1_8_SETTINGS,
                                       generate_case)

OLDER_SETTINGS = {"1.6": GENERATOR_1_6_SETTINGS, "1.7": GENERATOR_1_7_SETTINGS, "1.8": GENERATOR_1_8_SETTINGS}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", type=Path)
    ap.add_argument("seeds", type=int, nargs="+")
    args = ap.parse_args()
    stored = Path(tempfile.mkdtemp()) / "stored.yaml"  # the settings the set was made with
    dataset = json.loads((args.folder / "dataset.json").read_text())
    version = dataset["generator_version"]
    if version not in OLDER_SETTINGS:
        raise SystemExit(f"no settings remake generator {version}: known {sorted(OLDER_SETTINGS)}")
    stored.write_text(yaml.safe_dump(dataset["config"], sort_keys=False))  # in order: a probability table's order counts
    settings = {f"{version} settings": list(OLDER_SETTINGS[version]), "current default": []}
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
