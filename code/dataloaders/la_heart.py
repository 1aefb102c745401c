"""The Left Atrium 2018 dataset in the layout of UA-MT / DTC (and of our synthetic and resampled copies).

Layout under the data root::

    <root>/train.list, <root>/test.list          one case id per line
    <root>/2018LA_Seg_Training Set/<id>/mri_norm2.h5   keys 'image' float32, 'label' uint8 {0, 1}

"``N`` labelled" means the first ``N`` lines of ``train.list``; the rest of the list is unlabelled.
``read_list`` and ``write_list`` (from ``dataloaders.h5_dataset``) are re-exported here for the LA scripts.
"""
from pathlib import Path

from dataloaders.h5_dataset import H5CaseDataset, read_list, write_list

__all__ = ["CASE_DIR", "CASE_FILE", "SPLIT_FILES", "LAHeart", "case_path", "read_list", "write_list"]

CASE_DIR = "2018LA_Seg_Training Set"
CASE_FILE = "mri_norm2.h5"
SPLIT_FILES = {"train": "train.list", "test": "test.list"}


def case_path(root, case_id):
    """Path of the h5 file of ``case_id`` under the data root ``root``."""
    return Path(root) / CASE_DIR / case_id / CASE_FILE


class LAHeart(H5CaseDataset):
    """Cases of one split of an LA-layout dataset (see :class:`~dataloaders.h5_dataset.H5CaseDataset`)."""

    SPLIT_FILES = SPLIT_FILES
    ROOT_HINT = "see data/README.md, or make a synthetic dataset with code/dataloaders/synthetic.py"
    case_path = staticmethod(case_path)
