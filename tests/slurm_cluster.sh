#!/usr/bin/env bash
# A real SLURM cluster on this one host, for the tests: Debian slurm-wlm + munge, as root, no systemd.
# Emulated nodes n1..nN each run their own slurmd on 127.0.0.1 (ports 17001..).
#   tests/slurm_cluster.sh up [NNODES]        install if missing, configure, start, wait until all nodes idle
#                                  NNODES=1: one node named $(hostname -s)
#                                  NNODES>1: emulated nodes n1..nN (one slurmd each, ports 17001..)
#   tests/slurm_cluster.sh submit FILE [SECS] sbatch FILE, poll until finished, print its output,
#                                  exit with the job's exit code (124 on timeout)
#   tests/slurm_cluster.sh down               cancel jobs, stop the daemons started by 'up' (by PID file)
# GPUS_PER_NODE=N (with up): each node also offers N GPUs as SLURM sees them (a count in gres.conf,
# no device files): jobs can ask for --gpus-per-node and get SLURM_GPUS_ON_NODE, no CUDA device.
set -euo pipefail
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:$PATH

PKGS="slurmctld slurmd slurm-client munge"
CONF=/etc/slurm/slurm.conf
STATE=/var/lib/slurm/slurmctld
SPOOL=/var/lib/slurm/slurmd
LOGDIR=/var/log/slurm
MARK=/run/finetune-slurm.munge-started

log() { echo "[finetune-slurm $(date +%T)] $*" >&2; }

wait_for() { # wait_for SECS CMD... : poll CMD every 0.25 s until it succeeds
  local end=$((SECONDS + $1)); shift
  until "$@" >/dev/null 2>&1; do
    [ "$SECONDS" -lt "$end" ] || return 1
    sleep 0.25
  done
}

running() { # PID $1 exists, is not a zombie (PID 1 here may reap late), and is named $2 if given
  [ -r "/proc/$1/stat" ] && [ "$(sed 's/.*) //' "/proc/$1/stat" | cut -d' ' -f1)" != Z ] &&
    { [ -z "${2:-}" ] || [ "$(cat "/proc/$1/comm" 2>/dev/null)" = "$2" ]; }
}
alive() { [ -s "$1" ] && running "$(cat "$1")" "$2"; }   # alive PIDFILE NAME

stop_pidfile() { # stop_pidfile PIDFILE NAME: SIGTERM, wait up to 15 s, then SIGKILL; stale files only removed
  local f=$1 pid
  [ -s "$f" ] || { rm -f "$f"; return 0; }
  pid=$(cat "$f")
  if running "$pid" "$2"; then
    kill "$pid" 2>/dev/null || true
    wait_for 15 eval '! running '"$pid" || { log "SIGKILL $pid ($f)"; kill -9 "$pid" 2>/dev/null || true; }
  fi
  rm -f "$f"
}

node_names() {
  if [ "$NNODES" -eq 1 ]; then hostname -s; else seq -f 'n%g' 1 "$NNODES"; fi
}

install_pkgs() {
  if [ -x /usr/sbin/slurmctld ] && [ -x /usr/sbin/slurmd ] && [ -x /usr/bin/sbatch ] &&
     [ -x /usr/sbin/munged ]; then return; fi
  apt-cache show slurmctld >/dev/null 2>&1 || apt-get update -qq
  # policy-rc.d / missing systemd keep the packages from starting anything; we start daemons below
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $PKGS >/dev/null
}

start_munge() {
  if alive /run/munge/munged.pid munged && munge -n | unmunge >/dev/null 2>&1; then return; fi
  [ -s /etc/munge/munge.key ] || runuser -u munge -- mungekey -c   # the package normally made it
  install -d -o munge -g munge -m 0755 /run/munge
  runuser -u munge -- /usr/sbin/munged
  touch "$MARK"
  wait_for 10 bash -c 'munge -n | unmunge' || { log "munge does not work"; exit 1; }
}

