"""Receiving an upload: multipart parsed while streaming, size limit enforced on the way in, the NIfTI header and
the gzip stream checked as the bytes arrive, so a bad or oversized study is refused before it is all read.

The voxel data itself (NaN, constant image) is checked later, in the job, by :func:`models.nifti.load_volume`.
"""
from __future__ import annotations

import errno
import os
import re
import secrets
import sqlite3
import struct
import unicodedata
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator

import nibabel as nib
import numpy as np

from models.nifti import InputError, check_header, header_from_bytes, parsed_header

# The names (without suffixes) of the files in incoming/ that this process is still receiving or checking: the
# store's clean-up leaves them alone however long a client pauses (``done_staging`` ends it)
STAGING: set[str] = set()
NO_SPACE_MESSAGE = ("the server has no space left to store the study; nothing was kept: retry later, or tell its "
                    "operator (the data folder's disk is full)")

try:  # python-multipart >= 0.0.13
    from python_multipart.multipart import MultipartParser, parse_options_header
except ImportError:  # pragma: no cover - older releases
    from multipart.multipart import MultipartParser, parse_options_header  # type: ignore[no-redef]

FIELD = "file"
HEADER_BYTES = 540  # NIfTI-2 header; NIfTI-1 needs 348
MULTIPART_SLACK = 64 * 1024  # boundary lines and part headers on top of the file itself
TRAILING_SLACK = 16 * 1024 * 1024  # bytes past the voxel data tolerated before a file counts as a bomb
FLUSH_BYTES = 1 << 20


