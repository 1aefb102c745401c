"""Write a synthetic dataset in the Left Atrium layout: the quick start on a fresh machine and the
data of every test.

Each case has one smooth, lobed foreground body, the upper level set of a field made of a few
rotated anisotropic Gaussian blobs (the chamber), an optional elongated blob (the appendage) and
a few thin tubes (the veins), made lumpy by low-frequency multiplicative noise and kept away from
the volume border. The image has the body brighter than the background, unlabelled bright blobs
elsewhere (so that one global threshold cannot segment it), background texture, a smooth
multiplicative bias field and Gaussian noise, then is z-scored per volume like the LA h5 files.
A network must use shape and context to separate the body from the blobs, which it learns fast.

Smooth fields are evaluated on a half-resolution grid and upsampled trilinearly, which keeps a
128x128x64 case well under a second including the gzip write. Case ``i`` depends only on
``(seed, i)``, so the same seed always gives the same arrays, whatever ``num_cases`` is.

Usage::

    python code/dataloaders/synthetic.py --out data/synthetic_LA --num_cases 20 --num_test 4 \\
        --shape 96 96 48 --size_jitter 0.15 --seed 0 [--overwrite]
"""
import sys
from pathlib import Path

CODE_DIR = str(Path(__file__).resolve().parents[1])
if CODE_DIR not in sys.path:
    sys.path.insert(0, CODE_DIR)

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from tqdm import tqdm

from dataloaders.data_tag import SYNTHETIC_RECORD
from dataloaders.h5io import write_case
from dataloaders.la_heart import SPLIT_FILES, case_path, write_list
from utils.atomic import write_json
from utils.cli import REPO_ROOT, ArgumentParser, run_cli
from utils.errors import UserError
from utils.metrics import largest_connected_component

DEFAULT_OUT = REPO_ROOT / "data" / "synthetic_LA"
ID_FORMAT = "synth_{:03d}"
MIN_DIM = 16
COARSE_FACTOR = 2
BORDER_MARGIN = 0.12
FOREGROUND_FRACTION = (0.07, 0.15)
NOISE_STD = (0.25, 0.4)
BIAS_AMPLITUDE = (0.15, 0.3)


def claim_output_dir(out_dir, overwrite, stale_files=()):
    """Make sure ``out_dir`` may be written: refuse an existing non-empty folder unless
    ``overwrite``; with ``overwrite``, delete ``stale_files`` (the outputs that are written last,
    such as split lists) first, so that an interrupted rewrite never looks like a complete dataset.
    Files the caller does not write are left alone."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{out_dir} exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not overwrite:
            raise UserError(f"{out_dir} exists and is not empty; pass --overwrite (overwrite=True) "
                            "to replace the files this script writes (other files are kept)")
        for path in stale_files:
            Path(path).unlink(missing_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)


def validate_args(num_cases, num_test, shape, size_jitter, seed):
    """Raise a one-line :class:`UserError` for arguments that cannot give a usable dataset."""
    if num_cases < 2:
        raise UserError(f"num_cases must be at least 2 (one train and one test case), got {num_cases}")
    if not 1 <= num_test < num_cases:
        raise UserError(f"num_test must be between 1 and num_cases - 1 = {num_cases - 1}, got {num_test}")
    if len(shape) != 3 or min(shape) < MIN_DIM:
        raise UserError(f"shape must be 3 sizes, each at least {MIN_DIM}, got {tuple(shape)}")
    if not 0 <= size_jitter < 0.5:
        raise UserError(f"size_jitter must be in [0, 0.5), got {size_jitter}")
    if seed < 0:
        raise UserError(f"seed must be a non-negative integer, got {seed}")


def case_shape(rng, shape, size_jitter):
    """Per-case volume shape: x and y scaled by a random factor in ``1 +- size_jitter`` (LA cases
    vary in x/y), z fixed."""
    factors = rng.uniform(1 - size_jitter, 1 + size_jitter, size=2)
    x, y = (max(MIN_DIM, round(size * f)) for size, f in zip(shape[:2], factors))
    return x, y, shape[2]


def coarse_grid(shape):
    """Half-resolution grid in normalised coordinates (0..1 along each axis, voxel centres as for
    ``align_corners=False`` upsampling), as three broadcastable axes ``(x[:, None, None], ...)``
    so that fields cost a few whole-grid operations each."""
    sizes = [-(-size // COARSE_FACTOR) for size in shape]
    axes = [(np.arange(n, dtype=np.float32) + 0.5) / n for n in sizes]
    return tuple(np.reshape(axis, [-1 if i == k else 1 for i in range(3)]) for k, axis in enumerate(axes))


def grid_shape(grid):
    """Shape of the volume spanned by broadcastable axes."""
    return tuple(axis.size for axis in grid)


def random_rotation(rng):
    """A uniformly random 3D rotation matrix (QR of a Gaussian matrix, signs fixed)."""
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    q *= np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] *= -1
    return q


def rotation_towards(direction, rng):
    """A rotation whose first column is ``direction`` (unit), the other two random around it."""
    helper = rng.standard_normal(3)
    second = helper - helper.dot(direction) * direction
    second /= np.linalg.norm(second)
    return np.stack([direction, second, np.cross(direction, second)], axis=1)


def random_direction(rng):
    """A uniformly random unit vector."""
    vector = rng.standard_normal(3)
    return vector / np.linalg.norm(vector)


def gaussian_blob(grid, centre, sigmas, rotation):
    """Anisotropic Gaussian, peak 1, axes the columns of ``rotation`` with widths ``sigmas``.

    The quadratic form ``d^T A d`` is expanded into six broadcast products of 1D offsets, which is
    an order of magnitude faster than rotating every voxel's coordinates."""
    precision = rotation @ np.diag(1 / np.square(sigmas)) @ rotation.T
    offsets = [axis - np.float32(c) for axis, c in zip(grid, centre)]
    form = 0
    for i in range(3):
        form = form + float(precision[i, i]) * offsets[i] ** 2
        for j in range(i + 1, 3):
            form = form + float(2 * precision[i, j]) * offsets[i] * offsets[j]
    return np.exp(-0.5 * form)


