"""`rewardtune score` end to end: image modes, prompt matching, corrupt files, outputs and usage errors."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from rewardtune.cli import main
from rewardtune.shapes.oracle import gold_scores, images_from_uint8
from rewardtune.shapes.world import render, sample_scenes
from rewardtune.utils.images import load_image


@pytest.fixture
def folder(tmp_path):
    scenes = sample_scenes(5, seed=3)
    arrays = render(scenes)
    d = tmp_path / "imgs"
    d.mkdir()
    for i, a in enumerate(arrays):
        Image.fromarray(a).save(d / f"{i}.png")
    return d, arrays


def test_score_folder_with_one_prompt_writes_rows(folder, tmp_path, capsys):
    d, arrays = folder
    out = tmp_path / "scores.csv"
    assert main(["score", "--reward", "shapes_gold", "--images", str(d), "--prompt", "a red circle",
                 "--out", str(out)]) == 0
    lines = out.read_text().splitlines()
    assert lines[0] == "path,prompt,total,fidelity,taste,gold" and len(lines) == 6
    expected = gold_scores(images_from_uint8(arrays), ["a red circle"] * 5)["gold"]
    got = [float(line.split(",")[2]) for line in lines[1:]]
    np.testing.assert_allclose(got, expected.numpy(), rtol=1e-6)
    assert "5 images scored" in capsys.readouterr().out


def test_csv_prompts_match_by_file_name_and_jsonl_output(folder, tmp_path):
    d, _ = folder
    table = tmp_path / "p.csv"
    table.write_text("path,prompt\n" + "".join(f"{i}.png,prompt {i}\n" for i in range(5)))
    out = tmp_path / "s.jsonl"
    assert main(["score", "--reward", "jpeg_compressibility:2,shapes_gold:1", "--images", str(d / "*.png"),
                 "--prompts", str(table), "--out", str(out), "--batch-size", "2"]) == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == [f"prompt {i}" for i in range(5)]
    for r in rows:
        assert r["total"] == pytest.approx(2 * r["jpeg_compressibility"] + r["shapes_gold"])


def test_image_modes_are_converted(tmp_path):
    rgb = np.zeros((6, 6, 3), np.uint8)
    rgb[..., 0] = 200
    Image.fromarray(rgb).convert("L").save(tmp_path / "l.png")
    Image.fromarray(rgb).convert("P").save(tmp_path / "p.png")
    rgba = np.dstack([rgb, np.full((6, 6), 0, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(np.full((6, 6), 65535 // 2, np.uint16)).save(tmp_path / "i16.png")
    luma = round(0.299 * 200)
    assert torch.allclose(load_image(tmp_path / "l.png"), torch.full((3, 6, 6), luma / 255))
    palette_rgb = np.asarray(Image.open(tmp_path / "p.png").convert("RGB"), np.float32) / 255
    assert torch.allclose(load_image(tmp_path / "p.png"), torch.from_numpy(palette_rgb).permute(2, 0, 1))
    assert torch.allclose(load_image(tmp_path / "rgba.png"), torch.ones(3, 6, 6))  # transparent -> white
    assert torch.allclose(load_image(tmp_path / "i16.png"), torch.full((3, 6, 6), (65535 // 2) / 65535))


def test_corrupt_images_are_skipped_or_fail_in_strict_mode(folder, tmp_path, capsys):
    d, _ = folder
    (d / "9_broken.png").write_bytes(b"\x89PNG not really")
    out = tmp_path / "s.csv"
    assert main(["score", "--reward", "shapes_gold", "--images", str(d), "--prompt", "x", "--out", str(out)]) == 0
    assert len(out.read_text().splitlines()) == 6  # header + the 5 good images
    assert "9_broken.png" in capsys.readouterr().err
    assert main(["score", "--reward", "shapes_gold", "--images", str(d), "--prompt", "x", "--strict"]) == 2
    assert "9_broken.png" in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (["--prompts", "PROMPTS3"], "has 3 prompts but there are 5 images"),
    (["--prompts", "EMPTY"], "holds no prompt"),
    (["--prompt", "x", "--reward", "nope"], "unknown reward 'nope'; choose one of"),
    (["--prompt", "x", "--reward", "shapes_gold:"], "malformed reward spec"),
    (["--prompt", "x", "--out", "s.txt"], "--out must end in .csv or .jsonl"),
])
def test_usage_errors_exit_2(folder, tmp_path, capsys, extra, message):
    d, _ = folder
    (tmp_path / "three.txt").write_text("a\nb\nc\n")
    (tmp_path / "empty.txt").write_text("\n")
    extra = [e.replace("PROMPTS3", str(tmp_path / "three.txt")).replace("EMPTY", str(tmp_path / "empty.txt"))
             for e in extra]
    args = ["score", "--reward", "shapes_gold", "--images", str(d)]
    if "--reward" in extra:
        args = ["score", "--images", str(d)]
    assert main(args + extra) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_no_images_found(tmp_path, capsys):
    assert main(["score", "--reward", "shapes_gold", "--images", str(tmp_path / "*.png"), "--prompt", "x"]) == 2
    assert "no image files found" in capsys.readouterr().err
