"""Moved to :mod:`rewardtune.commands.score` (the ``rewardtune score`` command); these names stay importable here."""

from rewardtune.commands.score import (
    TABLE_SUFFIXES,
    Summary,
    check_out,
    find_images,
    iter_scores,
    match_prompts,
    open_rows,
    run_score,
    score_images,
    summarize,
    unmatched_warning,
)

__all__ = ["TABLE_SUFFIXES", "Summary", "check_out", "find_images", "iter_scores", "match_prompts", "open_rows",
           "run_score", "score_images", "summarize", "unmatched_warning"]
