"""The record spool: every step appended to a file, whole, before SQLite sees it.

Private to :mod:`dyndiag.records` (which documents the store) and :mod:`dyndiag._sqlite`
(which moves the spool into the database). Standard library only: the ingest process
runs this file's sibling ``_sqlite.py`` as a script, without importing the package.

Layout: ``<log_dir>/records.spool.NNNNNN`` segment files, each a sequence of frames
``magic(2) kind(1) length(u32) crc32(u32) payload``, little-endian:

``N``  names: JSON ``[[id, probe, metric, key], ...]``. A segment starts with every
       name known so far, so it can be read without the segments before it.
``S``  one step: ``step(i64) wall_time(f64) rewind(i64, -1: none) n(u32) m(u32)``,
       then ``n`` name ids (u32), ``n`` values (f64), ``m`` times ``(id u32,
       length u64)`` and the ``m`` ``.npy`` blobs.
``R``  the segment is finished; the next one holds what follows.
``E``  the writer closed.

A frame is valid when it is complete and its CRC matches; reading stops at the first
frame that is not (a write torn by a crash, or the zeros after the last frame), so a
reader sees whole steps only.

How a segment is written (:class:`Segment`): where the system allows it (POSIX with
``posix_fallocate``), the segment's ``SEGMENT_BYTES`` are reserved on disk up front
and mapped into memory, and a frame is stored into the mapping: a step costs a
``struct.pack_into`` and a CRC, no system call, and once it is stored the page cache
holds it, so a SIGKILL of the writer cannot lose it. Reserving the blocks first
means a full disk fails when a segment is created (an ``OSError`` before any byte of
the step is stored), never as a ``SIGBUS`` in the middle of a store. Elsewhere a
frame is appended with one ``write()``. Readers cannot tell the two apart: a
mapped segment only has zeros after its last frame.
"""

from __future__ import annotations

import errno
import json
import mmap
import os
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

PREFIX = "records.spool."
MAGIC = b"dS"
HEADER = struct.Struct("<2scII")
STEP = struct.Struct("<qdqII")
ARRAY = struct.Struct("<IQ")
SEGMENT_BYTES = 4 << 20  # bytes a segment holds (a frame larger than that gets a segment of its own size)
#: Whether segments are written through a memory mapping where the system allows it
#: (tests switch it off to cover the ``write()`` path other systems take).
MAP = hasattr(os, "posix_fallocate") and hasattr(mmap, "MAP_SHARED")
OFFSET_BITS = 40  # a spool position is segment << 40 | offset: one integer in the meta table


def segment_path(log_dir: Path, seg: int) -> Path:
    return log_dir / f"{PREFIX}{seg:06d}"


def segments(log_dir: Path) -> list[int]:
    """Segment numbers present in ``log_dir``, ascending."""
    found = []
    for path in log_dir.glob(PREFIX + "*"):
        suffix = path.name[len(PREFIX):]
        if suffix.isdigit():
            found.append(int(suffix))
    return sorted(found)


def pack_pos(seg: int, offset: int) -> int:
    return seg << OFFSET_BITS | offset


def unpack_pos(pos: int) -> tuple[int, int]:
    return pos >> OFFSET_BITS, pos & ((1 << OFFSET_BITS) - 1)


def frame(kind: bytes, payload: bytes = b"") -> bytes:
    return HEADER.pack(MAGIC, kind, len(payload), zlib.crc32(payload)) + payload


def names_frame(names: dict) -> bytes:
    """``names``: ``{(probe, metric, key): id}``."""
    return frame(b"N", json.dumps([[i, *k] for k, i in names.items()], separators=(",", ":")).encode())


_STEP_N: dict[int, struct.Struct] = {}  # the step payload with n scalars and no array, by n


def step_packer(n: int) -> struct.Struct:
    packer = _STEP_N.get(n)
    if packer is None:
        packer = _STEP_N[n] = struct.Struct(STEP.format + f"{n}I{n}d")
    return packer


