"""Safe NIfTI reading and atomic writing.

Every check that can be made from the header is made before the voxel data is read, so a hostile or broken
file is refused cheaply. Messages name the problem and never echo header free text (it may hold patient data).
"""
from __future__ import annotations

import gzip
import io
import json
import logging
import os
import secrets
import shutil
import struct
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Iterator, NamedTuple, Sequence

import nibabel as nib
import numpy as np

DEFAULT_MAX_VOXELS = 120_000_000  # about 480 MB as float32; a 2 mm adult whole body is under 40 M
MIN_EXTENT_MM = 24.0  # eight voxels of the 3 mm model grid: less is a crop, not a study
# Larger than any body: a tall adult's whole body is about 2,000 x 500 x 300 mm (300 L). A few voxels with a huge
# spacing pass the voxel budget but would be resampled to billions of model-grid voxels (tens of GB).
MAX_EXTENT_MM = 2500.0
MAX_FOV_LITRES = 1000.0


class InputError(ValueError):
    """A study that cannot be analysed; the message is safe to show to the user and to log."""


@dataclass(frozen=True)
class Volume:
    """A validated 3D volume: float32 voxels and the affine to RAS+ world millimetres."""
    data: np.ndarray
    affine: np.ndarray

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(float(v) for v in np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0)))

    @property
    def orientation(self) -> str:
        return "".join(nib.aff2axcodes(self.affine))


@contextmanager
def _nibabel_quiet() -> Iterator[None]:
    """Keep nibabel's header notes (for example "pixdim[1,2,3] should be non-zero; setting 0 dims to 1", about a size
    the sform makes unused, or "data code 999 not recognized", logged as an error) off stderr: what wbmri refuses,
    it says itself, in one line."""
    log = logging.getLogger("nibabel.global")
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        log.setLevel(level)


def header_from_bytes(head: bytes) -> tuple[tuple[int, ...], np.ndarray, np.dtype, int]:
    """Parse a NIfTI-1/2 single-file header: (shape, affine, dtype, data offset). Raises InputError."""
    if len(head) < 348:
        raise InputError("not a readable NIfTI file (too short for a NIfTI header)")
    sizes = {struct.unpack(e + "i", head[:4])[0] for e in "<>"}
    if 348 in sizes:
        magic = head[344:348]
        if magic == b"ni1\x00":
            raise InputError("not a single-file NIfTI: a .hdr/.img pair is not accepted; convert it to .nii")
        if magic != b"n+1\x00":
            raise InputError("not a readable NIfTI file (no NIfTI-1 magic)")
        klass, size = nib.Nifti1Header, 348
    elif 540 in sizes and len(head) >= 540 and head[4:8] == b"n+2\x00":
        klass, size = nib.Nifti2Header, 540
    else:
        raise InputError("not a readable NIfTI file (no NIfTI-1 or NIfTI-2 header)")
    try:
        raw = klass.from_fileobj(io.BytesIO(head[:size]), check=False)
    except Exception as exc:  # nibabel raises several types for broken headers
        raise InputError(f"not a readable NIfTI header ({type(exc).__name__})") from None
    _check_raw_spacing(raw)  # before the checked read, which would set zero sizes to 1 mm (and say so on stderr)
    try:
        with _nibabel_quiet():
            hdr = klass.from_fileobj(io.BytesIO(head[:size]), check=True)
        shape = tuple(int(s) for s in hdr.get_data_shape())
        dtype = hdr.get_data_dtype()
        offset = int(hdr.get_data_offset())
        affine = hdr.get_best_affine()
    except Exception as exc:  # nibabel raises several types for broken headers
        raise InputError(f"not a readable NIfTI header ({type(exc).__name__})") from None
    if any(s < 1 for s in shape):
        raise InputError(f"header dimensions {shape} are invalid")
    return shape, affine, dtype, max(offset, size)


def _inflate(path: Path, keep: int) -> bytes:
    """The first ``keep`` bytes of a gzip file's inflated stream, read to its end, so that a truncated or corrupt
    stream is refused (by its length and CRC) before nibabel meets it; the file is inflated once, not twice."""
    chunks, kept = [], 0
    try:
        with gzip.open(path, "rb") as fh:
            while chunk := fh.read(1 << 22):
                if kept < keep:
                    chunks.append(chunk[: keep - kept])
                    kept += len(chunks[-1])
    except (OSError, EOFError, zlib.error) as exc:
        raise InputError(f"corrupt or truncated gzip stream ({type(exc).__name__})") from None
    return b"".join(chunks)


