"""End-to-end inference speed and memory on a synthetic 140 cm whole-body case (2 CPU cores), stage by stage.

    .venv/bin/python tests/benchmarks/bench_inference.py [--model models/default] [--threads 2]

Prints: time of each stage (read, preprocess, network, post-process, write) and the peak memory of a fresh
process; the ratio against nnU-Net's inference recipe on the same network (sliding window of the training patch,
50% overlap, Gaussian weighting, 8-fold mirroring); the network's achieved GFLOP/s against this CPU's measured
matmul peak; and bf16 against fp32 (agreement of the edema masks). Targets (issue 4): <= 10 s and <= 2.5 GB.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def make_case(folder: Path) -> Path:
    from models.nifti import save_nifti
    from training.config import SynthConfig, load_config
    from training.phantom.generate import generate_case
    cfg = load_config(SynthConfig, None, ["body.age_years=[10.3,10.3]", "body.female_p=0", "body.height_sd=0",
                                          "acquisition.inplane_mm=[1.45,1.45]", "acquisition.slice_mm=[4.5,4.5]",
                                          "acquisition.oblique_p=0"])
    case = generate_case(4242, cfg, fov="whole_body")
    path = folder / "wb140.nii.gz"
    save_nifti(path, case.image, case.affine)
    print(f"case: {case.meta['height_cm']} cm, {case.meta['age_years']} y, grid {case.image.shape} "
          f"({case.image.size / 1e6:.1f} M voxels), spacing {case.meta['acquisition']['inplane_mm']} x "
          f"{case.meta['acquisition']['slice_mm']} mm, {len(case.meta['lesions'])} lesions planned")
    return path


def child(path: str, model: str | None, threads: int, precision: str, out: str) -> None:
    """Run one prediction in a fresh process and print its stage times and peak RSS as JSON."""
    import torch
    torch.set_num_threads(threads)
    from inference.predictor import Predictor
    t0 = time.perf_counter()
    pred = Predictor.load(model, device="cpu", precision=precision)
    load_s = time.perf_counter() - t0
    pred.predict(path)  # warm-up (oneDNN kernels are built on first use)
    t0 = time.perf_counter()
    result = pred.predict(path)
    result.save(out)
    total = time.perf_counter() - t0
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2
    print(json.dumps({"timings": result.timings, "end_to_end_s": total, "model_load_s": load_s, "peak_rss_gb": peak_gb,
                      "lesions": result.report["summary"]["lesion_count"]}))


def network_comparison(path: Path, model: str | None, threads: int) -> None:
    import numpy as np
    import torch
    from monai.inferers import sliding_window_inference
    from torch.utils.flop_counter import FlopCounterMode
    from inference.predictor import Predictor
    from models.networks import EDEMA, autocast_for, forward_tta, size_divisor
    from models.nifti import load_volume
    from models.preprocessing import normalise, plan_grid, to_model_grid
    torch.set_num_threads(threads)
    pred = Predictor.load(model, device="cpu")
    vol = load_volume(path)
    grid = plan_grid(vol.data.shape, vol.affine, pred.bundle.config.spacing_mm)
    img = normalise(to_model_grid(vol.data, grid, "trilinear"), pred.bundle.config.intensity_reference)
    net, cfg = pred.net, pred.bundle.config
    div = size_divisor(cfg) * 2
    x = torch.from_numpy(np.pad(img, [(0, (-s) % div) for s in img.shape]))[None, None].contiguous(
        memory_format=torch.channels_last_3d)

    def ours(bf16: bool):  # as the predictor runs it: whole volume, with the card's test-time augmentation
        with torch.inference_mode(), autocast_for(pred.device, bf16):
            return forward_tta(net, x, pred.tta)[0]

    def nnunet(bf16: bool):
        def fwd(t):
            return net(t)[0]
        acc = None
        flips = [(), (2,), (3,), (4,), (2, 3), (2, 4), (3, 4), (2, 3, 4)]
        with torch.inference_mode(), autocast_for(pred.device, bf16):
            for f in flips:
                xi = torch.flip(x, f) if f else x
                y = sliding_window_inference(xi, cfg.patch, 2, fwd, overlap=0.5, mode="gaussian").float()
                y = torch.flip(y, f) if f else y
                acc = y if acc is None else acc + y
        return acc / len(flips)

    for fn in (ours,):
        fn(pred.bf16)
    t0 = time.perf_counter()
    ours_out = ours(pred.bf16)
    t_ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    nn_out = nnunet(pred.bf16)
    t_nn = time.perf_counter() - t0
    with FlopCounterMode(display=False) as fc, torch.inference_mode():
        forward_tta(net, x, pred.tta)
    flops = fc.get_total_flops()
    a = torch.randn(4096, 4096)
    peaks = {}
    for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        m = a.to(dt)
        m @ m
        t0 = time.perf_counter()
        for _ in range(3):
            m @ m
        peaks[name] = 3 * 2 * 4096 ** 3 / (time.perf_counter() - t0) / 1e9
    prec = "bf16" if pred.bf16 else "fp32"
    agree = ((torch.sigmoid(ours_out[0, EDEMA].float()) > 0.5) == (torch.sigmoid(nn_out[0, EDEMA]) > 0.5)).float().mean()
    print(f"\nnetwork on the model grid {tuple(x.shape[2:])} ({x[0, 0].numel() / 1e6:.1f} M voxels, {prec}):")
    passes = "one whole-volume pass" if pred.tta == "none" else f"whole volume and its mirror image, tta {pred.tta}"
    print(f"  ours ({passes}): {t_ours:.2f} s")
    print(f"  nnU-Net recipe (patch {cfg.patch}, 50% overlap, Gaussian, 8-fold mirroring): {t_nn:.2f} s")
    print(f"  ratio nnU-Net / ours: {t_nn / t_ours:.1f}x; voxel agreement of the edema masks: {float(agree):.4f}")
    print(f"  network: {flops / 1e9:.0f} GFLOP -> {flops / t_ours / 1e9:.0f} GFLOP/s achieved; "
          f"matmul peak measured here: fp32 {peaks['fp32']:.0f} GFLOP/s, bf16 {peaks['bf16']:.0f} GFLOP/s "
          f"({flops / t_ours / 1e9 / peaks[prec] * 100:.0f}% of the {prec} peak)")
    # bf16 vs fp32 on the same volume
    outs = {}
    for bf16 in (False, True):
        ours(bf16)
        t0 = time.perf_counter()
        outs[bf16] = torch.sigmoid(ours(bf16)[0, EDEMA].float()) > 0.5
        print(f"  {'bf16' if bf16 else 'fp32'} pass: {time.perf_counter() - t0:.2f} s")
    inter = (outs[True] & outs[False]).sum().item()
    denom = outs[True].sum().item() + outs[False].sum().item()
    print(f"  edema-mask Dice bf16 vs fp32: {2 * inter / denom if denom else 1.0:.4f} "
          f"({outs[False].sum().item()} vs {outs[True].sum().item()} voxels)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.model, args.threads, args.precision, args.out)
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = make_case(Path(tmp))
        cmd = [sys.executable, __file__, "--child", str(path), "--threads", str(args.threads), "--precision",
               args.precision, "--out", str(Path(tmp) / "out")] + (["--model", args.model] if args.model else [])
        res = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1])
        tm = res["timings"]
        print(f"\nend to end on {args.threads} threads (model already loaded; loading took {res['model_load_s']:.2f} s):")
        for stage in ("read", "preprocess", "network", "postprocess"):
            print(f"  {stage:<12} {tm[stage]:6.2f} s")
        print(f"  {'write':<12} {tm.get('write', 0):6.2f} s  (NIfTIs + overlay PNG + report)")
        print(f"  {'total':<12} {res['end_to_end_s']:6.2f} s   target <= 10 s: {'met' if res['end_to_end_s'] <= 10 else 'NOT met'}")
        print(f"  peak memory (fresh process, RSS): {res['peak_rss_gb']:.2f} GB   target <= 2.5 GB: "
              f"{'met' if res['peak_rss_gb'] <= 2.5 else 'NOT met'}; lesions found: {res['lesions']}")
        network_comparison(path, args.model, args.threads)


if __name__ == "__main__":
    main()
