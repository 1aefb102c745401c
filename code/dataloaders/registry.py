"""Datasets by name, with the evaluation protocol of each (``--dataset LA``).

A script asks :func:`get_dataset_spec` for the dataset class, its default root (under the repository root)
and its default patch and sliding-window strides; flags given on the command line win, and so does a
method's own default where its paper states one (UC-Seg's 96^3 patch). Patches and strides are those of
the papers on each dataset: LA 112x112x80 at stride 18/4 (UA-MT, DTC), Pancreas-CT 96^3 at 16/16 (DTC,
MC-Net), BraTS-2019 96^3 at 64/64 (SSL4MIS). The default labelled count is each dataset's 10 % setting, the
one every paper's table shares: LA 8 of 80, Pancreas-CT 6 of 62, BraTS-2019 25 of 250.
"""
from dataclasses import dataclass

from dataloaders.brats2019 import BraTS2019
from dataloaders.la_heart import LAHeart
from dataloaders.pancreas import Pancreas
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
    labelnum: int


DATASETS = {
    "LA": DatasetSpec(name="LA", dataset_class=LAHeart, default_root="data/LA", num_classes=2,
                      patch_size=(112, 112, 80), stride_xy=18, stride_z=4, labelnum=8),
    "Pancreas": DatasetSpec(name="Pancreas", dataset_class=Pancreas, default_root="data/Pancreas", num_classes=2,
                            patch_size=(96, 96, 96), stride_xy=16, stride_z=16, labelnum=6),
    "BraTS2019": DatasetSpec(name="BraTS2019", dataset_class=BraTS2019, default_root="data/BraTS2019",
                             num_classes=2, patch_size=(96, 96, 96), stride_xy=64, stride_z=64, labelnum=25),
}


def get_dataset_spec(name):
    """The :class:`DatasetSpec` registered as ``name``."""
    if name not in DATASETS:
        raise UserError(f"unknown dataset {name!r}; available: {', '.join(sorted(DATASETS))}")
    return DATASETS[name]
