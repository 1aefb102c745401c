"""Convert the BraTS-2019 training release into the h5 dataset that ``--dataset BraTS2019`` reads.

The preprocessing of SSL4MIS (``brats_proprecessing.py``), per case:

1. read the FLAIR (the only modality used) and the segmentation; they must have the same shape;
2. label: whole tumour, ``seg > 0`` (labels 1, 2 and 4 together);
3. crop to the box of the brain, the non-zero FLAIR voxels (SSL4MIS's slice ends drop the last voxel of
   each axis; here the box is whole, and never cuts tumour voxels);
4. clip the intensities at the 99.9th percentile of the cropped volume (numpy's interpolated percentile;
   SSL4MIS takes the first intensity whose cumulative share reaches 99.9 %, the same up to one step);
5. z-score with the mean and standard deviation of the brain voxels (the background becomes
   ``-mean / std``, as in SSL4MIS).

Volumes are written indexed (x, y, z) (the NIfTI voxel order). Case ids are the case folder names
(``BraTS19_TCIA02_370_1``). With ``--split_dir`` its ``train.txt`` / ``val.txt`` / ``test.txt`` are used (the
SSL4MIS lists; only their cases are converted), else the cases found are shuffled with ``--seed`` into
``--num_train`` / ``--num_val`` / ``--num_test``. Output layout: see ``dataloaders/brats2019.py``;
``preprocess.json`` records sources and shapes.

Raw layout (``--src`` searched recursively; HGG/ and LGG/ subfolders are fine)::

    <src>/.../BraTS19_TCIA02_370_1/BraTS19_TCIA02_370_1_flair.nii.gz   (and _seg, _t1, _t1ce, _t2)

Usage::

    python code/dataloaders/brats_processing.py --src /data/raw/MICCAI_BraTS_2019_Data_Training \\
        --out data/BraTS2019 --split_dir ../shared/data/BraTS2019
"""
import sys
from pathlib import Path

CODE_DIR = str(Path(__file__).resolve().parents[1])
if CODE_DIR not in sys.path:
    sys.path.insert(0, CODE_DIR)

import numpy as np

from dataloaders.brats2019 import SPLIT_FILES, BraTS2019
from dataloaders.conversion import (NIFTI_SUFFIXES, add_split_args, choose_splits, convert_dataset, extent,
                                    nifti_stem, read_image, require_foreground, require_sources, split_counts,
                                    summary, to_array, zscore)
from utils.cli import REPO_ROOT, ArgumentParser, resolve_path, run_cli
from utils.errors import DataError

DEFAULT_OUT = REPO_ROOT / "data" / "BraTS2019"
KINDS = ("flair", "seg")
CLIP_PERCENTILE = 99.9
SPLIT_COUNTS = {"train": 250, "val": 25, "test": 60}


def case_folders(src):
    """``{case_id: folder}``: every folder under ``src`` holding a ``<folder name>_*.nii[.gz]`` file."""
    if not src.is_dir():
        raise DataError(f"--src {src} not found")
    folders = {}
    for path in sorted(src.rglob("*.nii*")):
        folder = path.parent
        if not (nifti_stem(path) or "").startswith(folder.name + "_"):
            continue
        if folders.setdefault(folder.name, folder) != folder:
            raise DataError(f"case {folder.name}: two case folders, {folders[folder.name]} and {folder}; keep one")
    if not folders:
        raise DataError(f"no BraTS case folder under {src} (expected <case>/<case>_flair.nii.gz)")
    return folders


def nifti_file(folder, stem):
    """``folder/stem.nii.gz`` or ``folder/stem.nii``, whichever exists, else None."""
    return next((folder / f"{stem}{suffix}" for suffix in NIFTI_SUFFIXES if (folder / f"{stem}{suffix}").is_file()),
                None)


def find_cases(src):
    """``{case_id: {'flair': path, 'seg': path}}`` (None where missing), and ``{case_id: folder}``."""
    folders = case_folders(src)
    return {case_id: {kind: nifti_file(folder, f"{case_id}_{kind}") for kind in KINDS}
            for case_id, folder in folders.items()}, folders


