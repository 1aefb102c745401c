"""Mean-teacher plumbing: an EMA copy of a student network that never receives gradient."""
import copy

import torch


def make_teacher(student):
    """A deep copy of ``student`` with gradients off, to be updated only by :func:`update_ema`."""
    teacher = copy.deepcopy(student)
    for param in teacher.parameters():
        param.requires_grad_(False)
    return teacher


@torch.no_grad()
def update_ema(teacher, student, decay, global_step):
    """``teacher = alpha * teacher + (1 - alpha) * student`` over parameters, with
    ``alpha = min(1 - 1 / (global_step + 1), decay)`` so early steps follow the student closely
    (Tarvainen & Valpola 2017; UA-MT, SSL4MIS). Buffers (BN statistics) are not averaged: the teacher
    keeps its own, as in the anchors."""
    alpha = min(1.0 - 1.0 / (global_step + 1), decay)
    for t_param, s_param in zip(teacher.parameters(), student.parameters()):
        t_param.mul_(alpha).add_(s_param.detach(), alpha=1.0 - alpha)
