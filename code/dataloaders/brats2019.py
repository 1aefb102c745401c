"""The BraTS-2019 whole-tumour task (FLAIR) in the layout of SSL4MIS (written by ``brats_processing.py``).

Layout under the data root::

    <root>/train.txt, <root>/val.txt, <root>/test.txt   one case id per line (250 / 25 / 60)
    <root>/data/<id>.h5                                 keys 'image' float32, 'label' uint8 {0, 1}

Volumes are indexed (x, y, z), cropped to the brain. ``val.txt`` is the validation list of a training
run's periodic validation (``--val_interval``); the test list is only used for the final evaluation.
"""
from pathlib import Path

from dataloaders.h5_dataset import H5CaseDataset

CASE_DIR = "data"
SPLIT_FILES = {"train": "train.txt", "val": "val.txt", "test": "test.txt"}


class BraTS2019(H5CaseDataset):
    """Cases of one split of the BraTS-2019 dataset (see :class:`~dataloaders.h5_dataset.H5CaseDataset`)."""

    SPLIT_FILES = SPLIT_FILES
    ROOT_HINT = "see data/README.md: code/dataloaders/brats_processing.py converts the BraTS 2019 release"

    @staticmethod
    def case_path(root, case_id):
        """``<root>/data/<id>.h5``."""
        return Path(root) / CASE_DIR / f"{case_id}.h5"
