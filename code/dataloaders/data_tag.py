"""Which data a run reads, from the data itself: the tag its runs and tables carry, never ``--dataset`` alone.

``synthetic.py`` leaves ``synthetic.json`` in the dataset it writes and ``resample.py`` leaves ``resample.json``;
a root with neither holds the data as given (a dataset's own release, converted). The tag is then
``synthetic_<dataset>`` (``synthetic_LA``), ``<dataset>_half`` (``<dataset>_x<scale>`` for another scale) or the
dataset's name, so that the default run folder (``--exp {dataset}/MT``) and a table never file a run on the
synthetic or the half-resolution data as the dataset's, nor place it beside published numbers.

Torch-free: ``code/report/summarize.py`` reads it.
"""
import hashlib
import json
from pathlib import Path

SYNTHETIC_RECORD = "synthetic.json"
RESAMPLE_RECORD = "resample.json"
SPLIT_LISTS = ("train.list", "test.list", "val.txt")


def data_kind(root):
    """``"synthetic"``, ``"resampled"`` or ``"as given"``, by the record the data's writer left in ``root``."""
    root = Path(root)
    if (root / SYNTHETIC_RECORD).is_file():
        return "synthetic"
    if (root / RESAMPLE_RECORD).is_file():
        return "resampled"
    return "as given"


def resample_scale(root):
    """The scale ``resample.py`` recorded (one number when the axes share it), or None when unreadable."""
    try:
        scale = json.loads((Path(root) / RESAMPLE_RECORD).read_text(encoding="utf-8")).get("scale")
        scales = {float(s) for s in scale} if isinstance(scale, list) else {float(scale)}
    except (OSError, ValueError, TypeError, AttributeError):
        return None
    return scales.pop() if len(scales) == 1 else None


def data_tag(dataset, root):
    """The tag of data ``root`` of ``dataset`` (see the module docstring)."""
    kind = data_kind(root)
    if kind == "synthetic":
        return f"synthetic_{dataset}"
    if kind == "resampled":
        scale = resample_scale(root)
        return f"{dataset}_half" if scale == 0.5 else f"{dataset}_x{scale:g}" if scale else f"{dataset}_resampled"
    return dataset


def data_record(dataset, root):
    """What ``config.json`` keeps of the data a run read: its root, kind, tag and the SHA-256 of each split list
    present (the same lists give the same hashes wherever the data lies)."""
    root = Path(root)
    lists = {name: hashlib.sha256((root / name).read_bytes()).hexdigest()
             for name in SPLIT_LISTS if (root / name).is_file()}
    return {"root": str(root), "kind": data_kind(root), "tag": data_tag(dataset, root), "lists_sha256": lists}
