"""Captions for the shapes world: templates with synonyms, a prompt parser, and the shipped prompt sets.

Every caption names the object's colour and shape; size, position and background are each named with probability
1/2. :func:`parse_prompt` reads the attributes back from any text (full templates or free-form prompts such as
"a red circle"), which is what the oracle's fidelity score checks.
"""

from __future__ import annotations

import re

import numpy as np

from rewardtune.shapes.world import BACKGROUNDS, COLORS, POSITIONS, SHAPES, SIZES, Scene, is_heldout_combo

COLOR_WORDS: dict[str, tuple[str, ...]] = {
    "red": ("red", "crimson", "scarlet"),
    "orange": ("orange", "tangerine", "amber"),
    "yellow": ("yellow", "golden", "lemon"),
    "green": ("green", "emerald", "grass green"),
    "blue": ("blue", "cobalt", "sapphire"),
    "purple": ("purple", "violet", "magenta"),
}
SHAPE_WORDS: dict[str, tuple[str, ...]] = {
    "circle": ("circle", "disc", "disk", "round dot"),
    "square": ("square", "box", "block"),
    "triangle": ("triangle", "wedge", "triangular shape"),
}
SIZE_WORDS: dict[str, tuple[str, ...]] = {
    "small": ("small", "tiny", "little"),
    "medium": ("medium", "medium-sized", "mid-sized"),
    "large": ("large", "big", "huge"),
}
BACKGROUND_WORDS: dict[str, tuple[str, ...]] = {
    "white": ("white", "snow white"),
    "black": ("black", "dark"),
    "gray": ("gray", "grey"),
    "cream": ("cream", "beige"),
}
ROW_WORDS = {"top": ("top", "upper"), "middle": ("middle",), "bottom": ("bottom", "lower")}
COLUMN_WORDS = {"left": ("left",), "center": ("center", "centre"), "right": ("right",)}
_BACKGROUND_PHRASES = ("on a {b} background", "against a {b} backdrop", "on {b}")
TEMPLATES = (
    "a {size}{color} {shape}{position}{background}",
    "an image of a {size}{color} {shape}{position}{background}",
    "a drawing of a {size}{color} {shape}{position}{background}",
    "a simple picture of a {size}{color} {shape}{position}{background}",
    "{size}{color} {shape}{position}{background}",
)

assert set(COLOR_WORDS) == set(COLORS) and set(SHAPE_WORDS) == set(SHAPES)
assert set(SIZE_WORDS) == set(SIZES) and set(BACKGROUND_WORDS) == set(BACKGROUNDS)


def position_phrase(position: str, rng: np.random.Generator) -> str:
    """"top left" -> e.g. "in the upper left corner"; "middle center" -> "in the middle"."""
    row, col = position.split()
    if row == "middle" and col == "center":
        return _choice(rng, ("in the center", "in the centre", "in the middle"))
    if row == "middle":
        return _choice(rng, ("on the {c}", "on the {c} side", "at the {c}")).format(c=col)
    if col == "center":
        return _choice(rng, ("at the {r}", "near the {r}", "at the {r} edge")).format(r=row)
    corner = f"{_choice(rng, ROW_WORDS[row])} {col}"
    return _choice(rng, ("in the {p} corner", "at the {p}", "{p}")).format(p=corner)


def caption(scene: Scene, rng: np.random.Generator, mention_prob: float = 0.5) -> str:
    """A random caption of ``scene``: colour and shape always, the rest each with ``mention_prob``."""
    size = f"{_choice(rng, SIZE_WORDS[scene.size])} " if rng.random() < mention_prob else ""
    position = f" {position_phrase(scene.position, rng)}" if rng.random() < mention_prob else ""
    background = ""
    if rng.random() < mention_prob:
        background = " " + _choice(rng, _BACKGROUND_PHRASES).format(b=_choice(rng, BACKGROUND_WORDS[scene.background]))
    text = _choice(rng, TEMPLATES).format(
        size=size, color=_choice(rng, COLOR_WORDS[scene.color]), shape=_choice(rng, SHAPE_WORDS[scene.shape]),
        position=position, background=background,
    )
    return re.sub(r"\ba ([aeiou])", r"an \1", text)