def _read_head(path: Path, gz: bool) -> bytes:
    """The first bytes of the (inflated) file: enough for a NIfTI-1 or NIfTI-2 header."""
    try:
        with (gzip.open if gz else open)(path, "rb") as fh:
            return fh.read(540)
    except (OSError, EOFError, zlib.error) as exc:
        raise InputError(f"corrupt or truncated gzip stream ({type(exc).__name__})") from None


def _check_raw_spacing(raw: nib.Nifti1Header) -> None:
    """nibabel silently turns zero pixdim into 1 mm on load; refuse a header (read unchecked) whose affine would be
    built from such a pixdim, instead of guessing: the qform's and the fallback affine's voxel sizes are pixdim's,
    only a valid sform (code above 0) does without them."""
    pixdim = np.asarray(raw["pixdim"][1:4], float)
    if int(raw["sform_code"]) == 0 and np.any(pixdim <= 0):
        raise InputError(f"voxel spacing {tuple(round(float(z), 4) for z in pixdim)} mm is zero or negative")


def parsed_header(shape: tuple[int, ...], affine: np.ndarray, dtype: np.dtype) -> SimpleNamespace:
    """What :func:`header_from_bytes` read, in the form :func:`check_header` takes (an image's shape, affine and
    voxel type), so that a header is checked before its voxels arrive."""
    return SimpleNamespace(shape=shape, affine=affine, get_data_dtype=lambda: dtype)


def check_header(img: nib.Nifti1Image, max_voxels: int = DEFAULT_MAX_VOXELS) -> tuple[int, int, int]:
    """Validate shape, dimensionality, voxel budget and spacing from the header alone; return the 3D shape."""
    shape = tuple(int(s) for s in img.shape)
    if len(shape) < 3:
        raise InputError(f"image is {len(shape)}D (shape {shape}); a 3D volume is required")
    if len(shape) > 3:
        extra = shape[3:]
        if any(s != 1 for s in extra):
            raise InputError(f"image is 4D with {int(np.prod(extra))} volumes (shape {shape}); give one 3D volume")
        shape = shape[:3]
    if min(shape) < 2:
        raise InputError(f"image shape {shape} has an axis of length 1: a 2D slice, not a volume")
    dtype = np.dtype(img.get_data_dtype())
    if dtype.names or dtype.kind not in "iuf":  # RGB24 / RGBA32 (fields), complex, boolean
        kind = "colour (RGB)" if dtype.names else {"c": "complex", "b": "boolean"}.get(dtype.kind, str(dtype))
        raise InputError(f"voxels are {kind} values, not grey-scale intensities: give the STIR or T2 fat-suppressed "
                         "series itself (a screenshot or colour export cannot be analysed)")
    n = int(np.prod(shape, dtype=np.int64))
    if n > max_voxels:
        raise InputError(f"image has {n:,} voxels (shape {shape}), over the budget of {max_voxels:,}")
    affine = img.affine
    if affine is None or not np.all(np.isfinite(affine)):
        raise InputError("header affine is missing or not finite")
    header = getattr(img, "header", None)
    if header is not None and int(header["qform_code"]) == 0 and int(header["sform_code"]) == 0:
        raise InputError("the header holds no orientation (qform and sform codes are both 0), so left and right "
                         "cannot be told apart; export the study again with its orientation (dcm2niix writes it)")
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    if np.any(zooms <= 1e-6) or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise InputError(f"voxel spacing {tuple(round(float(z), 4) for z in zooms)} mm is zero or degenerate")
    if np.any(zooms > 50):
        raise InputError(f"voxel spacing {tuple(round(float(z), 2) for z in zooms)} mm is implausible (> 50 mm)")
    extent = np.asarray(shape, float) * zooms
    if np.any(extent < MIN_EXTENT_MM):
        raise InputError(f"the field of view is {' x '.join(f'{e:.0f}' for e in extent)} mm: too small to analyse "
                         f"(at least {MIN_EXTENT_MM:g} mm along every axis)")
    litres = float(np.prod(extent)) / 1e6
    if np.any(extent > MAX_EXTENT_MM) or litres > MAX_FOV_LITRES:
        raise InputError(f"the field of view is {' x '.join(f'{e:.0f}' for e in extent)} mm ({litres:,.0f} L): "
                         f"larger than any body (at most {MAX_EXTENT_MM:g} mm along an axis and {MAX_FOV_LITRES:g} L); "
                         "check the voxel spacing in the header")
    return shape  # type: ignore[return-value]


