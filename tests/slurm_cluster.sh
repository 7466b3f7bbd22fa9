#!/usr/bin/env bash
# A one-node SLURM cluster on localhost for the `slurm` tests: munged, slurmctld, slurmd.
#
#   bash tests/slurm_cluster.sh start    # prints `export SLURM_CONF=…`; idempotent
#   bash tests/slurm_cluster.sh stop
#
# Needs root and the Debian packages slurm-wlm and munge (.ci/run installs them).
# Everything lives under $GIGAMIL_SLURM_DIR (default /tmp/gigamil-slurm); settings follow
# what was measured on these machines (fast requeue: cred_expire=10, 2 s scheduling).
set -euo pipefail
DIR=${GIGAMIL_SLURM_DIR:-/tmp/gigamil-slurm}
CONF=$DIR/slurm.conf

start() {
    command -v slurmctld >/dev/null && command -v munged >/dev/null || {
        echo "slurm-wlm and munge are not installed (apt-get install -y slurm-wlm munge)" >&2
        exit 3
    }
    [ "$(id -u)" = 0 ] || { echo "the local cluster needs root" >&2; exit 3; }
    mkdir -p "$DIR"/{state,spool,log} /run/munge /var/log/munge /var/lib/munge /etc/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge /etc/munge 2>/dev/null || true
    if [ ! -s /etc/munge/munge.key ]; then
        dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null
        chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
    fi
    pgrep -x munged >/dev/null || runuser -u munge -- munged
    # the node's cores, whatever OMP_NUM_THREADS says (GNU nproc honours it)
    CPUS=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)
    cat > "$CONF" <<CONF
ClusterName=gigamil-test
SlurmctldHost=localhost(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
AuthInfo=cred_expire=10
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=2048
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
JobRequeue=1
SchedulerParameters=sched_interval=2,bf_interval=2
MinJobAge=600
KillWait=5
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$(( CPUS * 2048 + 1024 )) State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
CONF
    export SLURM_CONF=$CONF
    pgrep -x slurmctld >/dev/null || slurmctld -f "$CONF"
    pgrep -x slurmd >/dev/null || slurmd -f "$CONF" -N localhost
    for _ in $(seq 60); do
        state=$(sinfo -h -o %T 2>/dev/null | head -1 || true)
        case "$state" in
            idle|mixed|allocated) echo "export SLURM_CONF=$CONF"; return 0 ;;
            drain*|down*) scontrol update nodename=localhost state=resume >/dev/null 2>&1 || true ;;
        esac
        sleep 0.5
    done
    echo "the local SLURM cluster did not come up; see $DIR/log" >&2
    exit 1
}

stop() {
    export SLURM_CONF=$CONF
    scancel --user="$(id -un)" 2>/dev/null || true
    for _ in $(seq 40); do  # let cancelled jobs finish, or the node comes back drained
        [ -z "$(squeue -h 2>/dev/null)" ] && break
        sleep 0.25
    done
    pkill -x slurmd 2>/dev/null || true
    pkill -x slurmctld 2>/dev/null || true
    for _ in $(seq 20); do pgrep -x slurmd >/dev/null || pgrep -x slurmctld >/dev/null || break; sleep 0.25; done
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
