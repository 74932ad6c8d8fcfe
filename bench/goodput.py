"""What the goodput ledger costs: per batch of step rows on ingest, per read, per snapshot, and its size.

A job of RANKS ranks runs STEPS 1 s steps, each step arriving as one 8-row batch per node (as agents
send them) through `GoodputLedger.observe`, the store's observer; then its settled steps are folded into
spans and a week of 1 s steps (604,800 steps, as spans) is read and snapshotted.

    python -m bench.goodput [--ranks 256] [--steps 600]
"""

from __future__ import annotations

import argparse
import time

from collector.goodput_ledger import SETTLE_S, SPAN_STEPS, GoodputLedger
from collector.tables import frame_from_rows

T0 = 1.7e9
WEEK_STEPS = 7 * 86400


def batches(ranks: int, steps: int) -> list:
    out = []
    for step in range(steps):
        for node in range(ranks // 8):
            out.append(frame_from_rows("steps", [
                {"job": "big", "rank": node * 8 + r, "world_size": ranks, "step": step, "ts": T0 + step, "duration_s": 0.9,
                 "pid": 1000 + node * 8 + r, "phases": {"data": 0.05, "comm": 0.2 + 0.01 * r}} for r in range(8)]))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, default=256)
    parser.add_argument("--steps", type=int, default=600)
    args = parser.parse_args(argv)
    ledger = GoodputLedger()
    frames = batches(args.ranks, args.steps)
    started = time.perf_counter()
    for frame in frames:
        ledger.observe("steps", frame, now=T0)
    took = time.perf_counter() - started
    print(f"goodput ledger, {args.ranks} ranks x {args.steps} steps in 8-row batches: "
          f"{took / len(frames) * 1e6:.0f} us per batch ({took / (args.ranks * args.steps) * 1e6:.1f} us per row)")
    started = time.perf_counter()
    ledger.report("big", now=T0 + args.steps)
    print(f"  a read with {args.steps} steps not settled yet: {(time.perf_counter() - started) * 1e3:.0f} ms")
    job = ledger._jobs["big"]
    job.spans = [[0, i * SPAN_STEPS, (i + 1) * SPAN_STEPS - 1, T0 + i * SPAN_STEPS, T0 + (i + 1) * SPAN_STEPS - 0.1,
                  args.ranks, 1.0, 0.5] for i in range(WEEK_STEPS // SPAN_STEPS)]
    started = time.perf_counter()
    ledger.report("big", now=T0 + WEEK_STEPS)
    print(f"  a read of a week of 1 s steps ({len(job.spans):,} spans and {len(job.steps)} steps): "
          f"{(time.perf_counter() - started) * 1e3:.0f} ms")
    started = time.perf_counter()
    size = len(bytes(ledger.snapshot()))
    print(f"  its snapshot: {size / 1e6:.2f} MB in {(time.perf_counter() - started) * 1e3:.0f} ms")
    started = time.perf_counter()
    ledger.maintain(now=T0 + 10 * SETTLE_S)
    print(f"  folding {args.steps} settled steps into spans: {(time.perf_counter() - started) * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
