"""Phantom speed on ONE core: whole-body cases (anatomy at 2 mm, then acquired), with the time of each stage.

    .venv/bin/python tests/benchmarks/bench_phantom.py [--n 5] [--seed 500]

Target (issue 2): at most 10 s per whole-body case on one core; the same seed gives the same case.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ["OMP_NUM_THREADS"] = "1"
os.environ["MKL_NUM_THREADS"] = "1"

import numpy as np  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

from training.config import SynthConfig  # noqa: E402
from training.phantom.generate import generate_case  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=5)
    ap.add_argument("--seed", type=int, default=500)
    args = ap.parse_args()
    if args.n < 1:
        ap.error(f"--n must be at least 1 (nothing to time otherwise), not {args.n}")
    cfg = SynthConfig()
    times = []
    print(f"{'seed':>6} {'age':>5} {'height':>7} {'grid':>18} {'voxels':>11} {'anatomy':>8} {'contrast':>9} {'acquire':>8} {'total':>7}")
    for seed in range(args.seed, args.seed + args.n):
        t0 = time.perf_counter()
        case = generate_case(seed, cfg, fov="whole_body")
        dt = time.perf_counter() - t0
        times.append(dt)
        tm = case.meta["timings_s"]
        print(f"{seed:>6} {case.meta['age_years']:>5.1f} {case.meta['height_cm']:>6.1f}c {str(case.image.shape):>18} "
              f"{case.image.size:>11,} {tm['anatomy']:>8.2f} {tm['lesions_contrast']:>9.2f} {tm['acquisition']:>8.2f} {dt:>7.2f}")
    again = generate_case(args.seed, cfg, fov="whole_body")
    first = generate_case(args.seed, cfg, fov="whole_body")
    same = np.array_equal(again.image, first.image) and np.array_equal(again.lesions, first.lesions)
    print(f"\nwhole-body case on 1 core: mean {statistics.mean(times):.2f} s, max {max(times):.2f} s "
          f"(target <= 10 s: {'met' if max(times) <= 10 else 'NOT met'}); same seed -> same case: {same}")


if __name__ == "__main__":
    main()