class UploadRejected(Exception):
    """An upload refused with an HTTP status and a message safe to show."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class Received:
    """A fully received upload that passed the streaming checks, staged under ``incoming/``."""
    path: Path
    filename: str
    ext: str
    size_bytes: int
    shape: list[int]


def new_job_id() -> str:
    return secrets.token_hex(16)


def sanitise_filename(name: str | None) -> str:
    """A display-only base name: no directories, no control or odd characters, at most 128 characters."""
    base = re.split(r"[\\/]", name or "")[-1]
    base = unicodedata.normalize("NFKC", base)
    base = re.sub(r"[^A-Za-z0-9._()+\- ]", "_", base).strip(" .")
    if len(base) > 128:
        base = base[:60] + "..." + base[-65:]
    return base or "study.nii.gz"


class NiftiStreamCheck:
    """Fed the upload's bytes in order: detects gzip, inflates it incrementally (catching corrupt or truncated
    streams and decompression bombs) and validates the header as soon as it has arrived."""

    def __init__(self, max_voxels: int):
        self.max_voxels = max_voxels
        self.gz: bool | None = None
        self._inflate: zlib._Decompress | None = None  # type: ignore[name-defined]
        self._first = b""
        self.head = b""
        self.raw_size = 0
        self.size = 0  # uncompressed bytes
        self.shape: tuple[int, ...] | None = None
        self.expected: int | None = None

    @property
    def n_voxels(self) -> int:
        return int(np.prod(self.shape[:3], dtype=np.int64)) if self.shape and len(self.shape) >= 3 else 0

    def feed(self, data: bytes) -> None:
        if not data:
            return
        self.raw_size += len(data)
        if self.gz is None:
            self._first += data
            if len(self._first) < 2:
                return
            data, self._first = self._first, b""
            self.gz = data[:2] == b"\x1f\x8b"
            if self.gz:
                self._inflate = zlib.decompressobj(wbits=31)
        if self.gz:
            self._inflate_chunk(data)
        else:
            self._plain(data)

    def _inflate_chunk(self, data: bytes) -> None:
        while data:
            assert self._inflate is not None
            if self._inflate.eof:  # a further gzip member (concatenated gzip) or zero padding
                data = data.lstrip(b"\x00")
                if not data:
                    return
                if not b"\x1f\x8b".startswith(data[:2]):
                    raise InputError("corrupt or truncated gzip stream (trailing garbage)")
                self._inflate = zlib.decompressobj(wbits=31)
            try:
                out = self._inflate.decompress(data, 1 << 22)
            except zlib.error:
                raise InputError("corrupt or truncated gzip stream (error)") from None
            self._plain(out)
            data = self._inflate.unused_data if self._inflate.eof else self._inflate.unconsumed_tail

    def _plain(self, data: bytes) -> None:
        self.size += len(data)
        if self.shape is None:
            self.head += data[: HEADER_BYTES - len(self.head)]
            if len(self.head) >= HEADER_BYTES or (len(self.head) >= 348 and self._is_nifti1()):
                self._check_header()
        if self.expected is not None and self.size > self.expected + TRAILING_SLACK:
            raise InputError(f"the file holds more than {self.expected + TRAILING_SLACK:,} bytes, far more than its "
                             f"header describes ({self.expected:,})")

    def _is_nifti1(self) -> bool:
        return 348 in {struct.unpack(e + "i", self.head[:4])[0] for e in "<>"}

    def _check_header(self) -> None:
        shape, affine, dtype, offset = header_from_bytes(self.head)
        self.shape = shape
        check_header(parsed_header(shape, affine, dtype), self.max_voxels)
        n = int(np.prod(shape, dtype=np.int64))
        self.expected = offset + n * int(dtype.itemsize)

    def finish(self) -> tuple[int, ...]:
        """Final checks once the whole file arrived; returns the header shape."""
        if self.gz is None:
            raise InputError("the uploaded file is empty" if self.raw_size == 0 else
                             "not a readable NIfTI file (too short for a NIfTI header)")
        if self.gz:
            assert self._inflate is not None
            if not self._inflate.eof:
                raise InputError("corrupt or truncated gzip stream (EOFError)")
        if self.shape is None:
            if len(self.head) >= 348:
                self._check_header()
            else:
                raise InputError("not a readable NIfTI file (too short for a NIfTI header)")
        assert self.expected is not None
        if self.size < self.expected:
            raise InputError(f"voxel data is truncated: the file holds {self.size:,} of the {self.expected:,} bytes "
                             "its header describes")
        return self.shape  # type: ignore[return-value]


def status_for(exc: InputError, check: NiftiStreamCheck) -> int:
    """413 when the header is over the voxel budget, 422 for every other bad input."""
    return 413 if check.n_voxels > check.max_voxels else 422


class _Parts:
    """Collects multipart callbacks: the part headers and the file part's data pieces."""

    def __init__(self) -> None:
        self.headers: dict[str, str] = {}
        self._field = b""
        self._value = b""
        self.in_file = False
        self.seen_file = False
        self.filename: str | None = None
        self.pieces: list[bytes] = []
        self.header_bytes = 0

    def callbacks(self) -> dict:
        return {"on_part_begin": self._begin, "on_header_field": self._hfield, "on_header_value": self._hvalue,
                "on_header_end": self._hend, "on_headers_finished": self._hdone, "on_part_data": self._data,
                "on_part_end": self._end}

    def _begin(self) -> None:
        self.headers, self.in_file = {}, False

    def _hfield(self, data: bytes, start: int, end: int) -> None:
        self._field += data[start:end]
        self._grow(end - start)

    def _hvalue(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]
        self._grow(end - start)

    def _grow(self, n: int) -> None:
        self.header_bytes += n
        if self.header_bytes > MULTIPART_SLACK:
            raise UploadRejected(400, "multipart part headers are too large")

    def _hend(self) -> None:
        self.headers[self._field.decode("latin-1").strip().lower()] = self._value.decode("latin-1").strip()
        self._field, self._value = b"", b""

    def _hdone(self) -> None:
        _, opts = parse_options_header(self.headers.get("content-disposition", ""))
        if opts.get(b"name") == FIELD.encode() and not self.seen_file:
            self.in_file = self.seen_file = True
            raw = opts.get(b"filename")
            self.filename = raw.decode("utf-8", "replace") if raw is not None else None

    def _data(self, data: bytes, start: int, end: int) -> None:
        if self.in_file:
            self.pieces.append(bytes(data[start:end]))

    def _end(self) -> None:
        self.in_file = False


def boundary_of(content_type: str) -> bytes:
    ctype, opts = parse_options_header(content_type)
    boundary = opts.get(b"boundary")
    if ctype != b"multipart/form-data" or not boundary:
        raise UploadRejected(415, f"send the study as multipart/form-data with a '{FIELD}' file field")
    if len(boundary) > 200:
        raise UploadRejected(400, "multipart boundary is too long")
    return boundary


