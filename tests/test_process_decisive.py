"""The decisive step: binary search (OmegaPRM) on constructed trajectories, its cost, and the exhaustive reference."""

from __future__ import annotations

import pytest
import torch

from rewardtune.diffusion.settings import SamplerSettings
from rewardtune.process.decisive import (
    Outcome,
    bisect_decided,
    decided_from_scores,
    decisive_steps,
    first_decided,
    last_undecided,
    search_rounds,
)
from rewardtune.process.values import Prover


def _table(first: list[int], steps: int) -> torch.Tensor:
    """Monotone decided tables ``[N,T+1]``: row n undecided before ``first[n]``, decided from it on."""
    return torch.arange(steps + 1)[None, :] >= torch.tensor(first)[:, None]


class Counting:
    """A decided() oracle over a table that records every branch point asked."""

    def __init__(self, table: torch.Tensor) -> None:
        self.table, self.asked = table, []

    def __call__(self, rows: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        self.asked += list(zip(rows.tolist(), j.tolist()))
        return self.table[rows, j]


@pytest.mark.parametrize("steps", [1, 4, 10, 20])
def test_bisection_finds_the_first_decided_index_in_log_steps(steps):
    first = list(range(steps + 1))  # every possible answer, 0 (the noise decides) .. T (only the outcome)
    oracle = Counting(_table(first, steps))
    index, points = bisect_decided(oracle, len(first), steps)
    assert index.tolist() == first
    assert points.max() <= search_rounds(steps) and len(oracle.asked) == int(points.sum())
    assert all(j < steps for _, j in oracle.asked)  # the outcome itself is never queried
    assert torch.equal(last_undecided(_table(first, steps)), index)
    assert torch.equal(first_decided(_table(first, steps)), index)


def test_search_rounds_by_hand():
    assert [search_rounds(t) for t in (1, 4, 10, 20, 50)] == [1, 3, 4, 5, 6]


def test_bisection_query_count_by_hand():
    # T = 10, j* = 7, [lo, hi] = [0, 10]: mid 5 undecided -> [6, 10]; mid 8 decided -> [6, 8]; mid 7 decided ->
    # [6, 7]; mid 6 undecided -> [7, 7]
    oracle = Counting(_table([7], 10))
    index, points = bisect_decided(oracle, 1, 10)
    assert index.tolist() == [7] and points.tolist() == [4]
    assert [j for _, j in oracle.asked] == [5, 8, 7, 6]


def test_non_monotone_rows_show_where_search_and_sweep_differ():
    # decided at 1, undecided at 2..3, decided from 4 on: the sweep says 4; the search, probing 2 first, also 4;
    # decided at 0..2, undecided at 3, decided from 4: the sweep says 4, the search (probe 2: decided) says 0
    table = torch.tensor([[False, True, False, False, True, True],
                          [True, True, True, False, True, True]])
    index, _ = bisect_decided(Counting(table), 2, 5)
    assert last_undecided(table).tolist() == [4, 4]
    assert index.tolist() == [4, 0]
    assert first_decided(table).tolist() == [1, 0]


def test_decided_from_scores_needs_every_continuation_to_agree():
    scores = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    outcome = torch.tensor([1.0, 1.0, 1.0])
    assert decided_from_scores(scores, outcome).tolist() == [True, False, False]
    assert decided_from_scores(scores, outcome, tolerance=0.34).tolist() == [True, True, False]


def test_decisive_steps_on_constructed_trajectories():
    """A deterministic toy prover keeps the sign of the latent (eps = 0, eta = 0), so "brighter than grey" is lost
    for good at the first branch index whose latent is negative."""
    from test_process_values import STEPS, ToyPipe  # the toy pipeline with known continuations

    signs = torch.tensor([[1, 1, -1, -1, -1],     # lost at branch index 2: the decisive step is step 1
                          [-1, -1, -1, -1, -1],   # lost from the noise: index 0
                          [1, 1, 1, 1, -1],       # lost by the last step: index 4
                          [1, -1, 1, 1, 1]])      # won; undecided only at 1: decided from 2
    latents = (0.5 * signs.float()).view(4, STEPS + 1, 1, 1, 1)
    brighter = Outcome(read=lambda images, prompts: (images[:, 0, 0, 0] > 0.5).float(),
                       reference=lambda final, prompts: torch.zeros(len(prompts)),
                       judge=lambda readings, reference: readings)
    prover = Prover(ToyPipe(), SamplerSettings(steps=STEPS, guidance=1.0, eta=0.0))
    found = decisive_steps(prover, latents, ["p"] * 4, brighter, k=2)
    assert found.index.tolist() == [2, 0, 4, 2]
    assert found.outcome.tolist() == [0.0, 0.0, 0.0, 1.0]
    assert found.queries == 4 + 2 * int(found.branch_points.sum())  # the outcomes, then K per branch point
    assert int(found.branch_points.max()) <= search_rounds(STEPS)


def test_oracle_codes_read_rendered_scenes():
    from rewardtune.process.shapes import oracle_outcome, prompted_codes, read_attribute_codes, vocabulary
    from rewardtune.shapes.oracle import images_from_uint8
    from rewardtune.shapes.world import Scene, render

    scenes = [Scene("red", "circle", "large", "middle center", "white"),
              Scene("blue", "square", "medium", "top left", "black")]
    codes = read_attribute_codes(images_from_uint8(render(scenes)))
    vocab = vocabulary()
    assert [vocab["color"][c] for c in codes[:, 0]] == ["red", "blue"]
    assert [vocab["background"][c] for c in codes[:, 4]] == ["white", "black"]
    asked = prompted_codes(["a red circle", "a big blue square on a black background"])
    assert asked[0, 0] == vocab["color"].index("red") and asked[0, 4] == -2
    colour = oracle_outcome("color")
    readings = codes[:, None]  # [N,K=1,5]
    assert colour.judge(readings, colour.reference(codes, ["a red circle", "a green square"])).flatten().tolist() \
        == [1.0, 0.0]
    same = oracle_outcome("shape", target="final")
    assert same.judge(readings, same.reference(codes, ["x", "y"])).flatten().tolist() == [1.0, 1.0]
    with pytest.raises(Exception, match="choose one of: color, shape"):
        oracle_outcome("mood")


def test_decisive_from_sweep_reads_both_answers_off_one_table():
    from rewardtune.process.decisive import decisive_from_sweep
    from rewardtune.process.shapes import oracle_outcome

    # 2 trajectories, T = 3, K = 2, colour codes only matter: row 0 settles on colour 4 from j = 2,
    # row 1 has colour 1 at every continuation (decided by the noise)
    colour = torch.tensor([[[0, 4], [4, 2], [4, 4], [4, 4]],
                           [[1, 1], [1, 1], [1, 1], [1, 1]]])
    readings = torch.zeros(2, 4, 2, 5, dtype=torch.long)
    readings[..., 0] = colour
    found = decisive_from_sweep(readings, ["a blue circle", "a red circle"], oracle_outcome("color", "final"))
    assert found.sweep.tolist() == [2, 0] and found.search.tolist() == [2, 0]
    assert found.outcome.tolist() == [1.0, 1.0] and found.branch_points.tolist() == [2, 2]
    assert torch.allclose(found.value[0], torch.tensor([0.5, 0.5, 1.0, 1.0]))
    prompted = decisive_from_sweep(readings, ["a blue circle", "a red circle"], oracle_outcome("color", "prompt"))
    assert prompted.outcome.tolist() == [1.0, 0.0]  # blue is code 4, red code 0


def test_live_search_sees_the_sweeps_estimates_on_the_tiny_pipeline(tiny_pipe):
    """Continuations are seeded per (trajectory, branch index, k): the batched live search and the search on an
    exhaustive sweep's readings give the same decisive indices, and the live one costs 1 + K per branch point."""
    from rewardtune.diffusion.service import generate
    from rewardtune.process.decisive import decisive_from_sweep
    from rewardtune.process.values import trajectory_values

    settings = SamplerSettings(steps=4, guidance=2.0, eta=1.0)
    prompts = ["a red circle", "a blue square", "a green triangle", "a cat"]
    out = generate(tiny_pipe, prompts, [0, 1, 2, 3], settings, keep_trajectories=True, decode=False)
    latents = out.trajectory.latents
    # "at least about as bright as the trajectory's own final image": decided where all continuations are
    at_least = Outcome(read=lambda images, prompts: images.mean(dim=(1, 2, 3)),
                       reference=lambda final, prompts: final - 5e-5,
                       judge=lambda readings, reference: (readings >= reference[:, None]).float())
    prover = Prover(tiny_pipe, settings)
    live = decisive_steps(prover, latents, prompts, at_least, k=3, seed=5)
    sweep = decisive_from_sweep(trajectory_values(prover, latents, prompts, at_least.read, 3, seed=5).scores,
                                prompts, at_least)
    assert torch.equal(live.index, sweep.search) and torch.equal(live.branch_points, sweep.branch_points)
    assert live.queries == 4 + 3 * int(live.branch_points.sum())
    assert live.index.max() > 0 and live.index.min() < 4  # neither trivially decided by the noise nor never
