"""Time-contrastive features learned from a task's own demo videos (single-view TCN, Sermanet et al., ICRA 2018).

    extractor = load_extractor("time-contrastive", dim=32, steps=400)
    extractor.fit(videos)                        # list of uint8 [T,H,W,3]; no labels
    features = extractor.embed(frames)           # [T, dim], L2-normalised

Training (single view): an anchor frame ``a = f(x_t)`` of a demo, a positive ``p = f(x_s)`` of the same demo with
``|s - t| <= pos_window * T`` and a negative ``n = f(x_u)`` of the same demo with ``|u - t| >= neg_window * T``
(windows are fractions of the demo's length ``T``); with embeddings ``f`` normalised to unit length the loss is
the triplet hinge

    L = mean over triplets of max(0, ||a - p||^2 - ||a - n||^2 + margin)

so frames close in time attract and frames far apart repel. Because the background of a demo does not change over
time, the network learns what moves in the task (hand, handle, door, bottle, liquid), not the scene.

The network: 4 conv layers 3x3 stride 2 (``width, 2w, 2w, 2w``, ReLU) on the frame resized to ``size``, then a 4x4
average pool and a linear map to ``dim``. Its weights are saved inside the reward file
(:meth:`TimeContrastiveFeatures.state_tensors`), never pickled.
"""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rewardtune.errors import UserError
from rewardtune.perceptual.features import FeatureExtractor, frames_to_tensor, resize_shortest_crop

logger = logging.getLogger(__name__)


def triplet_loss(anchor: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor,
                 margin: float = 0.2) -> torch.Tensor:
    """``[B,D]`` x 3 -> scalar ``mean_b max(0, ||a_b - p_b||^2 - ||a_b - n_b||^2 + margin)``."""
    close = (anchor - positive).pow(2).sum(-1)
    far = (anchor - negative).pow(2).sum(-1)
    return torch.relu(close - far + margin).mean()


def sample_triplets(lengths: Sequence[int], count: int, rng: np.random.Generator, pos_window: float = 0.05,
                    neg_window: float = 0.2) -> np.ndarray:
    """``count`` triplets ``[count, 4]`` of (demo, anchor, positive, negative) frame indices (module docstring).

    Windows in frames: ``w+ = max(1, round(pos_window * T))``, ``w- = max(w+ + 1, round(neg_window * T))``; the
    positive is drawn uniformly from ``[t - w+, t + w+]`` minus ``t`` (clipped to the demo), the negative uniformly
    from the frames with ``|u - t| >= w-`` (anchors without such frames are redrawn).
    """
    out = []
    while len(out) < count:
        demo = int(rng.integers(len(lengths)))
        t = int(lengths[demo])
        w_pos = max(1, round(pos_window * t))
        w_neg = max(w_pos + 1, round(neg_window * t))
        anchor = int(rng.integers(t))
        far = np.flatnonzero(np.abs(np.arange(t) - anchor) >= w_neg)
        near = [s for s in range(max(0, anchor - w_pos), min(t, anchor + w_pos + 1)) if s != anchor]
        if not len(far) or not near:
            continue
        out.append((demo, anchor, int(rng.choice(near)), int(rng.choice(far))))
    return np.array(out, dtype=np.int64)


class TcnNet(nn.Module):
    """``[B,3,size,size]`` in [0,1] -> ``[B,dim]`` unit vectors (module docstring)."""

    def __init__(self, dim: int, width: int) -> None:
        super().__init__()
        chans = [3, width, 2 * width, 2 * width, 2 * width]
        self.convs = nn.ModuleList(nn.Conv2d(a, b, 3, stride=2, padding=1) for a, b in zip(chans[:-1], chans[1:]))
        self.head = nn.Linear(16 * chans[-1], dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * 2 - 1
        for conv in self.convs:
            x = torch.relu(conv(x))
        return F.normalize(self.head(F.adaptive_avg_pool2d(x, 4).flatten(1)), dim=-1)


class TimeContrastiveFeatures(FeatureExtractor):
    """A single-view TCN embedding (``dim`` dims) trained by :meth:`fit` on unlabeled demo videos.

    Options: ``dim`` (32), ``width`` (16), ``size`` (64 px), ``steps`` (400 Adam steps), ``batch`` (64 triplets),
    ``lr`` (1e-3), ``margin`` (0.2), ``pos_window`` / ``neg_window`` (0.05 / 0.2 of a demo's length), ``seed``.
    """

    name = "time-contrastive"
    needs_training = True

    def __init__(self, dim: int = 32, width: int = 16, size: int = 64, steps: int = 400, batch: int = 64,
                 lr: float = 1e-3, margin: float = 0.2, pos_window: float = 0.05, neg_window: float = 0.2,
                 seed: int = 0, batch_size: int = 128) -> None:
        super().__init__(batch_size, dim=int(dim), width=int(width), size=int(size), steps=int(steps),
                         batch=int(batch), lr=float(lr), margin=float(margin), pos_window=float(pos_window),
                         neg_window=float(neg_window), seed=int(seed))
        if min(dim, width, size, batch) < 1 or steps < 0 or not 0 < pos_window < neg_window < 1:
            raise UserError("time-contrastive needs dim, width, size, batch >= 1, steps >= 0 and "
                            f"0 < pos_window < neg_window < 1, got {self.options}")
        self.size = int(size)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            self.net = TcnNet(int(dim), int(width)).eval()
        self.trained = False

    def features(self, images: torch.Tensor) -> torch.Tensor:
        if not self.trained:
            raise UserError("the time-contrastive extractor is untrained; fit it on demo videos first "
                            "(PerceptualReward.fit and `perceptual learn` do this)")
        return self.net(resize_shortest_crop(images, self.size))

    def fit(self, videos: Sequence[np.ndarray]) -> "TimeContrastiveFeatures":
        """Train on demo videos (uint8 ``[T,H,W,3]`` each, at least 2 frames) with the triplet loss."""
        o = self.options
        frames = [resize_shortest_crop(frames_to_tensor(v), self.size) for v in videos]
        if not frames or min(len(f) for f in frames) < 3:
            raise UserError("time-contrastive training needs demo videos of at least 3 frames")
        rng = np.random.default_rng(o["seed"])
        optimiser = torch.optim.Adam(self.net.parameters(), lr=o["lr"])
        self.net.train()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(o["seed"])
            for step in range(o["steps"]):
                idx = sample_triplets([len(f) for f in frames], o["batch"], rng, o["pos_window"], o["neg_window"])
                batch = torch.stack([frames[d][k] for d, *ks in idx for k in ks]).to(self.device)
                emb = self.net(batch).view(len(idx), 3, -1)
                loss = triplet_loss(emb[:, 0], emb[:, 1], emb[:, 2], o["margin"])
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
                if step % 100 == 0 or step == o["steps"] - 1:
                    logger.info("time-contrastive step %d: triplet loss %.4f", step, loss.item())
        self.net.eval()
        self.trained = True
        return self

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The trained weights (saved in the reward file)."""
        return {k: v.detach().cpu().clone() for k, v in self.net.state_dict().items()}

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        self.net.load_state_dict(tensors)
        self.trained = True


__all__ = ["TimeContrastiveFeatures", "triplet_loss", "sample_triplets", "TcnNet"]
