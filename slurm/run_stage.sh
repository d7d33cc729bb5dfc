#!/bin/bash
# One alignlab stage as an srun step of the current SLURM allocation: every task is one rank.
# Called by slurm/single_node.sbatch and slurm/multi_node.sbatch with the Hydra overrides they were given:
#
#   sbatch slurm/single_node.sbatch stage=ppo stage.kl_coef=0.02
#
# Always adds resume=auto and launcher=local. If the stage exits 75 (it saved a checkpoint on SIGUSR1/SIGTERM,
# alignlab.checkpoint.PREEMPTED_EXIT), the job is requeued and the next run continues from that checkpoint.
#
# Environment (sbatch passes the submitting shell's environment on):
#   ALIGNLAB_ROOT          the repository (default: the directory sbatch was run from)
#   ALIGNLAB_PYTHON        the interpreter (default: $ALIGNLAB_ROOT/.venv/bin/python if present, else python)
#   ALIGNLAB_MAX_REQUEUES  give up requeueing after this many restarts (default 20)
#   ALIGNLAB_MASTER_PORT   rendezvous port on the job's first node (default 20000 + job id % 20000)

# Not -e: srun's exit code is inspected below, not fatal.
set -uo pipefail

# A training stage exits with this after saving a checkpoint on a signal (alignlab.checkpoint.PREEMPTED_EXIT).
PREEMPTED_EXIT=75

fail() {
    echo "alignlab/slurm: error: $*" >&2
    exit 2
}

[ -n "${SLURM_JOB_ID:-}" ] || fail "not inside a SLURM job; submit with: sbatch slurm/single_node.sbatch stage=<name> ..."

root=${ALIGNLAB_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}
[ -f "$root/alignlab/__main__.py" ] ||
    fail "$root is not the alignlab repository; submit from its root or export ALIGNLAB_ROOT=/path/to/alignlab"
cd "$root" || fail "cannot cd to $root"

python=${ALIGNLAB_PYTHON:-}
if [ -z "$python" ]; then
    if [ -x "$root/.venv/bin/python" ]; then python=$root/.venv/bin/python; else python=python; fi
fi
command -v "$python" >/dev/null || fail "ALIGNLAB_PYTHON=$python is not an executable (set ALIGNLAB_PYTHON)"

for arg in "$@"; do
    case $arg in
        launcher=local) ;;
        launcher=* | +launcher=* | ++launcher=*)
            # under srun every task already is a rank; deepspeed/torchrun would start N more per task
            fail "$arg: the SLURM templates run launcher=local (srun starts one rank per task); drop it" ;;
        -m | --multirun)
            fail "$arg: a sweep is submitted with hydra/launcher=submitit_slurm or cluster=<preset>, not sbatch" ;;
        stage=pipeline)
            # the pipeline starts its stages itself; N copies of it would run every stage N times
            [ "${SLURM_NTASKS:-1}" -eq 1 ] ||
                fail "stage=pipeline runs its stages itself: submit it with --nodes=1 --ntasks-per-node=1" ;;
    esac
done

# The ranks come from srun (SLURM_PROCID, ...): torchrun-style variables exported in the submitting shell would
# win over them in alignlab/distributed.py and give every task the same rank.
unset RANK WORLD_SIZE LOCAL_RANK
# Rendezvous for torch.distributed: rank 0 runs on the first node of the allocation (set here, not inherited
# from the submitting shell). One port per job (the rule alignlab/distributed.py applies too), so jobs sharing
# a node do not collide; ALIGNLAB_MASTER_PORT to choose another.
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
[ -n "$MASTER_ADDR" ] || fail "scontrol show hostnames '$SLURM_JOB_NODELIST' named no node for the rendezvous"
export MASTER_ADDR
export MASTER_PORT=${ALIGNLAB_MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
# Each rank gets its share of the cores instead of one thread per core of the node.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
# Log lines reach slurm-logs/ as they happen (tail -f), not when a buffer fills.
export PYTHONUNBUFFERED=1

# SLURM sends SIGTERM to this script when the job is cancelled (scancel) or preempted: remember it, so a stage
# that checkpointed on that SIGTERM is not requeued here (a cancelled job stays cancelled; a preempted one is
# requeued by SLURM itself). bash runs the trap once srun has returned.
cancelled=0
trap 'cancelled=1' TERM

restarts=${SLURM_RESTART_COUNT:-0}
echo "alignlab/slurm: job $SLURM_JOB_ID restart $restarts on $SLURM_JOB_NODELIST:" \
    "${SLURM_NTASKS:-1} tasks, MASTER_ADDR=$MASTER_ADDR MASTER_PORT=$MASTER_PORT python=$python"

# One task per rank (the allocation's --ntasks-per-node x --nodes). Since Slurm 22.05 srun no longer inherits
# --cpus-per-task from sbatch: pass it on, or every rank would be confined to one core.
srun_args=()
[ -n "${SLURM_CPUS_PER_TASK:-}" ] && srun_args+=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
# No --kill-on-bad-exit: it would turn the ranks' exit code 75 (checkpointed) into 143 (killed) and lose the
# requeue; a crashed rank makes the others fail in their next collective instead. srun exits with the highest
# exit code of its tasks.
srun "${srun_args[@]}" "$python" -m alignlab resume=auto "$@" launcher=local
rc=$?

if [ "$rc" -eq "$PREEMPTED_EXIT" ] && [ "$cancelled" -eq 0 ]; then
    max=${ALIGNLAB_MAX_REQUEUES:-20}
    if [ "$restarts" -ge "$max" ]; then
        echo "alignlab/slurm: checkpointed, but not requeued: $restarts restarts reached ALIGNLAB_MAX_REQUEUES=$max" >&2
        exit "$rc"
    fi
    echo "alignlab/slurm: the stage checkpointed on a signal (exit $rc): requeueing job $SLURM_JOB_ID;" \
        "the next run continues with resume=auto"
    # Puts this job back in the queue (same id, same script and arguments; needs --requeue or JobRequeue=1).
    # SLURM then ends this run of the script.
    scontrol requeue "$SLURM_JOB_ID" || echo "alignlab/slurm: scontrol requeue $SLURM_JOB_ID failed" >&2
elif [ "$rc" -eq "$PREEMPTED_EXIT" ]; then
    echo "alignlab/slurm: checkpointed after SIGTERM (cancelled or preempted): not requeueing here"
fi
exit "$rc"
