"""The names of the weight files in a run folder, without torch, so that the tools that read finished runs
(``code/report/``) share them with the training base (``utils.run``) without importing torch."""
LATEST = "latest.pth"  # the newest state of a run, for --resume
BEST_VAL = "best_val.pth"  # the weights with the best validation Dice (--val_interval)


def snapshot_name(iteration):
    """The weights saved at ``iteration`` (the final ones: ``iter_<max_iterations>.pth``)."""
    return f"iter_{iteration}.pth"