def step_frame(step: int, wall_time: float, rewind: int | None, ids: list, values: list, arrays: list) -> bytes:
    """``arrays``: ``[(id, npy bytes), ...]``."""
    n = len(ids)
    payload = step_packer(n).pack(step, wall_time, -1 if rewind is None else rewind, n, len(arrays), *ids, *values)
    if arrays:
        payload = b"".join([payload, *(ARRAY.pack(i, len(blob)) for i, blob in arrays), *(b for _, b in arrays)])
    return HEADER.pack(MAGIC, b"S", len(payload), zlib.crc32(payload)) + payload


END = frame(b"E")
ROTATE = frame(b"R")
ROTATE_BYTES = len(ROTATE)


@dataclass
class Step:
    """One decoded ``S`` frame; ``end`` is the file offset just after it."""

    step: int
    wall_time: float
    rewind: int | None
    scalars: list = field(default_factory=list)  # [(probe, metric, key, value)]
    arrays: list = field(default_factory=list)  # [(probe, metric, key, npy bytes)]
    end: int = 0


def parse(data, start: int, names: dict, at: int = 0):
    """Frames of ``data`` (a whole segment: bytes or a read-only mapping), from file offset ``at``.

    ``at`` is a frame boundary (0, or an ``end`` yielded before). Yields ``(kind,
    item, end)``: ``N`` frames update ``names`` (id -> (probe, metric, key)) and
    yield ``None``; ``S`` frames at offsets ``>= start`` yield a :class:`Step`, earlier
    ones (already ingested, so checked once) yield ``None`` undecoded and unchecked;
    ``R``/``E`` yield ``None``. ``end`` is the file offset after the frame. Stops at
    the first incomplete or corrupt frame. Nothing yielded refers to ``data``, so a
    mapping may be closed afterwards.
    """
    size = len(data)
    while at + HEADER.size <= size:
        magic, kind, length, crc = HEADER.unpack_from(data, at)
        body = at + HEADER.size
        end = body + length
        if magic != MAGIC or end > size:
            return
        if kind == b"S" and at < start:
            yield kind, None, end
            at = end
            continue
        payload = data[body:end]
        if zlib.crc32(payload) != crc:
            return
        if kind == b"N":
            for i, p, m, k in json.loads(payload):
                names[i] = (p, m, k)
            yield kind, None, end
        elif kind == b"S":
            yield kind, _decode_step(payload, names, end), end
        else:
            yield kind, None, end
        at = end


def _decode_step(payload: bytes, names: dict, end: int) -> Step:
    step, wall_time, rewind, n, m = STEP.unpack_from(payload, 0)
    at = STEP.size
    flat = struct.unpack_from(f"<{n}I{n}d", payload, at)
    at += 12 * n
    out = Step(step, wall_time, None if rewind < 0 else rewind, end=end)
    out.scalars = [(*names[i], v) for i, v in zip(flat[:n], flat[n:])]
    heads = [ARRAY.unpack_from(payload, at + ARRAY.size * j) for j in range(m)]
    at += ARRAY.size * m
    for i, length in heads:
        out.arrays.append((*names[i], payload[at : at + length]))
        at += length
    return out


def open_segment(path: Path):
    """The bytes of a segment file as a read-only mapping (``b""`` when empty); None if absent.

    A mapping reads only the pages parsed, not the zeros after a mapped segment's last
    frame; close it after use.
    """
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        return None
    with f:
        return map_file(f, os.fstat(f.fileno()).st_size)


def map_file(f, size: int):
    """The first ``size`` bytes of the open file ``f``, mapped read-only (``b""`` when empty)."""
    return mmap.mmap(f.fileno(), size, access=mmap.ACCESS_READ) if size else b""


def close_segment(data) -> None:
    if isinstance(data, mmap.mmap):
        data.close()


def read_tail(log_dir: Path, pos: int) -> list[Step] | None:
    """The steps spooled at or after ``pos`` (what SQLite does not hold yet).

    Follows ``R`` frames into later segments. ``None`` when a segment is missing:
    either the writer closed (and removed its spool once SQLite held all of it) or
    the segment was ingested and deleted since ``pos`` was read; the caller reads
    ``pos`` again and retries, and an unchanged ``pos`` means no tail.
    """
    seg, offset = unpack_pos(pos)
    out: list[Step] = []
    while True:
        data = open_segment(segment_path(log_dir, seg))
        if data is None:
            return None
        names: dict = {}
        rotated = False
        try:
            for kind, item, _ in parse(data, offset, names):
                if kind == b"S" and item is not None:
                    out.append(item)
                elif kind == b"R":
                    rotated = True
        finally:
            close_segment(data)
        if not rotated:
            return out
        seg, offset = seg + 1, 0


