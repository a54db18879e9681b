"""``rewardtune sample [CONFIG] [key=value ...] [--flags]``: images from a pipeline, with a grid and a manifest of
prompts and seeds.

Image ``k`` (in prompt-major order) is drawn from seed ``seed + k`` with its own generator, so the same seed always
gives the same image (bit-identical at equal batch size; other batch sizes change only float summation order).
PNGs are written batch by batch; only the images ``grid.png`` shows (at most 64) stay in memory. The settings are
:class:`SampleConfig`: a YAML preset (``configs/sample/``), the flags, and ``key=value`` overrides.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from rewardtune.commands.common import add_config_arguments, finite_float, load_job_config, positive_int
from rewardtune.config import PATH, require, save_config
from rewardtune.errors import UserError

logger = logging.getLogger(__name__)

SEED_MAX = 2 ** 64 - 1  # torch generators take 64-bit seeds
PRESETS = ("sample",)  # configs/sample/*.yaml


@dataclass
class SampleConfig:
    """What to sample and how.

    ``model``: registered name, local pipeline folder or hub id (null: shapes-tiny, or the base named in the
    ``lora`` folder); ``lora``: LoRA weights to load on top of ``model`` (the final/ folder of a LoRA finetuning
    run); ``prompts`` / ``prompts_file``: the prompts, inline or from a file (.txt, .csv, .jsonl or a shipped set
    such as shapes_heldout), one of them; ``num_images``: images per prompt; ``steps``: denoising steps; ``guidance``:
    classifier-free guidance scale (1 disables it); ``eta``: DDIM eta (0 deterministic, 1 DDPM-like), for a flow
    model (SD3) the SDE's noise level (0 is the ODE, as diffusers samples); ``seed``:
    image k uses seed + k; ``batch_size``: images per denoising call; ``height`` / ``width``: pixels, a multiple of
    the VAE scale factor (null: the model's size); ``dtype``: float32, float16 or bfloat16; ``device``: cpu, cuda,
    cuda:N or mps; ``out``: output folder (new or empty unless ``overwrite``); ``overwrite``: allow writing into a
    non-empty folder.
    """

    model: str | None = field(default=None, metadata=PATH)
    prompts: list[str] | None = None
    prompts_file: str | None = field(default=None, metadata=PATH)
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
    lora: str | None = field(default=None, metadata=PATH)

    def __post_init__(self) -> None:
        require(self.num_images >= 1, "num_images", "at least 1", self.num_images)
        require(0 <= self.seed <= SEED_MAX, "seed", f"in [0, {SEED_MAX}] (a 64-bit generator seed)", self.seed)
        self.sampler()  # steps, guidance, eta, batch_size, height, width: the sampler settings' own rules

    def sampler(self):
        """The :class:`~rewardtune.diffusion.settings.SamplerSettings` of these flags (the model's own scheduler
        family, empty negative)."""
        from rewardtune.diffusion.settings import SamplerSettings

        return SamplerSettings(steps=self.steps, guidance=self.guidance, eta=self.eta, batch_size=self.batch_size,
                               height=self.height, width=self.width)

    def prompt_list(self) -> list[str]:
        from rewardtune.prompts import read_prompts

        if self.prompts and self.prompts_file:
            raise UserError("give prompts either inline (--prompt, prompts=) or from a file (--prompts, "
                            "prompts_file=), not both")
        prompts = read_prompts(self.prompts_file) if self.prompts_file else [p.strip() for p in self.prompts or []]
        if not prompts or not all(prompts):
            raise UserError("no prompt given; pass --prompt TEXT or --prompts FILE (or a CONFIG that sets prompts "
                            "or prompts_file)")
        return prompts


SCHEMA = SampleConfig

DESCRIPTION = ("Sample images; write PNGs, grid.png and manifest.{json,csv} mapping files to prompts and seeds. The "
               "same seed gives the same images. Settings come from an optional YAML preset (CONFIG), the flags "
               "below and key=value overrides, e.g. `rewardtune sample configs/sample/shapes_heldout.yaml steps=10 "
               "out=heldout/`.")

EXAMPLES = """\
examples:
  rewardtune sample --model shapes-tiny --prompt "a red circle" --num-images 8 --out samples/
  rewardtune sample configs/sample/shapes_heldout.yaml num_images=1 out=outputs/heldout
  rewardtune sample configs/sample/sd15.yaml model=/path/to/sd15 --out sd15/"""



def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``CONFIG [key=value ...]`` and one flag per common setting; a flag not given leaves the preset's value."""
    add_config_arguments(parser, SCHEMA, EXAMPLES)
    unset = argparse.SUPPRESS  # absent flags stay out of the namespace: the preset or the default applies
    flag = functools.partial(parser.add_argument, default=unset)
    flag("--model", help="registered name, local pipeline folder or hub id (default: shapes-tiny, or the base named "
         "in the --lora folder; see `rewardtune models`)")
    flag("--lora", metavar="PATH", help="LoRA weights to load on top of --model (the final/ folder of a LoRA "
         "finetuning run)")
    src = parser.add_mutually_exclusive_group()
    src.add_argument("--prompt", action="append", dest="prompts", metavar="PROMPT", default=unset,
                     help="a prompt (repeat for several)")
    src.add_argument("--prompts", metavar="FILE", dest="prompts_file", default=unset,
                     help="prompt file: .txt (one per line), .csv or .jsonl")
    flag("--num-images", type=positive_int, help=f"images per prompt (default {SampleConfig.num_images})")
    flag("--steps", type=positive_int, help=f"denoising steps (default {SampleConfig.steps})")
    flag("--guidance", type=finite_float, help=f"classifier-free guidance scale (default {SampleConfig.guidance:g})")
    flag("--eta", type=finite_float, help="DDIM eta: 0 deterministic, 1 DDPM-like; for flow models (SD3) the SDE "
         f"noise level, 0 the ODE (default {SampleConfig.eta:g})")
    flag("--seed", type=int, help=f"image k uses seed+k (default {SampleConfig.seed})")
    flag("--batch-size", type=positive_int, help=f"default {SampleConfig.batch_size}")
    flag("--height", type=positive_int, help="pixels, a multiple of the VAE scale factor times the patch size (8 "
         "for Stable Diffusion, 16 for SD3; default: the model's size)")
    flag("--width", type=positive_int, help="pixels, like --height")
    flag("--dtype", help=f"float32, float16 or bfloat16 (default {SampleConfig.dtype})")
    flag("--device", help=f"cpu, cuda, cuda:1, mps ... (default {SampleConfig.device})")
    flag("--out", help=f"output folder, new or empty unless --overwrite (default {SampleConfig.out})")
    flag("--overwrite", action="store_true", help="allow writing into a non-empty folder")


def config_from_args(args: argparse.Namespace) -> SampleConfig:
    """The preset, then the flags given, then ``key=value`` overrides. A prompt source given on the command line
    (``--prompt``/``prompts=`` or ``--prompts``/``prompts_file=``) replaces the preset's."""
    keys = {f.name for f in dataclasses.fields(SampleConfig)}
    flags = {key: value for key, value in vars(args).items() if key in keys}
    return load_job_config(SampleConfig, args, flags, alternatives=(("prompts", "prompts_file"),))


def run(args: argparse.Namespace) -> int:
    out = run_sample(config_from_args(args))
    print(f"wrote {out}/grid.png and manifest.csv")
    return 0


# --- the output folder --------------------------------------------------------------------------------------------

def check_out_dir(out: str | Path, overwrite: bool) -> Path:
    """The checks of :func:`prepare_out_dir`, without creating anything."""
    from rewardtune.outputs import check_writable_folder

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


# --- sampling -----------------------------------------------------------------------------------------------------

GRID_MAX = 64  # grid.png shows at most this many images
PROMPT_CHUNK = 1024  # prompts whose text states are held at once (bounds memory for huge prompt files)


def grid_images(num_prompts: int, per_prompt: int, limit: int = GRID_MAX) -> tuple[Callable[[int], bool], int | None]:
    """Which image indices ``grid.png`` shows (at most ``limit``: the first images of the first prompts, one row
    per prompt) and its column count."""
    shown = min(per_prompt, max(1, limit // num_prompts))
    rows = limit // shown
    return (lambda k: k % per_prompt < shown and k // per_prompt < rows), (shown if num_prompts > 1 else None)


def image_batches(pipe, prompts: list[str], cfg: SampleConfig) -> Iterator:
    """Images ``[b,3,H,W]`` in [0,1] from the sampling service, ``num_images`` per prompt (image k from seed
    ``seed + k``), batch by batch."""
    from rewardtune.diffusion.service import generate_batches

    n = cfg.num_images
    for first in range(0, len(prompts), PROMPT_CHUNK):
        chunk = prompts[first:first + PROMPT_CHUNK]
        seeds = list(range(cfg.seed + first * n, cfg.seed + (first + len(chunk)) * n))
        for part in generate_batches(pipe, chunk, seeds, cfg.sampler(), per_prompt=n):
            yield part.images


def _sample_to(pipe, prompts: list[str], cfg: SampleConfig, out: Path, written: set[str],
               progress: Callable[[int], object]) -> list[dict]:
    """Write each batch's PNGs as it finishes, then ``grid.png``; only the grid's images are kept in memory."""
    from rewardtune.utils.images import make_grid, save_png, to_pil

    in_grid, ncol = grid_images(len(prompts), cfg.num_images)
    rows, tiles = [], []
    for images in image_batches(pipe, prompts, cfg):
        for image in images:
            k, pil = len(rows), to_pil(image)
            _save(out, written, f"{k:05d}.png", functools.partial(save_png, pil))
            rows.append({"file": f"{k:05d}.png", "prompt": prompts[k // cfg.num_images], "seed": cfg.seed + k})
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

    from rewardtune.diffusion.loading import load_pipeline, lora_base_model, to_dtype
    from rewardtune.diffusion.sampling import check_image_size
    from rewardtune.utils.devices import resolve_device
    from rewardtune.utils.io import atomic_write_json, write_csv

    prompts = cfg.prompt_list()
    total = len(prompts) * cfg.num_images
    _check_seeds(cfg.seed, total)
    device, _ = resolve_device(cfg.device), to_dtype(cfg.dtype)
    check_out_dir(cfg.out, cfg.overwrite)
    if cfg.model is None:
        cfg = dataclasses.replace(cfg, model=(lora_base_model(cfg.lora) if cfg.lora else None) or "shapes-tiny")
    pipe = load_pipeline(cfg.model, dtype=cfg.dtype, device=str(device), lora=cfg.lora)
    check_image_size(pipe, cfg.height, cfg.width)
    with output_folder(cfg.out, cfg.overwrite) as (out, written):
        with tqdm(total=total, desc="sampling", unit="img") as bar:
            rows = _sample_to(pipe, prompts, cfg, out, written, bar.update)
        _save(out, written, "manifest.csv", lambda path: write_csv(path, rows))
        _save(out, written, "manifest.json", lambda path: atomic_write_json(path, rows))
        _save(out, written, "config.yaml", lambda path: save_config(cfg, path))
    logger.info("wrote %d images, grid.png and manifest.{json,csv} to %s", len(rows), out)
    return out


__all__ = ["DESCRIPTION", "PRESETS", "SCHEMA", "SEED_MAX", "SampleConfig", "add_arguments", "check_out_dir",
           "config_from_args", "output_folder", "prepare_out_dir", "run", "run_sample"]
