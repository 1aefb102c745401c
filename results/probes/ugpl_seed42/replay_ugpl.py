"""Diagnosis of UGPL at seed 42 (results.md here): replay the first N iterations of the CPU table's UGPL run
with its own command and record, per iteration, on the unlabelled crops, the foreground fraction of each
network's prediction, of the union pseudo-label (over all voxels, and over the kept ones: how many are kept is
the log's kept_fraction) and of the true labels.

The training is the script's own (same seed, batches and weights: the logged losses equal the run's log); the
recording wraps ``filtered_pseudo_label`` and reads the unlabelled crops' labels, which the method never sees.

    python results/probes/ugpl_seed42/replay_ugpl.py 42 1000 replay_seed42.json
    python results/probes/ugpl_seed42/replay_ugpl.py 42 1000 replay_seed42_code_faithful.json --code_faithful

Flags after the output file are added to the run's command (``--code_faithful``: the released code's terms).
"""
import json
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "code"))

import torch  # noqa: E402

import train_ugpl_3D as ugpl  # noqa: E402
from utils.run import TrainingRun  # noqa: E402


def foreground(mask):
    return float(mask.float().mean()) if mask.numel() else 0.0


def main(seed, iterations, out, extra_flags=()):
    rows, truth = [], {}
    next_batch, pseudo_label, log = TrainingRun.next_batch, ugpl.filtered_pseudo_label, TrainingRun.log

    def recording_next_batch(self, batches):
        batch = next_batch(self, batches)
        truth["unlabelled"] = foreground(batch["label"][2:] > 0)
        return batch

    def recording_pseudo_label(logits_a, logits_b, *args, **kwargs):
        target = pseudo_label(logits_a, logits_b, *args, **kwargs)
        union = torch.maximum(logits_a.argmax(dim=1), logits_b.argmax(dim=1))
        rows.append({"iteration": len(rows) + 1, "true": truth["unlabelled"],
                     "net_a": foreground(logits_a.argmax(dim=1) == 1), "net_b": foreground(logits_b.argmax(dim=1) == 1),
                     "union": foreground(union == 1), "union_kept": float(ugpl.pseudo_foreground(target))})
        return target

    def stopping_log(self, iteration, *args, **kwargs):
        log(self, iteration, *args, **kwargs)
        if iteration >= iterations:
            Path(out).write_text(json.dumps(rows))
            raise SystemExit(0)

    TrainingRun.next_batch, ugpl.filtered_pseudo_label, TrainingRun.log = (recording_next_batch,
                                                                          recording_pseudo_label, stopping_log)
    scratch = tempfile.mkdtemp(prefix="ugpl_replay_")
    try:
        ugpl.main(["--exp", f"replay_seed{seed}/UGPL", "--labelnum", "4", "--seed", str(seed), "--max_iterations",
                   "3375", "--lr_step", "1406", "--iterations_per_epoch", "84.375", "--root_path",
                   str(ROOT / "data/LA_half"), "--output_root", scratch, "--device", "cpu", "--patch_size", "64", "64",
                   "32", "--stride_xy", "16", "--stride_z", "8", "--n_filters", "8", "--nms", "0", "--num_workers",
                   "2", "--batch_size", "4", "--labeled_bs", "2", "--recompute", "off", "--progress", "0",
                   *extra_flags])
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4:])
