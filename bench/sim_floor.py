"""The least time the simulator can take for an hour of a large fleet while it runs the
project's own code per request: the floor of two of its costs, measured, not the whole.

    scheduler   a request joins a decode worker's batch and leaves it: two batch changes,
                and at each the real engine.scheduler.Scheduler's schedule() and
                step_done() walk every running sequence of that worker (the simulator books
                the steps between changes as one event, sim.worker). Timed here: one
                step of a real scheduler holding `batch` decoding sequences, per sequence.
    routing     router.routing's decode order over the decode workers' load records and
                prefill choice over the prefill workers', once per request.

floor = requests x (2 x batch x per-sequence + routing): what those two alone take, before
the event queue, the KV reservation, the prefill steps and the bookkeeping around them.
Run: python -m bench.sim_floor [--rate 1200 --seconds 3600 --batch 130 --decode 110 ...]
"""

from __future__ import annotations

import argparse
import random
import timeit

from engine.scheduler import Scheduler, SchedulerConfig
from router.routing import DecodeLoad, PrefillLoad, PrefillPolicy, decode_order, pick_prefill
from sim.worker import TOKEN, new_sequence


def per_sequence_s(batch: int, steps: int = 300) -> float:
    """One decode step of the real scheduler (schedule, step_done, the sampled token) over
    `batch` running sequences, per sequence: the best of five timings."""
    s = Scheduler(SchedulerConfig(num_blocks=1 << 20, max_num_seqs=max(256, batch),
                                  max_num_batched_tokens=1 << 20))  # fmt: skip
    for i in range(batch):
        s.add(new_sequence(f"r{i}", i, 1024, 1 << 20))

    def step() -> None:
        out = s.schedule()
        s.step_done(out)
        for c in out.chunks:
            c.seq.token_ids.append(TOKEN)

    step()  # the prefills
    return min(timeit.repeat(step, number=steps, repeat=5)) / steps / batch


def routing_s(decode: int, prefill: int, calls: int = 500) -> float:
    """router.routing's two choices for one request, with their load records built."""
    rng = random.Random(0)

    def route() -> None:
        loads = [
            DecodeLoad(f"d{i}", rng.randrange(1000), rng.randrange(200)) for i in range(decode)
        ]
        decode_order(loads, rng)
        ploads = [PrefillLoad(f"p{i}", rng.randrange(10_000)) for i in range(prefill)]
        pick_prefill(ploads, 1024, PrefillPolicy.PREFIX, rng)

    return min(timeit.repeat(route, number=calls, repeat=5)) / calls


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.sim_floor")
    p.add_argument("--rate", type=float, default=1200.0, help="requests per second")
    p.add_argument("--seconds", type=float, default=3600.0)
    p.add_argument("--batch", type=int, default=130, help="running sequences a decode worker")
    p.add_argument("--decode", type=int, default=110)
    p.add_argument("--prefill", type=int, default=140)
    args = p.parse_args(argv)
    requests = args.rate * args.seconds
    seq = per_sequence_s(args.batch)
    route = routing_s(args.decode, args.prefill)
    sched = requests * 2 * args.batch * seq
    print(f"{requests:,.0f} requests; the real scheduler {1e9 * seq:.0f} ns a sequence a step "
          f"at batch {args.batch}: {sched:,.0f} s; routing {1e6 * route:.0f} us a request: "
          f"{requests * route:,.0f} s; floor {sched + requests * route:,.0f} s "
          f"({requests / (sched + requests * route):,.0f} requests/s of simulation)")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
