"""One training run at a time per output: a lock on the --out folder and on the --log file.

A lock is a small file (`.lock` in the folder, `.NAME.lock` beside a log file) holding
the pid and host of the run that holds it, so a second run can say whose it is. Where
fcntl exists (Linux, macOS) the run also holds an flock on that file: the kernel lets go
of it when the process ends in any way, kill -9 included, so a lock file left behind by
a killed run is simply taken over. Elsewhere, or on a file system without flock, the
file's existence is the lock (O_CREAT | O_EXCL), and one whose pid no longer runs on
this host is taken over; one that cannot be checked (another host) is reported with the
file to delete. Standard library only.
"""
import errno
import os
import socket

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

FOLDER_LOCK_NAME = ".lock"
HELD = (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES)  # what flock(LOCK_NB) says when another process holds it


class LockError(Exception):
    """Another run holds the lock; the message names what is locked and which process holds it."""


def _holder(path):
    """(pid, host) written in a lock file, or (None, None) when it holds neither (yet)."""
    try:
        with open(path) as file:
            words = file.read().split()
    except OSError:
        return None, None
    if len(words) == 2 and words[0].isdigit():
        return int(words[0]), words[1]
    return None, None


def _running(pid):
    """Whether a process with this pid runs on this host; None where that cannot be asked
    (on Windows os.kill(pid, 0) would end the process, not probe it)."""
    if os.name != "posix":
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it runs, as another user
        return True
    return True


class Lock:
    """Held with `with`; `what` names the locked thing in messages ("folder runs"), `flag` the option to change."""

    def __init__(self, path, what, flag):
        self.path, self.what, self.flag = path, what, flag
        self.fd = None

    @classmethod
    def on_folder(cls, folder):
        return cls(os.path.join(folder, FOLDER_LOCK_NAME), f"folder {folder}", "--out")

    @classmethod
    def on_file(cls, path):
        folder, name = os.path.split(path)
        return cls(os.path.join(folder, f".{name}.lock"), f"--log {path}", "--log")

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc_info):
        self.release()

    def _refuse(self, checked=True):
        pid, host = _holder(self.path)
        holder = f"process {pid} on {host}" if pid is not None else "another process"
        hint = "" if checked else f" (if that process has ended, delete {self.path})"
        return LockError(f"{self.what} is in use by another training run, {holder}{hint}; "
                         f"wait for it to end or give another {self.flag}")

    def acquire(self):
        if fcntl is None or not self._acquire_flock():
            self._acquire_exclusive()
        try:
            os.write(self.fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
        except OSError as error:  # a full disk: leave no lock file behind that names no one
            self.release()
            raise OSError(f"cannot write the lock of {self.what} ({self.path}): {error.strerror or error}") from None

    def _acquire_flock(self):
        """True once held; False where this file system has no flock."""
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as error:
                empty = os.fstat(fd).st_size == 0
                os.close(fd)
                if error.errno in HELD:
                    raise self._refuse() from None
                if empty:  # made by the open above: the exclusive lock below must not find it
                    os.unlink(self.path)
                return False
            try:  # its last holder may have removed the file between our open and our flock: lock the new one
                current = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                current = False
            if current:
                os.ftruncate(fd, 0)
                self.fd = fd
                return True
            os.close(fd)

    def _acquire_exclusive(self):
        for _ in range(2):
            try:
                self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                return
            except FileExistsError:
                pid, host = _holder(self.path)
                alive = _running(pid) if pid is not None and host == socket.gethostname() else None
                if alive is not False:
                    raise self._refuse(checked=alive is True) from None
                try:  # left by a run that no longer runs: take it over
                    os.unlink(self.path)
                except FileNotFoundError:
                    pass
        raise self._refuse()

    def release(self):
        if self.fd is None:
            return
        try:
            os.unlink(self.path)  # while still holding it, so no one else's lock file is removed
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None
