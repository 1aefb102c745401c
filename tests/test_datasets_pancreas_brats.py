"""Pancreas-CT and BraTS-2019: raw-data conversion, the datasets, per-dataset defaults and training on both.

Raw inputs are synthetic and tiny, written in the formats of the real releases: NIfTI files with a real
affine (non-isotropic spacing, an origin, a label stored in another orientation than its CT), a DICOM
series written slice by slice with SimpleITK, and BraTS case folders with every modality.
"""
import json
import shutil

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import TINY, assert_one_line_error, call_main, read_summary, run_main
from dataloaders.brats2019 import BraTS2019
from dataloaders.brats_processing import convert_brats
from dataloaders.brats_processing import main as brats_main
from dataloaders.h5_dataset import read_list, write_list
from dataloaders.pancreas import Pancreas
from dataloaders.pancreas_processing import convert_pancreas
from dataloaders.pancreas_processing import main as pancreas_main
from dataloaders.registry import get_dataset_spec
from dataloaders.resample import resample_volume
from networks.net_factory_3d import net_factory_3d
from utils.args import finalize_args, training_parser
from utils.cli import REPO_ROOT
from utils.errors import UserError
from utils.evaluation import eval_mode, validation_dice

SHARED = REPO_ROOT.parent / "shared" / "data"
CT_SHAPE, CT_SPACING, CT_ORIGIN = (40, 40, 30), (0.8, 0.8, 1.5), (-16.0, -20.0, 100.0)
RESAMPLED = (32, 32, 45)  # round(size * spacing)
CROP = {"crop_min_size": 16, "crop_margin": 4}
# z slabs of the synthetic CT, raw slices (start, stop) and HU: both ends of the window and beyond them, then
# soft tissue holding the pancreas in slices 21-25.
SLABS = {"air": (0, 5, -1000), "below_window": (5, 10, -300), "bone": (10, 15, 1000), "above_window": (15, 20, 500),
         "tissue": (20, 30, 40)}
PANCREAS_HU, PANCREAS_Z = 100, (21, 26)
# Pancreas corner (x, y) by case number % 4: cases 1 and 5 share theirs; labels stored x-reversed (even cases)
# sit off the volume's centre, so that a label left reversed would miss its pancreas.
PANCREAS_XY = [(14, 13), (15, 14), (16, 13), (14, 14)]
BRATS_SHAPE = (40, 40, 30)
MRI_OUTLIER = 5000.0
TRAIN_ARGS = [*TINY, "--max_iterations", "2", "--labelnum", "2"]


# ---------------------------------------------------------------- synthetic raw data


def ct_case(number):
    """``(HU int16, label uint8)`` indexed (x, y, z): z slabs (see SLABS) and a pancreas box in the tissue."""
    hu = np.zeros(CT_SHAPE, np.int16)
    for start, stop, value in SLABS.values():
        hu[:, :, start:stop] = value
    label = np.zeros(CT_SHAPE, np.uint8)
    x0, y0 = PANCREAS_XY[number % 4]
    label[x0:x0 + 10, y0:y0 + 12, slice(*PANCREAS_Z)] = 1
    hu[label == 1] = PANCREAS_HU
    return hu, label


def affine(spacing=CT_SPACING, origin=CT_ORIGIN):
    return np.diag([*spacing, 1.0]) + np.pad(np.array(origin)[:, None], ((0, 1), (3, 0)))


def write_nifti(path, volume, matrix):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(volume, matrix), str(path))
    return path


def write_flipped_nifti(path, volume, matrix):
    """The same physical volume stored with x reversed (the header says so): another orientation on disk."""
    flip = np.eye(4)
    flip[0, 0], flip[0, 3] = -1, volume.shape[0] - 1
    return write_nifti(path, np.ascontiguousarray(volume[::-1]), matrix @ flip)


def sitk_volume(volume, spacing=CT_SPACING, origin=CT_ORIGIN):
    """A SimpleITK image of an (x, y, z) array, identity direction (LPS)."""
    image = sitk.GetImageFromArray(np.transpose(volume, (2, 1, 0)))
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    return image


