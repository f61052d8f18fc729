"""Batch prediction: files, folders and globs in; one contract folder per case out; failures isolated."""
from __future__ import annotations

import glob
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from models.card import result_identity, sha256_file
from models.nifti import NIFTI_SUFFIXES, RESULT_FILES, InputError, case_names, check_replaceable, saved_report

SKIPPED_MESSAGE = "already done with this model (--overwrite to redo it)"
REPLACED_MESSAGE = "replaced the result of another file of this name (another sha256) in its folder"


@dataclass
class CaseOutcome:
    name: str
    source: str
    status: str            # done | skipped | failed
    lesions: int | None = None
    seconds: float = 0.0
    error: str | None = None
    note: str | None = None  # e.g. a result of another file replaced


def is_nifti_name(path: str | Path) -> bool:
    """Whether a file name ends in .nii or .nii.gz, in any case (scanner exports write .NII.GZ too)."""
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def _visible(path: Path) -> bool:
    """Not a hidden file: macOS copies leave ``._scan.nii.gz`` companions (resource forks) beside every scan."""
    return not path.name.startswith(".")


def _folder_inputs(folder: Path) -> list[Path]:
    """The *.nii / *.nii.gz files directly in ``folder`` (any case, hidden ones left out); with none, the
    ``CASE/image.nii(.gz)`` of its case folders (the phantom layout; several are named by their folders:
    :func:`models.nifti.case_names`)."""
    files = sorted(f for f in folder.iterdir() if f.is_file() and is_nifti_name(f.name) and _visible(f))
    if files:
        return files
    return sorted(f for case in folder.iterdir() if case.is_dir() and _visible(case) for f in case.iterdir()
                  if f.is_file() and f.name.lower() in ("image.nii", "image.nii.gz"))


INPUT_HINT = ("a folder gives the .nii / .nii.gz files directly in it, or, with none, the image.nii.gz of each case "
              "folder in it; use a glob such as 'DIR/**/*.nii.gz' to search deeper")


def expand_inputs(inputs: list[str]) -> list[Path]:
    """Files, folders (:func:`_folder_inputs`) and glob patterns, in a stable order without duplicates (one file
    given twice, under two spellings, counts once). An existing file is taken as it is, even with ``[`` or ``*`` in
    its name. InputError names every argument that is empty or gives no NIfTI file: a batch must not quietly
    leave out what was asked for."""
    out: list[Path] = []
    seen: set[Path] = set()
    empty: list[str] = []
    for item in inputs:
        p = Path(item)
        if not item.strip():
            empty.append(repr(item))
            continue
        if p.is_dir():
            found = _folder_inputs(p)
        elif not p.exists() and any(ch in item for ch in "*?["):
            found = sorted(Path(g) for g in glob.glob(item, recursive=True)
                           if is_nifti_name(g) and _visible(Path(g)))
        else:
            found = [p]
        if not found:
            empty.append(item)
        for f in found:
            key = f.resolve()
            if key not in seen:
                seen.add(key)
                out.append(f)
    if empty:
        raise InputError(f"no NIfTI input found in {', '.join(empty)} ({INPUT_HINT})")
    return out


def is_done(out_dir: Path, name: str, model: dict | None = None, source: Path | None = None) -> bool:
    """A case folder is complete when it holds every contract file and a readable report; when ``model`` (a
    predictor's ``model_info``) is given, it must have been made by the same weights, test-time augmentation, lesion
    rules and software version (:func:`models.card.result_identity`), and when ``source`` is given, from a file of
    the same sha256 (a scan replaced under the same name is analysed again): other results are redone, not reused."""
    report = saved_report(out_dir / name)
    if report is None or not all((out_dir / name / f).is_file() for f in RESULT_FILES):
        return False
    if model is not None and result_identity(report.get("model", {})) != result_identity(model):
        return False
    return source is None or report.get("study", {}).get("sha256") == sha256_file(source)


def _drop_result_of_another_file(out_dir: Path, name: str, source: Path) -> bool:
    """Remove ``out_dir/name`` when it holds a result (a readable report) of another file than ``source``: after a
    failed run, the folder must not pass for this file's result. A folder without a report is not wbmri's result
    and is left alone. Returns whether it was removed."""
    folder = out_dir / name
    try:
        report = check_replaceable(folder)
    except FileExistsError:  # no report, or a user's own files beside one: not ours to delete
        return False
    if report is None:
        return False
    try:
        if report.get("study", {}).get("sha256") == sha256_file(source):
            return False
    except OSError:  # the input cannot be read: its earlier result cannot be vouched for either
        pass
    shutil.rmtree(folder, ignore_errors=True)
    return True


