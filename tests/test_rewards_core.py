"""Reward interface basics: spec parsing, weighted sums, JPEG sizes by hand, input validation, shapes_gold."""

import io

import pytest
import torch
from PIL import Image

from rewardtune.errors import UserError
from rewardtune.rewards import load_reward, parse_spec
from rewardtune.shapes.oracle import gold_scores, images_from_uint8, read_images
from rewardtune.shapes.world import Scene, render


def test_parse_spec():
    assert parse_spec("pickscore:10,hpsv2:2,aesthetic:0.05") == [("pickscore", 10.0), ("hpsv2", 2.0),
                                                                   ("aesthetic", 0.05)]
    assert parse_spec("hpsv2.1") == [("hpsv2.1", 1.0)]
    assert parse_spec(" a:-1 , b ") == [("a", -1.0), ("b", 1.0)]


@pytest.mark.parametrize("spec, message", [
    ("", "empty reward spec"),
    ("a:x", "malformed reward spec 'a:x' at 'a:x'"),
    ("a:1,,b", "malformed reward spec"),
    (":2", "malformed reward spec"),
    ("a:nan", "malformed reward spec"),
    ("a,a:2", "appears twice"),
])
def test_malformed_specs(spec, message):
    with pytest.raises(UserError, match=message):
        parse_spec(spec)


def test_unknown_reward_lists_valid_names_and_bad_options():
    with pytest.raises(UserError) as exc:
        load_reward("hps")
    assert "unknown reward 'hps'; choose one of:" in str(exc.value) and "hpsv2" in str(exc.value)
    with pytest.raises(UserError) as exc:
        load_reward("jpeg_compressibility", colour=3)
    assert str(exc.value) == ("reward 'jpeg_compressibility' does not take option 'colour'; accepted options: device, "
                              "dtype, quality")
    with pytest.raises(UserError, match="not a component"):
        load_reward("jpeg_compressibility:1,shapes_gold:1", hpsv2={})


def test_reward_options_follow_the_factory_signature(monkeypatch, tmp_path):
    import types

    import rewardtune.rewards as rewards

    seen = {}

    def open_factory(device="cpu", **kwargs):  # takes any option
        seen.update(kwargs)
        return types.SimpleNamespace()

    def broken_factory(device="cpu"):  # a TypeError inside a factory is not mistaken for a bad option
        raise TypeError("unexpected keyword argument 'inner'")

    monkeypatch.setattr(rewards, "_factory", lambda name: open_factory)
    assert load_reward("shapes_gold", anything=1).name == "shapes_gold" and seen == {"anything": 1}
    monkeypatch.setattr(rewards, "_factory", lambda name: broken_factory)
    with pytest.raises(TypeError, match="'inner'"):
        load_reward("shapes_gold")
    monkeypatch.undo()
    path = tmp_path / "r.pt"
    path.write_bytes(b"")
    with pytest.raises(UserError, match=r"reward 'perceptual:.*' does not take option 'path'; accepted options: "
                                        r"combine, device, dtype$"):  # the path is bound already
        load_reward(f"perceptual:{path}", path="x")


def _jpeg_kb(image):
    array = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=95)
    return len(buffer.getvalue()) / 1000


def test_jpeg_rewards_by_hand():
    images = torch.rand(3, 3, 24, 40, generator=torch.Generator().manual_seed(0))
    images[1] = 0.5  # flat image compresses well
    expected = torch.tensor([_jpeg_kb(im) for im in images])
    torch.testing.assert_close(load_reward("jpeg_incompressibility")(images, ["x"] * 3), expected)
    torch.testing.assert_close(load_reward("jpeg_compressibility")(images, ["x"] * 3), -expected)
    assert expected[1] < expected[0]


def test_weighted_sum_by_hand_and_components():
    scenes = [Scene("red", "circle", "large", "middle center", "white"), Scene("blue", "square", "small",
                                                                                "top left", "black")]
    images = images_from_uint8(render(scenes))
    prompts = ["a red circle", "a red circle"]
    reward = load_reward("shapes_gold:2,jpeg_compressibility:0.5")
    total = reward(images, prompts)
    gold = gold_scores(images, prompts)["gold"]
    jpeg = torch.tensor([_jpeg_kb(im) for im in images])
    torch.testing.assert_close(total, 2 * gold - 0.5 * jpeg)
    assert set(reward.components) == {"shapes_gold", "jpeg_compressibility"}
    torch.testing.assert_close(reward.components["jpeg_compressibility"], -jpeg)


def test_shapes_gold_components():
    images = images_from_uint8(render([Scene("green", "triangle", "large", "middle center", "black")]))
    reward = load_reward("shapes_gold")
    score = reward(images, ["a green triangle"])
    assert set(reward.components) == {"fidelity", "taste", "gold"}
    assert reward.components["fidelity"].item() == 1.0
    assert score.item() == pytest.approx((1.0 + reward.components["taste"].item()) / 2)
    taste = load_reward("shapes_taste")(images, ["a green triangle"])
    reading = read_images(images)
    by_hand = (reading.contrast + reading.crispness + reading.presence) / 3
    torch.testing.assert_close(taste, by_hand)
    assert taste.item() == pytest.approx(reward.components["taste"].item())


@pytest.mark.parametrize("images, prompts, message", [
    (torch.rand(2, 32, 32), ["a", "b"], r"\[B,3,H,W\]"),
    (torch.rand(2, 4, 32, 32), ["a", "b"], r"\[B,3,H,W\]"),
    (torch.randint(0, 255, (2, 3, 8, 8), dtype=torch.uint8), ["a", "b"], "divide uint8 images by 255"),
    (torch.rand(2, 3, 8, 8) * 2 - 1, ["a", "b"], "must be in \\[0,1\\]"),
    (torch.rand(2, 3, 8, 8), ["a"], "got 2 images but 1 prompts"),
    (torch.rand(2, 3, 8, 8), "a", "a single string"),
])
def test_bad_inputs_are_rejected(images, prompts, message):
    with pytest.raises(UserError, match=message):
        load_reward("jpeg_compressibility")(images, prompts)


def test_component_names_may_contain_dots(monkeypatch):
    from rewardtune.rewards import REWARDS

    monkeypatch.setitem(REWARDS._entries, "jpeg.v2", "rewardtune.rewards.jpeg:jpeg_incompressibility")
    reward = load_reward("jpeg.v2:2,jpeg_compressibility:1")
    images = torch.rand(2, 3, 16, 16)
    torch.testing.assert_close(reward(images, ["a", "b"]), reward.components["jpeg.v2"])


def test_resize_shortest_truncates_the_long_side_like_torchvision():
    from torchvision.transforms.functional import center_crop, resize

    from rewardtune.rewards.preprocess import clip_pixels, shortest_side_size

    images = torch.rand(1, 3, 48, 64)
    expected = center_crop(resize(images, 42, antialias=True, interpolation=3), 42)  # int(42 * 64 / 48) = 56 wide
    assert shortest_side_size(48, 64, 42) == (42, 56)
    torch.testing.assert_close(clip_pixels(images, 42, mean=None), expected, atol=1e-5, rtol=0)
    assert shortest_side_size(48, 64, 43) == (43, 57)  # long side int(57.33) = 57
    assert clip_pixels(images, 43).shape[-2:] == (43, 43)
    assert shortest_side_size(40, 62, 16) == (16, 24)                     # 24.8 truncated (CLIP, torchvision)
    assert shortest_side_size(40, 62, 16, rounding="round") == (16, 25)   # 24.8 rounded (perceptual features)
