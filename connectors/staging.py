"""What the S3 and local staging share: the staged file format, rolling, manifests, cleanup.

A staging area stores bytes under relative paths (`<pipeline>/YYYY/MM/DD/<window>/...`). Everything
about *what* it stores lives here, once:

- `StagedFileWriter` turns batches into gzip NDJSON part files, rolling to a new part before a
  part's uncompressed NDJSON would exceed `max_file_bytes`, and counts rows, stored bytes,
  sha256, rejections and the staged ids' checksum (`core.checksum`) as the bytes stream past.
  It holds up to `WRITE_BUFFER_BYTES` of lines and the compressor's buffer in memory, never
  the window.
- `ObjectStaging` implements the `core.ports.StagingArea` protocol on top of five storage
  primitives (open a part for writing, put small bytes, open for reading, list, delete), which
  is all `LocalStaging` and `S3Staging` supply.

Layout of one run of one window, relative to the staging root (bucket + prefix, or directory +
prefix):

    <pipeline>/YYYY/MM/DD/<start>_<end>/<run>-part-00000.ndjson.gz
    <pipeline>/YYYY/MM/DD/<start>_<end>/<run>-part-00001.ndjson.gz
    <pipeline>/YYYY/MM/DD/<start>_<end>/manifest-<run>.json      (written last)
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import re
import zlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager
from typing import BinaryIO, Protocol, cast

from connectors.base import Batch, Manifest, StagedFile, encode_line, window_dir
from core.checksum import checksum_text, ids_sum
from core.errors import StagedDataLostError
from core.windows import Window

PART_SUFFIX = ".ndjson.gz"
"""Every staged data file ends with this; Snowflake infers gzip NDJSON from it."""

MAX_REJECTED_IDS = 100
"""How many rejected document ids a manifest keeps (the counts by reason are always whole)."""

GZIP_LEVEL = 1
"""The default of both staging areas' `gzip_level` (`core.config`): zlib level 1 compresses about 3x
faster than level 6 for files about 13 % larger."""

WRITE_BUFFER_BYTES = 1 << 20
"""NDJSON a part collects before handing it to the compressor in one call (a call per line
cost more than the compression itself)."""

READ_CHUNK_BYTES = 1 << 20
"""Decompressed bytes `iter_lines` takes at a time and splits into lines."""

STALE_TEMP_SECONDS = 15 * 60
"""A writer's temporary untouched this long belongs to a dead writer: the next run removes it."""

_RUN_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def normalize_prefix(prefix: str) -> str:
    """`"orders"`, `"/orders/"` and `"orders/"` all mean the folder `orders/`; `""` the root."""
    stripped = prefix.strip("/")
    return f"{stripped}/" if stripped else ""


def part_path(directory: str, run: str, index: int) -> str:
    """The relative path of part `index` of `run` in a window's directory."""
    return f"{directory}/{run}-part-{index:05d}{PART_SUFFIX}"


def manifest_path(directory: str, run: str) -> str:
    """The relative path of `run`'s manifest in a window's directory."""
    return f"{directory}/manifest-{run}.json"


def _run_of(path: str) -> str | None:
    """The run a staged file belongs to, from its name; None for a file of unknown shape."""
    name = path.rsplit("/", 1)[-1]
    if name.startswith("manifest-") and name.endswith(".json"):
        return name[len("manifest-") : -len(".json")]
    if "-part-" in name:
        return name.split("-part-", 1)[0]
    return None


def check_run(run: str) -> str:
    """`run` goes into file names: letters, digits, `.`, `_`, `-` only (no `/`, no `=`)."""
    if not _RUN_PATTERN.fullmatch(run):
        raise ValueError(f"run {run!r} is not a safe file name part (letters, digits, ._-)")
    return run


class PartSink(Protocol):
    """Where one part file's compressed bytes go; nothing is visible until `commit`."""

    def write(self, data: bytes) -> None: ...

    def commit(self) -> None:
        """Make the file visible at its path, whole."""
        ...

    def abort(self) -> None:
        """Drop what was written; never raises."""
        ...


