"""DDPO's advantages: per-prompt reward normalisation with a stat tracker, and advantage clipping."""

from __future__ import annotations

from collections import deque

import numpy as np
import torch


class PerPromptStatTracker:
    """Normalise rewards per prompt over a rolling buffer (DDPO).

    ``update(prompts, rewards)`` appends each prompt's new rewards to its buffer (the last ``buffer_size``) and
    returns ``(r - mean) / (std + 1e-6)`` with that prompt's buffer statistics; a prompt with fewer than
    ``min_count`` buffered rewards falls back to the statistics of the whole batch.
    """

    def __init__(self, buffer_size: int = 32, min_count: int = 16) -> None:
        self.buffer_size, self.min_count = buffer_size, min_count
        self.buffers: dict[str, deque[float]] = {}

    def update(self, prompts: list[str], rewards: torch.Tensor) -> torch.Tensor:
        values = rewards.detach().double().cpu().numpy()
        out = np.empty_like(values)
        batch_mean, batch_std = values.mean(), values.std()
        prompt_array = np.array(prompts, dtype=object)
        for prompt in dict.fromkeys(prompts):
            index = np.nonzero(prompt_array == prompt)[0]
            buffer = self.buffers.setdefault(prompt, deque(maxlen=self.buffer_size))
            buffer.extend(values[index].tolist())
            if len(buffer) < self.min_count:
                mean, std = batch_mean, batch_std
            else:
                mean, std = np.mean(buffer), np.std(buffer)
            out[index] = (values[index] - mean) / (std + 1e-6)
        return torch.from_numpy(out).to(rewards.dtype)

    def state_dict(self) -> dict:
        return {"buffer_size": self.buffer_size, "min_count": self.min_count,
                "buffers": {k: list(v) for k, v in self.buffers.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.buffer_size, self.min_count = state["buffer_size"], state["min_count"]
        self.buffers = {k: deque(v, maxlen=self.buffer_size) for k, v in state["buffers"].items()}


def batch_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """``(r - mean) / (std + 1e-8)`` over the batch (DDPO without per-prompt tracking)."""
    return (rewards - rewards.mean()) / (rewards.std(unbiased=False) + 1e-8)
