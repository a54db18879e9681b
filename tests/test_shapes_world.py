"""The shapes world: renderer, captions, prompt sets and the oracle read-back (>= 98 % against ground truth)."""

import numpy as np
import pytest
import torch

from rewardtune.shapes.captions import (
    caption,
    check_heldout,
    make_prompt_set,
    parse_prompt,
    small_prompt_set,
)
from rewardtune.shapes.oracle import gold_scores, images_from_uint8, read_images
from rewardtune.shapes.world import (
    BACKGROUNDS,
    COLORS,
    POSITIONS,
    SHAPES,
    SIZES,
    Scene,
    is_heldout_combo,
    render,
    sample_scenes,
)


@pytest.fixture(scope="module")
def rendered():
    scenes = sample_scenes(1500, seed=123, split="any")
    return scenes, images_from_uint8(render(scenes, seed=5))


def test_world_has_the_required_variety():
    assert len(SHAPES) >= 3 and len(COLORS) >= 6 and len(BACKGROUNDS) >= 3 and len(SIZES) >= 3
    assert len(POSITIONS) == 9


def test_render_is_seeded_and_shaped():
    scenes = sample_scenes(8, seed=1)
    a, b = render(scenes, seed=3), render(scenes, seed=3)
    assert a.shape == (8, 32, 32, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    assert sample_scenes(8, seed=1) == scenes


def test_render_draws_the_object_where_asked():
    scene = Scene("red", "square", "large", "top left", "white")
    image = render([scene])[0].astype(int)
    assert tuple(image[8, 8]) == COLORS["red"]  # inside the square
    assert tuple(image[28, 28]) == BACKGROUNDS["white"]  # far corner is background


@pytest.mark.parametrize("attribute", ["color", "shape", "size", "position", "background"])
def test_oracle_reads_back_rendered_ground_truth(rendered, attribute):
    scenes, images = rendered
    reading = read_images(images)
    truth = [getattr(s, attribute) for s in scenes]
    accuracy = np.mean([t == p for t, p in zip(truth, getattr(reading, attribute))])
    assert accuracy >= 0.98, f"{attribute} read-back accuracy {accuracy:.3f}"


def test_oracle_accepts_any_size_and_batches(rendered):
    scenes, images = rendered
    big = torch.nn.functional.interpolate(images[:16], size=(96, 96), mode="nearest")
    assert read_images(big).color == read_images(images[:16]).color


def test_oracle_reports_no_object_on_a_blank_image():
    blank = torch.full((2, 3, 32, 32), 0.5)
    reading = read_images(blank)
    assert reading.color == [None, None]
    scores = gold_scores(blank, ["a red circle", "a blue square"])
    assert scores["fidelity"].tolist() == [0.0, 0.0]


def test_fidelity_counts_the_named_attributes():
    scene = Scene("blue", "circle", "large", "middle center", "white", softness=0.4)
    image = images_from_uint8(render([scene] * 4))
    prompts = ["a blue circle", "a red circle", "a red square", "a big blue disc in the top left corner"]
    fidelity = gold_scores(image, prompts)["fidelity"].tolist()
    assert fidelity == pytest.approx([1.0, 0.5, 0.0, 0.75])  # last: colour, shape, size right; position wrong


def test_taste_prefers_crisp_bold_contrasting_images():
    base = dict(color="yellow", shape="circle", position="middle center")
    good = Scene(**base, size="large", background="black", softness=0.3)
    blurry = Scene(**base, size="large", background="black", softness=2.0)
    small = Scene(**base, size="small", background="black", softness=0.3)
    dull = Scene(**base, size="large", background="cream", softness=0.3)
    taste = gold_scores(images_from_uint8(render([good, blurry, small, dull])), ["a yellow circle"] * 4)["taste"]
    assert taste[0] > taste[1] and taste[0] > taste[2] and taste[0] > taste[3]
    assert ((taste >= 0) & (taste <= 1)).all()


def test_taste_components_by_hand():
    """Black background, yellow (235,215,30) object: luma gap = 0.299*213+0.587*193+0.114*8 over 255 = 0.698."""
    scene = Scene("yellow", "square", "large", "middle center", "black", softness=0.3)
    reading = read_images(images_from_uint8(render([scene])))
    assert reading.contrast.item() == pytest.approx(1.0)  # min(0.698 / 0.45, 1)
    assert reading.presence.item() == pytest.approx(1.0, abs=0.02)  # half extent 9 px >= 8
    gray = Scene("yellow", "square", "small", "middle center", "gray", softness=0.3)
    reading = read_images(images_from_uint8(render([gray])))
    gap = abs(0.299 * (235 - 125) + 0.587 * (215 - 125) + 0.114 * (30 - 125)) / 255
    assert reading.contrast.item() == pytest.approx(gap / 0.45, abs=0.03)
    assert reading.presence.item() == pytest.approx(4.5 / 8, abs=0.06)


def test_gold_scores_reject_mismatched_prompts():
    with pytest.raises(ValueError, match="one prompt per image"):
        gold_scores(torch.zeros(2, 3, 32, 32), ["a red circle"])


def test_captions_parse_back_to_the_scene():
    rng = np.random.default_rng(0)
    for scene in sample_scenes(500, seed=9, split="any"):
        text = caption(scene, rng)
        parsed = parse_prompt(text)
        assert parsed["color"] == scene.color and parsed["shape"] == scene.shape, text
        for key, value in parsed.items():
            assert getattr(scene, key) == value, (text, key)


@pytest.mark.parametrize("text, expected", [
    ("a red circle", {"color": "red", "shape": "circle"}),
    ("A Blue Square", {"color": "blue", "shape": "square"}),
    ("a tiny grass green box at the upper right against a dark backdrop",
     {"color": "green", "shape": "square", "size": "small", "position": "top right", "background": "black"}),
    ("an orange triangle in the middle", {"color": "orange", "shape": "triangle", "position": "middle center"}),
    ("a painting of a cat", {}),
])
def test_parse_free_form_prompts(text, expected):
    assert parse_prompt(text) == expected


def test_prompt_sets():
    small = small_prompt_set()
    assert 10 <= len(small) <= 99 and len(set(small)) == len(small)
    large = make_prompt_set(5000, seed=0)
    assert len(large) == len(set(large)) == 5000
    heldout = make_prompt_set(50, seed=1, split="heldout")
    assert all(check_heldout(p) for p in heldout)
    assert not set(heldout) & set(large)


def test_training_scenes_never_use_heldout_combos():
    assert not any(is_heldout_combo(s.combo()) for s in sample_scenes(2000, seed=4, split="train"))
    assert all(is_heldout_combo(s.combo()) for s in sample_scenes(50, seed=4, split="heldout"))


def test_shipped_prompt_files(tmp_path):
    from pathlib import Path

    from rewardtune.prompts import read_prompts

    assets = Path(__file__).resolve().parents[1] / "rewardtune" / "assets" / "prompts"
    assert read_prompts(assets / "shapes_small.txt") == small_prompt_set()
    large = read_prompts(assets / "shapes_large.txt")
    assert len(set(large)) >= 5000
    heldout = read_prompts(assets / "shapes_heldout.txt")
    assert all(check_heldout(p) for p in heldout) and not set(heldout) & set(large)
