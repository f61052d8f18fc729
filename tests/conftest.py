"""Shared fixtures: a tiny random-initialised model bundle (fast on CPU) and paths."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from models.card import save_bundle
from models.networks import NetworkConfig, build_network

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A real bundle with a tiny network (random weights): exercises every code path in well under a second."""
    torch.manual_seed(0)
    cfg = NetworkConfig(channels=(4, 8, 16), strides=(2, 2), features=4, spacing_mm=(6.0, 6.0, 6.0), patch=(32, 32, 32))
    net = build_network(cfg)
    folder = tmp_path_factory.mktemp("tiny_model")
    return save_bundle(folder, net, cfg, {"name": "wbmri-tiny-test", "version": "0.0.0",
                                          "intended_use": "tests only", "thresholds": {"edema": 0.5}})
