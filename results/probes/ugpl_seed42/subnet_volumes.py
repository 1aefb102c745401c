"""Diagnosis of UGPL at seed 42 (results.md here): per case, the Dice of each UGPL network and of their
average (the method's prediction), and the predicted foreground volume over the true one, for one checkpoint
of a run; a CSV on stdout.

    python results/probes/ugpl_seed42/subnet_volumes.py <run folder> iter_3375.pth test > volumes.csv
"""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "code"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from dataloaders.registry import get_dataset_spec  # noqa: E402
from test_3D import read_run  # noqa: E402
from utils.checkpoint import load_checkpoint, load_models  # noqa: E402
from utils.evaluation import prepare_for_inference  # noqa: E402
from utils.metrics import dice_score  # noqa: E402
from utils.sliding_window import sliding_window_inference  # noqa: E402


def main(run_dir, checkpoint, split):
    config, args, module = read_run(run_dir)
    nets = module.build_networks(args)
    load_models(load_checkpoint(run_dir / checkpoint), nets, run_dir / checkpoint, config["script"])
    device = torch.device("cpu")
    prepare_for_inference(nets, device)
    predictors = {"subnet_a": lambda x: torch.softmax(nets["subnet_a"](x), dim=1),
                  "subnet_b": lambda x: torch.softmax(nets["subnet_b"](x), dim=1),
                  "average": lambda x: module.predict(nets, x)}
    dataset = get_dataset_spec(args.dataset).dataset_class(Path(args.root_path), split)
    print("case," + ",".join(f"dice_{name},volume_{name}" for name in predictors))
    with torch.no_grad():
        for index in range(len(dataset)):
            sample = dataset[index]
            image, truth = np.squeeze(np.asarray(sample["image"])), np.asarray(sample["label"]) > 0
            cells = []
            for predict in predictors.values():
                labels, _ = sliding_window_inference(predict, image, args.patch_size, args.stride_xy, args.stride_z,
                                                     2, device)
                cells += [f"{100 * dice_score(labels > 0, truth):.2f}", f"{(labels > 0).sum() / truth.sum():.3f}"]
            print(f"{dataset.case_ids[index]}," + ",".join(cells), flush=True)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(Path(sys.argv[1]).resolve(), sys.argv[2], sys.argv[3])
