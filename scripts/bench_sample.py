"""Sampling speed of shapes-tiny through rewardtune's sampler; writes a table into BENCHMARKS.md.

    python scripts/bench_sample.py [--repeats 5]

Measures images/s for several batch sizes (20 DDIM steps, guidance 5, eta 1 with per-step log-probs), and the
effect of doing classifier-free guidance as one batched UNet pass of 2B instead of two passes of B. Medians of
``--repeats`` runs, measured side by side in one process.
"""

from __future__ import annotations

import argparse

import torch

from rewardtune.diffusion import encode_prompts, generators_for, load_pipeline, sample_trajectories, sampling
from rewardtune.utils.benchmarks import command_line, header, median_seconds, update_section


def _two_pass_predict(unet, latents, t, prompt_embeds, negative_embeds, guidance):
    """The unbatched alternative: separate conditional and unconditional UNet calls."""
    cond = prompt_embeds.call(unet, latents, t)
    uncond = negative_embeds.call(unet, latents, t)
    return uncond + guidance * (cond - uncond)


def time_sampling(pipe, batch: int, repeats: int, steps: int = 20) -> float:
    """Median seconds to sample ``batch`` trajectories (decode excluded)."""
    prompts = ["a red circle on a white background"] * batch
    embeds, negative = encode_prompts(pipe, prompts), encode_prompts(pipe, [""] * batch)
    return median_seconds(lambda: sample_trajectories(pipe, embeds, negative, generators_for(range(batch)),
                                                      steps=steps, guidance=5.0, eta=1.0), repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    pipe = load_pipeline("shapes-tiny")
    rows = []
    for batch in (1, 16, 64):
        seconds = time_sampling(pipe, batch, args.repeats)
        rows.append(f"| {batch} | {seconds:.3f} | {batch / seconds:.1f} |")
    batched = time_sampling(pipe, 64, args.repeats)
    original = sampling.predict_noise
    sampling.predict_noise = _two_pass_predict
    try:
        two_pass = time_sampling(pipe, 64, args.repeats)
    finally:
        sampling.predict_noise = original
    text = header(command_line()) + (
        "shapes-tiny, 20 DDIM steps, guidance 5, eta 1 (log-probs recorded), decode excluded; median of "
        f"{args.repeats} runs.\n\n| batch | seconds | images/s |\n|---|---|---|\n" + "\n".join(rows) + "\n\n"
        f"Classifier-free guidance at batch 64: one UNet pass on 2B = {batched:.3f} s, two passes on B = "
        f"{two_pass:.3f} s (batched is {two_pass / batched:.2f}x faster).\n")
    print(text)
    if not args.no_write:
        update_section("sampling-speed", text)


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
