"""`rewardtune demo` on the shipped shapes-tiny, shrunk by overrides."""

import json
from pathlib import Path

from rewardtune.cli import main

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


def test_demo_samples_and_scores_with_gold(tmp_path, capsys):
    out = tmp_path / "demo"
    code = main(["demo", str(CONFIG), "sample.num_images=1", "sample.steps=4",
                 "sample.prompts=[a red circle, a blue square on a gray background]", f"sample.out={out}"])
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["images"] == 2 and 0 <= summary["gold"] <= 1
    header = (out / "scores.csv").read_text().splitlines()[0]
    assert header == "file,prompt,seed,fidelity,taste,gold"
    assert (out / "grid.png").is_file() and (out / "config.yaml").is_file()
    assert "gold reward:" in capsys.readouterr().out
