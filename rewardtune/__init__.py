"""rewardtune: reward finetuning of diffusion models (PRDP, DDPO), vision rewards, perceptual rewards, pruning."""

__version__ = "0.1.0"

__all__ = ["__version__"]
