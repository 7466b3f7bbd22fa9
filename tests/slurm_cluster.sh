#!/usr/bin/env bash
# A SLURM cluster on localhost for the `slurm` tests: munged, slurmctld and three slurmd.
#
#   bash tests/slurm_cluster.sh start    # prints `export SLURM_CONF=…`; idempotent
#   bash tests/slurm_cluster.sh stop
#
# Partition `debug` (the default) is one node, `solo`, with every core. Partition `multi`
# is three nodes, `n1`, `n2` and `n3`, each with half the cores (a 2-node job and a spare,
# for node failures). All four are slurmd daemons on this machine (Debian's slurm-wlm is
# built with multiple-slurmd support), each with its own node name, port (6818,
# 17001-17003), spool, pid and log file. No node may be named
# like the host (`localhost`): slurmctld then calls the others' NodeHostname a duplicate.
# The node names resolve to 127.0.0.1 (added to /etc/hosts), so that a rendezvous by node
# name (MASTER_ADDR=n1) stays on loopback.
# Both partitions share the same cores: run one test at a time.
#
# Needs root and the Debian packages slurm-wlm and munge (.ci/run installs them).
# Everything lives under $GIGAMIL_SLURM_DIR (default /tmp/gigamil-slurm); settings follow
# what was measured on these machines (fast requeue: cred_expire=10, 2 s scheduling).
set -euo pipefail
DIR=${GIGAMIL_SLURM_DIR:-/tmp/gigamil-slurm}
CONF=$DIR/slurm.conf

alive() {  # the daemon of pid file $1 runs (a zombie left by a kill does not count)
    [ -s "$1" ] || return 1
    local state
    state=$(ps -o stat= -p "$(cat "$1")" 2>/dev/null) || return 1
    [ -n "$state" ] && [ "${state#Z}" = "$state" ]
}

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
    HALF=$(( CPUS / 2 > 0 ? CPUS / 2 : 1 ))
    grep -qE '^127\.0\.0\.1[[:space:]].*\bn3\b' /etc/hosts || echo "127.0.0.1 solo n1 n2 n3" >> /etc/hosts
    cat > "$CONF" <<CONF
ClusterName=gigamil-test
SlurmctldHost=localhost(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
AuthInfo=cred_expire=10
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool-%n
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
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
NodeName=solo NodeHostname=localhost NodeAddr=127.0.0.1 Port=6818 CPUs=$CPUS RealMemory=$(( CPUS * 2048 + 1024 )) State=UNKNOWN
NodeName=n1 NodeHostname=localhost NodeAddr=127.0.0.1 Port=17001 CPUs=$HALF RealMemory=$(( HALF * 2048 + 1024 )) State=UNKNOWN
NodeName=n2 NodeHostname=localhost NodeAddr=127.0.0.1 Port=17002 CPUs=$HALF RealMemory=$(( HALF * 2048 + 1024 )) State=UNKNOWN
NodeName=n3 NodeHostname=localhost NodeAddr=127.0.0.1 Port=17003 CPUs=$HALF RealMemory=$(( HALF * 2048 + 1024 )) State=UNKNOWN
PartitionName=debug Nodes=solo Default=YES MaxTime=INFINITE State=UP
PartitionName=multi Nodes=n1,n2,n3 MaxTime=INFINITE State=UP
CONF
    export SLURM_CONF=$CONF
    alive "$DIR/slurmctld.pid" || slurmctld -f "$CONF"
    for node in solo n1 n2 n3; do
        alive "$DIR/slurmd-$node.pid" || slurmd -f "$CONF" -N "$node"
    done
    for _ in $(seq 60); do
        states=$(sinfo -h -N -o "%N %T" 2>/dev/null | sort -u || true)
        up=$(echo "$states" | grep -cE ' (idle|mixed|allocated)$' || true)
        [ "$up" = 4 ] && { echo "export SLURM_CONF=$CONF"; return 0; }
        for node in $(echo "$states" | awk '$2 ~ /^(drain|down)/ {print $1}'); do
            scontrol update nodename="$node" state=resume >/dev/null 2>&1 || true
        done
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