def load_volume(source: str | os.PathLike | nib.Nifti1Pair, max_voxels: int = DEFAULT_MAX_VOXELS,
                label: bool = False) -> Volume:
    """Read and validate a NIfTI-1/2 file (or an in-memory image) into a :class:`Volume`. A ``label`` map may be
    constant (a lesion-free case's edema mask is all zero); an image may not."""
    if isinstance(source, nib.Nifti1Pair):  # NIfTI-1 and -2, single file or pair
        data, affine = _voxels(source, max_voxels)
    elif isinstance(source, nib.spatialimages.SpatialImage):
        raise InputError(f"a {type(source).__name__} is not a NIfTI image: save it as .nii.gz (nibabel: "
                         "nib.save(nib.Nifti1Image(img.get_fdata(), img.affine), 'scan.nii.gz')) or pass the file's path")
    else:
        data, affine = _read_file(Path(source), max_voxels)
    if not np.all(np.isfinite(data)):
        bad = int(np.count_nonzero(~np.isfinite(data)))
        raise InputError(f"image holds {bad:,} NaN or infinite voxels")
    if not label and float(data.max()) <= float(data.min()):
        raise InputError("image is constant (e.g. all zero): nothing to analyse")
    return Volume(data=data, affine=affine)


class _Header(NamedTuple):
    """What :func:`_checked_header` reads from a file's first bytes."""
    head: bytes
    gz: bool
    shape: tuple[int, int, int]  # 3D, checked
    affine: np.ndarray
    dtype: np.dtype
    offset: int


def _checked_header(path: Path, max_voxels: int) -> _Header:
    """The file's first bytes, whether it is gzipped, its checked 3D shape, affine, data type and data offset, from
    the header alone."""
    if not path.is_file():
        raise InputError(f"no such file: {path.name}")
    with open(path, "rb") as fh:
        gz = fh.read(2) == b"\x1f\x8b"
    head = _read_head(path, gz)
    shape, affine, dtype, offset = header_from_bytes(head)  # a small gzip file can inflate to a huge volume
    return _Header(head, gz, check_header(parsed_header(shape, affine, dtype), max_voxels), affine, dtype, offset)


def read_grid(path: str | os.PathLike, max_voxels: int = DEFAULT_MAX_VOXELS) -> tuple[tuple[int, int, int], np.ndarray]:
    """Shape and affine of a NIfTI file with :func:`load_volume`'s header checks, without reading its voxels."""
    header = _checked_header(Path(path), max_voxels)
    return header.shape, np.asarray(header.affine, dtype=np.float64)


def _read_file(path: Path, max_voxels: int) -> tuple[np.ndarray, np.ndarray]:
    """Voxels and affine of a NIfTI file, every header check made before the voxel data is read or inflated. The
    file is read for what it holds, whatever its name says (a gzip file named .nii, a plain one named .nii.gz)."""
    head, gz, shape, _, dtype, offset = _checked_header(path, max_voxels)
    keep = offset + int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize + (1 << 16)  # a margin for
    if gz:                                                          # headers whose data starts past their offset
        raw = _inflate(path, keep)
    else:
        with open(path, "rb") as fh:
            raw = fh.read(keep)
    image_class = nib.Nifti2Image if head[4:8] == b"n+2\x00" else nib.Nifti1Image
    with _nibabel_quiet():
        try:
            img = image_class.from_bytes(raw)
        except Exception as exc:  # nibabel raises many types for broken files
            raise InputError(f"not a readable NIfTI file ({type(exc).__name__})") from None
        return _voxels(img, max_voxels)


def _voxels(img: nib.Nifti1Image, max_voxels: int) -> tuple[np.ndarray, np.ndarray]:
    shape = check_header(img, max_voxels)
    try:
        data = np.asarray(img.dataobj, dtype=np.float32).reshape(shape)
    except Exception as exc:
        raise InputError(f"voxel data could not be read ({type(exc).__name__}: file truncated?)") from None
    return data, np.asarray(img.affine, dtype=np.float64)


