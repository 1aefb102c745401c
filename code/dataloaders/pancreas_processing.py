"""Convert the NIH Pancreas-CT release (TCIA) into the h5 dataset that ``--dataset Pancreas`` reads.

The preprocessing of MC-Net (its ``data/Pancreas/Pre-processing.ipynb``, behind the h5 files that the
semi-supervised Pancreas-CT tables since DTC use), per case:

1. read the CT (a DICOM series, or a NIfTI file) and its label (NIfTI) with SimpleITK, and orient both
   LPS by their headers, so that a label stored in another orientation than its CT still lands on it; the
   two must then have the same size and spacing, else the case is refused;
2. clip to the abdominal window [-125, 275] HU and scale it to [0, 1];
3. resample to 1 mm isotropic: the image trilinearly, the label by nearest neighbour; each axis becomes
   ``round(size * spacing)`` voxels (MC-Net resamples before the window, with B-splines and ``int``; a
   linear interpolation after the window keeps every value inside it);
4. crop x and y to the label's box widened to at least 96 voxels, plus 25 voxels on each side (within the
   volume; MC-Net's box ends one voxel short of the label's last); z is kept whole;
5. z-score the cropped image; the label is ``label > 0``.

Case ids are those of the DTC / MC-Net split lists: ``PANCREAS_0001`` (images) and ``label0001``
(labels) become ``image0001``. With ``--split_dir`` the ``train.list`` / ``test.list`` there are used (and only their cases
converted), else the cases found are shuffled with ``--seed`` into ``--num_train`` / ``--num_test``.
Output layout: see ``dataloaders/pancreas.py``; ``preprocess.json`` records sources and shapes.

Raw layout (``--images`` and ``--labels`` are searched recursively)::

    <images>/.../PANCREAS_0001/<study>/<series>/*.dcm     TCIA download (or PANCREAS_0001.nii.gz, image0001.nii.gz)
    <labels>/.../label0001.nii.gz                         TCIA_pancreas_labels-02-05-2017

Usage::

    python code/dataloaders/pancreas_processing.py --images /data/raw/Pancreas-CT \\
        --labels /data/raw/TCIA_pancreas_labels-02-05-2017 --out data/Pancreas --split_dir ../shared/data/Pancreas
"""
import re
import sys
from functools import partial
from pathlib import Path

CODE_DIR = str(Path(__file__).resolve().parents[1])
if CODE_DIR not in sys.path:
    sys.path.insert(0, CODE_DIR)

import numpy as np
import SimpleITK as sitk

from dataloaders.conversion import (add_split_args, choose_splits, convert_dataset, extent, nifti_stem,
                                    read_dicom_series, read_image, require_foreground, require_sources,
                                    split_counts, summary, to_array, zscore)
from dataloaders.pancreas import SPLIT_FILES, Pancreas
from dataloaders.resample import resample_volume, target_shape
from utils.cli import REPO_ROOT, ArgumentParser, resolve_path, run_cli
from utils.errors import DataError, UserError

DEFAULT_OUT = REPO_ROOT / "data" / "Pancreas"
CT_WINDOW = (-125.0, 275.0)
SPACING_MM = 1.0
ORIENTATION = "LPS"
SPACING_RTOL = 0.01
CROP_MIN_SIZE = 96
CROP_MARGIN = 25
SPLIT_COUNTS = {"train": 62, "test": 20}
CASE_ID = "image{:04d}"
IMAGE_FOLDER = re.compile(r"PANCREAS_(\d+)$")
IMAGE_FILE = re.compile(r"(?:PANCREAS_|image)(\d+)$")
LABEL_FILE = re.compile(r"label(\d+)$")


def image_number(path):
    """The case number of a CT source: a ``PANCREAS_0001`` folder (DICOM) or NIfTI file, or ``image0001.nii.gz``."""
    match = IMAGE_FOLDER.match(path.name) if path.is_dir() else IMAGE_FILE.match(nifti_stem(path) or "")
    return match and match.group(1)


def label_number(path):
    """The case number of a ``label0001.nii.gz`` file."""
    match = path.is_file() and LABEL_FILE.match(nifti_stem(path) or "")
    return match and match.group(1)


