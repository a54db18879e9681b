"""Reward scoring speed; writes its tables into BENCHMARKS.md (section ``reward-speed``).

    python scripts/bench_score.py [--quick] [--no-write] [--repeats 5] [--full-repeats 3] [--baseline-calls 3]
                                  [--full-arch ViT-H-14]

1. Every registered reward on its tiny random model: images/s at batch 1, 8 and 32 (64x64 inputs, groups of 4
   images per prompt as in PRDP's B samples per prompt). The models come from ``tests/tiny_rewards.py``, the same
   builders the tests use, imported by putting ``tests/`` on ``sys.path``: one set of builders, no copy in the
   library (they write random weights and are no part of the package's API).
2. Full-size HPSv2 (open_clip ViT-H-14 with random weights, ``pretrained=None``, saved as an HPS-format checkpoint
   ``{'state_dict': ...}`` in a temporary folder; 512x512 inputs, 8 prompts x 4 images): rewardtune loads once and
   scores 32 images in one batch, against an emulation of the ``hpsv2`` package's ``score()`` called per image
   (every call re-reads the checkpoint with ``torch.load`` + ``load_state_dict``, preprocesses one PIL image and
   encodes its prompt, batch size 1; the package itself is not installed). The baseline is timed on
   ``--baseline-calls`` calls and its median call is multiplied by 32, which the table says. Needs ~8 GB of free
   RAM and ~4 GB of temporary disk; estimated 5-10 minutes on 2 CPU cores (mostly the 3 x 32 ViT-H forwards).
   Skipped with ``--quick``.

Times are medians of repeats after a warm-up call (for the full-size batch: a one-image call), measured side by
side in one process, without gradients.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from rewardtune.rewards import REWARDS, load_reward
from rewardtune.utils.benchmarks import command_line, header, median_seconds, update_section

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from tiny_rewards import tiny_options  # noqa: E402  (the tests' builders; see the module docstring)

BATCHES = (1, 8, 32)
PER_PROMPT = 4
PROMPTS = ["a red circle", "a blue square on a white background", "a small green triangle", "a photo of a dog",
           "a painting of a cat", "a big yellow star in the top left corner", "a purple hexagon", "an orange heart"]
FULL_BATCH, FULL_SIZE = 32, 512


def prompts_for(n: int) -> list[str]:
    """``n`` prompts, each repeated for ``PER_PROMPT`` consecutive images."""
    return [PROMPTS[(i // PER_PROMPT) % len(PROMPTS)] for i in range(n)]


def random_images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """``[n,3,size,size]`` in [0,1]."""
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def images_per_second(reward, batch: int, repeats: int) -> float:
    """``batch`` / median seconds to score ``batch`` random 64x64 images."""
    images, prompts = random_images(batch, 64), prompts_for(batch)
    return batch / median_seconds(lambda: reward(images, prompts), repeats)


def tiny_table(repeats: int) -> str:
    """Markdown table: images/s of every registered reward's tiny model at each batch size."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in REWARDS.names():
            reward = load_reward(name, **tiny_options(name, Path(tmp) / name.replace(".", "_")))
            rates = [images_per_second(reward, batch, repeats) for batch in BATCHES]
            rows.append(f"| `{name}` | " + " | ".join(f"{r:,.0f}" for r in rates) + " |")
            progress(f"tiny {name}: " + ", ".join(f"{r:.0f}" for r in rates) + " images/s")
    head = "| reward (tiny model) | " + " | ".join(f"B={b}" for b in BATCHES) + " |\n"
    return head + "|---" * (len(BATCHES) + 1) + "|\n" + "\n".join(rows) + "\n"


def save_full_hps(folder: Path, name: str) -> Path:
    """A random-weight open_clip ``name`` saved as ``HPS_v2_compressed.pt`` = ``{'state_dict': ...}`` (3.9 GB for
    ViT-H-14)."""
    import open_clip

    model = open_clip.create_model(name, pretrained=None, pretrained_image=False, pretrained_text=False)
    path = folder / "HPS_v2_compressed.pt"
    torch.save({"state_dict": model.state_dict()}, path)
    return path


class PerImageHPS:
    """The hpsv2 package's way of scoring, emulated: the model is built once, but every ``score(image, prompt)``
    re-reads the checkpoint (``torch.load`` + ``load_state_dict``), preprocesses one PIL image (resize the longest
    side to the model's input size, 224, pad with 0, OpenAI mean/std) and encodes its prompt; the score is the
    cosine."""

    def __init__(self, checkpoint: Path, name: str) -> None:
        import open_clip

        self.checkpoint = checkpoint
        self.model = open_clip.create_model(name, pretrained=None, pretrained_image=False,
                                            pretrained_text=False).eval()
        size = open_clip.get_model_preprocess_cfg(self.model)["size"]
        self.preprocess = open_clip.image_transform(size, is_train=False, resize_mode="longest", fill_color=0)
        self.tokenizer = open_clip.get_tokenizer(name)
        self.reload_seconds: list[float] = []

    def score(self, image, prompt: str) -> float:
        start = time.perf_counter()
        checkpoint = torch.load(self.checkpoint, map_location="cpu", weights_only=True)
        self.model.load_state_dict(checkpoint["state_dict"])
        del checkpoint
        self.reload_seconds.append(time.perf_counter() - start)
        with torch.no_grad():
            image_features = self.model.encode_image(self.preprocess(image)[None], normalize=True)
            text_features = self.model.encode_text(self.tokenizer([prompt]), normalize=True)
        return float((image_features * text_features).sum())


