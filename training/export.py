"""Turn a training run into a shippable model bundle with its model card (models/default/ for the default)."""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path
from typing import Sequence

import yaml

from models import SOFTWARE
from models.card import CARD, WEIGHTS, load_bundle, locate_bundle, result_identity, sha256_file
from training.evaluate import TARGET_FP_PER_SCAN, TARGET_SENSITIVITY
from training.phantom.generate import GENERATOR_VERSION

INTENDED_USE = (
    "Research and decision support: segmentation of bone-marrow edema on whole-body or regional STIR / T2 "
    "fat-suppressed MRI of children and adolescents (3-17 years) with known or suspected chronic nonbacterial "
    "osteomyelitis (CNO/CRMO), with anatomical site naming and measurements for follow-up. It supports and does "
    "not replace clinical judgement; it is not a diagnostic device.")
# The targets of the model issue, checked on every exported card. Detection is one target: sensitivity for
# lesions >= 0.5 mL *at* no more than TARGET_FP_PER_SCAN false positives per scan (training.evaluate), so a row
# holds both figures of the shipped operating point and is met only when both are. The others: (summary key path,
# comparison, value, label, the statistic's name in the summary's 95% bootstrap intervals).
DETECTION = f"sensitivity for lesions >= 0.5 mL at <= {TARGET_FP_PER_SCAN} false positives per scan"
TARGETS = [
    (("edema_dice", "mean"), ">=", 0.75, "edema Dice", "edema_dice"),
    (("site_accuracy", "site"), ">=", 0.95, "site accuracy including side", "site_accuracy"),
    (("mean_site_dice", "mean"), ">=", 0.80, "mean bone-site Dice", "mean_site_dice"),
    (("fp_per_scan_no_reference_lesions", "value"), "<=", 0.3, "false positives per lesion-free scan",
     "fp_per_scan_no_reference_lesions"),
]


def _at(summary: dict, path: tuple[str, ...]):
    value = summary
    for key in path:
        value = value.get(key) if isinstance(value, dict) else None
    return value


def _detection_row(name: str, summary: dict) -> dict:
    """The detection target at the shipped operating point; ``froc_sensitivity_at_target_fp`` is the best
    sensitivity any confidence cut-off reaches within the false-positive limit (the FROC curve)."""
    sens, fp = summary.get("sensitivity_ge_0p5ml"), _at(summary, ("lesions", "ge_0p5ml", "fp_per_scan"))
    met = None if sens is None or fp is None else sens >= TARGET_SENSITIVITY and fp <= TARGET_FP_PER_SCAN
    ci = summary.get("ci95", {})
    return {"test_set": name, "metric": DETECTION, "value": sens,
            "target": f">= {TARGET_SENSITIVITY} at <= {TARGET_FP_PER_SCAN} false positives per scan", "met": met,
            "ci95": ci.get("sensitivity_ge_0p5ml"), "fp_per_scan": fp, "fp_per_scan_ci95": ci.get("fp_per_scan"),
            "froc_sensitivity_at_target_fp": _at(summary, ("froc", "sensitivity_at_target_fp"))}


def target_check(summaries: dict[str, dict]) -> list[dict]:
    """Each target of the model issue against each evaluated test set: value, target and whether it is met."""
    rows = []
    for name, summary in summaries.items():
        rows.append(_detection_row(name, summary))
        for path, op, target, label, ci_name in TARGETS:
            value = _at(summary, path)
            met = None if value is None else (value >= target if op == ">=" else value <= target)
            rows.append({"test_set": name, "metric": label, "value": value, "target": f"{op} {target}", "met": met,
                         "ci95": summary.get("ci95", {}).get(ci_name)})
    return rows


def _shown(value: float, target: str) -> str:
    """Two decimals, or three where two would round a missed target onto it (0.949 is not >= 0.95)."""
    two = f"{value:.2f}"
    return two if two != f"{float(target.split()[1]):.2f}" else f"{value:.3f}"


def _interval(ci: list[float] | None) -> str:
    return f"{ci[0]:.2f}-{ci[1]:.2f}" if ci else "n/a"


def _target_text(r: dict) -> str:
    """One target's figure in words, with its 95% interval(s)."""
    value = _shown(r["value"], r["target"]) if r["value"] is not None else "n/a"
    if "fp_per_scan" in r:  # the detection pair
        fp = "n/a" if r["fp_per_scan"] is None else f"{r['fp_per_scan']:.2f}"
        return (f"{r['test_set']} sensitivity for lesions >= 0.5 mL {value} at {fp} false positives per scan "
                f"(target {r['target']}; 95% intervals {_interval(r.get('ci95'))} and "
                f"{_interval(r.get('fp_per_scan_ci95'))})")
    ci = f", 95% interval {_interval(r['ci95'])}" if r.get("ci95") else ""
    return f"{r['test_set']} {r['metric']} {value} (target {r['target']}{ci})"


def _not_clearly_met(r: dict) -> bool:
    """A met target whose 95% interval reaches past it (e.g. 0.29 false positives per lesion-free scan, interval
    0.00-0.57, on 7 scans): met on the point estimate only."""
    if not r["met"] or not r.get("ci95") or "fp_per_scan" in r:
        return False
    op, bound = r["target"].split()[:2]
    return r["ci95"][0] < float(bound) if op == ">=" else r["ci95"][1] > float(bound)


