"""Tests of the data-preparation scripts: the synthetic dataset writer and the resampler."""
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from scipy import ndimage

from conftest import REAL_LA, REAL_LA_ABSENT
from dataloaders.h5io import read_case, write_case
from dataloaders.la_heart import CASE_DIR, CASE_FILE, case_path, read_list, write_list
from dataloaders.resample import main as resample_main
from dataloaders.resample import resample_dataset
from dataloaders.synthetic import main as synthetic_main
from dataloaders.synthetic import make_synthetic_dataset
from utils.cli import run_cli
from utils.errors import DataError, UserError

REPO_ROOT = Path(__file__).resolve().parents[1]
SYNTHETIC_SCRIPT = REPO_ROOT / "code" / "dataloaders" / "synthetic.py"
SHAPE = (64, 64, 32)
NUM_CASES, NUM_TEST = 12, 4
TINY = {"num_cases": 3, "num_test": 1, "shape": (32, 32, 16)}


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory):
    """The 12-case synthetic dataset of 64x64x32 that the synthetic and resample tests share."""
    return make_synthetic_dataset(tmp_path_factory.mktemp("synthetic") / "LA", NUM_CASES, NUM_TEST, SHAPE)


@pytest.fixture(scope="module")
def synthetic_cases(synthetic_root):
    """``{id: (image, label)}`` of every case of the shared synthetic dataset."""
    ids = read_list(synthetic_root / "train.list") + read_list(synthetic_root / "test.list")
    return {case_id: read_case(case_path(synthetic_root, case_id)) for case_id in ids}