def missing_source(src, folders):
    """The error for a case without its folder, FLAIR or segmentation (see ``conversion.require_sources``)."""
    def message(case_id, kind):
        if case_id not in folders:
            return f"case {case_id}: no case folder {case_id}/ under {src}"
        return f"case {case_id}: no {case_id}_{kind}.nii.gz in {folders[case_id]}"
    return message


def brain_box(brain, label):
    """The ``(x, y, z)`` slices of the box around the brain (and the tumour, which lies inside it)."""
    mask = brain | label
    return tuple(slice(*extent(mask, axis)) for axis in range(3))


def convert_case(case_id, files):
    """One case: ``(image float32, label uint8, info)`` (see the module docstring for the steps)."""
    flair = to_array(read_image(files["flair"], case_id)).astype(np.float32)
    seg = to_array(read_image(files["seg"], case_id))
    if flair.shape != seg.shape:
        raise DataError(f"case {case_id}: the FLAIR {files['flair'].name} has shape {flair.shape} but the "
                        f"segmentation {files['seg'].name} has {seg.shape}")
    label = seg > 0
    require_foreground(label, case_id, files["seg"])
    brain = flair != 0
    if not brain.any():
        raise DataError(f"case {case_id}: the FLAIR {files['flair']} is all zero")
    box = brain_box(brain, label)
    flair, label, brain = flair[box], label[box], brain[box]
    clip_value = float(np.percentile(flair, CLIP_PERCENTILE))
    image = zscore(np.minimum(flair, clip_value), case_id, mask=brain)
    info = {"source_shape": list(seg.shape), "crop": [[s.start, s.stop] for s in box], "clip_value": clip_value,
            "shape": list(image.shape), "foreground_voxels": int(label.sum())}
    return image, label.astype(np.uint8), info


def convert_brats(src, out_dir=DEFAULT_OUT, split_dir=None, counts=None, seed=0, overwrite=False):
    """Convert the BraTS-2019 cases under ``src`` into ``out_dir``; return the folder.

    ``counts`` (``{'train': 250, 'val': 25, 'test': 60}`` when None) sizes the seeded split used without
    ``split_dir``.
    """
    src = Path(src)
    sources, folders = find_cases(src)
    splits = choose_splits(list(sources), split_dir, SPLIT_FILES, counts or SPLIT_COUNTS, seed)
    require_sources(splits, sources, KINDS, missing_source(src, folders))
    record = {"dataset": "BraTS 2019 training release, FLAIR, whole tumour",
              "source": {"src": str(src), "split_dir": str(split_dir) if split_dir else None},
              "parameters": {"clip_percentile": CLIP_PERCENTILE, "split_seed": None if split_dir else seed}}
    cases = convert_dataset(out_dir, splits, SPLIT_FILES, sources, convert_case, BraTS2019.case_path, record,
                            overwrite)
    print(summary(Path(out_dir).resolve(), splits, SPLIT_FILES, cases))
    return Path(out_dir).resolve()


def parse_args(argv=None):
    parser = ArgumentParser(description="Convert the BraTS-2019 training release into the h5 dataset of "
                                        "--dataset BraTS2019 (SSL4MIS preprocessing, FLAIR, whole tumour).")
    parser.add_argument("--src", required=True,
                        help="folder holding the case folders (<case>/<case>_flair.nii.gz, <case>_seg.nii.gz), "
                             "searched recursively")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help="output folder, relative to the current directory (default: data/BraTS2019)")
    add_split_args(parser, SPLIT_FILES, SPLIT_COUNTS, "the SSL4MIS lists")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    split_dir = resolve_path(args.split_dir) if args.split_dir else None
    convert_brats(resolve_path(args.src), args.out, split_dir, split_counts(args, SPLIT_COUNTS), args.seed,
                  args.overwrite)


if __name__ == "__main__":
    run_cli(main)
