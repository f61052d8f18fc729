"""How the report's signal-to-noise estimate tracks the noise a phantom was drawn with, to place the noise warning.

    .venv/bin/python tests/benchmarks/noise_estimate.py data/dev_partial_g16 data/dev_wb_g16

For every case of the phantom folders, ``inference.postprocess.estimate_snr`` on the image as the report computes it
against the SNR the generator drew (``case.json``: acquisition.snr, 2 x muscle / noise sigma; training draws 12-40,
Dixon x1.5). Prints the ratio's spread, the estimate per band of drawn SNR and how many cases fall under
``MIN_SNR`` (where the report warns). Session 47 (development sets of generator 1.6): ratio 0.24-0.55 (5-95%), no
case under 4.1, so ``MIN_SNR`` = 4.0 (``inference/postprocess.py``).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from inference.postprocess import MIN_SNR, estimate_snr
from models.nifti import load_volume


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folders", nargs="+", type=Path, help="wbmri synth folders (cases/*/image.nii.gz, case.json)")
    args = p.parse_args()
    drawn, est = [], []
    for folder in args.folders:
        for case in sorted((folder / "cases").glob("*/")):
            vol = load_volume(case / "image.nii.gz")
            drawn.append(json.loads((case / "case.json").read_text())["acquisition"]["snr"])
            est.append(estimate_snr(vol.data, vol.spacing))
    drawn, est = np.array(drawn), np.array(est, float)
    ratio = est / drawn
    print(f"{len(est)} cases; estimate / drawn SNR: median {np.median(ratio):.3f}, "
          f"5-95% {np.percentile(ratio, 5):.3f}-{np.percentile(ratio, 95):.3f}")
    for lo, hi in ((0, 12), (12, 16), (16, 20), (20, 28), (28, 40), (40, 70)):
        m = (drawn >= lo) & (drawn < hi)
        if m.any():
            print(f"drawn {lo}-{hi}: {m.sum()} cases, estimate {est[m].min():.2f} / {np.median(est[m]):.2f} / "
                  f"{est[m].max():.2f} (min / median / max)")
    print(f"under MIN_SNR {MIN_SNR:g} (the report warns): {int(np.sum(est < MIN_SNR))} of {len(est)}")


if __name__ == "__main__":
    main()
