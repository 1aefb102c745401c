#!/usr/bin/env bash
# Train and evaluate every method for the labelled counts and seeds given, then write the results table
# (code/report/summarize.py) and the figures (code/report/plots.py).
#
#   bash reproduce.sh                              # LA at data/LA: 8 and 16 labels, seed 1337, paper protocols
#   LABELNUMS="8" SEEDS="1337 2024 42" bash reproduce.sh
#   DATA_ROOT=/data/LA DEVICE=cuda bash reproduce.sh
#   QUICK=1 bash reproduce.sh                      # CPU protocol on half-resolution LA (~2 days on 2 cores)
#   QUICK=1 SEEDS=1337 JOBS=2 bash reproduce.sh    # its first seed, two runs at a time
#
# Three protocols, chosen by what is there:
# - the papers' (DATA_ROOT holds LA): every method with its paper's iterations, patch and schedule, plus the
#   fully supervised upper bound; table docs/results.md, figures docs/figures/.
# - QUICK=1 (DATA_ROOT holds LA): a CPU protocol chosen by measured criteria (docs/cpu_protocol.md). A
#   half-resolution copy of LA is written once to data/LA_half (code/dataloaders/resample.py); every method and
#   its matched control run at 4 labels, seeds 1337, 2024 and 42, with networks of width QUICK_WIDTH (default 8:
#   --n_filters, the same for all) on 64x64x32 crops, 2 labelled crops per iteration for every method (the
#   labelled-only runs batches of 2, the others QUICK_SEMI_BATCH="2 2": 2 labelled + 2 unlabelled, the papers')
#   for QUICK_ITERATIONS (default 3375) iterations, its schedule (lr steps, consistency ramps, mixing start)
#   shrunk in proportion, one compute thread per run, two runs at a time on 2 cores, and every method is
#   evaluated the same way: sliding window at stride 16/8, largest component off, final weights; table
#   docs/results_quick.md made from the run files in results/LA_half_quick/, figures docs/figures_quick/. Not
#   comparable with the papers. (The earlier 8-label, one-seed version: docs/results_quick_8labels.md.)
# - no dataset at DATA_ROOT: the synthetic quick start. A synthetic dataset is written to SYNTHETIC_ROOT
#   (default data/synthetic_LA) and every method runs QUICK_ITERATIONS (default 10) iterations on 64x64x32
#   crops, batches of 2, sliding window at stride 32/16; table and figures go next to the runs. Its numbers
#   only show that the pipeline works.
#
# Every semi-supervised method can also train its matched control (CONTROLS=1, or METHODS="mt mt_control"): its own
# script with --labelled_only 1, every loss term that reads an unlabelled crop off, the same networks, batches and
# schedule; the table then shows each method's gain over its own control.
#
# Environment: DATA_ROOT (default data/LA), LABELNUMS (default "8 16"; QUICK: "4"; synthetic: "4"), SEEDS
# (default "1337"; QUICK: "1337 2024 42"), CONTROLS (1: each semi-supervised method's control after it; default 0,
# QUICK: 1), LABEL_SEEDS (draws of the labelled cases, --label_seed, each run for every seed; default: none,
# the first LABELNUM cases of the list as in the papers; the table then separates the two spreads), VAL_NUM (cases
# held out of the training list for validation, --val_num, validated every VAL_INTERVAL iterations, default a tenth
# of the run; the weights best on validation are evaluated beside the final ones; default 0, the papers'), METHODS
# (default: every method below), UPPER_BOUND (1: also the supervised run on every training case; default 1),
# DEVICE (auto|cpu|cuda, default auto), EXTRA_ARGS (added to every training command), OUTPUT_ROOT (where the runs
# go, default model/reproduce/<protocol>), RESULTS and FIGURES (where the table and the figures go: the committed
# docs/ files for the default OUTPUT_ROOT, else beside the runs), RUN_FILES (where the files that define the
# table's numbers are copied and the table is made from: results/<protocol> for the default OUTPUT_ROOT of the
# real-data protocols, else none), PLOTS (0: no figures), QUICK_ITERATIONS, QUICK_PATCH, QUICK_STRIDE ("XY Z"),
# QUICK_WIDTH, QUICK_SEMI_BATCH ("labelled unlabelled" crops of the semi-supervised methods; synthetic: "1 1"),
# QUICK_THREADS, HALF_ROOT, SYNTHETIC_ROOT, SYNTHETIC_SHAPE. A variable that is almost one of these (LABELNUM,
# METHOD, SEED, quick, OUTPUT_DIR, ...) and any argument stop the script in one line before anything runs;
# `bash reproduce.sh --help` prints this text.
# Finished runs are skipped, interrupted ones resumed (--resume), and a failed run is
# reported while the others go on; the script exits non-zero at the end if any failed.
#
# Several runs at once: JOBS=N runs N at a time (each with its console output in OUTPUT_ROOT/logs/), GPUS="0 1"
# spreads them over those devices (CUDA_VISIBLE_DEVICES per job slot), each job's data loader with its share of
# the CPUs (nproc / JOBS - 1 workers, at least 2; EXTRA_ARGS="--num_workers K" overrides); the table is the same
# as a sequential call's (both run with the same compute threads: OMP_NUM_THREADS, else torch's default). QUICK=1
# fixes QUICK_THREADS (default 1) threads per run and runs JOBS (default: one job per QUICK_THREADS cores, at most
# 4) at a time: on 2 cores two runs of one thread train its table 1.3-1.6 times faster than one run of two
# (docs/benchmarks.md). PRINT_JOBS=1 prints one command per run instead (for a SLURM
# job array or GNU parallel): each trains and evaluates its run with SUMMARY=0 (no table), and several may share
# the output folder; a plain call afterwards skips the finished runs and writes the table and the figures.
set -uo pipefail
cd "$(dirname "$0")"

