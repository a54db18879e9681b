"""Monte Carlo step values against a toy scheduler, denoiser and reward whose values are known in closed form."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from torch import nn

from rewardtune.diffusion.settings import SamplerSettings
from rewardtune.process.values import Prover, branch_seed, mc_values, trajectory_values, value_stats

STEPS = 4


class _Out(SimpleNamespace):
    pass


class ZeroDenoiser(nn.Module):
    """Predicts epsilon = 0 everywhere: DDIM's x0 guess is ``x_t / sqrt(abar_t)``."""

    config = SimpleNamespace(sample_size=1, in_channels=1)

    def __init__(self) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    def forward(self, latents, t, encoder_hidden_states=None):
        return _Out(sample=torch.zeros_like(latents))


class GreyVAE(nn.Module):
    """Decodes a 1x1 one-channel latent to a grey 3x1x1 image: pixel = clamp(z / 2 + 0.5)."""

    config = SimpleNamespace(scaling_factor=1.0, get=lambda key, default=None: None)

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    def decode(self, z):
        return _Out(sample=z.expand(-1, 3, -1, -1))


class ToyTokenizer:
    model_max_length = 1

    def __call__(self, prompts, **kwargs):
        return SimpleNamespace(input_ids=torch.zeros(len(prompts), 1, dtype=torch.long))


class ToyTextEncoder:
    device = torch.device("cpu")

    def __call__(self, ids):
        return (torch.zeros(ids.shape[0], 1, 1),)


class ToyPipe(StableDiffusionPipeline):
    """A StableDiffusionPipeline (so the UNet backbone and DDIM family apply) with toy parts; prompts encode to 0."""

    def __init__(self) -> None:  # no diffusers registration: nothing is saved
        parts = {"unet": ZeroDenoiser(), "vae": GreyVAE(), "vae_scale_factor": 1, "tokenizer": ToyTokenizer(),
                 "text_encoder": ToyTextEncoder(),
                 "scheduler": DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear",
                                            beta_start=0.00085, beta_end=0.012, clip_sample=False,
                                            set_alpha_to_one=False, steps_offset=1)}
        for name, value in parts.items():
            object.__setattr__(self, name, value)


def _toy_pipe():
    return ToyPipe()


def brighter(images, prompts):
    """1 where the pixel is brighter than mid-grey (the latent is > 0)."""
    return (images[:, 0, 0, 0] > 0.5).float()


