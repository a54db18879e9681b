"""Speed of the exact T5-less SD3 conditioning (:mod:`rewardtune.diffusion.sd3`) against the pipeline's own rows,
side by side in one process; writes the ``sd3-conditioning`` section of BENCHMARKS.md.

    OMP_NUM_THREADS=2 python scripts/bench_sd3_conditioning.py [--model shapes-tiny-flow] [--batch 72] [--no-write]

A T5-less ``StableDiffusion3Pipeline`` conditions on the CLIP rows plus 256 identical zero rows; rewardtune keeps one
zero row with an attention key bias of log 256. Both are timed on the same transformer, latents and prompts (forward
with no grad, the rollout / re-scoring call; forward + backward, the training call), one after the other, median of
``--repeats``; the largest difference of the two outputs is reported beside the speed-up.
"""

from __future__ import annotations

import argparse

import torch

from rewardtune.diffusion.loading import load_pipeline
from rewardtune.diffusion.sampling import encode_prompts
from rewardtune.utils.benchmarks import command_line, header, median_seconds, update_section


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="shapes-tiny-flow")
    parser.add_argument("--batch", type=int, default=72, help="rows per call (72: an epoch's 36 samples with CFG)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    pipe = load_pipeline(args.model)
    model = pipe.transformer
    prompts = ["a red circle on a white background", "a small blue square in the top left corner"]
    prompts = (prompts * args.batch)[: args.batch]
    cond = encode_prompts(pipe, prompts)
    with torch.no_grad():
        full, _, pooled, _ = pipe.encode_prompt(prompt=prompts, prompt_2=None, prompt_3=None,
                                                do_classifier_free_guidance=False)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, model.config.in_channels, model.config.sample_size, model.config.sample_size,
                    generator=generator)
    t = torch.rand(args.batch, generator=generator) * 1000

    def plain():
        return model(hidden_states=x, timestep=t, encoder_hidden_states=full, pooled_projections=pooled).sample

    def collapsed():
        return cond.call(model, x, t)

    def train(call):
        def step():
            call().square().mean().backward()
        return step

    with torch.no_grad():
        diff = (plain() - collapsed()).abs().max().item()
    rows = []
    for label, calls, grad in (("forward", (plain, collapsed), False),
                               ("forward + backward", (train(plain), train(collapsed)), True)):
        with torch.set_grad_enabled(grad):
            plain_s = median_seconds(calls[0], args.repeats)
            collapsed_s = median_seconds(calls[1], args.repeats)
        model.zero_grad(set_to_none=True)
        rows.append(f"| {label} | {full.shape[1]} | {plain_s:.3f} | {cond.embeds.shape[1]} | {collapsed_s:.3f} | "
                    f"{plain_s / collapsed_s:.2f}x |")
    text = header(command_line()) + (
        f"`{args.model}` transformer, {args.batch} rows per call, median of {args.repeats}; the largest difference "
        f"between the two outputs is {diff:.1e} (float32).\n\n"
        "| call | pipeline rows | seconds | rewardtune rows | seconds | speed-up |\n|---|---|---|---|---|---|\n"
        + "\n".join(rows) + "\n")
    print(text)
    if not args.no_write:
        update_section("sd3-conditioning", text)


if __name__ == "__main__":
    main()