def write_dicom_series(folder, hu):
    """A CT series, one file per slice, named in reverse slice order (the reader must sort by position)."""
    folder.mkdir(parents=True)
    image = sitk_volume(hu)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    depth = image.GetDepth()
    for k in range(depth):
        slice_k = image[:, :, k]
        position = image.TransformIndexToPhysicalPoint((0, 0, k))
        tags = {"0008|0060": "CT", "0020|000e": "1.2.826.0.1.3680043.2.1125.7", "0020|0013": str(k + 1),
                "0020|0032": "\\".join(f"{p:g}" for p in position), "0020|0037": "1\\0\\0\\0\\1\\0",
                "0018|0050": f"{CT_SPACING[2]:g}"}
        for tag, value in tags.items():
            slice_k.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"1-{depth - k:03d}.dcm"))
        writer.Execute(slice_k)


def write_pancreas_raw(root, ids, dicom=()):
    """TCIA-like raw folders: CTs as NIfTI ``PANCREAS_000N.nii.gz`` or (``dicom``) DICOM series under
    ``PANCREAS_000N/<study>/<series>/``; labels ``label000N.nii.gz``, stored x-reversed for even cases."""
    images, labels = root / "Pancreas-CT", root / "TCIA_pancreas_labels-02-05-2017"
    for number in ids:
        hu, label = ct_case(number)
        if number in dicom:
            write_dicom_series(images / f"PANCREAS_{number:04d}" / "study" / "series", hu)
            sitk.WriteImage(sitk_volume(label), str(labels / f"label{number:04d}.nii.gz"))
            continue
        write_nifti(images / f"PANCREAS_{number:04d}.nii.gz", hu, affine())
        write_label = write_flipped_nifti if number % 2 == 0 else write_nifti
        write_label(labels / f"label{number:04d}.nii.gz", label, affine())
    return images, labels


def mri_case(index, rng):
    """``(modalities {name: float32}, seg uint8)`` of a BraTS-like case: an ellipsoidal brain of positive
    intensities (a few outliers above the 99.9th percentile) in zeros, a tumour with labels 1, 2 and 4."""
    grid = np.indices(BRATS_SHAPE).astype(float)
    centre = np.array([20, 19 + index % 2, 15])[:, None, None, None]
    radii = np.array([15, 14, 11])[:, None, None, None]
    brain = (((grid - centre) / radii) ** 2).sum(axis=0) <= 1
    flair = np.where(brain, rng.uniform(100, 400, BRATS_SHAPE), 0).astype(np.float32)
    outliers = tuple(np.argwhere(brain)[rng.choice(brain.sum(), 3, replace=False)].T)
    flair[outliers] = MRI_OUTLIER
    seg = np.zeros(BRATS_SHAPE, np.uint8)
    seg[16:26, 14:22, 10:18] = 2
    seg[18:23, 16:20, 12:16] = 1
    seg[20:22, 17:19, 13:15] = 4
    flair[seg > 0] += 300
    others = {name: np.where(brain, rng.uniform(0, 50, BRATS_SHAPE), 0).astype(np.float32)
              for name in ("t1", "t1ce", "t2")}
    return {"flair": flair, **others}, seg


def write_brats_case(src, case_id, index, skip=()):
    """One case folder ``<src>/HGG/<case_id>/<case_id>_<kind>.nii.gz`` (1 mm, as BraTS), minus ``skip``."""
    modalities, seg = mri_case(index, np.random.default_rng(index))
    folder = src / "HGG" / case_id
    for kind, volume in {**modalities, "seg": seg}.items():
        if kind not in skip:
            write_nifti(folder / f"{case_id}_{kind}.nii.gz", volume, affine((1.0, 1.0, 1.0), (0.0, -239.0, 0.0)))
    return modalities, seg


BRATS_IDS = [f"BraTS19_TCIA01_{100 + i}_1" for i in range(7)]


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def pancreas_raw(tmp_path_factory):
    """Six raw cases: 1-4 and 6 NIfTI (even labels stored x-reversed), 5 a DICOM series."""
    return write_pancreas_raw(tmp_path_factory.mktemp("pancreas_raw"), range(1, 7), dicom=(5,))


