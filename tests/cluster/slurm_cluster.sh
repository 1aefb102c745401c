#!/usr/bin/env bash
# A single-node SLURM cluster on this machine, for tests/cluster/test_slurm.py: slurmctld and slurmd on
# localhost, one partition ("debug") with the machine's CPUs and two GPU slots (gres "gpu" backed by
# /dev/null and /dev/zero, so that the README's `--gres=gpu:1` script runs as written on a CPU machine), every file
# under STATE (default /tmp/ssl3d-slurm). Needs root (slurmd runs jobs as their user) and the Debian packages
# slurm-wlm and munge (INSTALL=1 installs them with apt-get).
#
#   bash tests/cluster/slurm_cluster.sh start    # prints the SLURM_CONF to export
#   bash tests/cluster/slurm_cluster.sh stop     # stops the daemons it started (by the pids it recorded)
#   bash tests/cluster/slurm_cluster.sh status
set -euo pipefail
ACTION=${1:-}
STATE=${STATE:-/tmp/ssl3d-slurm}
CONF=$STATE/slurm.conf
PIDS=$STATE/started.pids  # the daemons this script started: "name pid" lines

started() {  # started NAME PIDFILE: record the pid of a daemon this script started
    echo "$1 $(cat "$2")" >> "$PIDS"
}

alive() {  # alive PID: whether the process runs
    kill -0 "$1" 2>/dev/null
}

write_config() {
    local host cpus memory
    host=$(hostname)
    cpus=$(nproc)
    memory=$(awk '/MemTotal/ { print int($2 / 1024 * 0.8) }' /proc/meminfo)
    mkdir -p "$STATE/state" "$STATE/spool" "$STATE/log"
    cat > "$CONF" <<CONF
ClusterName=ssl3d
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
# the grace between the SIGTERM at a time limit (or scancel) and the SIGKILL
KillWait=30
MinJobAge=3600
GresTypes=gpu
StateSaveLocation=$STATE/state
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
NodeName=$host CPUs=$cpus RealMemory=$memory Gres=gpu:2 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
    printf 'AutoDetect=off\nName=gpu File=/dev/null\nName=gpu File=/dev/zero\n' > "$STATE/gres.conf"
}

start_munge() {  # a munged that answers, started here unless one runs
    if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
        return
    fi
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge 2>/dev/null || true
    [ -f /etc/munge/munge.key ] || { mungekey --create 2>/dev/null || /usr/sbin/create-munge-key -f; }
    /usr/sbin/munged --force --pid-file "$STATE/munged.pid" 2>/dev/null || /usr/sbin/munged --force
    sleep 1
    [ -f "$STATE/munged.pid" ] && started munged "$STATE/munged.pid"
    munge -n | unmunge >/dev/null || { echo "error: munged does not answer" >&2; exit 1; }
}

start() {
    if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
        if [ "${INSTALL:-0}" = 1 ]; then
            DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge >/dev/null
        else
            echo "error: slurm-wlm and munge are not installed (INSTALL=1 installs them with apt-get)" >&2
            exit 2
        fi
    fi
    if [ -f "$PIDS" ]; then
        echo "error: a cluster started from $STATE may still run; stop it first (bash $0 stop)" >&2
        exit 2
    fi
    write_config
    : > "$PIDS"
    start_munge
    export SLURM_CONF=$CONF
    slurmctld -f "$CONF"
    sleep 1
    started slurmctld "$STATE/slurmctld.pid"
    slurmd -f "$CONF"
    sleep 1
    started slurmd "$STATE/slurmd.pid"
    local waited=0
    until sinfo -h -o %t 2>/dev/null | grep -qE '^(idle|mix|alloc)'; do
        if [ "$waited" -ge 60 ]; then
            echo "error: the node is not up after 60 s (log: $STATE/log/)" >&2
            exit 1
        fi
        scontrol update nodename="$(hostname)" state=resume >/dev/null 2>&1 || true
        sleep 2
        waited=$((waited + 2))
    done
    echo "SLURM $(sinfo --version | cut -d' ' -f2) up: export SLURM_CONF=$CONF"
}

stop() {
    [ -f "$PIDS" ] || { echo "no cluster started from $STATE"; return; }
    local name pid
    while read -r name pid; do
        alive "$pid" && kill "$pid" && echo "stopped $name ($pid)"
    done < <(tac "$PIDS")
    rm -f "$PIDS"
}

case "$ACTION" in
    start) start ;;
    stop) stop ;;
    status) SLURM_CONF=$CONF sinfo 2>&1 || true ;;
    *) echo "usage: bash $0 start|stop|status" >&2; exit 2 ;;
esac
