"""The steps that the raw-dataset converters (``pancreas_processing.py``, ``brats_processing.py``) share.

- Reading: SimpleITK (installed with medpy) reads NIfTI files and DICOM series alike, applies the DICOM
  rescale slope and intercept, orders the slices of a series by their position, and knows each volume's
  spacing and orientation; :func:`to_array` turns an image into a numpy array indexed (x, y, z), the
  order of every h5 file in this project. Every failure is a :class:`DataError` naming the case.
- Splits: the lists of a ``--split_dir`` (every listed case must be found), or a seeded shuffle of the
  cases found, cut into the papers' split sizes.
- Writing: :func:`convert_dataset` converts case after case into the dataset's h5 layout, then writes the
  split lists and ``preprocess.json`` (the source, the parameters and every case's shapes), last, so that
  an interrupted or failed conversion never looks like a complete dataset.
"""
import json
import os
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from tqdm import tqdm

from dataloaders.h5_dataset import read_list, write_list
from dataloaders.h5io import write_case
from dataloaders.synthetic import claim_output_dir
from utils.errors import DataError, UserError

RECORD_FILE = "preprocess.json"
NIFTI_SUFFIXES = (".nii.gz", ".nii")


def nifti_stem(path):
    """The file name without ``.nii.gz`` / ``.nii``, or None for another file."""
    name = Path(path).name
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[:-len(suffix)]
    return None


def require_volume(image, source, case_id):
    """The image read from ``source`` must be one 3D volume."""
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise DataError(f"case {case_id}: {source} is not one 3D volume (size {image.GetSize()}, "
                        f"{image.GetNumberOfComponentsPerPixel()} components per voxel)")
    return image


def read_image(path, case_id):
    """One volume file (NIfTI) as a SimpleITK image."""
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError:
        raise DataError(f"case {case_id}: {path} cannot be read as an image (corrupt, or not NIfTI?)") from None
    return require_volume(image, path, case_id)


def dicom_series_files(folder, case_id):
    """The files of the one DICOM series under ``folder`` (searched recursively), in slice order."""
    series = [(directory, series_id) for directory, _, files in sorted(os.walk(folder)) if files
              for series_id in sitk.ImageSeriesReader.GetGDCMSeriesIDs(directory)]
    if not series:
        raise DataError(f"case {case_id}: no DICOM series under {folder}")
    if len(series) > 1:
        raise DataError(f"case {case_id}: {len(series)} DICOM series under {folder}; keep only the CT volume's")
    return sitk.ImageSeriesReader.GetGDCMSeriesFileNames(*series[0])


def read_dicom_series(folder, case_id):
    """The DICOM series under ``folder`` as one SimpleITK image (slices ordered by position)."""
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(dicom_series_files(folder, case_id))
    try:
        image = reader.Execute()
    except RuntimeError:
        raise DataError(f"case {case_id}: the DICOM series under {folder} cannot be read (corrupt?)") from None
    return require_volume(image, f"the DICOM series under {folder}", case_id)


def to_array(image):
    """The voxels of a SimpleITK image as a numpy array indexed (x, y, z) (SimpleITK's is (z, y, x))."""
    return np.transpose(sitk.GetArrayFromImage(image), (2, 1, 0))


def require_foreground(label, case_id, path):
    """A label without foreground cannot be trained on (nor cropped around)."""
    if not label.any():
        raise DataError(f"case {case_id}: label {path} has no foreground voxels")


def extent(mask, axis):
    """``(first, last + 1)``: the indices along ``axis`` where ``mask`` has a voxel (mask not empty)."""
    present = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
    return int(present[0]), int(present[-1]) + 1


def zscore(image, case_id, mask=None):
    """``(image - mean) / std`` as float32, with the statistics (in float64) of the voxels under ``mask``
    (all when None)."""
    values = image if mask is None else image[mask]
    std = values.std(dtype=np.float64)
    if not std > 0:
        raise DataError(f"case {case_id}: the image is constant where it is normalised, cannot be z-scored")
    return ((image - values.mean(dtype=np.float64)) / std).astype(np.float32)


def check_counts(counts):
    """Every split of a seeded split needs at least one case."""
    for split, count in counts.items():
        if count < 1:
            raise UserError(f"--num_{split} must be at least 1, got {count}")


def seeded_split(ids, counts, seed):
    """``{split: ids}``: the ids (sorted first, so that only the set of ids and the seed matter) shuffled
    with ``seed`` and cut into ``counts`` (an ordered ``{split: size}``), which must add up to all ids."""
    check_counts(counts)
    if sum(counts.values()) != len(ids):
        sizes = " + ".join(f"{count} {split}" for split, count in counts.items())
        raise UserError(f"a seeded split of the {len(ids)} cases found needs split sizes adding up to {len(ids)}, "
                        f"got {sizes} (see --num_{' / --num_'.join(counts)}, or pass --split_dir)")
    ordered = sorted(ids)
    shuffled = [ordered[i] for i in np.random.default_rng(seed).permutation(len(ids))]
    ends = np.cumsum(list(counts.values()))
    return {split: shuffled[end - count:end] for (split, count), end in zip(counts.items(), ends)}


