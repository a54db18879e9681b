"""Peak memory of ``rewardtune score`` over many large images (issue 10): it should not grow with their number.

    python scripts/bench_score_memory.py                                   # 100 and 1,000 images of 1024x1024
    python scripts/bench_score_memory.py --counts 100 --code /tmp/old      # another checkout (e.g. before a fix)

Images are generated once (coarse random noise, upsampled, so they are quick to write and decode to full size)
into ``--workdir``; each count gets a folder of hard links to the first N. Each case runs
``python -m rewardtune score --reward R --images DIR --prompt x --out F.csv --batch-size B`` in its own process and
reads that process's peak resident memory from ``os.wait4`` (``ru_maxrss``). Prints one markdown row per case.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image


def make_images(folder: Path, count: int, size: int, seed: int = 0) -> list[Path]:
    """``count`` RGB PNGs of ``size``x``size`` (reused when already there)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        path = folder / f"{i:05d}.png"
        if not path.exists():
            coarse = Image.fromarray(rng.integers(0, 256, (size // 8, size // 8, 3), dtype=np.uint8))
            coarse.resize((size, size), Image.BILINEAR).save(path, compress_level=1)
        paths.append(path)
    return paths


def linked_folder(paths: list[Path], folder: Path) -> Path:
    """A folder holding hard links to ``paths`` (distinct files to ``rewardtune score``, no extra disk)."""
    folder.mkdir(parents=True, exist_ok=True)
    for path in paths:
        if not (folder / path.name).exists():
            os.link(path, folder / path.name)
    return folder


def peak_rss(cmd: list[str], env: dict, cwd: Path) -> tuple[float, float, int, str]:
    """``(peak RSS in MiB, seconds, exit code, stderr tail)`` of one subprocess."""
    with tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
        err.seek(0)
        tail = err.read().decode(errors="replace").strip().splitlines()[-1:] or [""]
    return usage.ru_maxrss / 1024, seconds, os.waitstatus_to_exitcode(status), tail[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[32])
    parser.add_argument("--reward", default="jpeg_compressibility")
    parser.add_argument("--code", default=None, help="run the rewardtune package of this checkout (PYTHONPATH)")
    parser.add_argument("--label", default="this checkout")
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "rewardtune_bench_score_memory"))
    args = parser.parse_args()

    work = Path(args.workdir)
    start = time.perf_counter()
    images = make_images(work / f"all_{args.size}", max(args.counts), args.size)
    print(f"generated {len(images)} images of {args.size}x{args.size} in {time.perf_counter() - start:.0f} s",
          file=sys.stderr)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    if args.code:  # ahead of the installed (editable) package; the subprocess runs outside any checkout
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [args.code, env.get("PYTHONPATH")]))
    print("| code | images | size | batch size | peak RSS (MiB) | wall (s) | rows |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for count in args.counts:
        folder = linked_folder(images[:count], work / f"n{count}_{args.size}")
        for batch in args.batch_sizes:
            out = work / f"scores_{count}_{batch}.csv"
            cmd = [sys.executable, "-m", "rewardtune", "score", "--reward", args.reward, "--images", str(folder),
                   "--prompt", "x", "--out", str(out), "--batch-size", str(batch)]
            rss, seconds, code, tail = peak_rss(cmd, env, work)  # cwd: not a checkout
            rows = len(out.read_text().splitlines()) - 1 if code == 0 and out.exists() else f"exit {code}: {tail}"
            print(f"| {args.label} | {count:,} | {args.size}² | {batch} | {rss:,.0f} | {seconds:.0f} | {rows} |",
                  flush=True)
            out.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