@pytest.fixture(scope="module")
def pancreas_root(pancreas_raw, tmp_path_factory):
    """The six cases converted with a seeded 4 / 2 split."""
    return convert_pancreas(*pancreas_raw, tmp_path_factory.mktemp("converted") / "Pancreas",
                            counts={"train": 4, "test": 2}, seed=3, **CROP)


@pytest.fixture(scope="module")
def brats_raw(tmp_path_factory):
    src = tmp_path_factory.mktemp("brats_raw") / "MICCAI_BraTS_2019_Data_Training"
    cases = {case_id: write_brats_case(src, case_id, index) for index, case_id in enumerate(BRATS_IDS)}
    return src, cases


@pytest.fixture(scope="module")
def brats_root(brats_raw, tmp_path_factory):
    """The seven cases converted with a seeded 4 / 1 / 2 split."""
    return convert_brats(brats_raw[0], tmp_path_factory.mktemp("converted") / "BraTS2019",
                         counts={"train": 4, "val": 1, "test": 2}, seed=5)


def h5(dataset_class, root, case_id):
    """``(image, label)`` of a converted case, read through the dataset class."""
    split = next(split for split in dataset_class.SPLIT_FILES if case_id in dataset_class.list_ids(root, split))
    dataset = dataset_class(root, split, case_ids=[case_id])
    sample = dataset.load(0)
    return sample["image"], sample["label"]


def one_line_error(main, argv):
    """Run a CLI ``main`` in-process; assert exit 2 with one ``error:`` line on stderr; return it."""
    proc = call_main(main, *argv)
    assert_one_line_error(proc)
    return proc.stderr.strip()


# ---------------------------------------------------------------- Pancreas conversion


def resampled_plane(image, raw_z):
    """The output plane at raw slice coordinate ``raw_z`` (z is resampled from 1.5 mm to 1 mm, not cropped)."""
    plane = image[:, :, round((raw_z + 0.5) * CT_SPACING[2] - 0.5)]
    assert np.ptp(plane) < 1e-5, "a slab plane should be constant"
    return float(plane.mean())


def test_pancreas_window_scaling_resampling_crop_and_zscore(pancreas_root):
    image, label = h5(Pancreas, pancreas_root, "image0001")
    info = json.loads((pancreas_root / "preprocess.json").read_text())["cases"]["image0001"]
    assert info["source_spacing"] == list(CT_SPACING) and info["resampled_shape"] == list(RESAMPLED)
    assert image.shape[2] == RESAMPLED[2] and image.dtype == np.float32 and label.dtype == np.uint8
    assert abs(image.mean()) < 1e-4 and abs(image.std() - 1) < 1e-4

    # HU window [-125, 275], scaled linearly: values beyond it equal its ends, values inside keep their place.
    air, below = resampled_plane(image, 2), resampled_plane(image, 7)
    bone, above = resampled_plane(image, 12), resampled_plane(image, 17)
    tissue, pancreas = resampled_plane(image, 27.5), image[label == 1].max()
    assert below == pytest.approx(air, abs=1e-5) and above == pytest.approx(bone, abs=1e-5)
    assert (tissue - air) / (bone - air) == pytest.approx((40 + 125) / 400, abs=1e-4)
    assert (pancreas - air) / (bone - air) == pytest.approx((PANCREAS_HU + 125) / 400, abs=1e-4)

    # The crop: the label's x/y extent widened to 16, plus 4 on each side; z whole, no label voxel lost.
    _, raw_label = ct_case(1)
    assert label.sum() == resample_volume(raw_label, RESAMPLED, "nearest-exact").sum() == info["foreground_voxels"]
    for axis in (0, 1):
        present = np.flatnonzero(label.any(axis=tuple({0, 1, 2} - {axis})))
        low, high = present[0], present[-1] + 1
        widen = max(CROP["crop_min_size"] - (high - low), 0)
        assert low == widen // 2 + CROP["crop_margin"]
        assert image.shape[axis] - high == widen - widen // 2 + CROP["crop_margin"] < RESAMPLED[axis] - high


