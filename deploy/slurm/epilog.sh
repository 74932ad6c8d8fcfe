#!/bin/sh
# fleetscope: tell the node's agent that a Slurm job ended here (slurmd's Epilog, run as root on each node of
# the job). It writes <job id>.ended into the agent's Slurm folder: from then on the agent exports
# fleetscope_slurm_job_running{slurm_job} 0, and a GPU process still attributed to the job raises
# FleetscopeSlurmJobEndedGpuBusy. Files of jobs that ended over an hour ago are removed.
#   slurm.conf:  Epilog=/usr/share/fleetscope/slurm/epilog.sh   (or call it from your own epilog)
# POSIX sh, nothing but coreutils and find. It never fails: an epilog that fails drains the node.
dir=${FLEETSCOPE_SLURM_DIR:-/run/fleetscope-slurm}
job=${SLURM_JOB_ID:-}
case $job in '' | *[!0-9]*) exit 0 ;; esac
{
    mkdir -p "$dir" && chmod 0755 "$dir"
    tmp="$dir/.$job.ended.$$"
    date +%s > "$tmp" && chmod 0644 "$tmp" && mv -f "$tmp" "$dir/$job.ended"
    find "$dir" -maxdepth 1 -name '*.ended' -mmin +60 | while read -r old; do
        id=${old##*/}
        rm -f "$dir/${id%.ended}.job" "$old"
    done
} 2>/dev/null
exit 0
