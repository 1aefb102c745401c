"""Ramp schedules for the weight of unsupervised loss terms.

Semi-supervised methods start training with an unreliable teacher, so the consistency term is
switched on gradually. The sigmoid ramp-up is the one of Laine & Aila, "Temporal Ensembling for
Semi-Supervised Learning" (ICLR 2017), as reused by Mean Teacher, UA-MT and the SSL4MIS code base;
the cosine ramp-down is the one of Loshchilov & Hutter's SGDR as used in the Mean Teacher code.
Every function returns a Python ``float`` and rejects negative lengths with ``ValueError``.
"""
import math

LN2 = math.log(2.0)


def _check_length(name, length):
    """Reject a negative ramp length, which has no meaningful schedule."""
    if length < 0:
        raise ValueError(f"{name} must be >= 0, got {length}")


def _clipped_fraction(current, length):
    """``clip(current, 0, length) / length``: progress through a ramp of positive length."""
    return min(max(float(current), 0.0), float(length)) / float(length)


def sigmoid_rampup(current, rampup_length):
    """Laine & Aila's ramp-up ``exp(-5 (1 - t)^2)`` with ``t = clip(current, 0, L) / L``.

    Rises smoothly from ``exp(-5)`` (about 0.0067) at ``current = 0`` to 1 at ``current >= L``.
    A zero length means "no ramp" and gives 1.0, as in SSL4MIS.
    """
    _check_length("rampup_length", rampup_length)
    if rampup_length == 0:
        return 1.0
    phase = 1.0 - _clipped_fraction(current, rampup_length)
    return float(math.exp(-5.0 * phase * phase))


def linear_rampup(current, rampup_length):
    """Linear ramp ``clip(current / L, 0, 1)``; 1.0 for a zero length."""
    _check_length("rampup_length", rampup_length)
    if rampup_length == 0:
        return 1.0
    return _clipped_fraction(current, rampup_length)


def cosine_rampdown(current, rampdown_length):
    """Cosine ramp-down ``0.5 (cos(pi t) + 1)`` with ``t = clip(current, 0, L) / L``: 1 -> 0.

    The original Mean Teacher code asserts ``0 <= current <= L``; here ``current`` is clipped so a
    schedule can be queried past its end. A zero length means the ramp is already over: 0.0,
    which keeps ``cosine_rampup == 1 - cosine_rampdown`` for every length.
    """
    _check_length("rampdown_length", rampdown_length)
    if rampdown_length == 0:
        return 0.0
    return float(0.5 * (math.cos(math.pi * _clipped_fraction(current, rampdown_length)) + 1.0))


def cosine_rampup(current, rampup_length):
    """Cosine ramp-up ``1 - cosine_rampdown``: 0 at the start, 1 at ``current >= L``; 1.0 if L == 0."""
    _check_length("rampup_length", rampup_length)
    return 1.0 - cosine_rampdown(current, rampup_length)


def consistency_weight(iteration, consistency, rampup, iterations_per_epoch=150, ramp=sigmoid_rampup):
    """Consistency-loss weight ``consistency * ramp(iteration // iterations_per_epoch, rampup)``.

    This is the SSL4MIS / UA-MT convention: the ramp advances in "epochs" of
    ``iterations_per_epoch`` iterations (150 in UA-MT on the LA dataset), so UA-MT's
    ``rampup = 40`` reaches the full weight at iteration 40 * 150 = 6000.
    """
    if iterations_per_epoch <= 0:
        raise ValueError(f"iterations_per_epoch must be > 0, got {iterations_per_epoch}")
    return float(consistency) * ramp(iteration // iterations_per_epoch, rampup)


def uncertainty_threshold(iteration, max_iterations, start=0.75, end=1.0):
    """UA-MT's uncertainty threshold ``(start + (end - start) * sigmoid_rampup(iteration, max)) * ln 2``.

    Voxels whose teacher entropy is below the threshold take part in the consistency loss. ln 2 is
    the maximum entropy of a two-class prediction, so with the defaults (UA-MT, UG-MCL) the threshold
    grows from about 0.75 of the maximum to the maximum (every voxel kept) by the end of training.
    ``start`` and ``end`` are fractions of ln 2 (UG-MCL's Fig. 3 compares such schedules).
    """
    return (start + (end - start) * sigmoid_rampup(iteration, max_iterations)) * LN2
