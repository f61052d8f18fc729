"""A labelled dataset in nnU-Net raw layout, read and checked before training sees it.

``DIR/dataset.json``, ``DIR/imagesTr/NAME_0000.nii.gz`` (one channel: the STIR or T2 fat-suppressed image),
``DIR/labelsTr/NAME.nii.gz`` (0 background, > 0 edema; lesion ids allowed), optional ``DIR/sitesTr/NAME.nii.gz``
(ids of ``models/contract/sites.tsv``) and ``DIR/physisTr/NAME.nii.gz`` (growth plates, > 0). Every problem of every
case is collected and reported together, each with its file, so a user fixes a dataset in one pass.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import nibabel as nib
import numpy as np

from models.lesions import lesion_ids
from models.nifti import InputError, Volume, load_volume, read_grid
from models.sites import all_sites
from training.evaluate import AFFINE_TOL

ENDINGS = (".nii.gz", ".nii")
TARGETS = (("edema", "labelsTr"), ("sites", "sitesTr"), ("physis", "physisTr"))
_CHANNEL = re.compile(r"^(?P<name>.+)_(?P<channel>\d{4})$")
_MAX_LISTED = 20


class DatasetError(ValueError):
    """A dataset that cannot be trained on as it is; the message lists every problem with its file."""


@dataclass(frozen=True)
class CaseFiles:
    name: str
    image: Path
    targets: dict[str, Path]  # the target files that exist (always "edema")

    @property
    def sources(self) -> list[Path]:
        return [self.image, *self.targets.values()]


def _ending(path: Path) -> str | None:
    return next((e for e in ENDINGS if path.name.endswith(e)), None)


def raise_problems(problems: list[str], heading: str) -> None:
    """A :class:`DatasetError` listing the problems (the first 20) under ``heading``; nothing if there are none."""
    if problems:
        listed = problems[:_MAX_LISTED] + ([f"... and {len(problems) - _MAX_LISTED} more"]
                                           if len(problems) > _MAX_LISTED else [])
        raise DatasetError(f"{heading}:\n  " + "\n  ".join(listed))


REQUIRED_KEYS = ("channel_names", "labels", "file_ending")  # nnU-Net v2's (v1's "modality" for channel_names)


def _as_v2(ds: dict) -> dict:
    """An nnU-Net v1 dataset.json (``modality``, ``labels`` from values to names such as {"0": "background", "1":
    "edema"}, no ``file_ending``: always .nii.gz) in v2's terms; a v2 file as it is."""
    if "modality" not in ds or "channel_names" in ds:
        return ds
    out = {**ds, "channel_names": ds["modality"]}
    labels = ds.get("labels")
    if isinstance(labels, dict) and labels and all(str(k).isdigit() for k in labels):
        out["labels"] = {str(name): int(value) for value, name in labels.items()}
    out.setdefault("file_ending", ".nii.gz")
    return out


def dataset_json_problems(folder: Path) -> tuple[dict, list[str]]:
    """The parsed ``dataset.json`` (empty when unreadable) and what in it wbmri cannot follow."""
    path = folder / "dataset.json"
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        return {}, [f"not valid JSON ({exc.msg} at line {exc.lineno})"]
    if not isinstance(ds, dict):
        return {}, ["must hold a JSON object"]
    ds = _as_v2(ds)
    problems = [f"no {key!r} key (nnU-Net's dataset.json names {', '.join(REQUIRED_KEYS)})"
                for key in REQUIRED_KEYS if key not in ds]
    if "labels" in ds and not isinstance(ds["labels"], dict):
        problems.append("'labels' must map class names to values, e.g. {\"background\": 0, \"edema\": 1}")
    ending = ds.get("file_ending", ".nii.gz")
    if ending not in ENDINGS:
        problems.append(f"file_ending {ending!r}: wbmri reads NIfTI ({' or '.join(ENDINGS)})")
    channels = ds.get("channel_names")  # v1's modality, after _as_v2
    if isinstance(channels, dict) and len(channels) != 1:
        problems.append(f"channel_names has {len(channels)} channels: wbmri uses one image (STIR or T2 "
                        "fat-suppressed) as NAME_0000")
    labels = ds.get("labels")
    if isinstance(labels, dict):
        foreground = {k: v for k, v in labels.items() if v not in (0, "0") and k != "background"}
        if len(foreground) > 1:
            problems.append(f"labels declares {len(foreground)} foreground classes ({', '.join(foreground)}): "
                            "labelsTr must hold edema only (0 background, > 0 edema or lesion ids); bone sites go "
                            "in sitesTr")
    return ds, problems


