"""Output paths checked before any work starts, and run folders that only ever show complete results.

* :func:`check_writable_file`: a file path whose folder can be written (``/proc/x.pt`` fails at once, in one line);
  nothing is left behind by the check.
* :class:`StagedFolder`: a run writes into a hidden sibling ``.NAME.XXXX.partial`` folder; ``commit`` moves the
  files into ``NAME`` at the end, so a killed run never leaves a half-written ``NAME`` that blocks the rerun.
"""

from __future__ import annotations

import glob
import logging
import os
import shutil
import tempfile
from pathlib import Path

from rewardtune.errors import UserError
from rewardtune.utils.io import umask

logger = logging.getLogger(__name__)


def folder_mode() -> int:
    """The mode ``mkdir`` gives a new folder (0777 minus the umask)."""
    return 0o777 & ~umask()


def _missing_parents(folder: Path) -> tuple[Path, list[Path]]:
    """The nearest existing ancestor of ``folder`` (or itself) and the folders below it that do not exist yet."""
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    return folder, list(reversed(missing))


def _reason(exc: OSError) -> str:
    return (exc.strerror or str(exc)).lower()


def check_writable_folder(folder: str | Path, what: str) -> None:
    """Raise a one-line :class:`UserError` unless files can be created in ``folder`` (created for the test, then
    removed again, with any parents the test created)."""
    folder = Path(folder).expanduser()
    existing, missing = _missing_parents(folder)
    if not existing.is_dir():
        raise UserError(f"cannot write {what}: {str(existing)!r} is not a folder; choose another path")
    created: list[Path] = []
    try:
        for path in missing:
            path.mkdir()
            created.append(path)
        fd, probe = tempfile.mkstemp(prefix=".rewardtune-probe.", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise UserError(f"cannot write {what}: {_reason(exc)} in {str(folder)!r}; choose a writable path") from None
    finally:
        for path in reversed(created):
            try:
                path.rmdir()
            except OSError:
                pass


def check_writable_file(path: str | Path | None, flag: str) -> None:
    """``path`` (an option's value; None: not asked for) can be written as a file, else one-line UserError."""
    if path is None:
        return
    path = Path(path).expanduser()
    if path.is_dir():
        raise UserError(f"{flag} {str(path)!r} is a folder; give a file path")
    check_writable_folder(path.parent, f"{flag} {str(path)!r}")


class StagedFolder:
    """Stage a run's outputs next to ``out`` and move them in at the end (see the module docstring).

    ``replaceable``: names a run writes; a non-empty ``out`` that holds only these and no ``done`` file is an
    interrupted run of the same kind and is replaced (with a notice). Other non-empty folders need ``overwrite``.
    """

    def __init__(self, out: str | Path, overwrite: bool, replaceable: set[str], done: str, command: str,
                 hint: str = "choose a new out= or pass overwrite=true") -> None:
        self.out = Path(out).expanduser()
        self.overwrite, self.replaceable, self.done, self.command = overwrite, replaceable, done, command
        self.hint = hint
        self.path: Path | None = None
        self._created: list[Path] = []
        self._checked = False

    def check(self) -> None:
        """Refuse a file, a non-empty folder (unless ``overwrite`` or an interrupted run), an unwritable place."""
        out = self.out
        if out.exists() and not out.is_dir():
            raise UserError(f"output path {str(out)!r} exists and is not a folder; {self.hint.split(' or ')[0]}")
        names = {p.name for p in out.iterdir()} if out.is_dir() else set()
        if names and not self.overwrite:
            if self.done in names or not names <= self.replaceable:
                raise UserError(f"output folder {str(out)!r} is not empty; {self.hint}")
            logger.warning("output folder %s holds an interrupted `rewardtune %s` run (no %s); its files will be "
                           "replaced", out, self.command, self.done)
        check_writable_folder(out.parent, f"output folder {str(out)!r}")
        stale = sorted(out.parent.glob(f".{glob.escape(out.name)}.*.partial")) if out.parent.is_dir() else []
        if stale:  # never deleted here: another run may still be writing one
            logger.warning("%d staging folder(s) of interrupted runs lie next to %s (e.g. %s); delete them once no "
                           "run writes to %s", len(stale), out, stale[0].name, out)
        self._checked = True

    def __enter__(self) -> Path:
        if not self._checked:
            self.check()
        existing, missing = _missing_parents(self.out.parent)
        try:
            for path in missing:
                path.mkdir()
                self._created.append(path)
            self.path = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.", suffix=".partial", dir=self.out.parent))
            os.chmod(self.path, folder_mode())  # it becomes ``out``: the mode of a plain mkdir, not mkdtemp's 0700
        except OSError as exc:
            self._remove_created()
            raise UserError(f"cannot write output folder {str(self.out)!r}: {_reason(exc)}") from None
        return self.path

    def commit(self) -> Path:
        """Move the staged files into ``out`` (replacing same-named entries) and drop the staging folder."""
        assert self.path is not None
        if not self.out.exists() or (self.out.is_dir() and not any(self.out.iterdir())):
            if self.out.exists():
                self.out.rmdir()
            os.replace(self.path, self.out)
        else:
            for entry in sorted(self.path.iterdir(), key=lambda p: p.name == self.done):  # the done file last
                _replace(entry, self.out / entry.name)
            self.path.rmdir()
        self.path, self._created = None, []
        return self.out

    def __exit__(self, *exc) -> None:
        if self.path is not None:  # not committed: nothing of this run is kept
            shutil.rmtree(self.path, ignore_errors=True)
            self.path = None
            self._remove_created()

    def _remove_created(self) -> None:
        for path in reversed(self._created):
            try:
                path.rmdir()
            except OSError:
                pass
        self._created = []


def _replace(src: Path, dest: Path) -> None:
    """``os.replace`` that also replaces a folder: the old one is moved aside first, then deleted."""
    if dest.is_dir() and not dest.is_symlink():
        old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".old", dir=dest.parent))
        os.replace(dest, old / dest.name)
        os.replace(src, dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dest)


__all__ = ["check_writable_file", "check_writable_folder", "StagedFolder", "folder_mode"]
