"""The file an export is written to: created beside its final name and renamed over it once
complete, so a failed export never leaves a partial file; a device or a pipe (/dev/stdout, a FIFO)
is written in place. Every failure of the file itself is one sentence (OutputError), never a
traceback; it never touches the database."""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from collections.abc import Iterator

from crawler.errors import OutputError


def _error(path: str, exc: OSError) -> OutputError:
    reason = exc.strerror or type(exc).__name__
    return OutputError(f"cannot write the export to '{path}': {reason}.")


class ExportFile:
    """`with ExportFile(path) as out:` write to `out.name` inside `out.errors()`; leaving the block
    normally puts the file in place, leaving it by an exception removes what was written.
    The checks run when it is made, before any work: a bad -o fails fast."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._temp: str | None = None
        try:
            found = os.stat(path)
        except FileNotFoundError:
            found = None
        except OSError as exc:
            raise _error(path, exc) from None
        if found is not None and stat.S_ISDIR(found.st_mode):
            raise OutputError(f"'{path}' is a directory; -o needs the name of a file to write the export to.")
        if found is not None and not stat.S_ISREG(found.st_mode):
            self.name = path  # a device or a pipe: nothing to rename, nothing partial to leave
            return
        if found is not None and not os.access(path, os.W_OK):
            raise OutputError(f"cannot write the export to '{path}': Permission denied.")
        parent = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(parent):
            raise OutputError(f"cannot write the export to '{path}': the directory '{parent}' does not exist.")
        temp = os.path.join(parent, f".{os.path.basename(path)}.{secrets.token_hex(4)}.part")
        try:
            os.close(os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # the umask applies
            if found is not None:
                os.chmod(temp, stat.S_IMODE(found.st_mode))  # replacing a file keeps its permissions
        except OSError as exc:
            self._discard(temp)
            raise _error(path, exc) from None
        self._temp = self.name = temp

    def __enter__(self) -> ExportFile:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        if self._temp is None:
            return
        if exc_type is not None:
            self.discard()
            return
        try:
            os.replace(self._temp, self.path)
        except OSError as exc:
            self.discard()
            raise _error(self.path, exc) from None

    def discard(self) -> None:
        """Remove what was written (for a caller that fails before the block is entered)."""
        if self._temp is not None:
            self._discard(self._temp)
            self._temp = None

    @contextlib.contextmanager
    def errors(self) -> Iterator[None]:
        """Around the file's own operations only: an OSError of the database is not the file's."""
        try:
            yield
        except OSError as exc:
            raise _error(self.path, exc) from None

    @staticmethod
    def _discard(temp: str) -> None:
        with contextlib.suppress(OSError):
            os.unlink(temp)
