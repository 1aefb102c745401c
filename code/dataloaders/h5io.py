"""Reading and writing one case of an h5 dataset (keys ``image`` float32, ``label`` uint8 {0, 1}).

Every reader in the project goes through :func:`read_case`, so that a corrupt file, a missing key,
non-binary labels or mismatched shapes give the same one-line :class:`~utils.errors.DataError`
naming the file, never a traceback from inside h5py or numpy.
"""
import os
from pathlib import Path

import h5py
import numpy as np

from utils.atomic import temporary_name
from utils.errors import DataError

IMAGE_KEY = "image"
LABEL_KEY = "label"


def _open(path):
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        if isinstance(exc, PermissionError) or "errno = 13" in str(exc) or not os.access(path, os.R_OK):
            raise DataError(f"{path}: cannot be read: permission denied") from None
        raise DataError(f"{path}: cannot be read as HDF5 (corrupt or truncated?): {exc}") from None


def _dataset(handle, key, path):
    if key not in handle:
        keys = ", ".join(sorted(handle.keys())) or "none"
        raise DataError(f"{path}: no '{key}' dataset (keys present: {keys})")
    found = handle[key]
    if not isinstance(found, h5py.Dataset):
        raise DataError(f"{path}: '{key}' is an HDF5 {type(found).__name__.lower()}, not a dataset of voxels")
    return found


def physical_memory():
    """Bytes of memory of this machine (``sysconf``), or None where the system does not tell."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # no os.sysconf (Windows), or a name the system lacks
        return None


def check_fits_in_memory(path, *datasets):
    """Refuse, before reading, datasets whose declared size exceeds the machine's memory: a damaged or foreign
    file can declare any shape, and reading it would fail in numpy's allocation or be killed by the system."""
    needed = sum(ds.nbytes for ds in datasets)
    memory = physical_memory()
    if memory is not None and needed > memory:
        raise DataError(f"{path}: its datasets declare {needed / 2 ** 30:.1f} GiB (shape "
                        f"{datasets[0].shape}), more than this machine's memory ({memory / 2 ** 30:.1f} GiB); "
                        "a damaged or wrong file?")


def read_shapes(path):
    """Return ``(image_shape, label_shape)`` from the file's metadata, without reading voxels."""
    with _open(path) as handle:
        return (tuple(_dataset(handle, IMAGE_KEY, path).shape),
                tuple(_dataset(handle, LABEL_KEY, path).shape))


def _shown(values):
    values = np.unique(values)
    return ", ".join(str(v) for v in values[:8]) + (", ..." if values.size > 8 else "")


def check_label(label, path, num_classes=2):
    """Raise a :class:`DataError` unless every label value is one of the class ids ``0 .. num_classes-1``.

    A label stored as floats must hold whole numbers: casting ``0.5`` to ``uint8`` would silently make it
    background, and a run would train and report a Dice on labels that are not the data's."""
    if label.dtype.kind not in "biuf":
        raise DataError(f"{path}: label must be numeric, found dtype {label.dtype}")
    if label.dtype.kind == "f":
        fractional = ~np.isfinite(label) | (label != np.floor(label))
        if fractional.any():
            raise DataError(f"{path}: label values must be the class ids 0..{num_classes - 1}, found values "
                            f"that are not whole numbers: {_shown(label[fractional])}")
    if label.size and (label.min() < 0 or label.max() >= num_classes):
        raise DataError(f"{path}: label values must be in 0..{num_classes - 1}, found {_shown(label)}")


def read_case(path, num_classes=2):
    """Read and validate one case; return ``(image float32, label uint8)``.

    Raises :class:`DataError` for a missing, unreadable or
    corrupt file, missing keys or keys that are not datasets, a non-3D volume, image and label of different
    shapes, an axis of length 0, volumes larger than the memory, label values that are not class ids
    ``0 .. num_classes-1``, or an image with NaN or infinite values.
    """
    with _open(path) as handle:
        image_ds = _dataset(handle, IMAGE_KEY, path)
        label_ds = _dataset(handle, LABEL_KEY, path)
        if image_ds.ndim != 3:
            raise DataError(f"{path}: image must be a 3D volume, got shape {image_ds.shape}")
        if image_ds.shape != label_ds.shape:
            raise DataError(f"{path}: image shape {image_ds.shape} and label shape {label_ds.shape} differ")
        if 0 in image_ds.shape:
            raise DataError(f"{path}: image and label have an axis of length 0 (shape {image_ds.shape})")
        check_fits_in_memory(path, image_ds, label_ds)
        try:
            label = label_ds[()]
            image = image_ds[()].astype(np.float32, copy=False)
        except OSError as exc:
            raise DataError(f"{path}: voxel data cannot be read (corrupt?): {exc}") from None
        except MemoryError:
            raise DataError(f"{path}: its voxels ({image_ds.shape}) do not fit in the memory left") from None
    check_label(label, path, num_classes)
    if not np.isfinite(image).all():
        raise DataError(f"{path}: image contains NaN or infinite values")
    return image, label.astype(np.uint8, copy=False)


def write_case(path, image, label, compression="gzip"):
    """Write one case atomically (temporary file, then rename), creating parent folders."""
    image = np.asarray(image, dtype=np.float32)
    label = np.asarray(label, dtype=np.uint8)
    if image.shape != label.shape:
        raise DataError(f"{path}: image shape {image.shape} and label shape {label.shape} differ")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    with h5py.File(tmp, "w") as handle:
        handle.create_dataset(IMAGE_KEY, data=image, compression=compression)
        handle.create_dataset(LABEL_KEY, data=label, compression=compression)
    os.replace(tmp, path)
