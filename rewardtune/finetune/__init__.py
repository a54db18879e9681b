"""Reward finetuning: PRDP and DDPO losses, advantages, and (later) the shared online trainer."""

from rewardtune.finetune.advantages import PerPromptStatTracker, batch_advantages
from rewardtune.finetune.losses import ddpo_loss, prdp_loss, prdp_loss_grouped

__all__ = ["PerPromptStatTracker", "batch_advantages", "ddpo_loss", "prdp_loss", "prdp_loss_grouped"]