# the settings (environment variables) this script reads; the header above says what each does
SETTINGS="DATA_ROOT QUICK LABELNUMS SEEDS CONTROLS LABEL_SEEDS VAL_NUM VAL_INTERVAL METHODS UPPER_BOUND DEVICE
EXTRA_ARGS OUTPUT_ROOT RESULTS FIGURES RUN_FILES PLOTS PYTHON QUICK_ITERATIONS QUICK_PATCH QUICK_STRIDE QUICK_WIDTH
QUICK_SEMI_BATCH QUICK_THREADS QUICK_LABELNUMS HALF_ROOT SYNTHETIC_ROOT SYNTHETIC_SHAPE JOBS GPUS PRINT_JOBS SUMMARY"

usage() {  # the header's comment, without its '#'
    sed -n '2,/^set -uo pipefail/p' "$0" | sed '$d; s/^# \{0,1\}//'
}

near_miss() {  # near_miss NAME: the setting NAME was probably meant to be (a plural without its s, another
    # case, a usual other name), or nothing
    local name=$1 setting
    case $name in
        OUTPUT_DIR|OUTPUT_FOLDER|OUTPUT_PATH|OUT_DIR) echo OUTPUT_ROOT; return ;;
        DATA_DIR|DATA_PATH|DATASET_ROOT|ROOT_PATH) echo DATA_ROOT; return ;;
    esac
    for setting in $SETTINGS; do
        if [ "$name" != "$setting" ] && { [ "${name^^}" = "$setting" ] || [ "${name}S" = "$setting" ]; }; then
            echo "$setting"; return
        fi
    done
}

case "${1:-}" in
    -h|--help) usage; exit 0 ;;
    "") ;;
    *) echo "error: reproduce.sh takes no arguments, its settings are environment variables (LABELNUMS=4 bash" \
            "reproduce.sh); got '$1'. See bash reproduce.sh --help" >&2; exit 2 ;;
esac
for name in $(compgen -e); do
    meant=$(near_miss "$name")
    if [ -n "$meant" ]; then
        echo "error: $name is not a setting of reproduce.sh; did you mean $meant? (bash reproduce.sh --help)" >&2
        exit 2
    fi
done

PASSED=()  # the settings the caller gave, repeated in every command of PRINT_JOBS=1
for name in DATA_ROOT QUICK DEVICE EXTRA_ARGS OUTPUT_ROOT PYTHON PLOTS HALF_ROOT SYNTHETIC_ROOT SYNTHETIC_SHAPE \
            QUICK_ITERATIONS QUICK_PATCH QUICK_STRIDE QUICK_WIDTH QUICK_SEMI_BATCH QUICK_LABELNUMS \
            QUICK_THREADS VAL_NUM VAL_INTERVAL OMP_NUM_THREADS; do
    [ -n "${!name+x}" ] && PASSED+=("$name=${!name}")
