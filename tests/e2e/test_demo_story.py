"""The demo's story, told in under two minutes, happens as the README says: the overheated GPU's rank is
named a straggler with thermal slowdown as its cause, the XID is seen, the chat SLO burns, and the job's
restart from its checkpoint is counted in its goodput."""

from __future__ import annotations

import json
import os
import re
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request

from fleetscope.demo import COLLECTOR_PORT, Story, agent_ports, demo_scenario, port_free
from tests.conftest import wait_until

GPUS = 6  # the story needs GPUs 3 and 5 of node-01; six a node keeps the machine's load down
STRAGGLER_RANK = GPUS + 3  # node-01's GPU 3
# collector/attribution.py's causes that name no faulty part: the host's CPU or memory, the rank's data loading
NOT_HARDWARE = {"cpu_saturation", "memory_pressure", "data_loader", "no_hardware_signal"}
# The GPU heats from the start (it throttles ~35 s in: the simulator's thermal time constant), the job
# fails well after the straggler can be found (10 warm-up steps, then a 16-step window of ~0.5 s steps: found
# ~45 s in on a 2-core machine). Were the XID to come first on a slower one, the straggler would be found in the
# restarted job all the same (its GPU is still hot), only later.
STORY = "thermal=0,spike=20,spike_s=60,xid=65,checkpoint_every=15,checkpoint_s=1,restart_delay=3,startup_s=2"


def test_a_rank_plays_the_gpu_its_agent_plays(tmp_path):
    """The training rank's model of its GPU and the agent's simulator agree: same scenario, seed and start."""
    from agent.gpu.scenario import load_scenario, read_scenario
    from agent.gpu.sim import SimulatedGpus
    from fleetscope.sim.training import GpuSpec, RankFailed, RankGpu

    start = round(time.time() - 200, 3)  # as the file writes it
    path = tmp_path / "faults.toml"
    path.write_text(demo_scenario(Story(thermal=90, xid=150), start))
    scenario = read_scenario(path)
    assert scenario.start_ts == start
    # the agent started 5 s after the story: it sees each fault 5 s later on its own clock
    agent_faults = load_scenario(path, now=start + 5)
    assert [f.at_s for f in agent_faults] == [85, 145]
    clock = [5.0]
    agent = SimulatedGpus(GPUS, seed=1, node="node-01", clock=lambda: clock[0], faults=agent_faults)

    def agent_at(t):  # the agent samples every 2 s
        while clock[0] < t:
            clock[0] += 2
            states = agent.read()
        return states

    rank_gpu = RankGpu(GpuSpec("node-01", 1, scenario.faults, scenario.start_ts), 3, time.time())
    healthy = RankGpu(GpuSpec("node-01", 1, scenario.faults, scenario.start_ts), 2, time.time())
    states = agent_at(200)
    throttled = states[3].sm_clock_max_hertz / states[3].sm_clock_hertz
    assert states[3].clock_event_mask & 0x20 and throttled > 1.5  # thermal slowdown: the clock under 2/3 of max
    assert abs(rank_gpu.slowdown() - throttled) < 0.05 * throttled
    assert healthy.slowdown() < 1.15 and states[2].sm_clock_max_hertz / states[2].sm_clock_hertz < 1.15  # boost varies with power
    # GPU 5's XID 13 (at 150 s) was before this rank's process started: not its failure
    xid_rank = RankGpu(GpuSpec("node-01", 1, scenario.faults, scenario.start_ts), 5, time.time())
    assert xid_rank.slowdown() < 1.15 and agent_at(202)[5].last_xid == 13
    # ... but one that arrives while it runs kills it
    late = RankGpu(GpuSpec("node-01", 1, scenario.faults, time.time() - 149.5), 5, time.time())
    late.slowdown()
    time.sleep(0.6)
    try:
        late.slowdown()
        raise AssertionError("XID 13 on the rank's GPU did not end the rank")
    except RankFailed as exc:
        assert "XID 13" in str(exc)