def _target_limitation(rows: list[dict]) -> list[str]:
    if not rows:
        return ["Not evaluated on the frozen synthetic test set: its accuracy is unknown."]
    missed = [r for r in rows if r["met"] is False]
    unclear = [r for r in rows if _not_clearly_met(r)]
    text = []
    if missed:
        text.append(f"It does NOT meet {len(missed)} of its {len(rows)} targets on the frozen synthetic test set: "
                    + "; ".join(_target_text(r) for r in missed) + ".")
    if unclear:
        text.append(f"It meets {len(unclear)} more on the point estimate only, the 95% interval reaching past the "
                    "target: " + "; ".join(_target_text(r) for r in unclear) + ".")
    if not text:
        return []
    return [" ".join(text) + " Read the metrics before relying on any output; retrain or fine-tune (`wbmri train`) "
            "where you can."]


REAL_DATA_LIMITATION = (
    "Trained on phantoms and on the labelled scans named in data.dataset_dirs: its accuracy on other centres' "
    "scanners, protocols and patients is unknown until measured on labelled scans it did not train on (`wbmri "
    "evaluate --model ... --data ...`); the figures of the shipped default model below do not describe it.")
LIMITATIONS = [
    "Trained on a synthetic phantom only (analytic anatomy, simulated STIR contrast and acquisition); no real "
    "patient scan was used. Accuracy on real scans is unknown until measured on labelled local data: fine-tune "
    "with `wbmri train --init models/default` on your own labelled scans.",
    "It cannot tell CNO from its mimics (bacterial osteomyelitis, leukaemia, Langerhans cell histiocytosis, "
    "tumours, stress reactions); every finding needs a radiologist's reading.",
    "Normal bright findings (physes, residual red marrow, foot marrow foci in children, fluid, patchy "
    "fat-suppression failure) can be flagged as lesions, and faint edema (under about 2x the surrounding marrow, "
    "as real edema often is) is easily missed: on 80 whole-body phantoms of generator 1.6 whose edema is as faint "
    "as the clinical notes' real STIR series (configs/synth/reference_contrast.yaml, seeds 700000-700079) the "
    "shipped 1.2.19199 found 84 of 364 lesions >= 0.5 mL (sensitivity 0.23, 95% interval 0.17-0.29) at 0.33 "
    "false positives per scan (1.2.15825: 83 of 364, at 0.29), against 0.48 on the generator-1.6 test set: expect "
    "real-scan sensitivity well below the test-set figures.",
    "The default model 1.2.19199 was trained on phantoms without the ischiopubic synchondroses (generators up to "
    "1.9), the commonest mimic of osteomyelitis in a child's pelvis around their fusion (about 4-13 years). On "
    "generator-1.10 test sets, the same children with them drawn (25 bright, often swollen, fusion zones in 17 of the "
    "50 whole-body children, 3 in pelvis views), it flagged none of them: false positives per whole-body scan 0.68 -> "
    "0.66 (95% interval of the change -0.06 to 0.00), partial views unchanged; it missed one ischial lesion lying "
    "on an open synchondrosis of a 4-year-old that it found without the plate. Phantom fusion zones are no proof for "
    "real ones: read bright signal at the ischiopubic junction of a child with that in mind "
    "(models/default/HISTORY.md, session 59).",
    "The default model 1.2.19199 was trained on phantoms without normal bright marrow foci around the knees and in "
    "the pelvis (generators up to 1.8), which healthy children often have (clinical notes: a major bright focus in "
    "the limbs in 58.7%, in the axial skeleton, mostly the pelvis, in 29.6%). On generator-1.9 test sets, the same "
    "children with such foci drawn in a quarter of those under 16, its false positives per whole-body scan rose from "
    "0.60 to 0.68 (95% interval of the change -0.02 to +0.20; per lesion-free scan 0.57 to 0.86), the new ones in the "
    "femoral and tibial metaphyses around the knee, and per partial view from 0.38 to 0.50 (0.00 to +0.28), also in "
    "the ilium and ischium of pelvis views. Read symmetric bright metaphyseal signal around a child's knees, or patchy "
    "bright pelvic marrow, with that in mind (models/default/HISTORY.md, session 56).",
    "The default model 1.2.19199 was trained on phantoms without the calcaneal, tibial-tuberosity and ischial "
    "apophyses (generators up to 1.7), and it flags the open apophysis of the tibial tuberosity (Osgood-Schlatter's "
    "site; its plate is open from about 9 to 17 years) as edema: on generator-1.8 test sets, the same children with "
    "these plates drawn, its false positives per whole-body scan rose from 0.38 to 0.60 (95% interval of the change "
    "+0.10 to +0.36, fp32 on both), and 9 of the 12 new ones touch a tuberosity plate (partial views: 0.36 -> 0.38, "
    "2 of its 19 false positives), none a calcaneal or ischial one. Read a finding at the front of a child's "
    "proximal tibia below an open growth plate with that in mind (models/default/HISTORY.md, session 54).",
    "The default model 1.2.19199 was trained on phantoms whose edema was often brighter than free fluid (generators "
    "up to 1.6; real STIR edema never is): on generator-1.7 test sets, the same children and lesions with edema bent toward fluid, it found fewer "
    "lesions than on 1.6's (whole body sensitivity >= 0.5 mL 0.478 -> 0.440, 95% interval of the change -0.098 to "
    "+0.025; partial views 0.549 -> 0.507, -0.111 to +0.016; bf16 on both), so it leans on unrealistically bright "
    "edema and real-scan sensitivity is expected to be lower still. Its site accuracy rose (0.960 -> 0.989, 0.939 "
    "-> 1.000): bright edema had pulled the site map to a neighbouring bone (models/default/HISTORY.md, session 53).",
    "A lesion whose median signal is below min_signal_ratio (the default model: 0.9) times both its bone's normal "
    "marrow and the nearby soft tissue is not reported (since wbmri 0.2.8): edema that faint against the marrow "
    "around it would be dropped with the false positives.",
    "Works at 3 mm: lesions below about 0.5 mL, thin cortical or periosteal changes and small bones (toes, "
    "carpals, ribs) are at the edge of what it resolves. Vertebral level naming is less reliable in partial "
    "fields of view that show few vertebrae. The bone channel misses the sternum: the shipped 1.2.19199's site map "
    "holds almost none of it (sternum bone-site Dice 0.005 on the generator-1.6 whole-body test set, 0.008 for "
    "1.2.13550 on generator 1.4), it found none of that set's 4 sternal lesions (0.7-2.0 mL), and 60 CPU minutes "
    "of training aimed at it (stage 29) did not change this. Sternal lesions it does find are named by their "
    "position in front of the thoracic spine, without a bone share. Growth plates are 2-3 mm thick: 1.2.13550's "
    "physis channel finds few of them (on 13 faint "
    "test phantoms its mask held 5% of the physis voxels), so epiphysis against metaphysis next to a growth plate "
    "and the juxtaphyseal flag are often wrong; the part of the bone was right for 0.80 of the found whole-body "
    "test lesions named with the right bone (66 of 83, generator-1.5 test set).",
    "Vertebral levels: phantoms up to generator 1.5 drew the twelve thoracic vertebrae alike, while real thoracic "
    "bodies grow from T1 to T12 and lumbar levels are taller still. The network learned those first (1.2.15825 "
    "named the right level for 0.40 of the vertebral voxels of 16 phantoms drawn in real proportions), then for 105 "
    "CPU minutes phantoms drawn in real proportions (generator 1.6, stages 27-28): the shipped 1.2.19199 names "
    "0.76 of them right, and its mean Dice over the thoracic levels of the whole-body test set is 0.72 (1.2.15825: "
    "0.17). The phantoms' proportions are population means; a child with 11 or 13 rib-bearing vertebrae, a "
    "transitional lumbosacral vertebra or a view that shows few vertebrae may still be counted a level off: count "
    "from C2 or the sacrum before relying on a reported level. In spine views cut from 15 development phantoms the "
    "reported level was right for 0.94-0.97 of the vertebral voxels when the sacrum was in view, but for 0.77 "
    "(0.51-0.99) in thoracic views showing neither C1 nor the sacrum; since wbmri 0.2.11 the report warns when a "
    "lesion's level could not be counted from both ends.",
    "The default model's network was first trained on phantoms of generators before 1.4, whose knees were drawn "
    "wrongly (the tibia domed into the femur, the patella on the joint line). 1.2.13550 named the distal femoral "
    "epiphysis \"tibia\" in every knee (about 14 mL of each femur per generator-1.5 whole-body test scan) and on "
    "knees drawn like real extended knees (generator 1.4) drew 0.82 false positives per partial view against 0.46 "
    "(wbmri 0.2.7). 1.2.15825 was trained on for 60 minutes on such knees (stage 25) and the shipped 1.2.19199 for "
    "105 more minutes on generator-1.6 phantoms (stages 27-28): about 1.3 mL of each femur are still named tibia (2.2 with "
    "1.2.15825 on the same generator-1.6 whole-body test set), and 14-19% of the proximal ulna and radius are still "
    "named humerus (all three networks): read knee and elbow findings with particular care.",
    "The soft-tissue-extension flag is insensitive: 1.2.13550's bone channel labels edema just outside "
    "the cortex as bone, so on the 50 + 50 generator-1.3 test sets the flag was set for none of the 25 predicted lesions "
    "matched to a reference lesion that extends into soft tissue (and wrongly for 1 of the 117 matched to one "
    "that does not). A lesion without the flag may still extend into soft tissue: look at the images.",
    "Whether 1.2.13550 finds a lesion depends somewhat on where the lesion falls on its 3 mm grid (it was"
    " trained with every lesion at the centre of its training patch): on 66 whole-body test lesions, moving the "
    "input by a few voxels changed the answer for 5 (8%). Compare follow-up scans with care: a lesion missing "
    "from one report may be a miss rather than a healed lesion.",
    "Figures quoted for 1.2.13550 were measured on the network the shipped 1.2.19199 descends from: stages 25, 27 "
    "and 28 trained on from it with the edema output held to 1.2.13550's (stage 25) and then to 1.2.15825's "
    "(stages 27-28); they were not measured again.",
    "Input must be a fat-suppressed fluid-sensitive sequence (STIR, T2 FS, Dixon water); T1 or contrast-enhanced "
    "images are out of scope.",
    "Where fat suppression fails, fat and fatty marrow are bright: patches of failed spectral fat saturation on "
    "T2 FS, or a fat-water swap on Dixon water images (there edema turns dark too). On the phantoms such regions "
    "drew false positives and hid lesions: on the generator-1.4 test sets 1.2.13550 drew 1.00 false "
    "positives per whole-body scan in the scans with patchy failure against 0.41 in the others; on 20 + 20 Dixon "
    "phantoms of generator 1.6, a fat-water swap in every scan took the shipped 1.2.19199's whole-body false "
    "positives from 0.35 to 0.50 per scan, edema Dice from 0.43 to 0.36, and sensitivity for lesions >= 0.5 mL from "
    "0.48 to 0.45 (whole body) and 0.47 to 0.43 (partial views), and partial-view mean bone-site Dice from 0.56 to "
    "0.44. STIR suppresses fat evenly; on T2 FS and Dixon images look for failed "
    "suppression or swaps before trusting findings there.",
]


