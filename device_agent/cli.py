"""``deftly-agent``: run the device agent (parses, prints, calls ``device_agent.server``).

    deftly-agent [--name N] [--host H] [--port P] [--token T] [--state-dir D]
                 [--data PATH [--task TASK.toml] [--tokenizer tokenizer.json]]
                 [--simulate CLASS] [--tls] [--advertise/--no-advertise]

At start it prints where it listens, its pairing token (kept in the state dir
unless given), with ``--tls`` its certificate's fingerprint (the certificate is
kept in the state dir too), and what it advertises; then it serves until Ctrl-C
or SIGTERM.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import sys
from pathlib import Path

import psutil

from device_agent.advert import SERVICE_TYPE, Advert, instance_name, txt_properties
from device_agent.server import Agent, AgentConfig
from device_agent.simulate import load_device_class
from shared.errors import InputError
from shared.protocol_limits import WS_PATH


def default_state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(base) / "deftly-agent"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="deftly-agent", description="Run a deftly device agent: it is found on "
                                     "the network, paired by token, and trains the rounds a desktop gives it.")
    parser.add_argument("--name", default=socket.gethostname(), help="the name a desktop shows (default: hostname)")
    parser.add_argument("--host", default="0.0.0.0", help="address to listen on (default 0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=8765, help="TCP port (default 8765; 0 = any free port)")
    parser.add_argument("--token", help="pairing token (default: the one kept in the state dir, else a new one)")
    parser.add_argument("--state-dir", type=Path, default=default_state_dir(),
                        help="identity, stored files, checkpoints and log (default: %(default)s)")
    parser.add_argument("--data", type=Path, help="this device's own training file (.npz, or .csv/.tsv/.jsonl "
                        "with --task); it never leaves the device")
    parser.add_argument("--task", type=Path, help="task TOML saying how to read a text --data file")
    parser.add_argument("--tokenizer", type=Path, help="the model's tokenizer.json for text --data (when the "
                        "program's manifest does not name one)")
    parser.add_argument("--simulate", metavar="CLASS", help="stand in for a device class of "
                        "assets/fleets/classes/device_classes.toml (or FILE.toml:CLASS): its compute speed, memory and link")
    parser.add_argument("--tls", action="store_true", help="serve wss:// with a self-signed certificate kept in the "
                        "state dir; its fingerprint is advertised, and a desktop pins it on first use")
    parser.add_argument("--advertise", action=argparse.BooleanOptionalAction, default=True,
                        help="advertise on zeroconf as _deftly._tcp.local. (default: yes)")
    return parser.parse_args(argv)


def advertised_addresses(host: str) -> list[str]:
    """The IPv4 addresses to advertise: ``host`` itself, or every non-loopback one (else 127.0.0.1)."""
    if host not in ("0.0.0.0", ""):
        return [host]
    found = [a.address for addrs in psutil.net_if_addrs().values() for a in addrs
             if a.family == socket.AF_INET and not a.address.startswith("127.")]
    return sorted(set(found)) or ["127.0.0.1"]


def _setup_logging(state_dir: Path) -> None:
    state_dir.mkdir(parents=True, exist_ok=True)
    formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    handlers = [logging.FileHandler(state_dir / "agent.log"), logging.StreamHandler(sys.stderr)]
    root = logging.getLogger("deftly")
    root.setLevel(logging.INFO)
    for handler in handlers:
        handler.setFormatter(formatter)
        root.addHandler(handler)
    logging.getLogger("deftly.agent.websockets").setLevel(logging.WARNING)


async def _run(args: argparse.Namespace) -> None:
    simulate = load_device_class(args.simulate) if args.simulate else None
    config = AgentConfig(state_dir=args.state_dir, name=args.name, host=args.host, port=args.port, token=args.token,
                         data=args.data, task=args.task, tokenizer=args.tokenizer, simulate=simulate, tls=args.tls)
    agent = Agent(config)
    loop = asyncio.get_running_loop()
    stop = loop.create_future()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, lambda: stop.done() or stop.set_result(None))
    advert: Advert | None = None
    ready = asyncio.Event()
    bound: list[int] = []

    def on_ready(port: int) -> None:
        bound.append(port)
        ready.set()

    serving = asyncio.create_task(agent.serve(on_ready=on_ready, stop=stop))
    await asyncio.wait({serving, asyncio.ensure_future(ready.wait())}, return_when=asyncio.FIRST_COMPLETED)
    if serving.done():
        await serving  # it failed to listen: raise why
        return
    port = bound[0]
    addresses = advertised_addresses(args.host)
    info = agent.info
    print(f"deftly-agent {info.name!r} (id {info.id}), deftly {info.version}, protocol {info.protocol}, "
          f"{info.runtime}, {info.arch}", flush=True)
    scheme = "wss" if agent.tls else "ws"
    print(f"listening on {scheme}://{args.host}:{port}{WS_PATH}  (reach it at "
          f"{', '.join(f'{scheme}://{a}:{port}{WS_PATH}' for a in addresses)})", flush=True)
    print(f"pairing token: {agent.token}", flush=True)
    if agent.tls:
        print(f"TLS certificate: sha256:{agent.tls.fingerprint} ({agent.tls.cert}); add it by address as "
              f"--agent wss://{addresses[0]}:{port}#sha256:{agent.tls.fingerprint}", flush=True)
    if simulate:
        print(f"simulating {simulate.name} ({simulate.description}): compute x{simulate.compute_factor} of one "
              f"host core's CPU time, {simulate.memory_gib:g} GiB, link {simulate.link_mbit_s:g} Mbit/s", flush=True)
    state = agent.agent_state()
    if state.data is not None:
        print(f"training data: {state.data.source}, {state.data.examples} examples, label shares "
              f"{state.data.label_shares}", flush=True)
    if state.data_error:
        print(f"training data unusable: {state.data_error}", flush=True)
    if args.advertise:
        advert = Advert(info, port, addresses)
        txt = ", ".join(f"{k}={v}" for k, v in txt_properties(info).items())
        print(f"advertising {SERVICE_TYPE} as {instance_name(info)} on {', '.join(addresses)}: {txt}", flush=True)
        try:
            await advert.start()
        except OSError as exc:  # e.g. multicast refused (some Wi-Fi, Android, qemu-user): serving still works
            advert = None
            print(f"cannot advertise on zeroconf ({exc.strerror or exc}): still serving; add it on the desktop "
                  f"by address", flush=True)
    else:
        print("not advertising (--no-advertise): add it on the desktop by address", flush=True)
    try:
        await serving
    finally:
        if advert is not None:
            await advert.stop()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    _setup_logging(args.state_dir)
    try:
        asyncio.run(_run(args))
    except InputError as exc:
        print(f"deftly-agent: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # the port is taken, the address is not this machine's
        print(f"deftly-agent: cannot listen on {args.host}:{args.port} ({exc.strerror or exc})", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
