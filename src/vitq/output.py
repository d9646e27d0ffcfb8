"""Safe output destinations: vitq never replaces or deletes a path it did not write.

A command's ``--out`` is checked before any work starts (:func:`destination`):

* an existing path is replaced only when vitq wrote it (a folder holding :data:`MARKER`, or a file that
  ``is_ours`` recognises) and ``overwrite`` is given; anything else is refused;
* an ``--out`` equal to or inside an input (image folder, list, checkpoint), or holding one, is refused;
* the temporary folder or file is created beside the destination at once, so an unwritable place is
  found at start;
* a lock beside the destination refuses a second run on it, naming the first one;
* the temporary is removed on every exit path (errors, Ctrl-C, SIGTERM via :func:`raise_on_signals`),
  and the result is renamed onto the destination only when complete.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator

from .io import honour_umask

# The file inside every folder vitq writes; what makes a folder replaceable with --overwrite.
MARKER = "vitq-artifact.json"


class OutputError(ValueError):
    """A destination vitq must not or cannot write, naming the path and the option."""


class Terminated(BaseException):
    """SIGTERM or SIGHUP arrived: unwinds like Ctrl-C, so every temporary is removed on the way out."""


@contextmanager
def deferred_signals() -> Iterator[list[int]]:
    """Within the block, Ctrl-C and SIGTERM are noted (in the yielded list) instead of raised: for imports
    such as torch's, where an exception inside its C++ initialisation would abort the process."""
    seen: list[int] = []

    def note(signum, frame):
        seen.append(signum)

    previous = {sig: signal.signal(sig, note) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield seen
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextmanager
def raise_on_signals() -> Iterator[None]:
    """Within the block, SIGTERM and SIGHUP raise :class:`Terminated` (main thread only), so every
    ``finally`` runs and temporaries are removed; the previous handlers come back afterwards."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Terminated(signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, h in previous.items():
            signal.signal(sig, h)


def write_marker(folder: Path, command: str) -> None:
    """Mark ``folder`` as written by vitq (no time stamp: equal runs give equal bytes)."""
    from . import __version__

    (folder / MARKER).write_text(json.dumps({"written_by": "vitq", "vitq_version": __version__,
                                             "command": command}, indent=2) + "\n")


def is_vitq_folder(path: Path) -> bool:
    """True for a folder that vitq wrote (it holds :data:`MARKER`)."""
    return path.is_dir() and not path.is_symlink() and (path / MARKER).is_file()


def _inside(a: Path, b: Path) -> bool:
    return a == b or b in a.parents


def check_destination(out: str | os.PathLike, *, kind: str, overwrite: bool, inputs: Iterable = (),
                      is_ours: Callable[[Path], bool] | None = None, option: str = "--out") -> Path:
    """Check that ``out`` may be written; return it resolved.

    Args:
        out: the destination as the user gave it.
        kind: ``dir`` (a result folder) or ``file``.
        overwrite: the user allows replacing an earlier vitq result there.
        inputs: paths the run reads (folders or files; None entries are ignored).
        is_ours: for ``kind="file"``: recognises a file vitq wrote.
        option: the option's name, for messages.

    Raises:
        OutputError: the destination is refused, naming it and why.
    """
    if out is None or str(out).strip() == "":
        raise OutputError(f"{option} is empty: give a path to write to")
    given = Path(out).expanduser()
    path = given.resolve()
    if path == Path(path.anchor):
        raise OutputError(f"{option} {out}: refusing to write the file-system root")
    if given.is_symlink():
        raise OutputError(f"{option} {out} is a symbolic link; give the real path")
    for inp in inputs:
        if inp is None:
            continue
        src = Path(inp).expanduser().resolve()
        if _inside(path, src):
            raise OutputError(f"{option} {out} is the input {inp} or lies inside it; write the result elsewhere")
        if _inside(src, path):
            raise OutputError(f"{option} {out} holds the input {inp}; write the result elsewhere")
    if path.exists():
        ours = is_vitq_folder(path) if kind == "dir" else (path.is_file() and is_ours is not None and is_ours(path))
        if not ours:
            what = "a folder" if path.is_dir() else "a file"
            raise OutputError(f"{option} {out} exists and is {what} that vitq did not write; vitq never replaces "
                              "it: choose a new path")
        if not overwrite:
            raise OutputError(f"{option} {out} holds an earlier vitq result; give --overwrite to replace it")
    ancestor = path.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise OutputError(f"{option} {out}: {ancestor} is a file, not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise OutputError(f"{option} {out}: no permission to write in {ancestor}")
    return path


def _lock(path: Path, option: str) -> int:
    """Take the exclusive lock of ``path`` (a file beside it); refuse when another process holds it."""
    lock = path.with_name(f".{path.name}.vitq-lock")
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                os.close(fd)
                raise
            try:
                holder = json.loads(os.read(fd, 4096) or b"{}")
            except ValueError:
                holder = {}
            os.close(fd)
            raise OutputError(
                f"{option} {path} is being written by another vitq run (pid {holder.get('pid', '?')}, started "
                f"{holder.get('started', '?')}: {holder.get('command', '?')}); wait for it or choose another path"
            ) from None
        # The holder before us may have unlinked the file after we opened it: then our lock is on a dead
        # inode and a third process could lock a new file; start again on the current one.
        try:
            if os.stat(lock).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    info = {"pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv)}
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps(info).encode())
    return fd


def _unlock(path: Path, fd: int) -> None:
    Path(path.with_name(f".{path.name}.vitq-lock")).unlink(missing_ok=True)
    os.close(fd)


def _umask() -> int:
    from .io import umask

    return umask()


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)


def _commit(tmp: Path, path: Path, kind: str) -> None:
    # tempfile makes 0700 folders and some writers (safetensors) 0600 files: give every one the mode an
    # ordinary open() would, under the user's umask
    for p in [tmp, *(tmp.rglob("*") if tmp.is_dir() else [])]:
        honour_umask(p)
    if not path.exists():
        if kind == "file":
            os.link(tmp, path)  # fails rather than replace a file that appeared meanwhile
            tmp.unlink()
        else:
            os.rename(tmp, path)
        return
    if kind == "file":
        os.replace(tmp, path)  # an earlier vitq result, checked at start and locked since
        return
    old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
    os.rename(path, old / "previous")
    try:
        os.rename(tmp, path)
    except BaseException:
        os.rename(old / "previous", path)
        old.rmdir()
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def destination(out: str | os.PathLike, *, kind: str = "dir", overwrite: bool = False, inputs: Iterable = (),
                is_ours: Callable[[Path], bool] | None = None, option: str = "--out") -> Iterator[Path]:
    """Check and lock ``out``, yield a temporary beside it, and rename it onto ``out`` if the block succeeds.

    Arguments as :func:`check_destination`. The yielded path is an empty folder (``kind="dir"``) or a
    file name not yet created (``kind="file"``). Folders made for the destination's parents are removed
    again when the block fails and they are still empty.

    Raises:
        OutputError: the destination is refused, locked by another run, or cannot be written.
    """
    path = check_destination(out, kind=kind, overwrite=overwrite, inputs=inputs, is_ours=is_ours, option=option)
    made = []
    for parent in reversed(path.parents):
        if not parent.exists():
            try:
                parent.mkdir()
            except OSError as exc:
                _remove_empty(made)
                raise OutputError(f"{option} {out}: cannot create {parent}: {exc.strerror}") from None
            made.append(parent)
    try:
        fd = _lock(path, option)
    except OSError as exc:
        _remove_empty(made)
        raise OutputError(f"{option} {out}: cannot write in {path.parent}: {exc.strerror}") from None
    tmp = None
    try:  # again under the lock: a run that held it may have written the destination meanwhile
        check_destination(out, kind=kind, overwrite=overwrite, inputs=inputs, is_ours=is_ours, option=option)
    except BaseException:
        _unlock(path, fd)
        _remove_empty(made)
        raise
    ok = False
    try:
        try:
            if kind == "dir":
                tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
            else:
                tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)) / path.name
        except OSError as exc:
            raise OutputError(f"{option} {out}: cannot write in {path.parent}: {exc.strerror}") from None
        yield tmp
        _commit(tmp, path, kind)
        ok = True
    finally:
        if tmp is not None:
            _remove(tmp.parent if kind == "file" else tmp)
        _unlock(path, fd)
        if not ok:
            _remove_empty(made)


def _remove_empty(folders: list[Path]) -> None:
    for f in reversed(folders):
        try:
            f.rmdir()
        except OSError:
            break