def training_wall_time(metrics_csv: Path) -> tuple[float, int]:
    """Seconds of training summed over resumed segments (time_s restarts at each resume), and steps logged."""
    total, last, steps = 0.0, 0.0, 0
    with open(metrics_csv) as fh:
        for row in csv.DictReader(fh):
            t = float(row["time_s"])
            if t < last:
                total += last
            last = t
            steps = int(row["step"])
    return total + last, steps


RULE_COLUMNS = ["threshold", "min_bone_fraction", "min_lesion_ml", "min_confidence", "lesion_sens", "lesion_prec",
                "lesion_f1", "fp_per_scan", "edema_dice", "site_acc"]


def write_rule_table(rows: list[dict], path: Path) -> None:
    """Every candidate lesion rule's validation figures as CSV, one row per rule, with sensitivity and false
    positives per scan for each validation group (``whole_body``, ``partial_fov``, ``lesion_free``, ``scan`` for a
    user's or a ``data.val_dataset_dirs`` case): the trade-off behind the chosen operating point."""
    groups = sorted({g for r in rows for g in r["fp_per_scan_by_group"]})
    cols = RULE_COLUMNS + [f"{k}_{g}" for g in groups for k in ("sens", "fp_per_scan")]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols)
        w.writeheader()
        for r in rows:
            out = {c: r[c] for c in RULE_COLUMNS}
            for g in groups:
                out[f"sens_{g}"] = r["sensitivity_by_group"].get(g)
                out[f"fp_per_scan_{g}"] = r["fp_per_scan_by_group"].get(g)
            w.writerow(out)


