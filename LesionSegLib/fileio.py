"""Atomic file writes: nothing a user has is ever left half-written.

Every file LesionSeg writes (checkpoints, label maps, segmentations, tables, ONNX
graphs) goes to a temporary file ``.NAME.XXXXXXXX.tmp…`` in the destination folder and
is renamed over the target only when complete and checked, so an interrupted write
keeps the previous file intact and nothing truncated ever reaches the destination:

* the temporary file is flushed to disk (``fsync``) before the rename, so a full disk
  is reported here and not later by the file system;
* it must exist and be non-empty, and the writer's ``verify(tmp)`` (e.g. reading an
  image back and comparing it with what was meant to be written) must pass — some
  writers (SimpleITK's NIfTI writer) do not report a full disk themselves;
* a writer holds an advisory lock on its temporary file while it writes, and every
  write first removes this module's own temporary files in that folder whose writer
  is gone (killed): ``.NAME.XXXXXXXX.tmp…`` files nobody holds. Nothing else is touched,
  and the temporary files of a writer that is still running (another process writing
  into the same folder) are left alone.

Errors are :class:`WriteError` (an ``OSError``) naming the destination, never the
temporary file.
"""
from __future__ import annotations

import errno
import os
import re
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence, Tuple

try:  # POSIX advisory locks; on Windows an open file cannot be deleted anyway
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

#: ``.NAME.`` + tempfile's 8 random characters + a suffix starting with ``.tmp``
_TEMP_PATTERN = re.compile(r"^\.(?P<name>.+)\.[a-z0-9_]{8}\.tmp[^/]*$")
#: without locks (Windows), a temporary file is stale only when older than this
_UNLOCKED_STALE_SECONDS = 24 * 3600


class WriteError(OSError):
    """A file could not be written completely; the destination was left as it was."""

    def __str__(self) -> str:
        return str(self.strerror)


#: the file formats LesionSeg reads, one table for every reader and writer
VOLUME_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
READABLE_EXTENSIONS = VOLUME_EXTENSIONS + IMAGE_EXTENSIONS
#: Slicer's segmentation files (a double extension that ends like a volume's)
SEGMENTATION_EXTENSIONS = (".seg.nrrd",)


def split_extension(path, extensions: Sequence[str] = SEGMENTATION_EXTENSIONS + READABLE_EXTENSIONS
                    ) -> Tuple[str, str]:
    """``(stem, extension)``, the extension in lower case, the longest of ``extensions``
    that the name ends with (``.seg.nrrd`` and ``.nii.gz`` kept whole), else the last
    suffix. A name that is only an extension keeps it as its stem."""
    name = Path(path).name
    lower = name.lower()
    for ext in sorted(extensions, key=len, reverse=True):
        if lower.endswith(ext) and len(name) > len(ext):
            return name[:-len(ext)], ext
    return Path(name).stem, Path(name).suffix.lower()


def stem(path) -> str:
    """The file name without its extension (:func:`split_extension`): ``case.seg.nrrd`` → ``case``."""
    return split_extension(path)[0]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def is_temporary_name(name: str) -> bool:
    """Whether ``name`` is one of the temporary files :func:`atomic_path` makes."""
    return bool(_TEMP_PATTERN.match(name))


def _lock(fd: int) -> bool:
    """Non-blocking exclusive lock on ``fd``; False when another open file holds it."""
    if fcntl is None:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError as e:
        if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            return False
        return True  # a file system without locks: the file is not known to be in use


def clean_stale_temporaries(folder) -> int:
    """Remove this module's temporary files in ``folder`` that no running writer holds
    (left by a killed process). Returns how many were removed; never raises."""
    removed = 0
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return 0
    import time
    for entry in entries:
        if not entry.name.startswith(".") or not is_temporary_name(entry.name):
            continue
        try:
            if not entry.is_file(follow_symlinks=False):
                continue
            if fcntl is None:
                if time.time() - entry.stat().st_mtime < _UNLOCKED_STALE_SECONDS:
                    continue
                os.unlink(entry.path)
                removed += 1
                continue
            fd = os.open(entry.path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
            try:
                if _lock(fd) and os.path.samestat(os.fstat(fd), os.stat(entry.path, follow_symlinks=False)):
                    os.unlink(entry.path)
                    removed += 1
            finally:
                os.close(fd)
        except OSError:
            continue
    return removed


def _describe(e: OSError) -> str:
    if e.errno == errno.ENOSPC:
        return "no space left on the device"
    if e.errno == errno.EDQUOT:
        return "disk quota exceeded"
    return e.strerror or str(e) or type(e).__name__


@contextmanager
def atomic_path(path, suffix: str = ".tmp", verify: Optional[Callable[[Path], None]] = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` (with the
    permissions a plain ``open`` would give), on any error it is removed.

    ``suffix`` lets writers that choose the format by extension (SimpleITK) see it; it
    should start with ``.tmp``. ``verify(tmp)`` is called after the file is written and
    flushed, before the rename; it raises when what was written is not complete."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise WriteError(e.errno, f"cannot create the folder {path.parent}: {_describe(e)}") from None
    clean_stale_temporaries(path.parent)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=str(path.parent))
    except OSError as e:
        raise WriteError(e.errno, f"cannot write {path}: {_describe(e)}") from None
    tmp = Path(tmp)
    if fcntl is None:  # Windows: an open handle would block the writer's rename
        os.close(fd)
        fd = None
    else:
        _lock(fd)  # held until the rename: a concurrent clean-up leaves this file alone
    try:
        try:
            yield tmp
            _flush(tmp)
            if not tmp.is_file() or tmp.stat().st_size == 0:
                raise WriteError(errno.EIO, f"cannot write {path}: the written file is empty")
            if verify is not None:
                try:
                    verify(tmp)
                except WriteError:
                    raise
                except Exception as e:
                    msg = " ".join(str(e).split()) or type(e).__name__
                    raise WriteError(errno.EIO, f"cannot write {path}: the written file is incomplete or "
                                                f"unreadable (is the disk full?): {msg}") from None
            os.chmod(tmp, 0o666 & ~_umask())   # mkstemp creates 0600 files
            os.replace(tmp, path)
        except WriteError:
            raise
        except OSError as e:
            where = f"cannot write {path}"
            raise WriteError(e.errno, f"{where}: {_describe(e)}") from None
    finally:
        if fd is not None:
            os.close(fd)
        if tmp.exists():
            try:
                tmp.unlink()
            except OSError:
                pass


def _flush(tmp: Path) -> None:
    """fsync a written file, so that a full disk shows now, before the rename."""
    fd = os.open(str(tmp), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path, data: bytes) -> Path:
    def same_size(tmp: Path) -> None:
        if tmp.stat().st_size != len(data):
            raise WriteError(errno.EIO, f"cannot write {path}: {tmp.stat().st_size} of {len(data)} bytes written")
    with atomic_path(path, verify=same_size) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
    return Path(path)


def atomic_write_text(path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))
