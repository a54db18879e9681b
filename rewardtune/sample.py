"""``rewardtune sample``: images from a pipeline, with a grid and a manifest of prompts and seeds.

Image ``k`` (in prompt-major order) is drawn from seed ``seed + k`` with its own generator, so the same seed always
gives the same image (bit-identical at equal batch size; other batch sizes change only float summation order).
PNGs are written batch by batch; only the images ``grid.png`` shows (at most 64) stay in memory.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from rewardtune.config import require, save_config
from rewardtune.errors import UserError
from rewardtune.outputs import check_writable_folder
from rewardtune.utils.images import make_grid, save_png, to_pil
from rewardtune.utils.io import atomic_write_json, write_csv

logger = logging.getLogger(__name__)

SEED_MAX = 2 ** 64 - 1  # torch generators take 64-bit seeds
GRID_MAX = 64  # grid.png shows at most this many images


@dataclass
class SampleConfig:
    """What to sample and how. ``num_images`` is per prompt; ``eta=0`` is deterministic DDIM."""

    model: str = "shapes-tiny"
    prompts: list[str] | None = None
    prompts_file: str | None = None
    num_images: int = 4
    steps: int = 20
    guidance: float = 5.0
    eta: float = 0.0
    seed: int = 0
    batch_size: int = 64
    height: int | None = None
    width: int | None = None
    dtype: str = "float32"
    device: str = "cpu"
    out: str = "outputs/sample"
    overwrite: bool = False
    lora: str | None = None

    def __post_init__(self) -> None:
        require(self.num_images >= 1, "num_images", "at least 1", self.num_images)
        require(self.steps >= 1, "steps", "a positive number of denoising steps", self.steps)
        require(math.isfinite(self.guidance) and self.guidance >= 0, "guidance",
                "a finite number >= 0 (1 disables classifier-free guidance)", self.guidance)
        require(0 <= self.eta <= 1, "eta", "in [0, 1]", self.eta)
        require(self.batch_size >= 1, "batch_size", "at least 1", self.batch_size)
        require(0 <= self.seed <= SEED_MAX, "seed", f"in [0, {SEED_MAX}] (a 64-bit generator seed)", self.seed)
        for key in ("height", "width"):
            value = getattr(self, key)
            require(value is None or value >= 1, key, "a positive number of pixels", value)

    def prompt_list(self) -> list[str]:
        from rewardtune.prompts import read_prompts

        if self.prompts and self.prompts_file:
            raise UserError("give prompts either inline (--prompt) or from a file (--prompts), not both")
        prompts = read_prompts(self.prompts_file) if self.prompts_file else [p.strip() for p in self.prompts or []]
        if not prompts or not all(prompts):
            raise UserError("no prompt given; pass --prompt TEXT or --prompts FILE with one prompt per line")
        return prompts


def check_out_dir(out: str | Path, overwrite: bool) -> Path:
    """The checks of :func:`prepare_out_dir`, without creating anything."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"output path {str(out)!r} exists and is not a folder; choose another --out")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(f"output folder {str(out)!r} is not empty; choose a new --out or pass --overwrite")
    check_writable_folder(out, f"--out {str(out)!r}")
    return out


def prepare_out_dir(out: str | Path, overwrite: bool) -> Path:
    """Create ``out``; refuse a non-empty folder unless ``overwrite`` (never clobber earlier results silently)."""
    out = check_out_dir(out, overwrite)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create output folder {str(out)!r} ({exc.strerror or exc}); "
                        "choose a writable --out") from None
    return out


@contextlib.contextmanager
def output_folder(out: str | Path, overwrite: bool) -> Iterator[tuple[Path, set[str]]]:
    """:func:`prepare_out_dir`, yielding ``(folder, names written)``. If the block fails, a folder created here
    that holds only the files named in that set is removed again; anything else is never deleted."""
    out = Path(out)
    created = not out.exists()
    prepare_out_dir(out, overwrite)
    written: set[str] = set()
    try:
        yield out, written
    except BaseException:
        if created:
            _remove_own(out, written)
        raise


def _remove_own(out: Path, written: set[str]) -> None:
    names = {p.name for p in out.iterdir()}
    if not names <= written:
        logger.warning("kept %s after the failure: it holds files this run did not write", out)
        return
    for name in names:
        (out / name).unlink()
    out.rmdir()


def _save(out: Path, written: set[str], name: str, write: Callable[[Path], object]) -> None:
    """``write(out / name)``, an ``OSError`` turned into one line naming the file; records ``name``."""
    try:
        write(out / name)
    except OSError as exc:
        raise UserError(f"cannot write {str(out / name)!r} ({exc.strerror or exc}); check the space and "
                        "permissions of --out") from None
    written.add(name)


