"""A run owns its output: an exclusive lock on a lock file, held for the life of the process.

train.py locks `output_dir/.lock` (on each node's own copy with --save_on_each_node) and
merge_params.py a lock file beside the merged model's folder, so that a second run into the
same output stops at once, with one line naming the holder, instead of both writing into one
folder. fcntl.flock, not a lock file that is merely created: the kernel releases it when the
holder dies, however it dies, so a crash never leaves a stale lock behind (on NFS, Linux turns
flock into an fcntl lock the server knows of). The holder deletes the file when it exits, while
it still holds the lock; whoever locked the deleted file in that moment sees that it is no longer
the one at the path, and locks the new one instead.
"""

import atexit
import fcntl
import os
import socket
import time

from utils.cli import UserError

LOCK_FILE = ".lock"


def in_use(what: str, path: str) -> str:
    """The problem of an output whose lock at `path` another run holds."""
    return f"{what} is in use by another run ({holder(path)}); wait for it to end, or choose another folder"


def holder(path: str) -> str:
    """Who holds the lock at `path`, as its holder wrote it ("pid 123 on host, since ...")."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read(200).strip() or "a process that has not said who it is yet"
    except OSError:
        return "an unknown process"


class OutputLock:
    """An exclusive lock on the file `path`; `what` names the output in the error, `user` the script."""

    def __init__(self, path: str, what: str, user: str):
        self.path, self.what, self.user, self.fd = path, what, user, None

    def acquire(self) -> "OutputLock":
        """Take the lock, or raise a UserError naming the holder; never waits. It is released, and
        its file deleted, when the process exits."""
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            except OSError as error:
                raise UserError(f"{self.path}: cannot create the lock file ({error.strerror})") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise UserError(in_use(self.what, self.path)) from None
            except OSError as error:
                os.close(fd)
                raise UserError(f"{self.path}: cannot lock ({error.strerror})") from None
            try:
                if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)  # its holder deleted it as it exited: lock the one at the path now
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{self.user}, pid {os.getpid()} on {socket.gethostname()}, since {stamp}\n".encode(), 0)
        self.fd = fd
        atexit.register(self.release)
        return self

    def release(self) -> None:
        """Delete the lock file, then release the lock (closing the last descriptor does)."""
        if self.fd is not None:
            try:
                os.remove(self.path)
            except OSError:
                pass  # gone with its folder, or a read-only one: the next run locks it as it is
            os.close(self.fd)
            self.fd = None


def check_not_locked(path: str, what: str) -> str | None:
    """The problem, if the lock at `path` is held now: a look before the real lock is taken (by a
    shared lock, so that the processes of one run may look at once), so that a second run says so
    rather than something less helpful about what the first has written."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None  # no lock file: nobody holds it
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return in_use(what, path)
    except OSError:
        return None  # a file system without locks: the real lock says so
    finally:
        os.close(fd)
    return None