write_conf() {
  local h hw mem nodeline
  h=$(hostname -s)
  # hardware line as slurmd sees it, e.g. "CPUs=2 Boards=1 SocketsPerBoard=1 CoresPerSocket=2 ThreadsPerCore=1"
  hw=$(slurmd -C | head -n1 | sed -e 's/^NodeName=[^ ]* //' -e 's/ RealMemory=.*//')
  mem=$(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' | head -n1)
  mem=$(( mem / NNODES / 2 ))
  local gpus=${GPUS_PER_NODE:-0} gres="" names
  [ "$gpus" -gt 0 ] && gres="Gres=gpu:$gpus"
  if [ "$NNODES" -eq 1 ]; then
    names=$h
    nodeline="NodeName=$h NodeAddr=127.0.0.1 $hw RealMemory=$mem $gres State=UNKNOWN"
  else
    names="n[1-$NNODES]"
    nodeline="NodeName=n[1-$NNODES] NodeHostname=$h NodeAddr=127.0.0.1 Port=[17001-$((17000 + NNODES))] $hw RealMemory=$mem $gres State=UNKNOWN"
  fi
  mkdir -p /etc/slurm
  if [ "$gpus" -gt 0 ]; then
    # Stand-in device files (not /dev/nvidia*, which would tell other programs of this host of a GPU).
    mkdir -p /run/finetune-slurm-gpus
    for i in $(seq 0 $((gpus - 1))); do : > "/run/finetune-slurm-gpus/gpu$i"; done
    echo "NodeName=$names Name=gpu File=/run/finetune-slurm-gpus/gpu[0-$((gpus - 1))]" > /etc/slurm/gres.conf
  else
    rm -f /etc/slurm/gres.conf
  fi
  cat > "$CONF" <<EOF
ClusterName=ci
SlurmctldHost=$h(127.0.0.1)
SlurmUser=slurm
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=$STATE
SlurmdSpoolDir=$SPOOL/%n
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd-%n.pid
SlurmctldLogFile=$LOGDIR/slurmctld.log
SlurmdLogFile=$LOGDIR/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
GresTypes=gpu
ReturnToService=2
# Time for train.py to save its state between SIGTERM and SIGKILL.
KillWait=30
$nodeline
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
  install -d -o slurm -g slurm "$STATE" "$LOGDIR"
  find "$STATE" -mindepth 1 -delete   # fresh controller state on every 'up'
}

up() {
  local t0=$SECONDS n
  install_pkgs
  log "packages ready ($((SECONDS - t0)) s)"
  down_daemons                       # leftovers from an earlier 'up' on this machine
  start_munge
  write_conf
  /usr/sbin/slurmctld                # forks into the background, writes /run/slurmctld.pid
  wait_for 30 scontrol ping || { tail -n 30 "$LOGDIR/slurmctld.log" >&2; exit 1; }
  for n in $(node_names); do
    mkdir -p "$SPOOL/$n"
    /usr/sbin/slurmd -N "$n"
  done
  if ! wait_for 60 bash -c '[ "$(sinfo -h -N -o %T | sort -u)" = idle ]'; then
    sinfo -N >&2; tail -n 20 "$LOGDIR"/slurmd-*.log "$LOGDIR/slurmctld.log" >&2; exit 1
  fi
  sinfo -N
  log "cluster up ($((SECONDS - t0)) s)"
}

down_daemons() {
  local f
  for f in /run/slurmd-*.pid /run/slurmd.pid; do stop_pidfile "$f" slurmd; done
  stop_pidfile /run/slurmctld.pid slurmctld
}

down() {
  if alive /run/slurmctld.pid slurmctld; then
    scancel --user=root 2>/dev/null || true
    wait_for 20 bash -c '[ -z "$(squeue -h)" ]' || true
  fi
  down_daemons
  if [ -e "$MARK" ]; then stop_pidfile /run/munge/munged.pid munged; rm -f "$MARK"; fi
  log "cluster down"
}

submit() {
  local file=$1 secs=${2:-600} jid info state out ec
  jid=$(sbatch --parsable "$file")
  jid=${jid%%;*}
  log "submitted job $jid ($file)"
  local end=$((SECONDS + secs))
  while :; do
    info=$(scontrol show job -o "$jid" 2>/dev/null) || info=""   # record purged after MinJobAge (300 s)
    state=$(sed -n 's/.*JobState=\([A-Z_]*\).*/\1/p' <<<"$info")
    case $state in
      PENDING|CONFIGURING|RUNNING|COMPLETING|SUSPENDED|REQUEUED|RESIZING|SIGNALING|STAGE_OUT) ;;
      *) break ;;
    esac
    if [ "$SECONDS" -ge "$end" ]; then
      log "job $jid timed out after $secs s"; scancel "$jid"; exit 124
    fi
    sleep 1
  done
  out=$(sed -n 's/.* StdOut=\([^ ]*\).*/\1/p' <<<"$info")
  ec=$(sed -n 's/.* ExitCode=\([0-9]*\):.*/\1/p' <<<"$info")
  log "job $jid $state ExitCode=$ec output=$out"
  [ -f "$out" ] && cat "$out"
  [ "$state" = COMPLETED ] && return 0
  [ "${ec:-1}" -ne 0 ] && exit "$ec"
  exit 1
}

cmd=${1:-}
case $cmd in
  up) NNODES=${2:-2}; up ;;
  down) down ;;
  submit) submit "${2:?sbatch file}" "${3:-600}" ;;
  *) echo "usage: $0 up [NNODES] | submit FILE [SECS] | down" >&2; exit 2 ;;
esac