def smooth_noise(rng, grid, wavelengths, num_waves=8):
    """Smooth random field with unit standard deviation: a sum of random plane waves whose
    wavelengths (in volume units) lie in ``wavelengths``; analytic, so no filtering is needed."""
    field = np.zeros(grid_shape(grid), np.float32)
    for _ in range(num_waves):
        frequency = 2 * np.pi / rng.uniform(*wavelengths) * random_direction(rng)
        phase = sum(float(f) * axis for f, axis in zip(frequency, grid)) + rng.uniform(0, 2 * np.pi)
        field += np.cos(phase)
    return field * np.float32(np.sqrt(2 / num_waves))


def border_window(grid):
    """1 in the interior, falling smoothly to 0 at ``BORDER_MARGIN`` from every face, so that the
    foreground never touches the volume border."""
    ramps = [np.clip((np.minimum(axis, 1 - axis) - BORDER_MARGIN) / BORDER_MARGIN, 0, 1) for axis in grid]
    ramp = np.minimum(np.minimum(ramps[0], ramps[1]), ramps[2])
    return ramp * ramp * (3 - 2 * ramp)


def body_field(rng, grid):
    """Field whose upper level set is the foreground: lobed chamber, optional appendage, veins."""
    centre = 0.5 + rng.uniform(-0.06, 0.06, size=3)
    field = np.zeros(grid_shape(grid), np.float32)
    for _ in range(rng.integers(3, 6)):
        lobe_centre = centre + rng.normal(0, 0.08, size=3)
        field += rng.uniform(0.7, 1.0) * gaussian_blob(
            grid, lobe_centre, rng.uniform(0.05, 0.1, size=3), random_rotation(rng))
    if rng.random() < 0.7:
        direction = random_direction(rng)
        field += gaussian_blob(grid, centre + 0.16 * direction, (0.08, 0.04, 0.04),
                               rotation_towards(direction, rng))
    for _ in range(rng.integers(2, 5)):
        direction = random_direction(rng)
        field += gaussian_blob(grid, centre + 0.22 * direction, (0.12, 0.025, 0.025),
                               rotation_towards(direction, rng))
    lumps = 1 + 0.3 * smooth_noise(rng, grid, wavelengths=(0.25, 0.6))
    return field * lumps * border_window(grid)


def distractor_field(rng, grid, body_mask):
    """Unlabelled bright blobs (plateaus with a soft edge a few voxels wide) placed clear of the
    foreground, so that a global intensity threshold cannot give the label."""
    clearance = ndimage.distance_transform_edt(~body_mask, sampling=[1 / axis.size for axis in grid])
    field = np.zeros(grid_shape(grid), np.float32)
    for _ in range(rng.integers(5, 10)):
        sigmas = rng.uniform(0.06, 0.12, size=3)
        candidates = np.flatnonzero(clearance > 1.7 * sigmas.max())
        if candidates.size == 0:
            continue
        index = np.unravel_index(rng.choice(candidates), body_mask.shape)
        centre = [float(axis.ravel()[i]) for axis, i in zip(grid, index)]
        blob = gaussian_blob(grid, centre, sigmas, random_rotation(rng))
        field = np.maximum(field, rng.uniform(0.7, 1.1) * np.clip((blob - 0.3) / 0.2, 0, 1))
    return field


def bias_field(rng, grid):
    """Multiplicative bias: 1 + a random quadratic polynomial scaled to a peak of 15-30 %."""
    x, y, z = (2 * axis - 1 for axis in grid)
    terms = [x, y, z, x * x, y * y, z * z, x * y, x * z, y * z]
    offset = sum(float(c) * term for c, term in zip(rng.standard_normal(len(terms)), terms))
    offset -= offset.mean()
    return 1 + rng.uniform(*BIAS_AMPLITUDE) * offset / np.abs(offset).max()