done

DATA_ROOT=${DATA_ROOT:-data/LA}
OUTPUT_ROOT_GIVEN=${OUTPUT_ROOT:+1}  # the committed tables and run files are written only for the default root
LABEL_SEEDS=${LABEL_SEEDS:-}
VAL_NUM=${VAL_NUM:-0}
VAL_INTERVAL=${VAL_INTERVAL:-}
METHODS=${METHODS:-"supervised mt uamt dtc cps ugmcl ucseg ugpl"}
UPPER_BOUND=${UPPER_BOUND:-1}
DEVICE=${DEVICE:-auto}
EXTRA_ARGS=${EXTRA_ARGS:-}
PLOTS=${PLOTS:-1}
PYTHON=${PYTHON:-python}
QUICK=${QUICK:-0}
JOBS=${JOBS:-}  # default: QUICK's below, else 1
GPUS=${GPUS:-}
PRINT_JOBS=${PRINT_JOBS:-0}
SUMMARY=${SUMMARY:-1}
if [ -n "$JOBS" ] && ! [[ "$JOBS" =~ ^[1-9][0-9]*$ ]]; then
    echo "error: JOBS must be a positive whole number, got '$JOBS'" >&2
    exit 2
fi
PARALLEL_BASH=$(( BASH_VERSINFO[0] * 100 + BASH_VERSINFO[1] >= 501 ))  # wait -n -p, for JOBS > 1
CORES=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)  # the machine's, not the threads asked of one run
if ! [[ "$VAL_NUM" =~ ^[0-9]+$ ]]; then
    echo "error: VAL_NUM must be a whole number, got '$VAL_NUM'" >&2
    exit 2
fi

child=0
stop_status=0
declare -A running=()  # JOBS > 1: the job subshells still running, pid -> "method labelnum seed draw"
on_signal() {  # on_signal STATUS: pass the stop on to the running step or jobs (they save and exit), then stop
    stop_status=$1
    [ "$child" != 0 ] && kill -TERM "$child" 2>/dev/null
    local pid
    for pid in "${!running[@]}"; do
        kill -TERM "$pid" 2>/dev/null
    done
}
trap 'on_signal 130' INT
trap 'on_signal 143' TERM

step() {  # step COMMAND...: run one Python step in the background and wait, so that a signal reaches the trap
    "$@" &
    child=$!
    local status=0
    wait "$child" || status=$?
    while kill -0 "$child" 2>/dev/null; do  # the trap interrupted wait: the step is still saving
        status=0
        wait "$child" || status=$?
    done
    child=0
    if [ "$stop_status" != 0 ] || [ "$status" = 130 ] || [ "$status" = 143 ]; then
        [ "$stop_status" != 0 ] || stop_status=$status
        echo "!! stopped by a signal; run the same command again to continue (finished runs are skipped, an"
        echo "   interrupted one resumes from its last checkpoint, an unfinished evaluation is redone)"
        exit "$stop_status"
    fi
    return "$status"
}

CONTROL=_control  # METHOD_control: the method's matched control (--labelled_only 1), in the folder EXP_control

# Each method's protocol, as its script code/train_<method>_3D.py says it (--print_protocol, read for all methods at
# once by code/utils/protocols.py): the run folder's name, the network, the paper's iterations, whether it is
# semi-supervised, has a matched control and --recompute, and its flags counted in iterations (lr step, ramp
# epoch, UC-Seg's first mixing iteration), which the shorter protocols shrink in proportion. A copied script is
# run like any other; one that cannot say its protocol stops the call here, before anything runs.
declare -A EXP=() MODEL=() ITERATIONS=() SEMI=() CONTROLLABLE=() RECOMPUTE=() SCHEDULE=()
read_protocols() {  # read_protocols: fill the arrays above for every method of METHODS; else exit 2
    local names=() job method protocols exp model iterations semi controllable recompute schedule
    for job in $METHODS; do
        method=${job%"$CONTROL"}
        [[ " ${names[*]} " == *" $method "* ]] || names+=("$method")
    done
    protocols=$("$PYTHON" code/utils/protocols.py "${names[@]}") || exit 2
    while IFS=$'\t' read -r method exp model iterations semi controllable recompute schedule; do
        EXP[$method]=$exp MODEL[$method]=$model ITERATIONS[$method]=$iterations SEMI[$method]=$semi
        CONTROLLABLE[$method]=$controllable RECOMPUTE[$method]=$recompute SCHEDULE[$method]=$schedule
    done <<< "$protocols"
    for job in $METHODS; do
        method=${job%"$CONTROL"}
        if [ "$method" != "$job" ] && [ "${CONTROLLABLE[$method]}" != 1 ]; then
            echo "error: METHODS names $job, but code/train_${method}_3D.py has no matched control" \
                 "(--labelled_only)" >&2
            exit 2
        fi
    done
}
read_protocols

