"""Evidential (subjective-logic) uncertainty of a segmentation network's logits and its calibration loss.

Evidential deep learning (Sensoy et al., NeurIPS 2018) reads a network's non-negative outputs as evidence
``e_c`` for each class, the parameters of a Dirichlet ``alpha_c = e_c + 1`` with strength
``S = sum_c alpha_c``: the expected class probability is ``alpha_c / S`` and the uncertainty mass is
``u = C / S``. With no evidence at all ``u = 1``; the more evidence, the closer ``u`` gets to 0. UC-Seg
(Huang et al., IEEE TIP 2025) takes the evidence as ``softplus`` of each subnet's logits and trains it with
the accuracy-versus-uncertainty loss of Zou et al.'s UMIS (``utils/UMIS.py`` of the official code). No
sampling is involved, so it costs one softplus per voxel. Everything works on the device of its input.
"""
import torch
import torch.nn.functional as F

AU_EPS = 1e-10


def evidence(logits):
    """Non-negative evidence ``softplus(logits)`` per class (UC-Seg's ``infer``)."""
    return F.softplus(logits)


def dirichlet_uncertainty(logits):
    """Uncertainty mass ``u = C / sum_c (softplus(z_c) + 1)`` of logits ``[B, C, ...]``, as ``[B, 1, ...]``.

    ``u`` lies in ``(0, 1]``: it is 1 only without evidence (every logit very negative), about
    ``2 / (2 + 2 ln 2) = 0.59`` for two flat zero logits, and falls towards 0 as any logit grows.
    """
    alpha = evidence(logits) + 1.0
    return logits.shape[1] / torch.sum(alpha, dim=1, keepdim=True)


def au_annealing(iteration, max_iterations, start=0.01):
    """Weight ``a_t = start ** (1 - t / T)`` of the accurate-but-uncertain term: ``start`` at the first
    iteration, 1 at the last (UMIS's ``annealing_AU``, written there as ``start * exp(-ln(start) t / T)``)."""
    return float(start) ** (1.0 - iteration / max_iterations)


def accuracy_uncertainty_loss(logits, target, annealing, eps=AU_EPS):
    """UMIS's accuracy-versus-uncertainty loss of logits ``[B, C, ...]`` against class indices ``[B, ...]``.

    With ``alpha = softplus(z) + 1``, ``p = max_c alpha_c / S`` the confidence of the predicted class and
    ``u = C / S``, each voxel contributes ``a m (-p log(1 - u + eps)) + (1 - a)(1 - m)(-(1 - p) log(u + eps))``
    where ``m`` is 1 when the predicted class is right: correct voxels are pushed to low uncertainty,
    wrong ones to high uncertainty, with ``a = annealing`` (:func:`au_annealing`) shifting the emphasis
    from the second to the first term over training. Returns the mean over voxels.
    """
    alpha = evidence(logits) + 1.0
    strength = torch.sum(alpha, dim=1, keepdim=True)
    confidence, predicted = torch.max(alpha / strength, dim=1)
    uncertainty = (logits.shape[1] / strength).squeeze(1)
    correct = (predicted == target).to(logits.dtype)
    accurate_uncertain = -confidence * torch.log(1.0 - uncertainty + eps)
    inaccurate_certain = -(1.0 - confidence) * torch.log(uncertainty + eps)
    per_voxel = annealing * correct * accurate_uncertain + (1.0 - annealing) * (1.0 - correct) * inaccurate_certain
    return per_voxel.mean()