def _bundle_trainer(bundle_dir: Path, cfg, run_config: Path, quiet: bool):
    """A Trainer of ``cfg`` holding ``bundle_dir``'s weights and card, its data made (by ``data.workers``
    processes, not one by one) and set up; and the bundle. ``cfg`` (from ``run_config``) must describe its network."""
    from training.loop import Trainer
    bundle = load_bundle(bundle_dir)
    if cfg.network.model_dump() != bundle.config.model_dump():
        raise ValueError(f"{run_config} does not describe the network of {bundle_dir}")
    trainer = Trainer(cfg, quiet=quiet)
    trainer.net.load_state_dict(bundle.net.state_dict())
    trainer.init_card = bundle.card  # the site map as the bundle makes it (its bone thresholds)
    trainer.prepare()
    trainer.setup_data()
    return trainer, bundle


# a run's config read to validate or recalibrate its bundle: no starting weights, no held network (the bundle's own
# weights are used; an anchored fine-tune's config would otherwise ask for its --init model)
NOT_TRAINING = ("init=null", "loss.anchor_weight=0", "loss.anchor_anatomy_weight=0", "loss.anchor_from=null")


def revalidate(bundle_dir: Path, run_config: Path, val_cases: int, tta: str | None = None,
               table: Path | None = None, overrides: list[str] = (), max_fp_per_scan: float | None = None) -> dict:
    """Re-choose a bundle's operating point (edema threshold, bone share, lesion size) on ``val_cases`` validation phantoms
    (the run's validation seeds, extended; never training or test seeds) and write it into the bundle's card.
    Training validates on a few cases for speed; the shipped thresholds deserve more. ``val_cases`` may be 0 when
    the config names labelled folders in ``data.val_dataset_dirs``: the rules are then chosen on those scans alone.
    ``tta`` (one of :data:`models.networks.TTA_MODES`; default: the card's) is the test-time augmentation the rules are chosen
    with; the card keeps it, and inference uses it. ``table``: where to write every candidate rule's figures
    (:func:`write_rule_table`); ``overrides``: ``key=value`` settings applied to ``run_config`` (for example
    ``data.val_dataset_dirs=[DIR]`` to add labelled scans to the validation phantoms); ``max_fp_per_scan``: the
    false-positive budget of the chosen rule (default :data:`training.loop.MAX_FP_PER_SCAN`, the target's)."""
    from training.config import TrainConfig, load_config
    bundle_dir = Path(bundle_dir)
    cfg = load_config(TrainConfig, Path(run_config), [*NOT_TRAINING, "data.phantom_cases=0", "data.extra_pools=[]",
                                                      "data.dataset_dirs=[]", f"data.val_cases={val_cases}", *overrides])
    if not val_cases and not cfg.data.val_dataset_dirs:
        raise ValueError("nothing to validate on: give --val-cases >= 1 or labelled folders in data.val_dataset_dirs")
    trainer, bundle = _bundle_trainer(bundle_dir, cfg, run_config, quiet=True)
    tta = tta or bundle.tta
    from training.loop import MAX_FP_PER_SCAN, operating_point_ci
    budget = MAX_FP_PER_SCAN if max_fp_per_scan is None else float(max_fp_per_scan)
    result = trainer.validate(tta=tta, progress=True, max_fp_per_scan=budget)
    result = {**result, "ci95": operating_point_ci(trainer.val_best_cases), "max_fp_per_scan": budget}
    if table is not None:
        write_rule_table(trainer.val_table, table)
    card = bundle.card
    card["inference"] = {**(card.get("inference") or {}), "tta": tta}
    card["thresholds"] = {**card.get("thresholds", {}), "edema": result["threshold"],
                          "min_bone_fraction": result["min_bone_fraction"], "min_lesion_ml": result["min_lesion_ml"],
                          "min_confidence": result["min_confidence"]}
    card["validation"] = {**result, "val_cases": val_cases, "tta": tta,
                          "val_seeds": f"{cfg.data.val_seed}..{cfg.data.val_seed + val_cases - 1}" if val_cases else None,
                          "val_dataset_dirs": [str(d) for d in cfg.data.val_dataset_dirs]}
    (bundle_dir / CARD).write_text(json.dumps(card, indent=2) + "\n")
    return card["validation"]