def check_image_size(pipe, height: int | None, width: int | None) -> None:
    """``height``/``width`` must be multiples of the pipeline's VAE scale factor (8 for Stable Diffusion)."""
    factor = int(getattr(pipe, "vae_scale_factor", 8))
    for key, value in (("height", height), ("width", width)):
        if value is not None and value % factor:
            low = max(factor, value // factor * factor)
            raise UserError(f"{key} {value} is not a multiple of {factor} (this model's VAE scale factor); "
                            f"use e.g. {low} or {low + factor}")


def iter_image_batches(pipe, prompts: list[str], seeds: list[int], cfg: SampleConfig) -> Iterator[torch.Tensor]:
    """Images ``[b,3,H,W]`` in [0,1] for ``prompts[i]`` drawn from ``seeds[i]``, one batch of ``cfg.batch_size``
    at a time."""
    from rewardtune.diffusion.sampling import decode_latents, encode_prompts, generators_for, sample_trajectories

    device = pipe.unet.device
    negative = encode_prompts(pipe, [""])
    for start in range(0, len(prompts), cfg.batch_size):
        embeds = encode_prompts(pipe, prompts[start:start + cfg.batch_size])
        trajectory = sample_trajectories(
            pipe, embeds, negative.expand_as(embeds), generators_for(seeds[start:start + cfg.batch_size], device),
            steps=cfg.steps, guidance=cfg.guidance, eta=cfg.eta, height=cfg.height, width=cfg.width,
        )
        with torch.no_grad():
            images = decode_latents(pipe, trajectory.final).cpu()
        yield images


def generate_images(pipe, prompts: list[str], seeds: list[int], cfg: SampleConfig, progress=None) -> torch.Tensor:
    """All of :func:`iter_image_batches` as one ``[N,3,H,W]`` tensor."""
    batches = []
    for images in iter_image_batches(pipe, prompts, seeds, cfg):
        batches.append(images)
        if progress is not None:
            progress(len(images))
    return torch.cat(batches)


def grid_images(num_prompts: int, per_prompt: int, limit: int = GRID_MAX) -> tuple[Callable[[int], bool], int | None]:
    """Which image indices ``grid.png`` shows (at most ``limit``: the first images of the first prompts, one row
    per prompt) and its column count."""
    shown = min(per_prompt, max(1, limit // num_prompts))
    rows = limit // shown
    return (lambda k: k % per_prompt < shown and k // per_prompt < rows), (shown if num_prompts > 1 else None)


def _sample_to(pipe, items: list[tuple[str, int]], cfg: SampleConfig, out: Path, written: set[str],
               progress: Callable[[int], object]) -> list[dict]:
    """Write each batch's PNGs as it finishes, then ``grid.png``; only the grid's images are kept in memory."""
    in_grid, ncol = grid_images(len(items) // cfg.num_images, cfg.num_images)
    rows, tiles = [], []
    batches = iter_image_batches(pipe, [p for p, _ in items], [s for _, s in items], cfg)
    for images in batches:
        for image in images:
            k, pil = len(rows), to_pil(image)
            _save(out, written, f"{k:05d}.png", functools.partial(save_png, pil))
            rows.append({"file": f"{k:05d}.png", "prompt": items[k][0], "seed": items[k][1]})
            if in_grid(k):
                tiles.append(pil)
        progress(len(images))
    _save(out, written, "grid.png", functools.partial(save_png, make_grid(tiles, ncol=ncol)))
    return rows


def _check_seeds(seed: int, count: int) -> None:
    if seed + count - 1 > SEED_MAX:
        raise UserError(f"seed {seed} + {count} images runs past the largest 64-bit seed {SEED_MAX} (image k uses "
                        "seed + k); choose a smaller --seed")


def run_sample(cfg: SampleConfig) -> Path:
    """Sample ``num_images`` per prompt; write PNGs, ``grid.png``, ``manifest.json/.csv`` and ``config.yaml``.

    Everything is checked before the model loads; the output folder is created once it has loaded, and removed
    again if sampling fails and it holds only this run's files."""
    from tqdm.auto import tqdm

    from rewardtune.diffusion.loading import load_pipeline, to_dtype
    from rewardtune.utils.devices import resolve_device

    prompts = cfg.prompt_list()
    items = [(p, cfg.seed + k) for k, p in enumerate(p for p in prompts for _ in range(cfg.num_images))]
    _check_seeds(cfg.seed, len(items))
    device, _ = resolve_device(cfg.device), to_dtype(cfg.dtype)
    check_out_dir(cfg.out, cfg.overwrite)
    pipe = load_pipeline(cfg.model, dtype=cfg.dtype, device=str(device), lora=cfg.lora)
    check_image_size(pipe, cfg.height, cfg.width)
    with output_folder(cfg.out, cfg.overwrite) as (out, written):
        with tqdm(total=len(items), desc="sampling", unit="img") as bar:
            rows = _sample_to(pipe, items, cfg, out, written, bar.update)
        _save(out, written, "manifest.csv", lambda path: write_csv(path, rows))
        _save(out, written, "manifest.json", lambda path: atomic_write_json(path, rows))
        _save(out, written, "config.yaml", lambda path: save_config(cfg, path))
    logger.info("wrote %d images, grid.png and manifest.{json,csv} to %s", len(rows), out)
    return out