def to_pil(images: torch.Tensor) -> list:
    """``[B,3,H,W]`` in [0,1] -> B PIL RGB images (what the hpsv2 package takes)."""
    from PIL import Image

    arrays = (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(array) for array in arrays]


def time_rewardtune(checkpoint: Path, name: str, images: torch.Tensor, prompts: list[str], repeats: int):
    """-> (load seconds, median seconds to score the whole batch, the batch's scores). Warm-up: one image."""
    start = time.perf_counter()
    reward = load_reward("hpsv2", checkpoint=str(checkpoint), arch=name)
    load = time.perf_counter() - start
    progress(f"rewardtune loaded {name} HPS in {load:.1f} s; scoring {len(prompts)} images x {repeats}")
    reward(images[:1], prompts[:1])
    times, scores = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        scores = reward(images, prompts)
        times.append(time.perf_counter() - start)
        progress(f"rewardtune batch of {len(prompts)}: {times[-1]:.1f} s")
    del reward
    gc.collect()
    return load, statistics.median(times), scores


def time_per_image(checkpoint: Path, name: str, images: torch.Tensor, prompts: list[str], calls: int):
    """-> (median seconds per call, median reload seconds per call, scores of the first ``calls`` images)."""
    baseline = PerImageHPS(checkpoint, name)
    pil = to_pil(images[:calls])
    times, scores = [], []
    for image, prompt in zip(pil, prompts):
        start = time.perf_counter()
        scores.append(baseline.score(image, prompt))
        times.append(time.perf_counter() - start)
        progress(f"per-image call {len(times)}/{calls}: {times[-1]:.1f} s")
    reload = statistics.median(baseline.reload_seconds)
    del baseline
    gc.collect()
    return statistics.median(times), reload, torch.tensor(scores)


def full_hps_section(arch: str, full_repeats: int, baseline_calls: int) -> str:
    """Markdown for the full-size HPSv2 comparison (see the module docstring); ``arch`` is an open_clip name or
    model-config JSON (ViT-H-14 for the real thing; a tiny JSON checks this code path in seconds)."""
    from rewardtune.rewards.clipscore import register_arch

    name = register_arch(arch)
    images, prompts = random_images(FULL_BATCH, FULL_SIZE, seed=1), prompts_for(FULL_BATCH)
    with tempfile.TemporaryDirectory() as tmp:
        progress(f"building and saving a random {name} HPS checkpoint")
        checkpoint = save_full_hps(Path(tmp), name)
        gc.collect()
        load, batched, ours = time_rewardtune(checkpoint, name, images, prompts, full_repeats)
        per_call, reload, theirs = time_per_image(checkpoint, name, images, prompts, baseline_calls)
    agree = float((ours[:baseline_calls] - theirs).abs().max())
    per_image_32 = FULL_BATCH * per_call
    return (
        f"HPSv2 at full size: open_clip {name} with random weights (`pretrained=None`) in an HPS-format checkpoint, "
        f"{FULL_BATCH} images of {FULL_SIZE}x{FULL_SIZE}, {FULL_BATCH // PER_PROMPT} prompts x {PER_PROMPT} "
        "images, no gradients.\n\n"
        "| scoring | seconds for 32 images | images/s |\n|---|---|---|\n"
        f"| rewardtune `load_reward('hpsv2')`, loaded once ({load:.1f} s, not counted), one batch of 32 "
        f"(median of {full_repeats}) | {batched:.1f} | {FULL_BATCH / batched:.2f} |\n"
        f"| hpsv2 package's way, emulated: checkpoint `torch.load` + `load_state_dict` every image "
        f"({reload:.1f} s of each call), batch 1: median of {baseline_calls} calls x 32 | {per_image_32:.1f} | "
        f"{FULL_BATCH / per_image_32:.2f} |\n\n"
        f"Speed-up: **{per_image_32 / batched:.1f}x**. The per-image baseline was timed on {baseline_calls} calls, "
        f"not 32, to keep the run short on CPU. Its scores agree with rewardtune's to {agree:.1e} (PIL uint8 "
        "preprocessing vs float torch ops).\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny models only, 2 repeats")
    parser.add_argument("--no-write", action="store_true", help="do not update BENCHMARKS.md")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per tiny-model measurement")
    parser.add_argument("--full-repeats", type=int, default=3, help="timed repeats of the full-size batch of 32")
    parser.add_argument("--baseline-calls", type=int, default=3, help="per-image baseline calls timed")
    parser.add_argument("--full-arch", default="ViT-H-14", help="open_clip name or model-config JSON of the "
                        "full-size comparison (a tiny JSON with --no-write checks the code path)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")                # never download: every model here is built locally
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # read when huggingface_hub is first imported
    repeats = 2 if args.quick else args.repeats
    text = header(command_line()) + (
        f"Images/s (median of {repeats} after a warm-up) of each registered reward on its tiny random model from "
        f"`tests/tiny_rewards.py`, 64x64 inputs, {PER_PROMPT} images per prompt.\n\n" + tiny_table(repeats) + "\n")
    if args.quick:
        text += "Full-size HPSv2 comparison skipped (`--quick`).\n"
    else:
        text += full_hps_section(args.full_arch, args.full_repeats, min(args.baseline_calls, FULL_BATCH))
    print(text)
    if not args.no_write:
        update_section("reward-speed", text)


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
