"""Crops, padding and augmentation; the two-stream sampler's batches and epochs; resumable streams."""
import itertools

import numpy as np
import pytest
import torch

from dataloaders.samplers import InfiniteBatches, RandomBatchSampler, TwoStreamBatchSampler, seed_worker
from dataloaders.transforms import (CenterCrop, Compose, RandomCrop, RandomNoise, RandomRotFlip, SignedDistance,
                                    ToTensor, pad_to_size)
from utils.errors import UserError
from utils.losses import compute_sdf


def volume(shape):
    image = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    return {"image": image, "label": (image % 3 == 0).astype(np.uint8)}


def test_no_padding_when_every_axis_is_larger():
    sample = volume((40, 40, 20))
    assert pad_to_size(sample, (32, 32, 16)) is sample


def test_padding_follows_the_anchors_rule():
    padded = pad_to_size(volume((20, 36, 10)), (32, 32, 16))
    # x: (32-20)//2+3 = 9 per side; y: max((32-36)//2+3, 0) = 1 per side; z: (16-10)//2+3 = 6 per side
    assert padded["image"].shape == (38, 38, 22)
    assert padded["image"][:9].max() == 0 and padded["label"][:, :, :6].max() == 0
    assert np.array_equal(padded["image"][9:29, 1:37, 6:16], volume((20, 36, 10))["image"])


def test_random_crop_shape_content_and_range():
    sample = volume((50, 44, 20))
    rng = np.random.RandomState(0)
    corners = set()
    for _ in range(200):
        out = RandomCrop((32, 32, 16))(sample, rng=rng)
        assert out["image"].shape == out["label"].shape == (32, 32, 16)
        x, y, z = np.unravel_index(int(out["image"][0, 0, 0]), (50, 44, 20))
        assert np.array_equal(out["image"], sample["image"][x:x + 32, y:y + 32, z:z + 16])
        assert np.array_equal(out["label"], sample["label"][x:x + 32, y:y + 32, z:z + 16])
        corners.add((x, y, z))
    xs = {c[0] for c in corners}
    assert min(xs) == 0 and max(xs) == 50 - 32 - 1  # randint(0, size - patch): upper bound excluded


def test_random_crop_of_a_small_volume_pads_first():
    out = RandomCrop((32, 32, 16))(volume((20, 20, 8)), rng=np.random.RandomState(1))
    assert out["image"].shape == (32, 32, 16)


def test_center_crop_is_centred():
    sample = volume((41, 40, 20))
    out = CenterCrop((32, 32, 16))(sample)
    x, y, z = round(9 / 2), 4, 2
    assert np.array_equal(out["image"], sample["image"][x:x + 32, y:y + 32, z:z + 16])


def test_rot_flip_keeps_image_and_label_aligned():
    sample = volume((16, 16, 8))
    for seed in range(8):
        out = RandomRotFlip()(sample, rng=np.random.RandomState(seed))
        assert np.array_equal(out["label"], (out["image"] % 3 == 0).astype(np.uint8))
        assert out["image"].shape == (16, 16, 8)


def test_noise_is_clipped_and_label_untouched():
    sample = {"image": np.zeros((16, 16, 8), np.float32), "label": np.ones((16, 16, 8), np.uint8)}
    out = RandomNoise(sigma=0.1)(sample, rng=np.random.RandomState(0))
    assert np.abs(out["image"]).max() <= 0.2 + 1e-7 and out["image"].std() > 0.05
    assert out["label"] is sample["label"]


def test_same_rng_seed_same_augmentation():
    pipeline = Compose([RandomRotFlip(), RandomCrop((16, 16, 8)), RandomNoise(), ToTensor()])
    sample = volume((30, 30, 12))
    a = pipeline(sample, rng=np.random.RandomState(7))
    b = pipeline(sample, rng=np.random.RandomState(7))
    c = pipeline(sample, rng=np.random.RandomState(8))
    assert torch.equal(a["image"], b["image"]) and not torch.equal(a["image"], c["image"])
    assert a["image"].shape == (1, 16, 16, 8) and a["label"].dtype == torch.long