def find_sources(folder, kind, number_of):
    """``{case_id: path}`` of the ``kind`` sources under ``folder`` (recursively); a case found twice is an error."""
    found = {}
    for path in sorted(folder.rglob("*")):
        number = number_of(path)
        if not number:
            continue
        case_id = CASE_ID.format(int(number))
        if case_id in found:
            raise DataError(f"case {case_id}: two {kind} sources, {found[case_id]} and {path}; keep one")
        found[case_id] = path
    return found


def find_cases(images, labels):
    """``{case_id: {'image': path, 'label': path}}`` (None where not found) of every case under the two folders."""
    for folder, flag in ((images, "--images"), (labels, "--labels")):
        if not folder.is_dir():
            raise DataError(f"{flag} {folder} not found")
    found = {"image": find_sources(images, "image", image_number), "label": find_sources(labels, "label", label_number)}
    case_ids = sorted(set(found["image"]) | set(found["label"]))
    if not case_ids:
        raise DataError(f"no Pancreas-CT case under {images} and {labels} (expected PANCREAS_0001/ DICOM folders or "
                        "PANCREAS_0001.nii.gz / image0001.nii.gz files, and label0001.nii.gz files)")
    return {case_id: {kind: found[kind].get(case_id) for kind in found} for case_id in case_ids}


def missing_source(images, labels):
    """The error for a case without its image or label (see ``conversion.require_sources``)."""
    def message(case_id, kind):
        number = case_id.removeprefix("image")
        if kind == "image":
            return (f"case {case_id}: no CT under {images} (a DICOM folder PANCREAS_{number}, or "
                    f"PANCREAS_{number}.nii.gz / {case_id}.nii.gz)")
        return f"case {case_id}: no label{number}.nii.gz under {labels}"
    return message


def read_ct(path, case_id):
    """The CT of a case: a DICOM series under a folder, or a NIfTI file."""
    return read_dicom_series(path, case_id) if path.is_dir() else read_image(path, case_id)


def oriented_pair(files, case_id):
    """CT and label as SimpleITK images oriented ``LPS``, checked to share size and spacing."""
    image = sitk.DICOMOrient(read_ct(files["image"], case_id), ORIENTATION)
    label = sitk.DICOMOrient(read_image(files["label"], case_id), ORIENTATION)
    if image.GetSize() != label.GetSize():
        raise DataError(f"case {case_id}: the CT {files['image']} has {image.GetSize()} voxels but the label "
                        f"{files['label']} has {label.GetSize()} (x, y, z, both oriented {ORIENTATION})")
    if not np.allclose(image.GetSpacing(), label.GetSpacing(), rtol=SPACING_RTOL):
        spacings = [tuple(round(s, 4) for s in im.GetSpacing()) for im in (image, label)]
        raise DataError(f"case {case_id}: the CT {files['image']} has spacing {spacings[0]} mm but the label "
                        f"{files['label']} has {spacings[1]} mm")
    return image, label


def ct_window(hu, window=CT_WINDOW):
    """Clip Hounsfield units to ``window`` and scale it linearly to [0, 1]."""
    low, high = window
    return (np.clip(hu, low, high) - low) / (high - low)


def crop_slices(label, min_size, margin):
    """The crop ``(x, y, z)`` slices: along x and y the label's extent, widened evenly to at least
    ``min_size`` voxels, plus ``margin`` voxels on each side, within the volume; z whole."""
    slices = []
    for axis in (0, 1):
        low, high = extent(label, axis)
        widen = max(min_size - (high - low), 0)
        low, high = low - widen // 2 - margin, high + (widen - widen // 2) + margin
        slices.append(slice(max(low, 0), min(high, label.shape[axis])))
    return slices[0], slices[1], slice(None)


