"""Train ``shapes_preference``, the shapes world's learned proxy reward, and measure it against gold.

    python scripts/train_shapes_rewards.py [--steps 1500]

Like HPSv2 and PickScore, which learn from noisy human choices between two images of the same prompt, the proxy
learns from **noisy pairwise labels**: for two images of one prompt, "a is preferred" is drawn with probability
``sigmoid((gold_a - gold_b) / temperature)``. Candidate images are renders whose attributes partly match the prompt,
half of them passed through the shapes-tiny VAE (generated images look like that). The tiny CLIP is finetuned with
a preference head (Bradley-Terry loss). Held-out pairwise accuracy against gold (and the accuracy of the noisy labels
themselves, the "single human" row) goes to BENCHMARKS.md; the model is written to
rewardtune/assets/shapes-preference.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from rewardtune.prompts import read_prompts
from rewardtune.rewards.shapes import ASSETS, PreferenceHead, embed_pair, load_tiny_clip
from rewardtune.shapes.captions import parse_prompt
from rewardtune.shapes.oracle import gold_scores, images_from_uint8
from rewardtune.shapes.world import CHOICES, Scene, render
from rewardtune.utils.benchmarks import command_line, header, update_section
from rewardtune.utils.plots import plot_curves

log = logging.getLogger("train_shapes_rewards")
FIGURES = Path(__file__).resolve().parents[1] / "docs" / "figures"


def candidate_scene(asked: dict[str, str], rng: np.random.Generator) -> Scene:
    """A scene for a prompt: unnamed attributes random; with probability 0.4 one named attribute is wrong."""
    attrs = {k: asked.get(k, v[int(rng.integers(len(v)))]) for k, v in CHOICES.items()}
    if asked and rng.random() < 0.4:
        key = list(asked)[int(rng.integers(len(asked)))]
        others = [v for v in CHOICES[key] if v != asked[key]]
        attrs[key] = others[int(rng.integers(len(others)))]
    return Scene(**attrs, softness=float(rng.uniform(0.3, 2.0)), noise=float(rng.choice([0.0, 0.03])),
                 lighting=float(rng.uniform(0.8, 1.1)), jitter_x=float(rng.uniform(-1.5, 1.5)),
                 jitter_y=float(rng.uniform(-1.5, 1.5)))


@torch.no_grad()
def make_pairs(prompts: list[str], n_pairs: int, seed: int, vae, temperature: float) -> dict[str, torch.Tensor]:
    """``n_pairs`` same-prompt image pairs with gold scores and one noisy preference label each."""
    rng = np.random.default_rng(seed)
    chosen = [prompts[int(i)] for i in rng.integers(len(prompts), size=n_pairs)]
    scenes = [candidate_scene(parse_prompt(p), rng) for p in chosen for _ in range(2)]
    images = images_from_uint8(render(scenes, seed=seed))
    through_vae = torch.from_numpy(rng.random(len(scenes)) < 0.5)
    if vae is not None:
        idx = through_vae.nonzero().squeeze(1)
        for start in range(0, len(idx), 1024):
            part = idx[start:start + 1024]
            latents = vae.encode(images[part] * 2 - 1).latent_dist.mean
            images[part] = (vae.decode(latents).sample / 2 + 0.5).clamp(0, 1)
    gold = gold_scores(images, [p for p in chosen for _ in range(2)])["gold"].view(n_pairs, 2)
    p_first = torch.sigmoid((gold[:, 0] - gold[:, 1]) / temperature)
    label = (torch.from_numpy(rng.random(n_pairs)).float() < p_first).float()
    return {"images": images.view(n_pairs, 2, 3, 32, 32), "prompts": chosen, "gold": gold, "label": label}


def pair_scores(towers, head, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """``[N,2,3,H,W]`` -> ``[N,2]`` proxy scores."""
    n = images.shape[0]
    img, txt = embed_pair(towers, images.flatten(0, 1), [p for p in prompts for _ in range(2)])
    return head(img, txt).view(n, 2)


def pairwise_accuracy(scores: torch.Tensor, gold: torch.Tensor, min_gap: float = 0.02) -> float:
    """Fraction of pairs ordered like gold, over pairs whose gold differs by more than ``min_gap``."""
    keep = (gold[:, 0] - gold[:, 1]).abs() > min_gap
    agree = torch.sign(scores[:, 0] - scores[:, 1]) == torch.sign(gold[:, 0] - gold[:, 1])
    return float(agree[keep].float().mean())


def train(args) -> None:
    from diffusers import AutoencoderKL

    torch.manual_seed(args.seed)
    vae = AutoencoderKL.from_pretrained(args.vae).eval()
    train_prompts = read_prompts(ASSETS / "prompts" / "shapes_large.txt")
    data = make_pairs(train_prompts, args.pairs, args.seed, vae, args.temperature)
    heldout = make_pairs(read_prompts(ASSETS / "prompts" / "shapes_heldout.txt"), 2000, args.seed + 1, vae,
                         args.temperature)
    towers = load_tiny_clip(ASSETS / "shapes-clip")
    towers.model.requires_grad_(True)  # finetuned with the head, as HPSv2 finetunes its CLIP
    head = PreferenceHead(towers.model.config.projection_dim)
    opt = torch.optim.AdamW([{"params": towers.model.parameters(), "lr": args.clip_lr},
                             {"params": head.parameters(), "lr": args.head_lr}], weight_decay=0.01)
    rng = np.random.default_rng(args.seed)
    t0 = time.time()
    args.work.mkdir(parents=True, exist_ok=True)
    with open(args.work / "preference_log.jsonl", "w") as fh:
        for step in range(args.steps):
            idx = rng.integers(args.pairs, size=args.batch)
            scores = pair_scores(towers, head, data["images"][idx], [data["prompts"][i] for i in idx])
            loss = F.binary_cross_entropy_with_logits(scores[:, 0] - scores[:, 1], data["label"][idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if step % 100 == 0 or step == args.steps - 1:
                record = {"step": step, "seconds": round(time.time() - t0, 1), "loss": round(loss.item(), 5)}
                if step % 500 == 0 or step == args.steps - 1:
                    record["heldout_acc"] = round(evaluate(towers, head, heldout)["proxy"], 4)
                fh.write(json.dumps(record) + "\n")
                fh.flush()
                log.info(record)
    plot_curves(args.work / "preference_log.jsonl", ["loss", "heldout_acc"], FIGURES / "shapes_preference_curve.png",
                title="shapes_preference (Bradley-Terry on noisy pairs)")
    save(towers, head, ASSETS / "shapes-preference")
    report(evaluate(towers, head, heldout), args)


@torch.no_grad()
def evaluate(towers, head, pairs) -> dict[str, float]:
    scores = torch.cat([pair_scores(towers, head, pairs["images"][i:i + 500], pairs["prompts"][i:i + 500])
                        for i in range(0, len(pairs["prompts"]), 500)])
    alignment = _alignment_scores(pairs)
    noisy = torch.stack([pairs["label"], 1 - pairs["label"]], 1)
    return {"proxy": pairwise_accuracy(scores, pairs["gold"]), "alignment": pairwise_accuracy(alignment,
            pairs["gold"]), "labels": pairwise_accuracy(noisy, pairs["gold"])}


@torch.no_grad()
def _alignment_scores(pairs) -> torch.Tensor:
    img, txt = embed_pair(load_tiny_clip(ASSETS / "shapes-clip"), pairs["images"].flatten(0, 1),
                          [p for p in pairs["prompts"] for _ in range(2)])
    return (img * txt).sum(-1).view(-1, 2)


def save(towers, head, folder: Path) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    towers.model.save_pretrained(folder)
    towers.tokenizer.save_pretrained(folder)
    for name in ("preprocessor_config.json", "vocab.json", "merges.txt"):  # BPE files: the real CLIP layout
        (folder / name).write_text((ASSETS / "shapes-clip" / name).read_text())
    save_file({k: v.contiguous() for k, v in head.state_dict().items()}, folder / "head.safetensors")
    (folder / "head_config.json").write_text(json.dumps({"dim": head.net[0].in_features // 3,
                                                         "hidden": head.net[0].out_features}))


def report(acc: dict[str, float], args) -> None:
    text = header(command_line()) + (
        f"Held-out pairwise accuracy against gold on 2,000 same-prompt pairs of held-out prompts (pairs whose gold "
        f"differs by > 0.02). Training: {args.pairs} pairs, labels drawn with temperature {args.temperature}.\n\n"
        "| scorer | accuracy vs gold |\n|---|---|\n"
        f"| `shapes_preference` (learned proxy) | {acc['proxy']:.3f} |\n"
        f"| `shapes_alignment` (tiny CLIP cosine, zero-shot) | {acc['alignment']:.3f} |\n"
        f"| one noisy label (the 'single human' row) | {acc['labels']:.3f} |\n"
        "| chance | 0.500 |\n")
    print(text)
    update_section("shapes-rewards", text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--pairs", type=int, default=20000)
    parser.add_argument("--temperature", type=float, default=0.05)
    parser.add_argument("--clip-lr", type=float, default=1e-4)
    parser.add_argument("--head-lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=Path("build/shapes"))
    parser.add_argument("--vae", type=Path, default=ASSETS / "shapes-tiny" / "vae", help="VAE for the reconstructions")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    train(args)


if __name__ == "__main__":
    main()
