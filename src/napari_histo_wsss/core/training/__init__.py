"""The one training loop every trainer runs (classifier, segmenter, HisynSeg's rounds, its
discriminator): ``loop`` (epochs, stop, resume, checkpoints, events), ``stepper`` (mixed
precision, channels-last, one optimisation step), ``state`` (the position saved in checkpoints),
``resume``, ``schedules`` and ``sampling`` (registries of the config's choices) and
``distributed`` (torchrun, docs/distributed.md)."""