class Segment:
    """The writing end of one spool segment: frames appended at :attr:`size`.

    Mapped (see the module docstring) when :data:`MAP` and the system allow it, else
    written with ``write()``. ``need``: bytes the first frame will take, so a frame
    larger than ``SEGMENT_BYTES`` gets a segment that holds it.
    """

    def __init__(self, log_dir: Path, seg: int, names: dict, need: int = 0) -> None:
        self.seg = seg
        self._packer = step_packer(0)
        header = names_frame(names) if names else b""  # a segment can be read alone: it starts with every name so far
        self.capacity = max(SEGMENT_BYTES, need + ROTATE_BYTES + len(header))
        self.mm: mmap.mmap | None = None
        self.fd = os.open(segment_path(log_dir, seg), os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            self.size = self.first = os.fstat(self.fd).st_size
            if MAP and self.size == 0 and self._reserve():
                # MAP_POPULATE: the pages are faulted in now, not one at a time in write_step.
                flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
                self.mm = mmap.mmap(self.fd, self.capacity, flags=flags)
            if header:
                self.append(header)
                self.first = self.size
        except BaseException:
            self.close()
            raise

    def _reserve(self) -> bool:
        """Reserve the segment's blocks (zeros); False where the file system cannot (then: write())."""
        try:
            os.posix_fallocate(self.fd, 0, self.capacity)
        except OSError as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS, getattr(errno, "ENOTSUP", -1)):
                return False
            os.ftruncate(self.fd, 0)  # a full disk: nothing half-reserved stays for a retry to trip on
            raise
        return True

    def fits(self, nbytes: int) -> bool:
        """Whether a frame of ``nbytes`` goes into this segment (else: rotate first).

        Room for the ``R`` frame that ends a segment is always kept; an unmapped
        segment takes a frame of any size while it holds no step.
        """
        if self.mm is None and self.size == self.first:
            return True
        return self.size + nbytes + ROTATE_BYTES <= self.capacity

    def append(self, data: bytes) -> None:
        """Store the whole frame(s) ``data`` (a caller checked :meth:`fits`, or writes ``R``/``E``)."""
        if self.mm is None:
            self.size = write_all(self.fd, data, self.size)
            return
        end = self.size + len(data)
        self.mm[self.size : end] = data
        self.size = end

    def append_step(self, step: int, wall_time: float, rewind: int | None, ids: list, values: list) -> bool:
        """Store a step of scalars only, packed in place; False (nothing stored) if it does not fit."""
        packer = self._packer
        if packer.size != STEP.size + 12 * len(ids):  # another number of rows than the last step
            packer = self._packer = step_packer(len(ids))
        at = self.size
        body = at + HEADER.size
        end = body + packer.size
        mm = self.mm
        if mm is None or end + ROTATE_BYTES > self.capacity:
            if not self.fits(end - at):
                return False
            if mm is None:
                self.append(step_frame(step, wall_time, rewind, ids, values, ()))
                return True
        try:
            packer.pack_into(mm, body, step, wall_time, -1 if rewind is None else rewind, len(ids), 0, *ids, *values)
        except BaseException:
            mm[body:end] = bytes(packer.size)  # nothing of it stays behind
            raise
        # The header last: until it is stored the frame does not exist for a reader.
        HEADER.pack_into(mm, at, MAGIC, b"S", packer.size, zlib.crc32(mm[body:end]))
        self.size = end
        return True

    def close(self) -> None:
        if self.mm is not None:
            self.mm.close()
            self.mm = None
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def write_all(fd: int, data: bytes, size: int) -> int:
    """Append ``data`` to the spool file ``fd`` of ``size`` bytes; returns the new size.

    A write that fails part-way is cut off again, so a later frame never follows a
    torn one.
    """
    try:
        written = os.write(fd, data)
        if written != len(data):  # rare for a regular file; finish or fail
            view = memoryview(data)[written:]
            while view:
                view = view[os.write(fd, view):]
    except BaseException:
        try:
            os.ftruncate(fd, size)
        except OSError:
            pass
        raise
    return size + len(data)
