"""Run folders owned by one process: a marker that says rewardtune made the folder, an OS lock held for the run,
and a fingerprint of the settings that define the run, checked on resume.

    with claim_run_folder(out, "finetune", settings, resume=True, allow_changes=["epochs"]) as folder:
        ...  # only this process writes into ``out`` until the block ends

* A folder that exists, is not empty and holds no marker is somebody else's: refused, never written to.
* ``.rewardtune_run.json`` (the marker) records the command, the settings and every accepted change of settings.
* ``.lock`` is locked with ``fcntl.flock`` for the whole run (released by the OS even after ``kill -9``) and holds
  the owner's pid, which a second process names in its one-line refusal.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
from pathlib import Path
from typing import Any, Iterator

from rewardtune.errors import UserError
from rewardtune.utils.io import atomic_write_json

MARKER = ".rewardtune_run.json"
LOCK = ".lock"


def flatten(settings: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train": {"seed": 0}}`` -> ``{"train.seed": 0}``."""
    flat: dict[str, Any] = {}
    for key, value in settings.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def changed_keys(old: dict[str, Any], new: dict[str, Any], defaults: dict[str, Any] | None = None
                 ) -> dict[str, tuple[Any, Any]]:
    """``{dotted key: (old, new)}`` for every setting that differs (missing on one side counts as None). A key the
    old run lacks whose new value is its default in ``defaults`` is no change: a setting added to rewardtune after
    the run started, at its default, is what the run did."""
    a, b, d = flatten(old), flatten(new), flatten(defaults or {})
    added_at_default = {k for k in set(b) - set(a) if k in d and b[k] == d[k]}
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k) and k not in added_at_default}


def _is_foreign(out: Path) -> bool:
    """A folder with content but no marker: not ours to write into."""
    return out.is_dir() and not (out / MARKER).is_file() and any(p.name != LOCK for p in out.iterdir())


def _lock(out: Path) -> int:
    """Take the run folder's lock (non-blocking) and write our pid into it; returns the open descriptor."""
    fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise UserError(f"run folder {str(out)!r} is in use by another rewardtune process (pid {holder}); wait for "
                        "it to finish or choose another output folder") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def _read_marker(out: Path) -> dict[str, Any]:
    try:
        return json.loads((out / MARKER).read_text())
    except (OSError, ValueError):
        raise UserError(f"run folder {str(out)!r} has an unreadable {MARKER}; choose a new output folder") from None


def _check_settings(out: Path, marker: dict, command: str, settings: dict, allow: list[str],
                    defaults: dict | None = None) -> list[dict]:
    """Refuse to resume a run of another command or with other settings, unless each change is allowed.

    Returns the marker's change history with this resume's accepted changes appended."""
    if marker.get("command") != command:
        raise UserError(f"run folder {str(out)!r} holds a `rewardtune {marker.get('command')}` run, not "
                        f"`{command}`; choose another output folder")
    changes = changed_keys(marker.get("settings", {}), settings, defaults)
    refused = [k for k in changes if not any(k == a or k.startswith(a + ".") for a in allow)]
    if refused:
        listed = ", ".join(f"{k} ({changes[k][0]!r} -> {changes[k][1]!r})" for k in refused[:6])
        more = f" and {len(refused) - 6} more" if len(refused) > 6 else ""
        raise UserError(f"cannot resume {str(out)!r}: settings differ from the run's: {listed}{more}; pass "
                        f"resume_allow_changes=[{', '.join(refused)}] to continue with them, or choose a new "
                        "output folder")
    history = list(marker.get("changes", []))
    if changes:
        history.append({"at": _now(), "changes": {k: list(v) for k, v in changes.items()}})
    return history


def _remove_stale_temporaries(out: Path) -> None:
    """Delete the ``.NAME.XXXX.tmp`` files of :func:`rewardtune.utils.io.atomic_path` that a killed run left (we
    hold the lock, so none is being written)."""
    for path in out.rglob(".*.tmp"):
        if path.is_file():
            path.unlink(missing_ok=True)


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


@contextlib.contextmanager
def claim_run_folder(out: str | Path, command: str, settings: dict[str, Any], resume: bool,
                     allow_changes: list[str] | None = None, defaults: dict[str, Any] | None = None
                     ) -> Iterator[Path]:
    """Own ``out`` for the duration of the block (see the module docstring).

    Args:
        settings: the (nested) settings that define the run; a resume must match them key by key.
        resume: continue an existing run of ``command`` in ``out``; without it an existing run is refused.
        allow_changes: dotted keys (or section prefixes) whose values may differ on resume.
        defaults: the schema's (nested) defaults: a setting the stored run lacks is accepted at its default.

    Raises:
        UserError: ``out`` is a file, a foreign non-empty folder, locked by another process, an existing run
            without ``resume``, or a run of other settings.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"output folder {str(out)!r} exists and is not a folder; choose another path")
    if _is_foreign(out):
        raise UserError(f"output folder {str(out)!r} is not empty and was not made by rewardtune {command}; "
                        "choose a new or empty folder (rewardtune never writes into other folders)")
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd = _lock(out)
    except PermissionError:
        raise UserError(f"cannot write to output folder {str(out)!r}: permission denied; choose another path") \
            from None
    try:
        if _is_foreign(out):  # filled by someone else between the check and the lock
            raise UserError(f"output folder {str(out)!r} is not empty and was not made by rewardtune {command}; "
                            "choose a new or empty folder")
        if (out / MARKER).is_file():
            marker = _read_marker(out)
            if not resume:
                raise UserError(f"output folder {str(out)!r} already holds a run; pass resume=auto to continue it "
                                "or choose a new output folder")
            history = _check_settings(out, marker, command, settings, allow_changes or [], defaults)
            marker.update(settings=settings, changes=history)
            _remove_stale_temporaries(out)
        else:
            marker = {"command": command, "created": _now(), "settings": settings, "changes": []}
        atomic_write_json(out / MARKER, marker)
        yield out
    finally:
        os.close(fd)  # releases the flock
