"""The command line's help: every command renders it, and a flag never reads as if it took a value."""
from __future__ import annotations

import re

import pytest
import typer
from typer.testing import CliRunner

from service.cli import app

COMMANDS = sorted(typer.main.get_command(app).commands)


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help_shows_flags_without_a_value_placeholder(command):
    """typer 0.29 prints `--help <bool>` and `--resume <bool>`, as if the flag took true or false (pyproject pins
    typer below 0.29)."""
    assert {"synth", "train", "predict", "evaluate", "serve"} <= set(COMMANDS)
    res = CliRunner().invoke(app, ([command] if command else []) + ["--help"], env={"COLUMNS": "120"})
    assert res.exit_code == 0, res.output
    help_line = next(line for line in res.output.splitlines() if "--help" in line)
    assert "Show this message" in help_line
    assert not re.search(r"<bool>|BOOLEAN", res.output), res.output
