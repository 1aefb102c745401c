"""Learning-rate schedules of the anchors, as functions of the 0-based iteration being run.

- ``step``: ``base_lr * gamma ** (iteration // step_size)`` (UA-MT, DTC: x0.1 every 2500 iterations);
- ``poly``: ``base_lr * (1 - iteration / max_iterations) ** power`` (SSL4MIS, power 0.9);
- ``linear``: ``base_lr * (1 - iteration / max_iterations)``;
- ``constant``: ``base_lr`` (MC-Net's code).

The anchors update the rate after the step, so iteration 0 always runs at ``base_lr``; this form is the same.
"""
from utils.errors import UserError

SCHEDULES = ("step", "poly", "linear", "constant")


def lr_at(iteration, base_lr, schedule, max_iterations, step_size=2500, gamma=0.1, power=0.9):
    """Learning rate for (0-based) ``iteration``."""
    if schedule == "step":
        return base_lr * gamma ** (iteration // step_size)
    if schedule == "poly":
        return base_lr * (1.0 - iteration / max_iterations) ** power
    if schedule == "linear":
        return base_lr * (1.0 - iteration / max_iterations)
    if schedule == "constant":
        return base_lr
    raise UserError(f"unknown lr schedule {schedule!r}; available: {', '.join(SCHEDULES)}")


def set_lr(optimizer, lr):
    """Set ``lr`` on every parameter group."""
    for group in optimizer.param_groups:
        group["lr"] = lr