def recalibrate_bundle(bundle_dir: Path, run_config: Path, dest: Path, batches: int = 400,
                       overrides: list[str] = ()) -> dict:
    """Write ``dest``: ``bundle_dir``'s weights with batch-norm statistics re-estimated on ``batches`` batches of
    the training patches ``run_config`` describes (:meth:`training.loop.Trainer.precise_bn`), and its card with
    the version marked ``+bn<batches>`` and what was done in ``training.precise_bn``. The lesion rules are kept:
    re-choose them with ``wbmri validate`` if the evaluation says so. Returns that record."""
    from models.card import save_bundle
    from training.config import TrainConfig, load_config
    bundle_dir, dest = Path(bundle_dir), Path(dest)
    if dest.resolve() == bundle_dir.resolve():
        raise ValueError("--to must be a new folder: the bundle is read while the new one is written")
    cfg = load_config(TrainConfig, Path(run_config), [*NOT_TRAINING, "data.val_cases=0", "data.val_dataset_dirs=[]",
                                                      *overrides])
    trainer, bundle = _bundle_trainer(bundle_dir, cfg, run_config, quiet=False)
    cases = len(trainer._files())
    if not cases:
        raise ValueError(f"{run_config}: no training cases to draw patches from")
    try:
        layers = trainer.precise_bn(batches, progress=True)
    finally:
        for pool in trainer.pools:
            pool.stop()
    if not layers:
        raise ValueError(f"{bundle_dir}: the network has no batch-norm layers to re-estimate")
    card = json.loads(json.dumps(bundle.card))
    record = {"batches": batches, "patches": batches * cfg.sampling.batch_size, "layers": layers, "seed": cfg.seed,
              "from_version": bundle.version, "from_sha256": bundle.sha256, "cases": cases,
              "pool_seeds": f"{cfg.data.phantom_seed}..{cfg.data.phantom_seed + cfg.data.phantom_cases - 1}"
                            if cfg.data.phantom_cases else None,
              "dataset_dirs": [str(d) for d in cfg.data.dataset_dirs],
              "precision": "bf16" if trainer.bf16 else "fp32"}
    card["version"] = f"{bundle.version.split('+')[0]}+bn{batches}"
    card.setdefault("training", {})["precise_bn"] = record
    save_bundle(dest, trainer.net, bundle.config, card)
    load_bundle(dest)  # verifies the sha256 and that the weights load
    return record


def average_bundles(bundle_dir: Path, other_dir: Path, dest: Path, share: float = 0.5) -> dict:
    """Write ``dest``: every floating-point weight and batch-norm statistic of ``bundle_dir`` moved ``share`` of the
    way to ``other_dir``'s (a weight average, WiSE-FT: Wortsman et al., CVPR 2022; meaningful for a model and its own
    fine-tune, which lie in one basin), with ``bundle_dir``'s card, lesion rules and counters, the version marked
    ``+avg<percent>`` and what was done in ``training.weight_average``. The test-set metrics are the first
    bundle's until ``wbmri card`` re-scores them. Returns that record."""
    from models.card import save_bundle
    bundle_dir, other_dir, dest = Path(bundle_dir), Path(other_dir), Path(dest)
    if not 0 < share < 1:
        raise ValueError(f"--share must lie between 0 and 1 (got {share})")
    if dest.resolve() in (bundle_dir.resolve(), other_dir.resolve()):
        raise ValueError("--to must be a new folder: both bundles are read while the new one is written")
    first, other = load_bundle(bundle_dir), load_bundle(other_dir)
    if first.card.get("network") != other.card.get("network"):  # one network config: the same tensors, name for name
        raise ValueError(f"{other_dir}: another network ({other.card.get('network')}) than {bundle_dir}'s; only "
                         "bundles of one architecture and intensity reference can be averaged")
    b = other.net.state_dict()
    first.net.load_state_dict({k: ((1 - share) * v.double() + share * b[k].double()).to(v.dtype)
                               if v.is_floating_point() else v for k, v in first.net.state_dict().items()})
    card = json.loads(json.dumps(first.card))
    record = {"share": share, "from_version": first.version, "from_sha256": first.sha256,
              "with_version": other.version, "with_sha256": other.sha256,
              "rule": "(1 - share) * from + share * with, for every floating-point tensor (weights and batch-norm "
                      "statistics); counters and the lesion rules from `from`"}
    card["version"] = f"{first.version.split('+')[0]}+avg{round(share * 100)}"
    card.setdefault("training", {})["weight_average"] = record
    save_bundle(dest, first.net, first.config, card)
    load_bundle(dest)  # verifies the sha256 and that the weights load
    return record


def _minor_version(net) -> int:
    """1.0: pooled site head; 1.2: skip-level site head; 1.3: a new input (log channel or the p75 intensity
    reference), which an older wbmri would feed wrongly."""
    if net.log_channel or net.intensity_reference != "p99":
        return 3
    return 2 if net.sites_from == "skip" else 0


def _dataset_source(folder: Path) -> dict:
    """What a ``data.dataset_dirs`` folder held, from its dataset.json: a phantom folder made by ``wbmri synth``
    names its generator, seeds and contrast randomisation; any other folder is taken as real data."""
    meta_path = folder / "dataset.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    out = {"path": str(folder), "cases": meta.get("numTraining"), "synthetic": meta.get("name") == "wbmri-phantom"}
    if out["synthetic"]:
        first = int(meta.get("first_seed", 0))
        contrast = dict((meta.get("config") or {}).get("contrast") or {})
        if contrast and meta.get("generator_version") in ("1.0", "1.1"):
            contrast["gamma"] = None  # configured, but generators before 1.2 never applied it
        out.update({"generator_version": meta.get("generator_version"),
                    "seeds": f"{first}..{first + int(meta.get('numTraining') or 0) - 1}",
                    "contrast_randomisation": contrast if contrast.get("enabled") else None})
    return out


