#!/bin/sh
# fleetscope: tell the node's agent that a Slurm job starts here (slurmd's Prolog, run as root on each node
# of the job, with the job's SLURM_* variables). It writes <job id>.job (KEY=value lines) into the agent's
# Slurm folder; the agent reads it for fleetscope_slurm_job_info and fleetscope_slurm_job_running.
#   slurm.conf:  Prolog=/usr/share/fleetscope/slurm/prolog.sh   (or call it from your own prolog)
# POSIX sh, nothing but coreutils. It never fails: a prolog that fails drains the node.
dir=${FLEETSCOPE_SLURM_DIR:-/run/fleetscope-slurm}
job=${SLURM_JOB_ID:-}
case $job in '' | *[!0-9]*) exit 0 ;; esac
{
    mkdir -p "$dir" && chmod 0755 "$dir"
    tmp="$dir/.$job.job.$$"
    for name in SLURM_JOB_ID SLURM_JOB_USER SLURM_JOB_UID SLURM_JOB_PARTITION SLURM_JOB_ACCOUNT SLURM_JOB_NAME \
        SLURM_ARRAY_JOB_ID SLURM_ARRAY_TASK_ID SLURM_JOB_RESTART_COUNT SLURM_JOB_SLUID SLURM_JOB_GPUS; do
        eval "value=\${$name:-}"
        # one line each: a value with a line break (a job name can hold one) is cut at it
        if [ -n "$value" ]; then printf '%s=%s\n' "$name" "$(printf '%s' "$value" | head -n 1)"; fi
    done > "$tmp" && chmod 0644 "$tmp" && mv -f "$tmp" "$dir/$job.job"
    rm -f "$dir/$job.ended"  # a requeued job runs again under the same id
} 2>/dev/null
exit 0
