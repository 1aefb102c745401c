"""Training and evaluation transforms on ``{'image', 'label'}`` sample dicts (numpy, axes x, y, z).

Same semantics as the UA-MT / SSL4MIS transforms that every LA paper uses. One addition: every random
transform takes an optional ``rng`` (a ``numpy.random.RandomState``). The datasets hand each sample its
own ``RandomState`` seeded from (run seed, iteration, slot), so augmentation does not depend on which
worker loads a sample and a resumed run sees exactly the crops it would have seen; without ``rng`` the
global ``numpy.random`` is used, as in the anchors.
"""
import numpy as np
import torch

from utils.losses import compute_sdf, require_edt


def _rng(rng):
    return np.random if rng is None else rng


def pad_to_size(sample, output_size):
    """Zero-pad image and label when any dimension is not larger than the patch, exactly as the anchors:
    every axis is padded on both sides by ``max((patch - size) // 2 + 3, 0)`` (the extra 3 voxels leave
    the random crop some freedom even for a volume as small as the patch)."""
    shape = sample["label"].shape
    if all(s > o for s, o in zip(shape, output_size)):
        return sample
    pads = [(max((o - s) // 2 + 3, 0),) * 2 for s, o in zip(shape, output_size)]
    out = dict(sample)
    out["image"] = np.pad(sample["image"], pads, mode="constant", constant_values=0)
    out["label"] = np.pad(sample["label"], pads, mode="constant", constant_values=0)
    return out


def _crop(sample, corner, output_size):
    slices = tuple(slice(c, c + o) for c, o in zip(corner, output_size))
    out = dict(sample)
    out["image"] = sample["image"][slices]
    out["label"] = sample["label"][slices]
    return out


class RandomCrop:
    """Pad if needed (see :func:`pad_to_size`), then crop ``output_size`` at a random corner drawn from
    ``randint(0, size - patch)`` per axis (upper bound exclusive, as in the anchors)."""

    def __init__(self, output_size):
        self.output_size = tuple(int(s) for s in output_size)

    def __call__(self, sample, rng=None):
        sample = pad_to_size(sample, self.output_size)
        rng = _rng(rng)
        corner = [rng.randint(0, s - o) for s, o in zip(sample["label"].shape, self.output_size)]
        return _crop(sample, corner, self.output_size)


class CenterCrop:
    """Pad if needed (see :func:`pad_to_size`), then crop ``output_size`` at the centre
    (``round((size - patch) / 2)``, as the anchors)."""

    def __init__(self, output_size):
        self.output_size = tuple(int(s) for s in output_size)

    def __call__(self, sample, rng=None):
        sample = pad_to_size(sample, self.output_size)
        corner = [int(round((s - o) / 2.0)) for s, o in zip(sample["label"].shape, self.output_size)]
        return _crop(sample, corner, self.output_size)


class RandomRotFlip:
    """Rotate by ``k * 90`` degrees in the x-y plane (k uniform in 0..3), then flip along x or y."""

    def __call__(self, sample, rng=None):
        rng = _rng(rng)
        k = rng.randint(0, 4)
        axis = rng.randint(0, 2)
        out = dict(sample)
        for key in ("image", "label"):
            out[key] = np.flip(np.rot90(sample[key], k), axis=axis).copy()
        return out


class RandomNoise:
    """Add Gaussian noise ``N(mu, sigma)`` clipped to ``[-2 sigma, 2 sigma]`` to the image."""

    def __init__(self, mu=0.0, sigma=0.1):
        self.mu, self.sigma = mu, sigma

    def __call__(self, sample, rng=None):
        rng = _rng(rng)
        noise = np.clip(self.sigma * rng.randn(*sample["image"].shape), -2 * self.sigma, 2 * self.sigma)
        out = dict(sample)
        out["image"] = (sample["image"] + noise + self.mu).astype(np.float32)
        return out


class SignedDistance:
    """Add ``'sdf'``: the normalised signed distance map of the (cropped) label, ``utils.losses.compute_sdf``.

    For the dual-task methods (UG-MCL, DTC). Computed here, in the data loader's workers, rather than in
    the training loop: the map of a 112x112x80 crop takes about 0.1 s of CPU (docs/benchmarks.md), which would
    otherwise stall a GPU every iteration. Only the labelled cases need it (the methods read
    ``sdf[:labeled_bs]``, as DTC computes it for the labelled half only): with ``labelled_cases`` given, any
    other case gets a map of NaN instead, which costs nothing and poisons a loss that reads it by mistake.
    Deterministic, so it draws nothing from ``rng``.
    """

    def __init__(self, labelled_cases=None):
        require_edt()
        self.labelled_cases = None if labelled_cases is None else frozenset(labelled_cases)

    def __call__(self, sample, rng=None):
        label = sample["label"]
        out = dict(sample)
        if self.labelled_cases is None or sample["case"] in self.labelled_cases:
            out["sdf"] = compute_sdf(label[None], (1,) + label.shape)[0]
        else:
            out["sdf"] = np.full(label.shape, np.nan, dtype=np.float32)
        return out


class ToTensor:
    """Image to a float tensor ``[1, X, Y, Z]``, label to a long tensor ``[X, Y, Z]``."""

    def __call__(self, sample, rng=None):
        out = dict(sample)
        image = np.ascontiguousarray(sample["image"], dtype=np.float32)
        out["image"] = torch.from_numpy(image).unsqueeze(0)
        out["label"] = torch.from_numpy(np.ascontiguousarray(sample["label"])).long()
        return out


class Compose:
    """Apply transforms in order, passing the same ``rng`` to each."""

    def __init__(self, transforms):
        self.transforms = list(transforms)

    def __call__(self, sample, rng=None):
        for transform in self.transforms:
            sample = transform(sample, rng=rng)
        return sample