def test_pancreas_label_lands_on_its_ct_whatever_its_orientation_or_format(pancreas_root):
    """Even cases' labels are stored x-reversed and case 5 is a DICOM series: in every case the label covers
    the pancreas (the brightest tissue) and nothing else."""
    for number in range(1, 7):
        image, label = h5(Pancreas, pancreas_root, f"image{number:04d}")
        pancreas = np.isclose(image, image[label == 1].max(), atol=1e-4)
        assert not (pancreas & (label == 0)).any() and pancreas.sum() > 0.3 * label.sum()


def test_pancreas_dicom_and_nifti_give_the_same_case(pancreas_root):
    """Cases 1 (NIfTI) and 5 (DICOM, files named in reverse slice order) hold the same CT: same shape, label
    and values, slices in the same order; x and y may be mirrored (the NIfTI's header is RAS)."""
    nifti, dicom = (h5(Pancreas, pancreas_root, case_id) for case_id in ("image0001", "image0005"))
    assert nifti[0].shape == dicom[0].shape and nifti[1].sum() == dicom[1].sum()
    np.testing.assert_allclose(nifti[0].mean(axis=(0, 1)), dicom[0].mean(axis=(0, 1)), atol=1e-5)
    np.testing.assert_allclose(np.sort(nifti[0], axis=None), np.sort(dicom[0], axis=None), atol=1e-5)


def test_pancreas_seeded_split_and_dataset(pancreas_root, pancreas_raw, tmp_path):
    train, test = read_list(pancreas_root / "train.list"), read_list(pancreas_root / "test.list")
    assert len(train) == 4 and len(test) == 2 and sorted(train + test) == [f"image{i:04d}" for i in range(1, 7)]
    dataset = Pancreas(pancreas_root, "train", num=2, cache=True)
    assert len(dataset) == 2 and list(dataset.stats) == train[:2] and dataset[(1, 7)]["case"] == train[1]
    again = convert_pancreas(*pancreas_raw, tmp_path / "again", counts={"train": 4, "test": 2}, seed=3, **CROP)
    assert read_list(again / "train.list") == train


def test_pancreas_split_dir_converts_only_the_listed_cases(pancreas_raw, tmp_path):
    lists = tmp_path / "lists"
    lists.mkdir()
    write_list(lists / "train.list", ["image0004", "image0002"])
    write_list(lists / "test.list", ["image0005"])
    out = convert_pancreas(*pancreas_raw, tmp_path / "out", split_dir=lists, **CROP)
    assert read_list(out / "train.list") == ["image0004", "image0002"]
    assert sorted(p.name for p in (out / "Pancreas_h5").iterdir()) == [
        "image0002_norm.h5", "image0004_norm.h5", "image0005_norm.h5"]


def test_shared_split_lists_have_the_papers_sizes():
    """The DTC / MC-Net and SSL4MIS lists that --split_dir takes, read as the datasets read them."""
    if not (SHARED / "Pancreas" / "train.list").is_file() or not (SHARED / "BraTS2019" / "val.txt").is_file():
        pytest.skip(f"split lists not found under {SHARED}")
    pancreas = {split: len(Pancreas.list_ids(SHARED / "Pancreas", split)) for split in Pancreas.SPLIT_FILES}
    brats = {split: len(BraTS2019.list_ids(SHARED / "BraTS2019", split)) for split in BraTS2019.SPLIT_FILES}
    assert pancreas == {"train": 62, "test": 20} and brats == {"train": 250, "val": 25, "test": 60}


# ---------------------------------------------------------------- BraTS conversion


