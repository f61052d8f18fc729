"""The anatomical site vocabulary (the contract's ``sites.tsv``): the single source of truth for site ids and codes."""
from __future__ import annotations

import csv
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

CONTRACT_DIR = Path(__file__).parent / "contract"
SITES_TSV = CONTRACT_DIR / "sites.tsv"
REPORT_SCHEMA = CONTRACT_DIR / "report.schema.json"

SOFT_TISSUE = "soft_tissue"
VERTEBRAL_LEVELS = tuple([f"vertebra_C{i}" for i in range(1, 8)] + [f"vertebra_T{i}" for i in range(1, 13)] +
                         [f"vertebra_L{i}" for i in range(1, 6)])          # site codes C1..L5, head to feet
# Bones a few millimetres thick, two voxels or fewer of the 3 mm model grid in a child: partial volume dilutes their
# bone probability, so the site map grows them down to a lower bone threshold (card ``thresholds.bone_thin``).
THIN_BONES = ("sternum", "clavicle", "ribs", "hand", "patella", "fibula", "toes")
REGIONS = ("head", "spine_cervical", "spine_thoracic", "spine_lumbar", "pelvis", "chest_wall",
           "shoulder", "upper_limb", "hand", "lower_limb", "foot")


@dataclass(frozen=True)
class Site:
    id: int
    code: str
    name: str
    region: str
    side: str
    kind: str

    @property
    def mirror_code(self) -> str | None:
        """Code of the contralateral site (``femur_left`` -> ``femur_right``), None for midline sites."""
        if self.side == "left":
            return self.code[: -len("_left")] + "_right"
        if self.side == "right":
            return self.code[: -len("_right")] + "_left"
        return None

    @property
    def bone(self) -> str:
        """Code without the side suffix (``femur_left`` -> ``femur``)."""
        for suffix in ("_left", "_right"):
            if self.code.endswith(suffix):
                return self.code[: -len(suffix)]
        return self.code


@lru_cache(maxsize=1)
def all_sites() -> tuple[Site, ...]:
    """Every site of the vocabulary, ordered by id (1..66)."""
    with open(SITES_TSV, newline="") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    sites = tuple(Site(int(r["id"]), r["code"], r["name"], r["region"], r["side"], r["kind"]) for r in rows)
    ids = [s.id for s in sites]
    if ids != list(range(1, len(sites) + 1)):
        raise ValueError(f"{SITES_TSV}: site ids must run 1..N without gaps")
    return sites


@lru_cache(maxsize=1)
def by_code() -> dict[str, Site]:
    return {s.code: s for s in all_sites()}


@lru_cache(maxsize=1)
def by_id() -> dict[int, Site]:
    return {s.id: s for s in all_sites()}


def site_id(code: str) -> int:
    """Id of a site code; raises KeyError with the list of valid codes."""
    try:
        return by_code()[code].id
    except KeyError:
        raise KeyError(f"unknown site code {code!r}") from None


@lru_cache(maxsize=1)
def mirror_ids() -> tuple[int, ...]:
    """For each label 0..n_sites(): the label of its left-right mirror image (``femur_left`` <-> ``femur_right``;
    background and midline sites map to themselves)."""
    return (0, *(site_id(s.mirror_code) if s.mirror_code else s.id for s in all_sites()))


@lru_cache(maxsize=1)
def thin_bone_ids() -> tuple[int, ...]:
    """Site ids of :data:`THIN_BONES` (both sides)."""
    return tuple(s.id for s in all_sites() if s.bone in THIN_BONES)


@lru_cache(maxsize=1)
def vertebral_level_ids() -> tuple[int, ...]:
    """Site ids of :data:`VERTEBRAL_LEVELS`, C1 to L5 (head to feet)."""
    return tuple(site_id(code) for code in VERTEBRAL_LEVELS)


def n_sites() -> int:
    """Number of sites (66); label maps use 0 for background and 1..n_sites()."""
    return len(all_sites())