def _choice(rng: np.random.Generator, options: tuple[str, ...]) -> str:
    return options[int(rng.integers(len(options)))]


def _alternation(words: dict[str, tuple[str, ...]]) -> list[tuple[re.Pattern, str]]:
    """Longest synonyms first so "grass green" wins over "green"."""
    pairs = [(w, name) for name, ws in words.items() for w in ws]
    pairs.sort(key=lambda p: -len(p[0]))
    return [(re.compile(rf"\b{re.escape(w)}\b"), name) for w, name in pairs]


_PATTERNS = {
    "color": _alternation(COLOR_WORDS),
    "shape": _alternation({**SHAPE_WORDS, "circle": SHAPE_WORDS["circle"] + ("dot", "round")}),
    "size": _alternation(SIZE_WORDS),
}
_BACKGROUND_RE = re.compile(
    r"\b(?:on|against)\s+(?:an?\s+)?(" + "|".join(sorted(
        (w for ws in BACKGROUND_WORDS.values() for w in ws), key=len, reverse=True)) + r")\b"
)
_BACKGROUND_NAME = {w: name for name, ws in BACKGROUND_WORDS.items() for w in ws}


def parse_prompt(prompt: str) -> dict[str, str]:
    """Attributes a prompt asks for, e.g. ``{"color": "red", "shape": "circle", "position": "top left"}``.

    Unnamed attributes are absent. The background is only read from "on/against (a) <colour>" so that an object
    colour is never taken for a background.
    """
    text = prompt.lower()
    found: dict[str, str] = {}
    bg_match = _BACKGROUND_RE.search(text)
    if bg_match:
        found["background"] = _BACKGROUND_NAME[bg_match.group(1)]
        text = text[: bg_match.start()] + text[bg_match.end():]
    for attribute, patterns in _PATTERNS.items():
        for pattern, name in patterns:
            if pattern.search(text):
                found[attribute] = name
                break
    position = _parse_position(text)
    if position:
        found["position"] = position
    return found


def _parse_position(text: str) -> str | None:
    row = next((r for r, ws in ROW_WORDS.items() if r != "middle" and any(re.search(rf"\b{w}\b", text) for w in ws)),
               None)
    col = next((c for c in ("left", "right") if re.search(rf"\b{c}\b", text)), None)
    centred = re.search(r"\b(center|centre|middle)\b", text) is not None
    if row is None and col is None:
        return "middle center" if centred else None
    return f"{row or 'middle'} {col or 'center'}"


def make_prompt_set(n: int, seed: int, split: str = "train") -> list[str]:
    """``n`` unique captions (sorted), from train combos or only from held-out combos (then fully specified)."""
    from rewardtune.shapes.world import sample_scenes

    rng = np.random.default_rng(seed)
    prompts: set[str] = set()
    batch = 0
    while len(prompts) < n:
        for scene in sample_scenes(4 * n, seed=seed * 1000 + batch, split=split):
            prompts.add(caption(scene, rng, mention_prob=1.0 if split == "heldout" else 0.5))
            if len(prompts) >= n:
                break
        batch += 1
    return sorted(prompts)


def small_prompt_set() -> list[str]:
    """The small prompt set (36 prompts): every colour-shape pair, plain and with a background."""
    prompts = [f"a {c} {s}" for c in COLORS for s in SHAPES]
    backgrounds = list(BACKGROUNDS)
    prompts += [f"a {c} {s} on a {backgrounds[i % len(backgrounds)]} background"
                for i, (c, s) in enumerate((c, s) for c in COLORS for s in SHAPES)]
    return prompts


def check_heldout(prompt: str) -> bool:
    """True when a fully specified prompt names a held-out attribute combination."""
    attrs = parse_prompt(prompt)
    if len(attrs) < 5:
        return False
    return is_heldout_combo((attrs["color"], attrs["shape"], attrs["size"], attrs["position"], attrs["background"]))


__all__ = ["caption", "parse_prompt", "make_prompt_set", "small_prompt_set", "check_heldout", "POSITIONS"]