def test_brats_flair_only_whole_tumour_brain_box_clip_and_zscore(brats_root, brats_raw):
    record = json.loads((brats_root / "preprocess.json").read_text())
    for case_id in BRATS_IDS[:3]:
        modalities, seg = brats_raw[1][case_id]
        flair = modalities["flair"]
        brain = flair != 0
        corner, end = np.argwhere(brain).min(axis=0), np.argwhere(brain).max(axis=0) + 1
        box = tuple(slice(int(a), int(b)) for a, b in zip(corner, end))
        image, label = h5(BraTS2019, brats_root, case_id)
        assert image.shape == flair[box].shape and record["cases"][case_id]["crop"] == [[s.start, s.stop] for s in box]
        np.testing.assert_array_equal(label, seg[box] > 0)
        clip = np.percentile(flair[box], 99.9)
        assert clip < MRI_OUTLIER and record["cases"][case_id]["clip_value"] == pytest.approx(clip)
        assert np.isclose(image, image.max()).sum() >= 3  # the outliers, clipped to one value
        clipped, in_brain = np.minimum(flair[box], clip), brain[box]
        expected = (clipped - clipped[in_brain].mean()) / clipped[in_brain].std()
        np.testing.assert_allclose(image, expected, atol=1e-4)  # from the FLAIR alone
        assert abs(image[in_brain].mean()) < 1e-4 and abs(image[in_brain].std() - 1) < 1e-4


def test_brats_seeded_split_dataset_and_split_dir(brats_root, brats_raw, tmp_path):
    lists = {split: read_list(brats_root / name) for split, name in BraTS2019.SPLIT_FILES.items()}
    assert [len(ids) for ids in lists.values()] == [4, 1, 2] and sorted(sum(lists.values(), [])) == BRATS_IDS
    assert BraTS2019(brats_root, "val").case_ids == lists["val"]
    split_dir = tmp_path / "lists"
    split_dir.mkdir()
    for name, ids in (("train.txt", BRATS_IDS[:2]), ("val.txt", BRATS_IDS[2:3]), ("test.txt", BRATS_IDS[3:4])):
        write_list(split_dir / name, ids)
    out = convert_brats(brats_raw[0], tmp_path / "out", split_dir=split_dir)
    assert sorted(p.stem for p in (out / "data").iterdir()) == BRATS_IDS[:4]
    assert (out / "val.txt").read_text() == (split_dir / "val.txt").read_text()


# ---------------------------------------------------------------- bad raw inputs


@pytest.mark.parametrize("problem, fragment", [
    ("no_flair", f"no {BRATS_IDS[2]}_flair.nii.gz in "),
    ("no_seg", f"no {BRATS_IDS[2]}_seg.nii.gz in "),
    ("shape", "has shape (40, 40, 30) but the segmentation"),
    ("empty", "has no foreground voxels"),
])
def test_brats_bad_raw_case_is_one_line_naming_it(problem, fragment, tmp_path):
    src = tmp_path / "raw"
    for index, case_id in enumerate(BRATS_IDS[:3]):
        write_brats_case(src, case_id, index, skip={"no_flair": ("flair",), "no_seg": ("seg",)}.get(problem, ())
                         if index == 2 else ())
    bad_seg = {"shape": np.ones((40, 40, 28), np.uint8), "empty": np.zeros(BRATS_SHAPE, np.uint8)}.get(problem)
    if bad_seg is not None:
        write_nifti(src / "HGG" / BRATS_IDS[2] / f"{BRATS_IDS[2]}_seg.nii.gz", bad_seg, affine((1.0, 1.0, 1.0)))
    line = one_line_error(brats_main, ["--src", src, "--out", tmp_path / "out", "--num_train", 1,
                                       "--num_val", 1, "--num_test", 1])
    assert f"case {BRATS_IDS[2]}: " in line and fragment in line, line
    assert not (tmp_path / "out" / "train.txt").exists()