class _DigestingSink:
    """The file object gzip writes into: hashes and counts the bytes on their way to a sink."""

    def __init__(self, sink: PartSink) -> None:
        self.sink = sink
        self.sha256 = hashlib.sha256()
        self.bytes = 0

    def write(self, data: bytes) -> int:
        size = len(data)
        if size:
            self.sha256.update(data)
            self.bytes += size
            self.sink.write(bytes(data))
        return size

    def flush(self) -> None:
        pass


class _OpenPart:
    """One part file being written: gzip over a digesting sink, fed `WRITE_BUFFER_BYTES` of
    lines at a time."""

    def __init__(self, path: str, sink: PartSink, gzip_level: int = GZIP_LEVEL) -> None:
        self.path = path
        self.rows = 0
        self.ndjson_bytes = 0
        self._digest = _DigestingSink(sink)
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        # mtime=0 and no file name in the header: the same lines always give the same bytes.
        self._gzip = gzip.GzipFile(
            filename="", mode="wb", compresslevel=gzip_level, fileobj=self._digest, mtime=0
        )

    def write(self, line: bytes) -> None:
        self._pending.append(line)
        self._pending_bytes += len(line)
        self.rows += 1
        self.ndjson_bytes += len(line)
        if self._pending_bytes >= WRITE_BUFFER_BYTES:
            self._flush()

    def write_many(self, lines: list[bytes], size: int) -> None:
        """`write` for each of `lines` (`size` bytes in all), in one call. The compressor may
        get its input in other pieces than line by line: zlib's output does not depend on how
        its input is split."""
        self._pending.extend(lines)
        self._pending_bytes += size
        self.rows += len(lines)
        self.ndjson_bytes += size
        if self._pending_bytes >= WRITE_BUFFER_BYTES:
            self._flush()

    def _flush(self) -> None:
        if self._pending:
            self._gzip.write(b"".join(self._pending))
            self._pending.clear()
            self._pending_bytes = 0

    def commit(self) -> StagedFile:
        self._flush()
        self._gzip.close()  # writes the gzip trailer; leaves the sink open
        self._digest.sink.commit()
        return StagedFile(
            path=self.path,
            rows=self.rows,
            bytes=self._digest.bytes,
            sha256=self._digest.sha256.hexdigest(),
        )

    def abort(self) -> None:
        # The sink may be what failed: aborting is best effort.
        with contextlib.suppress(Exception):
            self._gzip.close()
        self._digest.sink.abort()