def test_signed_distance_only_for_labelled_cases():
    """The labelled crops get compute_sdf's map; the unlabelled ones NaN, so a loss that reads them is NaN."""
    label = np.zeros((16, 16, 8), np.uint8)
    label[4:12, 4:12, 2:6] = 1
    expected = compute_sdf(label[None], (1, 16, 16, 8))[0]
    transform = SignedDistance(labelled_cases=["a"])
    labelled = transform({"image": label.astype(np.float32), "label": label, "case": "a"})
    unlabelled = transform({"image": label.astype(np.float32), "label": label, "case": "b"})
    assert np.array_equal(labelled["sdf"], expected) and expected.min() < 0 < expected.max()
    assert unlabelled["sdf"].shape == label.shape and np.isnan(unlabelled["sdf"]).all()
    everyone = SignedDistance()({"image": label.astype(np.float32), "label": label, "case": "b"})
    assert np.array_equal(everyone["sdf"], expected)


def test_two_stream_batches_put_labelled_first():
    sampler = TwoStreamBatchSampler(range(8), range(8, 80), batch_size=4, secondary_batch_size=2, seed=1)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 4
    for batch in batches:
        assert len(batch) == 4 and all(i < 8 for i in batch[:2]) and all(i >= 8 for i in batch[2:])
    assert sorted(i for b in batches for i in b[:2]) == list(range(8))  # one pass over the labelled set


def test_two_stream_drops_incomplete_batch_and_cycles_unlabelled():
    sampler = TwoStreamBatchSampler(range(5), range(5, 8), batch_size=4, secondary_batch_size=2)
    batches = list(sampler)
    assert len(batches) == 2  # 5 labelled // 2
    unlabelled = [i for b in batches for i in b[2:]]
    assert len(set(unlabelled[:3])) == 3  # a full permutation before repeating


def test_two_stream_epochs_are_seeded():
    sampler = TwoStreamBatchSampler(range(16), range(16, 64), 4, 2, seed=3)
    first = list(sampler)
    assert list(sampler) == first
    sampler.set_epoch(1)
    assert list(sampler) != first
    other = TwoStreamBatchSampler(range(16), range(16, 64), 4, 2, seed=4)
    assert list(other) != first


@pytest.mark.parametrize("primary, secondary, bs, sbs, message", [
    (range(8), range(8, 20), 4, 0, "smaller than batch_size"),
    (range(8), range(8, 20), 2, 2, "at least 1"),
    (range(1), range(1, 20), 4, 2, "cannot fill a labelled batch"),
    (range(8), range(8, 9), 4, 2, "cannot fill an unlabelled batch"),
])
def test_two_stream_rejects_impossible_batches(primary, secondary, bs, sbs, message):
    with pytest.raises(UserError, match=message):
        TwoStreamBatchSampler(primary, secondary, bs, sbs)


def test_random_batch_sampler_epoch():
    sampler = RandomBatchSampler(range(10), 4, seed=0)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 2 and len(set(i for b in batches for i in b)) == 8
    with pytest.raises(UserError, match="cannot fill a batch"):
        RandomBatchSampler(range(3), 4)


def test_infinite_batches_resume_equals_uninterrupted_stream():
    def stream(start):
        sampler = TwoStreamBatchSampler(range(6), range(6, 30), 4, 2, seed=5)
        return list(itertools.islice(InfiniteBatches(sampler, seed=5, start_iteration=start), 20 - start))

    full = stream(0)
    assert stream(7) == full[7:]
    assert stream(3) == full[3:]
    seeds = [seed for batch in full for _, seed in batch]
    assert len(set(seeds)) == len(seeds)  # every sample gets its own augmentation seed
    indices = [[i for i, _ in batch] for batch in full]
    assert indices[0:3] != indices[3:6]  # epochs (3 batches each) differ


def test_seed_worker_seeds_numpy_per_worker():
    torch.manual_seed(10)
    seed_worker(0)
    a = np.random.rand()
    torch.manual_seed(11)
    seed_worker(0)
    assert np.random.rand() != a
