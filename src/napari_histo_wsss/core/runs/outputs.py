"""Where a command may write: one policy, checked before any work starts.

An output must never replace an input (the same file, or a folder that contains or lies inside
an input folder), never replace a file this tool did not make unless the user said
``--overwrite``, and its location must be writable. Breaking a rule is one ``OutputError``
naming the path and the reason, raised up front so no slide or model work is lost to it.

Folders that collect outputs (``evaluate --save-masks``, ``compare --out``) carry a small marker
file written by :func:`claim_output_folder`: a non-empty folder without the marker holds someone
else's files and is refused; one with it is a previous output of the same command and is reused.

Single files are written with :func:`atomic_write_text` (temporary file in the same folder, then
``os.replace``), so a crash never leaves half a file over a good one.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

from ..errors import ConfigError

#: Name of the marker file in a folder of outputs; its text names the command that made it.
MARKER_NAME = ".histo-wsss-output"

#: What an output is: one file; a folder replaced as a whole (a zarr store, a run directory);
#: or a folder that receives named outputs and is otherwise left alone.
FILE, FOLDER, COLLECTION = "file", "folder", "collection"


class OutputError(ConfigError):
    """An output path that would destroy an input or someone's file, or cannot be written."""


def check_output(
    path: str | Path,
    inputs: Iterable[str | Path | None] = (),
    *,
    kind: str = FILE,
    overwrite: bool = False,
    made_here: Callable[[Path], bool] | None = None,
    command: str | None = None,
) -> Path:
    """The output ``path`` resolved, or an :class:`OutputError` if writing there is refused.

    ``inputs`` are the command's input files and folders. ``made_here(path)`` says whether an
    existing output was written by this tool (and may be replaced; a non-empty :data:`FOLDER`
    it did not make is refused even with ``overwrite``); ``command``, when given, names the
    marker a non-empty :data:`COLLECTION` must carry.
    """
    out = _resolved(path)
    for source in inputs:
        if source is not None:
            _refuse_input_clash(path, out, _resolved(source), kind)
    _refuse_unwritable_location(path, out)
    if not out.exists():
        return out
    if kind == FILE:
        if out.is_dir():
            raise OutputError("is a folder; give a file name", path)
        if not overwrite and not (made_here is not None and made_here(out)):
            raise OutputError("exists and was not written by histo-wsss; choose another path "
                              "or pass --overwrite to replace it", path)
        return out
    if not out.is_dir():
        raise OutputError("exists and is a file, not a folder; choose another path", path)
    if kind == FOLDER and made_here is not None and not made_here(out) and any(out.iterdir()):
        raise OutputError("exists, is not empty and was not written by histo-wsss; choose "
                          "another path", path)
    if (kind == COLLECTION and command and not overwrite and not _is_claimed(out, command)
            and any(out.iterdir())):
        raise OutputError(f"is not empty and holds no earlier output of `{command}`; "
                          "choose a new or empty folder, or pass --overwrite", path)
    return out


def claim_output_folder(folder: str | Path, command: str) -> Path:
    """Create ``folder`` (checked with :func:`check_output` first) and mark it as ``command``'s
    output, so running the command again may write into it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    marker = folder / MARKER_NAME
    if not marker.is_file():
        atomic_write_text(marker, f"{command}\n")
    return folder


def check_layer_name(name: str) -> str:
    """``name`` if it is safe as one path component (a napari layer name used in a store)."""
    if (not name or name in (".", "..") or any(sep in name for sep in ("/", "\\"))
            or any(ord(character) < 32 for character in name)):
        raise OutputError(f"the layer name {name!r} cannot name a file: use one without "
                          "'/', '\\', '..' or control characters")
    return name


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file in the same folder and a rename."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(handle, _new_file_mode(path))  # mkstemp makes 0600; keep what open() would
        with os.fdopen(handle, "wb") as file:
            file.write(data)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def _new_file_mode(path: Path) -> int:
    """The mode of the file being replaced, else what a plain ``open`` would give (the umask
    applied), so an atomic write is readable by the same people as a direct one."""
    try:
        return path.stat().st_mode & 0o777
    except OSError:
        pass
    try:
        status = Path("/proc/self/status").read_text()
        umask = int(next(line.split()[1] for line in status.splitlines()
                         if line.startswith("Umask:")), 8)
    except (OSError, StopIteration, ValueError):
        umask = 0o022
    return 0o666 & ~umask


def _resolved(path: str | Path) -> Path:
    return Path(path).expanduser().resolve()


def _refuse_input_clash(given: str | Path, out: Path, source: Path, kind: str) -> None:
    if out == source:
        raise OutputError(f"is an input of this command ({source}); choose another output path",
                          given)
    if source.is_dir() and source in out.parents:
        raise OutputError(f"lies inside the input folder {source}; choose another output path",
                          given)
    if out in source.parents and (kind == FOLDER or source.is_dir()):
        raise OutputError(f"contains the input {source}; choose another output path", given)


def _refuse_unwritable_location(given: str | Path, out: Path) -> None:
    """The nearest existing folder above ``out`` must be a folder and writable."""
    existing = out.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise OutputError(f"lies below {existing}, which is a file, not a folder", given)
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputError(f"cannot be written: {existing} is read-only", given)


def _is_claimed(folder: Path, command: str | None) -> bool:
    marker = folder / MARKER_NAME
    try:
        return marker.read_text().strip() == command
    except OSError:
        return False
