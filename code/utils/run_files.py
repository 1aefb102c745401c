"""The names of the weight files in a run folder, and of a run folder that --overwrite moved aside, without torch,
so that the tools that read finished runs (``code/report/``) share them with the training base (``utils.run``)
without importing torch."""
LATEST = "latest.pth"  # the newest state of a run, for --resume
BEST_VAL = "best_val.pth"  # the weights with the best validation Dice (--val_interval)
ASIDE_MARK = ".old-"  # --overwrite moves an existing run folder to <dir>.old-<time>


def aside_name(name, stamp):
    """The name that ``--overwrite`` gives the run folder ``name`` it moves aside at ``stamp``."""
    return f"{name}{ASIDE_MARK}{stamp}"


def is_set_aside(name):
    """Whether the folder ``name`` is a run that ``--overwrite`` moved aside, not a run of its own."""
    return ASIDE_MARK in name


def snapshot_name(iteration):
    """The weights saved at ``iteration`` (the final ones: ``iter_<max_iterations>.pth``)."""
    return f"iter_{iteration}.pth"