NIFTI_SUFFIXES = (".nii.gz", ".nii")  # the longer first; file names are matched in lower case


def case_name(path: str | os.PathLike) -> str:
    """A study's name as the output contract names its folder: the file name without .nii / .nii.gz (any case);
    ``study`` for a file named only that. Scripts and evaluations read ``OUT/<name>/``: no other rule applies to
    a single input (several inputs of one name: :func:`case_names`)."""
    name = Path(path).name
    for ext in NIFTI_SUFFIXES:
        if name.lower().endswith(ext):
            name = name[: -len(ext)]
            break
    return name or "study"


def case_names(paths: Sequence[str | os.PathLike]) -> list[str]:
    """The names of several inputs (:func:`case_name`). Inputs that share one (the phantom layout
    ``CASE/image.nii.gz``, or ``a/scan.nii`` and ``b/scan.nii``), which the contract would put in one folder, are
    named by their folders instead when that tells every one of them apart from all other inputs; otherwise they
    keep the shared name (``wbmri predict`` refuses them, ``wbmri submit`` numbers them)."""
    names = [case_name(p) for p in paths]
    folders = [Path(p).parent.name for p in paths]
    out = list(names)
    for shared in {n for n in names if names.count(n) > 1}:
        members = [i for i, n in enumerate(names) if n == shared]
        mine = [folders[i] for i in members]
        if all(f not in ("", ".", "..") and folders.count(f) == 1 and f not in names for f in mine):
            for i in members:
                out[i] = folders[i]
    return out


RESULT_FILES = ("report.json", "lesions.nii.gz", "sites.nii.gz", "overlay.png")  # OUT/<case>/ of the output contract


def saved_report(folder: Path) -> dict | None:
    """The report.json of a result folder, None without a readable one."""
    try:
        return json.loads((folder / "report.json").read_text())
    except (OSError, ValueError):
        return None


def check_replaceable(folder: Path) -> dict | None:
    """Refuse to replace ``folder`` unless it is absent or an earlier result: a readable report.json and nothing but
    the contract's files. Anything else (the input scans themselves when --out is their folder, a user's own files)
    is not wbmri's to delete: FileExistsError, and nothing is written. Returns the earlier result's report (None
    without a folder)."""
    if not folder.exists():
        return None
    if not folder.is_dir():
        raise FileExistsError(f"{folder} is a file, not a result folder: nothing was written over it")
    other = sorted(p.name for p in folder.iterdir() if p.name not in RESULT_FILES)
    report = saved_report(folder)
    if other or report is None:
        held = ", ".join(other[:3]) + (" ..." if len(other) > 3 else "") if other else "no readable report.json"
        raise FileExistsError(f"{folder} exists and is not a wbmri result ({held}), so it was left as it is and this "
                              "case was not written: give another output folder (not the inputs' own)")
    return report


@contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary sibling folder that replaces ``final`` only when the block succeeds."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    while True:  # not tempfile.mkdtemp, whose folders are 0700 whatever the umask: results are for others to read
        tmp = final.parent / f".{final.name}.{secrets.token_hex(4)}.partial"
        try:
            tmp.mkdir()
            break
        except FileExistsError:
            continue
    try:
        yield tmp
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise



@contextmanager
def result_dir(final: Path) -> Iterator[Path]:
    """:func:`atomic_dir` for a case's result folder (``OUT/<case>/``): what is at ``final`` is replaced only when it is
    an earlier result (:func:`check_replaceable`)."""
    check_replaceable(Path(final))
    with atomic_dir(final) as tmp:
        yield tmp

def save_nifti(path: Path, data: np.ndarray, affine: np.ndarray, dtype: type | None = None) -> None:
    """Write a NIfTI-1 file (gzip when the name ends in .gz) with a clean header: no free text is copied."""
    arr = np.asarray(data if dtype is None else data.astype(dtype, copy=False))
    img = nib.Nifti1Image(arr, affine)
    img.header.set_xyzt_units("mm", "sec")
    img.header.set_qform(affine, code=1)
    img.header.set_sform(affine, code=1)
    nib.save(img, str(path))
