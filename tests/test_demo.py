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


def test_demo_defaults_keep_the_small_prompt_set_under_overrides():
    from rewardtune.config import load_config
    from rewardtune.demo import DemoConfig
    from rewardtune.shapes.captions import small_prompt_set

    for path in (None, CONFIG):
        cfg = load_config(DemoConfig, path, ["sample.out=x", "sample.overwrite=true"])
        assert cfg.sample.prompts == small_prompt_set() and cfg.sample.out == "x"
