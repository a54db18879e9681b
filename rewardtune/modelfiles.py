"""Where model files come from: the shipped assets, local paths, the Hugging Face cache and hub ids, and the one
line that says how to supply a file that is none of these.

    folder = asset("shapes-clip")                                   # rewardtune/assets/shapes-clip (shipped)
    path = hub_file("xswu/HPSv2", "HPS_v2_compressed.pt", what="HPS v2.0 checkpoint", option="checkpoint")
    clip = from_pretrained_or_explain(CLIPModel.from_pretrained, source, "PickScore model", "model")
    raise not_found_error("model 'sd15'", "stable-diffusion-v1-5/stable-diffusion-v1-5", option="--model")

Every "not cached" error of every loader is :func:`not_found_message`:

    WHAT is not in the local Hugging Face cache and could not be downloaded; on a connected machine run
    `hf download REPO [FILE]` (then copy the cache or set HF_HOME), or pass OPTION=PATH

(one line; a URL source says where to download it instead). The network policy (cache first, the hub only when
allowed and reachable, no minute of retries) is :mod:`rewardtune.hub`'s; its names are re-exported here. This
module imports only the standard library, so the torch-free name tables (:mod:`rewardtune.models_table`) use it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterable

from rewardtune import hub
from rewardtune.errors import ModelNotFoundError
from rewardtune.hub import cached_file, offline_mode, offline_unless_reachable, use_network

ASSETS = Path(__file__).resolve().parent / "assets"
HF_CACHE = "the local Hugging Face cache"


def asset(*parts: str, must_exist: bool = True) -> Path:
    """A file or folder shipped in ``rewardtune/assets`` (e.g. ``asset("shapes-clip")``); a missing one is a
    one-line :class:`ModelNotFoundError` (a broken install), unless ``must_exist=False``."""
    path = ASSETS.joinpath(*parts)
    if must_exist and not path.exists():
        raise ModelNotFoundError(f"shipped model file {'/'.join(parts)!r} is missing from {str(ASSETS)!r}; "
                                 "reinstall rewardtune (pip install -e .) or pass the path of your own copy")
    return path


def is_hub_id(source: str) -> bool:
    """``org/name`` (one slash, not written as a path): what ``from_pretrained`` downloads from the hub."""
    return source.count("/") == 1 and not source.startswith((".", "/", "~"))


def looks_local(source: str) -> bool:
    """An existing path, or text written as one (``./x``, ``/x``, ``~/x``, ``a/b/c``) rather than a hub id (``name``
    or ``org/name``)."""
    return Path(source).expanduser().exists() or source.startswith((".", "/", "~")) or source.count("/") > 1


def _option_text(option: str) -> str:
    return f"{option} PATH" if option.startswith("-") else f"{option}=PATH"


def not_found_message(what: str, source: str, filename: str | None = None, *, option: str | None = None,
                      local: str | None = None, more: Iterable[str] = (), plural: bool = False,
                      cache: str | None = None, into: str | None = None, reason: str | None = None) -> str:
    """The one line for model files that are neither local, nor cached, nor downloadable here.

    Args:
        what: the thing, as the user knows it (``"HPS v2.0 checkpoint"``, ``"model 'sd15'"``); ``plural`` for
            ``"... weights are"``.
        source: a hub repo id (the fix is ``hf download REPO [FILENAME]``) or an http(s) URL (the fix is to
            download it into ``into``; ``cache`` names where it was looked for, default the HF cache).
        option: the option that takes a local path instead (``"checkpoint"`` -> ``checkpoint=PATH``, ``"--model"``
            -> ``--model PATH``); ``local`` names what PATH is (``"pipeline folder"`` -> ``a local pipeline folder
            with --model PATH``). ``more``: further alternatives (``"set $HPS_ROOT"``).
        reason: why nothing was downloaded, when known (``"HF_HUB_OFFLINE is set"``).
    """
    if source.startswith(("http://", "https://")):
        where, fix = cache or "the local cache", f"on a connected machine download {source} into {into or 'it'}"
    else:
        target = f"{source} {filename}" if filename else source
        where = cache or HF_CACHE
        fix = f"on a connected machine run `hf download {target}` (then copy the cache or set HF_HOME)"
    ways = [fix]
    if option:
        ways.append(f"pass a local {local} with {_option_text(option)}" if local else f"pass {_option_text(option)}")
    ways.extend(more)
    how = ways[0] if len(ways) == 1 else ", ".join(ways[:-1]) + ", or " + ways[-1]
    why = f" ({reason})" if reason else ""
    return f"{what} {'are' if plural else 'is'} not in {where} and could not be downloaded{why}; {how}"


def not_found_error(what: str, source: str, filename: str | None = None, **how: Any) -> ModelNotFoundError:
    """:class:`ModelNotFoundError` with :func:`not_found_message` (same arguments); ``raise`` it."""
    return ModelNotFoundError(not_found_message(what, source, filename, **how))


def hub_file(repo_id: str, filename: str, *, what: str | None = None, repo_type: str = "model",
             **how: Any) -> Path:
    """``filename`` of ``repo_id`` from the HF cache, else downloaded when the hub is allowed and reachable;
    otherwise :func:`not_found_error` (``what`` defaults to ``"FILENAME of REPO"``; ``how``: ``option=``,
    ``local=``, ``more=``, ... of :func:`not_found_message`)."""
    explain = not_found_message(what or f"{filename} of {repo_id}", repo_id, filename, **how)
    return hub.hub_file(repo_id, filename, explain=explain, repo_type=repo_type)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def from_pretrained_or_explain(loader: Callable[[str], Any], source: str, what: str, option: str) -> Any:
    """``loader(source)`` where ``source`` is a hub id or local folder (``from_pretrained``-like); a missing or
    unreadable model becomes one line of :class:`ModelNotFoundError` that names ``what``/``source`` and how to
    supply it (``option=PATH``). Hub ids are read from the cache only unless the hub is allowed and reachable."""
    source = str(source)
    if looks_local(source):
        folder = Path(source).expanduser()
        if not folder.is_dir():
            raise ModelNotFoundError(f"{what} folder {source!r} does not exist; pass a folder written by "
                                     f"save_pretrained with {_option_text(option)}")
        try:
            return loader(str(folder))
        except (OSError, ValueError) as exc:
            raise ModelNotFoundError(f"cannot load {what} from folder {source!r}: {_first_line(exc)}") from None
    try:
        with offline_unless_reachable():  # no network: the cache only, and no minute of retries
            return loader(source)
    except OSError:
        raise not_found_error(f"{what} {source!r}", source, option=option, local="folder") from None
    except ValueError as exc:
        raise ModelNotFoundError(f"cannot load {what} {source!r}: {_first_line(exc)}") from None


__all__ = ["ASSETS", "asset", "is_hub_id", "looks_local", "not_found_message", "not_found_error", "hub_file",
           "from_pretrained_or_explain", "cached_file", "offline_mode", "offline_unless_reachable", "use_network"]
