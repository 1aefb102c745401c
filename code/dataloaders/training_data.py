"""The training and test data of a script, as every LA-lineage paper sets them up.

Training crops get random rotation/flip and a random crop (UA-MT, DTC, SSL4MIS; ``rot_flip=False`` keeps
only the crop, as MCF's lineage). A supervised run sees the first ``--labelnum`` cases of ``train.list`` (or a
seeded draw of them, ``--label_seed``) in shuffled batches; a semi-supervised run sees the whole list but the
``--val_num`` cases held out for validation (:func:`split_training_cases`), and each batch holds
``--labeled_bs`` labelled crops first, then unlabelled ones (:class:`dataloaders.samplers.TwoStreamBatchSampler`), so
``batch[:labeled_bs]`` is the labelled part. The labels of the unlabelled cases are loaded with them (the
dataset validates every case) but a method must only read ``label[:labeled_bs]``.
"""
from collections import namedtuple
from itertools import combinations
from pathlib import Path

import numpy as np

from dataloaders.h5_dataset import name_cases
from dataloaders.samplers import RandomBatchSampler, TwoStreamBatchSampler
from dataloaders.transforms import Compose, RandomCrop, RandomRotFlip, SignedDistance, ToTensor
from utils.args import check_labelnum
from utils.errors import DataError

TrainingData = namedtuple("TrainingData", ["train_set", "test_set", "sampler"])


def build_training_data(args, spec, semi_supervised=True, signed_distance=False, rot_flip=True):
    """``TrainingData(train_set, test_set, sampler)`` for ``args`` on the dataset described by ``spec``.

    With ``signed_distance`` each training sample also carries ``'sdf'``: for a labelled case the normalised
    signed distance map of its cropped label, for an unlabelled one NaN (``transforms.SignedDistance``).

    The test list is read and every test case checked even with ``--no_eval`` (when the list exists), since
    ``reproduce.sh`` evaluates such runs later: a test case that cannot be evaluated is found before the
    training, not after it. ``test_set`` is None with ``--no_eval`` and no test list. Errors (missing data,
    a ``--labelnum`` that does not fit the list, a missing validation list with ``--val_interval``, a case in
    two splits) are one-line ``UserError``/``DataError``. ``train_set.warnings`` gathers what looked wrong in
    the data of the run (images that are not z-scored, labelled or test cases without foreground) for
    ``TrainingRun.begin`` to print once.
    """
    dataset_class = spec.dataset_class
    train_ids = dataset_class.list_ids(args.root_path, "train")
    check_labelnum(args, len(train_ids), semi_supervised)
    if args.val_interval and not args.val_num:
        dataset_class.list_ids(args.root_path, "val")  # a missing list fails now, before the run directory
    check_disjoint_splits(dataset_class, args.root_path)
    labelled, unlabelled, validation = split_training_cases(train_ids, args.labelnum, args.label_seed, args.val_num)
    transforms = ([RandomRotFlip()] if rot_flip else []) + [RandomCrop(args.patch_size)]
    transforms += [SignedDistance(labelled)] if signed_distance else []
    transform = Compose(transforms + [ToTensor()])
    train_set = dataset_class(args.root_path, "train", case_ids=labelled + (unlabelled if semi_supervised else []),
                              transform=transform, cache=bool(args.cache))
    train_set.validation_cases = validation
    train_set.listed_cases = len(train_ids)
    has_test_list = (Path(args.root_path) / dataset_class.SPLIT_FILES["test"]).is_file()
    test_set = dataset_class(args.root_path, "test") if has_test_list or not args.no_eval else None
    train_set.warnings = data_warnings(train_set, labelled, test_set)
    if semi_supervised:
        sampler = TwoStreamBatchSampler(range(len(labelled)), range(len(labelled), len(train_set)), args.batch_size,
                                        args.batch_size - args.labeled_bs, seed=args.seed)
    else:
        sampler = RandomBatchSampler(range(len(labelled)), args.batch_size, seed=args.seed)
    return TrainingData(train_set, test_set, sampler)


def split_training_cases(train_ids, labelnum, label_seed=None, val_num=0):
    """``(labelled, unlabelled, validation)``: the case ids of the training list ``train_ids`` in three pools.

    ``val_num`` cases, the last of the list, are held out for validation (``--val_num``): the same ones whatever
    the labelled count, the draw or the method. Of the others, the labelled cases are the first ``labelnum`` (the
    papers' protocol) or, with ``label_seed`` (``--label_seed``), a draw: the first ``labelnum`` of a permutation
    of the pool by numpy's ``default_rng(label_seed)``, kept in list order. The draw depends on nothing but the
    seed, the pool and the count, so every method gets the same cases, and a seed's 8 cases are among its 16.
    The unlabelled cases are the rest, in list order."""
    pool = list(train_ids[:len(train_ids) - val_num])
    validation = list(train_ids[len(train_ids) - val_num:])
    if label_seed is None:
        chosen = set(range(labelnum))
    else:
        chosen = set(np.random.default_rng(label_seed).permutation(len(pool))[:labelnum].tolist())
    labelled = [case for index, case in enumerate(pool) if index in chosen]
    unlabelled = [case for index, case in enumerate(pool) if index not in chosen]
    return labelled, unlabelled, validation


def check_disjoint_splits(dataset_class, root):
    """No case may be in two of the dataset's split lists (a test case trained on inflates every number)."""
    splits = {split: set(dataset_class.list_ids(root, split)) for split, name in dataset_class.SPLIT_FILES.items()
              if (Path(root) / name).is_file()}
    for (first, a), (second, b) in combinations(splits.items(), 2):
        shared = sorted(a & b)
        if shared:
            raise DataError(f"{len(shared)} cases are in both {dataset_class.SPLIT_FILES[first]} and "
                            f"{dataset_class.SPLIT_FILES[second]} under {root}: {name_cases(shared)}")


def data_warnings(train_set, labelled_ids, test_set):
    """The warnings about a run's data: images that do not look z-scored (training and test cases), labelled
    cases whose label is empty (they teach only background), test cases with an empty ground truth."""
    warnings = list(train_set.warnings)
    empty = train_set.empty_label_cases(labelled_ids)
    if empty:
        warnings.append(f"{len(empty)} of the {len(labelled_ids)} labelled cases have an empty label (no "
                        f"foreground voxel; they teach only background): {name_cases(empty)}")
    if test_set is not None:
        warnings += evaluation_warnings(test_set)
    return warnings


def evaluation_warnings(dataset):
    """The warnings about the cases an evaluation scores: images that do not look z-scored, and cases with an
    empty ground truth (Dice 1 for an empty prediction, else 0)."""
    empty = dataset.empty_label_cases()
    if not empty:
        return list(dataset.warnings)
    return dataset.warnings + [f"{len(empty)} of the {len(dataset)} evaluated cases have an empty ground truth "
                               f"(their Dice is 1 for an empty prediction, else 0; surface distances undefined): "
                               f"{name_cases(empty)}"]