@pytest.mark.parametrize("problem, fragment", [
    ("no_ct", "no CT under"),
    ("no_label", "no label0003.nii.gz under"),
    ("shape", "voxels but the label"),
    ("empty", "has no foreground voxels"),
])
def test_pancreas_bad_raw_case_is_one_line_naming_it(problem, fragment, tmp_path):
    images, labels = write_pancreas_raw(tmp_path, (1, 2, 3))
    hu, label = ct_case(3)
    if problem == "no_ct":
        (images / "PANCREAS_0003.nii.gz").unlink()
    elif problem == "no_label":
        (labels / "label0003.nii.gz").unlink()
    else:
        bad = label[:, :, :-2] if problem == "shape" else np.zeros_like(label)
        write_nifti(labels / "label0003.nii.gz", bad, affine())
    line = one_line_error(pancreas_main, ["--images", images, "--labels", labels, "--out", tmp_path / "out",
                                          "--num_train", 2, "--num_test", 1])
    assert "case image0003: " in line and fragment in line, line
    assert not (tmp_path / "out" / "train.list").exists()


def test_conversion_flag_errors_are_one_line(pancreas_raw, brats_raw, tmp_path):
    images, labels = pancreas_raw
    line = one_line_error(pancreas_main, ["--images", images, "--labels", labels, "--out", tmp_path / "a"])
    assert "6 cases found" in line and "62 train + 20 test" in line
    line = one_line_error(brats_main, ["--src", brats_raw[0], "--out", tmp_path / "b", "--num_train", 5,
                                       "--num_val", 0, "--num_test", 2])
    assert "--num_val must be at least 1" in line
    line = one_line_error(brats_main, ["--src", tmp_path / "nowhere", "--out", tmp_path / "c"])
    assert "not found" in line
    empty_lists = tmp_path / "lists"
    empty_lists.mkdir()
    line = one_line_error(pancreas_main, ["--images", images, "--labels", labels, "--out", tmp_path / "d",
                                          "--split_dir", empty_lists])
    assert "train.list" in line and "not found" in line
    assert not any((tmp_path / name).exists() for name in "abcd")


# ---------------------------------------------------------------- defaults and training


@pytest.mark.parametrize("dataset, patch, strides, labelnum", [("LA", [112, 112, 80], (18, 4), 8),
                                                               ("Pancreas", [96, 96, 96], (16, 16), 6),
                                                               ("BraTS2019", [96, 96, 96], (64, 64), 25)])
def test_dataset_defaults_and_a_methods_own_patch(dataset, patch, strides, labelnum):
    import train_ucseg_3D

    parser = training_parser("test", exp="Test", max_iterations=10, batch_size=4, base_lr=0.01)
    args = finalize_args(parser.parse_args(["--dataset", dataset]), get_dataset_spec(dataset))
    assert args.patch_size == patch and (args.stride_xy, args.stride_z) == strides and args.labelnum == labelnum
    assert finalize_args(parser.parse_args(["--dataset", dataset, "--labelnum", "3"]),
                         get_dataset_spec(dataset)).labelnum == 3
    assert args.root_path == str(REPO_ROOT / "data" / dataset) and args.exp == f"{dataset}/Test"
    ucseg = finalize_args(train_ucseg_3D.get_parser().parse_args(["--dataset", dataset]), get_dataset_spec(dataset))
    assert ucseg.patch_size == [96, 96, 96] and (ucseg.stride_xy, ucseg.stride_z) == strides
    given = finalize_args(parser.parse_args(["--dataset", dataset, "--patch_size", "32", "32", "64",
                                             "--stride_xy", "8"]), get_dataset_spec(dataset))
    assert given.patch_size == [32, 32, 64] and (given.stride_xy, given.stride_z) == (8, strides[1])


def train(script, dataset, root, out, *flags):
    """Two iterations of ``script`` on a converted dataset; the run directory."""
    run_main(script, "--dataset", dataset, "--root_path", root, "--output_root", out, *TRAIN_ARGS, *flags, check=True)
    return next(out.rglob("config.json")).parent


def test_pancreas_supervised_and_mean_teacher_train_and_evaluate(pancreas_root, tmp_path):
    run = train("train_supervised_3D.py", "Pancreas", pancreas_root, tmp_path / "sup")
    assert run == tmp_path / "sup" / "Pancreas" / "Supervised_2" / "vnet"
    assert read_summary(run / "eval_iter_2")["num_cases"] == 2
    run = train("train_mt_3D.py", "Pancreas", pancreas_root, tmp_path / "mt", "--labeled_bs", "1")
    assert "iteration 2 : loss : " in (run / "log.txt").read_text()
    assert read_summary(run / "eval_iter_2")["protocol"]["stride_z"] == 8


