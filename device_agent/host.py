"""Several agents in one process, for a fleet too large for one process per agent (``deftly bench scale``).

    python -m device_agent.host --count 25 --state-root D --name-prefix s1- --token T [--simulate CLASS]

Each agent is the real thing (``device_agent.server.Agent``): its own state
dir (identity, file store, outbox, checkpoints), its own WebSocket endpoint on
its own port, its own compute thread; they share only the process, so the
runtime is imported once. None advertises on zeroconf (a hundred adverts on one
host help no one): the desktop adds them by address. On start it prints one
JSON line per agent, ``{"name", "id", "port", "token"}``, then ``ready``; it
serves until SIGINT or SIGTERM.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
from pathlib import Path

from device_agent.server import Agent, AgentConfig
from device_agent.simulate import load_device_class
from shared.errors import InputError


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m device_agent.host", description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, required=True, help="agents to run in this process")
    parser.add_argument("--state-root", type=Path, required=True, help="agent i keeps its state in ROOT/NAME")
    parser.add_argument("--name-prefix", default="agent-", help="agent i is named PREFIX<i> (default agent-)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--token", required=True, help="the pairing token of every agent here")
    parser.add_argument("--simulate", metavar="CLASS", help="every agent stands in for this device class")
    return parser.parse_args(argv)


async def _serve(args: argparse.Namespace) -> None:
    simulate = load_device_class(args.simulate) if args.simulate else None
    loop = asyncio.get_running_loop()
    stop = loop.create_future()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, lambda: stop.done() or stop.set_result(None))
    agents, ports, tasks = [], [], []
    for i in range(args.count):
        name = f"{args.name_prefix}{i}"
        agent = Agent(AgentConfig(state_dir=args.state_root / name, name=name, host=args.host, port=0,
                                  token=args.token, simulate=simulate))
        ready = asyncio.Event()
        bound: list[int] = []
        tasks.append(asyncio.create_task(agent.serve(on_ready=lambda port, b=bound, r=ready: (b.append(port),
                                                                                              r.set()), stop=stop)))
        await ready.wait()
        agents.append(agent)
        ports.append(bound[0])
    for agent, port in zip(agents, ports):
        print(json.dumps({"name": agent.info.name, "id": agent.id, "port": port, "token": agent.token}), flush=True)
    print("ready", flush=True)
    await asyncio.gather(*tasks)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.count < 1:
        print("--count must be at least 1", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        asyncio.run(_serve(args))
    except InputError as exc:
        print(f"device_agent.host: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
