"""What one step's round trip between the HTTP process and its engine worker costs.

    .venv/bin/python benchmarks/engine_channel.py [--steps 2000] [--out results.md]

An echo peer in a child process answers each steady-state decode `StepPlan` (R rows, 128
blocks each already sent, so no block ids travel) with the `StepResult` a real engine
would send (one token and logprob per row, KV usage naming every row). The same
messages cross two transports:

    unix        tgi.engine.worker.channel.Channel, what the worker uses: a Unix-domain
                stream socket framed by multiprocessing.connection (typed wire encoding
                both ways, polling as it does)
    zmq-ipc     a ZeroMQ PAIR socket over ipc:// (pyzmq, the `bench` extra), the same
                wire encoding both ways, blocking receives

and the encode/decode alone (`codec`, no transport) shows what the wire format costs.
All three run in the same process, in turns of `--block` steps, so a drift in the
host's load touches each alike. Reported: microseconds per round trip (median and p99)
at 1, 32 and 256 rows.
"""

from __future__ import annotations

import argparse
import multiprocessing
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from tgi.backend import wire
from tgi.backend.contract import KVUsage, RunningSequence, StepPlan
from tgi.engine.results import StepResult
from tgi.engine.worker.channel import Channel, ChannelListener

ROWS = (1, 32, 256)


def _plan(rows: int, step: int) -> StepPlan:
    running = tuple(
        RunningSequence(seq_id, 2048 + step, (), decode=True, last_token=None)
        for seq_id in range(rows)
    )
    return StepPlan(running=running, step_index=step)


def _result(plan: StepPlan) -> StepResult:
    ids = [row.seq_id for row in plan.running]
    return StepResult(
        tokens=[(seq_id, 1234, -0.5) for seq_id in ids],
        durations={"decode": 0.01},
        kv=KVUsage(frozenset(ids), 2048 * len(ids), 1 << 20),
        step_index=plan.step_index,
        engine_s=0.01,
    )


def _echo_unix(address: str) -> None:
    channel = Channel.connect(address)
    while True:
        plan = channel.receive((StepPlan,))
        if plan.step_index < 0:
            return
        channel.send(_result(plan))


def _echo_zmq(address: str) -> None:
    import zmq

    socket = zmq.Context.instance().socket(zmq.PAIR)
    socket.connect(address)
    while True:
        plan = wire.decode(socket.recv(), StepPlan)
        if plan.step_index < 0:
            return
        socket.send(wire.encode(_result(plan)))


def _percentiles(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    return statistics.median(ordered) * 1e6, ordered[int(len(ordered) * 0.99)] * 1e6


class _Unix:
    """The worker's own channel to an echo peer."""

    def __init__(self) -> None:
        listener = ChannelListener()
        self.peer = multiprocessing.get_context("spawn").Process(
            target=_echo_unix, args=(listener.address,)
        )
        self.peer.start()
        self.channel = listener.accept(timeout_s=60)

    def round_trip(self, plan: StepPlan) -> None:
        self.channel.send(plan)
        self.channel.receive((StepResult,))

    def close(self) -> None:
        self.channel.send(_plan(0, -1))
        self.peer.join(timeout=10)
        self.channel.close()


class _Zmq:
    """A ZeroMQ PAIR socket over ipc:// to an echo peer, the same bytes."""

    def __init__(self) -> None:
        import zmq

        self.directory = tempfile.mkdtemp(prefix="tgi-zmq-")
        address = f"ipc://{self.directory}/channel"
        self.socket = zmq.Context.instance().socket(zmq.PAIR)
        self.socket.bind(address)
        self.peer = multiprocessing.get_context("spawn").Process(target=_echo_zmq, args=(address,))
        self.peer.start()

    def round_trip(self, plan: StepPlan) -> None:
        self.socket.send(wire.encode(plan))
        wire.decode(self.socket.recv(), StepResult)

    def close(self) -> None:
        self.socket.send(wire.encode(_plan(0, -1)))
        self.peer.join(timeout=10)
        self.socket.close(linger=0)
        shutil.rmtree(self.directory, ignore_errors=True)


class _Codec:
    """Encoding and decoding both messages, no transport."""

    def round_trip(self, plan: StepPlan) -> None:
        received = wire.decode(wire.encode(plan), StepPlan)
        wire.decode(wire.encode(_result(received)), StepResult)

    def close(self) -> None:
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3000, help="per transport and size")
    parser.add_argument("--block", type=int, default=100, help="steps before switching")
    parser.add_argument("--out", type=Path, help="also write the table (Markdown) here")
    args = parser.parse_args()
    lines = [
        "| transport | rows | plan bytes | result bytes | median µs | p99 µs |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    transports: dict[str, _Unix | _Zmq | _Codec] = {
        "codec": _Codec(),
        "unix": _Unix(),
        "zmq-ipc": _Zmq(),
    }
    try:
        for rows in ROWS:
            plan_bytes = len(wire.encode(_plan(rows, 1)))
            result_bytes = len(wire.encode(_result(_plan(rows, 1))))
            samples: dict[str, list[float]] = {name: [] for name in transports}
            # blocks of steps, transports in turn: the host's load drifts alike for all
            for start in range(0, args.steps, args.block):
                for name, transport in transports.items():
                    for step in range(start, min(start + args.block, args.steps)):
                        plan = _plan(rows, step)
                        started = time.perf_counter()
                        transport.round_trip(plan)
                        samples[name].append(time.perf_counter() - started)
            for name, taken in samples.items():
                median, p99 = _percentiles(taken[args.steps // 10 :])
                lines.append(
                    f"| {name} | {rows} | {plan_bytes} | {result_bytes} | "
                    f"{median:.0f} | {p99:.0f} |"
                )
                print(lines[-1], flush=True)
    finally:
        for transport in transports.values():
            transport.close()
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
