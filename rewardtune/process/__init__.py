"""Step-level (process) rewards for denoising trajectories.

* :mod:`rewardtune.process.transforms`: Clip / Delta refinements, returns-to-go, ReARTeR's TD look-ahead.
"""
