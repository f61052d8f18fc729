"""The ``wbmri`` command line: it only wires the layers together (imports are lazy so --help is instant)."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, List, NoReturn, Optional

import typer

_ROOT = Path(__file__).resolve().parents[1]
TTA_HELP = ("test-time augmentation: none, flip_lr (left-right mirror averaged in, all outputs), flip_lr_anatomy "
            "(bones and sites only, edema as one pass) or flip_lr_anatomy_filled (the same, read from the image with "
            "the edema painted over by the surrounding marrow); flip_lr_anatomy_shift4 / _shift8 also average the "
            "edema over 4 or 8 inputs shifted by a few voxels (experimental); default: the model card's")

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Whole-body MRI bone-marrow edema segmentation for CNO/CRMO. Supports, does not replace, clinical judgement.")


def _flag(name: str, help: str) -> bool:
    """An on/off option: given or not, it takes no value (an empty metavar keeps newer typer from showing
    ``<bool>`` beside it in --help, as if it took one)."""
    return typer.Option(False, name, help=help, metavar="")


def _fail(message: str) -> NoReturn:
    """End the command with one line on stderr and exit status 2 (bad arguments or input)."""
    typer.echo(message, err=True)
    raise typer.Exit(2)


def _exit_on_sigterm() -> None:
    """Turn SIGTERM (``docker stop``, ``timeout``, a scheduler's time limit) into a normal exit, as Ctrl-C is: the
    half-written ``.CASE.xxxx.partial`` folder of the case being written is removed on the way out."""
    import signal

    def stop(signum, frame):
        raise SystemExit(128 + signum)
    signal.signal(signal.SIGTERM, stop)


@app.command()
def synth(n: int = typer.Option(10, "--n", min=1, help="number of cases"),
          out: Path = typer.Option(..., "--out", help="output folder (nnU-Net raw layout plus case folders)"),
          seed: int = typer.Option(0, "--seed", min=0, help="seed of the first case; case i uses seed+i"),
          config: Optional[Path] = typer.Option(None, "--config", help="phantom YAML (default configs/synth/default.yaml)"),
          workers: int = typer.Option(1, "--workers", min=1, help="parallel worker processes"),
          set_: List[str] = typer.Option([], "--set", help="override a config key, e.g. --set 'fov.p={whole_body: 1.0}'"),
          preview: bool = _flag("--preview", help="also write preview.png in every case folder")) -> None:
    """Generate synthetic paediatric phantoms with CNO lesions: whole-body and partial views (pelvis, knees, legs,
    spine, feet), STIR, T2 FS or Dixon water as the config draws them (an existing folder made with the same
    generator and settings is extended)."""
    from training.config import ConfigError
    from training.phantom.generate import synth_dataset
    try:
        synth_dataset(n=n, out=out, seed=seed, config=config, overrides=set_, workers=workers, preview=preview)
    except (ConfigError, ValueError) as exc:
        _fail(str(exc))
    except OSError as exc:  # --out a file, or a folder that cannot be written
        _fail(f"cannot write phantoms to {out}: {exc.strerror or exc}")


@app.command()
def show(case_dir: Path = typer.Argument(..., help="a case folder (image.nii.gz, sites.nii.gz, lesions.nii.gz) or a predict output folder"),
         out: Optional[Path] = typer.Option(None, "--out", help="PNG path (default CASE_DIR/preview.png)"),
         image: Optional[Path] = typer.Option(None, "--image", help="the scan to draw on, for a predict output folder (which holds no image)")) -> None:
    """Write a coronal montage PNG with sites and lesions outlined."""
    from models.viz import preview_case
    try:
        path = preview_case(case_dir, out, image)
    except (FileNotFoundError, ValueError) as exc:
        _fail(str(exc))
    typer.echo(str(path))


def _exit_unless_file(config: Path, hint: str = "") -> None:
    """End the command with exit status 2 and one line when a config file is missing."""
    if not config.is_file():
        _fail(f"no such config file: {config}{hint}")


RUN_RESULTS = ("last.pt", "metrics.csv", "tb", "best", "final")  # a run's results: a folder with one holds a run
RUN_OUTPUTS = (*RUN_RESULTS, "config.yaml")  # all training writes in its folder (the config first, before a step)


def _check_run_folder(run: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to start over an earlier run unless told to (``--overwrite`` removes its outputs first), and to
    ``--resume`` where there is nothing to resume. Under torchrun (WORLD_SIZE > 1) the ranks start at different
    moments, so only the resume check is made: a later rank may already see rank 0's first files."""
    import os
    import shutil
    if run.exists() and not run.is_dir():
        _fail(f"--out-dir {run} is a file, not a run folder: give another --out-dir")
    if resume:
        if not (run / "last.pt").is_file():
            _fail(f"--resume: {run} holds no last.pt to continue from (leave out --resume to start a new run there)")
        return
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 or not any((run / name).exists() for name in RUN_RESULTS):
        return
    if not overwrite:
        if (run / "last.pt").is_file():
            _fail(f"{run} holds a run already: continue it with --resume, start again there with --overwrite, or "
                  "give another --out-dir")
        _fail(f"{run} holds a run that stopped before its first checkpoint (nothing to --resume): start again there "
              "with --overwrite, or give another --out-dir")
    for name in RUN_OUTPUTS:
        target = run / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()


@app.command()
def train(config: Optional[Path] = typer.Option(None, "--config", help="training YAML (default configs/train/default.yaml)"),
          set_: List[str] = typer.Option([], "--set", help="override a key, e.g. --set optim.steps=500"),
          resume: bool = _flag("--resume", help="continue from OUT_DIR/last.pt"),
          init: Optional[Path] = typer.Option(None, "--init", help="fine-tune from a model bundle (e.g. models/default)"),
          out_dir: Optional[Path] = typer.Option(None, "--out-dir", help="run folder (config: out_dir)"),
          device: Optional[str] = typer.Option(None, "--device", help="auto | cpu | cuda (config: device)"),
          prepare_only: bool = _flag("--prepare-only", help="make the cached phantom and dataset cases "
                                            "with data.workers processes at full priority, then stop (faster than "
                                            "filling the pool beside training)"),
          overwrite: bool = _flag("--overwrite", help="start again in a run folder that holds a run (its "
                                  "checkpoints, metrics and TensorBoard events are removed first)")) -> None:
    """Train (or fine-tune) the network; every setting lives in one validated YAML schema."""
    from training.config import ConfigError, TrainConfig, load_config
    from training.loop import Trainer, resume_config
    from training.nnunet import DatasetError
    overrides = list(set_)
    if init is not None:
        overrides.append(f"init={init}")
    if out_dir is not None:
        overrides.append(f"out_dir={out_dir}")
    if device is not None:
        overrides.append(f"device={device}")
    if config is not None:
        _exit_unless_file(config)
    path = config or (_ROOT / "configs" / "train" / "default.yaml")
    if not path.is_file():  # an installed wbmri carries no configs/: the schema's bare defaults are not the recipe
        _fail(f"no --config given, and {path} is not there (a pip-installed wbmri carries no configs/): give "
              "--config with the repository's configs/train/default.yaml or your own")
    try:
        cfg = load_config(TrainConfig, path, overrides)
    except ConfigError as exc:
        _fail(str(exc))
    try:
        if prepare_only:
            made = Trainer(cfg).prepare()
            typer.echo(f"prepared in {made['seconds']:.0f} s ({made['made']} phantom cases made): {made['pool_cases']} "
                       f"pool, {made['val_cases']} validation and {made['dataset_cases']} dataset cases under "
                       f"{cfg.data.cache_dir}")
            return
        _check_run_folder(Path(cfg.out_dir), resume, overwrite)
        if resume:
            cfg, notes = resume_config(cfg, Path(cfg.out_dir) / "last.pt")
            for note in notes:
                typer.echo(note, err=True)
        result = Trainer(cfg, resume=resume).train()
    except ConfigError as exc:
        _fail(str(exc))
    except (DatasetError, FileNotFoundError) as exc:
        _fail(f"cannot train on this data: {exc}")
    best = result["best_selection_f1"]
    chosen = ("no validation, so best/ is final/" if best is None else
              f"best validation lesion F1 {best:.3f} (each prediction detecting one lesion)")
    typer.echo(f"done: step {result['step']}, {chosen}; run folder {cfg.out_dir}")


def _load_predictor(model: Optional[Path], **options):
    """``Predictor.load`` for a command: a bundle that cannot be loaded ends it with one clear message (exit 2)."""
    from inference.predictor import OptionError, Predictor
    try:
        return Predictor.load(model, **options)
    except OptionError as exc:
        _fail(f"bad option: {exc}")
    except (ValueError, FileNotFoundError) as exc:
        _fail(f"cannot load the model: {exc}")


@app.command()
def predict(inputs: List[str] = typer.Argument(..., help="NIfTI files, folders (their .nii / .nii.gz files, or "
                                              "CASE/image.nii.gz of their case folders) or glob patterns"),
            out: Path = typer.Option(..., "--out", help="output folder: one OUT/<case>/ per input"),
            model: Optional[Path] = typer.Option(None, "--model", help="model bundle folder (default: the shipped model)"),
            device: str = typer.Option("auto", "--device", help="auto | cpu | cuda"),
            precision: str = typer.Option("auto", "--precision", help="auto (bf16 where native) | bf16 | fp32"),
            tta: Optional[str] = typer.Option(None, "--tta", help=TTA_HELP),
            overwrite: bool = _flag("--overwrite", help="redo cases whose folder is complete")) -> None:
    """Segment marrow edema, name each lesion's site, measure it, and write the contract files per case."""
    _exit_on_sigterm()
    from rich.console import Console
    from inference.batch import check_out_dir, expand_inputs, predict_many, summary_table
    from models.nifti import InputError
    try:
        files = expand_inputs(inputs)
    except InputError as exc:
        _fail(str(exc))
    try:
        check_out_dir(out)
    except NotADirectoryError as exc:
        _fail(str(exc))
    predictor = _load_predictor(model, device=device, precision=precision, tta=tta)
    outcomes = predict_many(predictor, files, out, overwrite=overwrite)
    Console(stderr=True).print(summary_table(outcomes))
    failed = [o for o in outcomes if o.status == "failed"]
    for o in failed:  # one line each, whatever the terminal's width did to the table
        typer.echo(f"failed {o.name}: {o.error}", err=True)
    for o in outcomes:
        if o.note:
            typer.echo(f"note {o.name}: {o.note}", err=True)
    if failed:
        raise typer.Exit(1)


@app.command()
def evaluate(pred: Optional[Path] = typer.Option(None, "--pred", help="folder of predicted case folders (contract layout)"),
             ref: Optional[Path] = typer.Option(None, "--ref", help="folder of reference case folders"),
             model: Optional[Path] = typer.Option(None, "--model", help="predict first with this model bundle ..."),
             data: Optional[Path] = typer.Option(None, "--data", help="... on this folder: phantom cases (cases/*/image.nii.gz) or a labelled nnU-Net dataset (imagesTr/, labelsTr/, optional sitesTr/)"),
             out: Path = typer.Option(Path("eval"), "--out", help="where per_case.csv, lesions.csv, sites.csv, "
                                                    "site_confusion.csv, summary.json, froc.png go"),
             device: str = typer.Option("auto", "--device", help="with --model: auto | cpu | cuda"),
             precision: str = typer.Option("auto", "--precision", help="with --model: auto (bf16 where native) | "
                                           "bf16 | fp32; the two can differ by a few lesions"),
             tta: Optional[str] = typer.Option(None, "--tta", help=TTA_HELP),
             min_ml: float = typer.Option(0.5, "--min-ml", help="lesion size for the detection targets")) -> None:
    """Score predictions against references: Dice, lesion detection (FROC), site accuracy."""
    _exit_on_sigterm()
    import json as _json
    from training.evaluate import evaluate_folders, size_tag
    errors: dict[str, str] = {}
    if model is not None or data is not None:
        if data is None:
            _fail("--model needs --data")
        from inference.batch import predict_many
        # a wbmri synth folder holds both layouts: its cases/ keep lesion instances (labelsTr merges touching ones)
        if not (data / "cases").is_dir() and (data / "dataset.json").is_file() and (data / "imagesTr").is_dir():
            from training.nnunet import DatasetError, write_references
            ref = out / "reference"
            try:
                by_name = write_references(data, ref)
            except DatasetError as exc:
                _fail(f"cannot evaluate on this data: {exc}")
            names, images = list(by_name), list(by_name.values())
        else:  # phantom case folders (wbmri synth)
            ref = data / "cases" if (data / "cases").is_dir() else data
            images = sorted(ref.glob("*/image.nii.gz"))
            names = [p.parent.name for p in images]
        predictor = _load_predictor(model, device=device, precision=precision, tta=tta)
        pred = out / "predictions"
        outcomes = predict_many(predictor, images, pred, names=names)
        errors = {o.name: o.error for o in outcomes if o.status == "failed"}
    if pred is None or ref is None:
        _fail("give --pred and --ref, or --model and --data")
    if model is None and not pred.is_dir():
        _fail(f"cannot evaluate: --pred {pred} is not a folder of predicted case folders")
    if not ref.is_dir():
        _fail(f"cannot evaluate: --ref {ref} is not a folder of reference case folders")
    try:
        summary = evaluate_folders(pred, ref, out, min_ref_ml=min_ml, prediction_errors=errors)
    except (FileNotFoundError, ValueError) as exc:
        _fail(f"cannot evaluate: {exc}")
    shown = {k: summary[k] for k in ("n_cases", "edema_dice", f"sensitivity_ge_{size_tag(min_ml)}", "site_accuracy",
                                     "mean_site_dice", "vertebral_level_accuracy", "fp_per_scan_no_reference_lesions")
             if k in summary}
    shown["by_region"] = {region: f"{r['detected']} of {r['n_ref']} found, {r['fp']} false positive(s)"
                          for region, r in summary["by_region"].items()}
    typer.echo(_json.dumps(shown, indent=2))
    if summary.get("n_failed"):  # scored as empty predictions (FAILURE_RULE): say so, and end with a failure
        for f in summary["failures"]:
            typer.echo(f"no usable prediction for {f['case']}: {f['error']}", err=True)
        typer.echo(f"{summary['n_failed']} of {summary['n_cases']} cases had no usable prediction and were scored as "
                   "empty ones (every reference lesion missed; a lesion-free case then counts as having no false "
                   f"positive): the figures above are not the tool's alone. Details: {out / 'summary.json'}", err=True)
        raise typer.Exit(1)


@app.command()
def compare(a: Path = typer.Argument(..., help="an evaluation folder (per_case.csv, summary.json): the baseline"),
            b: Path = typer.Argument(..., help="another evaluation of the same reference cases"),
            as_json: bool = _flag("--json", help="print JSON instead of a table")) -> None:
    """Paired comparison of two evaluations (B minus A) with 95% bootstrap intervals over the shared cases."""
    import json as _json
    from rich.console import Console
    from rich.table import Table
    from training.evaluate import CI_METHOD, compare_evaluations
    try:
        result = compare_evaluations(a, b)
    except (FileNotFoundError, ValueError, KeyError) as exc:
        _fail(f"cannot compare: {exc}")
    if as_json:
        typer.echo(_json.dumps(result, indent=2))
        return
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    table = Table(title=f"{b} minus {a}: {result['n_cases']} shared cases")
    for col in ("statistic", "cases", "A", "B", "B - A", "95% CI of B - A"):
        table.add_column(col, justify="left" if col == "statistic" else "right")
    for name, st in result["statistics"].items():
        ci = st["ci95"]
        table.add_row(name, str(st["n_cases"]), fmt(st["a"]), fmt(st["b"]), fmt(st["b_minus_a"]),
                      "-" if ci is None else f"[{ci[0]:+.3f}, {ci[1]:+.3f}]")
    console = Console()
    console.print(table)
    if result["skipped"]:
        console.print(f"not in both evaluations (re-run the older one to compare them): {', '.join(result['skipped'])}")
    console.print(f"{CI_METHOD} Intervals that contain 0: no difference shown.", soft_wrap=True)


@app.command()
def export(run_dir: Path = typer.Argument(..., help="a training run folder (runs/NAME)"),
           to: Path = typer.Option(..., "--to", help="destination bundle folder, e.g. models/default"),
           which: str = typer.Option("best", "--which", help="best | final"),
           eval_: List[str] = typer.Option([], "--eval", help="NAME=EVAL_DIR with a summary.json, repeatable"),
           command: str = typer.Option("", "--command", help="the command that reproduces the metrics"),
           min_cases: int = typer.Option(20, "--min-cases", min=1, help="the fewest scored cases an --eval may "
                                         "have (a frozen test set: at least 20)")) -> None:
    """Copy a run's model into a bundle folder and write its model card."""
    from training.export import export_bundle
    try:
        typer.echo(str(export_bundle(run_dir, to, which, _named_dirs(eval_), command, min_cases=min_cases)))
    except (FileNotFoundError, ValueError) as exc:
        _fail(f"cannot export: {exc}")


def _named_dirs(items: List[str]) -> dict[str, Path]:
    """NAME=DIR options as a dict; a clear error for anything else."""
    bad = [item for item in items if "=" not in item or not item.split("=", 1)[0] or not item.split("=", 1)[1]]
    if bad:
        raise typer.BadParameter(f"expected NAME=DIR (e.g. whole_body=eval/test_wb), got {bad[0]!r}", param_hint="--eval")
    return {name: Path(folder) for name, folder in (item.split("=", 1) for item in items)}


@app.command()
def card(bundle: Path = typer.Argument(..., help="a model bundle folder, e.g. models/default"),
         eval_: List[str] = typer.Option(..., "--eval", help="NAME=EVAL_DIR made by `wbmri evaluate --model BUNDLE`, "
                                         "repeatable"),
         command: str = typer.Option("", "--command", help="the command that reproduces the metrics"),
         min_cases: int = typer.Option(20, "--min-cases", min=1, help="the fewest scored cases an evaluation may "
                                       "have (a frozen test set: at least 20)")) -> None:
    """Rewrite a bundle card's test-set metrics and target check from evaluations of it (after `wbmri validate`
    re-chose its lesion rules); evaluations made with other weights or rules, of fewer than --min-cases cases, or
    leaving out a test set the card already has, are refused."""
    from training.export import rescore_card
    try:
        written = rescore_card(bundle, _named_dirs(eval_), command, min_cases)
    except (FileNotFoundError, ValueError) as exc:
        _fail(f"card not changed: {exc}")
    width = max((len(row["metric"]) for row in written["targets"]), default=0)
    for row in written["targets"]:
        value = "n/a" if row["value"] is None else f"{row['value']:.3f}"
        if row.get("fp_per_scan") is not None:  # the detection target: sensitivity at a false-positive rate
            value += f" at {row['fp_per_scan']:.2f}"
        mark = {True: "met", False: "MISSED", None: "not measured"}[row["met"]]
        typer.echo(f"{row['test_set']:<12} {row['metric']:<{width}} {value} (target {row['target']}): {mark}")


def _run_on_bundle(verb: str, bundle: Path, config: Optional[Path], work: Callable[[Path], dict]) -> None:
    """``work(run_config)`` for a bundle command (the run's config: ``config`` or BUNDLE/../config.yaml), its
    result printed as JSON; a usage error (exit code 2) names what is wrong."""
    import json

    from training.config import ConfigError
    from training.nnunet import DatasetError
    run_config = config or Path(bundle).parent / "config.yaml"
    _exit_unless_file(run_config, " (give the run's config with --config)")
    try:
        result = work(run_config)
    except (ConfigError, DatasetError, FileNotFoundError, ValueError) as exc:
        _fail(f"cannot {verb}: {exc}")
    typer.echo(json.dumps(result, indent=2))


@app.command()
def validate(bundle: Path = typer.Argument(..., help="a run's model bundle, e.g. runs/default/best"),
             val_cases: int = typer.Option(96, "--val-cases", min=0, help="validation phantoms (seeds from the run's val_seed; "
                                           "the first 32 alone put a rule's false positives per scan at about 0.6x "
                                           "all 96's: models/default/HISTORY.md, stage 23); 0 with data.val_dataset_dirs: "
                                           "choose on those labelled scans alone"),
             config: Optional[Path] = typer.Option(None, "--config", help="the run's config (default: BUNDLE/../config.yaml)"),
             tta: Optional[str] = typer.Option(None, "--tta", help=f"choose the rules with this {TTA_HELP}, "
                                               "and record it in the card"),
             table: Optional[Path] = typer.Option(None, "--table", help="write every candidate rule's validation "
                                                  "figures (per kind of scan) to this CSV"),
             set_: List[str] = typer.Option([], "--set", help="override a key of the run's config, e.g. "
                                            "data.val_dataset_dirs (a YAML list of labelled folders) to add them"),
             max_fp: Optional[float] = typer.Option(None, "--max-fp-per-scan", min=0.0, help="choose the most "
                                                    "sensitive rule with at most this many false positives per "
                                                    "validation scan (default: the target's 0.5; validation has "
                                                    "underestimated the test sets' rates)")) -> None:
    """Re-choose a bundle's edema threshold, bone share, lesion size and lesion confidence on more validation cases
    (every candidate lesion passes the card's hyperintensity rule, measured on the model grid); updates its card."""
    from training.export import revalidate
    _run_on_bundle("validate", bundle, config,
                   lambda run_config: revalidate(bundle, run_config, val_cases, tta, table, set_, max_fp))


@app.command()
def recalibrate(bundle: Path = typer.Argument(..., help="a model bundle, e.g. models/default"),
                to: Path = typer.Option(..., "--to", help="the new bundle folder"),
                config: Optional[Path] = typer.Option(None, "--config", help="the run's config, whose training data "
                                                      "and sampling give the patches (default: BUNDLE/../config.yaml)"),
                batches: int = typer.Option(400, "--batches", min=1, help="training batches to average over"),
                set_: List[str] = typer.Option([], "--set", help="override a key of the run's config, e.g. "
                                               "data.phantom_cases=120")) -> None:
    """Re-estimate a bundle's batch-norm statistics on its training patches (precise BN) into a new bundle."""
    from training.export import recalibrate_bundle
    _run_on_bundle("recalibrate", bundle, config, lambda run_config: recalibrate_bundle(bundle, run_config, to, batches, set_))


@app.command()
def average(bundle: Path = typer.Argument(..., help="a model bundle whose card and lesion rules the result keeps"),
            other: Path = typer.Option(..., "--with", help="a bundle of the same network, e.g. the model BUNDLE was "
                                       "fine-tuned from"),
            to: Path = typer.Option(..., "--to", help="the new bundle folder"),
            share: float = typer.Option(0.5, "--share", help="how far to move each weight towards --with's "
                                        "(0.5: halfway)")) -> None:
    """Average two bundles of one network weight for weight into a new bundle (WiSE-FT); evaluate it, then
    `wbmri card` it."""
    import json

    from training.export import average_bundles
    try:
        record = average_bundles(bundle, other, to, share)
    except (FileNotFoundError, ValueError) as exc:
        _fail(f"cannot average: {exc}")
    typer.echo(json.dumps(record, indent=2))


@app.command()
def serve(host: Optional[str] = typer.Option(None, "--host", help="interface (default 127.0.0.1; other hosts need API keys)"),
          port: Optional[int] = typer.Option(None, "--port", help="port (default 8000)"),
          data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="job store, uploads, results (default ./var)"),
          device: Optional[str] = typer.Option(None, "--device", help="auto | cpu | cuda"),
          model: Optional[Path] = typer.Option(None, "--model", help="model bundle (default: the shipped model)"),
          config: Optional[Path] = typer.Option(None, "--config", help="service settings file (YAML/TOML/JSON)"),
          workers: Optional[int] = typer.Option(None, "--workers", help="studies analysed at once (default 1)"),
          api_key_file: Optional[Path] = typer.Option(None, "--api-key-file", help="bearer tokens, one per line"),
          log_level: Optional[str] = typer.Option(None, "--log-level", help="debug | info | warning | error "
                                                  "(default info)"),
          tta: Optional[str] = typer.Option(None, "--tta", help=TTA_HELP),
          precision: Optional[str] = typer.Option(None, "--precision", help="auto (bf16 where native) | bf16 | fp32"),
          threads: Optional[int] = typer.Option(None, "--threads", help="torch CPU threads per worker")) -> None:
    """Run the HTTP service and web page (every option also from WBMRI_* environment variables and --config;
    the command line wins)."""
    from service.server import run
    run(config, host=host, port=port, data_dir=data_dir, device=device, model=model, workers=workers,
        api_key_file=api_key_file, log_level=log_level, tta=tta, precision=precision, threads=threads)


@app.command()
def submit(files: List[Path] = typer.Argument(..., help="NIfTI files to analyse"),
           url: str = typer.Option("http://127.0.0.1:8000", "--url", help="the wbmri service"),
           token: Optional[str] = typer.Option(None, "--token", envvar="WBMRI_TOKEN", help="API key (bearer token)"),
           out: Path = typer.Option(Path("results"), "--out", help="results go to OUT/<case>/"),
           parallel: int = typer.Option(2, "--parallel", help="jobs in flight at once"),
           timeout: float = typer.Option(3600.0, "--timeout", help="seconds to wait for each study"),
           delete: bool = _flag("--delete", help="delete each study from the server after download")) -> None:
    """Upload studies to a running service, wait, and download the results."""
    from service.client import SubmitError, submit as submit_files
    try:
        results = submit_files(files, url=url, token=token, out_dir=out, parallel=parallel, timeout_s=timeout, delete=delete)
    except SubmitError as exc:
        _fail(f"wbmri submit: {exc}")
    for r in results:
        typer.echo(f"{r.file}\t{r.state}\t{r.out if r.ok else r.error}")
    if not all(r.ok for r in results):
        raise typer.Exit(1)


if __name__ == "__main__":
    app()