def test_brats_training_periodic_validation_and_test_3d_on_val(brats_root, tmp_path):
    run = train("train_supervised_3D.py", "BraTS2019", brats_root, tmp_path / "sup", "--no_eval",
                "--val_interval", "1")
    log = (run / "log.txt").read_text()
    assert "iteration 1 : val_dice : " in log and "iteration 2 : val_dice : " in log and "1 cases of val.txt" in log
    run_main("test_3D.py", "--run", run, "--split", "val", "--progress", "0", check=True)
    summary = read_summary(run / "eval_iter_2")
    assert summary["num_cases"] == 1 and summary["protocol"]["split"] == "val"
    run = train("train_mt_3D.py", "BraTS2019", brats_root, tmp_path / "mt", "--labeled_bs", "1", "--val_interval", "2")
    assert "iteration 2 : val_dice : " in (run / "log.txt").read_text()
    assert read_summary(run / "eval_iter_2")["num_cases"] == 2


def test_validation_leaves_the_networks_and_random_state_as_they_were(brats_root):
    """What makes ``--val_interval`` harmless: eval mode only meanwhile (every module's own mode back, a
    teacher's train mode included), no parameter or batch-norm statistic touched, no RNG drawn."""
    torch.manual_seed(0)
    nets = {name: net_factory_3d("vnet", in_chns=1, class_num=2, normalization="batchnorm", has_dropout=True)
            for name in ("model", "ema_model")}
    next(m for m in nets["ema_model"].modules() if isinstance(m, torch.nn.Dropout3d)).eval()
    modes = [module.training for net in nets.values() for module in net.modules()]
    weights = {name: {k: v.clone() for k, v in net.state_dict().items()} for name, net in nets.items()}
    torch_rng, numpy_rng = torch.get_rng_state(), np.random.get_state()[1].copy()
    with eval_mode(nets):
        assert not any(module.training for net in nets.values() for module in net.modules())
        dice = validation_dice(lambda x: torch.softmax(nets["model"](x), dim=1), BraTS2019(brats_root, "val"),
                               patch_size=(32, 32, 16), stride_xy=16, stride_z=8, num_classes=2,
                               device=torch.device("cpu"))
    assert 0 <= dice <= 1
    assert [module.training for net in nets.values() for module in net.modules()] == modes
    assert all(torch.equal(value, weights[name][key]) for name, net in nets.items()
               for key, value in net.state_dict().items())
    assert torch.equal(torch.get_rng_state(), torch_rng) and np.array_equal(np.random.get_state()[1], numpy_rng)
    with pytest.raises(RuntimeError), eval_mode(nets):
        raise RuntimeError("a failing validation")
    assert [module.training for net in nets.values() for module in net.modules()] == modes


def test_val_interval_needs_a_validation_list(pancreas_root, brats_root, tmp_path):
    import train_supervised_3D

    argv = ["--dataset", "Pancreas", "--root_path", str(pancreas_root), "--output_root", str(tmp_path / "model"),
            *TRAIN_ARGS, "--val_interval", "5"]
    assert "has no validation list" in one_line_error(train_supervised_3D.main, argv)
    no_val = shutil.copytree(brats_root, tmp_path / "BraTS2019")
    (no_val / "val.txt").unlink()
    argv = ["--dataset", "BraTS2019", "--root_path", str(no_val), "--output_root", str(tmp_path / "model"),
            *TRAIN_ARGS, "--val_interval", "5"]
    assert "val.txt not found" in one_line_error(train_supervised_3D.main, argv)
    with pytest.raises(UserError, match="--val_interval must be >= 0"):
        finalize_args(training_parser("test", exp="Test", max_iterations=1, batch_size=4, base_lr=0.01).parse_args(
            ["--val_interval", "-1"]), get_dataset_spec("LA"))
    assert not (tmp_path / "model").exists()
