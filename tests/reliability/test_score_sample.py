"""Reliability of `rewardtune score` and `rewardtune sample` (issue 10): streaming, unwritable outputs, hostile
images, argument validation, the README's sample -> score flow, symlink loops, reward specs, LoRA sampling."""

import json
import os
import struct
import weakref
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rewardtune.cli import main
from rewardtune.errors import UserError


def run_cli(*args):
    return main([str(a) for a in args])


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("rewardtune: error: ") and len(err.splitlines()) == 1, err
    return err


def _noise_pngs(folder: Path, sizes: list[int], seed: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i, size in enumerate(sizes):
        path = folder / f"{i:03d}.png"
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def _forbid(monkeypatch, module: str, name: str) -> None:
    """Make loading a model fail the test: validation must come first."""
    def boom(*args, **kwargs):
        raise AssertionError(f"{name} called before the arguments were validated")
    monkeypatch.setattr(f"{module}.{name}", boom)


# 1. streaming ---------------------------------------------------------------------------------------------------

def test_score_decodes_a_bounded_window_and_keeps_file_order(tmp_path, monkeypatch):
    from rewardtune.commands import score

    paths = _noise_pngs(tmp_path / "imgs", [8, 8, 8, 12, 8, 8, 8, 8, 12, 12])
    live, peak, real_load = [0], [0], score.load_image

    def counting_load(path):
        image = real_load(path)
        live[0] += 1
        peak[0] = max(peak[0], live[0])
        weakref.finalize(image, lambda: live.__setitem__(0, live[0] - 1))
        return image

    monkeypatch.setattr(score, "load_image", counting_load)
    out = tmp_path / "s.jsonl"
    assert run_cli("score", "--reward", "jpeg_compressibility", "--images", tmp_path / "imgs", "--prompt", "x",
                   "--batch-size", 2, "--out", out) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["path"] for r in rows] == [str(p) for p in paths]  # file order, whatever the sizes
    assert peak[0] <= 3  # never all 10 decoded at once


def test_score_writes_rows_incrementally_and_never_a_half_file(tmp_path, monkeypatch):
    from rewardtune.commands import score

    _noise_pngs(tmp_path / "imgs", [8] * 6)
    out = tmp_path / "scores.csv"
    out.write_text("old results\n")
    seen, real_load = {}, score.load_image

    def crash_on_fifth(path):
        if Path(path).name == "004.png":
            seen["tmp"] = [p.read_text() for p in tmp_path.glob(".scores.csv.*")]
            raise RuntimeError("disk on fire")
        return real_load(path)

    monkeypatch.setattr(score, "load_image", crash_on_fifth)
    with pytest.raises(RuntimeError, match="disk on fire"):
        run_cli("score", "--reward", "jpeg_compressibility", "--images", tmp_path / "imgs", "--prompt", "x",
                "--batch-size", 2, "--out", out)
    assert len(seen["tmp"]) == 1 and len(seen["tmp"][0].splitlines()) == 1 + 4  # header + two batches so far
    assert out.read_text() == "old results\n"  # untouched by the crashed run
    assert not list(tmp_path.glob(".scores.csv.*"))  # temporary file removed


def test_sample_writes_each_batch_as_it_finishes(tiny_pipeline_dir, tmp_path, monkeypatch):
    from rewardtune.diffusion import service

    out, seen, calls, real_decode = tmp_path / "out", [], [0], service.decode_latents

    def crash_on_third(pipe, latents):
        calls[0] += 1
        if calls[0] == 3:
            seen.extend(sorted(p.name for p in out.iterdir()))
            raise RuntimeError("out of memory")
        return real_decode(pipe, latents)

    monkeypatch.setattr(service, "decode_latents", crash_on_third)
    with pytest.raises(RuntimeError, match="out of memory"):
        run_cli("sample", "--model", tiny_pipeline_dir, "--prompt", "a red circle", "--num-images", 4,
                "--steps", 1, "--batch-size", 1, "--out", out)
    assert seen == ["00000.png", "00001.png"]
    assert not out.exists()  # 10: created by this run and holding only its own files -> removed