def run_script(script, *args, cwd):
    """Run a script as a user would, from ``cwd``; return the completed process."""
    return subprocess.run([sys.executable, str(script), *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def error_lines(stderr):
    """Non-blank lines of stderr (errors are reported before any progress bar starts)."""
    return [line for line in stderr.splitlines() if line.strip()]


def ellipsoid_dice(mask):
    """Dice between a mask and the solid ellipsoid with the same centroid and second moments:
    about 1 for any ellipsoid (a sphere included), clearly lower for a lobed shape."""
    points = np.argwhere(mask).astype(float)
    centre = points.mean(axis=0)
    variances, axes = np.linalg.eigh(np.cov(points.T))
    grid = np.indices(mask.shape).reshape(3, -1).T - centre
    ellipsoid = ((((grid @ axes) ** 2) / (5 * variances)).sum(axis=1) <= 1).reshape(mask.shape)
    return 2 * (ellipsoid & mask).sum() / (ellipsoid.sum() + mask.sum())


def dice(prediction, truth):
    """Dice overlap of two boolean masks."""
    return 2 * (prediction & truth).sum() / (prediction.sum() + truth.sum())


# ---------------------------------------------------------------- synthetic dataset


def test_synthetic_layout(synthetic_root):
    ids = [f"synth_{i:03d}" for i in range(NUM_CASES)]
    assert read_list(synthetic_root / "train.list") == ids[:-NUM_TEST]
    assert read_list(synthetic_root / "test.list") == ids[-NUM_TEST:]
    for case_id in ids:
        path = synthetic_root / CASE_DIR / case_id / CASE_FILE
        with h5py.File(path, "r") as handle:
            assert set(handle.keys()) == {"image", "label"}
            assert handle["image"].dtype == np.float32
            assert handle["label"].dtype == np.uint8


def test_synthetic_labels_and_shapes(synthetic_cases):
    shapes = {image.shape for image, _ in synthetic_cases.values()}
    assert {shape[2] for shape in shapes} == {SHAPE[2]}
    assert len({shape[:2] for shape in shapes}) > 1
    for image, label in synthetic_cases.values():
        assert set(np.unique(label)) == {0, 1}
        assert 0.05 <= label.mean() <= 0.25
        assert ndimage.label(label)[1] == 1
        border = np.ones(label.shape, bool)
        border[1:-1, 1:-1, 1:-1] = False
        assert not label[border].any()


def test_ellipsoid_check_accepts_ellipsoids():
    grid = np.indices((48, 48, 32)) - np.array([24, 22, 16])[:, None, None, None]
    sphere = (grid ** 2).sum(axis=0) <= 12 ** 2
    ellipsoid = ((grid / np.array([15, 9, 6])[:, None, None, None]) ** 2).sum(axis=0) <= 1
    assert ellipsoid_dice(sphere) > 0.95
    assert ellipsoid_dice(ellipsoid) > 0.95


def test_synthetic_shapes_are_lobed(synthetic_cases):
    scores = [ellipsoid_dice(label.astype(bool)) for _, label in synthetic_cases.values()]
    assert np.median(scores) < 0.92


def test_synthetic_image_zscored_and_contrasted(synthetic_cases):
    for image, label in synthetic_cases.values():
        assert abs(image.mean()) < 1e-3 and abs(image.std() - 1) < 1e-3
        assert image[label == 1].mean() > image[label == 0].mean() + 0.5


def test_synthetic_not_separable_by_one_threshold(synthetic_cases):
    best = []
    for image, label in synthetic_cases.values():
        thresholds = np.quantile(image, np.linspace(0.5, 0.995, 60))
        best.append(max(dice(image > t, label.astype(bool)) for t in thresholds))
    assert np.mean(best) < 0.9


def test_synthetic_deterministic_by_seed(tmp_path):
    first, again, other = (make_synthetic_dataset(tmp_path / name, seed=seed, **TINY)
                           for name, seed in [("a", 0), ("b", 0), ("c", 1)])
    for case_id in read_list(first / "train.list") + read_list(first / "test.list"):
        image, label = read_case(case_path(first, case_id))
        image_again, label_again = read_case(case_path(again, case_id))
        image_other, _ = read_case(case_path(other, case_id))
        np.testing.assert_array_equal(image, image_again)
        np.testing.assert_array_equal(label, label_again)
        assert image.shape != image_other.shape or not np.array_equal(image, image_other)
    for name in ("train.list", "test.list"):
        assert (first / name).read_text() == (again / name).read_text()


def test_synthetic_cli_refuses_non_empty_folder_and_overwrites_only_its_files(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.md").write_text("keep me\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    args = ["--out", out, "--num_cases", 2, "--num_test", 1, "--shape", 16, 16, 16]
    refused = run_script(SYNTHETIC_SCRIPT, *args, cwd=elsewhere)
    assert refused.returncode == 2
    assert len(error_lines(refused.stderr)) == 1 and refused.stderr.startswith("error:")
    assert "--overwrite" in refused.stderr
    assert sorted(p.name for p in out.iterdir()) == ["notes.md"]

    with pytest.raises(SystemExit) as exit_info:
        run_cli(synthetic_main, [*map(str, args), "--overwrite"])
    assert exit_info.value.code == 0
    assert "wrote 2 synthetic cases" in capsys.readouterr().out
    assert (out / "notes.md").read_text() == "keep me\n"
    assert read_list(out / "train.list") == ["synth_000"]


def test_synthetic_cli_relative_out_is_relative_to_cwd(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(synthetic_main, ["--out", "rel", "--num_cases", "2", "--num_test", "1",
                                 "--shape", "16", "16", "16"])
    assert exit_info.value.code == 0
    assert (tmp_path / "rel" / "test.list").is_file()
    assert str(tmp_path / "rel") in capsys.readouterr().out


@pytest.mark.parametrize("args", [
    ["--num_cases", "1", "--num_test", "1"],
    ["--num_cases", "4", "--num_test", "0"],
    ["--num_cases", "4", "--num_test", "4"],
    ["--shape", "8", "64", "32"],
    ["--size_jitter", "0.5"],
    ["--size_jitter", "-0.1"],
    ["--shape", "64", "64"],
    ["--num_cases", "many"],
    ["--seed", "-1"],
])
def test_synthetic_cli_bad_arguments(args, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(synthetic_main, ["--out", str(tmp_path / "out"), *args])
    assert exit_info.value.code == 2
    assert len(error_lines(capsys.readouterr().err)) == 1
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- resampling


def expected_shape(shape, scale):
    return tuple(max(1, round(size * factor)) for size, factor in zip(shape, scale))


def test_resample_half(synthetic_root, synthetic_cases, tmp_path):
    dst = resample_dataset(synthetic_root, tmp_path / "half", 0.5)
    for name in ("train.list", "test.list"):
        assert (dst / name).read_bytes() == (synthetic_root / name).read_bytes()
    record = json.loads((dst / "resample.json").read_text())
    assert record["source"] == str(synthetic_root)
    assert record["scale"] == [0.5, 0.5, 0.5]
    assert sorted(record["cases"]) == sorted(synthetic_cases)
    for case_id, (image, label) in synthetic_cases.items():
        small_image, small_label = read_case(case_path(dst, case_id))
        shape = expected_shape(image.shape, (0.5,) * 3)
        assert small_image.shape == shape and small_image.dtype == np.float32
        assert small_label.dtype == np.uint8 and set(np.unique(small_label)) == {0, 1}
        assert record["cases"][case_id] == {"source_shape": list(image.shape), "target_shape": list(shape)}
        assert abs(small_label.mean() - label.mean()) < 0.02


@pytest.fixture
def tiny_root(tmp_path):
    """A 3-case synthetic dataset of 32x32x16 with an extra split file."""
    root = make_synthetic_dataset(tmp_path / "tiny", **TINY)
    write_list(root / "labeled_2.txt", ["synth_000", "synth_001"])
    return root


def test_resample_three_factors_and_extra_split_files(tiny_root, tmp_path):
    scale = (0.5, 1.0, 1.7)
    dst = resample_dataset(tiny_root, tmp_path / "out", scale)
    assert (dst / "labeled_2.txt").read_text() == (tiny_root / "labeled_2.txt").read_text()
    for case_id in read_list(tiny_root / "train.list") + read_list(tiny_root / "test.list"):
        image, _ = read_case(case_path(tiny_root, case_id))
        assert read_case(case_path(dst, case_id))[0].shape == expected_shape(image.shape, scale)


def test_resample_keeps_constant_regions_and_binary_labels(tmp_path):
    image = np.full((40, 36, 20), 3.0, np.float32)
    image[25:, :, :] = -1.5
    label = np.zeros(image.shape, np.uint8)
    label[8:20, 10:30, 5:15] = 1
    write_case(case_path(tmp_path / "src", "case"), image, label)
    write_list(tmp_path / "src" / "train.list", ["case"])
    dst = resample_dataset(tmp_path / "src", tmp_path / "dst", [0.5, 0.5, 0.5])
    small_image, small_label = read_case(case_path(dst, "case"))
    np.testing.assert_allclose(small_image[:11], 3.0, atol=1e-6)
    np.testing.assert_allclose(small_image[14:], -1.5, atol=1e-6)
    assert small_label.sum() == 6 * 10 * 5 and small_label[4:10, 5:15, 2:7].all()
    assert not (dst / "test.list").exists()


def test_resample_real_la_cases(tmp_path):
    if REAL_LA is None:
        pytest.skip(REAL_LA_ABSENT)
    src = tmp_path / "LA"
    ids = [read_list(REAL_LA / "train.list")[0], read_list(REAL_LA / "test.list")[0]]
    for case_id, split in zip(ids, ("train.list", "test.list")):
        case_path(src, case_id).parent.mkdir(parents=True)
        shutil.copyfile(case_path(REAL_LA, case_id), case_path(src, case_id))
        write_list(src / split, [case_id])
    dst = resample_dataset(src, tmp_path / "LA_half", 0.5)
    for case_id in ids:
        image, label = read_case(case_path(src, case_id))
        small_image, small_label = read_case(case_path(dst, case_id))
        assert small_image.shape == expected_shape(image.shape, (0.5,) * 3)
        assert small_image.shape[2] == 44
        assert set(np.unique(small_label)) == {0, 1}
        assert abs(small_image.mean() - image.mean()) < 0.05 * image.std()
        assert abs(small_label.mean() / label.mean() - 1) < 0.1


def test_resample_errors(tiny_root, tmp_path):
    with pytest.raises(DataError, match="not found"):
        resample_dataset(tmp_path / "missing", tmp_path / "out", 0.5)
    no_lists = tmp_path / "no_lists"
    no_lists.mkdir()
    with pytest.raises(DataError, match="train.list"):
        resample_dataset(no_lists, tmp_path / "out", 0.5)
    write_list(tiny_root / "test.list", ["synth_002", "ghost"])
    with pytest.raises(DataError, match=re.escape(f"{case_path(tiny_root, 'ghost')}: file not found")):
        resample_dataset(tiny_root, tmp_path / "out", 0.5)
    assert not (tmp_path / "out").exists()
    with pytest.raises(UserError, match="is the source"):
        resample_dataset(tiny_root, tiny_root, 0.5, overwrite=True)
    for bad_scale in (0, -0.5, [0.5, 0.5], [0.5, float("nan"), 1]):
        with pytest.raises(UserError, match="scale"):
            resample_dataset(tiny_root, tmp_path / "out", bad_scale)


def test_resample_cli_refuses_existing_destination(synthetic_root, tmp_path, capsys):
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "other.h5").write_text("not ours")
    with pytest.raises(SystemExit) as exit_info:
        run_cli(resample_main, ["--src", str(synthetic_root), "--dst", str(dst), "--scale", "0.5"])
    assert exit_info.value.code == 2
    stderr = capsys.readouterr().err
    assert len(error_lines(stderr)) == 1 and "not empty" in stderr
    assert sorted(p.name for p in dst.iterdir()) == ["other.h5"]


@pytest.mark.parametrize("scale", [["0"], ["0.5", "0.5"], ["-1", "1", "1"], ["half"]])
def test_resample_cli_bad_scale(scale, synthetic_root, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(resample_main, ["--src", str(synthetic_root), "--dst", str(tmp_path / "out"),
                                "--scale", *scale])
    assert exit_info.value.code == 2
    assert len(error_lines(capsys.readouterr().err)) == 1
    assert not (tmp_path / "out").exists()
