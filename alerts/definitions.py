"""Every fleetscope alert: its rule (with thresholds from thresholds.toml) and its runbook text.

`alerts/generate.py` turns these into alerts/fleetscope.rules.yml and alerts/runbooks/<Name>.md.
Expressions use {placeholders} filled from thresholds.toml (section.key). Severity "page" wakes
someone; "ticket" is for working hours.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Alert:
    name: str
    group: str
    expr: str
    for_: str
    severity: str
    summary: str
    description: str
    meaning: str
    confirm: str
    act: str


GPU = "GPU {{ $labels.gpu }} ({{ $labels.uuid }}) on {{ $labels.instance }}"
# XIDs of one class that are new within the window: counted since the window began, or already above 0
# in a series that did not exist when the window began.
XID_NEW = ('((increase(fleetscope_gpu_xid_errors_total[{gpu.xid_window}]) > 0)'
           ' or (fleetscope_gpu_xid_errors_total > 0 unless fleetscope_gpu_xid_errors_total offset {gpu.xid_window}))'
           ' * on(instance, xid) group_left(name) fleetscope_gpu_xid_catalogue_info{{severity="SEVERITY"}}')

ALERTS: list[Alert] = [
    # --- agent ---------------------------------------------------------------------------------
    Alert("FleetscopeAgentDown", "fleetscope-agent", 'up{{job=~"fleetscope-agent.*"}} == 0', "{agent.down_for}", "page",
          "fleetscope agent {{ $labels.instance }} is down",
          "Prometheus has not scraped the fleetscope agent at {{ $labels.instance }}: the node's GPUs and workloads are unobserved.",
          "The node's agent does not answer. Every other alert about this node is blind (and inhibited) until it does.",
          "`curl -s http://<node>:9835/metrics | head`; on the node `systemctl status fleetscope-agent` and "
          "`journalctl -u fleetscope-agent --since -15min`.",
          "Node unreachable: treat it as a node-down incident (BMC, the scheduler's view). Agent stopped: restart it; if it "
          "exits at start, its last log line names the bad setting."),
    Alert("FleetscopeAgentSourceFailing", "fleetscope-agent", "fleetscope_agent_source_error == 1", "{agent.source_error_for}",
          "ticket", "source {{ $labels.source }} of the agent on {{ $labels.instance }} is failing",
          "The agent's {{ $labels.source }} source has failed at every sample on {{ $labels.instance }}; its metrics are missing.",
          "One subsystem of the node is not being read (the agent itself runs). Absent hardware is not an error: only a "
          "source that breaks fires this.",
          "The agent logs the traceback once when a source starts failing: `journalctl -u fleetscope-agent | grep <source>`.",
          "Fix what the traceback names (permissions on /dev/nvidia*, a driver/library mismatch, an unreadable /sys file), "
          "or disable the source in /etc/fleetscope/agent.toml until it is fixed."),
    Alert("FleetscopeAgentStale", "fleetscope-agent",
          "time() - fleetscope_agent_last_sample_timestamp_seconds > {agent.stale_after_seconds}", "2m", "ticket",
          "the agent on {{ $labels.instance }} serves stale data",
          "The newest sample of the agent on {{ $labels.instance }} is {{ $value | humanizeDuration }} old: its sampler is stuck.",
          "The agent answers scrapes but its sampler has not produced a snapshot for over a minute: a source hangs.",
          "Compare `fleetscope_agent_source_duration_seconds` per source; `py-spy dump --pid <agent pid>` shows where it waits.",
          "Restart the agent; disable the source that hangs if it does again, and report it."),
    Alert("FleetscopeAgentShipperBacklog", "fleetscope-agent", "fleetscope_agent_shipper_spool_events > 0", "{agent.spool_backlog_for}",
          "ticket", "the agent on {{ $labels.instance }} cannot ship to the collector",
          "{{ $value }} workload events wait in the spool of {{ $labels.instance }}: the collector has not accepted its batches.",
          "The node cannot deliver to the collector (down, unreachable, or refusing the token). Nothing is lost yet: "
          "batches wait on disk up to the spool's bound.",
          "`fleetscope_agent_shipper_send_failures_total` rising; the agent's log names the HTTP error; "
          "`curl http://<collector>:9837/healthz` from the node.",
          "Bring the collector back or fix the token. Past the bound the oldest batches are dropped and counted in "
          "`fleetscope_agent_shipper_dropped_total{reason=\"spool_full\"}`."),
    # The shipper's own fault (not the collector's): its thread died or hangs, or its spool cannot be written, so
    # what the node's workloads report waits in memory only, bounded, and a restart or a full queue loses it.
    Alert("FleetscopeAgentShipperDown", "fleetscope-agent", "fleetscope_agent_shipper_up == 0", "5m", "ticket",
          "the agent on {{ $labels.instance }} cannot keep what it ships",
          "The shipper of the agent on {{ $labels.instance }} has been down for 5 minutes: its spool fails or its thread "
          "is dead or stuck; workload events wait in memory only.",
          "The agent still answers scrapes, but what it forwards to the collector is at risk: batches wait in memory "
          "(bounded; the oldest are dropped and counted as `fleetscope_agent_shipper_dropped_total{reason=\"queue_full\"}`) "
          "and a restart loses them. Usually the spool's disk is full or read-only.",
          "`fleetscope_agent_shipper_spool_errors_total` names the error (enospc, erofs, eacces, eio); "
          "`journalctl -u fleetscope-agent | grep -i spool` has the message; `df -h /var/lib/fleetscope-agent` on the node. "
          "No spool error: `fleetscope_agent_shipper_errors_total` rising, or a hung send (`py-spy dump --pid <agent pid>`).",
          "Free space on (or remount read-write) the spool's filesystem: the agent tries it again every second and "
          "`fleetscope_agent_shipper_up` returns to 1 by itself. A dead or stuck thread: restart the agent and report it "
          "with its log."),
    # --- GPU -----------------------------------------------------------------------------------
    # NVML itself says the GPU is lost: no scrape glitch can fake that, so it fires at once.
    Alert("FleetscopeGpuLost", "fleetscope-gpu", "fleetscope_gpu_up == 0", "0m", "page",
          "GPU {{ $labels.gpu }} on {{ $labels.instance }} cannot be read",
          GPU + " no longer answers NVML (fallen off the bus, needs a reset, or stuck). Its job is dead or hung.",
          "NVML cannot read the GPU; `fleetscope_gpu_health_reason` says why: gpu_lost (XID 79, off the bus), reset_required "
          "(after XIDs 48/94/95/119), not_ready, timeout or unknown_error. The other GPUs of the node are read as usual. "
          "Its XIDs are inhibited by this alert.",
          "`nvidia-smi` on the node lists it with an error or not at all; `dmesg | grep -i -e NVRM -e Xid`; "
          "`nvidia-smi -q -d RECOVERY` (drivers 550+) names the recovery action.",
          "Drain the node. reset_required: `nvidia-smi -r -i <gpu>` once drained. gpu_lost: power-cycle the node (a reset "
          "rarely brings a lost GPU back). Open a hardware case if it happens again."),
    Alert("FleetscopeGpusMissing", "fleetscope-gpu", "fleetscope_gpus_present < fleetscope_gpus_expected", "2m", "page",
          "{{ $labels.instance }} has fewer GPUs than expected",
          "{{ $labels.instance }} reports {{ $value }} GPUs present, fewer than the node is configured to have.",
          "A GPU is missing from the node: lost at runtime or not enumerated at boot. Jobs scheduled for 8 GPUs fail there.",
          "`nvidia-smi -L` on the node; `lspci | grep -i nvidia` tells a GPU the driver lost from one the bus never saw.",
          "Drain the node from the scheduler and open a hardware case."),
    # 15 s of `for` lets FleetscopeGpuLost, which explains an XID 79 and inhibits this, fire first.
    # The `unless ... offset` half catches an XID counted before Prometheus' first scrape of a
    # freshly started agent, whose first sample is already above 0 (invisible to increase()).
    Alert("FleetscopeGpuXidCritical", "fleetscope-gpu", XID_NEW.replace("SEVERITY", "page"), "15s", "page",
          "XID {{ $labels.xid }} ({{ $labels.name }}) on GPU {{ $labels.gpu }} of {{ $labels.instance }}",
          GPU + " reported XID {{ $labels.xid }}: {{ $labels.name }}. The catalogue in agent/gpu/xid.py says what to do.",
          "The driver reported an XID that means the GPU or its job is broken now (e.g. 48 double-bit ECC, 63/64 row "
          "remapping, 74 NVLink, 79 fallen off the bus, 94/95 contained/uncontained ECC).",
          "`dmesg | grep -i xid` on the node shows the event with its detail; `nvidia-smi -q -d ECC,ROW_REMAPPER`.",
          "Follow the action for this code in agent/gpu/xid.py: usually drain the node and reset the GPU; replace it if the XID repeats."),
    Alert("FleetscopeGpuXid", "fleetscope-gpu", XID_NEW.replace("SEVERITY", "ticket"), "0m", "ticket",
          "XID {{ $labels.xid }} ({{ $labels.name }}) on GPU {{ $labels.gpu }} of {{ $labels.instance }}",
          GPU + " reported XID {{ $labels.xid }}: {{ $labels.name }}, usually the application's fault (e.g. 13, 31, 43).",
          "An XID that is usually caused by the application (illegal memory access, a killed context), not the GPU.",
          "Find the job on the GPU (`fleetscope_gpu_process_memory_used_bytes` names it) and read its logs.",
          "Tell the job's owner. If the same XID repeats across different jobs on this GPU, treat the GPU as suspect."),
    Alert("FleetscopeGpuEccUncorrectable", "fleetscope-gpu",
          'increase(fleetscope_gpu_ecc_errors_total{{type="uncorrected", counter="volatile"}}[10m]) > 0', "0m", "page",
          "uncorrectable ECC error on GPU {{ $labels.gpu }} of {{ $labels.instance }}",
          GPU + " counted an uncorrectable memory error: the data of the job on it is corrupt.",
          "Device memory returned data it could not correct. The running job's results are suspect.",
          "`nvidia-smi -q -d ECC,ROW_REMAPPER` on the node; the XID 48/94/95 alert usually fires with it.",
          "Stop or restart the job from its last checkpoint elsewhere; reset the GPU so the row is remapped."),
    Alert("FleetscopeGpuRowRemapFailed", "fleetscope-gpu", "fleetscope_gpu_row_remap_failure == 1", "0m", "page",
          "GPU {{ $labels.gpu }} of {{ $labels.instance }} failed to remap a memory row",
          GPU + " could not remap a failing memory row: it is out of spare rows.",
          "The GPU's memory has more failing rows than it can repair.",
          "`nvidia-smi -q -d ROW_REMAPPER` shows Remapping Failure Occurred: Yes.",
          "Drain the node and replace the GPU."),
    Alert("FleetscopeGpuRowRemapPending", "fleetscope-gpu", "fleetscope_gpu_row_remap_pending == 1", "5m", "ticket",
          "GPU {{ $labels.gpu }} of {{ $labels.instance }} needs a reset to remap a memory row",
          GPU + " has a row remapping waiting for the next GPU reset.",
          "A memory row was marked bad; the repair takes effect only at a GPU reset.",
          "`nvidia-smi -q -d ROW_REMAPPER` shows Pending: Yes.",
          "Reset the GPU at the next drain (between jobs): `nvidia-smi -r -i <gpu>` on an idle GPU."),
    Alert("FleetscopeGpuTemperatureNearSlowdown", "fleetscope-gpu",
          "(fleetscope_gpu_temperature_celsius > fleetscope_gpu_temperature_slowdown_celsius - {gpu.temperature_margin_celsius})"
          " or (fleetscope_gpu_temperature_celsius > {gpu.temperature_fallback_celsius}"
          " unless on(instance, gpu) fleetscope_gpu_temperature_slowdown_celsius)", "{gpu.temperature_for}", "ticket",
          "GPU {{ $labels.gpu }} on {{ $labels.instance }} is at {{ $value }} °C, near its slowdown temperature",
          GPU + " has been within {gpu.temperature_margin_celsius} °C of the temperature at which it slows its clocks.",
          "The GPU runs hot enough to throttle soon; in synchronous training the whole job then runs at its speed.",
          "`fleetscope_gpu_temperature_celsius` of the node's GPUs (one hot GPU: its cooling; all: the node's airflow); "
          "`fleetscope_gpu_clock_event_active{reason=~\".*thermal.*\"}`.",
          "Check fans, inlet temperature and blanking panels; open a hardware case for a GPU hotter than its neighbours."),
    Alert("FleetscopeGpuHardwareSlowdown", "fleetscope-gpu",
          'fleetscope_gpu_clock_event_active{{reason=~"hw_slowdown|hw_thermal_slowdown|hw_power_brake_slowdown"}} == 1',
          "{gpu.slowdown_for}", "ticket",
          "GPU {{ $labels.gpu }} on {{ $labels.instance }}: {{ $labels.reason }} holds its clocks down",
          GPU + " has had {{ $labels.reason }} active: its clocks are cut by hardware.",
          "The hardware (thermal, power brake from the PSU or baseboard) is slowing the GPU; its job slows with it.",
          "`nvidia-smi -q -d PERFORMANCE` lists the active clock event reasons; the straggler finding names the rank it slows.",
          "Thermal: see FleetscopeGpuTemperatureNearSlowdown. Power brake: check the node's PSUs and power shelf."),
    Alert("FleetscopeGpuNvlinkErrors", "fleetscope-gpu",
          "rate(fleetscope_gpu_nvlink_errors_total[5m]) > {gpu.nvlink_errors_per_second}", "10m", "ticket",
          "NVLink {{ $labels.link }} of GPU {{ $labels.gpu }} on {{ $labels.instance }}: {{ $labels.type }} errors",
          GPU + " NVLink {{ $labels.link }} counts {{ $value }} {{ $labels.type }} errors per second.",
          "A link between GPUs retransmits: all-reduces over it slow down, and it may fail (XID 74).",
          "`nvidia-smi nvlink -e -i <gpu>`; compare the link's counters with the GPU's other links.",
          "Reset the GPU at the next drain; a link that keeps erroring needs the baseboard or NVSwitch tray checked."),
    Alert("FleetscopeGpuNvlinkDown", "fleetscope-gpu", "fleetscope_gpu_nvlink_up == 0", "5m", "page",
          "NVLink {{ $labels.link }} of GPU {{ $labels.gpu }} on {{ $labels.instance }} is down",
          GPU + " NVLink {{ $labels.link }} is inactive.",
          "A GPU link is down: collectives fall back to slower paths or fail.",
          "`nvidia-smi nvlink -s -i <gpu>`; `nvidia-smi -q | grep -i fabric` on NVSwitch systems.",
          "Drain the node; reset the GPUs; check the fabric manager; open a hardware case if the link stays down."),
    Alert("FleetscopeGpuPcieReplays", "fleetscope-gpu",
          "rate(fleetscope_gpu_pcie_replays_total[5m]) > {gpu.pcie_replays_per_second}", "10m", "ticket",
          "PCIe replays on GPU {{ $labels.gpu }} of {{ $labels.instance }}",
          GPU + " retransmits {{ $value }} PCIe packets per second.",
          "The PCIe link to the GPU has errors; transfers to the host and to NICs slow down.",
          "`nvidia-smi -q -d PCIE`; `lspci -vvv -s <bus id>` for AER errors; `dmesg | grep -i aer`.",
          "Reseat the GPU or its riser at the next maintenance; replace the riser or GPU if it persists."),
    Alert("FleetscopeGpuPcieDegraded", "fleetscope-gpu",
          "fleetscope_gpu_pcie_link_width < fleetscope_gpu_pcie_link_width_max", "{gpu.pcie_degraded_for}", "ticket",
          "GPU {{ $labels.gpu }} on {{ $labels.instance }} runs its PCIe link at x{{ $value }}",
          GPU + " trained its PCIe link narrower than its maximum width.",
          "The link came up with fewer lanes: host-to-device and GPUDirect traffic have less bandwidth.",
          "`nvidia-smi -q -d PCIE` shows Link Width Current vs Max; `lspci -vvv` LnkSta vs LnkCap.",
          "Reseat the GPU or riser at the next maintenance; a link that stays narrow needs the slot or riser replaced."),
    Alert("FleetscopeGpuAllocatedIdle", "fleetscope-gpu",
          "(max by (instance, gpu, uuid) (fleetscope_gpu_process_memory_used_bytes) > 0)"
          " and on(instance, gpu, uuid) fleetscope_gpu_utilization_ratio < {gpu.idle_allocated_utilization}",
          "{gpu.idle_allocated_for}", "ticket",
          "GPU {{ $labels.gpu }} on {{ $labels.instance }} is held by a process but idle",
          GPU + " has a process holding memory on it but has done almost nothing for a long time.",
          "A job holds the GPU without using it: hung, waiting on something, or abandoned.",
          "`fleetscope_gpu_process_memory_used_bytes` names the pid, container, pod, Slurm job and training job.",
          "Ask the owner; end the job if it is abandoned."),
    Alert("FleetscopeSlurmJobEndedGpuBusy", "fleetscope-gpu",
          'count by (instance, slurm_job) (fleetscope_gpu_process_memory_used_bytes{{slurm_job!=""}})'
          " and on(instance, slurm_job) fleetscope_slurm_job_running == 0",
          "{gpu.slurm_ended_busy_for}", "ticket",
          "Slurm job {{ $labels.slurm_job }} ended but its processes still hold GPUs on {{ $labels.instance }}",
          "The epilog of Slurm job {{ $labels.slurm_job }} ran on {{ $labels.instance }}, yet {{ $value }} of its "
          "processes still hold GPU memory there.",
          "Processes outlived their Slurm job (left out of the job's cgroup, stuck in uninterruptible I/O, or a CUDA "
          "context that does not let go): the GPU is not free for the next job Slurm places on it. Needs the "
          "prolog and epilog of deploy/slurm/ on the node.",
          "`fleetscope_gpu_process_memory_used_bytes{slurm_job=\"<id>\"}` names the pids and GPUs; on the node "
          "`nvidia-smi --query-compute-apps=pid,used_memory --format=csv` and `ps -o pid,stat,wchan,cmd -p <pid>`.",
          "Kill the leftover processes; if they are in D state or the memory stays held, drain the node "
          "(`scontrol update nodename=<node> state=drain reason=gpu-held`) and reset the GPU when it is empty."),
    Alert("FleetscopeSlurmGpuUnused", "fleetscope-gpu",
          "(fleetscope_slurm_job_gpu == 1)"
          " unless on(instance, gpu) (fleetscope_gpu_process_memory_used_bytes > 0)"
          " and on(instance, gpu) (fleetscope_gpu_utilization_ratio < {gpu.idle_allocated_utilization})",
          "{gpu.slurm_unused_for}", "ticket",
          "Slurm job {{ $labels.slurm_job }} holds GPU {{ $labels.gpu }} on {{ $labels.instance }} without using it",
          "Slurm allocated GPU {{ $labels.gpu }} on {{ $labels.instance }} to job {{ $labels.slurm_job }}, and no "
          "process has held memory on it or kept it busy for a long time.",
          "The job asked for more GPUs than it runs on (a wrong --gpus-per-node, one process where the script "
          "meant eight, a CPU-only step in a GPU allocation), or it hung before touching this GPU: nobody else can "
          "use the GPU while the job holds it. Needs the prolog of deploy/slurm/ on the node (it records "
          "SLURM_JOB_GPUS); Slurm's GPU ids are taken as NVML's indices (gres.conf in PCI order, as AutoDetect=nvml "
          "gives).",
          "`fleetscope_slurm_job_gpu{slurm_job=\"<id>\"}` lists the job's GPUs; `scontrol show job -d <id>` shows "
          "what it asked for (GRES, TRES); `fleetscope_gpu_process_memory_used_bytes{slurm_job=\"<id>\"}` shows "
          "which of its GPUs it uses.",
          "Tell the owner; for a job that will never use them, ask for a resubmission with the GPUs it uses."),
    # --- host ----------------------------------------------------------------------------------
    Alert("FleetscopeFilesystemFillingUp", "fleetscope-host",
          "(fleetscope_filesystem_avail_bytes / fleetscope_filesystem_size_bytes < {host.filesystem_free_ratio}"
          " and predict_linear(fleetscope_filesystem_avail_bytes[6h], 24 * 3600) < 0"
          " and fleetscope_filesystem_readonly == 0)", "1h", "ticket",
          "{{ $labels.mountpoint }} on {{ $labels.instance }} will be full within 24 hours",
          "Filesystem {{ $labels.mountpoint }} ({{ $labels.device }}) on {{ $labels.instance }} is nearly full and filling "
          "at a rate that fills it within a day.",
          "At the rate of the last 6 hours the filesystem runs out of space within a day.",
          "`df -h <mountpoint>` and `du -xh --max-depth=2 <mountpoint> | sort -h | tail` on the node.",
          "Usual causes on GPU nodes: checkpoints never pruned, core dumps, container layers, runaway logs. Clean up."),
    Alert("FleetscopeFilesystemAlmostFull", "fleetscope-host",
          "(fleetscope_filesystem_avail_bytes / fleetscope_filesystem_size_bytes < {host.filesystem_critical_ratio}"
          " and fleetscope_filesystem_readonly == 0)", "30m", "page",
          "{{ $labels.mountpoint }} on {{ $labels.instance }} has under 5% space left",
          "Filesystem {{ $labels.mountpoint }} ({{ $labels.device }}) on {{ $labels.instance }} is almost full; writes will fail.",
          "Checkpoints, logs and the container runtime will start failing on this filesystem.",
          "`df -h <mountpoint>`; `df -i <mountpoint>` for inodes.",
          "Free space now; warn the owner of any job checkpointing there that its checkpoint may be incomplete."),
    Alert("FleetscopeMemoryPressure", "fleetscope-host",
          "(fleetscope_memory_available_bytes / fleetscope_memory_total_bytes < {host.memory_available_ratio})"
          " or (rate(fleetscope_pressure_memory_stalled_seconds_total[5m]) > {host.memory_stalled_share})", "10m", "ticket",
          "{{ $labels.instance }} is short of memory",
          "{{ $labels.instance }} has little memory available or its tasks stall on memory.",
          "The node's host memory is nearly used up; data loaders slow down and the OOM killer is next.",
          "`free -g`, `ps aux --sort=-rss | head`; the data-loader phase of the jobs on the node grows.",
          "Find the process growing (a data loader's workers, pinned memory); restart it or move the job."),
    Alert("FleetscopeOomKills", "fleetscope-host", "increase(fleetscope_memory_oom_kills_total[10m]) > 0", "0m", "ticket",
          "the OOM killer ended processes on {{ $labels.instance }}",
          "The kernel killed {{ $value }} processes for lack of memory on {{ $labels.instance }}.",
          "A process was killed: a training rank killed this way takes its job down.",
          "`dmesg | grep -i -e 'killed process' -e oom` on the node names the victim.",
          "Tell the job's owner; lower its memory use (data-loader workers, prefetch) or give it a node with more memory."),
    Alert("FleetscopeNicErrors", "fleetscope-host",
          "(rate(fleetscope_network_receive_errs_total[5m]) + rate(fleetscope_network_transmit_errs_total[5m])"
          " + rate(fleetscope_network_receive_drop_total[5m]) + rate(fleetscope_network_transmit_drop_total[5m]))"
          " / (rate(fleetscope_network_receive_packets_total[5m]) + rate(fleetscope_network_transmit_packets_total[5m]) > 0)"
          " > {host.nic_error_ratio}", "10m", "ticket",
          "{{ $labels.device }} on {{ $labels.instance }} loses packets",
          "Interface {{ $labels.device }} on {{ $labels.instance }} has errors or drops on {{ $value | humanizePercentage }} of its packets.",
          "The NIC drops or corrupts traffic; collectives over it slow down.",
          "`ip -s link show <device>`, `ethtool -S <device> | grep -i -e err -e drop`.",
          "Check the cable and switch port; move the node out of the job if the errors continue."),
    Alert("FleetscopeInfinibandPortDown", "fleetscope-host", "fleetscope_infiniband_port_up == 0", "2m", "page",
          "InfiniBand port {{ $labels.device }}/{{ $labels.port }} on {{ $labels.instance }} is down",
          "InfiniBand port {{ $labels.device }} port {{ $labels.port }} on {{ $labels.instance }} is not active.",
          "An InfiniBand port is down: jobs using it fail or fall back to slower transports.",
          "`ibstat`, `iblinkinfo` on the node; the switch port's state.",
          "Check the cable and the switch port; drain the node if the port stays down."),
    Alert("FleetscopeInfinibandFlapping", "fleetscope-host",
          "increase(fleetscope_infiniband_link_downed_total[30m]) > {host.infiniband_flaps_per_30m}", "0m", "ticket",
          "InfiniBand port {{ $labels.device }}/{{ $labels.port }} on {{ $labels.instance }} is flapping",
          "InfiniBand port {{ $labels.device }} port {{ $labels.port }} on {{ $labels.instance }} went down {{ $value }} times in 30 minutes.",
          "The link goes down and comes back: each time, collectives over it stall.",
          "`fleetscope_infiniband_symbol_errors_total` and `link_error_recovery_total` on the port; `ibqueryerrors`.",
          "Replace the cable or transceiver; check the switch port."),
    Alert("FleetscopeDiskSaturated", "fleetscope-host", "rate(fleetscope_disk_io_time_seconds_total[5m]) > {host.disk_busy_ratio}",
          "{host.disk_busy_for}", "ticket",
          "disk {{ $labels.device }} on {{ $labels.instance }} is saturated",
          "Disk {{ $labels.device }} on {{ $labels.instance }} has had I/O in flight {{ $value | humanizePercentage }} of the time.",
          "The disk is busy all the time: data loading and checkpointing from it are slowed.",
          "`iostat -x 5` on the node; the average queue is `rate(fleetscope_disk_io_time_weighted_seconds_total[5m])`.",
          "Find the heavy reader or writer (`iotop`); spread checkpoints or move data to faster storage."),
    # --- training (from the collector) ------------------------------------------------------------
    Alert("FleetscopeTrainingStraggler", "fleetscope-training", 'fleetscope_finding_active{{kind="straggler",severity="page"}} == 1',
          "{training.straggler_for}", "page",
          "rank {{ $labels.rank }} of {{ $labels.training_job }} on {{ $labels.node }} is a straggler",
          "Rank {{ $labels.rank }} of job {{ $labels.training_job }} (node {{ $labels.node }}) computes persistently longer than its "
          "peers; every rank waits for it, at least 5% of each step (the collector's straggler_page_share). GET /v1/findings?job={{ $labels.training_job }} lists the probable cause.",
          "One rank holds the whole synchronous job back: every step runs at its speed.",
          "The finding's probable causes (thermal slowdown, power cap, XID, NIC errors, data loader); "
          "`fleetscope_training_straggler_score{training_job=...}` per rank.",
          "Act on the cause: a throttling GPU or bad link, drain the node and restart the job from its checkpoint without it."),
    Alert("FleetscopeTrainingStragglerMinor", "fleetscope-training",
          'fleetscope_finding_active{{kind=~"straggler|slow_node",severity="ticket"}} == 1',
          "{training.straggler_minor_for}", "ticket",
          "job {{ $labels.training_job }} waits a little for rank {{ $labels.rank }} / node {{ $labels.node }}",
          "A rank (or node) of job {{ $labels.training_job }} is persistently slower than its peers, but costs the job less than the "
          "collector's straggler_page_share of its throughput. GET /v1/findings?job={{ $labels.training_job }} lists the probable cause.",
          "A small but persistent loss: a few percent of every step of the job, every hour it runs.",
          "The finding's evidence (`throughput_lost_share`, the threshold it passed) and probable causes; "
          "`fleetscope_training_straggler_score{training_job=...}` per rank.",
          "Look at the cause at the next maintenance window; if the score grows past the page share it pages."),
    Alert("FleetscopeTrainingSlowNode", "fleetscope-training", 'fleetscope_finding_active{{kind="slow_node",severity="page"}} == 1',
          "{training.slow_node_for}", "page",
          "node {{ $labels.node }} slows job {{ $labels.training_job }}",
          "The ranks of job {{ $labels.training_job }} on node {{ $labels.node }} are slow together. GET /v1/findings names the cause.",
          "A whole node is slower than the rest of the job: its GPUs, its host or its network.",
          "The finding's probable causes; the node's GPU clocks, NIC errors, CPU and memory pressure.",
          "Drain the node and restart the job without it; investigate the node's hardware."),
    Alert("FleetscopeTrainingHang", "fleetscope-training", 'fleetscope_finding_active{{kind="hang"}} == 1', "{training.hang_for}",
          "page", "job {{ $labels.training_job }} has made no progress",
          "No rank of job {{ $labels.training_job }} has finished a step for longer than 3 median steps (at least 30 s). The finding "
          "names the ranks that reported last and those that stopped first.",
          "The job is stuck: usually a collective waiting for a rank that died or hangs. Its straggler alerts are inhibited.",
          "GET /v1/findings?kind=hang: the ranks that stopped first point at the culprit; `py-spy dump` on their processes.",
          "Restart the job from its last checkpoint, excluding the node of the ranks that stopped first if they point at it."),
    Alert("FleetscopeTrainingRegression", "fleetscope-training", 'fleetscope_finding_active{{kind="regression"}} == 1',
          "{training.regression_for}", "ticket", "job {{ $labels.training_job }} is slower than it was",
          "Job {{ $labels.training_job }}'s median step time has risen against its own recent baseline.",
          "The whole job slowed down together: a code or data change, a noisy neighbour on shared storage or network, or "
          "a fleet-wide change.",
          "`fleetscope_training_step_time_change_ratio{training_job=...}`; the console's step-time chart shows when it changed.",
          "Ask the job's owner what changed; compare phases (data, comm) before and after."),
    Alert("FleetscopeTrainingStopped", "fleetscope-training", 'fleetscope_finding_active{{kind="stopped"}} == 1',
          "{training.stopped_for}", "ticket", "job {{ $labels.training_job }} stopped reporting",
          "Job {{ $labels.training_job }} has not reported for 10 minutes without declaring its end.",
          "The job is gone (crashed, cancelled or preempted) without telling fleetscope it finished.",
          "The scheduler's view of the job; its logs.",
          "Nothing to do if it was cancelled on purpose; otherwise find out why it died and restart it."),
    # --- inference -----------------------------------------------------------------------------
    Alert("FleetscopeSloFastBurn", "fleetscope-inference",
          'fleetscope_slo_burn_rate{{window="1h"}} > 14.4 and on(slo, service) fleetscope_slo_burn_rate{{window="5m"}} > 14.4',
          "2m", "page", "SLO {{ $labels.slo }} of {{ $labels.service }} is burning fast",
          "SLO {{ $labels.slo }} of service {{ $labels.service }} spends its error budget at over 14.4 times the sustainable "
          "rate over both the last hour and 5 minutes: 2% of a 30-day budget gone in an hour.",
          "Users are getting slow or failed responses now.",
          "`fleetscope_slo_burn_rate{slo=...}` by window; the console's Inference page; the servers' queue and KV cache.",
          "Scale out or shed load; roll back a recent change to the service."),
    Alert("FleetscopeSloSlowBurn", "fleetscope-inference",
          'fleetscope_slo_burn_rate{{window="6h"}} > 6 and on(slo, service) fleetscope_slo_burn_rate{{window="30m"}} > 6',
          "15m", "page", "SLO {{ $labels.slo }} of {{ $labels.service }} is burning",
          "SLO {{ $labels.slo }} of service {{ $labels.service }} spends its error budget at over 6 times the sustainable rate "
          "over the last 6 hours and 30 minutes: 5% of a 30-day budget in 6 hours.",
          "A sustained degradation that will exhaust the budget in days if nothing changes.",
          "`fleetscope_slo_burn_rate{slo=...}` by window; latency quantiles on the console.",
          "Find what changed in the last hours (traffic mix, deployment, a degraded node) and fix or roll back."),
    Alert("FleetscopeSloBudgetBurn", "fleetscope-inference",
          'fleetscope_slo_burn_rate{{window="3d"}} > 1 and on(slo, service) fleetscope_slo_burn_rate{{window="6h"}} > 1',
          "1h", "ticket", "SLO {{ $labels.slo }} of {{ $labels.service }} will miss its objective",
          "SLO {{ $labels.slo }} of service {{ $labels.service }} spends its budget faster than it lasts over the SLO window.",
          "At this pace the objective is missed by the end of the window.",
          "`fleetscope_slo_error_budget_remaining_ratio{slo=...}`.",
          "Plan capacity or latency work; consider pausing risky changes to the service."),
    Alert("FleetscopeInferenceErrors", "fleetscope-inference", "fleetscope_inference_error_ratio > {inference.error_ratio}",
          "{inference.error_for}", "page", "{{ $labels.service }} ({{ $labels.model }}) fails {{ $value | humanizePercentage }} of requests",
          "Service {{ $labels.service }} model {{ $labels.model }} has failed {{ $value | humanizePercentage }} of its requests "
          "over the last 5 minutes.",
          "Requests fail: users see errors.",
          "The service's logs; whether the errors concentrate on one node (`GET /v1/services/<service>`).",
          "Roll back a recent change; remove failing replicas; check their GPUs (XIDs, OOM)."),
    Alert("FleetscopeInferenceQueueGrowing", "fleetscope-inference",
          "fleetscope_inference_requests_waiting > {inference.queue_waiting}"
          " and deriv(fleetscope_inference_requests_waiting[10m]) > 0", "{inference.queue_for}", "ticket",
          "requests queue up in {{ $labels.service }} ({{ $labels.model }})",
          "{{ $value }} requests wait in the {{ $labels.service }} server on {{ $labels.instance }} and the queue keeps growing.",
          "The server cannot keep up with its traffic; time to first token rises with the queue.",
          "`fleetscope_inference_requests_running`, `fleetscope_inference_kv_cache_usage_ratio` on the same server.",
          "Add replicas or move traffic; a full KV cache calls for smaller batches or more memory per replica."),
    Alert("FleetscopeInferenceKvCacheFull", "fleetscope-inference",
          "fleetscope_inference_kv_cache_usage_ratio > {inference.kv_cache_full_ratio}", "{inference.kv_cache_full_for}",
          "ticket", "the KV cache of {{ $labels.service }} ({{ $labels.model }}) stays full on {{ $labels.instance }}",
          "The {{ $labels.service }} server on {{ $labels.instance }} has kept its KV cache over {inference.kv_cache_full_ratio} "
          "full for {inference.kv_cache_full_for}: {{ $value | humanizePercentage }} now.",
          "New requests wait for cache space and running ones get preempted (recomputed or swapped out): time to first "
          "token and time per output token rise, throughput falls.",
          "`rate(fleetscope_inference_preemptions_total[5m])` and `fleetscope_inference_requests_waiting` on the same "
          "server; the Grafana inference dashboard's KV-cache and preemption panels.",
          "Add replicas or move traffic; lower max_num_seqs / the batch size, shorten max_model_len, or give the server "
          "more GPU memory (gpu_memory_utilization, tensor parallelism)."),
    # --- collector -----------------------------------------------------------------------------
    Alert("FleetscopeCollectorDown", "fleetscope-collector", 'up{{job=~"fleetscope-collector.*"}} == 0',
          "{collector.down_for}", "page",
          "the fleetscope collector {{ $labels.instance }} is down",
          "Prometheus has not scraped the fleetscope collector at {{ $labels.instance }}: no training, inference or "
          "SLO finding can fire, and the agents keep their batches in their spools.",
          "Every alert built on the collector's findings (stragglers, hangs, regressions, SLO burn) is blind while it is "
          "down. Nothing is lost yet: each agent keeps what it could not ship on disk, up to its spool's bound, and "
          "sends it when the collector is back; their FleetscopeAgentShipperBacklog tickets follow.",
          "`curl -s http://<collector>:9837/healthz`; on its host `systemctl status fleetscope-collector` and "
          "`journalctl -u fleetscope-collector --since -15min` (a start that fails names the bad setting or file).",
          "Restart it. It replays its write-ahead log before it serves (/healthz says `starting` meanwhile; restart "
          "takes seconds even at 4,096 nodes); if it exits at start, its last log line says why."),
    Alert("FleetscopeCollectorStorageFailing", "fleetscope-collector", "fleetscope_collector_storage_writable == 0",
          "{collector.storage_failing_for}", "page",
          "the collector {{ $labels.instance }} cannot write its data: ingest is refused",
          "The collector {{ $labels.instance }} cannot write its write-ahead log or its checkpoints: it answers every "
          "ingest with 503 and the agents keep their batches in their spools.",
          "Disk full, read-only or failing under the collector's data directory. Reads keep working from what it holds; "
          "new workload events and frames wait on the nodes, up to each spool's bound, and are lost past it.",
          "`curl -s http://<collector>:9837/healthz` says why (`cannot_write` and the error); `df -h` and `dmesg` on the "
          "data directory's filesystem; `fleetscope_collector_ingest_rejected_total{reason=\"storage\"}` rising.",
          "Free space (or lower `retention_bytes` so retention frees it, or remount read-write): the collector retries "
          "by itself and takes ingest again once space returns; it needs no restart."),
    Alert("FleetscopeCollectorCheckpointStale", "fleetscope-collector",
          "time() - fleetscope_collector_last_checkpoint_timestamp_seconds > {collector.checkpoint_stale_seconds}", "5m",
          "page",
          "the collector {{ $labels.instance }} has made no checkpoint for {{ $value | humanizeDuration }}",
          "The collector {{ $labels.instance }} last committed a checkpoint {{ $value | humanizeDuration }} ago: "
          "its write-ahead log and the rows waiting in memory keep growing.",
          "Checkpoints move what the write-ahead log holds into the Parquet history every 30 s by default. None for "
          "this long: they fail (disk, permissions) or one hangs (a stuck fsync on network storage, a wedged thread). "
          "Acknowledged data is safe in the log, but a restart has to replay all of it, and once the rows waiting "
          "fill their share of the memory budget the collector refuses ingest (503) until a checkpoint succeeds.",
          "`fleetscope_collector_wal_bytes` and `fleetscope_collector_memory_bytes{table=\"unwritten\"}` growing; "
          "`journalctl -u fleetscope-collector | grep -i checkpoint` (each failure is logged with its error); "
          "`py-spy dump --pid <collector pid>` shows a hung one.",
          "Fix what the log names (space, permissions, the storage behind the data directory). A hung checkpoint: "
          "restart the collector: it replays the log, loses nothing acknowledged, and checkpoints again."),
    Alert("FleetscopeCollectorRefusedIdentity", "fleetscope-collector",
          'increase(fleetscope_collector_ingest_rejected_total{{reason=~"identity|seq_jump"}}[15m]) > 0', "0m", "ticket",
          "the collector {{ $labels.instance }} refused batches that claim another identity ({{ $labels.reason }})",
          "The collector {{ $labels.instance }} refused {{ $value }} ingest requests in 15 minutes because they wrote as "
          "another node than the one that authenticated, or numbered their batches far above their own ({{ $labels.reason }}).",
          "Someone holding a node's token or certificate tries to write as another node or to silence another agent, or an "
          "agent is misconfigured (its token bound to another node, a copied agent.toml). Nothing was stored.",
          "The collector's log names the refused node and agent_id; compare with the ingest-token file's `<token> <node>` "
          "lines or the client certificate's common name.",
          "A misconfigured agent: give it its own token (its batches wait in its spool meanwhile). An unknown sender: "
          "revoke that token or certificate."),
    Alert("FleetscopeCollectorMetricsOmitted", "fleetscope-collector", "fleetscope_collector_metrics_omitted > 0", "30m",
          "ticket",
          "the collector {{ $labels.instance }} leaves {{ $value }} {{ $labels.kind }} out of its /metrics",
          "The collector {{ $labels.instance }} has more {{ $labels.kind }} than its /metrics exports: "
          "{{ $value }} are left out, the quiet ones first.",
          "The collector bounds the series it exports (metrics_max_jobs, _services, _ranks); past the bound the least "
          "troubled and least recent subjects go. Alerts on the left-out ones resolve although the API still has them. "
          "A flood of made-up job names can cause it too.",
          "`curl -s <collector>/metrics | grep metrics_omitted`; the console and `/v1/jobs` list every job.",
          "Raise the bound (`--metrics-max-jobs` and friends) if the cluster really runs that many, and check the ingest "
          "tokens if it does not."),
    Alert("FleetscopeCollectorBehind", "fleetscope-collector",
          'rate(fleetscope_collector_ingest_rejected_total{{reason="backlog"}}[5m]) > 0', "15m", "ticket",
          "the collector {{ $labels.instance }} has refused ingest for 15m to catch up with its backlog",
          "For 15 minutes the collector {{ $labels.instance }} has kept answering batches 503 ({{ $value | humanize }} a "
          "second now) because the rows it has not worked through yet are past their share of the memory budget.",
          "The hot tier's upkeep works through what arrived since its last pass; a pass takes about four times those "
          "rows for a moment, so past a 32nd of the budget ingest waits for it (collector/store.py, Store.admit). A flood "
          "after an outage catches up in minutes. This long, the fleet sends faster than this collector digests: the "
          "agents' spools grow, and past their bound they drop their oldest batches (FleetscopeAgentShipperBacklog).",
          "`fleetscope_collector_ingest_rejected_total{reason=\"backlog\"}` and `fleetscope_collector_events_ingested_total` "
          "rates on the collector's /metrics; `top -H -p <collector pid>` (CPU-bound upkeep on too few cores?); its log.",
          "Give the collector more cores or memory (`memory_budget` sizes the backlog), or split the fleet between "
          "collectors (one a cluster, README \"Run it on a cluster\")."),
    Alert("FleetscopeCollectorMemoryShort", "fleetscope-collector",
          "fleetscope_collector_hot_budget_bytes < fleetscope_collector_memory_budget_bytes / 6", "30m", "ticket",
          "the collector {{ $labels.instance }} runs short of memory: its hot tier is cut to {{ $value | humanize1024 }}B",
          "The collector {{ $labels.instance }} has kept its hot tier under half its share of the memory budget for 30m "
          "(now {{ $value | humanize1024 }}B): its resident memory keeps reaching 80% of the budget.",
          "The hot tier gives back memory whenever the process nears its budget (collector/memory.py). Cut this far for "
          "this long, the fleet needs more than the budget: fewer raw steps a rank and minutes of rollups stay in memory, "
          "so reads of the last hours go to disk (slower), and what the process allocates beyond the hot tier may still "
          "reach the budget, and a unit's MemoryMax or a pod's limit.",
          "`fleetscope_collector_resident_memory_high_bytes` against `fleetscope_collector_memory_budget_bytes`, "
          "`fleetscope_collector_memory_bytes` by table and `fleetscope_collector_hot_held_seconds` on the collector's "
          "/metrics; its log says each time the hot tier's budget is cut.",
          "Raise `memory_budget` (and the unit's MemoryMax or the pod's memory limit: the budget defaults to half of it), "
          "or split the fleet between collectors (one a cluster)."),
]
