"""rewardtune.modelfiles (where model files come from, the one not-found line), the one CLIP preprocessing, the UNet
loader hooks of the diffusion layer, and where benchmark tables are written."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from rewardtune import modelfiles
from rewardtune.errors import ModelNotFoundError, UserError

REPO = Path(__file__).resolve().parents[1]


def run_python(code: str) -> list[str]:
    """Run ``code`` in a fresh interpreter (offline, one thread) and return its stdout lines."""
    env_code = "import os; os.environ.setdefault('HF_HUB_OFFLINE', '1'); os.environ['OMP_NUM_THREADS'] = '1'\n"
    result = subprocess.run([sys.executable, "-c", env_code + textwrap.dedent(code)], capture_output=True, text=True,
                            timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.strip().splitlines()


# --- the one not-found line ---------------------------------------------------------------------------------------

def test_not_found_message_names_the_file_the_command_and_the_option():
    message = modelfiles.not_found_message("HPS v2.0 checkpoint", "xswu/HPSv2", "HPS_v2_compressed.pt",
                                           option="checkpoint")
    assert message == ("HPS v2.0 checkpoint is not in the local Hugging Face cache and could not be downloaded; on a "
                       "connected machine run `hf download xswu/HPSv2 HPS_v2_compressed.pt` (then copy the cache or "
                       "set HF_HOME), or pass checkpoint=PATH")
    flag = modelfiles.not_found_message("model 'x'", "org/x", option="--model", local="pipeline folder")
    assert flag.endswith("run `hf download org/x` (then copy the cache or set HF_HOME), or pass a local pipeline "
                         "folder with --model PATH")
    more = modelfiles.not_found_message("head", "org/h", "h.pth", option="head", more=["set $H", "put it at /c"])
    assert more.endswith("(then copy the cache or set HF_HOME), pass head=PATH, set $H, or put it at /c")
    url = modelfiles.not_found_message("weights", "https://example.org/w.pt", plural=True, cache="torch's cache",
                                       into="$TORCH_HOME/hub/checkpoints", option="weights", reason="offline")
    assert url == ("weights are not in torch's cache and could not be downloaded (offline); on a connected machine "
                   "download https://example.org/w.pt into $TORCH_HOME/hub/checkpoints, or pass weights=PATH")
    error = modelfiles.not_found_error("model 'x'", "org/x", option="model")
    assert isinstance(error, ModelNotFoundError) and isinstance(error, UserError) and "\n" not in str(error)


def test_only_modelfiles_writes_the_hf_download_line():
    """Every loader builds its not-cached error with modelfiles.not_found_message: no second copy of the text."""
    writers = sorted(str(p.relative_to(REPO)) for p in (REPO / "rewardtune").rglob("*.py")
                     if "`hf download" in p.read_text() or "could not be downloaded" in p.read_text())
    assert writers == ["rewardtune/modelfiles.py"]


def _fake_cache(root: Path, repo: str, filename: str, data: bytes) -> None:
    """A Hugging Face cache entry of ``repo``/``filename`` under ``root`` (the layout huggingface_hub reads)."""
    folder = root / ("models--" + repo.replace("/", "--"))
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text("a" * 40)
    (folder / "snapshots" / ("a" * 40)).mkdir(parents=True)
    (folder / "snapshots" / ("a" * 40) / filename).write_bytes(data)


def test_hub_file_reads_the_cache_and_otherwise_raises_the_one_line(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    _fake_cache(tmp_path, "org/name", "w.pt", b"weights")
    assert modelfiles.hub_file("org/name", "w.pt", option="checkpoint").read_bytes() == b"weights"
    with pytest.raises(ModelNotFoundError) as info:
        modelfiles.hub_file("org/name", "other.pt", option="checkpoint")
    assert str(info.value) == modelfiles.not_found_message("other.pt of org/name", "org/name", "other.pt",
                                                           option="checkpoint")


def test_from_pretrained_or_explain_local_cached_and_missing(tmp_path):
    seen = []
    assert modelfiles.from_pretrained_or_explain(lambda s: seen.append(s) or "ok", str(tmp_path), "CLIP", "model") \
        == "ok" and seen == [str(tmp_path)]
    with pytest.raises(ModelNotFoundError, match="CLIP folder .* does not exist; .* with model=PATH"):
        modelfiles.from_pretrained_or_explain(lambda s: "never", str(tmp_path / "absent"), "CLIP", "model")

    def absent(source):
        raise OSError(f"{source} is not cached\nsecond line")

    with pytest.raises(ModelNotFoundError) as info:
        modelfiles.from_pretrained_or_explain(absent, "org/clip", "CLIP model", "model")
    assert str(info.value) == modelfiles.not_found_message("CLIP model 'org/clip'", "org/clip", option="model",
                                                           local="folder")

    def broken(source):
        raise ValueError("bad config\nmore")

    with pytest.raises(ModelNotFoundError, match=r"^cannot load CLIP from folder .*: bad config$"):
        modelfiles.from_pretrained_or_explain(broken, str(tmp_path), "CLIP", "model")


# --- sources and assets ---------------------------------------------------------------------------------------------

def test_assets_and_source_kinds(tmp_path):
    from rewardtune import models_table

    assert models_table.ASSETS == modelfiles.ASSETS == Path(modelfiles.__file__).parent / "assets"
    assert modelfiles.asset("shapes-clip").is_dir() and (modelfiles.asset("shapes-clip") / "config.json").is_file()
    assert models_table.PIPELINES["shapes-tiny"] == str(modelfiles.asset("shapes-tiny"))
    with pytest.raises(ModelNotFoundError, match="shipped model file 'no-such-model' is missing") as info:
        modelfiles.asset("no-such-model")
    assert "\n" not in str(info.value)
    assert modelfiles.asset("no-such-model", must_exist=False) == modelfiles.ASSETS / "no-such-model"
    assert modelfiles.is_hub_id("org/name") and not modelfiles.is_hub_id("name")
    assert not any(modelfiles.is_hub_id(s) for s in ("./org/name", "/org/name", "~/x", "a/b/c"))
    assert modelfiles.looks_local(str(tmp_path)) and modelfiles.looks_local("./missing") and \
        modelfiles.looks_local("a/b/c")
    assert not modelfiles.looks_local("org/name") and not modelfiles.looks_local("bert-base-uncased")


# --- the one CLIP preprocessing -------------------------------------------------------------------------------------

def test_clip_pixels_fits_crops_and_options():
    from rewardtune.rewards.preprocess import OPENAI_MEAN, OPENAI_STD, clip_pixels

    images = torch.rand(2, 3, 20, 30, requires_grad=True)
    mean, std = torch.tensor(OPENAI_MEAN).view(1, 3, 1, 1), torch.tensor(OPENAI_STD).view(1, 3, 1, 1)
    same = clip_pixels(images, 20, fit="shortest", crop=(20, 30))         # no resize, crop of the full image
    torch.testing.assert_close(same, (images - mean) / std, rtol=0, atol=0)
    padded = clip_pixels(images, 0, fit="none", crop=(24, 30), mean=None)  # crop larger than the image: zero pad
    assert padded.shape[-2:] == (24, 30) and padded[..., :2, :].abs().sum() == 0
    torch.testing.assert_close(padded[..., 2:22, :], images, rtol=0, atol=0)
    assert clip_pixels(images, 10, crop=False, mean=None).shape[-2:] == (10, 15)
    assert clip_pixels(images, (8, 12), fit="squash").shape[-2:] == (8, 12)
    longest = clip_pixels(images, 15, fit="longest", mean=None)           # 20x30 -> 10x15, 5 rows of padding
    assert longest.shape[-2:] == (15, 15) and longest[..., :2, :].abs().sum() == 0 and \
        longest[..., 12:, :].abs().sum() == 0
    scaled = clip_pixels(images, 20, crop=(20, 30), scale=255.0, mean=None)
    torch.testing.assert_close(scaled, images * 255, rtol=0, atol=0)
    clip_pixels(images, 16, fit="longest").sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="fit='sideways'"):
        clip_pixels(images, 16, fit="sideways")


# --- the UNet loader hooks ------------------------------------------------------------------------------------------

def test_unet_loader_registry_matches_the_table_and_its_targets_exist():
    import importlib

    from rewardtune.diffusion.loading import UNET_LOADERS
    from rewardtune.models_table import UNET_LOADER_HOOKS
    from rewardtune.prune.common import RECORD_KEY

    assert {name: UNET_LOADERS.get(name) for name in UNET_LOADERS.names()} == UNET_LOADER_HOOKS
    assert RECORD_KEY in UNET_LOADER_HOOKS
    for hooks in UNET_LOADER_HOOKS.values():
        for target in hooks.values():
            module, _, name = target.partition(":")
            assert callable(getattr(importlib.import_module(module), name)), target


def test_registered_unet_loader_and_check_run_only_for_marked_folders(tiny_pipeline_dir, tmp_path, monkeypatch):
    from rewardtune.diffusion import loading

    calls = []

    def load(folder, dtype):
        calls.append(("load", Path(folder).name, dtype))
        return None                                          # plain from_pretrained can load it

    def check(pipe):
        calls.append(("check", pipe.unet.config["_test_marker"]))
        if pipe.unet.config["_test_marker"] == "refuse":
            raise UserError("this UNet does not fit")

    monkeypatch.setitem(loading.UNET_LOADERS._entries, "_test_marker", {"load": load, "check": check})
    loading.load_pipeline(str(tiny_pipeline_dir))
    assert calls == []                                       # unmarked folder: no hook runs
    folder = tmp_path / "marked"
    shutil.copytree(tiny_pipeline_dir, folder)
    config = json.loads((folder / "unet" / "config.json").read_text())
    (folder / "unet" / "config.json").write_text(json.dumps({**config, "_test_marker": "ok"}))
    loading.load_pipeline(str(folder), dtype="float32")
    assert calls == [("load", "unet", torch.float32), ("check", "ok")]
    (folder / "unet" / "config.json").write_text(json.dumps({**config, "_test_marker": "refuse"}))
    with pytest.raises(UserError, match="this UNet does not fit"):
        loading.load_pipeline(str(folder))


def test_loading_layer_imports_no_feature_and_loads_a_pruned_folder_in_a_fresh_process(tiny_pipe, tiny_pipeline_dir,
                                                                                       tmp_path):
    from rewardtune.prune import prune_unet
    from rewardtune.prune.io import save_pruned_pipeline

    pruned = prune_unet(tiny_pipe.unet, ratio=0.5)
    save_pruned_pipeline(tiny_pipe, pruned, tmp_path / "pruned")
    lines = run_python(f"""
        import sys
        import rewardtune.diffusion.loading
        print("rewardtune.prune" in sys.modules)
        from rewardtune.diffusion.loading import load_pipeline
        load_pipeline({str(tiny_pipeline_dir)!r})             # not pruned: still no prune import
        print("rewardtune.prune" in sys.modules)
        pipe = load_pipeline({str(tmp_path / "pruned")!r})
        print(pipe.unet.conv_in.out_channels, "rewardtune.prune.io" in sys.modules)
    """)
    assert lines == ["False", "False", f"{pruned.conv_in.out_channels} True"]
    assert pruned.conv_in.out_channels < tiny_pipe.unet.conv_in.out_channels


def test_rewards_do_not_import_the_diffusion_layer():
    lines = run_python("""
        import sys
        import rewardtune.rewards
        import rewardtune.rewards.clipscore, rewardtune.rewards.hpsv2, rewardtune.rewards.pickscore
        import rewardtune.rewards.aesthetic, rewardtune.rewards.imagereward, rewardtune.rewards.shapes
        import rewardtune.rewards.clip_hf, rewardtune.rewards.preprocess, rewardtune.perceptual.features
        print(sorted(m for m in sys.modules if m.startswith(("rewardtune.diffusion", "diffusers"))))
    """)
    assert lines == ["[]"]


# --- benchmarks path ------------------------------------------------------------------------------------------------

def test_benchmarks_go_to_the_checkout_of_the_working_directory(tmp_path, monkeypatch):
    from rewardtune.utils import benchmarks

    monkeypatch.delenv(benchmarks.BENCHMARKS_ENV, raising=False)
    checkout = tmp_path / "checkout"
    (checkout / "scripts" / "deep").mkdir(parents=True)
    (checkout / "pyproject.toml").write_text('[build-system]\nrequires = []\n\n[project]\nname = "rewardtune"\n')
    (checkout / "scripts" / "pyproject.toml").write_text('[project]\nname = "something-else"\n')
    monkeypatch.chdir(checkout / "scripts" / "deep")
    assert benchmarks.repo_root() == checkout.resolve()
    path = benchmarks.update_section("demo", "| a | b |")
    assert path == checkout.resolve() / "BENCHMARKS.md"
    assert "<!-- demo:start -->\n| a | b |\n<!-- demo:end -->" in path.read_text()
    benchmarks.update_section("demo", "| c |")
    assert path.read_text().count("demo:start") == 1 and "| c |" in path.read_text()
    monkeypatch.setenv(benchmarks.BENCHMARKS_ENV, str(tmp_path / "elsewhere.md"))
    assert benchmarks.update_section("demo", "x") == tmp_path / "elsewhere.md"
    monkeypatch.delenv(benchmarks.BENCHMARKS_ENV)
    outside = tmp_path / "outside"
    outside.mkdir()
    monkeypatch.chdir(outside)
    with pytest.raises(UserError, match="no rewardtune checkout at or above .*REWARDTUNE_BENCHMARKS") as info:
        benchmarks.update_section("demo", "x")
    assert "\n" not in str(info.value)