def test_sample_grid_keeps_at_most_64_images(tiny_pipeline_dir, tmp_path):
    out = tmp_path / "out"
    assert run_cli("sample", "--model", tiny_pipeline_dir, "--prompt", "a red circle", "--num-images", 70,
                   "--steps", 1, "--batch-size", 35, "--out", out) == 0
    assert len(list(out.glob("0*.png"))) == 70 and len(json.loads((out / "manifest.json").read_text())) == 70
    tile = 3 * 32 + 2  # 32 px images enlarged to 96 px, 2 px padding
    assert Image.open(out / "grid.png").size == (8 * tile + 2, 8 * tile + 2)  # 8 x 8 = the first 64


# 2. unwritable output paths -------------------------------------------------------------------------------------

def _unwritable(tmp_path) -> list[Path]:
    (tmp_path / "a_file").write_text("x")
    return [Path("/proc/foo"), tmp_path / "a_file" / "sub"]


def test_sample_unwritable_out_fails_before_loading(tmp_path, capsys, monkeypatch):
    _forbid(monkeypatch, "rewardtune.diffusion.loading", "load_pipeline")
    for out in _unwritable(tmp_path):
        assert run_cli("sample", "--prompt", "x", "--out", out) == 2
        assert str(out) in one_line_error(capsys)


def test_score_unwritable_out_fails_before_loading(tmp_path, capsys, monkeypatch):
    _noise_pngs(tmp_path / "imgs", [8])
    _forbid(monkeypatch, "rewardtune.rewards", "load_reward")
    for out in _unwritable(tmp_path):
        out = out.with_suffix(".csv")
        assert run_cli("score", "--reward", "jpeg_compressibility", "--images", tmp_path / "imgs", "--prompt", "x",
                       "--out", out) == 2
        assert str(out) in one_line_error(capsys)


# 3. decompression bombs -----------------------------------------------------------------------------------------

def _bomb_png(path: Path) -> None:
    """A 1x1 PNG whose header claims 100000 x 100000 pixels (valid CRC)."""
    Image.new("RGB", (1, 1)).save(path)
    data = bytearray(path.read_bytes())
    ihdr = bytearray(data[12:29])  # b"IHDR" + 13 bytes
    ihdr[4:12] = struct.pack(">II", 100000, 100000)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)) & 0xFFFFFFFF)
    path.write_bytes(bytes(data))


def test_decompression_bomb_is_skipped_like_any_bad_image(tmp_path, capsys):
    _noise_pngs(tmp_path / "imgs", [8, 8])
    _bomb_png(tmp_path / "imgs" / "bomb.png")
    out = tmp_path / "s.csv"
    assert run_cli("score", "--reward", "jpeg_compressibility", "--images", tmp_path / "imgs", "--prompt", "x",
                   "--out", out) == 0
    assert len(out.read_text().splitlines()) == 3
    assert "bomb.png" in capsys.readouterr().err
    assert run_cli("score", "--reward", "jpeg_compressibility", "--images", tmp_path / "imgs", "--prompt", "x",
                   "--strict") == 2
    assert "bomb.png" in one_line_error(capsys)