def _init_bundle(cfg: dict) -> tuple[Path, dict, dict | None] | None:
    """A run's ``init`` bundle as training found it (a config's models/default, from any folder), its card ({}
    without one) and the config of the run it was exported from (None when it is not a run's export); None
    without an init."""
    if not cfg.get("init"):
        return None
    init = locate_bundle(cfg["init"])
    card = json.loads((init / CARD).read_text()) if (init / CARD).is_file() else {}
    return init, card, _run_config_of(init)


def _earlier_stages(cfg: dict) -> list[dict]:
    """Training that the run's ``init`` bundle came from: from its run folder when it is a run's export
    (runs/NAME/final), else from its card (an exported bundle such as models/default)."""
    found = _init_bundle(cfg)
    if found is None:
        return []
    init, card, earlier = found
    if earlier is None:
        return _stages_from_card(init, card) if card else []
    run = init.parent
    wall, steps = training_wall_time(run / "metrics.csv")
    return _earlier_stages(earlier) + [{"run": str(run), "bundle": str(init), "steps": steps,
                                         "wall_time_s": round(wall, 1), "network": earlier.get("network")}]


def _init_synthetic_only(cfg: dict) -> bool:
    """Whether the stages before a run (its --init bundle and that bundle's own) learned from phantoms alone: an
    exported bundle's card says so; a run's export, its run's dataset folders and its own --init."""
    found = _init_bundle(cfg)
    if found is None:
        return True
    _, card, run_cfg = found
    if "synthetic_only" in (card.get("data") or {}):
        return bool(card["data"]["synthetic_only"])
    if not run_cfg:
        return True
    return (all(_dataset_source(Path(d))["synthetic"] for d in (run_cfg.get("data") or {}).get("dataset_dirs") or [])
            and _init_synthetic_only(run_cfg))


def limitations(synthetic_only: bool) -> list[str]:
    """The card's standing limitations; a model that learned from real scans too does not claim it used none."""
    return LIMITATIONS if synthetic_only else [REAL_DATA_LIMITATION] + LIMITATIONS[1:]


def _run_config_of(bundle: Path) -> dict | None:
    """The config of the run a bundle was exported from (runs/NAME/final: runs/NAME/config.yaml, {} when missing);
    None for a bundle that is not a run's export (e.g. models/default)."""
    run = Path(bundle).parent
    if not (run / "metrics.csv").is_file():
        return None
    return yaml.safe_load((run / "config.yaml").read_text()) if (run / "config.yaml").is_file() else {}


def _validation_seeds(cfg: dict) -> str:
    """The validation seeds behind a run's lesion rules: its own validation phantoms, or, for a run that validated
    none (``data.val_cases: 0``), those of the --init model whose rules it keeps, followed back along the runs. A
    card's own entry that already names where its rules came from is kept as it is."""
    data = cfg.get("data") or {}
    if data.get("val_cases", 0) > 0:
        first = int(data.get("val_seed", 900000))
        return f"{first}..{first + int(data.get('val_cases', 0)) - 1}"
    if not cfg.get("init"):
        held_out = data.get("val_dataset_dirs") or []
        return f"none: rules from {', '.join(map(str, held_out))}" if held_out else "none (no validation)"
    init, card, run_cfg = _init_bundle(cfg)
    if (card.get("validation") or {}).get("val_seeds"):
        seeds = card["validation"]["val_seeds"]
    elif run_cfg:
        seeds = _validation_seeds(run_cfg)
    else:
        seeds = (card.get("data") or {}).get("validation_seeds", "not recorded")
    source = f"{init} ({card['version']})" if card.get("version") else str(init)
    return seeds if "inherited" in seeds else f"{seeds} (the lesion rules are inherited from {source})"


def _stages_from_card(bundle_dir: Path, card: dict) -> list[dict]:
    """Training stages recorded in an exported bundle's card (e.g. fine-tuning from the shipped ``models/default``,
    whose run folder is not in the repository): its own earlier stages, then the run that made it."""
    tr = card.get("training") or {}
    if not tr:
        return []
    own = {"run": (tr.get("config") or {}).get("out_dir", ""), "bundle": str(bundle_dir),
           "version": card.get("version"), "steps": int(tr.get("selected_checkpoint_step", tr.get("steps", 0))),
           "wall_time_s": float(tr.get("wall_time_s", 0.0)), "network": (tr.get("config") or {}).get("network")}
    return list(tr.get("earlier_stages") or []) + [own]


def _distinct_stages(stages: list[dict], run_dir: Path) -> list[dict]:
    """Each earlier stage once, never the run being exported: re-exporting a run after its ``init`` bundle was
    overwritten by an export of this same lineage (e.g. models/default) would otherwise count stages twice."""
    def key(path) -> str:  # runs/v17 and /abs/path/runs/v17 are the same run
        return str(Path(path).resolve())
    out, seen = [], {key(run_dir)}
    for st in stages:
        run = key(st["run"])
        if run not in seen:
            seen.add(run)
            out.append(st)
    return out


MIN_TEST_CASES = 20  # the frozen test set: at least 20 whole-body cases and 20 partial fields of view


