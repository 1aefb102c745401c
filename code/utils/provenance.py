"""What an evaluation measured: its record in ``summary.json``, and the code a run or an evaluation ran with.

Every evaluation (the one at the end of training and every ``test_3D.py`` call) writes a ``provenance`` record
into its ``summary.json``, so that a number can be traced to its weights, network, cases and code without
trusting folder names:

- ``checkpoint``: the weights' path relative to the run folder (absolute when they lie outside it),
  ``checkpoint_in_run`` and ``checkpoint_sha256`` (the file's content hash);
- ``network``: the network evaluated in place of the method's own inference (``test_3D.py --network``), or null;
- ``split``, ``cases`` (the cases evaluated, in order) and ``complete_split`` (whether they are exactly the
  split's list);
- ``code``: the commit, whether the working tree differed from it, and that difference as ``git.diff`` in the
  evaluation folder; ``code_as_trained``: whether it is the code the run was trained with (null when unknown);
- ``evaluator``: the script that evaluated.

Torch-free: the tools that read finished runs (``code/report/``, ``reproduce.sh``) use it without torch.
"""
import hashlib
import json
import subprocess
from pathlib import Path

from utils.cli import REPO_ROOT

DIFF_FILE = "git.diff"


def _git(*cmd, check=True):
    return subprocess.run(["git", "-C", str(REPO_ROOT), *cmd], capture_output=True, encoding="utf-8",
                          errors="replace", timeout=10, check=check).stdout


def untracked_code_files():
    """The files under ``code/`` that git does not track (a copied method script), ignored ones (caches) aside;
    paths relative to the repository."""
    return sorted(set(_git("ls-files", "--others", "--exclude-standard", "-z", "--", "code").split("\0")) - {""})


def changed_code_files(untracked):
    """``{path: SHA-256, or "deleted"}`` of every file under ``code/`` that differs from the commit: edited or
    deleted tracked files, and ``untracked`` (:func:`untracked_code_files`)."""
    tracked = _git("diff", "--name-only", "-z", "HEAD", "--", "code").split("\0")
    return {path: file_sha256(REPO_ROOT / path) if (REPO_ROOT / path).is_file() else "deleted"
            for path in sorted(set(tracked + untracked) - {""})}


def code_record(folder):
    """Commit and dirty flag of the code, and ``changed_files`` (:func:`changed_code_files`); with uncommitted
    edits (a researcher trying an idea), their diff is written to ``folder/git.diff``, the content of the files
    under ``code/`` that git does not track included (``git apply`` restores them), so that what ran can be traced
    to its code. ``{"commit": None, "dirty": None}`` outside a git checkout."""
    try:
        commit = _git("rev-parse", "HEAD").strip() or None
        untracked = untracked_code_files()
        changed = changed_code_files(untracked)
        dirty = bool(_git("status", "--porcelain", "--untracked-files=no").strip()) or bool(changed)
        if dirty:
            diff = _git("diff", "HEAD") + "".join(_git("diff", "--no-index", "--", "/dev/null", path, check=False)
                                                  for path in untracked)
            (Path(folder) / DIFF_FILE).write_text(diff, encoding="utf-8")
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit, "dirty": dirty, "diff": DIFF_FILE if dirty else None, "changed_files": changed}


def same_code(trained, trained_folder, evaluated, evaluated_folder):
    """Whether two :func:`code_record` records (with the folders that hold their diffs) name the same code: the
    same commit, and no edits or the same edits; None when either commit is unknown."""
    if not trained or not evaluated or trained.get("commit") is None or evaluated.get("commit") is None:
        return None
    if trained["commit"] != evaluated["commit"] or bool(trained.get("dirty")) != bool(evaluated.get("dirty")):
        return False
    if not evaluated.get("dirty"):
        return True
    try:
        return (Path(trained_folder) / DIFF_FILE).read_bytes() == (Path(evaluated_folder) / DIFF_FILE).read_bytes()
    except OSError:
        return False


def file_sha256(path):
    """The SHA-256 of a file's content, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def checkpoint_record(run_dir, checkpoint):
    """The ``checkpoint``, ``checkpoint_in_run`` and ``checkpoint_sha256`` entries for weights at ``checkpoint``
    evaluated in ``run_dir`` (a link that leads out of the run counts as outside it)."""
    run_dir, path = Path(run_dir).resolve(), Path(checkpoint).resolve()
    inside = path.parent == run_dir
    return {"checkpoint": path.name if inside else str(path), "checkpoint_in_run": inside,
            "checkpoint_sha256": file_sha256(path)}


def run_code(run_dir):
    """The ``git`` record of the run's ``config.json`` (its training code), or None when it cannot be read."""
    try:
        config = json.loads((Path(run_dir) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return config.get("git") if isinstance(config, dict) else None


def evaluation_record(run_dir, checkpoint, *, network, split, cases, split_cases, evaluator, out_dir):
    """The ``provenance`` record of an evaluation of ``run_dir`` written into ``out_dir`` (see the module
    docstring); writes ``out_dir/git.diff`` when the code has uncommitted edits."""
    code = code_record(out_dir)
    return {**checkpoint_record(run_dir, checkpoint), "network": network, "split": split, "cases": list(cases),
            "complete_split": sorted(cases) == sorted(split_cases), "code": code,
            "code_as_trained": same_code(run_code(run_dir), run_dir, code, out_dir), "evaluator": evaluator}