# 4. sample arguments --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("args, message", [
    (["--height", "7"], "multiple of 4"),
    (["--width", "30"], "multiple of 4"),
    (["--device", "foo"], "cpu, cuda, cuda:N, mps"),
    (["--device", "cuda"], "CUDA is not available on this machine; use --device cpu"),
    (["--seed", str(2 ** 64)], "seed"),
    (["--seed", "-1"], "seed"),
    (["--seed", str(2 ** 64 - 1), "--num-images", "2"], "seed"),
])
def test_sample_bad_values_one_line(tiny_pipeline_dir, tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "o"
    assert run_cli("sample", "--model", tiny_pipeline_dir, "--prompt", "x", "--steps", 1, "--out", out, *args) == 2
    assert message in one_line_error(capsys)
    assert not out.exists()


def test_resolve_device(monkeypatch):
    from rewardtune.utils.devices import resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(UserError, match="unknown device 'gpu0'; .*cpu, cuda, cuda:N, mps"):
        resolve_device("gpu0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="^device 'cuda' requested but CUDA is not available on this machine; "
                                        "use --device cpu$"):
        resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(UserError, match="'cuda:2' requested but this machine has 2 CUDA devices"):
        resolve_device("cuda:2")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(UserError, match="device 'mps' requested but MPS is not available"):
        resolve_device("mps")


# 5. the README's sample -> score flow ---------------------------------------------------------------------------

def test_readme_flow_scores_a_sample_folder_with_its_manifest(tiny_pipeline_dir, tmp_path, capsys):
    out = tmp_path / "s"
    assert run_cli("sample", "--model", tiny_pipeline_dir, "--prompt", "a red circle", "--prompt", "a blue square",
                   "--num-images", 2, "--steps", 1, "--out", f"{out}/") == 0
    capsys.readouterr()
    scores = tmp_path / "scores.csv"
    assert run_cli("score", "--reward", "shapes_gold", "--images", f"{out}/", "--prompts", out / "manifest.csv",
                   "--out", scores) == 0
    rows = scores.read_text().splitlines()[1:]
    assert [Path(r.split(",")[0]).name for r in rows] == [f"{k:05d}.png" for k in range(4)]
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "1 image" in warnings[0] and "grid.png" in warnings[0]
    assert run_cli("score", "--reward", "shapes_gold", "--images", out, "--prompts", out / "manifest.csv",
                   "--strict") == 2
    assert "grid.png" in one_line_error(capsys)


# 6. symlink loops -----------------------------------------------------------------------------------------------

def test_symlink_loop_scores_each_real_file_once(tmp_path):
    root = tmp_path / "imgs"
    _noise_pngs(root, [8, 8])
    (root / "sub").mkdir()
    os.symlink(root, root / "sub" / "loop")
    os.symlink(root, root / "loop2")  # two loops: plain glob would walk 2**40 paths
    os.symlink(root / "000.png", root / "alias.png")
    out = tmp_path / "s.jsonl"
    assert run_cli("score", "--reward", "jpeg_compressibility", "--images", f"{root}/**/*.png", "--prompt", "x",
                   "--out", out) == 0
    names = [Path(json.loads(line)["path"]).name for line in out.read_text().splitlines()]
    assert sorted(names) == ["000.png", "001.png"]


# 7-9. reward specs, dtype and device before loading -------------------------------------------------------------

@pytest.mark.parametrize("spec, message", [
    ("perceptual:R.pt:nan", "finite"),
    ("perceptual:R.pt:inf,shapes_gold", "finite"),
    ("shapes_gold:inf", "finite"),
    ("shapes_gold:nan", "finite"),
    ("perceptual:R.pt:abc", "'abc'"),
    ("perceptual:missing.pt", "does not exist"),
    ("perceptual:R.pt,perceptual:R.pt:2", "appears twice"),
    ("nope", "perceptual:PATH"),
])
def test_score_rejects_bad_reward_specs_before_loading(tmp_path, capsys, monkeypatch, spec, message):
    _noise_pngs(tmp_path / "imgs", [8])
    (tmp_path / "R.pt").write_bytes(b"not loaded by the check")
    monkeypatch.chdir(tmp_path)
    _forbid(monkeypatch, "rewardtune.rewards", "load_reward")
    assert run_cli("score", "--reward", spec, "--images", "imgs", "--prompt", "x") == 2
    err = one_line_error(capsys)
    assert message in err and "--reward" in err


def test_check_reward_spec_accepts_paths_and_prefixes_the_key(tmp_path, monkeypatch):
    from rewardtune.rewards import check_reward_spec

    monkeypatch.chdir(tmp_path)
    Path("R.pt").write_bytes(b"never opened")
    assert check_reward_spec("perceptual:R.pt") == [("perceptual:R.pt", 1.0)]
    assert check_reward_spec("perceptual:R.pt:2, shapes_gold:0.5") == [("perceptual:R.pt", 2.0),
                                                                        ("shapes_gold", 0.5)]
    assert check_reward_spec("hpsv2.1") == [("hpsv2.1", 1.0)]  # known name, nothing loaded
    with pytest.raises(UserError, match="^train.reward: unknown reward 'x'; choose one of: .*perceptual:PATH"):
        check_reward_spec("x", key="train.reward")
    with pytest.raises(UserError, match="^train.reward: .*does not exist"):
        check_reward_spec("perceptual:other.pt", key="train.reward")


@pytest.mark.parametrize("args, message", [
    (["--dtype", "float99"], "unknown dtype 'float99'; choose one of: float32"),
    (["--device", "cuda"], "CUDA is not available on this machine"),
    (["--device", "foo"], "cpu, cuda, cuda:N, mps"),
])
def test_score_checks_dtype_and_device_before_loading(tmp_path, capsys, monkeypatch, args, message):
    _noise_pngs(tmp_path / "imgs", [8])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    _forbid(monkeypatch, "rewardtune.rewards", "load_reward")
    assert run_cli("score", "--reward", "jpeg_compressibility", "--images", tmp_path / "imgs", "--prompt", "x",
                   *args) == 2
    assert message in one_line_error(capsys)


# 10. failed sample cleans up only its own folder ----------------------------------------------------------------

def test_failed_sample_never_deletes_what_it_did_not_write(tiny_pipeline_dir, tmp_path, monkeypatch):
    from rewardtune.diffusion import service

    def fail(pipe, latents):
        raise RuntimeError("boom")

    monkeypatch.setattr(service, "decode_latents", fail)
    out = tmp_path / "keep"
    out.mkdir()
    (out / "precious.txt").write_text("mine")
    with pytest.raises(RuntimeError):
        run_cli("sample", "--model", tiny_pipeline_dir, "--prompt", "x", "--steps", 1, "--out", out, "--overwrite")
    assert (out / "precious.txt").read_text() == "mine"
    fresh = tmp_path / "fresh"
    with pytest.raises(RuntimeError):
        run_cli("sample", "--model", tiny_pipeline_dir, "--prompt", "x", "--steps", 1, "--out", fresh)
    assert not fresh.exists()


def test_model_that_fails_to_load_leaves_no_folder(tmp_path, capsys):
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "model_index.json").write_text("{not json")
    out = tmp_path / "o"
    assert run_cli("sample", "--model", tmp_path / "broken", "--prompt", "x", "--out", out) == 2
    one_line_error(capsys)
    assert not out.exists()


