"""What every h5 case dataset shares: split lists of case ids, one h5 file per case, validation up front.

A dataset (LA, Pancreas-CT, BraTS-2019) differs only in its layout: which list file holds each split and
where the h5 file of a case lies. A subclass of :class:`H5CaseDataset` states both (``SPLIT_FILES`` and
``case_path``); reading, validation, caching and the ``(index, seed)`` item keys are the same for all.

Every case is read once when a dataset is built: a file that cannot be read, a label that is not made of
class ids or an image with NaN or infinite values stops the script before it trains. What is suspicious but
not impossible is collected in ``warnings`` for the script to print once: images that do not look z-scored
(every dataset here is: LA by its release, Pancreas-CT and BraTS-2019 by our converters) and cases whose
label has no foreground.
"""
from collections import namedtuple
from pathlib import Path, PurePath

import numpy as np

from dataloaders.h5io import read_case
from utils.errors import DataError

CaseStats = namedtuple("CaseStats", ["mean", "std", "min", "foreground"])
# A z-scored volume (or the crop of one) has a mean within a few units of 0, a spread near 1 and negative
# voxels; the LA release spans means 0.05..1.9 and standard deviations 0.3..1.7 over its 100 cases.
ZSCORE_MAX_ABS_MEAN = 5.0
ZSCORE_STD_RANGE = (0.05, 20.0)
SHOWN_CASES = 5


def check_case_id(case_id, path):
    """A case id names one file or folder inside the data root: no path separator, not ``.``/``..``, so that
    no id of a list file can read (or, with ``--save_nii``, write) outside it."""
    parts = PurePath(case_id).parts
    if len(parts) != 1 or case_id in (".", "..") or "/" in case_id or "\\" in case_id or "\0" in case_id:
        raise DataError(f"split list {path}: case id {case_id!r} is not a plain name (an id names a case "
                        "inside the data root, without folders)")


def read_list(path):
    """Read a split list: UTF-8 text (a byte-order mark allowed), one id per line, surrounding spaces and
    carriage returns stripped, blank lines ignored; error if missing, not UTF-8, empty, repeated, or an id
    that is not a plain name (:func:`check_case_id`)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"split list {path} not found")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"split list {path} is not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset "
                        f"{exc.start}); save it as UTF-8, one case id per line") from None
    ids = [line.strip() for line in text.splitlines() if line.strip()]
    if not ids:
        raise DataError(f"split list {path} is empty")
    repeated = sorted({i for i in ids if ids.count(i) > 1})
    if repeated:
        raise DataError(f"split list {path} repeats case ids: {', '.join(repeated[:5])}")
    for case_id in ids:
        check_case_id(case_id, path)
    return ids


def looks_z_scored(stats):
    """Whether a case's image statistics are those of a z-scored volume (see ``ZSCORE_*``)."""
    low, high = ZSCORE_STD_RANGE
    return abs(stats.mean) <= ZSCORE_MAX_ABS_MEAN and low <= stats.std <= high and stats.min < 0


def name_cases(cases):
    """``a, b, c, ... (12 in all)``: at most ``SHOWN_CASES`` names."""
    shown = ", ".join(cases[:SHOWN_CASES])
    return shown + (f", ... ({len(cases)} in all)" if len(cases) > SHOWN_CASES else "")


def write_list(path, ids):
    """Write a split list, one id per line."""
    Path(path).write_text("".join(f"{case_id}\n" for case_id in ids))


class H5CaseDataset:
    """Cases of one split of an h5 case dataset, validated when the dataset is built.

    ``Dataset(root, split="train", num=None, transform=None)`` keeps the first ``num`` ids of the split
    list (all when None); ``case_ids`` picks a subset of the list instead (each at most once), and
    ``split_ids`` keeps the whole list. Construction checks that the root and list exist and that every listed
    case reads cleanly (keys, shapes, class-id labels, finite image), so a bad file is reported before training
    starts; ``stats`` keeps each case's image statistics and foreground size, ``warnings`` what looked wrong
    without being impossible.
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
        ids = self.split_ids = self.list_ids(root, split)
        if case_ids is not None:
            unknown = [c for c in case_ids if c not in ids]
            if unknown:
                raise DataError(f"cases not in {self.SPLIT_FILES[split]}: {', '.join(unknown)}")
            repeated = sorted({c for c in case_ids if list(case_ids).count(c) > 1})
            if repeated:
                raise DataError(f"cases given more than once: {', '.join(repeated)}")
            ids = list(case_ids)
        self.case_ids = ids[:num] if num is not None else ids
        self.transform = transform
        self.num_classes = num_classes
        self._cache = {} if cache else None
        self.stats = {case_id: self._validate(case_id) for case_id in self.case_ids}
        self.warnings = self.image_warnings()

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
        """Read the case whole (a damaged voxel block shows only then) and return its :class:`CaseStats`."""
        path = self.case_path(self.root, case_id)
        if not path.is_file():
            raise DataError(f"case {case_id!r} listed in {self.SPLIT_FILES[self.split]} has no file {path}")
        image, label = read_case(path, self.num_classes)
        if self._cache is not None:
            self._cache[case_id] = (image, label)
        return CaseStats(float(image.mean(dtype=np.float64)), float(image.std(dtype=np.float64)), float(image.min()),
                         int(np.count_nonzero(label)))

    def image_warnings(self):
        """One line about the cases whose image does not look z-scored, if any."""
        odd = [c for c in self.case_ids if not looks_z_scored(self.stats[c])]
        if not odd:
            return []
        example = self.stats[odd[0]]
        return [f"{len(odd)} of {len(self)} cases of {self.SPLIT_FILES[self.split]} do not look z-scored as this "
                f"dataset's images are (mean near 0, standard deviation near 1, negative values): "
                f"{name_cases(odd)}; {odd[0]} has mean {example.mean:.3g}, standard deviation {example.std:.3g}, "
                f"minimum {example.min:.3g}. Check the data root and its preprocessing (data/README.md)"]

    def empty_label_cases(self, case_ids=None):
        """The cases (of ``case_ids``, default all) whose label has no foreground voxel."""
        return [c for c in (self.case_ids if case_ids is None else case_ids) if self.stats[c].foreground == 0]

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
