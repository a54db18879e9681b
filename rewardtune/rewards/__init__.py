"""Reward models behind one interface: ``load_reward(spec, **options)(images, prompts) -> Tensor[B]``.

    reward = load_reward("shapes_gold")
    reward = load_reward("pickscore:10,hpsv2:2,aesthetic:0.05", device="cuda")   # weighted sum
    scores = reward(images, prompts)          # images [B,3,H,W] in [0,1]; reward.components for each part
    reward = load_reward("perceptual:reward.pt")                                 # learned from demo videos

Factories are registered as ``"module:function"`` strings and imported on first use, so heavy libraries
(open_clip, transformers models) load only when their reward is asked for.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rewardtune.errors import UserError
from rewardtune.models_table import PATH_REWARD_FACTORIES, REWARD_FACTORIES
from rewardtune.registry import Registry
from rewardtune.rewards.base import Reward, check_inputs
from rewardtune.rewards.combine import WeightedSum, check_not_empty, check_unique, parse_spec, parse_term, parse_weight

REWARDS: Registry[str] = Registry("reward")
for _name, _target in REWARD_FACTORIES.items():
    REWARDS.register(_name, _target)

# Rewards whose name carries a file: "perceptual:PATH" ("perceptual:PATH:WEIGHT" inside a weighted sum).
PATH_REWARDS: Registry[str] = Registry("path reward")
for _name, _target in PATH_REWARD_FACTORIES.items():
    PATH_REWARDS.register(_name, _target)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _path_term(part: str, spec: str) -> tuple[str, float]:
    """``NAME:PATH`` or ``NAME:PATH:WEIGHT`` (an existing file named ``PATH:WEIGHT`` stays a path)."""
    head, _, rest = part.partition(":")
    body, sep, tail = rest.rpartition(":")
    if sep and body and not Path(rest).is_file() and (_is_number(tail) or Path(body).is_file()):
        rest, weight = body, parse_weight(tail.strip(), part, spec)
    else:
        weight = 1.0
    if not rest:
        raise UserError(f"reward {head!r} needs a file: {head}:PATH (e.g. {head}:reward.pt)")
    if not Path(rest).is_file():
        raise UserError(f"{head} reward file {rest!r} does not exist or is not a file; give the path of an "
                        f"existing file ({head}:PATH)")
    return f"{head}:{rest}", weight


def _parse_terms(spec: str) -> list[tuple[str, float]]:
    """The one reward-spec parser: checked ``(name, weight)`` terms, nothing loaded (see :func:`check_reward_spec`)."""
    check_not_empty(spec)
    terms = []
    for part in (p.strip() for p in spec.split(",")):
        head = part.partition(":")[0].strip()
        term = _path_term(part, spec) if head in PATH_REWARDS else parse_term(part, spec)
        if head not in PATH_REWARDS and term[0] not in REWARDS:
            raise UserError(f"unknown reward {term[0]!r}; choose one of: {', '.join(reward_names())}")
        terms.append(term)
    return check_unique(terms, spec)


def check_reward_spec(spec: str, key: str = "--reward") -> list[tuple[str, float]]:
    """Validate a reward spec without loading any model: known names or ``NAME:PATH`` with an existing file,
    finite weights, no repeats. Returns ``[(name, weight), ...]``.

    Raises:
        UserError: one line prefixed by ``key`` (the option or config key the spec came from).
    """
    try:
        return _parse_terms(spec)
    except UserError as exc:
        raise UserError(f"{key}: {exc}") from None


def _factory(name: str) -> Callable[..., Reward]:
    head, sep, path = name.partition(":")
    if sep and head in PATH_REWARDS:
        module, _, function = PATH_REWARDS.get(head).partition(":")
        return functools.partial(getattr(importlib.import_module(module), function), path)
    module, _, function = REWARDS.get(name).partition(":")
    return getattr(importlib.import_module(module), function)


def _accepted_options(factory: Callable[..., Reward]) -> list[str] | None:
    """The keyword names ``factory`` takes, sorted; None when it takes any (``**kwargs``)."""
    params = inspect.signature(factory).parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return sorted(p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))


def _load_one(name: str, options: dict[str, Any]) -> Reward:
    """Build one registered reward; an option its factory's signature lacks is a one-line error."""
    factory = _factory(name)
    accepted = _accepted_options(factory)
    unknown = sorted(set(options) - set(accepted)) if accepted is not None else []
    if unknown:
        raise UserError(f"reward {name!r} does not take option {unknown[0]!r}; accepted options: "
                        f"{', '.join(accepted) or 'none'}")
    reward = factory(**options)
    reward.name = name
    return reward


def load_reward(spec: str, **options: Any) -> Reward:
    """A registered reward by name, or a weighted sum ``"a:w1,b:w2"``.

    For a sum, ``device`` and ``dtype`` apply to every component, and options for one component go in a dict
    under its name: ``load_reward("pickscore:10,hpsv2:2", hpsv2={"checkpoint": path})``.
    """
    terms = _parse_terms(spec)
    if len(terms) == 1 and terms[0][1] == 1.0 and (":" not in spec or terms[0][0] == spec.strip()):
        return _load_one(terms[0][0], options)
    shared = {k: options.pop(k) for k in ("device", "dtype") if k in options}
    names = [n for n, _ in terms]
    stray = sorted(set(options) - set(names))
    if stray:
        raise UserError(f"option {stray[0]!r} is not a component of {spec!r}; pass per-component options as "
                        f"{names[0]}={{...}}")
    parts = {n: _load_one(n, {**shared, **dict(options.get(n, {}))}) for n in names}
    return WeightedSum(parts, dict(terms))


def reward_names() -> list[str]:
    return REWARDS.names() + [f"{name}:PATH" for name in PATH_REWARDS.names()]


__all__ = [
    "PATH_REWARDS",
    "REWARDS",
    "Reward",
    "WeightedSum",
    "check_inputs",
    "check_reward_spec",
    "load_reward",
    "parse_spec",
    "reward_names",
]
