"""Mean-teacher plumbing: an EMA copy of a student network that never receives gradient, and its noisy input."""
import copy

import torch

TEACHER_NOISE_STD = 0.1
TEACHER_NOISE_CLIP = 0.2


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


def teacher_input(x, std=TEACHER_NOISE_STD, clip=TEACHER_NOISE_CLIP):
    """``x + clamp(N(0, std^2), -clip, clip)``: the perturbed input the teacher sees in UA-MT and its
    descendants (mean teacher, UG-MCL). Drawn from torch's global generator, so it is seeded and resumed
    with the run."""
    return x + torch.clamp(torch.randn_like(x) * std, -clip, clip)
