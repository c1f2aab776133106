#!/usr/bin/env bash
# Turn this machine into a one-node SLURM cluster for CI: Debian/Ubuntu, run as
# root, no systemd needed (containers). Idempotent: re-running it on a machine
# where the cluster is already up changes nothing and returns in about a second;
# when the generated slurm.conf differs from the one in place, the daemons are
# restarted (the controller keeps its jobs: state is saved under
# /var/spool/slurmctld). The daemons are left running when the script exits.
#
#   .ci/slurm-up.sh            # install, configure, start, wait for the node, print sinfo
#
# Environment (all optional):
#   SLURM_UP_TIMEOUT=60        seconds to wait for the node to become usable
#   SLURM_UP_CRED_EXPIRE=10    AuthInfo cred_expire: lifetime of a job/step credential,
#                              and how long a requeued job waits before it may start
#                              again (Slurm's default, 120 s, is slow for CI)
#
# Node: NodeName=$(hostname -s), NodeAddr=127.0.0.1, CPUs=$(nproc), RealMemory a
# bit below the available memory; one partition "debug" (default, no time limit).
# Scheduling is per CPU (select/cons_tres + CR_CPU): `--ntasks=2` fits on 2 cores.
# No cgroups (proctrack/linuxproc, task/none), no accounting. Jobs may run as root.
# Logs: /var/log/slurm/{slurmctld,slurmd}.log, /var/log/munge/munged.log.
set -euo pipefail

TIMEOUT=${SLURM_UP_TIMEOUT:-60}
CRED_EXPIRE=${SLURM_UP_CRED_EXPIRE:-10}
CONF=/etc/slurm/slurm.conf
LOG_DIR=/var/log/slurm
CTLD_PID=/run/slurmctld.pid
SLURMD_PID=/run/slurmd.pid
APT_LOG=/tmp/slurm-up-apt.log
T0=$SECONDS

say() { echo "slurm-up: $*" >&2; }

dump_logs() {
    local f
    # *.out: what a daemon printed before it opened its log (e.g. config errors)
    for f in "$LOG_DIR/slurmctld.out" "$LOG_DIR/slurmctld.log" "$LOG_DIR/slurmd.out" \
             "$LOG_DIR/slurmd.log" /var/log/munge/munged.out /var/log/munge/munged.log; do
        [ -s "$f" ] || continue
        echo "---- tail -n 40 $f" >&2
        tail -n 40 "$f" >&2 || true
    done
    if command -v scontrol >/dev/null 2>&1; then
        echo "---- scontrol show node" >&2
        timeout 10 scontrol show node >&2 2>&1 || true
    fi
}

die() {
    say "ERROR: $*"
    dump_logs
    exit 1
}

usage_error() { say "ERROR: $*"; exit 2; }
[ "$(id -u)" -eq 0 ] || usage_error "must run as root"
case "$TIMEOUT" in ''|*[!0-9]*) usage_error "SLURM_UP_TIMEOUT must be a number of seconds";; esac
case "$CRED_EXPIRE" in ''|*[!0-9]*|[0-4]) usage_error "SLURM_UP_CRED_EXPIRE must be a number of seconds >= 5";; esac

# ---------------------------------------------------------------- packages
PKGS=(slurmctld slurmd slurm-client munge)
missing=()
for p in "${PKGS[@]}"; do
    dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q '^install ok installed$' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    say "installing ${missing[*]} ..."
    export DEBIAN_FRONTEND=noninteractive
    apt_install() {
        apt-get install -y -q --no-install-recommends "${missing[@]}" >>"$APT_LOG" 2>&1
    }
    : >"$APT_LOG"
    if ! apt_install; then
        say "apt-get install failed; running apt-get update and retrying"
        if ! { apt-get update -q >>"$APT_LOG" 2>&1 && apt_install; }; then
            tail -n 30 "$APT_LOG" >&2
            die "could not install ${missing[*]} (full log: $APT_LOG)"
        fi
    fi
fi
for c in munged munge unmunge slurmctld slurmd sinfo scontrol; do
    command -v "$c" >/dev/null 2>&1 || die "$c not found after installation"
done
# `sinfo --version` needs a configuration before slurm.conf exists (22.05 then tries
# a configless DNS SRV lookup and dies), so ask slurmd; sinfo agrees once it's set up.
SLURM_VERSION=$(slurmd -V | awk '{print $NF}')
case "$SLURM_VERSION" in
    # SlurmctldHost (20.02+ only; ControlMachine removed in 23.02), select/cons_tres
    # (19.05+) and AuthInfo=cred_expire (20.11+) are used below.
    1[0-9].*|20.0[0-9]*) die "slurm $SLURM_VERSION is too old for this config (needs 20.11+)";;
