"""What every h5 case dataset shares: split lists of case ids, one h5 file per case, validation up front.

A dataset (LA, Pancreas-CT, BraTS-2019) differs only in its layout: which list file holds each split and
where the h5 file of a case lies. A subclass of :class:`H5CaseDataset` states both (``SPLIT_FILES`` and
``case_path``); reading, validation, caching and the ``(index, seed)`` item keys are the same for all.
"""
from pathlib import Path

import numpy as np

from dataloaders.h5io import read_case
from utils.errors import DataError


def read_list(path):
    """Read a split list: one id per line, blank lines ignored; error if missing, empty or repeated."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"split list {path} not found")
    ids = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not ids:
        raise DataError(f"split list {path} is empty")
    repeated = sorted({i for i in ids if ids.count(i) > 1})
    if repeated:
        raise DataError(f"split list {path} repeats case ids: {', '.join(repeated[:5])}")
    return ids


def write_list(path, ids):
    """Write a split list, one id per line."""
    Path(path).write_text("".join(f"{case_id}\n" for case_id in ids))


class H5CaseDataset:
    """Cases of one split of an h5 case dataset, validated when the dataset is built.

    ``Dataset(root, split="train", num=None, transform=None)`` keeps the first ``num`` ids of the split
    list (all when None); ``case_ids`` picks a subset of the list instead. Construction checks that the
    root and list exist and that every listed case reads cleanly (keys, shapes, binary labels), so a bad
    file is reported before training starts.
    With ``cache`` the volumes read then are kept in memory (about 12 MB per LA case): decompressing four
    gzip h5 files per iteration otherwise costs a CPU run about 0.4 s of CPU time per batch. Filled before
    the loader's workers start, the cache is shared with them copy-on-write.

    Items are ``{'image', 'label', 'case'}`` dicts. An item key is an index or ``(index, seed)``; with a
    seed the transform gets its own ``RandomState(seed)`` (see ``dataloaders.samplers.InfiniteBatches``).

    Subclasses set ``SPLIT_FILES`` (split name -> list file under the root), ``ROOT_HINT`` (how to get the
    data, shown when the root is missing) and ``case_path(root, case_id)``.
    """

    SPLIT_FILES = {}
    ROOT_HINT = "see data/README.md"

    @staticmethod
    def case_path(root, case_id):
        """Path of the h5 file of ``case_id`` under the data root ``root``."""
        raise NotImplementedError

    def __init__(self, root, split="train", num=None, transform=None, num_classes=2, case_ids=None,
                 cache=False):
        self.root = Path(root)
        self.split = split
        ids = self.list_ids(root, split)
        if case_ids is not None:
            unknown = [c for c in case_ids if c not in ids]
            if unknown:
                raise DataError(f"cases not in {self.SPLIT_FILES[split]}: {', '.join(unknown)}")
            ids = list(case_ids)
        self.case_ids = ids[:num] if num is not None else ids
        self.transform = transform
        self.num_classes = num_classes
        self._cache = {} if cache else None
        self.shapes = {case_id: self._validate(case_id) for case_id in self.case_ids}

    @classmethod
    def list_ids(cls, root, split):
        """The case ids of ``split`` (its list file under ``root``), without opening any case."""
        root = Path(root)
        if not root.is_dir():
            raise DataError(f"data root {root} not found ({cls.ROOT_HINT})")
        if split not in cls.SPLIT_FILES:
            raise DataError(f"unknown split {split!r}; expected one of {', '.join(cls.SPLIT_FILES)}")
        return read_list(root / cls.SPLIT_FILES[split])

    def _validate(self, case_id):
        path = self.case_path(self.root, case_id)
        if not path.is_file():
            raise DataError(f"case {case_id!r} listed in {self.SPLIT_FILES[self.split]} has no file {path}")
        image, label = read_case(path, self.num_classes, read_image=self._cache is not None)
        if self._cache is not None:
            self._cache[case_id] = (image, label)
        return label.shape

    def __len__(self):
        return len(self.case_ids)

    def load(self, index):
        """The untransformed ``{'image', 'label', 'case'}`` of case ``index``."""
        case_id = self.case_ids[index]
        if self._cache is not None:
            image, label = self._cache[case_id]
        else:
            image, label = read_case(self.case_path(self.root, case_id), self.num_classes)
        return {"image": image, "label": label, "case": case_id}

    def __getitem__(self, key):
        index, seed = key if isinstance(key, tuple) else (key, None)
        sample = self.load(index)
        if self.transform is not None:
            rng = np.random.RandomState(seed) if seed is not None else None
            sample = self.transform(sample, rng=rng)
        return sample
