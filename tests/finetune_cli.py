"""The smallest `rewardtune finetune` command line on the tiny pipeline, and the one-line-error check, shared by the
run-folder, chaos and tracker tests."""

from __future__ import annotations

PROMPTS = "[a red circle, a blue square on a white background]"


def args(model, out, *extra) -> list[str]:
    """A run of 2 prompts x 2 images, T=2 steps, one gradient step per epoch, a checkpoint every epoch."""
    return ["finetune", f"model={model}", f"output_dir={out}", f"prompts={PROMPTS}", "epochs=1", "save_every=1",
            "keep_last=2", "eval_prompts=[a red circle]", "eval_seeds=[0]", "train.reward=jpeg_incompressibility",
            "train.prompts_per_epoch=2", "train.images_per_prompt=2", "train.inner_steps=1",
            "train.sampling.steps=2", "train.sampling.batch_size=4", "train.optim.lr=1e-3", "train.prdp.beta=1e-2",
            *extra]


def one_line_error(capsys) -> str:
    """The error line, which must be stderr's only error line and its last (progress bars may precede it)."""
    err = capsys.readouterr().err.strip()
    last = err.splitlines()[-1] if err else ""
    assert last.startswith("rewardtune: error:") and err.count("rewardtune: error") == 1, err
    assert "Traceback" not in err, err
    return last
