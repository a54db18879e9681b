"""Shared by the finetuning experiment scripts (controls, over-optimisation, PRDP's claims): run arms of presets
with overrides, once per seed, each in its own ``rewardtune finetune`` process, and read back their scores.

A run lives in ``OUT/ARM/seedS``; a finished run (``summary.json``) is reused, an interrupted one resumes
(``resume=auto``), and a run asked for more epochs than it has continues where it stopped
(``resume_allow_changes=[epochs]``), so every script can be stopped, restarted and extended.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from rewardtune.finetune.report import summed_kl

ROOT = Path(__file__).resolve().parents[1]
FIGURES = ROOT / "docs" / "figures"
# the positive control of every finetuning study: the gold reward itself as the training reward, at the proxy's
# scale (scripts/controls.py)
ORACLE = "train.reward=shapes_gold:40"


@dataclass
class Arm:
    """One method or setting: a preset plus overrides, run once per seed."""

    name: str
    preset: str
    overrides: list[str] = field(default_factory=list)


def add_run_arguments(parser, out: str, seeds: list[int], threads: int) -> None:
    """The options every experiment script shares: seeds, epochs, parallel runs, threads, run folder, no-write."""
    parser.add_argument("--seeds", type=int, nargs="+", default=seeds)
    parser.add_argument("--epochs", type=int, default=None, help="override every preset's epochs (extends runs)")
    parser.add_argument("--workers", type=int, default=1, help="runs in parallel")
    parser.add_argument("--threads", type=int, default=threads, help="torch threads per run")
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / out, help="where the runs live")
    parser.add_argument("--no-write", action="store_true", help="print the table, leave BENCHMARKS.md alone")


def figures_dir(args) -> Path:
    """Where a script's figures go: docs/figures, or the run folder ``--out`` under ``--no-write`` (a trial run
    leaves the committed figures alone)."""
    return args.out if args.no_write else FIGURES


def shown(path: Path) -> str:
    """``path`` as a Markdown link target: relative to the repository when inside it."""
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _finished(folder: Path, epochs: int | None) -> bool:
    if not (folder / "summary.json").is_file():
        return False
    done = json.loads((folder / "summary.json").read_text()).get("epochs") or [None]
    return epochs is None or done[-1] == epochs


def run_arm(arm: Arm, seed: int, out: Path, epochs: int | None = None, threads: int = 1) -> Path:
    """Run (or resume, extend or reuse) one arm and seed; returns its run folder."""
    folder = out / arm.name / f"seed{seed}"
    if _finished(folder, epochs):
        return folder
    command = [sys.executable, "-m", "rewardtune", "finetune", str(ROOT / arm.preset), f"output_dir={folder}",
               f"train.seed={seed}", "resume=auto", "resume_allow_changes=[epochs]", *arm.overrides,
               *([f"epochs={epochs}"] if epochs else [])]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f"seed{seed}.log", "a") as log:
        subprocess.run(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, check=True)
    return folder


def finished(arms: list[Arm], seeds: list[int], out: Path, epochs: int | None = None) -> list[Arm]:
    """The arms whose runs of every seed have finished (``summary.json``; with ``epochs``, at that many epochs):
    what ``--existing`` tabulates."""
    return [arm for arm in arms if all(_finished(out / arm.name / f"seed{s}", epochs) for s in seeds)]


def run_all(arms: list[Arm], seeds: list[int], out: Path, epochs: int | None = None, workers: int = 1,
            threads: int = 1) -> dict[str, list[Path]]:
    """Every arm x seed, ``workers`` at a time, seed by seed (a long study stopped early has every arm's first
    seeds); ``{arm name: [run folder per seed]}``."""
    jobs = [(arm, seed) for seed in seeds for arm in arms]
    with ThreadPoolExecutor(workers) as pool:  # a failing run does not cancel the others; all failures are named
        futures = [pool.submit(run_arm, arm, seed, out, epochs, threads) for arm, seed in jobs]
    failed = [f"{arm.name}/seed{seed} (log: {out / arm.name / f'seed{seed}.log'})"
              for (arm, seed), future in zip(jobs, futures) if future.exception()]
    if failed:
        raise SystemExit(f"{len(failed)} of {len(jobs)} runs failed: {', '.join(failed)}")
    folders = [future.result() for future in futures]
    runs: dict[str, list[Path]] = {}
    for (arm, _), folder in zip(jobs, folders):
        runs.setdefault(arm.name, []).append(folder)
    return runs


def final_scores(folder: Path, epoch: int | None = None) -> dict[str, float]:
    """After-minus-before (``d_*``) and after values of the fixed evaluation, the worst evaluated gold, the summed
    approximate KL of the updates (``sum approx_kl * steps``, as each run's ``kl_curve.png``), and the minutes of
    sampling, scoring and updating (evaluation excluded). ``epoch``: the run as it stood after that many epochs
    (an evaluated one; a run's first N epochs do not depend on how many follow)."""
    evals = [r for r in read_jsonl(folder / "eval.jsonl") if epoch is None or r["epoch"] <= epoch]
    if epoch is not None and evals[-1]["epoch"] != epoch:
        raise SystemExit(f"{folder} has no evaluation at epoch {epoch} (last: {evals[-1]['epoch']})")
    first, last = evals[0], evals[-1]
    scores = {f"{k}": last[k] for k in last if k != "epoch"}
    scores.update({f"d_{k}": last[k] - first[k] for k in last if k != "epoch"})
    if "eval_gold" in first:
        scores["min_gold"] = min(r["eval_gold"] for r in evals) - first["eval_gold"]
    metrics = [r for r in read_jsonl(folder / "metrics.jsonl") if epoch is None or r["epoch"] <= epoch]
    scores["kl"] = summed_kl(metrics)[-1] if metrics else 0.0
    scores["minutes"] = sum(r[f"seconds_{k}"] for r in metrics for k in ("sampling", "reward", "update")) / 60
    return scores


def mean_std(values: list[float], fmt: str = "+.3f") -> str:
    if len(values) == 1:
        return f"{values[0]:{fmt}}"
    return f"{statistics.mean(values):{fmt}} ± {statistics.stdev(values):{fmt.lstrip('+')}}"


def student_t_p_value(t: float, df: int, intervals: int = 4000) -> float:
    """Two-sided p-value of Student's t statistic with ``df`` degrees of freedom: ``1 - integral_{-|t|}^{|t|}`` of
    the t density (Simpson's rule; no scipy here)."""
    if math.isnan(t):
        return float("nan")
    if math.isinf(t):
        return 0.0
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def density(x: float) -> float:
        return math.exp(log_norm - (df + 1) / 2 * math.log1p(x * x / df))

    h = abs(t) / intervals
    inner = sum((4 if i % 2 else 2) * density(i * h) for i in range(1, intervals))
    half = h / 3 * (density(0.0) + inner + density(abs(t)))  # integral over [0, |t|]
    return max(0.0, 1.0 - 2.0 * half)


def paired_test(a: list[float], b: list[float]) -> tuple[float, float, float]:
    """``(mean, sd, p)`` of the differences ``a_i - b_i`` over seeds i, p from the two-sided paired t-test (NaN sd
    and p with fewer than 2 seeds)."""
    diffs = [x - y for x, y in zip(a, b)]
    if len(diffs) < 2:
        return (diffs[0] if diffs else math.nan), math.nan, math.nan
    mean, sd = statistics.mean(diffs), statistics.stdev(diffs)
    t = mean / (sd / math.sqrt(len(diffs))) if sd > 0 else math.copysign(math.inf, mean) if mean else 0.0
    return mean, sd, student_t_p_value(t, len(diffs) - 1)


def paired_difference(a: list[float], b: list[float]) -> str:
    """``mean ± sd of a_i - b_i (p = two-sided paired t-test)`` over seeds i."""
    mean, sd, p = paired_test(a, b)
    if math.isnan(sd):
        return "–" if math.isnan(mean) else f"{mean:+.3f}"
    return f"{mean:+.3f} ± {sd:.3f} (p = {p:.2f})"


DELTA_COLUMNS = [("d_eval_reward", "Δ training reward (eval prompts)"), ("d_eval_gold", "Δ gold (eval prompts)"),
                 ("d_heldout_reward", "Δ training reward (held-out)"), ("d_heldout_gold", "Δ gold (held-out)"),
                 ("min_gold", "worst Δ gold during run")]


def table(names: list[str], results: dict[str, list[dict]], columns=DELTA_COLUMNS) -> str:
    """Markdown table, one row per arm: mean ± std over its seeds of each column (``(key, label[, format])``), and
    its train minutes."""
    lines = ["| run | " + " | ".join(c[1] for c in columns) + " | train minutes |", "|---" * (len(columns) + 2) + "|"]
    for name in names:
        rows = results[name]
        cells = [mean_std([r[c[0]] for r in rows], *c[2:]) if c[0] in rows[0] else "–" for c in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {statistics.mean(r['minutes'] for r in rows):.1f} |")
    return "\n".join(lines)