def read_split_dir(split_dir, split_files):
    """``{split: ids}`` from the list files of ``split_dir`` (``split_files``: split -> file name); every
    file is required and no case may be in two lists."""
    split_dir = Path(split_dir)
    if not split_dir.is_dir():
        raise DataError(f"--split_dir {split_dir} not found")
    splits = {split: read_list(split_dir / name) for split, name in split_files.items()}
    seen = {}
    for split, ids in splits.items():
        for case_id in ids:
            if case_id in seen:
                raise DataError(f"case {case_id} is in both {split_files[seen[case_id]]} and {split_files[split]} "
                                f"of {split_dir}")
            seen[case_id] = split
    return splits


def choose_splits(case_ids, split_dir, split_files, counts, seed):
    """The split lists: those of ``split_dir`` when given, else a seeded split of ``case_ids`` into
    ``counts`` (an ordered ``{split: size}``)."""
    if split_dir is None:
        return seeded_split(case_ids, counts, seed)
    return read_split_dir(split_dir, split_files)


def require_sources(splits, sources, kinds, missing):
    """Every case of ``splits`` needs each of ``kinds`` in ``sources[case_id]`` (kind -> path, None where
    not found); ``missing(case_id, kind)`` is the one-line error naming the case and what it lacks."""
    for case_id in (case_id for ids in splits.values() for case_id in ids):
        for kind in kinds:
            if sources.get(case_id, {}).get(kind) is None:
                raise DataError(missing(case_id, kind))


def convert_dataset(out_dir, splits, split_files, sources, convert, case_path, record, overwrite=False):
    """Convert the cases of ``splits`` and write the dataset to ``out_dir``; return the per-case record.

    ``sources`` maps each case id to its raw files, ``convert(case_id, files)`` returns ``(image, label,
    info)`` and ``case_path(out_dir, case_id)`` says where its h5 file goes. The split lists and
    ``preprocess.json`` (``record`` plus every case's ``info``) are written after the last case. Refuses a
    non-empty ``out_dir`` unless ``overwrite``, which replaces only the files written here.
    """
    out_dir = Path(out_dir).resolve()
    lists = {split: out_dir / name for split, name in split_files.items()}
    claim_output_dir(out_dir, overwrite, [*lists.values(), out_dir / RECORD_FILE])
    cases = {}
    ids = [case_id for split_ids in splits.values() for case_id in split_ids]
    for case_id in tqdm(ids, desc="converting", unit="case", file=sys.stdout):  # stderr: only a failure's one line
        image, label, info = convert(case_id, sources[case_id])
        write_case(case_path(out_dir, case_id), image, label)
        cases[case_id] = {"sources": {kind: str(path) for kind, path in sources[case_id].items()}, **info}
    for split, path in lists.items():
        write_list(path, splits[split])
    (out_dir / RECORD_FILE).write_text(json.dumps({**record, "cases": cases}, indent=2) + "\n")
    return cases


def summary(out_dir, splits, split_files, cases):
    """One-line report of a converted dataset."""
    shapes = np.array([case["shape"] for case in cases.values()])
    low, high = shapes.min(axis=0), shapes.max(axis=0)
    ranges = " x ".join(f"{lo}" if lo == hi else f"{lo}-{hi}" for lo, hi in zip(low, high))
    counts = ", ".join(f"{len(splits[split])} in {name}" for split, name in split_files.items())
    return f"converted {len(cases)} cases to {out_dir} ({counts}); shapes {ranges}"


def add_split_args(parser, split_files, split_counts, lists):
    """The flags both converters share: ``--split_dir`` (existing lists, e.g. ``lists``), ``--num_<split>`` and
    ``--seed`` for a seeded split instead, ``--overwrite``."""
    names = ", ".join(split_files[split] for split in split_counts)
    parser.add_argument("--split_dir", default=None,
                        help=f"folder with {names} to use ({lists}); only their cases are converted. "
                             "Default: a seeded split")
    for split, count in split_counts.items():
        parser.add_argument(f"--num_{split}", type=int, default=count,
                            help=f"seeded split: cases in {split_files[split]} (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seeded split: shuffling seed (default: 0)")
    parser.add_argument("--overwrite", action="store_true",
                        help="write into a non-empty folder, replacing only the files written here")


def split_counts(args, defaults):
    """``{split: --num_<split>}`` of parsed ``args``."""
    return {split: getattr(args, f"num_{split}") for split in defaults}
