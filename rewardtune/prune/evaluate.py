"""Quality of a (pruned) pipeline on the shapes world: gold fidelity and taste, the proxy reward, and a Frechet
distance on tiny-CLIP image features to the unpruned model's samples for the same prompts and seeds.

``FD = ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2))`` (the FID formula on tiny-CLIP features; with a few
hundred samples it is biased upwards, so compare values measured with the same sample count).
"""

from __future__ import annotations

import torch

from rewardtune.models_table import ASSETS


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted to features ``a [N,D]`` and ``b [M,D]``."""
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T).reshape(a.shape[1], -1), torch.cov(b.T).reshape(b.shape[1], -1)
    vals, vecs = torch.linalg.eigh(cov_a)
    root_a = vecs @ torch.diag(vals.clamp_min(0).sqrt()) @ vecs.T
    cross = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp_min(0).sqrt().sum()  # Tr((S_a S_b)^(1/2))
    return max(0.0, float((mu_a - mu_b).pow(2).sum() + cov_a.trace() + cov_b.trace() - 2 * cross))


def paired_change(values: torch.Tensor, base: torch.Tensor) -> dict[str, float]:
    """Mean and standard error of per-sample scores ``values [N]``, and their relative change against ``base [N]``
    (the same prompts and seeds): ``mean(d)/mean(base)`` with ``d = values - base``, standard error
    ``sd(d)/sqrt(N)/mean(base)`` (the denominator treated as fixed)."""
    values, base = values.double(), base.double()
    n, d, m = len(values), values - base, float(base.mean())
    return {"mean": float(values.mean()), "se": float(values.std() / n ** 0.5), "change": float(d.mean()) / m,
            "change_se": float(d.std() / n ** 0.5) / m}


def sample_images(pipe, prompts: list[str], seeds: list[int], steps: int = 20, guidance: float = 5.0,
                  batch_size: int = 64, unet: torch.nn.Module | None = None) -> torch.Tensor:
    """Images ``[N,3,H,W]`` in [0,1] of ``prompts[i]`` from ``seeds[i]`` through the sampling service (DDIM,
    eta 0); with ``unet``, that UNet stands in for ``pipe.unet`` during the call (e.g. a pruned one)."""
    from rewardtune.diffusion.service import generate
    from rewardtune.diffusion.settings import SamplerSettings

    settings = SamplerSettings(steps=steps, guidance=guidance, eta=0.0, batch_size=batch_size)
    original = pipe.unet
    pipe.unet = original if unet is None else unet
    try:
        return generate(pipe, prompts, seeds, settings).images
    finally:
        pipe.unet = original


def gold_fidelity(pipe, prompts: list[str], seeds: list[int], unet: torch.nn.Module | None = None) -> torch.Tensor:
    """Per-sample gold fidelity ``[N]`` of :func:`sample_images` (20 DDIM steps, guidance 5) of ``prompts[i]``
    from ``seeds[i]``, with ``unet`` standing in for ``pipe.unet`` if given."""
    from rewardtune.shapes.oracle import gold_scores

    return gold_scores(sample_images(pipe, prompts, seeds, unet=unet), prompts)["fidelity"]


class ShapesQuality:
    """Loads the proxy reward and the tiny CLIP once; :meth:`__call__` scores a batch of images."""

    def __init__(self, device: str = "cpu") -> None:
        from rewardtune.rewards import load_reward
        from rewardtune.rewards.shapes import load_tiny_clip

        self.proxy = load_reward("shapes_preference", device=device).eval()
        self.clip = load_tiny_clip(ASSETS / "shapes-clip", device=device).eval()

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Tiny-CLIP image embeddings ``[N,D]``."""
        return torch.cat([self.clip.encode_images(chunk) for chunk in images.split(128)]).float().cpu()

    @torch.no_grad()
    def scores(self, images: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Per-sample ``fidelity``, ``taste`` (gold) and ``proxy`` scores ``[N]`` of ``images [N,3,H,W]``."""
        from rewardtune.shapes.oracle import gold_scores

        gold = gold_scores(images, prompts)
        proxy = torch.cat([self.proxy(images[i:i + 128], prompts[i:i + 128]) for i in range(0, len(prompts), 128)])
        return {"fidelity": gold["fidelity"], "taste": gold["taste"], "proxy": proxy.float().cpu()}

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: list[str],
                 reference: torch.Tensor | None = None) -> dict[str, float]:
        """``fidelity``, ``taste``, ``proxy`` means and ``fd`` to ``reference`` features (if given)."""
        out = {key: float(values.mean()) for key, values in self.scores(images, prompts).items()}
        if reference is not None:
            out["fd"] = frechet_distance(self.features(images), reference)
        return out


__all__ = ["frechet_distance", "sample_images", "gold_fidelity", "ShapesQuality", "paired_change"]
