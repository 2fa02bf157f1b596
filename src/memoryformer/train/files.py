"""Writing run files so that an interruption never loses or corrupts one (docs/training.md).

Every file a run writes goes to a temporary name in the same folder (`.NAME.tmp-PID`), is flushed
and fsynced, and is renamed over NAME (`os.replace`, atomic on POSIX), then the folder is fsynced.
A kill at any moment leaves either the old file or the new one, never a mixture; the temporary of a
killed write is removed by `remove_stale_temporaries` when the run starts or resumes.
A full disk is reported as `DiskFullError` ("no space left on device while writing FILE").
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

_FULL = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))


class DiskFullError(OSError):
    """The disk (or quota) filled up while writing a run file; the file's previous version is intact."""


def temporary_name(path: Path) -> Path:
    """Where `path` is written before it is renamed into place."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def file_mode() -> int:
    """The mode a new file gets from open() under the current umask (0o644 under umask 022)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _disk_full_in(err: BaseException | None) -> bool:
    """True when err, or an error it was raised from or during, is ENOSPC / EDQUOT."""
    seen = 0
    while err is not None and seen < 8:
        if isinstance(err, OSError) and err.errno in _FULL:
            return True
        if "No space left on device" in str(err):  # safetensors' Rust I/O error carries only the text
            return True
        err = err.__cause__ or err.__context__
        seen += 1
    return False


@contextmanager
def reporting_full_disk(path: Path) -> Iterator[None]:
    """Turn an ENOSPC anywhere inside (torch.save reports it as `unexpected pos`) into DiskFullError."""
    try:
        yield
    except DiskFullError:
        raise
    except Exception as err:
        if _disk_full_in(err):
            raise DiskFullError(errno.ENOSPC, f"no space left on device while writing {path}; the previous "
                                "version of the file is intact: free some space and resume with --resume") from None
        raise


def fsync_dir(folder: Path) -> None:
    """fsync a folder so a rename inside it survives a power loss (a no-op where unsupported)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> Path:
    """Call write(binary file) on a temporary next to `path`, fsync, rename over `path`.

    On any failure the temporary is removed and `path` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    try:
        with reporting_full_disk(path):
            with open(tmp, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write text (UTF-8) atomically."""
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def atomic_copy(source: str | os.PathLike, path: str | os.PathLike) -> Path:
    """Copy a file's bytes to `path` atomically."""
    def copy(f: IO[bytes]) -> None:
        with open(source, "rb") as src:
            shutil.copyfileobj(src, f)

    return atomic_write(path, copy)


def atomic_write_by_name(path: str | os.PathLike, write_file: Callable[[str], None]) -> Path:
    """Atomic write for writers that take a file name (safetensors' save_file): write_file(temporary
    name), then give it the umask's mode (safetensors creates 0600 files), fsync and rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    try:
        with reporting_full_disk(path):
            write_file(str(tmp))
            os.chmod(tmp, file_mode())
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def remove_stale_temporaries(*folders: str | os.PathLike) -> list[Path]:
    """Delete the temporary files (`.NAME.tmp-PID`) that killed writes left in these folders.

    Call it only while holding the run's lock: no other process is writing there then."""
    removed = []
    for folder in map(Path, folders):
        if not folder.is_dir():
            continue
        for path in folder.glob(".*.tmp-*"):
            if path.is_file() and path.name.rsplit(".tmp-", 1)[1].isdigit():
                path.unlink(missing_ok=True)
                removed.append(path)
    return removed
