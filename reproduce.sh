#!/usr/bin/env bash
# Train and evaluate every method that exists for the labelled counts and seeds given, then print the results.
#
#   bash reproduce.sh                              # LA at data/LA: 8 and 16 labels, seed 1337
#   LABELNUMS="8" SEEDS="1337 2024 42" bash reproduce.sh
#   DATA_ROOT=/data/LA DEVICE=cuda bash reproduce.sh
#
# Environment: DATA_ROOT (default data/LA), LABELNUMS (default "8 16"), SEEDS (default "1337"),
# METHODS (default: every method below), DEVICE (auto|cpu|cuda, default auto), EXTRA_ARGS (added to
# every training command). Finished runs are skipped, interrupted ones resumed (--resume), and a failed
# run is reported while the others go on; the script exits non-zero at the end if any failed.
# QUICK_LABELNUMS (default "4") and QUICK_ITERATIONS (default 20) set the synthetic quick start.
#
# When no dataset is found at DATA_ROOT, it says so, writes the synthetic dataset to data/synthetic_LA
# and runs a short quick-start configuration end to end (a few minutes on a laptop CPU). Its numbers
# only show that the pipeline works; they are not comparable with any paper.
set -uo pipefail
cd "$(dirname "$0")"

DATA_ROOT=${DATA_ROOT:-data/LA}
LABELNUMS=${LABELNUMS:-"8 16"}
SEEDS=${SEEDS:-1337}
METHODS=${METHODS:-"supervised mt uamt dtc cps ugmcl ucseg ugpl"}
DEVICE=${DEVICE:-auto}
EXTRA_ARGS=${EXTRA_ARGS:-}
PYTHON=${PYTHON:-python}

declare -A SCRIPT=([supervised]=train_supervised_3D.py [mt]=train_mt_3D.py [uamt]=train_uamt_3D.py
                   [dtc]=train_dtc_3D.py [cps]=train_cps_3D.py [ugmcl]=train_ugmcl_3D.py
                   [ucseg]=train_ucseg_3D.py [ugpl]=train_ugpl_3D.py)
declare -A EXP=([supervised]=Supervised [mt]=MT [uamt]=UAMT [dtc]=DTC [cps]=CPS [ugmcl]=UGMCL [ucseg]=UCSeg
                [ugpl]=UGPL)
declare -A MODEL=([supervised]=vnet [mt]=vnet [uamt]=vnet [dtc]=vnet_sdf [cps]=vnet [ugmcl]=vnet_sdf
                  [ucseg]=unet_3D_vnet [ugpl]=resnet_vnet)
declare -A ITERATIONS=([supervised]=6000 [mt]=6000 [uamt]=6000 [dtc]=6000 [cps]=6000 [ugmcl]=6000
                       [ucseg]=50000 [ugpl]=6000)
# flags a method needs in the quick start's batch of 2 (semi-supervised: 1 labelled + 1 unlabelled crop)
declare -A QUICK_ARGS=([supervised]="" [mt]="--labeled_bs 1" [uamt]="--labeled_bs 1" [dtc]="--labeled_bs 1"
                       [cps]="--labeled_bs 1" [ugmcl]="--labeled_bs 1" [ucseg]="--labeled_bs 1"
                       [ugpl]="--labeled_bs 1")
COMMON=(--device "$DEVICE")
QUICK=0
DATASET_TAG=LA

if [ ! -f "$DATA_ROOT/train.list" ]; then
    echo "No dataset at $DATA_ROOT (see data/README.md). Quick start on synthetic data instead."
    DATA_ROOT=data/synthetic_LA
    if [ ! -f "$DATA_ROOT/train.list" ]; then
        "$PYTHON" code/dataloaders/synthetic.py --out "$DATA_ROOT" --num_cases 20 --num_test 4 \
            --shape 96 96 48 --seed 0 || exit 1
    fi
    LABELNUMS=${QUICK_LABELNUMS:-"4"}
    DATASET_TAG=quickstart_synthetic
    for method in "${!ITERATIONS[@]}"; do ITERATIONS[$method]=${QUICK_ITERATIONS:-20}; done
    COMMON+=(--patch_size 64 64 32 --batch_size 2 --stride_xy 16 --stride_z 8)
    QUICK=1
fi

failed=()
results=()
for seed in $SEEDS; do
    for labelnum in $LABELNUMS; do
        for method in $METHODS; do
            script=${SCRIPT[$method]:-}
            if [ -z "$script" ]; then
                echo "unknown method '$method' (known: ${!SCRIPT[*]})"; failed+=("$method"); continue
            fi
            exp="${DATASET_TAG}_seed${seed}/${EXP[$method]}"
            run="model/${exp}_${labelnum}/${MODEL[$method]}"
            iterations=${ITERATIONS[$method]}
            args=(--root_path "$DATA_ROOT" --exp "$exp" --labelnum "$labelnum" --seed "$seed"
                  --max_iterations "$iterations" --no_eval "${COMMON[@]}")
            # shellcheck disable=SC2206
            [ "$QUICK" = 1 ] && args+=(${QUICK_ARGS[$method]})
            # shellcheck disable=SC2206
            args+=($EXTRA_ARGS)
            if [ -f "$run/iter_${iterations}.pth" ]; then
                echo "== $method, $labelnum labels, seed $seed: trained already ($run)"
            else
                [ -f "$run/latest.pth" ] && args+=(--resume)
                echo "== $method, $labelnum labels, seed $seed: training -> $run"
                if ! "$PYTHON" "code/$script" "${args[@]}"; then
                    echo "!! $method, $labelnum labels, seed $seed: training failed"
                    failed+=("$method/$labelnum/$seed"); continue
                fi
            fi
            if ls -d "$run"/eval_iter_"${iterations}"* >/dev/null 2>&1; then
                echo "== evaluated already: $(ls -d "$run"/eval_iter_"${iterations}"* | head -n 1)"
            elif ! "$PYTHON" code/test_3D.py --run "$run" --device "$DEVICE"; then
                echo "!! $method, $labelnum labels, seed $seed: evaluation failed"
                failed+=("$method/$labelnum/$seed"); continue
            fi
            results+=("$run")
        done
    done
done

echo
echo "Results (mean over test cases; Dice/Jaccard in %, 95HD/ASD in voxels):"
for run in "${results[@]}"; do
    "$PYTHON" - "$run" <<'PY'
import json, sys
from pathlib import Path
run = Path(sys.argv[1])
summary = sorted(run.glob("eval_iter_*"))[0] / "summary.json"
s = json.loads(summary.read_text())
fmt = lambda m, k=1: "nan" if s[m]["mean"] is None else f"{k * s[m]['mean']:.2f}"
print(f"  {str(run):60s} Dice {fmt('dice', 100)}  Jaccard {fmt('jaccard', 100)}  95HD {fmt('hd95')}  "
      f"ASD {fmt('asd')}  ({s['num_cases']} cases, LCC {'on' if s['protocol']['nms'] else 'off'})")
PY
done
if [ ${#failed[@]} -gt 0 ]; then
    echo "FAILED: ${failed[*]}"
    exit 1
fi