class StagedFileWriter:
    """Batches in, gzip NDJSON part files out, rolled by size; counts rejections by reason.

    `max_file_bytes` bounds the *uncompressed* NDJSON of a part: a line that would take a part
    past it starts the next part, so every part holds at most `max_file_bytes` of NDJSON, except
    a part holding a single line longer than that on its own. Uncompressed size is exact and
    known before a line is written (compressed size lags behind zlib's buffer), and gzip never
    makes a file meaningfully larger, so stored parts are at most about `max_file_bytes` too.
    Parts are opened lazily: no documents, no part files.
    """

    def __init__(
        self,
        directory: str,
        run: str,
        max_file_bytes: int,
        open_part: Callable[[str], PartSink],
        gzip_level: int = GZIP_LEVEL,
    ) -> None:
        if max_file_bytes < 1:
            raise ValueError("max_file_bytes must be positive")
        self.directory = directory
        self.run = check_run(run)
        self.max_file_bytes = max_file_bytes
        self.gzip_level = gzip_level
        self._open_part = open_part
        self._part: _OpenPart | None = None
        self.files: list[StagedFile] = []
        """The parts committed so far, in order."""
        self.rejected: dict[str, int] = {}
        """Rejected documents by reason."""
        self.rejected_ids: list[str] = []
        """The first `MAX_REJECTED_IDS` rejected document ids."""
        self._id_sum = 0

    @property
    def checksum(self) -> str:
        """The checksum of the ids of every document `add`ed so far (`core.checksum`)."""
        return checksum_text(self._id_sum)

    @property
    def rows(self) -> int:
        """Documents written so far, committed or not."""
        return sum(f.rows for f in self.files) + (self._part.rows if self._part else 0)

    def add(self, batch: Batch) -> None:
        """Write a batch's documents and count its rejections."""
        for rejection in batch.rejected:
            self.rejected[rejection.reason] = self.rejected.get(rejection.reason, 0) + 1
            if rejection.id is not None and len(self.rejected_ids) < MAX_REJECTED_IDS:
                self.rejected_ids.append(rejection.id)
        documents = batch.documents
        self.write_lines(list(map(encode_line, documents)))
        # Hashed as they stream past, after they were written: only staged ids count.
        self._id_sum += ids_sum([document.id for document in documents])

    def write_lines(self, lines: list[bytes]) -> None:
        """`write_line` for each of `lines`, in order: in one step when they all fit in the
        open part, line by line (rolling parts) otherwise."""
        part = self._part
        if part is not None and part.rows:
            size = sum(map(len, lines))
            if part.ndjson_bytes + size <= self.max_file_bytes:
                part.write_many(lines, size)
                return
        for line in lines:
            self.write_line(line)

    def write_line(self, line: bytes) -> None:
        """Append one encoded NDJSON line (with its newline), rolling parts by size first."""
        part = self._part
        if part is not None and part.rows and part.ndjson_bytes + len(line) > self.max_file_bytes:
            self.files.append(part.commit())
            part = self._part = None
        if part is None:
            path = part_path(self.directory, self.run, len(self.files))
            part = self._part = _OpenPart(path, self._open_part(path), self.gzip_level)
        part.write(line)

    def finish(self) -> list[StagedFile]:
        """Commit the open part; every part file written, in order."""
        if self._part is not None:
            part, self._part = self._part, None
            self.files.append(part.commit())
        return list(self.files)

    def abort(self) -> None:
        """Drop the open part (committed parts stay; the caller decides about them)."""
        if self._part is not None:
            part, self._part = self._part, None
            part.abort()


