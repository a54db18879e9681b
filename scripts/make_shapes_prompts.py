"""Write the shapes world's prompt sets into rewardtune/assets/prompts/ (deterministic).

    python scripts/make_shapes_prompts.py

small (36, every colour-shape pair), large (6,000 unique captions of training combinations) and heldout (200
fully specified captions of combinations never rendered for training).
"""

from pathlib import Path

from rewardtune.shapes.captions import make_prompt_set, small_prompt_set

OUT = Path(__file__).resolve().parents[1] / "rewardtune" / "assets" / "prompts"


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    sets = {
        "shapes_small.txt": small_prompt_set(),
        "shapes_large.txt": make_prompt_set(6000, seed=11, split="train"),
        "shapes_heldout.txt": make_prompt_set(200, seed=12, split="heldout"),
    }
    for name, prompts in sets.items():
        (OUT / name).write_text("\n".join(prompts) + "\n")
        print(f"{name}: {len(prompts)} prompts")


if __name__ == "__main__":
    main()