if [ -f "$DATA_ROOT/train.list" ]; then
    if [ "$QUICK" = 1 ]; then
        PROTOCOL=LA_half_quick
        HALF_ROOT=${HALF_ROOT:-data/LA_half}
        if [ ! -f "$HALF_ROOT/resample.json" ]; then
            # --overwrite: a copy that an interrupted call left without its record is rewritten (only the
            # files resample.py writes)
            step "$PYTHON" code/dataloaders/resample.py --src "$DATA_ROOT" --dst "$HALF_ROOT" --scale 0.5 \
                --overwrite || exit 1
        fi
        DATA_ROOT=$HALF_ROOT
        LABELNUMS=${LABELNUMS:-4}
        SEEDS=${SEEDS:-"1337 2024 42"}
        CONTROLS=${CONTROLS:-1}
        QUICK_ITERATIONS=${QUICK_ITERATIONS:-3375}
        QUICK_PATCH=${QUICK_PATCH:-"64 64 32"}
        QUICK_STRIDE=${QUICK_STRIDE:-"16 8"}
        QUICK_WIDTH=${QUICK_WIDTH:-8}
        QUICK_NMS=0
        QUICK_SEMI_BATCH=${QUICK_SEMI_BATCH:-"2 2"}
        # one compute thread per run, whatever JOBS is: the thread count changes a CPU run's arithmetic (the
        # weights differ as with another seed), so the table is reproduced case for case only with the same
        # count; two runs at once with one thread each train it fastest on 2 cores (docs/benchmarks.md)
        QUICK_THREADS=${QUICK_THREADS:-1}
        if ! [[ "$QUICK_THREADS" =~ ^[1-9][0-9]*$ ]]; then
            echo "error: QUICK_THREADS must be a positive whole number, got '$QUICK_THREADS'" >&2
            exit 2
        fi
        export OMP_NUM_THREADS=$QUICK_THREADS
        [ "$PARALLEL_BASH" = 1 ] && JOBS=${JOBS:-$(( CORES / QUICK_THREADS < 4 ? CORES / QUICK_THREADS : 4 ))}
        DOCS_RESULTS=docs/results_quick.md
        DOCS_FIGURES=docs/figures_quick
        NOTE="CPU protocol (QUICK=1 bash reproduce.sh, docs/cpu_protocol.md): LA at half resolution, \
networks of width $QUICK_WIDTH, $QUICK_ITERATIONS iterations on ${QUICK_PATCH// /x} crops in batches of 2 \
labelled crops (labelled-only runs) or ${QUICK_SEMI_BATCH% *} labelled + ${QUICK_SEMI_BATCH#* } unlabelled \
(semi-supervised methods and their controls), schedules shrunk in proportion, every method evaluated with the \
sliding window at stride ${QUICK_STRIDE// //} and the largest component off, final weights. NOT comparable with \
the papers' numbers."
    else
        PROTOCOL=LA
        LABELNUMS=${LABELNUMS:-"8 16"}
        DOCS_RESULTS=docs/results.md
        DOCS_FIGURES=docs/figures
        NOTE="Each method with its paper's protocol on LA (bash reproduce.sh)."
    fi
