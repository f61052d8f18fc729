"""Training: config validation, the loss goes down, checkpoints and resume after a kill, DDP on two CPU processes."""
from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from pydantic import ValidationError

from models.card import load_bundle, save_bundle
from models.lesions import MIN_SIGNAL_RATIO
from models.networks import build_network, fixed_modules
from models.sites import site_id
from training.config import ConfigError, SamplingConfig, TrainConfig, load_config
from training.data import (JITTER_MARGIN, UNKNOWN, crop, jitter_centre, lesion_blobs, make_batch, mimic_mask, phantom_model_case,
                           sample_centre)
from training.export import export_bundle, revalidate
from training.phantom.generate import GENERATOR_VERSION
from training.loop import (Trainer, advance_schedule, anchor_mask, blob_dice_loss, compute_loss, improves, lr_at,
                           operating_point, operating_point_ci, sites_loss, validation_groups)

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "train" / "tiny.yaml"


def tiny_overrides(tmp: Path, cache: Path | None = None) -> list[str]:
    """A tiny run in ``tmp``; its phantoms are cached in ``cache`` (default: ``tmp / "cache"``)."""
    return [f"out_dir={tmp / 'run'}", f"data.cache_dir={cache or tmp / 'cache'}", "synth.anatomy_mm=4",
            "synth.fov.p={whole_body: 1.0}", "synth.lesions.none_p=0"]


@pytest.fixture(scope="module")
def phantom_cache(tmp_path_factory) -> Path:
    """One phantom cache for the runs of this module. Cached cases are keyed by generator settings, seed and grid
    (:func:`training.data.phantom_cache_name`), so a run that asks for phantoms another run made reads them instead of
    making them again; the tests that look into a cache keep their own."""
    return tmp_path_factory.mktemp("phantom_cache")


