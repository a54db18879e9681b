"""The pruning registries: each method and channel importance is an entry carrying its function, its typed options
and what it needs, so :func:`~rewardtune.prune.prune_unet` and ``rewardtune prune`` dispatch on these declarations,
never on names. Adding a method is one function with its options dataclass (a new file) and one line below::

    METHODS.register("mine", PruneMethod(prune_mine, MineOptions, "what it does"))

A method is called as ``function(unet, ratio, options, context) -> new UNet`` (``unet`` untouched; the UNet, the
ratio and the entry's plan check have passed); an importance as ``function(unet, options, context) ->
torch-pruning importance``, on the copy being pruned. Options are dataclasses with ``field(metadata={"help": ...})``;
YAML ``options: {...}`` and ``options.key=value`` are checked against them by :func:`resolve`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from rewardtune.config import from_dict, to_dict
from rewardtune.errors import ConfigError, UserError
from rewardtune.prune.bip import BiPOptions, prune_bip
from rewardtune.prune.blocks import BlocksOptions, check_blocks_plan, prune_blocks
from rewardtune.prune.granet import GraNetOptions, prune_granet
from rewardtune.prune.importance import (
    DiffPruningOptions,
    TaylorOptions,
    diff_pruning_importance,
    magnitude_importance,
    taylor_importance,
)
from rewardtune.prune.layers import LayerTicketOptions, check_layers_plan, prune_layers
from rewardtune.prune.masks import LotteryOptions, MagnitudeOptions, prune_lottery, prune_magnitude
from rewardtune.prune.semi_structured import SemiStructuredOptions, check_semi_structured_plan, prune_semi_structured
from rewardtune.prune.structured import StructuredOptions, check_structured_plan, prune_structured
from rewardtune.registry import Registry

# prune_unet keywords that the caller supplies as tensors or callbacks (PruneContext fields), not options.
SUPPLIED = ("calibration", "alphas", "train_fn")


@dataclass
class NoOptions:
    """An entry without options."""


def _no_train_steps(options: Any) -> int | None:
    return None


def _keeps_weights(options: Any) -> bool:
    return False


@dataclass(frozen=True)
class PruneMethod:
    """A pruning method and what it needs from its caller."""

    function: Callable[..., nn.Module]
    options: type = NoOptions
    help: str = ""
    uses_importance: bool = False  # ranks channels with an IMPORTANCES entry (whose options join its own)
    # reads context.calibration itself (importances declare their own need); a callable decides from the options
    needs_calibration: bool | Callable[[Any], bool] = False
    needs_training: bool = False  # calls context.train_fn(model, masks) between pruning steps
    train_steps: Callable[[Any], int | None] = _no_train_steps  # steps per train_fn call (None: the run's default)
    speeds_up_sampling: bool = False  # smaller dense tensors (masks keep every shape and gain nothing)
    # returns a fresh random initialisation, not the model's weights (its recovery trains from scratch)
    reinitialises: Callable[[Any], bool] = _keeps_weights
    check_plan: Callable[[nn.Module, float, Any], None] | None = None  # refuses an impossible plan early


@dataclass(frozen=True)
class Importance:
    """A channel importance of methods with ``uses_importance``."""

    function: Callable[..., Any]
    options: type = NoOptions
    help: str = ""
    needs_calibration: bool = False  # needs context.calibration (gradient scores)


@dataclass
class PruneContext:
    """What a method gets besides its options: tensors and callbacks no config holds, and the chosen importance."""

    example_inputs: dict[str, torch.Tensor] | None = None  # sample [B,C,h,w], timestep [B], states [B,L,D]
    calibration: tuple[torch.Tensor, torch.Tensor] | None = None  # (clean latents [N,C,h,w], states [N,L,D])
    alphas: torch.Tensor | None = None  # [T] cumulative alphas of the scheduler (default: SD 1.x)
    train_fn: Callable[[nn.Module, dict[str, torch.Tensor]], None] | None = None  # trains a masked model
    importance: str = "magnitude"
    importance_options: Any = field(default_factory=NoOptions)

    def scorer(self, model: nn.Module) -> Any:
        """The chosen importance's torch-pruning scorer for ``model`` (gradient ones backpropagate through it)."""
        return IMPORTANCES.get(self.importance).function(model, self.importance_options, self)


METHODS: Registry[PruneMethod] = Registry("pruning method")
METHODS.register("structured", PruneMethod(
    prune_structured, StructuredOptions, "channels of every width group (Diff-Pruning on Torch-Pruning)",
    uses_importance=True, speeds_up_sampling=True, check_plan=check_structured_plan))
METHODS.register("blocks", PruneMethod(
    prune_blocks, BlocksOptions, "BK-SDM block removal", speeds_up_sampling=True, check_plan=check_blocks_plan))
METHODS.register("magnitude", PruneMethod(prune_magnitude, MagnitudeOptions, "global magnitude masks"))
METHODS.register("lottery", PruneMethod(
    prune_lottery, LotteryOptions, "lottery ticket: iterative magnitude masks with rewinding", needs_training=True,
    train_steps=lambda options: options.round_steps))
