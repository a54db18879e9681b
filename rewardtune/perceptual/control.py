"""Scripted controllers with continuous parameters for the procedural door and pour tasks (imitation by RL).

A policy is a parameter vector ``theta``; an episode runs the scripted controller in a scene (a seeded
:func:`rewardtune.perceptual.demos._style`: background, lighting, colours, object positions) and is rendered with
the demos' drawing code. Lengths are in units of the 64-px layout (1 unit = 1 px at 64 px).

* **door**, ``theta = (gx, gy, turn, pull)``: reach (14 frames) eases the hand from its start to the handle's grip
  point ``tip + (0, 3)`` offset by ``(gx, gy)``; the hand holds the handle iff that offset is within
  ``GRASP_RADIUS = 3`` units. Turn (12 frames): if held, the handle eases to ``clip(turn, 0, 1)`` (1 rad at 1).
  Open (14 frames): if held and the handle is turned past ``UNLATCH = 0.75``, the door eases open to
  ``clip(pull, 0, 1)``; the hand follows the grip. 4 still frames. Success: the door open ``>= 0.9``.
  True progress per frame: ``(reach + turn + swing) / 3`` with ``reach = 1 - min(1, |hand - grip| / |start -
  grip|)`` (the hand's final offset after the reach). The demonstrated motion is ``theta = (0, 0, 1, 1)``.
* **pour**, ``theta = (dx, dy, tilt)``: bring (14 frames) eases the bottle to the pouring place offset by
  ``(dx, dy)``; pour (14 frames) eases the tilt to ``clip(tilt, 0, 1)`` over 6 frames and holds it; liquid flows
  while the tilt exceeds 0.5, into the glass (level ``+= 0.085 * (tilt - 0.5) / 0.5`` per frame, at most 0.85)
  iff ``|dx| <= 3`` and ``-6 <= dy <= 3``, else onto the table. Leave (12 frames): the bottle straightens and
  moves away; 4 still frames. Success: level ``>= 0.75``. True progress: ``(reach + level / 0.85 + leave) / 3``.
  The demonstrated motion is ``theta = (0, 0, 1)``.

:func:`episode` returns the frames (uint8 ``[T,64,64,3]``), the true progress ``[T]`` and success.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rewardtune.errors import UserError
from rewardtune.perceptual.demos import (
    TASKS,
    Canvas,
    _smooth,
    _style,
    bottle_places,
    door_handle,
    draw_door_state,
    draw_pour_state,
    finish_frame,
    hand_start,
)

GRASP_RADIUS, UNLATCH, OPEN_SUCCESS = 3.0, 0.75, 0.9
FLOW, FULL, FILL_SUCCESS = 0.085, 0.85, 0.75
PARAMETERS = {"door": ("gx", "gy", "turn", "pull"), "pour": ("dx", "dy", "tilt")}
DEMONSTRATED = {"door": np.array([0.0, 0.0, 1.0, 1.0]), "pour": np.array([0.0, 0.0, 1.0])}


@dataclass
class Episode:
    frames: np.ndarray
    progress: np.ndarray
    success: bool


def ease(n: int) -> np.ndarray:
    """``[n]`` smoothstep fractions ``1/n .. 1`` (the demos' easing)."""
    return _smooth(np.arange(1, n + 1) / n)


def scene(task: str, seed: int, size: int = 64) -> dict:
    """A seeded scene style (the demos' variety; the seeds are disjoint from the demos' by a third key)."""
    if task not in TASKS:
        raise UserError(f"unknown control task {task!r}; choose one of: {', '.join(TASKS)}")
    return _style(np.random.default_rng([seed, TASKS.index(task), 7]), size)


def door_states(theta: np.ndarray, style: dict, s: float) -> list[tuple]:
    """``(hand [2], turn, swing, reach)`` per frame of the door controller (module docstring)."""
    gx, gy, turn_to, pull = (float(v) for v in theta)
    start = hand_start(style, s)
    grip = door_handle(style, s, 0.0, 0.0)[1] + np.array([0.0, 3.0 * s])
    target = grip + s * np.array([gx, gy])
    held = np.hypot(gx, gy) <= GRASP_RADIUS
    reach0 = np.linalg.norm(start - grip)
    states = [(start + (target - start) * u, 0.0, 0.0) for u in ease(14)]
    turn_final = float(np.clip(turn_to, 0, 1)) if held else 0.0
    states += [(None, turn_final * u, 0.0) for u in ease(12)]
    swing_final = float(np.clip(pull, 0, 1)) if held and turn_final >= UNLATCH else 0.0
    states += [(None, turn_final, swing_final * u) for u in ease(14)] + [(None, turn_final, swing_final)] * 4
    out = []
    for k, (hand, turn, swing) in enumerate(states):
        reach = 1 - min(1.0, float(np.linalg.norm((target if k >= 14 else hand) - grip)) / reach0)
        if hand is None:
            hand = door_handle(style, s, turn, swing)[1] + np.array([0.0, 3.0 * s]) if held else target
        out.append((hand, turn, swing, reach))
    return out


def pour_states(theta: np.ndarray, style: dict, s: float) -> list[tuple]:
    """``(bottle [2], tilt, level, stream x or None, progress)`` per frame of the pour controller."""
    dx, dy, tilt_to = (float(v) for v in theta)
    start, above, away = bottle_places(style, s)
    target = above + s * np.array([dx, dy])
    into_glass = abs(dx) <= 3 and -6 <= dy <= 3
    tilt_final = float(np.clip(tilt_to, 0, 1))
    plan = [(start + (target - start) * u, 0.0, 0.0) for u in ease(14)]
    plan += [(target, tilt_final * u, 0.0) for u in np.concatenate([ease(6), np.ones(8)])]
    plan += [(target + (away - target) * u, tilt_final * (1 - u), u) for u in ease(12)] + [(away, 0.0, 1.0)] * 4
    reach0, level, out = np.linalg.norm(start - above), 0.0, []
    for k, (bottle, tilt, leave) in enumerate(plan):
        flowing = tilt > 0.5 and level < FULL and 14 <= k < 28
        if flowing and into_glass:
            level = min(FULL, level + FLOW * (tilt - 0.5) / 0.5)
        reach = 1 - min(1.0, float(np.linalg.norm((target if k >= 14 else bottle) - above)) / reach0)
        stream = bottle[0] + 7 * s if flowing else None
        out.append((bottle, tilt, level, stream, (reach + level / FULL + leave) / 3))
    return out


def episode(task: str, theta: np.ndarray, scene_seed: int, size: int = 64, noise: float = 0.02,
            render: bool = True) -> Episode:
    """Run ``theta``'s controller in scene ``scene_seed``: frames (if ``render``), true progress, success."""
    theta = np.asarray(theta, np.float64)
    if task not in PARAMETERS or theta.shape != (len(PARAMETERS[task]),):
        raise UserError(f"{task} policies have {len(PARAMETERS.get(task, ()))} parameters "
                        f"{PARAMETERS.get(task)}, got shape {theta.shape}")
    style, s = scene(task, scene_seed, size), size / 64
    rng = np.random.default_rng([scene_seed, 99])
    frames = []
    if task == "door":
        states = door_states(theta, style, s)
        progress = np.array([(reach + turn + swing) / 3 for _, turn, swing, reach in states])
        success = states[-1][2] >= OPEN_SUCCESS
        draw = [lambda c, st=st: draw_door_state(c, style, st[0], st[1], st[2]) for st in states] if render else []
    else:
        states = pour_states(theta, style, s)
        progress = np.array([st[-1] for st in states])
        success = states[-1][2] >= FILL_SUCCESS
        draw = [lambda c, st=st: draw_pour_state(c, style, st[0], st[1], st[2], st[3]) for st in states] \
            if render else []
    for paint in draw:
        canvas = Canvas(style["background"])
        paint(canvas)
        frames.append(finish_frame(canvas, style, rng, noise))
    return Episode(np.stack(frames) if frames else np.zeros((0, size, size, 3), np.uint8), progress, bool(success))


__all__ = ["Episode", "episode", "scene", "PARAMETERS", "DEMONSTRATED", "door_states", "pour_states"]
