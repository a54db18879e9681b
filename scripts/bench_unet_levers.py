"""Speed levers for the shapes-tiny UNet's forward+backward on CPU, side by side in one process.

    OMP_NUM_THREADS=1 python scripts/bench_unet_levers.py ROWS TOKENS KINDS
    e.g. OMP_NUM_THREADS=1 python scripts/bench_unet_levers.py 360 32 base,cl,lora,compile,base,cl

KINDS (comma-separated, run in order): ``base`` (the UNet as loaded), ``cl`` (channels-last weights and input),
``lora`` (rank-4 LoRA on the attention projections, base frozen), ``compile`` (``torch.compile``). For each: the
first call's seconds (compile time shows here), the median of 3 more calls, and the largest difference of its
output from the base UNet's (numerics unchanged within float tolerance?). Prints; writes nothing.
"""

from __future__ import annotations

import copy
import sys
import time
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel

UNET = Path(__file__).resolve().parents[1] / "rewardtune" / "assets" / "shapes-tiny" / "unet"


def make(base, kind: str):
    unet = copy.deepcopy(base)
    if kind == "cl":
        unet = unet.to(memory_format=torch.channels_last)
    elif kind == "compile":
        unet = torch.compile(unet)
    elif kind == "lora":
        from peft import LoraConfig

        unet.requires_grad_(False)
        unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    return unet


def main() -> None:
    rows, tokens, kinds = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3].split(",")
    torch.manual_seed(0)
    base = UNet2DConditionModel.from_pretrained(UNET)
    x, t = torch.randn(rows, 4, 8, 8), torch.randint(0, 1000, (rows,))
    text = torch.randn(rows, tokens, base.config.cross_attention_dim)
    for kind in kinds:
        unet = make(base, kind)
        inputs = x.to(memory_format=torch.channels_last) if kind == "cl" else x

        def step():
            unet(inputs, t, encoder_hidden_states=text).sample.square().mean().backward()
        start = time.perf_counter()
        step()
        first = time.perf_counter() - start
        times = []
        for _ in range(3):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        with torch.no_grad():
            diff = (unet(inputs, t, encoder_hidden_states=text).sample
                    - base(x, t, encoder_hidden_states=text).sample).abs().max().item()
        print(f"{kind}: first {first:.2f} s, median {sorted(times)[1]:.3f} s, max |output - base| {diff:.3g}",
              flush=True)


if __name__ == "__main__":
    main()