async def receive(stream: AsyncIterator[bytes], content_type: str, incoming: Path, max_bytes: int,
                  max_voxels: int) -> Received:
    """Stream a multipart body into ``incoming/<random>.part``, checking size and NIfTI content on the way.
    Raises :class:`UploadRejected` (status + message); nothing is left behind on refusal."""
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import ClientDisconnect
    parts = _Parts()
    parser = MultipartParser(boundary_of(content_type), parts.callbacks())
    check = NiftiStreamCheck(max_voxels)
    staged = incoming / f"{secrets.token_hex(16)}.part"
    STAGING.add(staged.stem)
    fh = open(staged, "wb")
    total = written = 0
    pending: list[bytes] = []
    pending_n = 0

    def flush(chunks: list[bytes]) -> None:
        for c in chunks:
            check.feed(c)
            fh.write(c)

    try:
        try:
            async for chunk in stream:
                total += len(chunk)
                if total > max_bytes + MULTIPART_SLACK:
                    raise UploadRejected(413, f"upload is larger than the limit of {max_bytes / 2**20:,.0f} MB")
                parser.write(chunk)
                if parts.pieces:
                    n = sum(len(p) for p in parts.pieces)
                    written += n
                    if written > max_bytes:
                        raise UploadRejected(413, f"upload is larger than the limit of {max_bytes / 2**20:,.0f} MB")
                    pending += parts.pieces
                    pending_n += n
                    parts.pieces = []
                    if pending_n >= FLUSH_BYTES:
                        await run_in_threadpool(flush, pending)
                        pending, pending_n = [], 0
            parser.finalize()
            if parts.pieces:
                pending += parts.pieces
                written += sum(len(p) for p in parts.pieces)
            await run_in_threadpool(flush, pending)
            if not parts.seen_file:
                raise UploadRejected(400, f"no '{FIELD}' file field in the upload")
            shape = check.finish()
            await run_in_threadpool(_fsync_close, fh)
        except InputError as exc:
            raise UploadRejected(status_for(exc, check), str(exc)) from None
        except UploadRejected:
            raise
        except Exception as exc:  # a malformed multipart body
            if isinstance(exc, ClientDisconnect):
                raise UploadRejected(400, "the upload was interrupted") from None
            if no_space(exc):
                raise UploadRejected(507, NO_SPACE_MESSAGE) from None
            if exc.__class__.__module__.split(".")[0] in ("python_multipart", "multipart"):
                raise UploadRejected(400, f"malformed multipart body ({type(exc).__name__})") from None
            raise
    except BaseException:
        fh.close()
        staged.unlink(missing_ok=True)
        STAGING.discard(staged.stem)
        raise
    ext = ".nii.gz" if check.gz else ".nii"
    return Received(staged, sanitise_filename(parts.filename), ext, written, [int(s) for s in shape[:3]])


def no_space(exc: BaseException) -> bool:
    """Whether ``exc`` says the data folder's disk is full: the system's ENOSPC or EDQUOT, or SQLite's "database or
    disk is full"."""
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    return isinstance(exc, sqlite3.OperationalError) and "full" in str(exc)


def done_staging(path: Path) -> None:
    """The staged upload at ``path`` is gone (stored as a job, or refused): remove it and its :data:`STAGING` mark."""
    path.unlink(missing_ok=True)
    STAGING.discard(path.stem)


def _fsync_close(fh) -> None:
    fh.flush()
    os.fsync(fh.fileno())
    fh.close()


def verify_with_nibabel(path: Path, ext: str, max_voxels: int) -> None:
    """A second opinion from nibabel on the staged file (header only; cheap). Raises InputError."""
    link = path.with_name(path.stem + ext)
    os.replace(path, link)
    try:
        try:
            img = nib.load(str(link))
        except Exception as exc:
            raise InputError(f"not a readable NIfTI file ({type(exc).__name__})") from None
        if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
            raise InputError(f"not a NIfTI image (read as {type(img).__name__})")
        check_header(img, max_voxels)
    finally:
        os.replace(link, path)