def test_config_errors_are_clear(tmp_path):
    with pytest.raises(ConfigError) as exc:
        load_config(TrainConfig, TINY, ["optim.lrr=0.1", "optim.steps=0", "network.patch=[30,30,30]"])
    msg = str(exc.value)
    assert "optim.lrr: unknown key (from --set optim.lrr=0.1)" in msg and "optim.steps" in msg
    with pytest.raises(ConfigError) as exc:
        load_config(TrainConfig, TINY, ["data.dataset_dirs=/data/MyCNO"])  # the brackets forgotten
    assert "(from --set data.dataset_dirs=/data/MyCNO; a list is written data.dataset_dirs=[a,b])" in str(exc.value)
    with pytest.raises(ConfigError, match="must be multiples"):
        load_config(TrainConfig, TINY, ["network.patch=[36,36,36]"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(TrainConfig, tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(TrainConfig, bad)
    with pytest.raises(ConfigError, match="key.path=value"):
        load_config(TrainConfig, TINY, ["optim.lr"])
    with pytest.raises(ConfigError, match="must be <= 1"):
        load_config(TrainConfig, TINY, ["sampling.lesion_p=0.6", "sampling.rare_site_p=0.3", "sampling.mimic_p=0.2"])
    with pytest.raises(ConfigError, match="key.path=value"):
        load_config(TrainConfig, TINY, ["=5"])
    with pytest.raises(ConfigError, match="not a valid YAML value"):
        load_config(TrainConfig, TINY, ["data.dataset_dirs=[unclosed"])
    with pytest.raises(ConfigError, match="strides needs one entry fewer than network.channels"):
        load_config(TrainConfig, TINY, ["network.channels=[16,32]"])
    with pytest.raises(ConfigError, match="seed"):
        load_config(TrainConfig, TINY, ["seed=-1"])
    with pytest.raises(ConfigError, match="spacing_mm and network.patch must be positive"):
        load_config(TrainConfig, TINY, ["network.spacing_mm=[0,0,0]"])
    cfg = load_config(TrainConfig, TINY, ["optim.lr=0.01", "sampling.batch_size=3", "optim.steps=1e3"])
    assert cfg.optim.lr == 0.01 and cfg.sampling.batch_size == 3 and cfg.optim.steps == 1000


def test_every_shipped_config_validates():
    from training.export import NOT_TRAINING
    for path in (ROOT / "configs" / "train").glob("*.yaml"):
        load_config(TrainConfig, path)
        load_config(TrainConfig, path, list(NOT_TRAINING))  # as `wbmri validate` and `recalibrate` read a run's config


def test_loss_goes_down_on_a_fixed_batch(tmp_path, phantom_cache):
    cfg = load_config(TrainConfig, TINY, tiny_overrides(tmp_path, phantom_cache))
    torch.manual_seed(0)
    case = phantom_model_case(5, cfg.synth, cfg.network.spacing_mm)
    rng = np.random.default_rng(0)
    batch = make_batch([case, case], rng, cfg, None)
    net = build_network(cfg.network)
    opt = torch.optim.AdamW(net.parameters(), lr=5e-3)
    losses = []
    for _ in range(12):
        voxel, sites = net(batch["image"])
        loss, parts = compute_loss(voxel, sites, batch, cfg)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses
    assert set(parts) >= {"edema_bce", "edema_dice", "bone", "physis", "sites"}


def test_unknown_targets_are_masked(tmp_path, phantom_cache):
    cfg = load_config(TrainConfig, TINY, tiny_overrides(tmp_path, phantom_cache))
    case = phantom_model_case(5, cfg.synth, cfg.network.spacing_mm)
    case["sites"][:] = 255
    case["physis"][:] = 255
    batch = make_batch([case], np.random.default_rng(0), cfg, None)
    net = build_network(cfg.network)
    voxel, sites = net(batch["image"])
    _, parts = compute_loss(voxel, sites, batch, cfg)
    assert parts["sites"] == 0 and parts["bone"] == 0 and parts["physis"] == 0


def test_sites_loss_asks_which_bone_only_inside_bone():
    """The gathered (bone voxels only) loss equals dense cross-entropy that ignores non-bone voxels, and the
    background logit plays no part: where bone is belongs to the full-resolution bone channel."""
    torch.manual_seed(0)
    logits = torch.randn(2, 67, 6, 5, 4, requires_grad=True)
    target = torch.randint(0, 67, (2, 6, 5, 4))
    target[0, :3] = 0
    target[1, 0, 0, 0] = -100  # unknown
    dense = torch.nn.functional.cross_entropy(logits[:, 1:], torch.where(target > 0, target - 1, -100), ignore_index=-100)
    assert torch.allclose(sites_loss(logits, target, dice=False), dense, atol=1e-6)
    sites_loss(logits, target, dice=True).backward()
    assert logits.grad[:, 0].abs().sum() == 0
    assert logits.grad[0, 1:, :3].abs().sum() == 0  # no gradient from background voxels
    assert sites_loss(logits, torch.zeros_like(target), dice=True).item() == 0


def test_init_copies_matching_weights_and_starts_a_changed_head_fresh(tmp_path, capsys, phantom_cache):
    cfg = load_config(TrainConfig, TINY, tiny_overrides(tmp_path, phantom_cache))
    old_cfg = cfg.network.model_copy(update={"sites_from": "final"})
    torch.manual_seed(1)
    old = build_network(old_cfg)
    save_bundle(tmp_path / "old", old, old_cfg, {"name": "old"})
    trainer = Trainer(load_config(TrainConfig, TINY, tiny_overrides(tmp_path, phantom_cache) + [f"init={tmp_path / 'old'}"]))
    new, was = trainer.net.state_dict(), old.state_dict()
    body = [k for k in was if k.startswith("body.") or k.startswith("voxel.")]
    assert body and all(torch.equal(new[k].float(), was[k].float()) for k in body)
    assert new["sites.0.weight"].shape != was["sites.0.weight"].shape
    assert "sites.0.weight" in capsys.readouterr().out
    with pytest.raises(ValueError, match="mm"):
        Trainer(load_config(TrainConfig, TINY, tiny_overrides(tmp_path, phantom_cache) + [f"init={tmp_path / 'old'}",
                                                                           "network.spacing_mm=[6,6,6]"]))


def _train_only(tmp_path: Path, cache: Path, parts: str) -> tuple[torch.nn.Module, torch.nn.Module, TrainConfig]:
    """A fresh tiny network saved as ``base``, fine-tuned from it with ``optim.train_only=[parts]``: both networks
    (base, final) and the base config."""
    torch.manual_seed(3)
    base_cfg = load_config(TrainConfig, TINY, tiny_overrides(tmp_path, cache))
    save_bundle(tmp_path / "base", build_network(base_cfg.network), base_cfg.network, {"name": "base"})
    cfg = load_config(TrainConfig, TINY, tiny_overrides(tmp_path, cache) + [
        f"init={tmp_path / 'base'}", f"optim.train_only=[{parts}]", "optim.lr=0.01", "val_every=1000",
        "precise_bn_batches=2"])
    Trainer(cfg, quiet=True).train(progress=False)
    return load_bundle(tmp_path / "base").net, load_bundle(tmp_path / "run" / "final").net, base_cfg


def test_train_only_the_site_head_keeps_every_other_output_to_the_bit(tmp_path, phantom_cache):
    was, now = (net.state_dict() for net in _train_only(tmp_path, phantom_cache, "sites")[:2])
    held = [k for k in was if not k.startswith("sites.")]
    assert any("running_mean" in k for k in held)  # batch-norm statistics are among what must not move
    assert [k for k in held if not torch.equal(was[k], now[k])] == []
    assert any(not torch.equal(was[k], now[k]) for k in was if k.startswith("sites."))
    with pytest.raises(ConfigError, match="optim.train_only"):
        load_config(TrainConfig, TINY, ["optim.train_only=[encoder]"])


def test_training_the_top_block_and_the_voxel_head_keeps_the_site_logits_to_the_bit(tmp_path, phantom_cache):
    """``optim.train_only=[top, voxel]``: the last full-resolution up block learns, everything the site head reads
    (encoder, deeper decoder, half-resolution skip level) and the site head itself stay as they were."""
    was, now, base_cfg = _train_only(tmp_path, phantom_cache, "top,voxel")
    moved = {k for k, v in was.state_dict().items() if not torch.equal(v, now.state_dict()[k])}
    assert moved and all(k.startswith(("body.model.2.", "voxel.", "act.")) for k in moved), sorted(moved)
    assert any(k.startswith("body.model.2.") for k in moved)
    x = torch.randn(1, 1, *base_cfg.network.patch)
    with torch.no_grad():
        (v0, s0), (v1, s1) = was.eval()(x), now.eval()(x)
    assert torch.equal(s0, s1) and not torch.equal(v0, v1)
    basic = load_config(TrainConfig, TINY, tiny_overrides(tmp_path, phantom_cache) + ["network.arch=basicunet",
                                                                       "network.channels=[8,8,16,32,64,8]"])
    with pytest.raises(ValueError, match="top needs arch unet"):
        fixed_modules(build_network(basic.network), ["top"])
    with pytest.raises(ConfigError, match="needs network.arch unet"):
        load_config(TrainConfig, TINY, ["network.arch=basicunet", "network.channels=[8,8,16,32,64,8]",
                                        "optim.train_only=[top,voxel]"])


def test_the_anatomy_anchor_holds_bone_and_physis_to_the_anchor_model(tmp_path, phantom_cache):
    """``loss.anchor_anatomy_weight``: the bone and physis logits are pulled towards the anchor model's
    probabilities on every voxel; off, they feel no pull when their own targets are off."""
    shape = (1, 1, 6, 6, 6)
    batch = {k: torch.zeros(shape, dtype=torch.uint8) for k in ("edema", "sites", "physis")}
    anchor = torch.full((1, 3, 6, 6, 6), 0.9)
    pulls = {}
    for weight in (0, 1):
        cfg = load_config(TrainConfig, TINY, tiny_overrides(tmp_path, phantom_cache) + [
            "init=models/default", "loss.anchor_weight=1", f"loss.anchor_anatomy_weight={weight}",
            "loss.edema_weight=0", "loss.bone_weight=0", "loss.physis_weight=0", "loss.sites_weight=0"])
        voxel = torch.zeros(1, 3, 6, 6, 6, requires_grad=True)
        loss, parts = compute_loss(voxel, torch.zeros(1, 67, 3, 3, 3), batch, cfg, anchor)
        loss.backward()
        pulls[weight] = voxel.grad[:, 1:]
        assert ("anatomy_anchor" in parts) == bool(weight)
    assert (pulls[0] == 0).all()
    assert (pulls[1] < 0).all()  # 0.9 above sigmoid(0): pulled up
    with pytest.raises(ConfigError, match="set loss.anchor_weight too"):
        load_config(TrainConfig, TINY, ["init=models/default", "loss.anchor_anatomy_weight=1"])


def test_an_anchored_fine_tune_keeps_the_edema_output_near_the_init_model_s(tmp_path, phantom_cache):
    """``loss.anchor_weight`` holds the edema channel to the --init network while the rest learns: with the
    edema targets off in both runs, the anchored one's edema probabilities stay nearer the start."""
    torch.manual_seed(3)
    base_cfg = load_config(TrainConfig, TINY, tiny_overrides(tmp_path, phantom_cache))
    save_bundle(tmp_path / "base", build_network(base_cfg.network), base_cfg.network, {"name": "base"})
    case = phantom_model_case(5, base_cfg.synth, base_cfg.network.spacing_mm)
    x = make_batch([case], np.random.default_rng(0), base_cfg, None)["image"]

    def edema(folder: Path) -> torch.Tensor:
        with torch.no_grad():
            return torch.sigmoid(load_bundle(folder).net.eval()(x)[0][:, 0])

    start = edema(tmp_path / "base")
    drift = {}
    for weight in (0.0, 5.0):
        cfg = load_config(TrainConfig, TINY, tiny_overrides(tmp_path, phantom_cache) + [
            f"out_dir={tmp_path / str(weight)}", f"init={tmp_path / 'base'}", "loss.edema_weight=0",
            f"loss.anchor_weight={weight}", "optim.lr=0.01", "optim.steps=10", "val_every=1000"])
        Trainer(cfg, quiet=True).train(progress=False)
        drift[weight] = float((edema(tmp_path / str(weight) / "final") - start).abs().mean())
        logged = [r["edema_anchor"] for r in csv.DictReader(open(tmp_path / str(weight) / "metrics.csv"))]
        assert all(logged) == (weight > 0), "the anchor term is logged when it is on"
    assert drift[5.0] < 0.5 * drift[0.0], drift
    with pytest.raises(ConfigError, match="set init too"):
        load_config(TrainConfig, TINY, ["loss.anchor_weight=1"])


def test_anchor_from_holds_the_edema_output_to_another_model_than_the_init(tmp_path, phantom_cache):
    """``loss.anchor_from``: a run that starts from one model's weights can keep another model's edema output."""
    torch.manual_seed(4)
    base_cfg = load_config(TrainConfig, TINY, tiny_overrides(tmp_path, phantom_cache))
    for name in ("start", "keep"):
        save_bundle(tmp_path / name, build_network(base_cfg.network), base_cfg.network, {"name": name})
    x = torch.randn(1, 1, *base_cfg.network.patch)

    def edema(folder: Path) -> torch.Tensor:
        with torch.no_grad():
            return torch.sigmoid(load_bundle(folder).net.eval()(x)[0][:, :1])

    overrides = tiny_overrides(tmp_path, phantom_cache) + [f"init={tmp_path / 'start'}", "loss.anchor_weight=1", "precision=fp32"]
    for anchor_from, want, other in ((None, "start", "keep"), (tmp_path / "keep", "keep", "start")):
        extra = [f"loss.anchor_from={anchor_from}"] if anchor_from else []
        anchor = Trainer(load_config(TrainConfig, TINY, overrides + extra), quiet=True)._anchor(x)
        assert torch.allclose(anchor[:, :1], edema(tmp_path / want), atol=1e-5)
        assert not torch.allclose(anchor[:, :1], edema(tmp_path / other), atol=1e-3)
    with pytest.raises(ConfigError, match="loss.anchor_from"):
        Trainer(load_config(TrainConfig, TINY, overrides + [f"loss.anchor_from={tmp_path / 'missing'}"]), quiet=True)
    p75 = load_config(TrainConfig, TINY, tiny_overrides(tmp_path, phantom_cache) + ["network.intensity_reference=p75"])
    save_bundle(tmp_path / "p75", build_network(p75.network), p75.network, {"name": "p75"})
    with pytest.raises(ConfigError, match="intensity reference"):
        Trainer(load_config(TrainConfig, TINY, overrides + [f"loss.anchor_from={tmp_path / 'p75'}"]), quiet=True)


def test_validate_reads_the_config_of_an_anchored_fine_tune(tmp_path, phantom_cache):
    """`wbmri validate runs/X/final` with the run's own config.yaml, of a run that held its edema to a model."""
    cfg = load_config(TrainConfig, TINY, tiny_overrides(tmp_path, phantom_cache))
    save_bundle(tmp_path / "base", build_network(cfg.network), cfg.network, {"name": "base"})
    run_cfg = cfg.model_dump(mode="json") | {"init": str(tmp_path / "base")}
    run_cfg["loss"] |= {"anchor_weight": 2.0, "anchor_from": str(tmp_path / "base")}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(run_cfg))
    chosen = revalidate(tmp_path / "base", tmp_path / "config.yaml", val_cases=1)
    assert chosen["val_cases"] == 1 and load_bundle(tmp_path / "base").card["thresholds"]["edema"] == chosen["threshold"]


def test_operating_point_is_the_most_sensitive_within_the_false_positive_budget():
    def r(t, sens, fp, f1):
        return {"threshold": t, "lesion_sens": sens, "fp_per_scan": fp, "lesion_f1": f1, "edema_dice": 0.5}
    results = [r(0.3, 0.95, 2.0, 0.6), r(0.5, 0.80, 0.5, 0.8), r(0.7, 0.60, 0.1, 0.85)]
    assert operating_point(results)["threshold"] == 0.5
    noisy = [r(0.3, 0.95, 2.0, 0.6), r(0.5, 0.80, 0.9, 0.7)]
    assert operating_point(noisy)["threshold"] == 0.5  # nothing within budget: best F1
    assert operating_point(results, max_fp_per_scan=0.2)["threshold"] == 0.7  # a stricter budget
    tie = [r(0.3, 0.80, 0.1, 0.8), r(0.5, 0.80, 0.1, 0.8)]
    assert operating_point(tie)["threshold"] == 0.5  # identical figures: the stricter rule
    loose, strict = r(0.5, 0.80, 0.1, 0.8), {**r(0.3, 0.80, 0.1, 0.8), "min_confidence": 0.8}
    assert operating_point([loose, strict]) is strict  # a confidence floor is stricter than a higher threshold
    assert operating_point([r(0.3, 0.5, 2.0, 0.6), {**r(0.3, 0.5, 3.0, 0.6), "min_lesion_ml": 0.5}])["min_lesion_ml"] == 0.5


def test_validation_groups_follow_the_case_field_of_view_and_lesions():
    lesion = np.zeros((4, 4, 4), np.uint16)
    lesion[1, 1, 1] = 1
    none = np.zeros_like(lesion)
    assert validation_groups({"fov": np.array("whole_body"), "instances": lesion}) == ["whole_body"]
    assert validation_groups({"fov": np.array("knees"), "instances": none}) == ["partial_fov", "lesion_free"]
    assert validation_groups({"instances": lesion}) == ["scan"]


def test_operating_point_interval_is_a_bootstrap_over_validation_cases():
    steady = operating_point_ci(np.array([[1, 2, 1]] * 10))  # every case alike: no spread
    assert steady == {"lesion_sens": (0.5, 0.5), "fp_per_scan": (1.0, 1.0)}
    lumpy = operating_point_ci(np.array([[2, 2, 0]] * 9 + [[0, 2, 10]]))  # all false positives in one case
    lo, hi = lumpy["fp_per_scan"]
    assert lo == 0.0 and 1.0 < hi <= 3.0
    assert lumpy["lesion_sens"][0] < 0.9 < lumpy["lesion_sens"][1] == 1.0


def test_an_untrained_network_flagging_the_whole_volume_is_not_a_good_checkpoint(tmp_path, phantom_cache):
    """Under the evaluation's matching rule one lesion over the whole body detects every reference lesion without
    a false positive (F1 1.0, edema Dice ~0): such a checkpoint was kept as best, and nothing later beat it."""
    from models.networks import EDEMA
    cfg = load_config(TrainConfig, TINY, tiny_overrides(tmp_path, phantom_cache) + ["data.val_cases=2"])
    trainer = Trainer(cfg, quiet=True)
    trainer.setup_data()
    with torch.no_grad():
        trainer.net.voxel.bias[EDEMA] = 8.0  # edema probability > 0.99 everywhere
    # one rule, not the full grid: each of its 546 rules measures the one body-sized lesion anew (70 s of the suite)
    val = trainer.validate(thresholds=(0.5,), bone_fractions=(0.0,), min_sizes_ml=(0.25,), min_confidences=(0.0,))
    n_lesions = sum(len(np.unique(c["instances"])) - 1 for c in trainer.val_cases)
    assert n_lesions >= 4 and val["edema_dice"] < 0.01
    assert val["lesion_f1"] == 1.0 and val["lesion_sens"] == 1.0 and val["lesion_prec"] == 1.0
    assert val["lesion_f1_selection"] < 0.5
    assert improves((0.6, 0.3), (val["lesion_f1_selection"], val["edema_dice"]))


def test_a_run_from_before_the_selection_f1_chooses_its_best_checkpoint_anew_on_resume(tmp_path, phantom_cache):
    """last.pt records which figure its best is; an older run's best (lesion F1, possibly an untrained network's
    1.0 that nothing could beat) is not compared with selection F1."""
    cfg = load_config(TrainConfig, TINY, tiny_overrides(tmp_path, phantom_cache))
    trainer = Trainer(cfg, quiet=True)
    trainer.best, trainer.best_dice = 1.0, 0.0001
    trainer._save(tmp_path / "last.pt")
    ck = torch.load(tmp_path / "last.pt", weights_only=True)
    assert ck["best_metric"] == "lesion_f1_selection"
    same = Trainer(cfg, quiet=True)
    same._load(tmp_path / "last.pt")
    assert (same.best, same.best_dice) == (1.0, 0.0001)
    del ck["best_metric"]
    torch.save(ck, tmp_path / "old.pt")
    old = Trainer(cfg, quiet=True)
    old._load(tmp_path / "old.pt")
    assert (old.best, old.best_dice) == (-1.0, -1.0) and old.step == ck["step"]


def test_checkpoint_selection_breaks_f1_ties_on_edema_dice():
    assert improves((0.889, 0.72), (0.889, 0.71))      # same F1, better Dice: the later checkpoint wins
    assert not improves((0.889, 0.71), (0.889, 0.72))
    assert not improves((0.889, 0.71), (0.889, 0.71))  # an exact tie keeps the earlier one
    assert improves((0.9, 0.5), (0.889, 0.72))         # F1 first
    assert not improves((0.8, 0.9), (0.889, 0.72))


MIMICS_ONLY = SamplingConfig(lesion_p=0.0, rare_site_p=0.0, mimic_p=1.0)


def test_mimic_patches_centre_on_bright_lesion_free_marrow():
    rng = np.random.default_rng(0)
    shape = (20, 20, 20)
    image = rng.uniform(0.1, 0.2, shape).astype(np.float16)
    sites = np.zeros(shape, np.uint8)
    sites[2:18, 2:18, 2:18] = 7                       # one bone
    edema = np.zeros(shape, np.uint8)
    edema[3:6, 3:6, 3:6] = 1                          # a lesion: the brightest of all, but not a mimic
    image[3:6, 3:6, 3:6] = 0.9
    image[12:16, 12:16, 12:16] = 0.6                  # bright lesion-free marrow (e.g. fat-suppression failure)
    image[0:2, 0:2, 0:2] = 0.8                        # bright but outside bone (fluid)
    case = {"image": image, "edema": edema, "sites": sites, "physis": np.zeros(shape, np.uint8)}
    mask = mimic_mask(case, 0.9)
    assert mask[12:16, 12:16, 12:16].all() and not mask[3:6, 3:6, 3:6].any() and not mask[0:2, 0:2, 0:2].any()
    for _ in range(20):
        c = sample_centre(case, rng, MIMICS_ONLY)
        assert mask[tuple(c)]
    rim = case["image"].copy()
    rim[6, 3:6, 3:6] = 0.6                            # the lesion's bright rim, just outside its label
    with_rim = {**case, "image": rim}
    assert mimic_mask(with_rim, 0.9)[6, 4, 4] and not mimic_mask(with_rim, 0.9, margin=2)[6, 4, 4]
    assert mimic_mask(with_rim, 0.9, margin=2)[12:16, 12:16, 12:16].all()
    unknown = {**case, "sites": np.full(shape, 255, np.uint8)}   # a dataset without a site map: no mimics
    assert mimic_mask(unknown, 0.9) is None
    assert (unknown["image"][tuple(sample_centre(unknown, rng, MIMICS_ONLY))] > 0.05)


def test_focus_sites_take_the_rare_site_patches_where_the_case_has_them():
    rng = np.random.default_rng(2)
    shape = (30, 30, 30)
    sites = np.zeros(shape, np.uint8)
    sites[0:12] = site_id("femur_left")
    sites[15:18, 15:18, 15:18] = site_id("ulna_left")             # 27 voxels of 3,240 bone voxels
    case = {"image": np.ones(shape, np.float16), "edema": np.zeros(shape, np.uint8), "sites": sites,
            "physis": np.zeros(shape, np.uint8)}
    def ulna_share(focus):
        sp = SamplingConfig(lesion_p=0.0, rare_site_p=1.0, focus_sites=focus)
        return np.mean([sites[tuple(sample_centre(case, rng, sp))] == site_id("ulna_left") for _ in range(200)])
    assert 0.3 < ulna_share([]) < 0.7                   # uniform over the two sites present
    assert ulna_share(["ulna", "radius"]) == 1.0
    no_arm = {**case, "sites": np.where(sites == site_id("ulna_left"), 0, sites).astype(np.uint8)}
    sp = SamplingConfig(lesion_p=0.0, rare_site_p=1.0, focus_sites=["ulna"])   # none in view: any site
    assert no_arm["sites"][tuple(sample_centre(no_arm, rng, sp))] == site_id("femur_left")
    with pytest.raises(ValidationError, match="match no site code"):
        SamplingConfig(focus_sites=["ulnar"])


def test_per_lesion_sampling_gives_a_small_lesion_its_share():
    rng = np.random.default_rng(1)
    shape = (30, 30, 30)
    edema = np.zeros(shape, np.uint8)
    edema[2:14, 2:14, 2:14] = 1                       # 1,728 voxels
    edema[25:27, 25:27, 25:27] = 1                    # 8 voxels
    instances = edema.astype(np.uint16)
    instances[25:27, 25:27, 25:27] = 2
    case = {"image": np.ones(shape, np.float16), "edema": edema, "instances": instances,
            "sites": np.zeros(shape, np.uint8), "physis": np.zeros(shape, np.uint8)}
    def small_share(c, per_lesion):
        sp = SamplingConfig(lesion_p=1.0, rare_site_p=0.0, lesion_pick="lesion" if per_lesion else "voxel")
        hits = [sample_centre(c, rng, sp) for _ in range(400)]
        assert all(c["edema"][tuple(h)] == 1 for h in hits)
        return np.mean([h[0] >= 25 for h in hits])
    assert small_share(case, False) < 0.05            # by voxel: 8 of 1,736
    assert 0.4 < small_share(case, True) < 0.6        # by lesion: one of two
    binary = {**case, "instances": edema.astype(np.uint16)}   # nnU-Net labels: lesions are the components
    assert 0.4 < small_share(binary, True) < 0.6
    assert 0.4 < small_share({k: v for k, v in binary.items() if k != "instances"}, True) < 0.6


def test_per_region_sampling_gives_a_pelvic_lesion_the_share_of_the_legs():
    """Three lesions: femur and tibia (legs) and one in the ilium (pelvis). By lesion the ilium gets a third of
    the lesion patches; by region half, as the legs together do; without a site reference, a third again."""
    from models.sites import site_id
    rng = np.random.default_rng(2)
    shape = (30, 30, 30)
    instances, sites = np.zeros(shape, np.uint16), np.zeros(shape, np.uint8)
    for lid, (sl, code) in enumerate([((slice(2, 8),) * 3, "femur_left"), ((slice(10, 16),) * 3, "tibia_left"),
                                      ((slice(24, 27),) * 3, "ilium_left")], start=1):
        instances[sl], sites[sl] = lid, site_id(code)
    case = {"image": np.ones(shape, np.float16), "edema": (instances > 0).astype(np.uint8), "instances": instances,
            "sites": sites, "physis": np.zeros(shape, np.uint8)}
    def ilium_share(c, pick):
        sp = SamplingConfig(lesion_p=1.0, rare_site_p=0.0, lesion_pick=pick)
        return np.mean([sample_centre(c, rng, sp)[0] >= 24 for _ in range(600)])
    assert 0.26 < ilium_share(case, "lesion") < 0.41
    assert 0.42 < ilium_share(case, "region") < 0.58
    unknown = {**case, "sites": np.full(shape, 255, np.uint8)}     # a user's case without sitesTr
    assert 0.26 < ilium_share(unknown, "region") < 0.41


def test_patches_put_their_lesion_anywhere_not_only_at_the_centre():
    """A lesion always at the patch centre teaches the network where lesions sit relative to its strides."""
    rng = np.random.default_rng(0)
    patch, centre = (32, 32, 48), np.array([50, 60, 70])
    offsets = np.array([jitter_centre(centre, patch, rng, 1.0) - centre for _ in range(3000)])
    reach = np.array(patch) // 2 - JITTER_MARGIN
    assert (np.abs(offsets) <= reach).all() and (np.abs(offsets).max(axis=0) == reach).all()
    assert all(len(np.unique(offsets[:, ax] % 16)) == 16 for ax in range(3))      # every phase of a stride of 16
    assert (jitter_centre(centre, patch, rng, 0.0) == centre).all()
    # through make_batch: a one-voxel lesion, every patch chosen on it, lands at many places in the patch
    shape = (64, 64, 64)
    edema = np.zeros(shape, np.uint8)
    edema[30, 31, 32] = 1
    case = {"image": np.ones(shape, np.float16), "edema": edema, "sites": np.zeros(shape, np.uint8),
            "physis": np.zeros(shape, np.uint8)}
    def lesion_places(jitter: float) -> set:
        cfg = TrainConfig.model_validate({"network": {"patch": [32, 32, 32]}, "loss": {"blob_weight": 0},
                                          "sampling": {"lesion_p": 1.0, "rare_site_p": 0.0, "centre_jitter": jitter}})
        return {tuple(np.argwhere(make_batch([case], rng, cfg, None)["edema"][0, 0].numpy() == 1)[0])
                for _ in range(30)}
    assert lesion_places(0.0) == {(16, 16, 16)}
    assert len(lesion_places(1.0)) > 20


def test_crop_pads_outside_the_volume():
    case = {"image": np.ones((10, 10, 10), np.float16), "edema": np.zeros((10, 10, 10), np.uint8),
            "sites": np.full((10, 10, 10), 255, np.uint8), "physis": np.zeros((10, 10, 10), np.uint8)}
    patch = crop(case, np.array([0, 0, 0]), (8, 8, 8))
    assert patch["image"].shape == (8, 8, 8)
    assert patch["image"][:4, :4, :4].sum() == 0 and patch["image"][4:, 4:, 4:].sum() == 64
    assert (patch["sites"] == 255).all()


def test_trainer_writes_run_folder_and_exports_a_bundle(tmp_path, phantom_cache):
    cfg = load_config(TrainConfig, TINY, tiny_overrides(tmp_path, phantom_cache))
    result = Trainer(cfg, quiet=True).train(progress=False)
    run = tmp_path / "run"
    assert result["step"] == cfg.optim.steps
    for name in ("config.yaml", "metrics.csv", "last.pt"):
        assert (run / name).is_file(), name
    assert list((run / "tb").glob("events.out.tfevents.*"))
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert [int(r["step"]) for r in rows] == list(range(1, cfg.optim.steps + 1))
    assert any(r["val_lesion_f1"] for r in rows)
    selection = [float(r["val_lesion_f1_selection"]) for r in rows if r["val_lesion_f1_selection"]]
    assert selection and result["best_selection_f1"] == pytest.approx(max(selection))  # the best kept on it
    bundle = load_bundle(run / "best")
    assert bundle.config == cfg.network
    ck = torch.load(run / "last.pt", weights_only=True)
    assert ck["step"] == cfg.optim.steps

    chosen = revalidate(run / "best", run / "config.yaml", val_cases=2, max_fp_per_scan=0.25)
    card = load_bundle(run / "best").card
    assert card["validation"]["max_fp_per_scan"] == 0.25
    lo, hi = chosen["ci95"]["fp_per_scan"]  # the chosen rule's interval over the 2 cases, kept in the card
    assert lo <= chosen["fp_per_scan"] <= hi and card["validation"]["ci95"] == json.loads(json.dumps(chosen["ci95"]))
    assert chosen["val_cases"] == 2 and card["thresholds"]["edema"] == chosen["threshold"]
    by_group = chosen["fp_per_scan_by_group"]  # the tiny config's validation phantoms are whole-body views
    assert "whole_body" in by_group and "partial_fov" not in by_group and by_group["whole_body"] >= 0
    assert card["thresholds"]["min_confidence"] == chosen["min_confidence"]
    dest = export_bundle(run, tmp_path / "shipped", "best")
    shipped = load_bundle(dest).card
    assert shipped["thresholds"] == card["thresholds"]
    best_step = card["training_steps"]  # the checkpoint shipped, which may precede the last step
    assert 1 <= best_step <= cfg.optim.steps and shipped["training"]["selected_checkpoint_step"] == best_step
    assert shipped["training"]["total_steps"] == best_step and shipped["training"]["earlier_stages"] == []
    assert shipped["version"].endswith(f".{best_step}")


def test_export_counts_the_stage_a_fine_tune_started_from(tmp_path, phantom_cache):
    first = load_config(TrainConfig, TINY, tiny_overrides(tmp_path, phantom_cache) + ["val_every=1000"])
    Trainer(first, quiet=True).train(progress=False)
    second = load_config(TrainConfig, TINY, tiny_overrides(tmp_path, phantom_cache) + [f"out_dir={tmp_path / 'ft'}", "optim.steps=2",
                                                                        f"init={tmp_path / 'run' / 'final'}"])
    Trainer(second, quiet=True).train(progress=False)
    card = load_bundle(export_bundle(tmp_path / "ft", tmp_path / "shipped", "final")).card
    stages = card["training"]["earlier_stages"]
    assert [s["steps"] for s in stages] == [first.optim.steps]
    assert card["training"]["total_steps"] == first.optim.steps + 2 == card["training"]["selected_checkpoint_step"] + first.optim.steps

    # a third stage fine-tuned from the exported bundle (as from models/default, whose run folder is not shipped)
    # reads the earlier stages from that bundle's card
    third = load_config(TrainConfig, TINY, tiny_overrides(tmp_path, phantom_cache) + [f"out_dir={tmp_path / 'ft2'}", "optim.steps=3",
                                                                       f"init={tmp_path / 'shipped'}"])
    Trainer(third, quiet=True).train(progress=False)
    card3 = load_bundle(export_bundle(tmp_path / "ft2", tmp_path / "shipped3", "final")).card
    assert [s["steps"] for s in card3["training"]["earlier_stages"]] == [first.optim.steps, 2]
    assert card3["training"]["earlier_stages"][-1]["version"] == card["version"]
    assert card3["training"]["total_steps"] == first.optim.steps + 2 + 3

    # exported over the bundle it started from, then exported again: the same stages, none counted twice
    export_bundle(tmp_path / "ft2", tmp_path / "shipped", "final")
    card4 = load_bundle(export_bundle(tmp_path / "ft2", tmp_path / "shipped4", "final")).card
    assert [s["steps"] for s in card4["training"]["earlier_stages"]] == [first.optim.steps, 2]
    assert card4["training"]["total_steps"] == card3["training"]["total_steps"]


@pytest.mark.parametrize("signal_rule", [{"min_signal_ratio": 0.8}, {}], ids=["with", "from-before-the-rule"])
def test_a_fine_tune_without_validation_keeps_the_rules_of_the_model_it_started_from(tmp_path, signal_rule, phantom_cache):
    first = load_config(TrainConfig, TINY, tiny_overrides(tmp_path, phantom_cache) + ["val_every=1000"])
    Trainer(first, quiet=True).train(progress=False)
    start = tmp_path / "run" / "final"
    card = json.loads((start / "card.json").read_text())
    assert card["thresholds"]["min_signal_ratio"] == MIN_SIGNAL_RATIO  # a new model's hyperintensity rule
    card["thresholds"] = {"edema": 0.3, "min_lesion_ml": 0.1, "min_bone_fraction": 0.0, "min_confidence": 0.9,
                          **signal_rule, "bone": 0.6, "bone_thin": 0.2}
    card["inference"] = {"tta": "flip_lr_anatomy"}
    (start / "card.json").write_text(json.dumps(card))
    second = load_config(TrainConfig, TINY, tiny_overrides(tmp_path, phantom_cache) + [
        f"out_dir={tmp_path / 'ft'}", "optim.steps=2", "data.val_cases=0", f"init={start}"])
    Trainer(second, quiet=True).train(progress=False)
    tuned = load_bundle(tmp_path / "ft" / "final").card
    assert tuned["thresholds"] == card["thresholds"] and tuned["inference"] == {"tta": "flip_lr_anatomy"}


def test_validation_scores_the_lesions_the_hyperintensity_rule_leaves(fibula):
    """Validation's candidates, labelled within a scoring box, pass the shipped hyperintensity rule measured on the
    whole case, as measure_hyperintense measures them: of a fibula's bright, middling and dark candidates the dark
    one is dropped, only when the rule is on."""
    from models.lesions import components
    from models.measure import measure_hyperintense
    from training.loop import _SignalRule
    lesions, sites, image = fibula
    physis = np.zeros(lesions.shape, bool)
    box = (slice(10, 31), slice(11, 30), slice(3, 56))  # offset on every axis by more than a lesion's width
    comp = components(lesions[box] > 0, None, (lesions[box] > 0).astype(np.float32))
    keep = comp.keep(0.001, 0.0)
    rule = _SignalRule(1.0, image, sites, physis, (1.0, 1.0, 1.0), box)
    kept = rule.hyperintense(comp, keep)
    whole, _, _ = measure_hyperintense(lesions, sites, image, np.eye(4), physis, {1: 0.0, 2: 0.0, 3: 0.0}, 1.0)
    assert np.array_equal(kept, whole[box]) and np.array_equal(np.unique(kept), [0, 1, 2])
    assert np.array_equal(kept > 0, (lesions[box] == 1) | (lesions[box] == 2))
    assert rule.hyperintense(comp, keep) is kept  # several rules keeping the same candidates: measured once
    only_dark = keep & (np.arange(len(keep)) == 3)
    assert not rule.hyperintense(comp, only_dark).any()
    off = _SignalRule(0.0, image, sites, physis, (1.0, 1.0, 1.0), box)
    assert np.array_equal(off.hyperintense(comp, keep) > 0, lesions[box] > 0)


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "service.cli", "train", "--config", str(TINY), *args]


def test_resume_after_kill(tmp_path, phantom_cache):
    over = [a for o in tiny_overrides(tmp_path, phantom_cache) for a in ("--set", o)]
    run = tmp_path / "run"
    proc = subprocess.Popen(_cli(*over, "--set", "optim.steps=400", "--set", "checkpoint_every=2",
                                 "--set", "val_every=1000"), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    t0 = time.time()
    try:
        while not (run / "last.pt").exists():
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.time() - t0 < 240, "no checkpoint appeared"
            time.sleep(0.5)
        time.sleep(1.0)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    step_at_kill = torch.load(run / "last.pt", weights_only=True)["step"]
    assert 2 <= step_at_kill < 400
    done = subprocess.run(_cli(*over, "--resume", "--set", f"optim.steps={step_at_kill + 3}", "--set", "val_every=1000"),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert torch.load(run / "last.pt", weights_only=True)["step"] == step_at_kill + 3
    steps = [int(r["step"]) for r in csv.DictReader(open(run / "metrics.csv"))]
    assert steps[-3:] == [step_at_kill + 1, step_at_kill + 2, step_at_kill + 3]
    assert steps == sorted(set(steps)), "rows logged after the checkpoint must not be repeated after the resume"
    again = subprocess.run(_cli(*over, "--resume", "--set", f"optim.steps={step_at_kill + 3}", "--set", "val_every=1000"),
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]  # resuming a finished run is a no-op, not a crash
    assert torch.load(run / "last.pt", weights_only=True)["step"] == step_at_kill + 3


def test_a_run_folder_is_not_started_over_or_resumed_from_nothing_unless_told(tmp_path, phantom_cache):
    from typer.testing import CliRunner
    from service.cli import app
    over = [a for o in tiny_overrides(tmp_path, phantom_cache) for a in ("--set", o)] + ["--set", "optim.steps=1",
                                                                         "--set", "val_every=1000"]
    run = tmp_path / "run"
    runner = CliRunner()

    def train(*extra: str):
        return runner.invoke(app, ["train", "--config", str(TINY), *over, *extra])
    nothing = train("--resume")
    assert nothing.exit_code == 2 and "holds no last.pt" in nothing.output and not (run / "metrics.csv").exists()
    first = train()
    assert first.exit_code == 0 and (run / "last.pt").is_file(), first.output[-2000:]
    events = sorted(p.name for p in (run / "tb").iterdir())
    again = train()
    assert again.exit_code == 2 and "holds a run already" in again.output and "--overwrite" in again.output
    assert sorted(p.name for p in (run / "tb").iterdir()) == events, "a refused start leaves the run as it was"
    time.sleep(1.1)  # TensorBoard names its event files by the second
    fresh = train("--overwrite")
    assert fresh.exit_code == 0, fresh.output[-2000:]
    now = sorted(p.name for p in (run / "tb").iterdir())
    assert len(now) == len(events) and not set(now) & set(events), "the old run's TensorBoard events are gone"


def test_prepare_only_fills_the_caches_and_trains_nothing(tmp_path):
    over = [a for o in tiny_overrides(tmp_path) for a in ("--set", o)]
    cmd = _cli(*over, "--prepare-only", "--set", "data.workers=2", "--set", "data.phantom_cases=1")
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "(2 phantom cases made): 1 pool, 1 validation and 0 dataset cases" in done.stdout
    pool = list((tmp_path / "cache").glob("pool_*/*.npz"))
    val = list((tmp_path / "cache").glob("val_*/*.npz"))
    assert [p.stem for p in pool] == ["100000"] and [p.stem for p in val] == ["900000"]
    assert not list((tmp_path / "cache").rglob("*.tmp.npz")) and not (tmp_path / "run").exists()
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "(0 phantom cases made)" in again.stdout


def test_case_cache_keeps_the_most_recent_cases_within_its_budget(tmp_path):
    from training.data import CaseCache, save_npz
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"{i}.npz")
        save_npz(paths[-1], {"image": np.full((10, 10, 10), i, np.float16), "edema": np.zeros((10, 10, 10), np.uint8)})
    size = 10 ** 3 * 3  # bytes per case in memory
    cache = CaseCache(2 * size)
    for p in paths:
        cache.get(p)
    assert len(cache) == 2 and cache.bytes == 2 * size and cache.misses == 3
    assert cache.get(paths[2])["image"][0, 0, 0] == 2 and cache.hits == 1
    assert cache.get(paths[0])["image"][0, 0, 0] == 0 and cache.misses == 4  # evicted, read again
    cache.get(paths[2])
    assert cache.hits == 2  # 2 was used more recently than 1, so 1 went when 0 came back
    cache.get(paths[1])
    assert cache.misses == 5
    nothing = CaseCache(0)
    assert nothing.get(paths[1])["image"][0, 0, 0] == 1 and len(nothing) == 0


def test_ddp_two_cpu_processes(tmp_path, phantom_cache):
    over = [a for o in tiny_overrides(tmp_path, phantom_cache) for a in ("--set", o)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29531",
           "-m", "service.cli", "train", "--config", str(TINY), *over, "--set", "optim.steps=4",
           "--set", "threads=1", "--device", "cpu"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    ck = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert ck["step"] == 4
    assert (tmp_path / "run" / "best" / "model.safetensors").is_file()


def test_ddp_processes_share_the_step_count_a_time_budget_sets(tmp_path, phantom_cache):
    over = [a for o in tiny_overrides(tmp_path, phantom_cache) for a in ("--set", o)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533",
           "-m", "service.cli", "train", "--config", str(TINY), *over, "--set", "optim.steps=100000",
           "--set", "optim.minutes=0.15", "--set", "checkpoint_every=20", "--set", "val_every=100000",
           "--set", "threads=1", "--device", "cpu"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=env)  # a rank left waiting would hang
    assert done.returncode == 0, done.stderr[-3000:]
    steps = load_config(TrainConfig, tmp_path / "run" / "config.yaml").optim.steps
    assert 25 < steps < 100000  # rank 0's count (made after 20 + 5 steps at the earliest), which both trained to
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["step"] == steps


def test_card_names_the_dataset_folders_a_run_learned_from(tmp_path):
    from training.config import SynthConfig
    from training.export import _dataset_source
    from training.phantom.generate import write_dataset_json
    phantom = tmp_path / "phantom"
    phantom.mkdir()
    cfg = load_config(SynthConfig, None, ["contrast.enabled=true", "contrast.p=1.0"])
    write_dataset_json(phantom, ["case_000007", "case_000008"], cfg, 7)
    src = _dataset_source(phantom)
    assert src["synthetic"] and src["seeds"] == "7..8" and src["cases"] == 2
    assert src["contrast_randomisation"]["p"] == 1.0 and src["contrast_randomisation"]["gamma"] == [0.7, 1.5]
    meta = json.loads((phantom / "dataset.json").read_text())
    (phantom / "dataset.json").write_text(json.dumps({**meta, "generator_version": "1.1"}))
    assert _dataset_source(phantom)["contrast_randomisation"]["gamma"] is None  # 1.1 never applied it
    real = tmp_path / "MyCNO"
    real.mkdir()
    (real / "dataset.json").write_text(json.dumps({"name": "MyCNO", "numTraining": 12}))
    assert _dataset_source(real) == {"path": str(real), "cases": 12, "synthetic": False}


def test_blob_loss_weighs_every_lesion_alike():
    """Two lesions, 64 and 1 voxels. Finding only the large one: batch Dice barely notices the miss, the blob loss
    counts it as half the lesions missed; a prediction on one lesion does not count against the other."""
    from training.loop import soft_dice_loss
    target = np.zeros((1, 1, 12, 12, 12), np.uint8)
    target[0, 0, 1:5, 1:5, 1:5] = 1
    target[0, 0, 9, 9, 9] = 1
    blobs = torch.from_numpy(lesion_blobs(target[0]))[None]
    assert int(blobs.max()) == 2
    t = torch.from_numpy(target).float()
    known = torch.ones_like(t)
    big_only = t.clone()
    big_only[0, 0, 9, 9, 9] = 0
    assert float(soft_dice_loss(big_only, t, known)) < 0.01
    blob = float(blob_dice_loss(big_only, blobs, known))
    assert abs(blob - 0.25) < 1e-6  # mean of big (0) and small (1 - 1 / (0 + 1 + 1) = 0.5, +1 smoothing)
    assert float(blob_dice_loss(t, blobs, known)) < 0.01  # both found: the other lesion's voxels are masked out
    assert float(blob_dice_loss(torch.zeros_like(t), torch.zeros_like(blobs), known)) == 0.0


def test_blob_loss_is_part_of_the_loss_when_asked(tmp_path, phantom_cache):
    cfg = load_config(TrainConfig, TINY, tiny_overrides(tmp_path, phantom_cache) + ["loss.blob_weight=1.0", "sampling.lesion_p=1.0", "sampling.rare_site_p=0"])
    case = phantom_model_case(5, cfg.synth, cfg.network.spacing_mm)
    batch = make_batch([case], np.random.default_rng(0), cfg, None)
    assert "blobs" in batch and int(batch["blobs"].max()) >= 1
    net = build_network(cfg.network)
    voxel, sites = net(batch["image"])
    total, parts = compute_loss(voxel, sites, batch, cfg)
    assert 0 < parts["edema_blob"] <= 1
    cfg.loss.blob_weight = 0.0
    assert compute_loss(voxel, sites, batch, cfg)[0].item() < total.item()


def test_a_stage_is_counted_once_whether_its_path_is_relative_or_absolute(tmp_path, monkeypatch):
    """Re-exporting runs/v17 into the models/default it was initialised from: the card there already lists the
    run (by the absolute out_dir it trained under), which must not be counted again."""
    from training.export import _distinct_stages
    monkeypatch.chdir(tmp_path)
    stages = [{"run": "runs/a", "steps": 10}, {"run": str(tmp_path / "runs" / "b"), "steps": 20},
              {"run": str(tmp_path / "runs" / "a"), "steps": 10}]
    kept = _distinct_stages(stages, Path("runs/b"))
    assert [s["steps"] for s in kept] == [10]


def test_extra_pools_are_made_with_their_own_generator_settings_and_batches_come_from_loader_workers(tmp_path):
    over = tiny_overrides(tmp_path) + [
        "data.phantom_cases=1", "data.loader_workers=2", "optim.steps=4",
        "data.extra_pools=[{cases: 1, seed: 200000, synth: {anatomy_mm: 4, fov: {p: {whole_body: 1.0}}, "
        "lesions: {none_p: 0, ratio_to_marrow: [1.0, 1.2], faint_p: 1.0, muscle_floor: 0.0}}}]"]
    cfg = load_config(TrainConfig, TINY, over)
    trainer = Trainer(cfg, quiet=True)
    result = trainer.train(progress=False)
    assert result["step"] == 4 and np.isfinite(result["loss"])
    main, faint = (sorted((tmp_path / "cache").glob(f"pool_*_{s}_*/{s}.npz")) for s in (100000, 200000))
    assert len(main) == 1 and len(faint) == 1 and main[0].parent != faint[0].parent  # one cache folder per setting
    assert [p.name for p in trainer._files()] == ["100000.npz", "200000.npz"]

    def lesion_to_marrow(path):  # median edema signal over median lesion-free bone signal
        from training.data import load_npz
        case = load_npz(path)
        img, edema, bone = case["image"].astype(np.float32), case["edema"] == 1, case["sites"] > 0
        return np.median(img[edema]) / np.median(img[bone & ~edema])
    assert lesion_to_marrow(faint[0]) < lesion_to_marrow(main[0])

    from training.data import BatchStream
    stream = BatchStream(trainer.pools[:1], [faint[0]], cfg, None, seed=5)
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=2)
    it = iter(loader)
    first, second = next(it), next(it)  # one batch from each worker: their random streams differ
    assert first["image"].shape == (1, 1, 32, 32, 32) and not torch.equal(first["image"], second["image"])
    del it


def test_phantom_pools_must_not_share_seeds():
    with pytest.raises(ConfigError, match="phantom pools overlap: seeds 100000-100159 and 100100-100109"):
        load_config(TrainConfig, None, ["data.extra_pools=[{cases: 10, seed: 100100}]"])


def test_affine_theta_turns_a_non_cubic_patch_rigidly():
    import torch.nn.functional as F
    from training.data import affine_theta
    shape = (9, 25, 41)  # D, H, W: far from a cube; odd sides put the centre on voxel (4, 12, 20)
    img = torch.zeros(1, 1, *shape)
    img[0, 0, 4, 12, 30] = 1.0  # 10 voxels from the centre along x
    quarter = torch.tensor([[0.0, 0.0, np.pi / 2]])  # about z
    theta = affine_theta(shape, quarter, torch.ones(1, 3))
    out = F.grid_sample(img, F.affine_grid(theta, [1, 1, *shape], align_corners=False), mode="nearest",
                        align_corners=False)
    d, y, x = np.argwhere(out[0, 0].numpy() > 0.5)[0]
    assert d == 4 and x == 20 and abs(y - 12) == 10  # still 10 voxels from the centre, now along y
    half = affine_theta(shape, torch.zeros(1, 3), torch.full((1, 3), 2.0))  # scale 2: input read 2x further out
    out = F.grid_sample(img, F.affine_grid(half, [1, 1, *shape], align_corners=False), mode="nearest",
                        align_corners=False)
    assert np.argwhere(out[0, 0].numpy() > 0.5).tolist() == [[4, 12, 25]]


def test_batch_augmentation_keeps_labels_whole_and_does_nothing_at_probability_zero(tmp_path, phantom_cache):
    from training.config import AugmentConfig
    from training.data import augment_batch
    cfg = load_config(TrainConfig, TINY, tiny_overrides(tmp_path, phantom_cache))
    case = phantom_model_case(100000, cfg.synth, cfg.network.spacing_mm)
    batch = make_batch([case] * 4, np.random.default_rng(0), cfg, None)
    assert "blobs" not in batch or batch["blobs"].dtype == torch.int16
    same = augment_batch(batch, torch.Generator().manual_seed(0), AugmentConfig(p=0.0))
    assert all(torch.equal(same[k], batch[k].float() if k == "image" else batch[k]) for k in batch)
    moved = augment_batch(batch, torch.Generator().manual_seed(0), AugmentConfig(p=1.0, rotate_deg=20))
    for key in ("edema", "sites", "physis"):
        assert moved[key].dtype == batch[key].dtype and moved[key].shape == batch[key].shape
        assert set(moved[key].unique().tolist()) <= set(batch[key].unique().tolist())  # nearest: no new labels
    assert not torch.equal(moved["sites"], batch["sites"]) and torch.isfinite(moved["image"]).all()
    again = augment_batch(batch, torch.Generator().manual_seed(0), AugmentConfig(p=1.0, rotate_deg=20))
    assert all(torch.equal(again[k], moved[k]) for k in moved)  # the generator decides every draw


def test_training_with_augmentation_on_the_device_lowers_nothing_to_nan(tmp_path, phantom_cache):
    cfg = load_config(TrainConfig, TINY, tiny_overrides(tmp_path, phantom_cache) + ["augment.on_device=true", "augment.p=1.0"])
    trainer = Trainer(cfg, quiet=True)
    result = trainer.train(progress=False)
    assert trainer.augment is None and result["step"] == cfg.optim.steps and np.isfinite(result["loss"])


def test_a_time_budget_sets_the_step_count_so_the_schedule_ends_on_time(tmp_path, capsys, phantom_cache):
    cfg = load_config(TrainConfig, TINY, tiny_overrides(tmp_path, phantom_cache) + ["optim.steps=100000", "optim.minutes=0.25",
                                                                     "checkpoint_every=50", "val_every=100000"])
    t0 = time.time()
    result = Trainer(cfg).train(progress=False)
    assert time.time() - t0 < 15 + 60  # the budget, with room for the export and a slow machine
    counts = [int(n) for n in re.findall(r"(\d+) steps fit in 0.25 min", capsys.readouterr().out)]
    assert counts and counts[-1] == cfg.optim.steps < 100000  # the step count follows the measured pace
    assert 25 < result["step"] <= cfg.optim.steps  # reached, or stopped when the time was up
    assert load_config(TrainConfig, tmp_path / "run" / "config.yaml").optim.steps == cfg.optim.steps
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()


def test_a_slow_machine_counts_its_steps_early(tmp_path, phantom_cache):
    cfg = load_config(TrainConfig, TINY, tiny_overrides(tmp_path, phantom_cache) + ["optim.minutes=10"])
    trainer = Trainer(cfg, quiet=True)
    assert not trainer._count_due(5, 20.0, first=True)  # 5 steps in 20 s of a 600 s budget: measure on
    assert trainer._count_due(5, 31.0, first=True)  # over a twentieth of the budget: count now
    assert not trainer._count_due(39, 1.0, first=True) and trainer._count_due(40, 1.0, first=True)
    assert not trainer._count_due(199, 500.0, first=False) and trainer._count_due(200, 1.0, first=False)


def test_a_re_counted_time_budget_bends_the_learning_rate_without_a_jump():
    cfg = TrainConfig(optim={"lr": 1e-3, "warmup": 10, "steps": 1000, "schedule": "cosine"})
    frac, fixed = 0.0, []
    for step in range(cfg.optim.steps):  # a count that stays: the same curve as the plain schedule
        fixed.append(lr_at(step, cfg, frac if step >= cfg.optim.warmup else None))
        if step >= cfg.optim.warmup:
            frac = advance_schedule(frac, step, cfg.optim.steps)
    assert np.allclose(fixed, [lr_at(s, cfg) for s in range(cfg.optim.steps)], rtol=0, atol=1e-12)
    assert frac == pytest.approx(1.0)
    frac, bent, plain = 0.0, [], []
    for step in range(cfg.optim.warmup, 1400):  # the pace doubles at step 300: the count becomes 1,400
        if step == 300:
            cfg.optim.steps = 1400
        bent.append(lr_at(step, cfg, frac))
        plain.append(lr_at(step, cfg))
        frac = advance_schedule(frac, step, cfg.optim.steps)
    jump = max(abs(a - b) for a, b in zip(plain[1:], plain[:-1]))
    assert jump > 5e-5  # re-reading the plain curve at the new count jumps up (9% of the peak rate)
    assert max(abs(a - b) for a, b in zip(bent[1:], bent[:-1])) < jump / 20  # the bent one moves a step's worth
    assert all(b <= a + 1e-12 for a, b in zip(bent[:-1], bent[1:])) and bent[-1] < 1e-8  # falls, and ends on time


def test_precise_bn_averages_every_batch_s_statistics_and_leaves_the_weights(tmp_path, phantom_cache):
    cfg = load_config(TrainConfig, TINY, tiny_overrides(tmp_path, phantom_cache) + ["precision=fp32", "data.val_cases=0"])
    trainer = Trainer(cfg, quiet=True)
    trainer.setup_data()
    norms = [m for m in trainer.net.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    seen: list[torch.Tensor] = []
    hook = norms[0].register_forward_hook(lambda m, inp, out: seen.append(inp[0].detach().float()))
    weights = {k: v.clone() for k, v in trainer.net.named_parameters()}
    assert trainer.precise_bn(5) == len(norms) > 0
    hook.remove()
    assert len(seen) == 5
    by_channel = [x.transpose(0, 1).flatten(1) for x in seen]  # (C, voxels of the batch)
    assert torch.allclose(norms[0].running_mean, torch.stack([x.mean(1) for x in by_channel]).mean(0), atol=1e-6)
    assert torch.allclose(norms[0].running_var, torch.stack([x.var(1) for x in by_channel]).mean(0), rtol=1e-4)
    assert all(torch.equal(v, dict(trainer.net.named_parameters())[k]) for k, v in weights.items())
    assert all(m.momentum == 0.1 for m in norms) and trainer.net.training  # as it was before
    first = norms[-1].running_var.clone()
    trainer.precise_bn(5)  # the same seed: the same patches, the same statistics
    assert torch.equal(norms[-1].running_var, first)


def test_recalibrate_writes_a_new_bundle_with_re_estimated_statistics(tmp_path, phantom_cache):
    cfg = load_config(TrainConfig, TINY, tiny_overrides(tmp_path, phantom_cache) + ["optim.steps=2", "val_every=1000"])
    Trainer(cfg, quiet=True).train(progress=False)
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "service.cli", "recalibrate", str(run / "final"), "--batches", "3"]
    same = subprocess.run(cmd + ["--to", str(run / "final")], capture_output=True, text=True, cwd=ROOT)
    assert same.returncode == 2 and "--to must be a new folder" in same.stderr
    res = subprocess.run(cmd + ["--to", str(tmp_path / "bn")], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    old, new = load_bundle(run / "final"), load_bundle(tmp_path / "bn")  # load_bundle checks the card's sha256
    record = new.card["training"]["precise_bn"]
    assert record["batches"] == 3 and record["from_sha256"] == old.sha256 and record["cases"] == 2
    assert new.card["version"] == f"{old.version}+bn3" and new.card["thresholds"] == old.card["thresholds"]
    a, b = old.net.state_dict(), new.net.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a if "running" not in k and "num_batches" not in k)
    assert not torch.equal(a["body.model.0.conv.unit0.adn.N.running_var"], b["body.model.0.conv.unit0.adn.N.running_var"])


def test_average_writes_the_weight_average_of_two_bundles(tmp_path):
    from models.networks import NetworkConfig, build_network
    cfg = NetworkConfig(channels=(4, 8, 16), strides=(2, 2), features=4, spacing_mm=(6.0, 6.0, 6.0), patch=(32, 32, 32))
    for seed, name in ((0, "tuned"), (1, "base")):
        torch.manual_seed(seed)
        save_bundle(tmp_path / name, build_network(cfg), cfg, {"name": name, "version": f"1.2.{seed + 5}",
                                                                "thresholds": {"edema": 0.3 + seed}})
    wide = cfg.model_copy(update={"features": 8})
    save_bundle(tmp_path / "wide", build_network(wide), wide, {"name": "wide"})
    cmd = [sys.executable, "-m", "service.cli", "average", str(tmp_path / "tuned"), "--share", "0.25", "--to"]
    res = subprocess.run(cmd + [str(tmp_path / "avg"), "--with", str(tmp_path / "base")], capture_output=True,
                         text=True, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    tuned, base, avg = (load_bundle(tmp_path / n) for n in ("tuned", "base", "avg"))  # checks each sha256
    a, b, c = (x.net.state_dict() for x in (tuned, base, avg))
    floats = [k for k in a if a[k].is_floating_point()]
    assert floats and all(torch.allclose(c[k], 0.75 * a[k] + 0.25 * b[k], atol=1e-6) for k in floats)
    assert any("running_var" in k for k in floats) and not torch.equal(c[floats[0]], a[floats[0]])
    assert avg.card["version"] == "1.2.5+avg25" and avg.card["thresholds"] == tuned.card["thresholds"]
    record = avg.card["training"]["weight_average"]
    assert (record["from_sha256"], record["with_sha256"], record["share"]) == (tuned.sha256, base.sha256, 0.25)
    other = subprocess.run(cmd + [str(tmp_path / "x"), "--with", str(tmp_path / "wide")], capture_output=True,
                           text=True, cwd=ROOT)
    assert other.returncode == 2 and "another network" in other.stderr and not (tmp_path / "x").exists()
    same = subprocess.run(cmd + [str(tmp_path / "tuned"), "--with", str(tmp_path / "base")], capture_output=True,
                          text=True, cwd=ROOT)
    assert same.returncode == 2 and "--to must be a new folder" in same.stderr


def test_generator_processes_are_shared_by_what_each_pool_lacks(tmp_path):
    from training.config import SynthConfig
    from training.data import PhantomPool
    from training.loop import share_workers
    pools = [PhantomPool(tmp_path / name, list(range(n)), SynthConfig(), (8.0, 8.0, 8.0)) for name, n in
             (("a", 240), ("b", 120), ("c", 120), ("d", 0))]
    share_workers(pools, 9)
    assert [p.workers for p in pools] == [5, 2, 2, 0]  # 4.5, 2.25, 2.25: the largest remainder takes the ninth
    share_workers(pools[:3], 2)  # fewer processes than pools: each pool that lacks cases still gets one
    assert [p.workers for p in pools[:3]] == [1, 1, 1]


def test_the_anchor_can_leave_the_lesions_to_their_labels():
    """``loss.anchor_outside_lesions``: -1 holds every voxel; n holds only voxels more than n voxels from a lesion
    voxel, and never an unknown one."""
    edema = torch.zeros(1, 1, 9, 9, 9, dtype=torch.uint8)
    edema[0, 0, 4, 4, 4] = 1
    edema[0, 0, 0, 0, 0] = UNKNOWN
    assert anchor_mask(edema, -1).sum() == 9 ** 3
    for margin, freed in ((0, 1), (1, 27), (2, 125)):
        held = anchor_mask(edema, margin)
        assert held[0, 0, 4, 4, 4] == 0 and held[0, 0, 0, 0, 0] == 0
        assert held.sum() == 9 ** 3 - freed - 1, margin
    assert anchor_mask(edema, 1)[0, 0, 4, 4, 6] == 1 and anchor_mask(edema, 2)[0, 0, 4, 4, 6] == 0


def test_an_anchor_outside_the_lesions_leaves_them_to_their_labels(tmp_path, phantom_cache):
    """The anchor term's pull on the edema logits: everywhere with -1; with n it stops n voxels from each lesion,
    so there only the lesion labels (edema_weight) teach."""
    base_cfg = load_config(TrainConfig, TINY, tiny_overrides(tmp_path, phantom_cache) + ["sampling.lesion_p=1", "sampling.rare_site_p=0"])
    case = phantom_model_case(5, base_cfg.synth, base_cfg.network.spacing_mm)
    batch = make_batch([case], np.random.default_rng(0), base_cfg, None)
    lesion = batch["edema"] == 1
    assert lesion.any()
    near = torch.nn.functional.max_pool3d(lesion.float(), 3, stride=1, padding=1) > 0
    torch.manual_seed(5)
    logits = torch.randn(1, 3, *lesion.shape[2:])
    sites = torch.randn(1, 67, *(n // 2 for n in lesion.shape[2:]))
    anchor = torch.rand_like(lesion, dtype=torch.float32)
    for margin in (-1, 1):
        cfg = load_config(TrainConfig, TINY, tiny_overrides(tmp_path, phantom_cache) + [
            "init=models/default", "loss.anchor_weight=1", f"loss.anchor_outside_lesions={margin}",
            "loss.edema_weight=0", "loss.bone_weight=0", "loss.physis_weight=0", "loss.sites_weight=0"])
        voxel = logits.clone().requires_grad_()
        compute_loss(voxel, sites, batch, cfg, anchor)[0].backward()
        pull = voxel.grad[:, :1].abs() > 0
        assert pull[~near].all()
        assert pull[near].all() if margin < 0 else not pull[near].any(), margin
    with pytest.raises(ConfigError, match="anchor_outside_lesions"):
        load_config(TrainConfig, TINY, ["loss.anchor_outside_lesions=-2"])


def test_the_plate_term_teaches_the_plates_and_the_anchor_lets_them_go(tmp_path, phantom_cache):
    """``loss.plate_weight``: on and within ``plate_margin`` voxels of a growth plate the edema output learns from
    its labels (down on the plate, up on a lesion over it) and the anchor no longer pulls; elsewhere only the anchor
    does."""
    shape = (1, 1, 9, 9, 9)
    batch = {"edema": torch.zeros(shape, dtype=torch.uint8), "sites": torch.zeros(shape, dtype=torch.uint8),
             "physis": torch.zeros(shape, dtype=torch.uint8)}
    batch["physis"][..., 4, :, :] = 1  # a plate across the patch
    batch["edema"][0, 0, 4, 4, 4] = 1  # a lesion on it
    zone = torch.zeros(shape, dtype=torch.bool)
    zone[..., 3:6, :, :] = True
    plate_only = tiny_overrides(tmp_path, phantom_cache) + [
        "init=models/default", "loss.anchor_weight=1", "loss.plate_weight=1", "loss.plate_margin=1",
        "loss.edema_weight=0", "loss.bone_weight=0", "loss.physis_weight=0", "loss.sites_weight=0"]
    cfg = load_config(TrainConfig, TINY, plate_only)
    voxel = torch.zeros(1, 3, 9, 9, 9, requires_grad=True)
    loss, parts = compute_loss(voxel, torch.zeros(1, 67, 4, 4, 4), batch, cfg, torch.full(shape, 0.9))
    loss.backward()
    grad = voxel.grad[:, :1]
    assert "edema_plates" in parts
    lesion = batch["edema"] == 1
    assert (grad[zone & ~lesion] > 0).all()  # label 0 on the plate: the logits are pushed down
    assert (grad[lesion] < 0).all()  # the lesion over the plate: up
    assert (grad[~zone] < 0).all()  # the anchor (0.9) pulls up away from the plate
    heavier = load_config(TrainConfig, TINY, plate_only + ["loss.plate_pos_weight=4"])
    voxel4 = voxel.detach().clone().requires_grad_(True)
    compute_loss(voxel4, torch.zeros(1, 67, 4, 4, 4), batch, heavier, torch.full(shape, 0.9))[0].backward()
    grad4 = voxel4.grad[:, :1]
    assert torch.allclose(grad4[lesion], 4 * grad[lesion])  # loss.plate_pos_weight: the lesion over the plate
    assert torch.allclose(grad4[~lesion], grad[~lesion])  # ... and nothing else
    cfg0 = load_config(TrainConfig, TINY, tiny_overrides(tmp_path, phantom_cache) + [
        "init=models/default", "loss.anchor_weight=1", "loss.edema_weight=0", "loss.bone_weight=0",
        "loss.physis_weight=0", "loss.sites_weight=0"])
    assert "edema_plates" not in compute_loss(voxel.detach(), torch.zeros(1, 67, 4, 4, 4), batch, cfg0,
                                              torch.full(shape, 0.9))[1]
    with pytest.raises(ConfigError, match="plate_margin"):
        load_config(TrainConfig, TINY, ["loss.plate_margin=9"])


def test_resuming_a_finished_or_early_stopped_run_changes_nothing(tmp_path, phantom_cache):
    """A finished run resumed takes no step and leaves final/ (weights, validated lesion rules) as it was; one that
    stopped early takes no further step either. (Resumed, both once re-exported final/ with the config's default
    rules and no validation, and the early-stopped one trained an unvalidated step.)"""
    cfg = load_config(TrainConfig, TINY, tiny_overrides(tmp_path, phantom_cache))
    Trainer(cfg, quiet=True).train(progress=False)
    final = tmp_path / "run" / "final"
    before = {f.name: f.read_bytes() for f in final.iterdir()}
    assert "validation" in json.loads(before["card.json"])
    result = Trainer(cfg, resume=True, quiet=True).train(progress=False)
    assert result["step"] == cfg.optim.steps
    assert {f.name: f.read_bytes() for f in final.iterdir()} == before
    assert result["threshold"] == json.loads(before["card.json"])["thresholds"]["edema"], "the last validation kept"

    ck = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    ck["bad_vals"] = 5  # as a run that stopped early leaves it
    torch.save(ck, tmp_path / "run" / "last.pt")
    longer = load_config(TrainConfig, TINY, tiny_overrides(tmp_path, phantom_cache) + ["early_stop_patience=2",
                                                                                      f"optim.steps={cfg.optim.steps + 3}"])
    assert Trainer(longer, resume=True, quiet=True).train(progress=False)["step"] == cfg.optim.steps
    assert {f.name: f.read_bytes() for f in final.iterdir()} == before


def test_without_validation_best_follows_the_last_step_across_a_resume(tmp_path, phantom_cache):
    """With no validation nothing chooses a best checkpoint: best/ is the last step's, after a resume too (it kept
    the first segment's, which wbmri export ships by default)."""
    over = tiny_overrides(tmp_path, phantom_cache) + ["data.val_cases=0"]
    Trainer(load_config(TrainConfig, TINY, over + ["optim.steps=2"]), quiet=True).train(progress=False)
    result = Trainer(load_config(TrainConfig, TINY, over + ["optim.steps=4"]), resume=True,
                     quiet=True).train(progress=False)
    assert result["best_selection_f1"] is None
    assert load_bundle(tmp_path / "run" / "best").card["training_steps"] == 4
    assert load_bundle(tmp_path / "run" / "final").card["training_steps"] == 4


def test_resume_keeps_the_run_s_init_and_refuses_another_network(tmp_path, phantom_cache, monkeypatch):
    """--resume without the --init the run started with continues with the run's (its lesion rules and lineage
    come from it; they were dropped); a network or train_only that differs from the run's is refused in one line."""
    from training.loop import resume_config
    first = load_config(TrainConfig, TINY, tiny_overrides(tmp_path, phantom_cache) + ["val_every=1000"])
    Trainer(first, quiet=True).train(progress=False)
    start = tmp_path / "run" / "final"
    over = tiny_overrides(tmp_path, phantom_cache) + [f"out_dir={tmp_path / 'ft'}", "data.val_cases=0",
                                                      "optim.steps=2"]
    Trainer(load_config(TrainConfig, TINY, over + [f"init={start}"]), quiet=True).train(progress=False)
    checkpoint = tmp_path / "ft" / "last.pt"
    cfg, notes = resume_config(load_config(TrainConfig, TINY, over + ["optim.steps=3"]), checkpoint)
    assert cfg.init == start and notes and "--init" in notes[0]
    assert resume_config(load_config(TrainConfig, TINY, over + [f"init={start}"]), checkpoint)[1] == []
    monkeypatch.chdir(tmp_path)  # the same bundle by a relative path
    assert resume_config(load_config(TrainConfig, TINY, over + ["init=run/final"]), checkpoint)[1] == []
    ck = torch.load(checkpoint, weights_only=True)  # a run started before settings that have defaults now
    del ck["config"]["optim"]["train_only"], ck["config"]["network"]["intensity_reference"]
    torch.save(ck, checkpoint)
    assert resume_config(load_config(TrainConfig, TINY, over + [f"init={start}"]), checkpoint)[1] == []
    with pytest.raises(ConfigError, match=r"network .*optim.train_only"):
        resume_config(load_config(TrainConfig, TINY, over + ["network.features=8", "optim.train_only=[sites]"]),
                      checkpoint)


def test_export_names_the_model_and_says_what_it_learned_from(tmp_path, phantom_cache):
    """The card carries the config's name (every export was 'wbmri-default', so a user's model was reported as the
    shipped one), the machine it trained on, the generator of its phantoms, no seed ranges where there were no
    cases, and, trained on real scans, no claim that none was used."""
    from training.export import REAL_DATA_LIMITATION
    cfg = load_config(TrainConfig, TINY, tiny_overrides(tmp_path, phantom_cache) + ["data.val_cases=0",
                                                                                   "optim.steps=1"])
    Trainer(cfg, quiet=True).train(progress=False)
    card = load_bundle(export_bundle(tmp_path / "run", tmp_path / "mine", "final")).card
    assert card["name"] == "wbmri-tiny" and card["training"]["hardware"].startswith("cpu: ")
    assert card["data"]["generator_version"] == GENERATOR_VERSION
    assert card["data"]["validation_seeds"] == "none (no validation)"
    assert card["limitations"][0] != REAL_DATA_LIMITATION  # phantoms only
    real = tmp_path / "MyCNO"
    real.mkdir()
    (real / "dataset.json").write_text(json.dumps({"name": "MyCNO", "numTraining": 2}))
    conf = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    conf["data"].update(dataset_dirs=[str(real)], phantom_cases=0)
    (tmp_path / "run" / "config.yaml").write_text(yaml.safe_dump(conf))
    card = load_bundle(export_bundle(tmp_path / "run", tmp_path / "mine2", "final")).card
    assert REAL_DATA_LIMITATION in card["limitations"] and not any("no real patient scan" in x
                                                                     for x in card["limitations"])
    assert card["data"]["train_pool_seeds"] == "none (no phantom pool)"
    # a model fine-tuned from it on phantoms alone has still learned from real scans
    ft = load_config(TrainConfig, TINY, tiny_overrides(tmp_path, phantom_cache) + [
        f"out_dir={tmp_path / 'ft'}", "data.val_cases=0", "optim.steps=1", f"init={tmp_path / 'mine2'}"])
    Trainer(ft, quiet=True).train(progress=False)
    card = load_bundle(export_bundle(tmp_path / "ft", tmp_path / "mine3", "final")).card
    assert REAL_DATA_LIMITATION in card["limitations"] and card["data"]["synthetic_only"] is False
    with pytest.raises(ValueError, match="own final/ bundle"):
        export_bundle(tmp_path / "run", tmp_path / "run" / "final", "final")


def test_train_command_errors_are_one_line(tmp_path, phantom_cache):
    """A device that is not there or not a device, an --out-dir that is a file, and a run folder a killed run left
    before its first checkpoint: exit 2 and one line each (the first two were tracebacks, the last advised a
    --resume that then said there was nothing to resume)."""
    from typer.testing import CliRunner
    from service.cli import app
    over = [a for o in tiny_overrides(tmp_path, phantom_cache) for a in ("--set", o)]
    runner = CliRunner()
    res = runner.invoke(app, ["train", "--config", str(TINY), *over, "--device", "gpu"])
    assert res.exit_code == 2 and "device must be auto, cpu or cuda" in res.output, res.output
    (tmp_path / "afile").write_text("x")
    res = runner.invoke(app, ["train", "--config", str(TINY), *over, "--out-dir", str(tmp_path / "afile")])
    assert res.exit_code == 2 and "is a file, not a run folder" in res.output
    tiny = load_config(TrainConfig, TINY)
    bundle = save_bundle(tmp_path / "bundle", build_network(tiny.network), tiny.network, {"name": "x"})
    weights = next(bundle.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-100])  # truncated: fails the card's sha256
    res = runner.invoke(app, ["train", "--config", str(TINY), *over, "--init", str(bundle)])
    assert res.exit_code == 2 and "--init: " in res.output and "sha256 does not match" in res.output, res.output
    killed = tmp_path / "killed"
    killed.mkdir()
    (killed / "metrics.csv").write_text("step,loss\n1,0.5\n")
    res = runner.invoke(app, ["train", "--config", str(TINY), *over, "--out-dir", str(killed)])
    assert res.exit_code == 2 and "before its first checkpoint" in res.output and "--overwrite" in res.output
    assert "Traceback" not in res.output
