"""`rewardtune perceptual learn|score` end to end on tiny generated videos, video IO, every bad-input path, the
``perceptual:PATH`` image reward through ``load_reward``, and the MountainCar policy-search pieces."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from PIL import Image

from rewardtune.cli import main
from rewardtune.errors import UserError
from rewardtune.perceptual.demos import procedural_rollout
from rewardtune.perceptual.reward import PerceptualReward
from rewardtune.perceptual.video import find_videos, read_video, write_video
from rewardtune.rewards import load_reward, reward_names


def can_encode_mp4(tmp_path) -> bool:
    try:
        write_video(tmp_path / "probe.mp4", np.zeros((2, 16, 16, 3), np.uint8))
        return True
    except Exception:
        return False


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    """Four door demos at 32x32: two GIFs and two frame folders (+ one mp4 when PyAV can encode)."""
    folder = tmp_path_factory.mktemp("demos")
    for seed in range(4):
        frames = procedural_rollout("door", seed, size=32).frames
        write_video(folder / (f"demo{seed}.gif" if seed % 2 else f"demo{seed}"), frames)
    if can_encode_mp4(tmp_path_factory.mktemp("probe")):
        write_video(folder / "demo4.mp4", procedural_rollout("door", 4, size=32).frames)
    return folder


@pytest.fixture(scope="module")
def learned(demo_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("learned") / "reward.pt"
    assert main(["perceptual", "learn", "--videos", str(demo_dir), "--steps", "2", "--features", "pixels",
                 "--feature-option", "size=12", "--out", str(out), "--plot", str(out.with_suffix(".png"))]) == 0
    return out


def test_video_round_trips(tmp_path):
    frames = procedural_rollout("pour", 1, size=32).frames[:12]
    np.testing.assert_array_equal(read_video(write_video(tmp_path / "f", frames)), frames)
    gif = read_video(write_video(tmp_path / "v.gif", frames))
    assert gif.shape == frames.shape and np.abs(gif.astype(int) - frames).mean() < 12
    if can_encode_mp4(tmp_path):
        for name in ("v.mp4", "v.webm"):
            video = read_video(write_video(tmp_path / name, frames))
            assert video.shape == frames.shape and np.abs(video.astype(int) - frames).mean() < 12
    assert [p.name for p in find_videos(str(tmp_path / "v.*"))][:1] == ["v.gif"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="has no frames"):
        read_video(tmp_path / "empty")
    with pytest.raises(UserError, match="unsupported type"):
        read_video(write_video(tmp_path / "x.gif", frames).rename(tmp_path / "x.txt"))


def test_learn_and_score_end_to_end(demo_dir, learned, tmp_path):
    reward = PerceptualReward.load(learned)
    assert len(reward.demos) == len(find_videos(demo_dir)) >= 4
    assert learned.with_suffix(".png").stat().st_size > 0
    test = tmp_path / "test.gif"
    write_video(test, procedural_rollout("door", 77, size=32).frames)
    out, plot, steps = tmp_path / "r.csv", tmp_path / "r.png", tmp_path / "steps.png"
    assert main(["perceptual", "score", "--reward", str(learned), "--video", str(test), "--out", str(out),
                 "--plot", str(plot), "--steps-plot", str(steps)]) == 0
    rows = list(csv.DictReader(out.open()))
    assert list(rows[0]) == ["frame", "step1", "step2", "total"] and len(rows) == len(read_video(test))
    per_step, total = reward.score_frames(read_video(test))
    np.testing.assert_allclose([float(r["total"]) for r in rows], total.numpy(), atol=1e-6)
    assert plot.stat().st_size > 0 and steps.stat().st_size > 0
    assert main(["perceptual", "score", "--reward", str(learned), "--video", str(test), "--out", str(out),
                 "--combine", "furthest", "--shaped"]) == 0
    shaped = [float(r["total"]) for r in csv.DictReader(out.open())]
    assert shaped[0] == 0 and set(np.round(np.abs(shaped), 6)) <= {0.0, 0.5, 1.0}


def test_learn_from_a_glob_of_gifs(demo_dir, tmp_path):
    out = tmp_path / "g.pt"
    assert main(["perceptual", "learn", "--videos", str(demo_dir / "*.gif"), "--steps", "2", "--features",
                 "random-cnn", "--feature-option", "size=32", "--objective", "paper", "--min-size", "3",
                 "--out", str(out)]) == 0
    reward = PerceptualReward.load(out)
    assert reward.config["objective"] == "paper" and len(reward.demos) == 2
    assert reward.extractor_spec == {"name": "random-cnn", "options": {"seed": 0, "size": 32, "width": 8}}


def frames_folder(folder, sizes):
    folder.mkdir(parents=True)
    for i, (h, w) in enumerate(sizes):
        Image.fromarray(np.full((h, w, 3), 40 * i, np.uint8)).save(folder / f"{i}.png")
    return folder


def bad_input(root, case):
    """``(videos, message)`` for one bad input of ``perceptual learn``: every folder also holds one good demo."""
    folder = root / case.replace(" ", "_")
    if case != "nothing":
        write_video(folder / "a.gif", procedural_rollout("door", 0, size=32).frames[:20])
    if case == "single demo":
        return folder, "need at least 2 demo videos, found 1"
    if case == "unreadable":
        (folder / "b.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 not really a video")
        return folder, "is not readable"
    if case == "empty":
        (folder / "c.gif").write_bytes(b"")
        return folder, "is not a readable GIF"
    if case == "size change":
        frames_folder(folder / "b", [(32, 32), (32, 32), (16, 32)])
        return folder, "changes frame size at frame 2: 32x32 -> 32x16"
    if case == "too short":
        frames_folder(folder / "b", [(32, 32)])
        return folder, "b has 1 frames, fewer than the 2 steps"
    return root / "missing", "is neither a folder nor a glob"


@pytest.mark.parametrize("case", ["single demo", "unreadable", "empty", "size change", "too short", "nothing"])
def test_learn_bad_inputs_are_one_line_errors(case, tmp_path, capsys):
    videos, message = bad_input(tmp_path, case)
    out = tmp_path / "out" / "reward.pt"
    assert main(["perceptual", "learn", "--videos", str(videos), "--steps", "2", "--features", "pixels",
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rewardtune: error:") and message in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv, message", [
    (["--features", "nope"], "unknown feature extractor 'nope'"),
    (["--features", "pixels", "--feature-option", "colour=3"], "does not take option 'colour'"),
    (["--features", "pixels", "--feature-option", "size"], "is not of the form key=value"),
    (["--features", "pixels", "--steps", "1"], "--steps must be at least 2"),
    (["--features", "pixels", "--plot", "x.jpg"], "--plot must end in .png"),
])
def test_learn_usage_errors(argv, message, demo_dir, tmp_path, capsys):
    args = ["perceptual", "learn", "--videos", str(demo_dir), "--out", str(tmp_path / "r.pt")]
    args += argv if "--steps" in argv else argv + ["--steps", "2"]
    assert main(args) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "r.pt").exists()


def test_score_errors(learned, tmp_path, capsys):
    video = write_video(tmp_path / "v.gif", procedural_rollout("door", 9, size=32).frames)
    for argv, message in [
        (["--reward", str(tmp_path / "none.pt"), "--video", str(video)], "does not exist"),
        (["--reward", str(video), "--video", str(video)], "is not a perceptual reward file"),
        (["--reward", str(learned), "--video", str(tmp_path / "none.mp4")], "does not exist"),
        (["--reward", str(learned), "--video", str(video), "--out", str(tmp_path / "x.txt")], "--out must end in"),
    ]:
        assert main(["perceptual", "score", *argv]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "x.txt").exists()


def test_perceptual_image_reward_through_load_reward(learned):
    frames = procedural_rollout("door", 21, size=32).frames[::6]
    images = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255
    reward = load_reward(f"perceptual:{learned}")
    scores = reward(images, [""] * len(images))
    expected = PerceptualReward.load(learned).score_frames(frames)[1]
    torch.testing.assert_close(scores, expected)
    assert scores.dtype == torch.float32 and set(reward.components) >= {f"perceptual:{learned}", "step1", "step2"}
    total = load_reward(f"perceptual:{learned}:2,jpeg_compressibility:1")(images, [""] * len(images))
    jpeg = load_reward("jpeg_compressibility")(images, [""] * len(images))
    torch.testing.assert_close(total, 2 * expected + jpeg)
    furthest = load_reward(f"perceptual:{learned}", combine="furthest")(images, [""] * len(images))
    assert set(np.round(furthest.numpy(), 6)) <= {0.0, 0.5, 1.0}
    assert "perceptual:PATH" in reward_names()
    with pytest.raises(UserError, match="does not exist"):
        load_reward("perceptual:/no/such/reward.pt")
    with pytest.raises(UserError, match="needs a file"):
        load_reward("perceptual:")


def test_mountaincar_pieces():
    from rewardtune.perceptual.demos import make_mountaincar, mountaincar_position_frames, mountaincar_rollout
    from rewardtune.perceptual.policy_search import PositionReward, policy_search, run_episode, true_return

    env = make_mountaincar(0)
    expert = mountaincar_rollout(0, "expert", size=(32, 48), env=env)
    assert expert.frames.shape[1:] == (32, 48, 3) and expert.progress[-1] >= 0.5 and len(expert.frames) < 150
    np.testing.assert_array_equal(mountaincar_position_frames(expert.progress[:3], (32, 48), env), expert.frames[:3])
    xs = run_episode(env, np.array([0.0, 0.0, 1.0]), seed=0)         # pushes along the velocity: the expert
    assert len(xs) == 201 and xs.max() >= 0.5 and true_return(xs) > -200
    table = PositionReward(np.array([-1.2, 0.0, 0.6]), np.array([0.0, 1.0, 2.0]))
    np.testing.assert_allclose(table(np.array([-0.6, 0.3])), [0.5, 1.5])
    result = policy_search(env, true_return, seed=0, iterations=2, samples=4, eval_starts=2)
    assert len(result.success_curve) == 2 and result.theta.shape == (3,)