def check_dataset_json(folder: Path) -> dict:
    """The parsed ``dataset.json``, refused where it declares what wbmri cannot train on."""
    ds, problems = dataset_json_problems(folder)
    raise_problems(problems, f"{folder / 'dataset.json'}: {len(problems)} problem(s)")
    return ds


def dataset_files(folder: Path) -> list[CaseFiles]:
    """Every case of the dataset with its files; a misnamed image or a missing label is an error."""
    folder = Path(folder)
    if not (folder / "dataset.json").is_file() or not (folder / "imagesTr").is_dir():
        raise FileNotFoundError(f"{folder}: not an nnU-Net raw dataset (needs dataset.json and imagesTr/)")
    ds, json_problems = dataset_json_problems(folder)
    problems, cases = [f"dataset.json: {p}" for p in json_problems], []
    names = set()  # every case imagesTr has an image of: NAME of NAME_0000.nii.gz (any channel), a misnamed stem
    for path in sorted((folder / "imagesTr").iterdir()):
        if path.name.startswith("."):  # .DS_Store and the like
            continue
        ending = _ending(path)
        if ending is None:
            lower = next((e for e in ENDINGS if path.name.lower().endswith(e)), None)
            problems.append(f"imagesTr/{path.name}: " + (f"name the file's ending in lower case ({lower})" if lower else
                            f"not a NIfTI file ({' or '.join(ENDINGS)}); convert it, or move it out of imagesTr"))
            continue
        match = _CHANNEL.match(path.name[: -len(ending)])
        names.add(match["name"] if match else path.name[: -len(ending)])
        if match is None:
            problems.append(f"imagesTr/{path.name}: images are named NAME_0000{ending} (nnU-Net channel suffix)")
            continue
        if match["channel"] != "0000":
            problems.append(f"imagesTr/{path.name}: a second channel; wbmri uses one image per case (_0000)")
            continue
        name = match["name"]
        targets = {key: folder / sub / f"{name}{ending}" for key, sub in TARGETS}
        if not targets["edema"].is_file():
            problems.append(f"labelsTr/{name}{ending}: missing (the label of imagesTr/{path.name})")
            continue
        cases.append(CaseFiles(name, path, {k: p for k, p in targets.items() if p.is_file()}))
    for _, sub in TARGETS:  # a label whose image is missing would silently drop out of training
        for path in sorted((folder / sub).glob("*")) if (folder / sub).is_dir() else []:
            ending = _ending(path)
            if ending and path.name[: -len(ending)] not in names:
                problems.append(f"{sub}/{path.name}: no image imagesTr/{path.name[: -len(ending)]}_0000{ending}")
    stated = ds.get("numTraining")
    if isinstance(stated, int) and stated != len(names):
        problems.append(f"dataset.json: numTraining is {stated}, imagesTr/ holds the images of {len(names)} cases")
    raise_problems(problems, f"{folder}: {len(problems)} problem(s) with the dataset's files")
    if not cases:
        raise DatasetError(f"{folder}: imagesTr/ holds no NAME_0000.nii.gz image")
    return cases


def _on_image_grid(label: Volume, shape: tuple[int, ...], affine: np.ndarray) -> np.ndarray:
    """The label's voxels in the voxel order of the image's grid (``shape``, ``affine``); an error unless both
    cover the same grid (a label saved in another axis order, e.g. LPS against RAS, is reordered)."""
    transform = nib.orientations.ornt_transform(nib.orientations.io_orientation(label.affine),
                                                nib.orientations.io_orientation(affine))
    data = nib.orientations.apply_orientation(label.data, transform)
    label_affine = label.affine @ nib.orientations.inv_ornt_aff(transform, label.data.shape)
    if data.shape != tuple(shape):
        raise InputError(f"shape {label.data.shape} does not match the image's {tuple(shape)}")
    if not np.allclose(label_affine, affine, atol=AFFINE_TOL):
        sizes = [np.sqrt((a[:3, :3] ** 2).sum(axis=0)) for a in (label_affine, affine)]
        if not np.allclose(*sizes, atol=AFFINE_TOL):
            raise InputError("its voxel spacing ({}) mm is not the image's ({}) mm".format(
                *(", ".join(f"{v:.4g}" for v in z) for z in sizes)))
        shift = float(np.abs(label_affine[:3, 3] - affine[:3, 3]).max())
        raise InputError(f"its voxel grid is not the image's (affines differ; origins {shift:.1f} mm apart)")
    return data


