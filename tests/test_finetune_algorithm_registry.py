"""Adding a finetuning algorithm is one new class (here: in this file) and one registry line; the entry declares
its typed options and its constraints, which the config checks when it is built."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch

from rewardtune.config import load_config
from rewardtune.errors import ConfigError
from rewardtune.finetune.algorithms import ALGORITHMS
from rewardtune.finetune.config import FinetuneConfig, RunConfig
from rewardtune.finetune.run import run_finetune


@dataclass
class ToyOptions:
    scale: float = 1.0


class ToyReinforce:
    """REINFORCE on the whole trajectory: loss = -mean(scale * (r - mean r) * sum_t log p_t)."""

    Options = ToyOptions
    min_images_per_prompt, min_images_reason = 3, "the toy needs three"
    whole_groups = False
    uses_reference = False

    def __init__(self, cfg: FinetuneConfig, options: ToyOptions) -> None:
        self.scale = options.scale

    def targets(self, rollouts) -> torch.Tensor:
        rewards = rollouts.rewards
        return self.scale * (rewards - rewards.mean())

    def loss(self, log_probs, log_probs_old, log_probs_ref, targets):
        return -(targets[:, None] * log_probs).sum(1).mean(), torch.zeros(())

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


@pytest.fixture
def toy():
    ALGORITHMS.register("toy", ToyReinforce)  # the one registry line
    yield
    del ALGORITHMS._entries["toy"]


def test_a_toy_algorithm_trains_with_its_typed_options(toy, tiny_pipeline_dir, tmp_path):
    out = tmp_path / "toy"
    cfg = load_config(RunConfig, None, [
        f"model={tiny_pipeline_dir}", f"output_dir={out}", "prompts=[a red circle, a blue square]", "epochs=1",
        "eval_prompts=[a red circle]", "eval_seeds=[0]", "train.algorithm=toy", "train.algorithm_options={scale: 2}",
        "train.reward=jpeg_incompressibility", "train.prompts_per_epoch=2", "train.images_per_prompt=3",
        "train.inner_steps=1", "train.sampling.steps=2", "train.optim.lr=1e-3"])
    run_finetune(cfg)
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert record["steps"] == 1 and record["skipped"] == 0 and record["loss"] is not None
    assert (out / "final" / "model_index.json").is_file()


def test_the_entry_declares_what_the_config_checks(toy):
    with pytest.raises(ConfigError, match="'images_per_prompt' must be at least 3 for toy \\(the toy needs three\\)"):
        FinetuneConfig(algorithm="toy", images_per_prompt=2)
    with pytest.raises(ConfigError, match="train.algorithm_options.nope"):
        FinetuneConfig(algorithm="toy", images_per_prompt=3, algorithm_options={"nope": 1})
    with pytest.raises(ConfigError, match="'algorithm_options' must be empty: prdp takes its options from"):
        FinetuneConfig(algorithm="prdp", algorithm_options={"scale": 1})
    with pytest.raises(ConfigError, match="'algorithm' must be one of 'ddpo', 'grpo', 'prdp', 'toy'"):
        FinetuneConfig(algorithm="ppo")
