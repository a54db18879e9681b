"""Old import path of the ``sample`` command (:mod:`rewardtune.commands.sample`); images come from the sampling
service :mod:`rewardtune.diffusion.service`."""

from rewardtune.commands.sample import SampleConfig, prepare_out_dir, run_sample

__all__ = ["SampleConfig", "prepare_out_dir", "run_sample"]
