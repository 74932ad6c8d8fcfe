"""A synthetic LLM inference service: Poisson arrivals, queueing, TTFT and streamed tokens.

    python -m fleetscope.sim.inference --service chat --model llama3-8b --rps 10
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import sys


async def serve(args, stop: asyncio.Event) -> None:
    import fleetscope

    svc = fleetscope.inference(service=args.service, model=args.model)
    started = asyncio.get_running_loop().time()
    rng = random.Random(args.seed)
    slots = asyncio.Semaphore(args.concurrency)  # the server's batch slots: past them, requests queue
    tasks: set[asyncio.Task] = set()

    async def one() -> None:
        prompt = int(rng.lognormvariate(6.5, 0.6))
        output = max(1, int(rng.lognormvariate(5.0, 0.7)))
        with svc.request(input_tokens=prompt) as r:
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            async with slots:
                r.queued(loop.time() - t0)
                spike = args.spike_factor if args.spike_at is not None and args.spike_at <= loop.time() - started < args.spike_at + args.spike_s else 1.0
                await asyncio.sleep((0.02 + prompt * 0.00004 * rng.lognormvariate(0, 0.25)) * spike)  # prefill
                r.first_token()
                await asyncio.sleep(output * args.tpot * rng.lognormvariate(0, 0.15))  # decode
                if rng.random() < args.error_rate:
                    r.finish(output_tokens=output, status="error")
                else:
                    r.finish(output_tokens=output)

    while not stop.is_set():
        task = asyncio.create_task(one())
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        try:
            await asyncio.wait_for(stop.wait(), timeout=rng.expovariate(args.rps))
        except asyncio.TimeoutError:
            pass
    if tasks:
        await asyncio.wait(tasks, timeout=10)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--service", default="chat")
    p.add_argument("--model", default="llama3-8b")
    p.add_argument("--agent", default=None, help="agent event address host:port (default 127.0.0.1:9836)")
    p.add_argument("--rps", type=float, default=8.0, help="mean requests per second")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--tpot", type=float, default=0.012, help="mean seconds per output token")
    p.add_argument("--error-rate", type=float, default=0.005)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--spike-at", type=float, default=None, help="seconds after start when prefill slows down (a latency spike)")
    p.add_argument("--spike-s", type=float, default=120.0, help="how long the spike lasts")
    p.add_argument("--spike-factor", type=float, default=8.0, help="how much slower prefill is during the spike")
    args = p.parse_args(argv)
    if args.agent:
        os.environ["FLEETSCOPE_AGENT_ADDR"] = args.agent

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await serve(args, stop)

    asyncio.run(run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
