"""The training and test data of a script, as every LA-lineage paper sets them up.

Training crops get random rotation/flip and a random crop (UA-MT, DTC, SSL4MIS; ``rot_flip=False`` keeps
only the crop, as MCF's lineage). A supervised run sees the first ``--labelnum`` cases of ``train.list`` in
shuffled batches; a semi-supervised run sees the whole list, and each batch holds ``--labeled_bs`` labelled
crops first, then unlabelled ones (:class:`dataloaders.samplers.TwoStreamBatchSampler`), so
``batch[:labeled_bs]`` is the labelled part. The labels of the unlabelled cases are loaded with them (the
dataset validates every case) but a method must only read ``label[:labeled_bs]``.
"""
from collections import namedtuple

from dataloaders.samplers import RandomBatchSampler, TwoStreamBatchSampler
from dataloaders.transforms import Compose, RandomCrop, RandomRotFlip, SignedDistance, ToTensor
from utils.args import check_labelnum

TrainingData = namedtuple("TrainingData", ["train_set", "test_set", "sampler"])


def build_training_data(args, spec, semi_supervised=True, signed_distance=False, rot_flip=True):
    """``TrainingData(train_set, test_set, sampler)`` for ``args`` on the dataset described by ``spec``.

    With ``signed_distance`` each training sample also carries ``'sdf'``: for a labelled case the normalised
    signed distance map of its cropped label, for an unlabelled one NaN (``transforms.SignedDistance``).
    ``test_set`` is None with ``--no_eval``. Errors (missing data, a ``--labelnum`` that does not fit the
    list, a missing validation list with ``--val_interval``) are one-line ``UserError``/``DataError``.
    """
    train_ids = spec.dataset_class.list_ids(args.root_path, "train")
    check_labelnum(args, len(train_ids), semi_supervised)
    if args.val_interval:
        spec.dataset_class.list_ids(args.root_path, "val")  # a missing list fails now, before the run directory
    transforms = ([RandomRotFlip()] if rot_flip else []) + [RandomCrop(args.patch_size)]
    transforms += [SignedDistance(train_ids[:args.labelnum])] if signed_distance else []
    transform = Compose(transforms + [ToTensor()])
    train_set = spec.dataset_class(args.root_path, "train", num=None if semi_supervised else args.labelnum,
                                   transform=transform, cache=bool(args.cache))
    test_set = None if args.no_eval else spec.dataset_class(args.root_path, "test")
    labelled = range(args.labelnum)
    if semi_supervised:
        sampler = TwoStreamBatchSampler(labelled, range(args.labelnum, len(train_set)), args.batch_size,
                                        args.batch_size - args.labeled_bs, seed=args.seed)
    else:
        sampler = RandomBatchSampler(labelled, args.batch_size, seed=args.seed)
    return TrainingData(train_set, test_set, sampler)