def test_the_demo_tells_its_story(tmp_path):
    ports = [COLLECTOR_PORT, *agent_ports(0), *agent_ports(1)]
    busy = [p for p in ports if not port_free(p)]
    assert not busy, f"the demo's ports must be free for this test; busy: {busy}"
    out_path = tmp_path / "demo.out"
    out = out_path.open("w")
    started = time.monotonic()
    demo = subprocess.Popen(
        [sys.executable, "-m", "fleetscope", "demo", "--duration", "400", "--nodes", "2", "--gpus", str(GPUS),
         "--no-console", "--no-prometheus", "--workdir", str(tmp_path / "demo")],
        stdout=out, stderr=subprocess.STDOUT, text=True, env={**os.environ, "FLEETSCOPE_DEMO_STORY": STORY})
    try:
        def printed():
            out.flush()
            return out_path.read_text()

        printed_urls = wait_until(lambda: re.search(r"collector API  (\S+)/docs\s+\(read token: (\S+)\)", printed()),
                                  timeout=60, what="the demo's URLs")
        base, token = printed_urls.group(1), printed_urls.group(2)
        ca_file = tmp_path / "demo" / "tls" / "fleetscope-demo-CA.crt"
        context = ssl.create_default_context(cafile=str(ca_file)) if base.startswith("https") else None

        def get(path):
            req = urllib.request.Request(base + path, headers={"Authorization": f"Bearer {token}"})
            try:
                with urllib.request.urlopen(req, timeout=5, context=context) as resp:
                    return json.loads(resp.read())
            except urllib.error.HTTPError:
                return None

        gpus = wait_until(lambda: (g := get("/v1/gpus?node=node-01")) and len(g["gpus"]) == GPUS and g["gpus"],
                          timeout=60, what="node-01's GPUs")
        uuid = {g["index"]: g["uuid"] for g in gpus}

        def straggler():
            found = get("/v1/findings?kind=straggler&job=demo-llama-8b") or {"findings": []}
            return next((f for f in found["findings"] if f["subject"]["rank"] == STRAGGLER_RANK
                         and f["probable_causes"][0]["cause"] == "thermal_slowdown"), None)

        finding = wait_until(straggler, timeout=150, interval=2, what="the straggler on node-01's GPU 3, thermal slowdown first")
        assert finding["subject"]["node"] == "node-01" and finding["subject"]["gpu_uuid"] == uuid[3]
        assert finding["severity"] == "page"  # its peers wait for it more than 5% of each step
        # Only GPU 3 is faulty: no other rank's GPU or NIC may be blamed. Another rank may itself be slow: the ranks
        # are real processes on a small machine busy with the whole demo (once, on the 2-core CI machine, rank 7
        # was found a straggler too; what its finding blamed was not recorded: this message now prints it).
        others = [f for f in get("/v1/findings?kind=straggler&job=demo-llama-8b")["findings"]
                  if f["subject"]["rank"] != STRAGGLER_RANK]
        blamed = [f for f in others if {c["cause"] for c in f["probable_causes"]} - NOT_HARDWARE]
        assert not blamed, json.dumps(blamed, indent=1)

        def xid_seen():
            gpu5 = next(g for g in get("/v1/gpus?node=node-01")["gpus"] if g["index"] == 5)
            return gpu5["xid_total"] >= 1 and "13" in (gpu5["xid_counts"] or "")

        wait_until(xid_seen, timeout=90, interval=2, what="XID 13 on node-01's GPU 5")

        # the spike's: a page on time to first token (a fresh service can open a ticket on its first minutes' noise)
        wait_until(lambda: [f for f in get("/v1/findings?kind=slo_burn&service=chat")["findings"]
                            if f["subject"]["slo"] == "chat-ttft" and f["severity"] == "page"],
                   timeout=60, interval=2, what="the chat service's time to first token burning its SLO")

        last: dict = {}

        def restarted():
            g = last["goodput"] = get("/v1/jobs/demo-llama-8b/goodput")
            seconds = g["gpu_seconds"] if g else {}
            # every rank of the new incarnation has stepped (they start within a second or two of each other)
            ready = (g and len(g["incarnations"]) == 2 and g["incarnations"][1]["pids"] == 2 * GPUS
                     and all(seconds[k] > 0 for k in ("recomputed", "startup", "checkpoint")))
            return g if ready else None

        try:
            goodput = wait_until(restarted, timeout=90, interval=2, what="the restart in the job's goodput")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; its goodput was {json.dumps(last.get('goodput'))[:2000]}") from None
        first, second = goodput["incarnations"]
        assert second["restored_from_step"] is not None and second["restored_from_step"] % 15 == 0  # a checkpoint's step
        assert second["first_step"] == second["restored_from_step"] <= first["last_step"]
        assert second["pids"] == first["pids"] == 2 * GPUS  # every rank is a new process
        assert goodput["gpu_seconds"]["straggler_wait"] > 0 and 0 < goodput["goodput_ratio"] < 1
        text = printed()
        assert "restarts from its last" in text
        training_log = (tmp_path / "demo" / "logs" / "training.log").read_text()
        assert "rank 11: CUDA error on GPU 5 of node-01: XID 13" in training_log, training_log
        print(f"story told in {time.monotonic() - started:.0f} s")
    finally:
        demo.send_signal(signal.SIGTERM)
        code = demo.wait(timeout=120)
        out.close()
    log = out_path.read_text()
    assert code == 0, log
    assert "exited with code" not in log, log  # no part of the demo died (the training's ranks die; its launcher does not)
