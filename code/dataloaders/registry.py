"""Datasets by name, with the evaluation protocol of each (``--dataset LA``).

A script asks :func:`get_dataset_spec` for the dataset class, its default root (under the repository root)
and its default patch and sliding-window strides; flags given on the command line win. Pancreas-CT and
BraTS-2019 are added here by the issue that brings their preprocessing.
"""
from dataclasses import dataclass

from dataloaders.la_heart import LAHeart
from utils.errors import UserError


@dataclass(frozen=True)
class DatasetSpec:
    """What the scripts need to know about a dataset."""

    name: str
    dataset_class: type
    default_root: str
    num_classes: int
    patch_size: tuple
    stride_xy: int
    stride_z: int


DATASETS = {
    "LA": DatasetSpec(name="LA", dataset_class=LAHeart, default_root="data/LA", num_classes=2,
                      patch_size=(112, 112, 80), stride_xy=18, stride_z=4),
}


def get_dataset_spec(name):
    """The :class:`DatasetSpec` registered as ``name``."""
    if name not in DATASETS:
        raise UserError(f"unknown dataset {name!r}; available: {', '.join(sorted(DATASETS))}")
    return DATASETS[name]
