"""The ``wbmri`` command line: it only wires the layers together (imports are lazy so --help is instant)."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

_ROOT = Path(__file__).resolve().parents[1]

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Whole-body MRI bone-marrow edema segmentation for CNO/CRMO. Supports, does not replace, clinical judgement.")


@app.command()
def synth(n: int = typer.Option(10, "--n", help="number of cases"),
          out: Path = typer.Option(..., "--out", help="output folder (nnU-Net raw layout plus case folders)"),
          seed: int = typer.Option(0, "--seed", help="seed of the first case; case i uses seed+i"),
          config: Optional[Path] = typer.Option(None, "--config", help="phantom YAML (default configs/synth/default.yaml)"),
          workers: int = typer.Option(1, "--workers", help="parallel worker processes"),
          set_: List[str] = typer.Option([], "--set", help="override a config key, e.g. --set fov.whole_body_p=1"),
          preview: bool = typer.Option(False, "--preview", help="also write preview.png in every case folder")) -> None:
    """Generate synthetic paediatric whole-body STIR cases with CNO lesions."""
    from training.phantom.generate import synth_dataset
    synth_dataset(n=n, out=out, seed=seed, config=config, overrides=set_, workers=workers, preview=preview)


@app.command()
def show(case_dir: Path = typer.Argument(..., help="a case folder (image.nii.gz, sites.nii.gz, lesions.nii.gz) or a predict output folder"),
         out: Optional[Path] = typer.Option(None, "--out", help="PNG path (default CASE_DIR/preview.png)")) -> None:
    """Write a coronal montage PNG with sites and lesions outlined."""
    from models.viz import preview_case
    path = preview_case(case_dir, out)
    typer.echo(str(path))


@app.command()
def train(config: Optional[Path] = typer.Option(None, "--config", help="training YAML (default configs/train/default.yaml)"),
          set_: List[str] = typer.Option([], "--set", help="override a key, e.g. --set optim.steps=500"),
          resume: bool = typer.Option(False, "--resume", help="continue from OUT_DIR/last.pt"),
          init: Optional[Path] = typer.Option(None, "--init", help="fine-tune from a model bundle (e.g. models/default)"),
          out_dir: Optional[Path] = typer.Option(None, "--out-dir", help="run folder (config: out_dir)"),
          device: Optional[str] = typer.Option(None, "--device", help="auto | cpu | cuda (config: device)")) -> None:
    """Train (or fine-tune) the network; every setting lives in one validated YAML schema."""
    from training.config import ConfigError, TrainConfig, load_config
    from training.loop import Trainer
    overrides = list(set_)
    if init is not None:
        overrides.append(f"init={init}")
    if out_dir is not None:
        overrides.append(f"out_dir={out_dir}")
    if device is not None:
        overrides.append(f"device={device}")
    path = config or (_ROOT / "configs" / "train" / "default.yaml")
    try:
        cfg = load_config(TrainConfig, path if path.is_file() else None, overrides)
    except ConfigError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2)
    result = Trainer(cfg, resume=resume).train()
    typer.echo(f"done: step {result['step']}, best validation lesion F1 {result['best_lesion_f1']:.3f}; run folder {cfg.out_dir}")


if __name__ == "__main__":
    app()
