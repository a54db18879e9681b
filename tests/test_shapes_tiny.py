"""The shipped shapes-tiny pipeline and shapes-clip: real diffusers/transformers folders that load offline."""

from pathlib import Path

import torch

from rewardtune.diffusion.loading import load_pipeline
from rewardtune.diffusion.service import generate
from rewardtune.diffusion.settings import SamplerSettings
from rewardtune.models_table import ASSETS
from rewardtune.shapes.oracle import read_images

PROMPTS = ["a red circle", "a blue square", "a green triangle", "a yellow circle",
           "an orange square", "a purple triangle", "a big red square on a white background",
           "a small blue circle in the top left corner"]


def _folder_megabytes(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20


def test_shipped_assets_are_small_and_complete():
    tiny, clip = ASSETS / "shapes-tiny", ASSETS / "shapes-clip"
    for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (tiny / part).is_dir(), part
    assert (tiny / "model_index.json").is_file() and (clip / "config.json").is_file()
    assert _folder_megabytes(tiny) + _folder_megabytes(clip) <= 40


def test_shapes_tiny_draws_free_form_prompts():
    pipe = load_pipeline("shapes-tiny")
    prompts = [p for p in PROMPTS for _ in range(2)]
    images = generate(pipe, PROMPTS, list(range(len(prompts))), SamplerSettings(steps=20, guidance=5.0),
                      per_prompt=2).images
    assert images.shape == (16, 3, 32, 32)
    reading = read_images(images)
    hits = [reading.color[i] is not None for i in range(len(prompts))]
    assert sum(hits) >= 14  # an object is drawn
    from rewardtune.shapes.captions import parse_prompt

    correct = [reading.color[i] == parse_prompt(p)["color"] and reading.shape[i] == parse_prompt(p)["shape"]
               for i, p in enumerate(prompts)]
    assert sum(correct) / len(correct) >= 0.6, sum(correct)


def test_shapes_tiny_runs_in_the_stock_diffusers_pipeline():
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(ASSETS / "shapes-tiny")
    pipe.set_progress_bar_config(disable=True)
    out = pipe(["a red circle"], num_inference_steps=5, guidance_scale=5.0, output_type="pt",
               generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (1, 3, 32, 32)


def test_shapes_clip_loads_with_transformers():
    from transformers import CLIPModel, CLIPTokenizer

    model = CLIPModel.from_pretrained(ASSETS / "shapes-clip").eval()
    tokenizer = CLIPTokenizer.from_pretrained(ASSETS / "shapes-clip")
    ids = tokenizer(["a red circle", "a blue square"], padding="max_length", max_length=32, return_tensors="pt")
    with torch.no_grad():
        text = model.get_text_features(input_ids=ids.input_ids)
    text = getattr(text, "pooler_output", text)  # transformers 5 returns a model output, 4.x a tensor
    assert text.shape == (2, model.config.projection_dim) and torch.isfinite(text).all()


def test_shipped_shapes_rewards_agree_with_gold_on_held_out_pairs():
    """The learned proxy orders same-prompt pairs like gold well above chance (full numbers: BENCHMARKS.md)."""
    from rewardtune.prompts import read_prompts
    from rewardtune.rewards import load_reward
    from rewardtune.shapes.oracle import gold_scores, images_from_uint8
    from rewardtune.shapes.world import Scene, render

    prompts = read_prompts(ASSETS / "prompts" / "shapes_heldout.txt")[:40]
    from rewardtune.shapes.captions import parse_prompt

    keys = ("color", "shape", "size", "position", "background")
    good = [Scene(**{k: parse_prompt(p)[k] for k in keys}, softness=0.4) for p in prompts]
    wrong_color = [Scene(**{**{k: parse_prompt(p)[k] for k in keys},
                            "color": "green" if parse_prompt(p)["color"] != "green" else "red"}, softness=0.4)
                   for p in prompts]
    images = images_from_uint8(render(good + wrong_color))
    both = prompts + prompts
    gold = gold_scores(images, both)["gold"]
    gold_order = gold[:40] > gold[40:]
    assert gold_order.float().mean() > 0.8  # the right colour usually wins; taste decides the rest
    for name in ("shapes_preference", "shapes_alignment"):
        scores = load_reward(name)(images, both)
        agreement = ((scores[:40] > scores[40:]) == gold_order).float().mean().item()
        assert agreement >= 0.75, (name, agreement)
