"""Training throughput on this machine: seconds per step and samples per second of the default configuration.

    .venv/bin/python tests/benchmarks/bench_training.py [--steps 20] [--precision auto|bf16|fp32]

Uses cached phantom cases from data/cache when present (run `wbmri train` once), else generates two.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def main() -> None:
    import numpy as np
    import torch
    from models.networks import autocast_for, build_network, resolve_device
    from training.config import TrainConfig, load_config
    from training.data import build_augment, load_npz, make_batch, phantom_model_case
    from training.loop import compute_loss, use_bf16
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--precision", default="auto")
    args = ap.parse_args()
    if args.steps < 1:
        ap.error(f"--steps must be at least 1 (nothing to time otherwise), not {args.steps}")
    cfg = load_config(TrainConfig, ROOT / "configs" / "train" / "default.yaml", [f"precision={args.precision}"])
    files = sorted((ROOT / "data" / "cache").glob("pool_*/*.npz"))[:8]
    cases = [load_npz(f) for f in files] or [phantom_model_case(s, cfg.synth, cfg.network.spacing_mm) for s in (1, 2)]
    device = resolve_device(cfg.device)
    bf16 = use_bf16(cfg, device)
    net = build_network(cfg.network).to(device).to(memory_format=torch.channels_last_3d)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.optim.lr)
    aug, rng = build_augment(cfg), np.random.default_rng(0)
    t_data = t_step = 0.0
    for i in range(args.steps + 2):
        t0 = time.perf_counter()
        batch = make_batch([cases[j] for j in rng.integers(len(cases), size=cfg.sampling.batch_size)], rng, cfg, aug)
        t1 = time.perf_counter()
        with autocast_for(device, bf16):
            voxel, sites = net(batch["image"].to(device).to(memory_format=torch.channels_last_3d))
        loss, _ = compute_loss(voxel, sites, {k: v.to(device) for k, v in batch.items()}, cfg)
        opt.zero_grad()
        loss.backward()
        opt.step()
        t2 = time.perf_counter()
        if i >= 2:  # the first steps build kernels
            t_data += t1 - t0
            t_step += t2 - t1
    n = args.steps
    per = (t_data + t_step) / n
    print(f"{torch.get_num_threads()} threads, {'bf16' if bf16 else 'fp32'}, batch {cfg.sampling.batch_size} x "
          f"{cfg.network.patch}: {per:.2f} s/step (data + augmentation {t_data / n:.2f} s, network {t_step / n:.2f} s), "
          f"{cfg.sampling.batch_size / per:.2f} samples/s")


if __name__ == "__main__":
    main()
