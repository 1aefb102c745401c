"""The NIH Pancreas-CT dataset in the layout of MC-Net (written by ``pancreas_processing.py``).

Layout under the data root::

    <root>/train.list, <root>/test.list        one case id per line (image0001 .. image0082; 62 / 20)
    <root>/Pancreas_h5/<id>_norm.h5           keys 'image' float32 (z-scored), 'label' uint8 {0, 1}

Volumes are indexed (x, y, z) at 1 mm isotropic, cropped in x and y around the pancreas. The folder and
file names are those of MC-Net's preprocessing, so its h5 files can be used as they are (DTC's loader reads
``data/<id>.h5`` instead: move such files to ``Pancreas_h5/<id>_norm.h5``).
"""
from pathlib import Path

from dataloaders.h5_dataset import H5CaseDataset

CASE_DIR = "Pancreas_h5"
CASE_SUFFIX = "_norm.h5"
SPLIT_FILES = {"train": "train.list", "test": "test.list"}


class Pancreas(H5CaseDataset):
    """Cases of one split of the Pancreas-CT dataset (see :class:`~dataloaders.h5_dataset.H5CaseDataset`)."""

    SPLIT_FILES = SPLIT_FILES
    ROOT_HINT = "see data/README.md: code/dataloaders/pancreas_processing.py converts the NIH release"

    @staticmethod
    def case_path(root, case_id):
        """``<root>/Pancreas_h5/<id>_norm.h5``."""
        return Path(root) / CASE_DIR / f"{case_id}{CASE_SUFFIX}"
