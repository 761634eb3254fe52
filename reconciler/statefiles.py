"""Every file tproxyd keeps for itself (state_dir's records, the rendered-config cache) is read
and written here, and nowhere else.

These files steer root: `down` writes back the sysctl values a record holds, and the cache and
the verified set contents are pickles. So a file is read only if nobody but us could have
written it: it and its directory belong to our effective user and are writable by no one else,
and it is a regular file, not a link (opened with O_NOFOLLOW, checked on the descriptor, the
directory checked on its own descriptor, which the file is then opened relative to). Anything
else is refused with a warning naming it and treated as absent.

A write goes to a fresh temp file in the same directory (O_CREAT|O_EXCL|O_NOFOLLOW, mode 0600),
is fsynced, then renamed over the name: a planted link is replaced, never followed, and a
reader sees the old file or the new one, whole.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import pickle
import secrets
import stat
from typing import Iterator, Set, Tuple

log = logging.getLogger("tproxyd")
_warned: Set[Tuple[str, str]] = set()  # said once per file and reason: the daemon reads often


class UntrustedError(PermissionError):
    """A state directory someone else could write to."""

    def __init__(self, path: str, why: str):
        super().__init__(errno.EPERM, f"state directory not trusted: {why}", path)
        self.why = why


def _untrusted(st: os.stat_result) -> str | None:
    """Why a file or directory with this stat could hold someone else's bytes, or None."""
    if st.st_uid != os.geteuid():
        return f"owned by uid {st.st_uid}, not {os.geteuid()}"
    if st.st_mode & 0o022:
        return f"writable by group or others (mode {stat.S_IMODE(st.st_mode):04o})"
    return None


def refuse(path: str, why: str) -> None:
    """Say (once per file and reason) that path, or part of it, is ignored, and why."""
    if (path, why) not in _warned:
        _warned.add((path, why))
        log.warning("ignoring %s: %s", path, why)


@contextlib.contextmanager
def _directory(path: str, create: bool = False) -> Iterator[int]:
    """A descriptor of the directory, once checked: UntrustedError if someone else could write
    to it. Files are opened relative to it, so the checked directory is the one used."""
    if create:
        os.makedirs(path, mode=0o700, exist_ok=True)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        why = _untrusted(os.fstat(fd))
        if why:
            raise UntrustedError(path, why)
        yield fd
    finally:
        os.close(fd)


def read(path: str) -> bytes | None:
    """The file's bytes; None when it is absent, or refused (with a warning)."""
    directory, name = os.path.split(os.path.abspath(path))
    try:
        with _directory(directory) as dfd:
            # O_NONBLOCK: a planted FIFO must not hang the daemon until it is refused
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK,
                         dir_fd=dfd)
    except FileNotFoundError:
        return None
    except UntrustedError as exc:
        refuse(path, f"its directory {directory} is {exc.why}")
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            refuse(path, "a symbolic link")
            return None
        raise
    with open(fd, "rb") as f:
        st = os.fstat(f.fileno())
        why = "not a regular file" if not stat.S_ISREG(st.st_mode) else _untrusted(st)
        if why:
            refuse(path, why)
            return None
        return f.read()


def load_pickle(path: str) -> object | None:
    """Unpickled contents of a file that passes read(); None when absent, refused or damaged."""
    try:
        data = read(path)
        return None if data is None else pickle.loads(data)
    except Exception:  # a damaged or outdated file is absent, never an error
        return None


def write(path: str, data: bytes) -> None:
    """Replace path with data, whole, mode 0600. OSError (UntrustedError for a directory
    someone else could write to) when it cannot."""
    directory, name = os.path.split(os.path.abspath(path))
    with _directory(directory, create=True) as dfd:
        tmp = f".{name}.{secrets.token_hex(4)}"  # dot: not an entry to the cache's pruning
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600, dir_fd=dfd)
        try:
            with open(fd, "wb") as f:
                os.fchmod(f.fileno(), 0o600)  # whatever the umask
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=dfd)
            raise
        os.fsync(dfd)  # the rename too


def remove(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