METHODS.register("granet", PruneMethod(
    prune_granet, GraNetOptions, "GraNet: gradual magnitude masks with gradient regrowth during training",
    needs_calibration=True, needs_training=True, train_steps=lambda options: options.round_steps))
METHODS.register("bip", PruneMethod(
    prune_bip, BiPOptions, "BiP: bi-level mask scores with the first-order implicit gradient", needs_calibration=True))
METHODS.register("layers", PruneMethod(
    prune_layers, LayerTicketOptions, "layer tickets: remove whole attention/mid layers chosen by SNIP",
    needs_calibration=lambda options: options.remove is None, speeds_up_sampling=True, check_plan=check_layers_plan,
    reinitialises=lambda options: options.weights == "init"))
METHODS.register("semi_structured", PruneMethod(
    prune_semi_structured, SemiStructuredOptions, "2:4 semi-structured Linear sparsity (sparse kernels on sm80+)",
    check_plan=check_semi_structured_plan))

IMPORTANCES: Registry[Importance] = Registry("pruning importance")
IMPORTANCES.register("magnitude", Importance(magnitude_importance, help="L2 norm of each channel group"))
IMPORTANCES.register("taylor", Importance(
    taylor_importance, TaylorOptions, "first-order Taylor |w dL/dw|", needs_calibration=True))
IMPORTANCES.register("diff_pruning", Importance(
    diff_pruning_importance, DiffPruningOptions, "Diff-Pruning's timestep-accumulated Taylor", needs_calibration=True))


@dataclass(frozen=True)
class PruneChoice:
    """A method and an importance with their options checked: what :func:`prune_unet` runs."""

    method_name: str
    method: PruneMethod
    options: Any
    importance_name: str
    importance: Importance
    importance_options: Any

    @property
    def needs_calibration(self) -> bool:
        own = self.method.needs_calibration
        own = own(self.options) if callable(own) else own
        return own or (self.method.uses_importance and self.importance.needs_calibration)

    @property
    def recover_init(self) -> str | None:
        """``"scratch"`` when the method hands back a random initialisation, else None (the config decides)."""
        return "scratch" if self.method.reinitialises(self.options) else None

    def given(self, keys) -> dict[str, Any]:
        """The values of option names ``keys``, as plain YAML values (tuples become lists)."""
        values = to_dict(self.options) | (to_dict(self.importance_options) if self.method.uses_importance else {})
        return {key: values[key] for key in keys}

    def check(self, unet: nn.Module, ratio: float, context: PruneContext | None = None) -> None:
        """The method's plan check, then (with a context) the calibration data the choice needs."""
        if self.method.check_plan is not None:
            self.method.check_plan(unet, ratio, self.options)
        if context is not None and self.needs_calibration:
            _check_calibration(self, context.calibration)


def _check_calibration(choice: PruneChoice, calibration) -> None:
    if calibration is None:
        who = (f"method {choice.method_name!r}" if choice.method.needs_calibration
               else f"importance {choice.importance_name!r}")
        raise UserError(f"{who} needs calibration=(latents [N,C,h,w], states [N,L,D]); use importance=magnitude or "
                        "a method without data to prune without it")
    latents, states = calibration
    if latents.shape[0] != states.shape[0]:
        raise UserError(f"calibration latents and states differ in batch size: {latents.shape[0]} vs "
                        f"{states.shape[0]}")


def _names(schema: type) -> list[str]:
    return [f.name for f in dataclasses.fields(schema) if f.init]


def option_names(method: str, importance: str = "magnitude") -> list[str]:
    """Every option ``method`` takes (with ``importance``'s when it uses one), sorted."""
    entry = METHODS.get(method)
    extra = _names(IMPORTANCES.get(importance).options) if entry.uses_importance else []
    return sorted(set(_names(entry.options)) | set(extra))


def resolve(method: str, importance: str, options: dict[str, Any]) -> PruneChoice:
    """Check ``options`` against the entries' dataclasses (``rewardtune.config.from_dict``): an unknown name or a
    wrong type is a one-line :class:`ConfigError` naming ``options.KEY``."""
    entry, scorer = METHODS.get(method), IMPORTANCES.get(importance)
    valid = option_names(method, importance)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        which = f"method {method!r}" + (f" with importance {importance!r}" if entry.uses_importance else "")
        raise ConfigError(f"config key 'options.{unknown[0]}' is not an option of {which}; valid options: "
                          f"{', '.join(valid) or 'none'}")
    own = set(_names(entry.options))
    method_options = from_dict(entry.options, {k: v for k, v in options.items() if k in own}, prefix="options.")
    rest = {k: v for k, v in options.items() if k not in own}
    importance_options = from_dict(scorer.options, rest, prefix="options.")
    return PruneChoice(method, entry, method_options, importance, scorer, importance_options)


__all__ = ["METHODS", "IMPORTANCES", "PruneMethod", "Importance", "PruneContext", "PruneChoice", "NoOptions",
           "resolve", "option_names", "SUPPLIED"]