else
    echo "No dataset at $DATA_ROOT (see data/README.md). Quick start on synthetic data instead."
    PROTOCOL=quickstart_synthetic
    DATA_ROOT=${SYNTHETIC_ROOT:-data/synthetic_LA}
    if [ ! -f "$DATA_ROOT/train.list" ]; then
        # shellcheck disable=SC2086
        # --overwrite: a dataset that an interrupted call left without its lists is rewritten
        step "$PYTHON" code/dataloaders/synthetic.py --out "$DATA_ROOT" --overwrite --num_cases 20 --num_test 4 \
            --shape ${SYNTHETIC_SHAPE:-96 96 48} --seed 0 || exit 1
    fi
    QUICK=1
    LABELNUMS=${LABELNUMS:-${QUICK_LABELNUMS:-4}}
    QUICK_ITERATIONS=${QUICK_ITERATIONS:-10}
    QUICK_PATCH=${QUICK_PATCH:-"64 64 32"}
    QUICK_STRIDE=${QUICK_STRIDE:-"32 16"}
    QUICK_WIDTH=${QUICK_WIDTH:-16}
    QUICK_SEMI_BATCH=${QUICK_SEMI_BATCH:-"1 1"}
    NOTE="Synthetic quick start (no dataset found): it shows that the pipeline works; the numbers mean nothing."
fi
OUTPUT_ROOT=${OUTPUT_ROOT:-model/reproduce/$PROTOCOL}
mkdir -p "$OUTPUT_ROOT" || exit 2
if [ -z "$OUTPUT_ROOT_GIVEN" ] && [ -n "${DOCS_RESULTS:-}" ]; then  # the committed table, figures and run files
    RESULTS=${RESULTS:-$DOCS_RESULTS}
    FIGURES=${FIGURES:-$DOCS_FIGURES}
    RUN_FILES=${RUN_FILES-results/$PROTOCOL}
fi
RESULTS=${RESULTS:-$OUTPUT_ROOT/results.md}
FIGURES=${FIGURES:-$OUTPUT_ROOT/figures}
RUN_FILES=${RUN_FILES:-}
SEEDS=${SEEDS:-1337}
CONTROLS=${CONTROLS:-0}
JOBS=${JOBS:-1}
[ "$JOBS" -ge 1 ] || JOBS=1
if [ "$JOBS" -gt 1 ] && [ "$PARALLEL_BASH" != 1 ]; then
    echo "error: JOBS=$JOBS needs bash 5.1 or newer (this is $BASH_VERSION); use JOBS=1 or PRINT_JOBS=1" >&2
    exit 2
fi
# each training evaluates its final weights (and best_val.pth) itself; test_3D.py evaluates a finished run that
# lacks an evaluation (stopped during it, or trained by another call)
COMMON=(--root_path "$DATA_ROOT" --output_root "$OUTPUT_ROOT" --device "$DEVICE")
if [ "$QUICK" = 1 ]; then
    read -r stride_xy stride_z <<< "$QUICK_STRIDE"
    # shellcheck disable=SC2206
    COMMON+=(--patch_size $QUICK_PATCH --stride_xy "$stride_xy" --stride_z "$stride_z"
             --n_filters "$QUICK_WIDTH")
    [ -n "${QUICK_NMS:-}" ] && COMMON+=(--nms "$QUICK_NMS")
fi
if [ "$JOBS" -gt 1 ]; then  # the jobs share the CPUs: each loader gets its part (the batches do not depend on it)
    workers=$(( CORES / JOBS - 1 ))
    COMMON+=(--num_workers $(( workers < 2 ? 2 : workers )))
fi

scaled() {  # scaled VALUE FROM TO: VALUE x TO / FROM, rounded, at least 1 (a schedule shrunk to a shorter run)
    awk -v v="$1" -v from="$2" -v to="$3" 'BEGIN { s = v * to / from; if (s < 1) s = 1; print int(s + 0.5) }'
}

