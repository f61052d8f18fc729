"""Shared fixtures: a tiny random-initialised model bundle (fast on CPU) and paths."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from models.card import save_bundle
from models.networks import NetworkConfig, build_network
from models.sites import by_code

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
                                          "intended_use": "tests only", "thresholds": {"edema": 0.5},
                                          "data": {"synthetic_only": True},
                                          "limitations": ["It does NOT meet 5 of its 5 targets on the frozen "
                                                          "synthetic test set: all of them (random weights)."]})


@pytest.fixture
def fibula() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A fibula (marrow 1.0) in soft tissue (0.5) with three lesions: bright (2.0), between the references (0.7)
    and dark (0.4). Returns lesions, sites and image on a 1 mm RAS grid."""
    shape = (41, 41, 61)
    X, Y, Z = np.indices(shape, dtype=float)
    r2 = (X - 20) ** 2 + (Y - 20) ** 2
    sites = np.where(r2 <= 36, by_code()["fibula_left"].id, 0).astype(np.uint8)
    image = np.where((np.abs(X - 20) <= 12) & (np.abs(Y - 20) <= 12), 0.5, 0.0).astype(np.float32)
    image[sites > 0] = 1.0
    lesions = np.zeros(shape, np.uint16)
    for lid, (z0, value) in enumerate(((5, 2.0), (25, 0.7), (45, 0.4)), start=1):
        lesions[(r2 <= 6) & (Z >= z0) & (Z <= z0 + 8)] = lid
        image[lesions == lid] = value
    return lesions, sites, image