esac

# ---------------------------------------------------------------- munge
getent passwd munge >/dev/null || die "user munge does not exist (munge package broken?)"
install -d -o munge -g munge -m 0700 /etc/munge /var/lib/munge /var/log/munge
install -d -o munge -g munge -m 0755 /run/munge
KEY=/etc/munge/munge.key
if [ ! -s "$KEY" ]; then
    say "creating $KEY"
    umask_old=$(umask); umask 077
    if command -v mungekey >/dev/null 2>&1; then
        rm -f "$KEY"
        mungekey --create --keyfile="$KEY" >/dev/null
    else
        dd if=/dev/urandom of="$KEY" bs=1 count=1024 status=none
    fi
    umask "$umask_old"
fi
chown munge:munge "$KEY"
chmod 0400 "$KEY"

munge_ok() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }
if ! munge_ok; then
    # not running, or a stale socket/pid file from a previous container:
    # --force overrides the stale socket and container permission warnings.
    say "starting munged"
    runuser -u munge -- munged --force </dev/null >>/var/log/munge/munged.out 2>&1 \
        || die "munged failed to start"
    for _ in $(seq 50); do munge_ok && break; sleep 0.2; done
    munge_ok || die "munge does not work (munge -n | unmunge fails)"
fi

# ---------------------------------------------------------------- slurm.conf
HOST=$(hostname -s)
[ -n "$HOST" ] || die "hostname -s is empty"
if ! getent hosts "$HOST" >/dev/null; then
    say "adding $HOST to /etc/hosts"
    echo "127.0.0.1 $HOST" >>/etc/hosts
fi
CPUS=$(nproc)
mem_total_mb=$(awk '/^MemTotal:/ {print int($2/1024)}' /proc/meminfo)
mem_avail_mb=$(awk '/^MemAvailable:/ {print int($2/1024)}' /proc/meminfo)
REAL_MEM=$(( mem_avail_mb * 90 / 100 ))
# Keep the value already configured while it is still plausible, so that re-runs
# do not rewrite slurm.conf (and restart the daemons) for every memory wobble.
if [ -f "$CONF" ]; then
    prev=$(sed -n 's/^NodeName=.*RealMemory=\([0-9][0-9]*\).*/\1/p' "$CONF" | head -n1)
    if [ -n "$prev" ] && [ "$prev" -le $(( mem_total_mb * 95 / 100 )) ] \
        && [ "$prev" -ge $(( mem_avail_mb * 50 / 100 )) ]; then
        REAL_MEM=$prev
    fi
fi
[ "$REAL_MEM" -ge 1 ] || REAL_MEM=1

install -d -m 0755 /etc/slurm "$LOG_DIR" /var/spool/slurmctld /var/spool/slurmd
tmp_conf=$(mktemp /etc/slurm/.slurm.conf.XXXXXX)
trap 'rm -f "$tmp_conf"' EXIT
cat >"$tmp_conf" <<EOF
# Generated by .ci/slurm-up.sh (slurm $SLURM_VERSION): a one-node CI cluster.
# Do not edit by hand: re-running the script overwrites it.
ClusterName=ci
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort=6817
SlurmdPort=6818
AuthType=auth/munge
CredType=cred/munge
AuthInfo=cred_expire=$CRED_EXPIRE
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=$SLURMD_PID
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
MailProg=/bin/true
MpiDefault=none
SwitchType=switch/none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
# one node: scheduling passes are cheap; pending (e.g. requeued) jobs start within ~2 s
# of becoming eligible instead of waiting for the 60 s / 30 s default passes
SchedulerParameters=sched_interval=2,bf_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
JobRequeue=1
InactiveLimit=0
WaitTime=0
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$REAL_MEM State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF
chmod 0644 "$tmp_conf"
conf_changed=0
if [ -f "$CONF" ] && cmp -s "$tmp_conf" "$CONF"; then
    rm -f "$tmp_conf"
else
    [ -f "$CONF" ] && cp -p "$CONF" "$CONF.bak"
    mv -f "$tmp_conf" "$CONF"
    conf_changed=1
    say "wrote $CONF (NodeName=$HOST CPUs=$CPUS RealMemory=$REAL_MEM)"
fi
trap - EXIT

