"""Starting the service: ``run(...)`` (what ``wbmri serve`` calls) and ``python -m service.server``."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Sequence

from service.settings import ServiceConfigError, Settings, load_settings


def build_settings(config_file: str | Path | None = None, **overrides: object) -> Settings:
    """Settings for a server: ``overrides`` (any :class:`Settings` field) that are not None win over the
    environment and the config file. Raises :class:`ServiceConfigError` for unsafe or invalid settings (e.g. a
    public host without API keys)."""
    settings = load_settings(config_file, **overrides)
    settings.check_safe()
    _check_model(settings)
    return settings


def _check_model(settings: Settings) -> None:
    from models.card import CARD, DEFAULT_MODEL_DIR, WEIGHTS
    folder = Path(settings.model) if settings.model else DEFAULT_MODEL_DIR
    if not (folder / WEIGHTS).is_file() or not (folder / CARD).is_file():
        what = "the shipped default model" if settings.model is None else "the model"
        raise ServiceConfigError(f"{what} is missing: {folder} needs {WEIGHTS} and {CARD} "
                                 "(train one with `wbmri train`, or pass --model / WBMRI_MODEL)")


def configure_logging(level: str) -> None:
    """Service log lines in uvicorn's style on stderr (job ids, sizes, timings; never header free text)."""
    logger = logging.getLogger("wbmri")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s:     %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(level.upper())


def run(config_file: str | Path | None = None, **overrides: object) -> None:
    """Serve until interrupted. ``overrides`` are :class:`Settings` fields (host, port, data_dir, device, model,
    workers, api_key_file, log_level, tta, precision, threads); ``None`` means: from ``WBMRI_*`` environment, the
    config file, or the default (127.0.0.1:8000, ./var, device auto, the shipped model, 1 worker). Exits with
    status 2 and a clear message when the settings are unsafe or invalid (e.g. a non-loopback host without an API
    key)."""
    import uvicorn
    try:
        settings = build_settings(config_file, **overrides)
    except ServiceConfigError as exc:
        print(f"wbmri serve: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    from service.app import create_app
    configure_logging(settings.log_level)
    app = create_app(settings)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                            proxy_headers=False, server_header=False, timeout_keep_alive=10,
                            timeout_graceful_shutdown=20)

    class Server(uvicorn.Server):
        """uvicorn's server, telling ``?wait`` requests to answer as soon as shutdown begins: they would otherwise
        hold it up and be cut off without their job's id."""

        def handle_exit(self, sig, frame) -> None:
            app.state.service.waiters.stop()
            super().handle_exit(sig, frame)

    Server(config).run()


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m service.server [--host H] [--port P] [--data-dir D] [--device D] [--model M] [--config F]
    [--workers N] [--api-key-file F] [--log-level L] [--tta T] [--precision P] [--threads N]``."""
    p = argparse.ArgumentParser(prog="python -m service.server", description=run.__doc__)
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--data-dir")
    p.add_argument("--device")
    p.add_argument("--model")
    p.add_argument("--config", dest="config_file")
    p.add_argument("--workers", type=int)
    p.add_argument("--api-key-file")
    p.add_argument("--log-level")
    p.add_argument("--tta")
    p.add_argument("--precision")
    p.add_argument("--threads", type=int)
    run(**vars(p.parse_args(argv)))


if __name__ == "__main__":
    main()
