"""``rewardtune perceptual demos|learn|score``: write demo videos, learn a perceptual reward from them (Sermanet et
al. 2017), and score a video with it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rewardtune.commands.common import finite_float, positive_int
from rewardtune.errors import UserError

DESCRIPTION = ("Perceptual rewards: split demo videos into steps without labels, select discriminative features per "
               "step, and score frames by how far a task has progressed.")

# rewardtune.perceptual.demos.DEMO_TASKS, spelled out so that --help imports nothing heavy (a test keeps them equal)
DEMO_TASKS = {"door": "reach a door handle, turn it, swing the door open (3 phases)",
              "pour": "bring a bottle over a glass, pour, take it away (3 phases)",
              "mountaincar": "gymnasium MountainCar-v0, a scripted expert drives up to the flag (rewardtune[rl])"}


def parse_options(items: list[str] | None) -> dict[str, Any]:
    """``["size=32", "weights=/p/w.pth"]`` -> ``{"size": 32, "weights": "/p/w.pth"}`` (values parsed as YAML)."""
    import yaml

    options: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--feature-option {item!r} is not of the form key=value (e.g. size=32)")
        try:
            options[key.strip()] = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError:
            options[key.strip()] = value
    return options


def add_arguments(parser) -> None:
    """The ``demos``, ``learn`` and ``score`` actions (:data:`ACTIONS` runs them)."""
    from rewardtune.perceptual.constants import COMBINES, DEFAULT_OBJECTIVE, OBJECTIVES

    sub = parser.add_subparsers(dest="perceptual_command", metavar="ACTION", required=True)
    _add_demos(sub)
    learn = sub.add_parser("learn", help="learn a reward from demo videos",
                           description="e.g. rewardtune perceptual learn --videos 'demos/*.mp4' --steps 2 "
                                       "--features random-cnn --out reward.pt --plot steps.png")
    learn.add_argument("--videos", required=True, help="folder or glob of demos: mp4, webm, gif, or frame folders")
    learn.add_argument("--steps", type=positive_int, required=True, help="steps per demo (>= 2)")
    learn.add_argument("--features", default="random-cnn", help="feature extractor: inception_v3, "
                       "openclip:<model>, shapes-clip, random-cnn, pixels, or time-contrastive (trained on these "
                       "demos, saved with the reward) (default random-cnn)")
    learn.add_argument("--feature-option", action="append", metavar="KEY=VALUE",
                       help="extractor option, repeatable (e.g. weights=inception.pth, pooled=false, size=32)")
    learn.add_argument("--objective", choices=OBJECTIVES, default=DEFAULT_OBJECTIVE,
                       help=f"step-discovery objective (default {DEFAULT_OBJECTIVE})")
    learn.add_argument("--min-size", type=positive_int, default=None,
                       help="minimum frames per step (default: a quarter of the mean step length)")
    learn.add_argument("--alpha", type=finite_float, default=5.0, help="Eq. 1 weight of the mean gap (default 5)")
    learn.add_argument("--n-features", type=positive_int, default=32, help="features kept per step (default 32)")
    learn.add_argument("--combine", choices=COMBINES, default="doubling", help="default step combination")
    learn.add_argument("--out", required=True, help="reward file to write (e.g. reward.pt)")
    learn.add_argument("--plot", default=None, help="also write a PNG of the demos' discovered steps")
    score = sub.add_parser("score", help="score every frame of a video with a learned reward",
                           description="e.g. rewardtune perceptual score --reward reward.pt --video test.mp4 "
                                       "--out rewards.csv --plot rewards.png")
    score.add_argument("--reward", required=True, help="file written by `rewardtune perceptual learn`")
    score.add_argument("--video", required=True, help="video file (mp4, webm, gif) or folder of frames")
    score.add_argument("--out", default=None, help="CSV of frame, step rewards, total")
    score.add_argument("--plot", default=None, help="PNG of per-step and total reward over time")
    score.add_argument("--steps-plot", default=None, help="PNG of the training demos' discovered step boundaries")
    score.add_argument("--combine", choices=COMBINES, default=None, help="override the file's step combination")
    score.add_argument("--shaped", action="store_true", help="total as the shaped difference r[t] - r[t-1]")


def _add_demos(sub) -> None:
    tasks = "\n".join(f"  {name:12s} {text}" for name, text in DEMO_TASKS.items())
    demos = sub.add_parser("demos", help="write demo videos of a built-in task (door, pour, mountaincar)",
                           description="Write demo videos of a built-in task, readable by `perceptual learn`, e.g.\n"
                                       "  rewardtune perceptual demos --task door --count 8 --out demos/\n"
                                       "  rewardtune perceptual learn --videos demos/ --steps 2 --out reward.pt\n\n"
                                       f"tasks:\n{tasks}")
    demos.add_argument("--task", required=True, choices=list(DEMO_TASKS), help="the task to demonstrate")
    demos.add_argument("--out", required=True, help="new or empty folder for the videos")
    demos.add_argument("--count", type=positive_int, default=8, help="number of demos (default 8)")
    demos.add_argument("--seed", type=int, default=0, help="demo k uses seed+k (default 0)")
    demos.add_argument("--format", choices=["mp4", "gif", "frames"], default="mp4",
                       help="mp4 (default), gif, or frames (a folder of PNGs per demo: exact pixels)")
    demos.add_argument("--kind", choices=["expert", "failed", "random"], default="expert",
                       help="expert (default) completes the task; failed stops part-way; random does not try")
    demos.add_argument("--size", type=positive_int, default=64,
                       help="frame height in pixels (default 64; MountainCar frames are 1.5x as wide)")


def run_demos(args) -> int:
    import av

    from rewardtune.outputs import StagedFolder
    from rewardtune.perceptual.demos import require_gymnasium, write_demos

    if args.task == "mountaincar":
        require_gymnasium()
    staged = StagedFolder(args.out, False, set(), done="", command="perceptual demos",
                          hint="choose a new or empty --out (demos in one folder are learned from together)")
    with staged as stage:
        lengths: list[int] = []
        try:
            write_demos(args.task, stage, args.count, args.seed, args.kind, args.format, args.size,
                        progress=lambda path, rollout: lengths.append(len(rollout.frames)))
        except (OSError, ValueError, av.FFmpegError) as exc:  # e.g. a PyAV build without an H.264 encoder
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise UserError(f"cannot write {args.format} videos here ({reason}); try --format gif or frames") \
                from None
        out = staged.commit()
    print(f"wrote {args.count} {args.kind} {args.task} demos ({args.format}, {min(lengths)}-{max(lengths)} frames "
          f"each) to {out}; next: rewardtune perceptual learn --videos {out} --steps 2 --out reward.pt")
    return 0


def _check_suffix(path: str | None, suffix: str, flag: str) -> None:
    if path is not None and Path(path).suffix.lower() != suffix:
        raise UserError(f"{flag} must end in {suffix}, got {path!r}")


def _check_outputs(*flags_paths: tuple[str, str | None]) -> None:
    """Every output file can be written (one-line error before any work otherwise)."""
    from rewardtune.outputs import check_writable_file

    for flag, path in flags_paths:
        check_writable_file(path, flag)


def run_learn(args) -> int:
    from rewardtune.perceptual.features import load_extractor
    from rewardtune.perceptual.plots import plot_boundaries
    from rewardtune.perceptual.reward import PerceptualReward
    from rewardtune.perceptual.video import find_videos, read_video

    _check_suffix(args.plot, ".png", "--plot")
    _check_outputs(("--out", args.out), ("--plot", args.plot))
    if args.steps < 2:
        raise UserError(f"--steps must be at least 2 (a step is learned against the others), got {args.steps}")
    paths = find_videos(args.videos)
    if len(paths) < 2:
        raise UserError(f"need at least 2 demo videos, found {len(paths)} in {args.videos!r}")
    extractor = load_extractor(args.features, parse_options(args.feature_option))
    videos = [read_video(p) for p in paths]
    reward = PerceptualReward.fit(videos, args.steps, extractor, objective=args.objective, min_size=args.min_size,
                                  alpha=args.alpha, n_features=args.n_features, combine=args.combine,
                                  names=[p.name for p in paths])
    reward.save(args.out)
    if args.plot:
        plot_boundaries(reward.demos, args.plot)
    frames = sum(len(v) for v in videos)
    print(f"learned a {args.steps}-step reward from {len(videos)} demos ({frames} frames, {args.features}); "
          f"wrote {args.out}")
    for demo in reward.demos:
        print(f"  {demo['name']}: {demo['length']} frames, steps start at {[0, *demo['splits']]}")
    return 0


def run_score(args) -> int:
    from rewardtune.perceptual.plots import plot_boundaries, plot_rewards
    from rewardtune.perceptual.reward import PerceptualReward
    from rewardtune.perceptual.video import read_video
    from rewardtune.utils.io import write_csv

    _check_suffix(args.out, ".csv", "--out")
    _check_suffix(args.plot, ".png", "--plot")
    _check_suffix(args.steps_plot, ".png", "--steps-plot")
    _check_outputs(("--out", args.out), ("--plot", args.plot), ("--steps-plot", args.steps_plot))
    reward = PerceptualReward.load(args.reward)
    frames = read_video(args.video)
    per_step, total = reward.score_frames(frames, combine=args.combine, shaped=args.shaped or None)
    per_step, total = per_step.numpy(), total.numpy()
    rows = [{"frame": t, **{f"step{k + 1}": round(float(per_step[t, k]), 6) for k in range(per_step.shape[1])},
             "total": round(float(total[t]), 6)} for t in range(len(total))]
    if args.out:
        write_csv(args.out, rows)
    if args.plot:
        plot_rewards(per_step, total, args.plot, title=Path(args.video).name)
    if args.steps_plot:
        plot_boundaries(reward.demos, args.steps_plot)
    final = ", ".join(f"step{k + 1}={per_step[-1, k]:.3f}" for k in range(per_step.shape[1]))
    print(f"{len(total)} frames scored; last frame: {final}, total={total[-1]:.3f}; max total {total.max():.3f}")
    return 0


def run(args) -> int:
    return ACTIONS[args.perceptual_command](args)


ACTIONS = {"demos": run_demos, "learn": run_learn, "score": run_score}

__all__ = ["ACTIONS", "DEMO_TASKS", "DESCRIPTION", "add_arguments", "parse_options", "run"]
