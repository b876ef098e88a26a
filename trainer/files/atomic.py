"""Atomic, never-silently-overwriting file writes."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from ..errors import DreamLoomError
from .names import safe_name

# mkstemp makes 0600 files; published files get the usual permissions instead.
_UMASK = os.umask(0o022)
os.umask(_UMASK)
_FILE_MODE = 0o666 & ~_UMASK
_DIR_MODE = 0o777 & ~_UMASK


def give_usual_permissions(path: str | os.PathLike) -> None:
    """The permissions open() and mkdir() would give under the umask, for a file or a folder and all it holds:
    mkstemp/mkdtemp (and libraries writing through their own temporary files, as safetensors does) leave 0600 and
    0700, which a ComfyUI run by another user could not read."""
    path = Path(path)
    if path.is_dir():
        for root, _dirs, files in os.walk(path):
            os.chmod(root, _DIR_MODE)
            for name in files:
                os.chmod(os.path.join(root, name), _FILE_MODE)
    else:
        os.chmod(path, _FILE_MODE)


def _fsync_dir(path: Path) -> None:
    if os.name == "nt":
        return
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path next to `dest`; on success it is fsynced and renamed onto `dest`.

    On any error the temporary file is removed, so `dest` is either absent, the old file, or whole.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=suffix or (dest.suffix + ".tmp"), dir=dest.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, _FILE_MODE)
    try:
        yield tmp_path
        os.chmod(tmp_path, _FILE_MODE)  # again: a writer may have replaced the file (safetensors does)
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, dest)
        _fsync_dir(dest.parent)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp_path.unlink()
        raise


def atomic_write_bytes(dest: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(dest) as tmp:
        tmp.write_bytes(data)
    return Path(dest)


def atomic_write_text(dest: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(dest, text.encode("utf-8"))


def atomic_save(dest: str | os.PathLike, writer: Callable[[Path], None]) -> Path:
    """Run `writer(tmp_path)` and publish its file atomically at `dest`."""
    with atomic_path(dest) as tmp:
        writer(tmp)
    return Path(dest)


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# What os.link raises where the file system has no hard links (exFAT, FAT32, some network drives and FUSE
# mounts) rather than because of the name or the disk: EPERM on Linux, EINVAL/ENOTSUP elsewhere; Windows
# reports ERROR_INVALID_FUNCTION (1), ERROR_NOT_SAME_DEVICE (17) or ERROR_NOT_SUPPORTED (50).
_NO_HARD_LINKS = {errno.EPERM, errno.EXDEV, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.EMLINK}
_NO_HARD_LINKS_WINERROR = {1, 17, 50}


def _hard_links_unsupported(err: OSError) -> bool:
    return err.errno in _NO_HARD_LINKS or getattr(err, "winerror", None) in _NO_HARD_LINKS_WINERROR


def _open_with_file_mode(path: str, flags: int) -> int:
    return os.open(path, flags, _FILE_MODE)


def _copy_to_new_file(tmp: Path, dest: Path) -> None:
    """Create `dest` exclusively (FileExistsError if the name is taken) and copy the finished `tmp` into it.

    The fallback for file systems without hard links. `tmp` is already complete and fsynced, so only this
    copy can fail; if it does, `dest` is removed, leaving no partial file under the published name.
    """
    out = open(dest, "xb", opener=_open_with_file_mode)  # O_CREAT | O_EXCL: raises if the name exists
    try:
        with out, open(tmp, "rb") as src:
            shutil.copyfileobj(src, out, 1 << 20)
            out.flush()
            os.fsync(out.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            dest.unlink()
        raise


def publish(src: str | os.PathLike, folder: str | os.PathLike, name: str, suffix: str) -> Path:
    """Copy `src` into `folder` as `<name><suffix>`, atomically and never over a different file.

    If a file of that name exists with the same contents it is reused; if it differs, a version
    suffix (`_v2`, `_v3`, ...) is added. Returns the published path.

    The file is hard-linked from a complete temp file, which cannot overwrite. Where the file system has
    no hard links (exFAT, some network drives) it is created exclusively and filled from the temp file:
    still never over another file, and a failed copy leaves nothing under the name (a reader may see the
    file grow while it is copied).
    """
    name = safe_name(name)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    digest = file_sha256(src)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, _FILE_MODE)
    try:
        shutil.copyfile(src, tmp_path)
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        hard_links = True
        for version in range(1, 1000):
            candidate = folder / (f"{name}{suffix}" if version == 1 else f"{name}_v{version}{suffix}")
            try:
                if hard_links:
                    try:
                        os.link(tmp_path, candidate)  # fails if the name exists: no clobbering, even in a race
                    except FileExistsError:
                        raise
                    except OSError as err:
                        if not _hard_links_unsupported(err):
                            raise
                        hard_links = False
                if not hard_links:
                    _copy_to_new_file(tmp_path, candidate)  # also fails if the name exists
            except FileExistsError:
                if file_sha256(candidate) == digest:
                    return candidate
                continue
            _fsync_dir(folder)
            return candidate
        raise DreamLoomError(f"Too many versions of {name!r} in {folder}.", "Pick another output name.")
    finally:
        with contextlib.suppress(OSError):
            tmp_path.unlink()


def check_new_file(dest: str | os.PathLike, overwrite: bool, flag: str, inputs=()) -> Path:
    """Refuse to write `dest` where a file of that name exists (unless `overwrite`) or where it is one of the
    `inputs` it is made from (a tool reads them while it writes)."""
    dest = Path(dest).expanduser()
    for source in inputs:
        if os.path.lexists(dest) and os.path.lexists(source) and os.path.samefile(dest, source):
            raise DreamLoomError(
                f"{flag} {dest} is also an input of this command.", f"Give {flag} a new file name for the result."
            )
    if os.path.lexists(dest) and not overwrite:
        raise DreamLoomError(
            f"{flag} {dest} already exists; DreamLoom never overwrites a file unasked.",
            f"Give {flag} another name, or pass --overwrite to replace it.",
        )
    return dest
