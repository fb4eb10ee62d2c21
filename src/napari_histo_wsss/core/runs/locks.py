"""Lock files: one writer at a time for a run directory being trained or a slide output.

Two processes writing the same output would each undo the other's work (both predicting every
tile; ``--no-resume`` in one deleting the other's live store). A writer therefore first creates
a small lock file with ``O_CREAT | O_EXCL`` (atomic on local and NFSv3+ file systems) holding
its pid, host and start time, and removes it when done. A second writer gets one
:class:`LockedError` naming the holder.

A lock whose process is gone (same host, pid not alive: a crash or SIGKILL) is stale and is
taken over, said in one line. Taking over goes through a second exclusive file, so of two
processes finding the same stale lock only one replaces it. A lock from another host cannot be
checked from here and is respected; its message says which file to delete if that run is over.

The same process may take a lock it already holds (the pipeline's stages run one inside the
other's lifetime); the file goes when the outermost holder lets go.
"""

from __future__ import annotations

import errno
import functools
import json
import os
import socket
import threading
import time
from collections.abc import Callable, Generator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..events import Event, Message

#: Lock file inside a run directory (run directories are never deleted as a whole).
RUN_LOCK_NAME = ".histo-wsss.lock"

_held: dict[Path, int] = {}
_held_guard = threading.Lock()


class LockedError(ConfigError):
    """The output is being written by another live process."""


def sibling_lock_path(output: str | Path) -> Path:
    """The lock of an output that may be deleted and recreated as a whole (a zarr store):
    a hidden file beside it, so removing the store never removes its lock."""
    output = Path(output)
    return output.parent / f".{output.name}.lock"


@contextmanager
def hold_lock(lock_path: str | Path, what: str | Path,
              say: Callable[[str], None] | None = None) -> Iterator[Path]:
    """Hold ``lock_path`` while the block runs; ``what`` names the output in messages and
    ``say`` receives the one line about a stale lock taken over."""
    lock_path = Path(lock_path).absolute()
    with _held_guard:
        nested = _held.get(lock_path, 0) > 0
        if nested:
            _held[lock_path] += 1
    if not nested:
        _acquire(lock_path, what, say)
        with _held_guard:
            _held[lock_path] = 1
    try:
        yield lock_path
    finally:
        with _held_guard:
            _held[lock_path] -= 1
            last = _held[lock_path] == 0
            if last:
                del _held[lock_path]
        if last:
            _release(lock_path)


def locked_job(lock_path: str | Path, what: str | Path, stage: str,
               job: Generator[Event, None, Any]) -> Generator[Event, None, Any]:
    """Run the job generator ``job`` while holding ``lock_path``; a stale lock taken over is
    said as a ``Message``. Under torchrun only rank 0 (the process that writes) locks."""
    if os.environ.get("RANK", "0") != "0":
        return (yield from job)
    said: list[str] = []
    with hold_lock(lock_path, what, said.append):
        for line in said:
            yield Message(stage, line)
        return (yield from job)


def writes_run(stage: str) -> Callable:
    """Decorate a job generator function whose first argument is a ``RunDirectory``: its body
    runs holding the run's lock (taken when the job starts, released when it ends)."""

    def decorate(job_function: Callable[..., Generator]) -> Callable[..., Generator]:
        @functools.wraps(job_function)
        def locked(run, *args: Any, **kwargs: Any) -> Generator[Event, None, Any]:
            return locked_job(run.lock_path, run.root, stage, job_function(run, *args, **kwargs))

        return locked

    return decorate


def read_holder(lock_path: str | Path) -> dict | None:
    """The holder recorded in a lock file (pid, host, started), or None if there is none."""
    try:
        holder = json.loads(Path(lock_path).read_text())
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else {}


def is_stale(holder: dict | None) -> bool:
    """Whether a recorded holder is certainly gone: same host and its pid is not alive.
    An unreadable or half-written record counts as stale only via :func:`_acquire`'s age rule."""
    if not holder or holder.get("host") != socket.gethostname():
        return False
    pid = holder.get("pid")
    return isinstance(pid, int) and not _pid_alive(pid)


# ---------------------------------------------------------------------------------- internals

#: An unreadable lock file older than this is a crash between create and write: stale.
UNREADABLE_GRACE_SECONDS = 10.0


def _acquire(lock_path: Path, what, say) -> None:
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(3):
        if _create(lock_path):
            return
        holder = read_holder(lock_path)
        if holder is None and not lock_path.exists():
            continue  # released between our two looks: try again
        if not (is_stale(holder) or _unreadable_and_old(lock_path, holder)):
            raise LockedError(f"is being written by {_describe(holder)}; wait for it to "
                              f"finish (or, if that process is gone, delete {lock_path})", what)
        if _take_over(lock_path, holder):
            if say is not None:
                say(f"took over the lock of {what} left by {_describe(holder)}, which is gone")
            return
    raise LockedError(f"could not take its lock {lock_path}; another process is taking it "
                      "over at the same moment: run again", what)


def _create(lock_path: Path) -> bool:
    """Create the lock file holding this process's record; False if it already exists."""
    try:
        handle = os.open(lock_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(handle, "w") as file:
        json.dump(_me(lock_path), file)
    return True


def _take_over(lock_path: Path, stale: dict | None) -> bool:
    """Replace a stale lock by ours; only one of several processes doing this wins."""
    guard = lock_path.with_name(lock_path.name + ".takeover")
    if not _create(guard):
        if not is_stale(read_holder(guard)) and not _unreadable_and_old(guard, None):
            return False
        guard.unlink(missing_ok=True)  # a takeover that crashed half-way
        if not _create(guard):
            return False
    try:
        if read_holder(lock_path) != stale:
            return False  # someone else replaced it meanwhile
        lock_path.unlink(missing_ok=True)
        return _create(lock_path)
    finally:
        guard.unlink(missing_ok=True)


def _release(lock_path: Path) -> None:
    if read_holder(lock_path) == _me(lock_path):
        lock_path.unlink(missing_ok=True)


_started: dict[Path, str] = {}


def _me(lock_path: Path) -> dict:
    started = _started.setdefault(lock_path, time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    return {"pid": os.getpid(), "host": socket.gethostname(), "started": started}


def _describe(holder: dict | None) -> str:
    if not holder:
        return "another process (its lock file is unreadable)"
    return (f"process {holder.get('pid')} on {holder.get('host')} (since "
            f"{holder.get('started')})")


def _unreadable_and_old(lock_path: Path, holder: dict | None) -> bool:
    if holder:
        return False
    try:
        return time.time() - lock_path.stat().st_mtime > UNREADABLE_GRACE_SECONDS
    except OSError:
        return False


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError as error:
        return error.errno == errno.EPERM  # exists, owned by someone else
    return not _is_zombie(pid)


def _is_zombie(pid: int) -> bool:
    """A finished child not yet reaped still answers kill(0); /proc says it is a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False