def convert_case(case_id, files, crop_min_size=CROP_MIN_SIZE, crop_margin=CROP_MARGIN):
    """One case: ``(image float32, label uint8, info)`` (see the module docstring for the steps)."""
    image_itk, label_itk = oriented_pair(files, case_id)
    spacing = image_itk.GetSpacing()
    image = ct_window(to_array(image_itk).astype(np.float32))
    label = (to_array(label_itk) > 0).astype(np.uint8)
    shape = target_shape(image.shape, [size / SPACING_MM for size in spacing])
    image, label = resample_volume(image, shape, "trilinear"), resample_volume(label, shape, "nearest-exact")
    require_foreground(label, case_id, files["label"])
    crop = crop_slices(label, crop_min_size, crop_margin)
    image, label = zscore(image[crop], case_id), label[crop]
    info = {"source_shape": list(image_itk.GetSize()), "source_spacing": [round(s, 6) for s in spacing],
            "resampled_shape": list(shape), "crop_xy": [[s.start, s.stop] for s in crop[:2]],
            "shape": list(image.shape), "foreground_voxels": int(label.sum())}
    return image, label, info


def check_crop(crop_min_size, crop_margin):
    """The crop needs a non-negative minimum size and margin."""
    if crop_min_size < 0 or crop_margin < 0:
        raise UserError(f"--crop_min_size and --crop_margin must be >= 0, got {crop_min_size} and {crop_margin}")


def convert_pancreas(images, labels, out_dir=DEFAULT_OUT, split_dir=None, counts=None, seed=0,
                     crop_min_size=CROP_MIN_SIZE, crop_margin=CROP_MARGIN, overwrite=False):
    """Convert the Pancreas-CT cases under ``images`` / ``labels`` into ``out_dir``; return the folder.

    ``counts`` (``{'train': 62, 'test': 20}`` when None) sizes the seeded split used without ``split_dir``.
    """
    check_crop(crop_min_size, crop_margin)
    images, labels = Path(images), Path(labels)
    sources = find_cases(images, labels)
    splits = choose_splits(list(sources), split_dir, SPLIT_FILES, counts or SPLIT_COUNTS, seed)
    require_sources(splits, sources, ("image", "label"), missing_source(images, labels))
    record = {"dataset": "Pancreas-CT (NIH, TCIA)",
              "source": {"images": str(images), "labels": str(labels),
                         "split_dir": str(split_dir) if split_dir else None},
              "parameters": {"ct_window_hu": list(CT_WINDOW), "spacing_mm": SPACING_MM, "orientation": ORIENTATION,
                             "crop_min_size": crop_min_size, "crop_margin": crop_margin,
                             "split_seed": None if split_dir else seed}}
    convert = partial(convert_case, crop_min_size=crop_min_size, crop_margin=crop_margin)
    cases = convert_dataset(out_dir, splits, SPLIT_FILES, sources, convert, Pancreas.case_path, record, overwrite)
    print(summary(Path(out_dir).resolve(), splits, SPLIT_FILES, cases))
    return Path(out_dir).resolve()


def parse_args(argv=None):
    parser = ArgumentParser(description="Convert the NIH Pancreas-CT release into the h5 dataset of --dataset "
                                        "Pancreas (MC-Net's preprocessing).")
    parser.add_argument("--images", required=True,
                        help="folder holding PANCREAS_0001/ DICOM folders (TCIA) or PANCREAS_0001.nii.gz / "
                             "image0001.nii.gz files, searched recursively")
    parser.add_argument("--labels", required=True, help="folder holding label0001.nii.gz ..., searched recursively")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help="output folder, relative to the current directory (default: data/Pancreas)")
    add_split_args(parser, SPLIT_FILES, SPLIT_COUNTS, "the DTC / MC-Net lists")
    parser.add_argument("--crop_min_size", type=int, default=CROP_MIN_SIZE,
                        help="x/y crop: the label's box is widened to at least this size (default: %(default)s)")
    parser.add_argument("--crop_margin", type=int, default=CROP_MARGIN,
                        help="x/y crop: voxels added on each side of the widened box (default: %(default)s)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    split_dir = resolve_path(args.split_dir) if args.split_dir else None
    convert_pancreas(resolve_path(args.images), resolve_path(args.labels), args.out, split_dir,
                     split_counts(args, SPLIT_COUNTS), args.seed, args.crop_min_size, args.crop_margin,
                     args.overwrite)


if __name__ == "__main__":
    run_cli(main)