class ObjectStaging(ABC):
    """A `StagingArea` over a store of bytes at relative paths; subclasses supply the storage.

    Paths handed to and returned by the primitives are relative to the staging root (they never
    include the configured prefix); each subclass maps them to where bytes really live.
    """

    max_file_bytes: int
    gzip_level: int = GZIP_LEVEL

    # --- storage primitives ------------------------------------------------------------------

    @abstractmethod
    def _open_part(self, path: str) -> PartSink:
        """A sink whose bytes become the file at `path` on commit, atomically."""

    @abstractmethod
    def _put(self, path: str, data: bytes) -> None:
        """Store small `data` (a manifest) at `path`, atomically, replacing what was there."""

    @abstractmethod
    def _open_read(self, path: str) -> AbstractContextManager[BinaryIO]:
        """The stored bytes at `path` as a readable stream; `TerminalError` if missing."""

    @abstractmethod
    def _list(self, directory: str) -> list[str]:
        """Every stored path under `directory/`, recursively, in any order."""

    @abstractmethod
    def _delete(self, paths: list[str]) -> int:
        """Delete `paths` (missing ones are fine); how many were deleted."""

    @abstractmethod
    def _read_errors(self, action: str, path: str) -> AbstractContextManager[None]:
        """Translates the storage's exceptions raised while streaming `path`."""

    def _sweep(self, directory: str, max_age: float) -> None:
        """Remove a crashed writer's leftovers under `directory/` (temporaries, not files) that
        are at least `max_age` seconds old. Nothing to do for stores without temporaries."""
        return

    def close(self) -> None:
        """Release the storage client, if any."""
        return

    # --- the StagingArea protocol --------------------------------------------------------------

    def write_window(
        self, pipeline: str, window: Window, run: str, batches: Iterable[Batch]
    ) -> Manifest:
        """Stream `batches` into part files, then write the manifest, then delete whatever else
        the window's directory held (earlier runs): re-extracting replaces, never appends.

        If writing fails, this run's committed parts are deleted (best effort) and no manifest
        is written, so a manifest only ever describes a complete run.
        """
        directory = window_dir(pipeline, window)
        writer = StagedFileWriter(
            directory, run, self.max_file_bytes, self._open_part, self.gzip_level
        )
        try:
            for batch in batches:
                writer.add(batch)
            files = writer.finish()
        except BaseException:
            writer.abort()
            self._discard([f.path for f in writer.files])
            raise
        manifest = Manifest(
            pipeline=pipeline,
            window_start=window.start,
            window_end=window.end,
            run=run,
            files=files,
            rows=sum(f.rows for f in files),
            rejected=dict(sorted(writer.rejected.items())),
            rejected_ids=list(writer.rejected_ids),
            path=manifest_path(directory, run),
            checksum=writer.checksum,
        )
        self._put(manifest.path, manifest.to_json())
        keep = {f.path for f in files} | {manifest.path}
        # Only older runs go: a late writer that lost the window (a lower run) must not delete
        # the files of the run that replaced it. Run names sort by fencing token.
        stale = sorted(
            p
            for p in self._list(directory)
            if p not in keep and (_run_of(p) is None or str(_run_of(p)) <= run)
        )
        if stale:
            self._delete(stale)
        self._sweep(directory, STALE_TEMP_SECONDS)
        return manifest

    def read_manifest(self, path: str) -> Manifest:
        """The manifest at `path` (as in `Manifest.path`)."""
        with self._open_read(path) as stream, self._read_errors("read", path):
            raw = stream.read()
        try:
            return Manifest.from_json(raw)
        except (ValueError, KeyError, TypeError) as exc:
            raise StagedDataLostError(f"staging manifest {path} is not valid: {exc}") from None

    def iter_lines(self, path: str, sha256: str | None = None) -> Iterator[bytes]:
        """The NDJSON lines of one staged file, decompressed as they stream in, each without its
        trailing newline. A missing, truncated or corrupt file - or, given the manifest's
        `sha256`, one whose bytes differ - raises `StagedDataLostError` (after the lines read so
        far: a caller loading in a transaction rolls back)."""
        with (
            self._open_read(path) as raw,
            self._read_errors("read", path),
        ):
            stream = _HashingReader(raw)
            try:
                with gzip.GzipFile(fileobj=cast(BinaryIO, stream), mode="rb") as data:
                    yield from _split_lines(data)
            except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
                raise StagedDataLostError(f"staged file {path} is not valid gzip: {exc}") from None
            if sha256 is not None:
                stream.read_rest()
                if stream.digest.hexdigest() != sha256:
                    raise StagedDataLostError(
                        f"staged file {path} does not match its manifest (sha256 differs)"
                    )

    def list_files(self, pipeline: str, window: Window) -> list[str]:
        """Every path under the window's directory, sorted."""
        return sorted(self._list(window_dir(pipeline, window)))

    def delete_window(self, pipeline: str, window: Window) -> int:
        """Delete everything under the window's directory; how many files went."""
        directory = window_dir(pipeline, window)
        paths = self._list(directory)
        deleted = self._delete(sorted(paths)) if paths else 0
        self._sweep(directory, 0)
        return deleted

    def _discard(self, paths: list[str]) -> None:
        """Best-effort delete while another error is already on its way up."""
        if not paths:
            return
        # The original error matters more; the next run cleans up anyway.
        with contextlib.suppress(Exception):
            self._delete(paths)


class _Readable(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...


def _split_lines(data: _Readable) -> Iterator[bytes]:
    """The lines of `data` without their newlines, read `READ_CHUNK_BYTES` at a time (a last
    line without a newline too); a line longer than a chunk is joined from its pieces."""
    pending: list[bytes] = []
    while chunk := data.read(READ_CHUNK_BYTES):
        lines = chunk.split(b"\n")
        if len(lines) == 1:
            pending.append(chunk)
            continue
        if pending:
            pending.append(lines[0])
            lines[0] = b"".join(pending)
        tail = lines.pop()
        pending = [tail] if tail else []
        yield from lines
    if pending:
        yield b"".join(pending)


class _HashingReader:
    """A read-only stream that hashes the bytes read through it (the staged file's sha256)."""

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream
        self.digest = hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self._stream.read(size)
        self.digest.update(data)
        return data

    def read_rest(self) -> None:
        """Hash whatever gzip left unread (trailing bytes after the last member)."""
        while self.read(1 << 16):
            pass
