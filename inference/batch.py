"""Batch prediction: files, folders and globs in; one contract folder per case out; failures isolated."""
from __future__ import annotations

import glob
import json
import time
from dataclasses import dataclass
from pathlib import Path

from models.card import result_identity
from models.nifti import InputError

SKIPPED_MESSAGE = "already done with this model (--overwrite to redo it)"


@dataclass
class CaseOutcome:
    name: str
    source: str
    status: str            # done | skipped | failed
    lesions: int | None = None
    seconds: float = 0.0
    error: str | None = None


def expand_inputs(inputs: list[str]) -> list[Path]:
    """Files, folders (their *.nii / *.nii.gz) and glob patterns, in a stable order without duplicates."""
    out: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(set(p.glob("*.nii")) | set(p.glob("*.nii.gz")))
        elif any(ch in item for ch in "*?["):
            found = sorted(Path(g) for g in glob.glob(item, recursive=True) if g.endswith((".nii", ".nii.gz")))
        else:
            found = [p]
        for f in found:
            if f not in out:
                out.append(f)
    return out


def is_done(out_dir: Path, name: str, model: dict | None = None) -> bool:
    """A case folder is complete when its report exists (folders are written atomically) and, when ``model`` (a
    predictor's ``model_info``) is given, was made by the same weights, test-time augmentation, lesion rules and
    software version (:func:`models.card.result_identity`): other results are redone, not reused."""
    report = out_dir / name / "report.json"
    if not report.is_file():
        return False
    if model is None:
        return True
    try:
        made_by = json.loads(report.read_text()).get("model", {})
    except (OSError, ValueError):
        return False
    return result_identity(made_by) == result_identity(model)


def check_out_dir(out_dir: Path | str) -> Path:
    """The output folder as a Path; NotADirectoryError when a file is in its place."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"--out {out_dir} is a file, not a folder")
    return out_dir


def predict_many(predictor, inputs: list[Path], out_dir: Path, overwrite: bool = False,
                 progress: bool = True, names: list[str] | None = None) -> list[CaseOutcome]:
    """Run the predictor over every input; a failing case is recorded and the others go on.

    Case names default to the file names without .nii/.nii.gz; ``names`` overrides them (e.g. phantom case folders).
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from models.nifti import case_name
    out_dir = check_out_dir(out_dir)
    outcomes: list[CaseOutcome] = []
    names = list(names) if names is not None else [case_name(p) for p in inputs]
    dupes = {n for n in names if names.count(n) > 1}
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  disable=not progress) as bar:
        task = bar.add_task("predict", total=len(inputs))
        for path, name in zip(inputs, names):
            bar.update(task, description=f"predict {name}")
            t0 = time.perf_counter()
            if name in dupes:
                outcomes.append(CaseOutcome(name, str(path), "failed", error=f"two inputs are named {name!r}; rename one"))
            elif not overwrite and is_done(out_dir, name, predictor.model_info):
                outcomes.append(CaseOutcome(name, str(path), "skipped"))
            else:
                try:
                    result = predictor.predict(path, name=name)
                    result.save(out_dir, overwrite=True)
                    outcomes.append(CaseOutcome(name, str(path), "done", result.report["summary"]["lesion_count"],
                                                round(time.perf_counter() - t0, 2)))
                except InputError as exc:
                    outcomes.append(CaseOutcome(name, str(path), "failed", seconds=round(time.perf_counter() - t0, 2),
                                                error=str(exc)))
                except Exception as exc:  # one broken case must not stop the batch
                    outcomes.append(CaseOutcome(name, str(path), "failed", seconds=round(time.perf_counter() - t0, 2),
                                                error=f"internal error: {type(exc).__name__}: {exc}"))
            bar.advance(task)
    return outcomes


def summary_table(outcomes: list[CaseOutcome]):
    from rich.table import Table
    table = Table(title="wbmri predict")
    for col in ("case", "status", "lesions", "seconds", "message"):
        table.add_column(col)
    for o in outcomes:
        style = {"done": "green", "skipped": "dim", "failed": "red"}[o.status]
        table.add_row(o.name, f"[{style}]{o.status}[/{style}]", "" if o.lesions is None else str(o.lesions),
                      f"{o.seconds:.1f}", o.error or (SKIPPED_MESSAGE if o.status == "skipped" else ""))
    return table
