"""Write a resampled copy of an h5 dataset in the same layout, e.g. at half resolution, so that an
idea can be tried on real data on a CPU in minutes.

Every case listed in ``train.list`` / ``test.list`` is resampled to ``max(1, round(size * scale))``
voxels per axis: the image trilinearly (kept float32, not re-normalised), the label by nearest
neighbour (kept uint8 {0, 1}). Split files (``*.list``, ``*.txt``) are copied verbatim, and
``resample.json`` records the source, the scale and every case's source and target shape.

Usage::

    python code/dataloaders/resample.py --src data/LA --dst data/LA_half --scale 0.5 [--overwrite]
"""
import json
import math
import shutil
import sys
from pathlib import Path

CODE_DIR = str(Path(__file__).resolve().parents[1])
if CODE_DIR not in sys.path:
    sys.path.insert(0, CODE_DIR)

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from dataloaders.data_tag import RESAMPLE_RECORD
from dataloaders.h5io import read_case, read_shapes, write_case
from dataloaders.la_heart import SPLIT_FILES, case_path, read_list
from dataloaders.synthetic import claim_output_dir
from utils.cli import ArgumentParser, resolve_path, run_cli
from utils.errors import DataError, UserError

RECORD_FILE = RESAMPLE_RECORD
SPLIT_PATTERNS = ("*.list", "*.txt")


def parse_scale(scale):
    """Return the per-axis scale ``(sx, sy, sz)`` from one number or three; each must be > 0."""
    try:
        values = np.atleast_1d(np.asarray(scale, dtype=float)).tolist()
    except (TypeError, ValueError):
        raise UserError(f"scale must be one number or three (x, y, z), got {scale!r}") from None
    if len(values) == 1:
        values *= 3
    if len(values) != 3:
        raise UserError(f"scale must be one number or three (x, y, z), got {len(values)}")
    if not all(math.isfinite(v) and v > 0 for v in values):
        raise UserError(f"every scale factor must be a positive number, got {values}")
    return tuple(float(v) for v in values)


def target_shape(shape, scale):
    """Resampled size of each axis: ``max(1, round(size * factor))``."""
    return tuple(max(1, round(size * factor)) for size, factor in zip(shape, scale))


def resample_volume(volume, shape, mode):
    """Resample a 3D numpy volume to ``shape`` with ``F.interpolate`` (dtype kept)."""
    tensor = torch.from_numpy(volume)[None, None]
    options = {"align_corners": False} if mode == "trilinear" else {}
    return F.interpolate(tensor, size=shape, mode=mode, **options)[0, 0].numpy()


def listed_cases(src):
    """Case ids of ``train.list`` then ``test.list`` (whichever exist), without repeats."""
    lists = [src / name for name in SPLIT_FILES.values() if (src / name).is_file()]
    if not lists:
        names = " or ".join(SPLIT_FILES.values())
        raise DataError(f"{src}: no {names}; is this a dataset root (see data/README.md)?")
    ids = [case_id for path in lists for case_id in read_list(path)]
    return list(dict.fromkeys(ids))


def split_files(src):
    """Split files of the dataset root (``*.list``, ``*.txt``), copied verbatim."""
    return sorted({path for pattern in SPLIT_PATTERNS for path in src.glob(pattern) if path.is_file()})


def check_paths(src, dst):
    """Refuse a missing source and a destination that is the source."""
    if not src.is_dir():
        raise DataError(f"source dataset {src} not found (expected a folder with train.list / test.list)")
    if dst.resolve() == src.resolve():
        raise UserError(f"destination {dst} is the source; choose another folder")


def resample_dataset(src, dst, scale, overwrite=False):
    """Write a copy of the dataset at ``src`` resampled by ``scale`` (one factor or x, y, z) to
    ``dst``; return ``dst``. Refuses an existing non-empty ``dst`` unless ``overwrite``, which
    replaces only the files written here; ``dst`` may never be ``src``."""
    scale = parse_scale(scale)
    src, dst = Path(src).resolve(), Path(dst).resolve()
    check_paths(src, dst)
    ids = listed_cases(src)
    source_shapes = {case_id: read_shapes(case_path(src, case_id))[0] for case_id in ids}
    splits = split_files(src)
    claim_output_dir(dst, overwrite, [dst / path.name for path in splits] + [dst / RECORD_FILE])
    cases = {}
    for case_id in tqdm(ids, desc="resampling cases", unit="case"):
        image, label = read_case(case_path(src, case_id))
        shape = target_shape(image.shape, scale)
        write_case(case_path(dst, case_id), resample_volume(image, shape, "trilinear"),
                   resample_volume(label, shape, "nearest-exact"))
        cases[case_id] = {"source_shape": list(image.shape), "target_shape": list(shape)}
    for path in splits:
        shutil.copyfile(path, dst / path.name)
    record = {"source": str(src), "scale": list(scale), "cases": cases}
    (dst / RECORD_FILE).write_text(json.dumps(record, indent=2) + "\n")
    print(summary(src, dst, scale, source_shapes, cases, splits))
    return dst


def summary(src, dst, scale, source_shapes, cases, splits):
    """One-line report of a resampled dataset."""
    voxels_in = sum(math.prod(shape) for shape in source_shapes.values())
    voxels_out = sum(math.prod(case["target_shape"]) for case in cases.values())
    factors = " x ".join(f"{factor:g}" for factor in scale)
    names = ", ".join(path.name for path in splits)
    return (f"resampled {len(cases)} cases from {src} to {dst} (scale {factors}, "
            f"{voxels_out / voxels_in:.1%} of the voxels); copied {names}")


def parse_args(argv=None):
    parser = ArgumentParser(description="Write a resampled copy of an h5 dataset in the same layout.")
    parser.add_argument("--src", required=True,
                        help="dataset root; relative to the current directory if it exists there, "
                             "else to the repository root")
    parser.add_argument("--dst", type=Path, required=True,
                        help="output folder, relative to the current directory")
    parser.add_argument("--scale", type=float, nargs="+", required=True, metavar="FACTOR",
                        help="one factor for every axis, or three (x y z), each > 0")
    parser.add_argument("--overwrite", action="store_true",
                        help="write into a non-empty folder, replacing only the files written here")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    resample_dataset(resolve_path(args.src), args.dst, args.scale, args.overwrite)


if __name__ == "__main__":
    run_cli(main)