# 11. LoRA -------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_lora(tiny_pipeline_dir, tmp_path_factory):
    """A LoRA folder as `rewardtune finetune` writes it (pipe.save_lora_weights), with non-zero B matrices."""
    from peft import LoraConfig

    from rewardtune.diffusion.loading import load_pipeline
    from rewardtune.finetune.checkpoint import save_final_model

    pipe = load_pipeline(str(tiny_pipeline_dir))
    pipe.unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in pipe.unet.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    return save_final_model(pipe, pipe.unet, tmp_path_factory.mktemp("lora") / "final", lora=True)


def _sample_pixels(out: Path) -> np.ndarray:
    return np.stack([np.asarray(Image.open(p)) for p in sorted(out.glob("0*.png"))])


def test_sample_with_lora_differs_from_base(tiny_pipeline_dir, tiny_lora, tmp_path, capsys):
    common = ["sample", "--prompt", "a red circle", "--num-images", 2, "--steps", 2]
    assert run_cli(*common, "--model", tiny_pipeline_dir, "--out", tmp_path / "base") == 0
    assert run_cli(*common, "--model", tiny_pipeline_dir, "--lora", tiny_lora, "--out", tmp_path / "lora") == 0
    assert np.abs(_sample_pixels(tmp_path / "base").astype(int) - _sample_pixels(tmp_path / "lora")).max() > 5
    capsys.readouterr()
    assert run_cli(*common, "--model", tiny_lora, "--out", tmp_path / "x") == 2
    assert "--model BASE --lora" in one_line_error(capsys)
    assert not (tmp_path / "x").exists()


def test_lora_base_model_note(tiny_pipeline_dir, tiny_lora, tmp_path):
    import shutil

    from rewardtune.diffusion.loading import lora_base_model

    assert lora_base_model(tiny_lora) is None
    noted = tmp_path / "noted"
    shutil.copytree(tiny_lora, noted)
    (noted / "rewardtune_base.json").write_text(json.dumps({"model": str(tiny_pipeline_dir)}))
    assert lora_base_model(noted) == str(tiny_pipeline_dir)
    common = ["sample", "--prompt", "a red circle", "--num-images", 2, "--steps", 2]
    assert run_cli(*common, "--lora", noted, "--out", tmp_path / "a") == 0  # base from the note
    assert run_cli(*common, "--model", tiny_pipeline_dir, "--lora", tiny_lora, "--out", tmp_path / "b") == 0
    np.testing.assert_array_equal(_sample_pixels(tmp_path / "a"), _sample_pixels(tmp_path / "b"))