def closed_form(scheduler, j: int) -> tuple[float, float]:
    """``(c, s)`` with ``x_0 | x^(j) = x ~ N(c x, s^2)``: with eps = 0 and eta = 1, DDIM's step is
    ``x_prev = sqrt(a_prev / a_t) x_t + std_t z``, so ``c = sqrt(a_final / a_{t_j})`` (the product telescopes) and
    ``s^2 = sum_{m >= j} std_m^2 a_final / a_prev_m``; the value of "x_0 > 0" is ``Phi(c x / s)``."""
    scheduler.set_timesteps(STEPS)
    ts = scheduler.timesteps.tolist()
    abar = scheduler.alphas_cumprod.double()
    final = float(scheduler.final_alpha_cumprod)
    prev = [abar[t - 1000 // STEPS].item() if t - 1000 // STEPS >= 0 else final for t in ts]
    var = sum((1 - prev[m]) / (1 - abar[ts[m]]) * (1 - abar[ts[m]] / prev[m]) * final / prev[m]
              for m in range(j, STEPS))
    return float((final / abar[ts[j]]) ** 0.5), float(var) ** 0.5


def phi(z: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1 + torch.erf(z / 2**0.5))


def test_value_stats_by_hand():
    scores = torch.tensor([[1.0, 0.0, 1.0, 1.0], [2.0, 2.0, 2.0, 2.0]])
    mean, se = value_stats(scores)
    assert torch.allclose(mean, torch.tensor([0.75, 2.0]))
    assert torch.allclose(se, torch.tensor([0.5 / 2, 0.0]))  # std(ddof=1) of (1,0,1,1) is 0.5; / sqrt(4)
    assert torch.equal(value_stats(scores[:, :1])[1], torch.zeros(2))


def test_mc_values_match_the_closed_form_with_their_standard_error():
    pipe = _toy_pipe()
    prover = Prover(pipe, SamplerSettings(steps=STEPS, guidance=1.0, eta=1.0, batch_size=4096))
    k = 2000
    branches = torch.tensor([0, 1, 2, 3])
    z = torch.tensor([0.5, -0.3, 0.8, -0.6])  # the standardised mean of each case's x_0
    c, s = map(torch.tensor, zip(*[closed_form(pipe.scheduler, j) for j in branches.tolist()]))
    x = (z * s / c).float()
    values = mc_values(prover, x.view(4, 1, 1, 1), branches, ["p"] * 4, brighter, k, seed=7)
    assert values.queries == 4 * k and values.scores.shape == (4, k)
    expected = phi(z)  # 0.69, 0.38, 0.79, 0.27
    se_expected = (expected * (1 - expected) / k).sqrt()  # the SE of a Bernoulli mean, about 0.01
    assert torch.allclose(values.se, se_expected, rtol=0.1)
    assert ((values.mean - expected).abs() < 3 * se_expected).all(), (values.mean, expected)


def test_the_outcome_branch_point_is_one_query_with_zero_se():
    prover = Prover(_toy_pipe(), SamplerSettings(steps=STEPS, guidance=1.0, eta=1.0))
    values = mc_values(prover, torch.tensor([0.2, -0.2]).view(2, 1, 1, 1), torch.tensor([STEPS, STEPS]), ["p"] * 2,
                       brighter, 5)
    assert values.queries == 2 and torch.equal(values.mean, torch.tensor([1.0, 0.0]))
    assert torch.equal(values.se, torch.zeros(2))


def test_continuations_are_seeded_per_branch_point_not_per_batch():
    prover = Prover(_toy_pipe(), SamplerSettings(steps=STEPS, guidance=1.0, eta=1.0, batch_size=3))
    x = torch.tensor([0.1, -0.1, 0.4]).view(3, 1, 1, 1)
    together = mc_values(prover, x, torch.tensor([1, 2, 1]), ["p"] * 3, lambda im, p: im[:, 0, 0, 0], 4, seed=3,
                         rows=torch.tensor([5, 6, 7]))
    alone = mc_values(prover, x[2:], torch.tensor([1]), ["p"], lambda im, p: im[:, 0, 0, 0], 4, seed=3,
                      rows=torch.tensor([7]))
    assert torch.equal(together.scores[2], alone.scores[0])
    assert len(set(together.scores[0].tolist())) == 4  # distinct continuations
    assert branch_seed(3, 7, 1, 0) != branch_seed(3, 7, 2, 0) != branch_seed(3, 6, 1, 0)


def test_a_finetuning_epochs_seed_range_seeds_every_continuation():
    # draw_epoch's sample seeds reach 2**31 - 1; the folded seed must still fit a torch generator (it overflowed)
    seed = 2**31 - 1
    assert 0 <= branch_seed(seed, 10**6, 10**4, 10**3) < 2**63
    assert len({branch_seed(seed, r, j, c) for r in range(3) for j in range(3) for c in range(3)}) == 27
    prover = Prover(_toy_pipe(), SamplerSettings(steps=STEPS, guidance=1.0, eta=1.0))
    values = mc_values(prover, torch.tensor([0.1]).view(1, 1, 1, 1), torch.tensor([1]), ["p"],
                       lambda im, p: im[:, 0, 0, 0], 2, seed=seed)
    assert values.queries == 2 and torch.isfinite(values.mean).all()


def test_deterministic_prover_gives_the_outcome():
    prover = Prover(_toy_pipe(), SamplerSettings(steps=STEPS, guidance=1.0, eta=0.0))
    values = mc_values(prover, torch.tensor([0.3, -0.3]).view(2, 1, 1, 1), torch.tensor([0, 2]), ["p"] * 2,
                       brighter, 3)
    assert torch.equal(values.mean, torch.tensor([1.0, 0.0])) and torch.equal(values.se, torch.zeros(2))


def test_trajectory_values_cover_every_branch_index():
    pipe = _toy_pipe()
    prover = Prover(pipe, SamplerSettings(steps=STEPS, guidance=1.0, eta=1.0))
    latents = torch.randn(2, STEPS + 1, 1, 1, 1, generator=torch.Generator().manual_seed(0))
    values = trajectory_values(prover, latents, ["a", "b"], brighter, 6)
    assert values.mean.shape == (2, STEPS + 1) and values.scores.shape == (2, STEPS + 1, 6)
    assert values.queries == 2 * STEPS * 6 + 2
    assert torch.equal(values.mean[:, -1], (latents[:, -1].flatten() > 0).float())
    with pytest.raises(ValueError, match="keep every step"):
        trajectory_values(prover, latents[:, :2], ["a", "b"], brighter, 6)


def test_bad_branch_points_are_errors():
    prover = Prover(_toy_pipe(), SamplerSettings(steps=STEPS, guidance=1.0, eta=1.0))
    with pytest.raises(ValueError, match="branch indices must be in 0..4"):
        mc_values(prover, torch.zeros(1, 1, 1, 1), torch.tensor([5]), ["p"], brighter, 2)
    with pytest.raises(ValueError, match="one latent, prompt and row"):
        mc_values(prover, torch.zeros(2, 1, 1, 1), torch.tensor([1]), ["p"], brighter, 2)