schedule_args() {  # schedule_args METHOD: iterations and the schedule flags of the protocol: the paper's, or
    # each flag counted in iterations shrunk to QUICK_ITERATIONS in proportion (a whole number rounded, at least 1;
    # a fraction, as the ramp's epoch, exactly)
    local method=$1 iterations=${ITERATIONS[$1]}
    if [ "$QUICK" != 1 ]; then
        echo "--max_iterations $iterations"
        return
    fi
    local args="--max_iterations $QUICK_ITERATIONS" flag value
    # shellcheck disable=SC2086
    set -- ${SCHEDULE[$method]}
    while [ $# -ge 2 ]; do
        flag=$1 value=$2
        shift 2
        if [[ "$value" == *.* ]]; then
            value=$(awk -v v="$value" -v from="$iterations" -v to="$QUICK_ITERATIONS" 'BEGIN { print v * to / from }')
        else
            value=$(scaled "$value" "$iterations" "$QUICK_ITERATIONS")
        fi
        args+=" $flag $value"
    done
    echo "$args"
}

count_cases() {  # count_cases LIST: its case ids, counted as the scripts read it (blanks, spaces, CR aside)
    "$PYTHON" code/dataloaders/count_cases.py "$1"
}

failed=()
evaluated() {  # evaluated RUN [CHECKPOINT]: the folder of the run's own result for its final weights (or
    # CHECKPOINT), as code/utils/own_result.py decides it from what each evaluation recorded; else fails
    "$PYTHON" code/utils/own_result.py "$1" ${2:+--checkpoint "$2"} 2>/dev/null
}

run_one() {  # run_one METHOD LABELNUM SEED DRAW: train (or resume, or skip) and evaluate one run; DRAW is the
    # --label_seed of its labelled cases, or "first" for the first LABELNUM of the list
    local job=$1 labelnum=$2 seed=$3 draw=$4 method=${1%"$CONTROL"} control=
    [ "$method" != "$job" ] && control=$CONTROL
    local script=train_${method}_3D.py
    local exp="${PROTOCOL}_seed${seed}/${EXP[$method]}$control" what="$job, $labelnum labels, seed $seed"
    local tag
    tag=$(job_name "$job $labelnum $seed $draw")
    tag=${tag// //}
    if [ "$draw" != first ]; then
        exp="${PROTOCOL}_draw${draw}_seed${seed}/${EXP[$method]}$control"
        what+=", labelled draw $draw"
    fi
    local run="$OUTPUT_ROOT/${exp}_${labelnum}/${MODEL[$method]}"
    local schedule
    schedule=$(schedule_args "$method")
    local iterations=${ITERATIONS[$method]}
    [ "$QUICK" = 1 ] && iterations=$QUICK_ITERATIONS
    # shellcheck disable=SC2206
    local args=(--exp "$exp" --labelnum "$labelnum" --seed "$seed" $schedule "${COMMON[@]}")
    [ "$draw" != first ] && args+=(--label_seed "$draw")
    [ -n "$control" ] && args+=(--labelled_only 1)
    if [ "$VAL_NUM" != 0 ]; then  # validated every VAL_INTERVAL iterations, by default a tenth of the run
        args+=(--val_num "$VAL_NUM" --val_interval "${VAL_INTERVAL:-$(( iterations >= 10 ? iterations / 10 : 1 ))}")
    fi
    if [ "$QUICK" = 1 ]; then  # the labelled-only runs: 2 labelled crops; the others QUICK_SEMI_BATCH
        local labelled unlabelled
        read -r labelled unlabelled <<< "$QUICK_SEMI_BATCH"
        if [ "${SEMI[$method]}" = 0 ]; then
            args+=(--batch_size 2)
        else
            args+=(--batch_size $((labelled + unlabelled)) --labeled_bs "$labelled")
        fi
    fi
    # small crops fit in memory without recomputing activations (a runtime flag: the same weights, faster)
    [ "$QUICK" = 1 ] && [ "${RECOMPUTE[$method]}" = 1 ] && args+=(--recompute off)
    # shellcheck disable=SC2206
    args+=($EXTRA_ARGS)  # last, so that the caller's flags win
    if [ -f "$run/iter_${iterations}.pth" ]; then
        if ! step "$PYTHON" code/utils/same_settings.py "$run" "code/$script" "${args[@]}"; then
            echo "!! $what: the finished run in $run was trained with other"
            echo "   settings (above); move it away to train it again, or call reproduce.sh with its settings"
            failed+=("$tag"); return
        fi
        echo "== $what: trained already ($run)"
    else
        # a run folder that exists is continued: from its latest.pth, or from the start when it was stopped
        # before writing one (the script checks that its settings are the same)
        [ -d "$run" ] && args+=(--resume)
        echo "== $what: training -> $run"
        if ! step "$PYTHON" "code/$script" "${args[@]}"; then
            echo "!! $what: training or its evaluation failed"
            failed+=("$tag"); return
        fi
    fi
    local done_in
    if done_in=$(evaluated "$run"); then
        echo "== evaluated already: $done_in"
    elif ! step "$PYTHON" code/test_3D.py --run "$run" --device "$DEVICE"; then
        echo "!! $what: evaluation failed"
        failed+=("$tag")
    fi
    if [ -f "$run/best_val.pth" ] && ! evaluated "$run" best_val.pth >/dev/null \
            && ! step "$PYTHON" code/test_3D.py --run "$run" --device "$DEVICE" --checkpoint best_val.pth; then
        echo "!! $what: evaluation of best_val.pth failed"
        failed+=("$tag")
    fi
}

reap_one() {  # reap_one: wait for one job subshell to end; report it, record a failure or a stop
    local pid="" status=0
    wait -n -p pid "${!running[@]}" || status=$?
    [ -n "${pid:-}" ] || return 0  # a signal interrupted the wait (pid unset); the caller waits again
    local job=${running[$pid]} slot name
    name=$(job_name "${running[$pid]}")
    unset "running[$pid]"
    for slot in "${!slot_pid[@]}"; do
        [ "${slot_pid[$slot]}" = "$pid" ] && unset "slot_pid[$slot]"
    done
    if [ "$status" = 130 ] || [ "$status" = 143 ]; then
        [ "$stop_status" != 0 ] || stop_status=$status
    elif [ "$status" != 0 ]; then
        failed+=("${name// //}")
        echo "!! $name: failed (log: $(job_log "$job"))"
    else
        echo "== $name: done"
    fi
}

job_name() {  # job_name "METHOD LABELNUM SEED DRAW": how messages name a job ("mt 8 1337", "mt 8 1337 draw3")
    local method labelnum seed draw
    read -r method labelnum seed draw <<< "$1"
    echo "$method $labelnum $seed$([ "$draw" != first ] && echo " draw$draw")"
}

job_log() {  # job_log "METHOD LABELNUM SEED DRAW": the file that holds a parallel job's console output
    local method labelnum seed draw
    read -r method labelnum seed draw <<< "$1"
    echo "$OUTPUT_ROOT/logs/${method}_${labelnum}_seed${seed}$([ "$draw" != first ] && echo "_draw$draw").log"
}

run_parallel() {  # run_parallel: every job, JOBS at a time, each in a subshell with its own log and GPU slot
    local job method labelnum seed slot pid index=0 gpus
    read -r -a gpus <<< "$GPUS"
    mkdir -p "$OUTPUT_ROOT/logs"
    for job in "${job_list[@]}"; do
        while [ ${#running[@]} -ge "$JOBS" ] && [ "$stop_status" = 0 ]; do
            reap_one
        done
        [ "$stop_status" = 0 ] || break
        for slot in $(seq 0 $((JOBS - 1))); do
            [ -z "${slot_pid[$slot]:-}" ] && break
        done
        index=$((index + 1))
        read -r method labelnum seed draw <<< "$job"
        (
            running=()
            trap 'on_signal 130' INT
            trap 'on_signal 143' TERM
            [ ${#gpus[@]} -gt 0 ] && export CUDA_VISIBLE_DEVICES=${gpus[$((slot % ${#gpus[@]}))]}
            failed=()
            run_one "$method" "$labelnum" "$seed" "$draw"
            [ ${#failed[@]} = 0 ]
        ) > "$(job_log "$job")" 2>&1 &
        pid=$!
        running[$pid]=$job
        slot_pid[$slot]=$pid
        local where=""
        [ ${#gpus[@]} -gt 0 ] && where=" on GPU ${gpus[$((slot % ${#gpus[@]}))]}"
        echo "== [$index/${#job_list[@]}] $(job_name "$job"): started$where (log: $(job_log "$job"))"
    done
    while [ ${#running[@]} -gt 0 ]; do
        reap_one
    done
    if [ "$stop_status" != 0 ]; then
        echo "!! stopped by a signal; run the same command again to continue"
        exit "$stop_status"
    fi
}

time_left() {  # time_left TRAINED SECONDS REMAINING: an estimate from the runs this call trained so far
    if [ "$1" = 0 ]; then
        echo "no estimate of the time left yet"
    else
        echo "about $(( $2 / $1 * $3 / 60 )) min left at $(( $2 / $1 / 60 )) min a run so far (methods differ)"
    fi
}

run_sequential() {  # run_sequential: every job in order, with a counter and an estimate of the time left
    local job method labelnum seed draw index=0 trained=0 spent=0 began elapsed
    for job in "${job_list[@]}"; do
        index=$((index + 1))
        read -r method labelnum seed draw <<< "$job"
        echo "== [$index/${#job_list[@]}] $(time_left "$trained" "$spent" $(( ${#job_list[@]} - index + 1 )))"
        began=$(date +%s)
        run_one "$method" "$labelnum" "$seed" "$draw"
        elapsed=$(( $(date +%s) - began ))
        if [ "$elapsed" -ge 60 ]; then  # a skipped run takes seconds: only trained runs make the estimate
            trained=$((trained + 1))
            spent=$((spent + elapsed))
        fi
    done
}

listed=$(count_cases "$DATA_ROOT/train.list") || exit 2  # a list the scripts refuse: its one line is above
all_labels=$(( listed - VAL_NUM ))  # the upper bound: every case not held out
job_list=()  # "method labelnum seed draw", in the order a sequential call runs them
for seed in $SEEDS; do
    for draw in ${LABEL_SEEDS:-first}; do
        for labelnum in $LABELNUMS; do
            for method in $METHODS; do
                job_list+=("$method $labelnum $seed $draw")
                if [ "$CONTROLS" = 1 ] && [[ "$method" != *"$CONTROL" ]] && [ "${CONTROLLABLE[$method]}" = 1 ]; then
                    job_list+=("$method$CONTROL $labelnum $seed $draw")
                fi
            done
        done
    done
    if [ "$UPPER_BOUND" = 1 ] && [[ " $METHODS " == *" supervised "* ]]; then
        job_list+=("supervised $all_labels $seed first")  # every case is labelled: no draw to make
    fi
done

if [ "$PRINT_JOBS" = 1 ]; then  # one self-contained command per run, nothing trained here
    for job in "${job_list[@]}"; do
        read -r method labelnum seed draw <<< "$job"
        printf '%q ' env "${PASSED[@]}" "METHODS=$method" "LABELNUMS=$labelnum" "SEEDS=$seed" \
            "LABEL_SEEDS=$([ "$draw" != first ] && echo "$draw")" UPPER_BOUND=0 CONTROLS=0 \
            SUMMARY=0 bash "$PWD/reproduce.sh"
        echo
    done
    exit 0
fi

if command -v flock >/dev/null; then
    # the output folder belongs to one reproduce.sh that writes the table, or to any number of SUMMARY=0 jobs
    # (each run folder is locked by the process training in it); the lock passes to the steps
    exec 9>"$OUTPUT_ROOT/.reproduce.lock"
    if [ "$SUMMARY" = 0 ]; then
        flock -s -n 9 || { echo "error: a reproduce.sh that writes the table is still working in $OUTPUT_ROOT" >&2
                           exit 2; }
    elif ! flock -n 9; then
        echo "error: another reproduce.sh (or a step it started) is still working in $OUTPUT_ROOT" >&2
        exit 2
    fi
fi

declare -a slot_pid=()
echo "== $PROTOCOL: ${#job_list[@]} runs in $OUTPUT_ROOT, $JOBS at a time$([ "$SUMMARY" = 1 ] && echo "; table \
$RESULTS$([ -n "$RUN_FILES" ] && echo " from the run files in $RUN_FILES")")"
started=$(date +%s)
if [ "$JOBS" = 1 ]; then
    run_sequential
else
    run_parallel
fi
minutes=$(( ($(date +%s) - started + 59) / 60 ))

if [ "$SUMMARY" = 0 ]; then
    if [ ${#failed[@]} -gt 0 ]; then
        echo "FAILED: ${failed[*]}"
        exit 1
    fi
    exit 0
fi
echo
summary_args=(--model_dir "$OUTPUT_ROOT" --out "$RESULTS" --title "Results: $PROTOCOL" --note "$NOTE")
[ -n "$RUN_FILES" ] && summary_args+=(--run_files "$RUN_FILES")  # the table is made from the files committed
if ! step "$PYTHON" code/report/summarize.py "${summary_args[@]}"; then
    failed+=("summary")
elif [ "$PLOTS" = 1 ] && ! step "$PYTHON" code/report/plots.py --model_dir "$OUTPUT_ROOT" --out "$FIGURES" \
        --device "$DEVICE"; then
    failed+=("figures")
fi
if [ ${#failed[@]} -gt 0 ]; then
    echo "FAILED: ${failed[*]}"
    exit 1
fi
echo "Results in $RESULTS$([ "$PLOTS" = 1 ] && echo ", figures in $FIGURES")$([ -n "$RUN_FILES" ] && \
    echo ", the files that define them in $RUN_FILES") (this call: $minutes min)"