def upsample(fields, shape):
    """Trilinear upsampling of coarse fields to ``shape``; returns float32 numpy arrays."""
    stacked = torch.from_numpy(np.stack(fields).astype(np.float32, copy=False))
    full = F.interpolate(stacked[None], size=shape, mode="trilinear", align_corners=False)[0]
    return list(full.numpy())


def make_case(rng, shape):
    """Generate one case of ``shape``: ``(image float32 z-scored, label uint8 {0, 1})``."""
    grid = coarse_grid(shape)
    body = body_field(rng, grid)
    threshold = np.quantile(body, 1 - rng.uniform(*FOREGROUND_FRACTION))
    distractors = distractor_field(rng, grid, body > threshold)
    texture = 0.2 * smooth_noise(rng, grid, wavelengths=(0.08, 0.3), num_waves=16)
    body_texture = 1 + 0.1 * smooth_noise(rng, grid, wavelengths=(0.1, 0.3))
    body, distractors, texture, body_texture, bias = upsample(
        [body, distractors, texture, body_texture, bias_field(rng, grid)], shape)
    label = largest_connected_component(body > threshold)
    contrast = rng.uniform(0.8, 1.1)
    clean = 1 + texture + contrast * (label * body_texture + distractors)
    image = clean * bias + rng.uniform(*NOISE_STD) * rng.standard_normal(shape, dtype=np.float32)
    image = (image - image.mean()) / image.std()
    return image.astype(np.float32), label.astype(np.uint8)


def make_synthetic_dataset(out_dir, num_cases=20, num_test=4, shape=(96, 96, 48), size_jitter=0.15,
                           seed=0, overwrite=False):
    """Write ``num_cases`` synthetic cases, ``synthetic.json`` (these settings: the data's tag is then
    ``synthetic_LA``, ``dataloaders.data_tag``) and ``train.list`` / ``test.list`` (the last ``num_test``
    ids) under ``out_dir`` in the LA layout; return the folder. Refuses an existing non-empty
    folder unless ``overwrite``, which replaces only the files written here."""
    shape = tuple(int(size) for size in shape)
    validate_args(num_cases, num_test, shape, size_jitter, seed)
    out_dir = Path(out_dir).resolve()
    split_paths = {split: out_dir / name for split, name in SPLIT_FILES.items()}
    claim_output_dir(out_dir, overwrite, split_paths.values())
    ids = [ID_FORMAT.format(index) for index in range(num_cases)]
    shapes, fractions = [], []
    for index, case_id in enumerate(tqdm(ids, desc="synthetic cases", unit="case")):
        rng = np.random.default_rng([seed, index])
        image, label = make_case(rng, case_shape(rng, shape, size_jitter))
        write_case(case_path(out_dir, case_id), image, label)
        shapes.append(image.shape)
        fractions.append(label.mean())
    record = {"writer": "code/dataloaders/synthetic.py", "num_cases": num_cases, "num_test": num_test,
              "shape": list(shape), "size_jitter": size_jitter, "seed": seed}
    write_json(out_dir / SYNTHETIC_RECORD, record)
    write_list(split_paths["train"], ids[:-num_test])
    write_list(split_paths["test"], ids[-num_test:])
    print(summary(out_dir, num_cases - num_test, num_test, shapes, fractions))
    return out_dir


def summary(out_dir, num_train, num_test, shapes, fractions):
    """One-line report of a written dataset."""
    low, high = np.min(shapes, axis=0), np.max(shapes, axis=0)
    ranges = " x ".join(f"{lo}" if lo == hi else f"{lo}-{hi}" for lo, hi in zip(low, high))
    return (f"wrote {len(shapes)} synthetic cases ({num_train} train / {num_test} test) to {out_dir}; "
            f"shapes {ranges}; mean foreground fraction {np.mean(fractions):.1%}")


def parse_args(argv=None):
    parser = ArgumentParser(description="Write a synthetic dataset in the Left Atrium h5 layout.")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help="output folder, relative to the current directory (default: %(default)s)")
    parser.add_argument("--num_cases", type=int, default=20, help="number of cases (default: 20)")
    parser.add_argument("--num_test", type=int, default=4,
                        help="the last NUM_TEST cases form test.list (default: 4)")
    parser.add_argument("--shape", type=int, nargs=3, default=(96, 96, 48), metavar=("X", "Y", "Z"),
                        help="nominal volume shape; z is fixed, x and y vary per case (default: 96 96 48)")
    parser.add_argument("--size_jitter", type=float, default=0.15,
                        help="x and y vary by up to this fraction, in [0, 0.5) (default: 0.15)")
    parser.add_argument("--seed", type=int, default=0, help="random seed, >= 0 (default: 0)")
    parser.add_argument("--overwrite", action="store_true",
                        help="write into a non-empty folder, replacing only the files written here")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    make_synthetic_dataset(args.out, args.num_cases, args.num_test, args.shape, args.size_jitter,
                           args.seed, args.overwrite)


if __name__ == "__main__":
    run_cli(main)