def _integer_labels(data: np.ndarray) -> np.ndarray:
    rounded = np.rint(data)
    off = np.abs(data - rounded) > 0.01
    if off.any():
        raise InputError(f"label values must be whole numbers; {int(off.sum()):,} voxels are not "
                         f"(e.g. {float(data[off][0]):.3g})")
    return rounded.astype(np.int64)


def _in_file(path: Path, read: Callable[[], Any]) -> Any:
    """``read()``, with an :class:`InputError` prefixed by the file's folder and name."""
    try:
        return read()
    except InputError as exc:
        raise InputError(f"{path.parent.name}/{path.name}: {exc}") from None


def read_labels(case: CaseFiles, shape: tuple[int, ...], affine: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Lesion ids (1..K; :func:`lesion_ids`), sites and physis (None where absent) on the image's grid."""
    out: dict[str, np.ndarray | None] = {"sites": None, "physis": None}
    problems = []
    for key, path in case.targets.items():  # every file of the case is checked: all its problems come at once
        try:
            vol = _in_file(path, lambda: load_volume(path, label=True))
            data = _in_file(path, lambda: _integer_labels(_on_image_grid(vol, shape, affine)))
        except InputError as exc:
            problems.append(str(exc))
            continue
        if key == "sites":
            known = max(s.id for s in all_sites())
            bad = (data < 0) | (data > known)
            if bad.any():
                problems.append(f"{path.parent.name}/{path.name}: site ids must be 0..{known} "
                                f"(models/contract/sites.tsv); found {sorted(set(data[bad].tolist()))[:5]}")
                continue
            out[key] = data.astype(np.uint8)
        elif key == "physis":
            out[key] = (data > 0).astype(np.uint8)
        else:
            out[key] = lesion_ids(data)
    if problems:
        raise InputError("; ".join(problems))
    return out["edema"], out["sites"], out["physis"]


def read_case(case: CaseFiles) -> tuple[Volume, np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Image, lesion ids, sites and physis (:func:`read_labels`) on the image's grid; an :class:`InputError`
    naming the file otherwise."""
    image = _in_file(case.image, lambda: load_volume(case.image, label=False))
    return image, *read_labels(case, image.data.shape, image.affine)


def write_references(folder: Path, out: Path) -> dict[str, Path]:
    """The dataset's labels as reference case folders for ``wbmri evaluate`` (``OUT/NAME/lesions.nii.gz`` on the
    image's grid: a binary label split into 26-connected lesions, lesion ids kept; ``sites.nii.gz`` where sitesTr
    has one). Returns each case's image path by name; every problem of a label or an image header is listed
    before anything is predicted (an image's voxels are checked when it is predicted)."""
    from models.nifti import atomic_dir, save_nifti
    cases = dataset_files(folder)
    images, problems = {}, []
    # staged beside OUT, which it replaces (references of an earlier run, perhaps of cases removed since, would be
    # scored too) only when every case passes: a refused dataset leaves the earlier references as they were
    with atomic_dir(Path(out)) as staged:
        for case in cases:
            try:  # the image's voxels are read once, when it is predicted
                shape, affine = _in_file(case.image, lambda: read_grid(case.image))
                lesions, sites, _ = read_labels(case, shape, affine)
            except InputError as exc:
                problems.append(str(exc))
                continue
            dst = staged / case.name
            dst.mkdir()
            save_nifti(dst / "lesions.nii.gz", lesions, affine, np.uint16 if lesions.max() < 2**16 else np.int32)
            if sites is not None:
                save_nifti(dst / "sites.nii.gz", sites, affine, np.uint8)
            images[case.name] = case.image
        raise_problems(problems, f"{folder}: {len(problems)} of {len(cases)} cases cannot be scored")
    return images
