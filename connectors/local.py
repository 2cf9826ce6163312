"""The `local` staging: the S3 staging's layout in a directory (`path` + `prefix`).

For users without S3 and for tests; a Snowflake external stage with `URL='file:///dir/'` can
stand behind it. Every file is written to a hidden temporary file in its final directory and
then renamed over its path (`os.replace`, atomic on POSIX), so a reader sees a whole file or
none. Hidden temporaries (`.<name>.<random>.tmp`) are not listed; a crashed writer's leftovers
are swept by the window's next run once they are `STALE_TEMP_SECONDS` old (a live writer's
temporary is younger: it is being written), and by `delete_window` at any age.
"""

from __future__ import annotations

import errno
import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import BinaryIO

from connectors.staging import ObjectStaging, PartSink, normalize_prefix
from core.config import LocalStagingConfig
from core.errors import StagedDataLostError, TerminalError, TransientError, WindowpipeError

_TRANSIENT_ERRNOS = frozenset(
    {errno.ENOSPC, errno.EIO, errno.EAGAIN, errno.EBUSY, errno.EINTR, errno.ESTALE, errno.EDQUOT}
)
"""OS errors that may pass (a full or flaky disk); the rest (permissions, missing) will not."""

_FILE_MODE = 0o644
"""Staged files are readable by other local users (a Snowflake emulator, an operator)."""


def translate_os_error(exc: OSError, action: str, path: str) -> WindowpipeError:
    """One line, transient or terminal, for an OS error on a staged file."""
    kind = TransientError if exc.errno in _TRANSIENT_ERRNOS else TerminalError
    reason = exc.strerror or type(exc).__name__
    return kind(f"local staging: cannot {action} {path}: {reason}")


@contextmanager
def _os_errors(action: str, path: str) -> Iterator[None]:
    try:
        yield
    except OSError as exc:
        raise translate_os_error(exc, action, path) from exc


class _LocalPartSink:
    """A hidden temporary file beside `final`, renamed over it on commit."""

    def __init__(self, final: Path, label: str) -> None:
        self._final = final
        self._label = label
        with _os_errors("write", label):
            final.parent.mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp")
        self._temp = Path(name)
        self._file = os.fdopen(fd, "wb")

    def write(self, data: bytes) -> None:
        with _os_errors("write", self._label):
            self._file.write(data)

    def commit(self) -> None:
        with _os_errors("write", self._label):
            self._file.flush()
            os.fsync(self._file.fileno())
            os.fchmod(self._file.fileno(), _FILE_MODE)
            self._file.close()
            os.replace(self._temp, self._final)

    def abort(self) -> None:
        try:
            self._file.close()
        finally:
            self._temp.unlink(missing_ok=True)


class LocalStaging(ObjectStaging):
    """Staged files under `config.path`/`config.prefix`, created if missing."""

    def __init__(self, config: LocalStagingConfig) -> None:
        self.config = config
        self.max_file_bytes = config.max_file_bytes
        self.gzip_level = config.gzip_level
        self.root = Path(config.path).resolve() / normalize_prefix(config.prefix)
        """The staging root: `Manifest.path` and `StagedFile.path` are relative to it."""
        with _os_errors("create", str(self.root)):
            self.root.mkdir(parents=True, exist_ok=True)

    def _file(self, path: str) -> Path:
        return self.root / path

    def _open_part(self, path: str) -> PartSink:
        return _LocalPartSink(self._file(path), path)

    def _put(self, path: str, data: bytes) -> None:
        sink = _LocalPartSink(self._file(path), path)
        try:
            sink.write(data)
            sink.commit()
        except BaseException:
            sink.abort()
            raise

    @contextmanager
    def _open_read_stream(self, path: str) -> Iterator[BinaryIO]:
        with _os_errors("read", path):
            try:
                stream = self._file(path).open("rb")
            except FileNotFoundError:
                raise StagedDataLostError(
                    f"local staging read {path} failed: no such file"
                ) from None
        with stream:
            yield stream

    def _open_read(self, path: str) -> AbstractContextManager[BinaryIO]:
        return self._open_read_stream(path)

    def _read_errors(self, action: str, path: str) -> AbstractContextManager[None]:
        return _os_errors(action, path)

    def _list(self, directory: str) -> list[str]:
        with _os_errors("list", directory):
            return [path for path, name, _ in _walk(self.root, directory) if name[0] != "."]

    def _delete(self, paths: list[str]) -> int:
        deleted = 0
        directories: set[Path] = set()
        for path in paths:
            file = self._file(path)
            with _os_errors("delete", path):
                try:
                    file.unlink()
                except FileNotFoundError:
                    continue
            deleted += 1
            directories.add(file.parent)
        for directory in sorted(directories, key=lambda d: len(d.parts), reverse=True):
            self._remove_empty_dirs(directory)
        return deleted

    def _sweep(self, directory: str, max_age: float) -> None:
        cutoff = time.time() - max_age
        swept = False
        with _os_errors("delete", directory):
            for _, name, entry in _walk(self.root, directory):
                if not (name[0] == "." and name.endswith(".tmp")):
                    continue
                try:
                    if entry.stat().st_mtime <= cutoff:
                        os.unlink(entry.path)
                        swept = True
                except FileNotFoundError:  # its writer committed or aborted meanwhile
                    continue
        # After a write only a removed temporary can leave a directory empty; a delete of the
        # whole window (max_age 0) leaves none behind, whatever it found.
        if swept or max_age <= 0:
            self._remove_empty_dirs(self._file(directory))

    def _remove_empty_dirs(self, directory: Path) -> None:
        """Remove `directory` and its parents while empty, never the staging root."""
        while directory != self.root and self.root in directory.parents:
            try:
                directory.rmdir()
            except OSError:  # not empty (or already gone): stop here
                return
            directory = directory.parent


def _walk(root: Path, directory: str) -> Iterator[tuple[str, str, os.DirEntry[str]]]:
    """Every file under `root/directory`, recursively, as (its path relative to `root`, its
    name, its entry); nothing when the directory is missing. `os.scandir` on strings: a
    window's directory is walked twice a stage, and `Path.rglob` cost more than the files."""
    pending = [directory.strip("/")]
    while pending:
        relative = pending.pop()
        try:
            scan = os.scandir(os.path.join(root, relative))
        except (FileNotFoundError, NotADirectoryError):
            continue
        with scan:
            for entry in scan:
                path = f"{relative}/{entry.name}" if relative else entry.name
                if entry.is_dir(follow_symlinks=False):
                    pending.append(path)
                elif entry.is_file():
                    yield path, entry.name, entry
