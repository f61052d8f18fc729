"""Model bundles: ``model.safetensors`` (weights) + ``card.json`` (architecture, spacing, training, metrics).

The shipped default lives in ``models/default/``. A bundle is any folder with those two files.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .networks import NetworkConfig, WbmriNet, build_network

DEFAULT_MODEL_DIR = Path(__file__).parent / "default"
WEIGHTS = "model.safetensors"
CARD = "card.json"
RESULT_IDENTITY = ("sha256", "tta", "thresholds", "software")  # what, besides the input, decides a case's result


def result_identity(model: dict[str, Any]) -> dict[str, Any]:
    """The part of a report's ``model`` block that decides its result: weights, test-time augmentation (``none``
    for reports made before there was any), lesion rules and the software version (None for reports made before
    reports named it)."""
    return {key: model.get(key, "none" if key == "tta" else None) for key in RESULT_IDENTITY}


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class ModelBundle:
    net: WbmriNet
    config: NetworkConfig
    card: dict[str, Any]
    sha256: str
    path: Path

    @property
    def name(self) -> str:
        return str(self.card.get("name", self.path.name))

    @property
    def version(self) -> str:
        return str(self.card.get("version", "0"))

    @property
    def tta(self) -> str:
        """The test-time augmentation its lesion rules were chosen with (cards before it had none)."""
        return str((self.card.get("inference") or {}).get("tta", "none"))


def save_bundle(folder: Path, net: torch.nn.Module, config: NetworkConfig, card: dict[str, Any]) -> Path:
    """Write weights and card; the card records the weights' sha256 and the network config."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in net.state_dict().items()}
    save_file(state, str(folder / WEIGHTS))
    card = dict(card)
    card["network"] = json.loads(config.model_dump_json())
    card["weights_sha256"] = sha256_file(folder / WEIGHTS)
    (folder / CARD).write_text(json.dumps(card, indent=2) + "\n")
    return folder


def locate_bundle(folder: Path | str) -> Path:
    """A bundle folder as named in a config (``init: models/default``): as given, or, where that is relative and
    not there, under the repository root (so a config written in the repository works when run from elsewhere)."""
    folder = Path(folder)
    repo = DEFAULT_MODEL_DIR.parents[1]
    if not folder.is_absolute() and not folder.exists() and (repo / folder).exists():
        return repo / folder
    return folder


def load_card(folder: Path | None = None) -> dict[str, Any]:
    folder = Path(folder) if folder else DEFAULT_MODEL_DIR
    return json.loads((folder / CARD).read_text())


def load_bundle(folder: Path | None = None, verify: bool = True) -> ModelBundle:
    """Load a bundle (default: the shipped model) on the CPU, in eval mode."""
    folder = Path(folder) if folder else DEFAULT_MODEL_DIR
    if not (folder / WEIGHTS).is_file() or not (folder / CARD).is_file():
        raise FileNotFoundError(f"{folder} is not a model bundle (needs {WEIGHTS} and {CARD})")
    card = load_card(folder)
    digest = sha256_file(folder / WEIGHTS)
    if verify and card.get("weights_sha256") not in (None, digest):
        raise ValueError(f"{folder / WEIGHTS}: sha256 does not match the card (corrupt or replaced weights)")
    # cards before 1.1 had instance norm only; before 1.2 the site head read the pooled final feature map
    config = NetworkConfig(**{"norm": "instance", "sites_from": "final", **card["network"]})
    net = build_network(config)
    net.load_state_dict(load_file(str(folder / WEIGHTS)))
    net.eval()
    return ModelBundle(net=net, config=config, card=card, sha256=digest, path=folder)