# ---------------------------------------------------------------- daemons
# pid of a running daemon: from its pid file when that is alive and is the
# daemon, else the oldest process with that exact name (started by someone else).
daemon_pid() { # name pidfile
    local pid=""
    if [ -s "$2" ]; then
        pid=$(tr -dc '0-9' <"$2")
        if [ -z "$pid" ] || [ "$(cat "/proc/$pid/comm" 2>/dev/null)" != "$1" ]; then
            pid=""
        fi
    fi
    [ -n "$pid" ] || pid=$(pgrep -xo "$1" || true)
    echo "$pid"
}

stop_daemon() { # name pidfile
    local pid
    pid=$(daemon_pid "$1" "$2")
    [ -n "$pid" ] || return 0
    say "stopping $1 (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 100); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.2
    done
    say "$1 (pid $pid) ignored SIGTERM for 20 s; killing it"
    kill -KILL "$pid" 2>/dev/null || true
    sleep 0.5
}

start_daemon() { # name pidfile args...
    local name=$1 pidfile=$2
    shift 2
    say "starting $name"
    # The daemons fork into the background themselves; keep our stdout/stderr
    # (maybe a CI log pipe) out of them.
    "$name" "$@" </dev/null >>"$LOG_DIR/$name.out" 2>&1 || die "$name failed to start"
    for _ in $(seq 50); do
        [ -n "$(daemon_pid "$name" "$pidfile")" ] && return 0
        sleep 0.2
    done
    die "$name is not running after start"
}

ctld_up() { timeout 15 scontrol ping 2>/dev/null | grep -q 'is UP'; }

if [ "$conf_changed" = 1 ]; then
    stop_daemon slurmd "$SLURMD_PID"
    stop_daemon slurmctld "$CTLD_PID"
fi

if [ -n "$(daemon_pid slurmctld "$CTLD_PID")" ] && ! ctld_up; then
    sleep 2  # it may be starting up
    ctld_up || stop_daemon slurmctld "$CTLD_PID"
fi
[ -n "$(daemon_pid slurmctld "$CTLD_PID")" ] || start_daemon slurmctld "$CTLD_PID"
for _ in $(seq 50); do ctld_up && break; sleep 0.2; done
ctld_up || die "slurmctld does not answer (scontrol ping)"

slurmd_started_at=0
if [ -z "$(daemon_pid slurmd "$SLURMD_PID")" ]; then
    slurmd_started_at=$(date +%s)
    start_daemon slurmd "$SLURMD_PID" -N "$HOST"
fi

# ---------------------------------------------------------------- wait for the node
node_state() { timeout 15 sinfo -h -N -n "$HOST" -o '%T' 2>/dev/null | head -n1; }
# After a restart the controller shows the node's saved state (e.g. idle) before
# the new slurmd has registered: only trust it once SlurmdStartTime is ours.
slurmd_registered() {
    [ "$slurmd_started_at" = 0 ] && return 0
    local t
    t=$(timeout 15 scontrol show node "$HOST" 2>/dev/null \
        | sed -n 's/.*SlurmdStartTime=\([0-9T:-]*\).*/\1/p' | head -n1)
    [ -n "$t" ] && t=$(date -d "$t" +%s 2>/dev/null) || return 1
    [ "$t" -ge $(( slurmd_started_at - 1 )) ]
}
resumed=0
state=""
deadline=$(( SECONDS + TIMEOUT ))
while :; do
    state=$(node_state || true)
    case "$state" in
        idle|mixed|allocated|completing)  # usable (busy if jobs are running)
            slurmd_registered && break;;
        *drain*|down|*fail*)
            # ReturnToService=2 brings back a DOWN node when it registers, but not
            # one drained by hand or by an earlier failure: resume it once.
            if [ "$resumed" = 0 ] && [ -n "$(daemon_pid slurmd "$SLURMD_PID")" ]; then
                say "node $HOST is $state; resuming it"
                timeout 15 scontrol update NodeName="$HOST" State=RESUME >/dev/null 2>&1 || true
                resumed=1
            fi;;
    esac
    if [ -z "$(daemon_pid slurmd "$SLURMD_PID")" ]; then
        die "slurmd died (node state: ${state:-unknown})"
    fi
    [ "$SECONDS" -lt "$deadline" ] || die "node $HOST not usable after ${TIMEOUT}s (state: ${state:-unknown})"
    sleep 0.5
done

say "slurm $SLURM_VERSION up: node $HOST is $state ($(( SECONDS - T0 ))s)"
sinfo