def _summaries(evals: dict[str, Path], min_cases: int = MIN_TEST_CASES,
               recorded: Sequence[str] = ()) -> dict[str, dict]:
    """Each named evaluation folder's summary.json, refused when it scored fewer than ``min_cases`` cases, or when
    the card has figures of a test set (``recorded``) that is not given again (they would describe other rules)."""
    missing = sorted(set(recorded) - set(evals))
    if missing:
        raise ValueError(f"the card holds test figures of {', '.join(missing)} too: give an evaluation of each "
                         "(its figures would otherwise describe other weights or rules)")
    out = {name: json.loads((Path(folder) / "summary.json").read_text()) for name, folder in evals.items()}
    for name, summary in out.items():
        scored = int(summary.get("n_cases", 0)) - int(summary.get("n_failed", 0))
        if scored < min_cases:
            raise ValueError(f"{name}={evals[name]} scored {scored} cases: a card's test figures need a frozen test "
                             f"set of at least {min_cases} (--min-cases to lower it, e.g. for a tiny trial)")
    return out


def _test_sets(metrics: dict[str, dict], key: str) -> dict[str, str]:
    """What each evaluation recorded of its test set (``seeds``, ``generator_version``)."""
    return {name: (summary.get("reference") or {}).get(key, "not recorded by that evaluation")
            for name, summary in metrics.items()}


def _report_models(eval_dir: Path) -> list[dict]:
    """The ``model`` block of each report an evaluation scored."""
    return [json.loads(report.read_text()).get("model", {})
            for report in sorted((Path(eval_dir) / "predictions").glob("*/report.json"))]


def _devices(models: dict[str, list[dict]]) -> dict[str, list[str]]:
    """The devices and precisions (``cpu bf16``, ``cpu fp32``, ...) each evaluation's reports (``models``: their
    :func:`_report_models`) were made with: bf16 and fp32 runs of one network can find a few lesions more or fewer."""
    return {name: sorted({m.get("device", "unknown") for m in ms}) for name, ms in models.items()}


def _made_by(models: list[dict]) -> list[dict]:
    """The distinct result identities (:func:`models.card.result_identity`) of reports' model blocks."""
    seen: list[dict] = []
    for model in models:
        block = result_identity(model)
        if block not in seen:
            seen.append(block)
    return seen


def rescore_card(bundle_dir: Path, evals: dict[str, Path], command: str = "", min_cases: int = MIN_TEST_CASES) -> dict:
    """Rewrite a bundle card's test-set metrics, target check and limitations from evaluations of that bundle.

    For a bundle whose lesion rules ``wbmri validate`` re-chose: its weights did not change, so it is not exported
    again, but the card's test figures must describe the rules it now ships with. Every evaluation must hold the
    reports it scored (``wbmri evaluate --model``), all made with this bundle's weights, test-time augmentation and
    thresholds; anything else is refused. The validation that chose the rules becomes the card's
    ``training.validation_at_selection``."""
    bundle_dir = Path(bundle_dir)
    bundle = load_bundle(bundle_dir)
    card = bundle.card
    expected = result_identity({"sha256": bundle.sha256, "tta": bundle.tta, "thresholds": card.get("thresholds"),
                                "software": SOFTWARE})
    models = {name: _report_models(Path(folder)) for name, folder in evals.items()}
    for name, folder in evals.items():
        made_by = _made_by(models[name])
        if not made_by:
            raise ValueError(f"{folder} holds no predictions/*/report.json: evaluate with --model to score a bundle")
        # every part of the identity must match; the card's thresholds must be among the report's (older cards
        # name fewer rules than reports do)
        wrong = [m for m in made_by
                 if any(m[k] != v for k, v in expected.items() if k != "thresholds")
                 or any(m["thresholds"] is None or m["thresholds"].get(k) != v
                        for k, v in (expected["thresholds"] or {}).items())]
        if wrong:
            raise ValueError(f"{name}={folder} was not made with {bundle_dir} as it is now: it holds reports of "
                             f"{wrong[0]}, the bundle has {expected}")
    recorded = ((card.get("metrics") or {}).get("frozen_synthetic_test_set") or {}).keys()
    metrics = _summaries(evals, min_cases, recorded)
    targets = target_check(metrics)
    card["metrics"] = {"frozen_synthetic_test_set": metrics, "software": SOFTWARE,
                       "command": command or (card.get("metrics") or {}).get("command", ""),
                       "devices": _devices(models)}
    card["targets"] = targets
    card["limitations"] = _target_limitation(targets) + limitations((card.get("data") or {}).get("synthetic_only", True))
    card.setdefault("data", {})["test_seeds"] = _test_sets(metrics, "seeds")
    card["data"]["test_generator_versions"] = _test_sets(metrics, "generator_version")
    if "validation" in card:
        validation = card.pop("validation")
        card.setdefault("training", {})["validation_at_selection"] = validation
        card["data"]["validation_seeds"] = validation.get("val_seeds", card["data"].get("validation_seeds"))
    (bundle_dir / CARD).write_text(json.dumps(card, indent=2) + "\n")
    load_bundle(bundle_dir)
    return card