def _is_done_quietly(out_dir: Path, name: str, model: dict, source: Path) -> bool:
    """:func:`is_done`, False when the input cannot be read (the run then says why)."""
    try:
        return is_done(out_dir, name, model, source)
    except OSError:
        return False


def check_out_dir(out_dir: Path | str) -> Path:
    """The output folder as a Path; NotADirectoryError when a file is in its place."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"--out {out_dir} is a file, not a folder")
    return out_dir


def predict_many(predictor, inputs: list[Path], out_dir: Path, overwrite: bool = False,
                 progress: bool = True, names: list[str] | None = None) -> list[CaseOutcome]:
    """Run the predictor over every input; a failing case is recorded and the others go on.

    Case names default to the file names without .nii/.nii.gz (:func:`models.nifti.case_names`); ``names``
    overrides them.
    """
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    out_dir = check_out_dir(out_dir)
    outcomes: list[CaseOutcome] = []
    names = list(names) if names is not None else case_names(inputs)
    dupes = {n for n in names if names.count(n) > 1}
    console = Console(stderr=True)  # stdout stays free for scripts
    # a bar is drawn only on a terminal: in a log (nohup, a scheduler, CI) each finished case gets a line instead
    lines = progress and not console.is_terminal
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, disable=not progress or lines) as bar:
        task = bar.add_task("predict", total=len(inputs))
        for i, (path, name) in enumerate(zip(inputs, names), start=1):
            bar.update(task, description=f"predict {name}")
            t0 = time.perf_counter()
            if name in dupes:
                outcomes.append(CaseOutcome(name, str(path), "failed", error=f"two inputs are named {name!r}; rename one"))
            elif not overwrite and _is_done_quietly(out_dir, name, predictor.model_info, path):
                outcomes.append(CaseOutcome(name, str(path), "skipped"))
            else:
                try:
                    earlier_report = check_replaceable(out_dir / name)  # before the minutes of work, not after
                    result = predictor.predict(path, name=name)
                    earlier = (earlier_report or {}).get("study", {}).get("sha256")
                    result.save(out_dir, overwrite=True)
                    note = (REPLACED_MESSAGE if earlier and earlier != result.report["study"].get("sha256")
                            else None)
                    outcomes.append(CaseOutcome(name, str(path), "done", result.report["summary"]["lesion_count"],
                                                round(time.perf_counter() - t0, 2), note=note))
                except Exception as exc:  # one broken case must not stop the batch
                    error = (str(exc) if isinstance(exc, (InputError, FileExistsError))
                             else f"internal error: {type(exc).__name__}: {exc}")
                    if _drop_result_of_another_file(out_dir, name, path):
                        error += f"; the earlier result in {out_dir / name}, made from another file, was removed"
                    outcomes.append(CaseOutcome(name, str(path), "failed", seconds=round(time.perf_counter() - t0, 2),
                                                error=error))
            bar.advance(task)
            if lines:
                console.print(progress_line(outcomes[-1], i, len(inputs)), markup=False, highlight=False, soft_wrap=True)
    return outcomes


def progress_line(outcome: CaseOutcome, index: int, total: int) -> str:
    """One finished case, for a log: ``predict 3/50 case_7: done, 2 lesions, 17.3 s``."""
    what = f"{outcome.lesions} lesion{'' if outcome.lesions == 1 else 's'}, " if outcome.status == "done" else ""
    return f"predict {index}/{total} {outcome.name}: {outcome.status}, {what}{outcome.seconds:.1f} s"


def summary_table(outcomes: list[CaseOutcome]):
    from rich.table import Table
    table = Table(title="wbmri predict")
    for col in ("case", "status", "lesions", "seconds", "message"):
        table.add_column(col)
    for o in outcomes:
        style = {"done": "green", "skipped": "dim", "failed": "red"}[o.status]
        table.add_row(o.name, f"[{style}]{o.status}[/{style}]", "" if o.lesions is None else str(o.lesions),
                      f"{o.seconds:.1f}", o.error or o.note or (SKIPPED_MESSAGE if o.status == "skipped" else ""))
    return table
