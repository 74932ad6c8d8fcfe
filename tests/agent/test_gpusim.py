"""Simulated GPUs move like real ones and repeat from a seed."""

from __future__ import annotations

from agent.gpu.sim import IDLE_W, TDP_W, SimulatedGpus


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def run(seed: int, node: str = "n", seconds: int = 120, step: float = 5.0):
    clock = Clock()
    sim = SimulatedGpus(4, seed=seed, node=node, clock=clock)
    states = []
    for _ in range(int(seconds / step)):
        clock.t += step
        states.append(sim.read())
    return states


def test_same_seed_same_values_and_other_seed_other_values():
    a, b, c = run(7), run(7), run(8)
    assert a == b
    assert a != c


def test_nodes_have_distinct_uuids():
    assert {g.uuid for g in run(0, "a", 5)[0]}.isdisjoint({g.uuid for g in run(0, "b", 5)[0]})


def test_values_stay_physical():
    for sample in run(1, seconds=600):
        for g in sample:
            assert 0 <= g.utilization_ratio <= 1
            assert 0 <= g.memory_used_bytes <= g.memory_total_bytes
            assert g.memory_used_bytes + g.memory_free_bytes + g.memory_reserved_bytes == g.memory_total_bytes
            assert IDLE_W * 0.8 <= g.power_watts <= TDP_W
            assert g.sm_clock_hertz <= g.sm_clock_max_hertz


def test_temperature_follows_power_with_a_lag():
    states = run(2, seconds=400, step=1.0)
    first, later = states[0][0], states[-1][0]
    # Under sustained load the GPU heats up from near ambient; energy only grows.
    assert first.temperature_celsius < 40 < later.temperature_celsius
    energies = [s[0].energy_joules for s in states]
    assert energies == sorted(energies)
    # Temperature tracks power smoothed over the thermal time constant (it includes checkpoint dips).
    import statistics

    smoothed, power_ema = [], states[0][0].power_watts
    for s in states:
        power_ema += (s[0].power_watts - power_ema) / 25.0
        smoothed.append(power_ema)
    temps = [s[0].temperature_celsius for s in states]
    assert statistics.correlation(smoothed[30:], temps[30:]) > 0.8


def test_the_sample_interval_does_not_change_the_physics():
    coarse = run(3, seconds=100, step=10.0)[-1][0]
    fine = run(3, seconds=100, step=2.0)[-1][0]
    # Noise differs with the number of draws, the thermal state must not diverge.
    assert abs(coarse.temperature_celsius - fine.temperature_celsius) < 6


def test_the_read_cadence_does_not_change_how_far_utilisation_wanders():
    """A demo rank reads its GPU's model every quarter second, the agent every few seconds: both must see the
    same spread of utilisation (and so of the boost clock) about the busy target, or a healthy rank's GPU lags
    its peers' for seconds at a time and reads as a straggler."""
    import statistics

    def spread(step: float) -> float:
        clock = Clock()
        sim = SimulatedGpus(8, seed=5, node="n", clock=clock)
        values = []
        for _ in range(int(600 / step)):
            clock.t += step
            values += [g.utilization_ratio for g in sim.read() if g.utilization_ratio > 0.85]  # busy, not in or after a dip
        return statistics.pstdev(values)

    fine, coarse = spread(0.25), spread(2.0)
    assert 0.85 < fine / coarse < 1.15, (fine, coarse)  # with a draw per read: 1.5