def export_bundle(run_dir: Path, dest: Path, which: str = "best", evals: dict[str, Path] | None = None,
                  eval_command: str = "", throughput: dict | None = None, min_cases: int = MIN_TEST_CASES) -> Path:
    """Copy a run's bundle to ``dest`` and write the full model card (``evals``: test-set evaluations of at least
    ``min_cases`` scored cases each)."""
    run_dir, dest = Path(run_dir), Path(dest)
    src = run_dir / which
    bundle = load_bundle(src)
    if dest.resolve() == src.resolve():
        raise ValueError(f"--to {dest} is the run's own {which}/ bundle: give another folder")
    metrics = _summaries(evals or {}, min_cases)  # before anything is written
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    wall, steps = training_wall_time(run_dir / "metrics.csv")
    stages = _distinct_stages(_earlier_stages(cfg), run_dir)
    selected = int(bundle.card.get("training_steps", steps))  # the checkpoint shipped (best may precede the last)
    total_wall = wall + sum(st["wall_time_s"] for st in stages)
    total_steps = selected + sum(st["steps"] for st in stages)
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src / WEIGHTS, dest / WEIGHTS)
    n_params = sum(p.numel() for p in bundle.net.parameters())
    targets = target_check(metrics)
    datasets = [_dataset_source(Path(d)) for d in cfg["data"].get("dataset_dirs") or []]
    synthetic_only = all(d["synthetic"] for d in datasets) and _init_synthetic_only(cfg)
    card = {
        "name": cfg.get("name") or "wbmri-default",
        "version": f"1.{_minor_version(bundle.config)}.{total_steps}",
        "architecture": {
            "family": "MONAI UNet body + two heads", "parameters": n_params,
            "heads": {"voxel": "full resolution, sigmoid: edema, bone, physis",
                      "sites": "half resolution, softmax over 0 (no bone) + the 66 sites of sites.tsv, read from "
                               + ("the U-Net's half-resolution skip level (32 channels)" if bundle.config.sites_from == "skip"
                                  else "the pooled final feature map")},
            "why": "MONAI UNet (16-256 channels, 1 residual unit) with batch norm: one whole-body pass at inference "
                   "sees the same normalisation as the training patches (instance norm re-normalises over whatever "
                   "field of view it is given). A training step (batch 2 of 96x64x160, bf16 autocast) takes about "
                   "1.1 s on 2 CPU cores (sites loss on bone voxels only); a full-resolution 68-class head cost 2-6x more, so sites are classified at "
                   "half resolution and sharpened by the full-resolution bone channel. The site head reads the "
                   "half-resolution skip level (encoder + decoder, 32 channels): reading the 16-channel final map, "
                   "which must also carry edema and bone, its loss fell from 4.5 to 3.5 in 1,500 steps; from the "
                   "skip level it reached 3.5 in 400 steps and 1.5 in 2,500. Vertebral levels are then "
                   "fitted along the spinal column as one monotone C1..L5 sequence, boundaries drawn to the "
                   "image's disc bands since wbmri 0.2.9 (models/spine.py).",
        },
        "input": {"spacing_mm": list(bundle.config.spacing_mm), "orientation": "closest RAS axes (no interpolation)",
                  "normalisation": "divide by the 99th percentile of body voxels, clip to [0, 4]",
                  "post_processing": "26-connected lesions >= min_lesion_ml with mean probability >= min_confidence "
                                     "and at least min_bone_fraction of their voxels in or touching predicted bone "
                                     "(thresholds chosen on the validation set), dropping those whose median signal is "
                                     "below min_signal_ratio x both their bone's normal marrow and the nearby soft "
                                     "tissue (not hyperintense; models.lesions.MIN_SIGNAL_RATIO; none when 0 or "
                                     "absent); the site map: bone where the bone "
                                     "probability > bone, and thin bones (models.sites.THIN_BONES) grown from there "
                                     "down to bone_thin (hysteresis; chosen on development phantoms with "
                                     "tests/benchmarks/bone_thresholds.py)",
                  "sequence": "STIR / T2 fat-suppressed / Dixon water"},
        "network": json.loads(bundle.config.model_dump_json()),
        "thresholds": bundle.card.get("thresholds", {"edema": 0.5, "min_lesion_ml": 0.1}),
        "inference": bundle.card.get("inference", {"tta": "none"}),
        "precision": "bf16 autocast on CPUs with native bf16 and on CUDA; fp32 elsewhere",
        "training": {
            "config": cfg, "steps": steps, "selected_checkpoint": which, "selected_checkpoint_step": selected,
            "earlier_stages": stages, "total_steps": total_steps, "total_wall_time_s": round(total_wall, 1),
            "wall_time_s": round(wall, 1), "hardware": bundle.card.get("trained_on", "not recorded"),
            "throughput": throughput or {"s_per_step": round(wall / max(1, steps), 2),
                                         "samples_per_s": round(steps * cfg["sampling"]["batch_size"] / max(1.0, wall), 3)},
            "validation_at_selection": bundle.card.get("validation"),
        },
        "data": {
            "synthetic_only": synthetic_only, "generator": "wbmri-phantom",
            # the generator of the phantoms it trained on, recorded at training (bundles from before: this code's)
            "generator_version": bundle.card.get("generator_version",
                                                 GENERATOR_VERSION if cfg["data"].get("phantom_cases") else None),
            "train_pool_seeds": (f"{cfg['data']['phantom_seed']}..{cfg['data']['phantom_seed'] + cfg['data']['phantom_cases'] - 1}"
                                 " (the cases generated before training stopped; see data/README.md)"
                                 if cfg["data"].get("phantom_cases") else "none (no phantom pool)"),
            "validation_seeds": (bundle.card.get("validation") or {}).get("val_seeds") or _validation_seeds(cfg),
            "test_seeds": _test_sets(metrics, "seeds"),
            "test_generator_versions": _test_sets(metrics, "generator_version"),
            "dataset_dirs": datasets,
            "real_patient_data": "none" if synthetic_only else "yes: see dataset_dirs",
        },
        "metrics": {"frozen_synthetic_test_set": metrics, "software": SOFTWARE, "command": eval_command,
                    "devices": _devices({name: _report_models(Path(f)) for name, f in (evals or {}).items()})},
        "intended_use": INTENDED_USE,
        "targets": targets,
        "limitations": _target_limitation(targets) + limitations(synthetic_only),
        "weights_sha256": sha256_file(dest / WEIGHTS),
    }
    (dest / CARD).write_text(json.dumps(card, indent=2) + "\n")
    load_bundle(dest)  # verifies the sha256 and that the weights load
    return dest
