"""The device agent's install, built the documented way and measured, per platform.

`deftly bench install` writes `bench/results/install.json` and `install.png`. On each
platform it builds fresh virtual environments, one per install variant (`VARIANTS`;
"documented" is the README's: torch alone with ``--no-deps``, then
`pip install --no-deps -r requirements-agent.txt` and the project's wheel with
``--no-deps``), runs `python -m device_agent.selfcheck` in each on two tiny exported
programs (one XNNPACK-delegated, one on portable kernels only), and records per variant:

* `venv_mb`       the environment on disk, in MiB (as ``du``: every file, ``__pycache__`` included)
* `packages_mb`   each installed distribution's files in MiB (its RECORD), `packages` their versions
* `sources`       where pip took each wheel from (its ``--report``)
* `imports`       each agent module: "ok" or why it did not import
* `rss_mb_after_import_program`  resident memory after ``import device_agent.program``, in MiB
* `programs`      per program: whether it ran, its loss, and the largest difference of its
                  loss, g, step and logits from the same check in the environment running the bench
* `commands`      the commands that built and checked it, as run

* `agent`         the venv's ``deftly-agent`` started on 127.0.0.1: its hello over the WebSocket and
                  its zeroconf advert, as the desktop's client and browser see them (`agent_answers`)

Every ``*_mb`` key holds MiB (bytes / 2**20); the names stay as they are, since committed results use them.

`install_mb` is, per machine, the smallest variant in which a program ran, else the smallest built
(`install_figure`: its MiB, its name, whether a program ran, whether its agent said hello and was
seen advertising, torch's version,
whether emulated, the date). `deftly bench agent` reports the same under the same key in agent.json,
read from this file (`recorded_install_mb`), and this bench refreshes that key when agent.json is there.

The host is measured unless `--no-host`. `--root DIR` adds a Debian root of another architecture,
run with ``chroot`` through the kernel's binfmt_misc and qemu-user (README, "Run an
agent on a Raspberry Pi / phone / laptop", says how to make one); its pip reaches
PyPI itself, so it installs what a Raspberry Pi would. cpuinfo cannot read an emulated
CPU from the host's /sys, so the root gets a stand-in (`Platform._cpu_sysfs`); step
times under emulation mean nothing.
Platforms not measured in a run keep their last entry, with its date.
"""
from __future__ import annotations

import argparse
import asyncio
import csv
import datetime as dt
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

from desktop.engine.local import read_banner
from shared.errors import InputError

REPO = Path(__file__).resolve().parents[2]
REQUIREMENTS = REPO / "requirements-agent.txt"
SELFCHECK = "device_agent.selfcheck"
TARGET = "aarch64 <= 1000 MB"  # 10**9 bytes: 953.7 MiB, the unit of the *_mb keys
TARGET_MIB = 1000 * 10**6 / 2**20


# -- the requirements file -------------------------------------------------------------


@dataclass(frozen=True)
class Pin:
    """One line of requirements-agent.txt: ``name==version``."""

    name: str  # as written, e.g. "typing-extensions"
    version: str

    @property
    def key(self) -> str:
        """The name as pip compares it (PEP 503: lower case, runs of -_. as -)."""
        return canonical(self.name)


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


_PIN = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)==(?P<version>[^\s;#]+)\s*(?:#.*)?$")


def read_pins(path: Path = REQUIREMENTS) -> dict[str, Pin]:
    """The pins of a requirements file written as requirements-agent.txt is, by canonical name.

    Raises:
        InputError: a line that is not ``name==version`` (a comment may follow), or a name pinned twice.
    """
    pins: dict[str, Pin] = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = _PIN.match(line)
        if match is None:
            raise InputError(f"{path}:{number}: {line!r} is not name==version")
        pin = Pin(match["name"], match["version"])
        if pin.key in pins:
            raise InputError(f"{path}:{number}: {pin.name} is pinned twice")
        pins[pin.key] = pin
    return pins


# -- where a venv is built ----------------------------------------------------------------


@dataclass
class Platform:
    """A Python to build venvs with: this machine's, or one inside a Debian root run through chroot.

    Paths given to `run` are the platform's own (inside the root); `host_path` maps them here.
    """

    python: str
    root: Path | None = None
    mounts: list[Path] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)  # set inside the root

    def run(self, argv: list[str], cwd: str = "/", timeout: float = 3600) -> subprocess.CompletedProcess:
        """Run ``argv`` on the platform in its directory ``cwd``, never with this process's PYTHONPATH.

        PYTHONPATH would put a working tree's packages before the venv's own install.
        """
        command, options = self._command(argv, cwd)
        return subprocess.run(command, **options, capture_output=True, text=True, timeout=timeout)

    def start(self, argv: list[str], stderr: Path, cwd: str = "/") -> subprocess.Popen:
        """Start ``argv`` as `run` would, without waiting: its stdout a text pipe, its stderr into ``stderr``
        (a path here). Inside a root the process is the same one (``exec``), so signals reach it."""
        command, options = self._command(argv, cwd)
        with open(stderr, "wb") as err:
            return subprocess.Popen(command, **options, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=err, text=True)

    def _command(self, argv: list[str], cwd: str) -> tuple[list[str], dict]:
        if self.root is None:
            env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
            return argv, {"cwd": cwd, "env": env}
        # A clean environment: the host's pip settings (its local wheel folders) are not the device's.
        return ["chroot", str(self.root), "/usr/bin/env", "-i", "PATH=/usr/local/bin:/usr/bin:/bin", "HOME=/root",
                "LANG=C.UTF-8", *(f"{k}={v}" for k, v in self.env.items()), "/bin/sh", "-c",
                'cd "$1" && shift && exec "$@"', "sh", cwd, *argv], {}

    def host_path(self, path: str) -> Path:
        return Path(path) if self.root is None else self.root / path.lstrip("/")

    def scratch(self) -> str:
        """A directory of the platform's for the bench's venvs and files."""
        if self.root is None:
            return str(Path.home() / ".cache" / "deftly" / "bench-install" / "host")
        return "/var/tmp/deftly-bench-install"

    def __enter__(self) -> Platform:
        if self.root is not None:
            if not (self.root / "usr/bin/env").exists():
                raise InputError(f"--root {self.root}: not a Debian root (no usr/bin/env); see the README")
            shutil.copyfile("/etc/resolv.conf", self.root / "etc/resolv.conf")  # pip resolves PyPI's name
            cert = os.environ.get("PIP_CERT")
            if cert and Path(cert).is_file():  # the CA bundle this host's pip trusts (a proxy's), inside too
                inside = f"{self.scratch()}/pip-cert.pem"
                self.host_path(inside).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(cert, self.host_path(inside))
                self.env["PIP_CERT"] = inside
            for source, target, how in (("proc", "proc", ["-t", "proc"]), ("/dev", "dev", ["--bind"]),
                                        (str(self._cpu_sysfs()), "sys", ["--bind", "-o", "ro"])):
                mountpoint = self.root / target
                mountpoint.mkdir(exist_ok=True)
                subprocess.run(["mount", *how, source, str(mountpoint)], check=True)
                self.mounts.append(mountpoint)
        return self

    def _cpu_sysfs(self) -> Path:
        """A stand-in /sys holding only devices/system/cpu/{possible,present,online} and a cpuN per core.

        cpuinfo (XNNPACK's, and ExecuTorch's threadpool's) reads those lists. Without them, under
        qemu-user, XNNPACK does not start and the threadpool's failed start crashes the portable
        kernels (a segfault in the first step); with the host's own /sys bound, the CPU probe of
        torch's oneDNN crashes instead (both seen here). With this stand-in both programs run.
        """
        cpu = self.host_path(self.scratch()) / "cpu-sysfs" / "devices" / "system" / "cpu"
        cores = os.cpu_count() or 1
        for index in range(cores):
            (cpu / f"cpu{index}").mkdir(parents=True, exist_ok=True)
        for name in ("possible", "present", "online"):
            (cpu / name).write_text(f"0-{cores - 1}\n" if cores > 1 else "0\n")
        return cpu.parents[2]

    def __exit__(self, *exc) -> None:
        while self.mounts:
            subprocess.run(["umount", str(self.mounts.pop())], check=False)


def _checked(platform_: Platform, argv: list[str], commands: list[str], cwd: str = "/") -> subprocess.CompletedProcess:
    commands.append(shlex.join(argv))
    result = platform_.run(argv, cwd=cwd)
    if result.returncode != 0:
        raise RuntimeError(f"{shlex.join(argv)} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return result


def project_wheel(out: Path) -> Path:
    """Build the project's wheel (pure Python: one for every platform) into ``out``, from a copy of the tree.

    A copy, so that the build's ``build/`` and ``*.egg-info`` stay out of the working tree.
    """
    source = out / "source"
    shutil.rmtree(source, ignore_errors=True)
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                           text=True, check=True).stdout.split()
    for name in files:
        if (REPO / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, source / name)
    for old in out.glob("deftly-*.whl"):
        old.unlink()
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(source)],
                   check=True, capture_output=True, text=True)
    (wheel,) = out.glob("deftly-*.whl")
    return wheel


# How a venv is built: "documented" is the README's way; the others are for comparison.
VARIANTS = {
    "documented": "torch alone with --no-deps (from --torch-index if given), then requirements-agent.txt "
                  "and the project with --no-deps",
    "torch_with_deps": "as documented, but torch with its declared dependencies (on Linux, PyPI's CUDA "
                       "build and its NVIDIA packages): what installs where PyTorch's CPU index cannot be reached",
    "extra_with_deps": 'pip install "deftly[agent]": every declared dependency resolved',
}


def build_agent_venv(platform_: Platform, venv: str, wheel: str, requirements: str, variant: str = "documented",
                     torch_index: str | None = None) -> dict:
    """A fresh venv with the agent installed one of the `VARIANTS` ways.

    Args:
        platform_: where to build it.
        venv: the venv's path on the platform (removed first).
        wheel: the project's wheel, on the platform.
        requirements: requirements-agent.txt, on the platform.
        variant: a key of `VARIANTS`.
        torch_index: the index torch alone is taken from (PyTorch's CPU index); None: pip's default.

    Returns:
        ``commands`` run, ``install_s``, and pip's ``--report``s merged as ``sources``
        (distribution -> the file or URL it was installed from).
    """
    shutil.rmtree(platform_.host_path(venv), ignore_errors=True)
    commands: list[str] = []
    _checked(platform_, [platform_.python, "-m", "venv", venv], commands)
    pip = f"{venv}/bin/pip"
    torch = f"torch=={read_pins()['torch'].version}"
    index = ["--index-url", torch_index] if torch_index else []
    if variant == "extra_with_deps":
        steps = [["install", f"{wheel}[agent]"]]
    elif variant in ("documented", "torch_with_deps"):
        steps = [["install", *(["--no-deps"] if variant == "documented" else []), *index, torch],
                 ["install", "--no-deps", "-r", requirements, wheel]]
    else:
        raise InputError(f"install variant {variant!r}: expected one of {', '.join(VARIANTS)}")
    start = time.perf_counter()
    sources: dict[str, str] = {}
    for number, step in enumerate(steps):
        report = f"{venv}.pip-report-{number}.json"
        _checked(platform_, [pip, *step, "--report", report], commands)
        sources |= wheel_sources(json.loads(platform_.host_path(report).read_text()))
        platform_.host_path(report).unlink()
    return {"commands": commands, "install_s": round(time.perf_counter() - start, 1), "sources": sources}


def selfcheck(platform_: Platform, python: str, program: str | None) -> dict:
    """Run ``python -m device_agent.selfcheck [program]`` from ``/`` (never the working tree's copy).

    Returns:
        The check's JSON report plus ``returncode`` and ``stderr`` (its last lines).
    """
    argv = [python, "-m", SELFCHECK] + ([program] if program else [])
    result = platform_.run(argv, cwd="/", timeout=1800)
    report = _report(result.stdout)
    # Keep the failure, without the runtime's cpuinfo chatter.
    tail = [line for line in result.stderr.splitlines() if not line.startswith("[cpuinfo")][-12:]
    return {**report, "returncode": result.returncode, "stderr": "\n".join(tail)}


def _report(stdout: str) -> dict:
    """The selfcheck's JSON line (the last line that is an object); {} when it printed none."""
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    return json.loads(lines[-1]) if lines else {}


AGENT_START_TIMEOUT_S = 600.0  # to its banner's last line: under qemu-user, importing websockets and zeroconf is slow
ADVERT_TIMEOUT_S = 60.0  # from the hello to its advert seen by a browser on 127.0.0.1
_BANNER_ID = re.compile(r"^deftly-agent .* \(id (?P<id>[^)]+)\)")
_BANNER_PORT = re.compile(r"^listening on ws://127\.0\.0\.1:(?P<port>\d+)/")


def agent_answers(platform_: Platform, python: str, state_dir: str, advertise: bool = True,
                  start_timeout_s: float = AGENT_START_TIMEOUT_S, advert_timeout_s: float = ADVERT_TIMEOUT_S) -> dict:
    """Start the venv's ``deftly-agent`` (``python -m device_agent.cli``) on 127.0.0.1, say hello to it over its
    WebSocket with the desktop's client, and browse for its advert on 127.0.0.1; then stop it.

    An idle agent imports no torch, so this says whether an install can be found and paired even where
    no program runs in it. An agent that said no hello (under qemu-user, zeroconf's socket set-up fails
    and the agent exits) is started once more with ``--no-advertise``: ``without_advert`` says whether
    it is reachable by address.

    Args:
        advertise: start it with ``--advertise`` (else ``--no-advertise``, and no advert is looked for).

    Returns:
        ``started`` and ``start_s`` (to its banner's last line); ``hello`` (what its Welcome says of it) and
        ``advertised`` (its advert's TXT as the desktop read it), each None when it did not come, with
        ``error`` saying why, and ``exited`` (its status and stderr) if it was no longer running;
        ``answered``: both came (with ``advertise``; else the hello).
    """
    outcome = _agent_session(platform_, python, state_dir, advertise, start_timeout_s, advert_timeout_s)
    if advertise and outcome["hello"] is None and outcome["started"]:
        outcome["without_advert"] = agent_answers(platform_, python, state_dir, False, start_timeout_s)
    outcome["answered"] = outcome["hello"] is not None and (outcome["advertised"] is not None or not advertise)
    return outcome


def _agent_session(platform_: Platform, python: str, state_dir: str, advertise: bool, start_timeout_s: float,
                   advert_timeout_s: float) -> dict:
    shutil.rmtree(platform_.host_path(state_dir), ignore_errors=True)
    platform_.host_path(state_dir).mkdir(parents=True)
    stderr = platform_.host_path(state_dir).with_suffix(".stderr")
    argv = [python, "-m", "device_agent.cli", "--name", "bench-install", "--host", "127.0.0.1", "--port", "0",
            "--state-dir", state_dir, "--advertise" if advertise else "--no-advertise"]
    start = time.perf_counter()
    process = platform_.start(argv, stderr)
    outcome: dict = {"started": False, "hello": None, "advertised": None}
    try:
        banner, _ = read_banner(process, start_timeout_s)
        ids = [m["id"] for m in map(_BANNER_ID.match, banner) if m]
        ports = [int(m["port"]) for m in map(_BANNER_PORT.match, banner) if m]
        tokens = [line.split(": ", 1)[1] for line in banner if line.startswith("pairing token: ")]
        if not (ids and ports and tokens and banner[-1].startswith("advertising" if advertise else "not advertising")):
            outcome["error"] = f"no banner in {start_timeout_s:.0f} s: {banner}"
            try:  # its stdout ended: it is exiting (else it hangs, and is stopped below)
                process.wait(10)
            except subprocess.TimeoutExpired:
                pass
        else:
            outcome |= {"started": True, "start_s": round(time.perf_counter() - start, 1)}
            outcome |= asyncio.run(_greet(ids[0], ports[0], tokens[0], advert_timeout_s if advertise else None))
        if process.poll() is not None:  # it should still be serving: say how it ended
            tail = [line for line in stderr.read_text(errors="replace").splitlines() if "INFO" not in line][-5:]
            outcome["exited"] = {"returncode": process.returncode, "stderr": tail}
    finally:
        process.terminate()
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        process.stdout.close()
        shutil.rmtree(platform_.host_path(state_dir), ignore_errors=True)
        stderr.unlink(missing_ok=True)
    return outcome


async def _greet(agent_id: str, port: int, token: str, advert_timeout_s: float | None) -> dict:
    """Hello over the WebSocket, then the agent's advert from a browser on 127.0.0.1 (matched by its id;
    not looked for when ``advert_timeout_s`` is None)."""
    from desktop.engine.client import AgentClient, AgentError
    from desktop.engine.discovery import Browser

    seen: asyncio.Future = asyncio.get_running_loop().create_future()

    def on_seen(advert) -> None:
        if advert.id == agent_id and not seen.done():
            seen.set_result(advert)

    found: dict = {}
    browser = Browser(on_seen, lambda _advert: None, interfaces=["127.0.0.1"])
    client = AgentClient(f"127.0.0.1:{port}", token, "bench-install", reconnect=False)
    try:
        await browser.start()
        try:
            welcome = await client.connect()
            found["hello"] = {"id": welcome.agent.id, "arch": welcome.agent.arch, "runtime": welcome.agent.runtime,
                              "protocol": welcome.agent.protocol, "version": welcome.agent.version}
        except AgentError as exc:
            found["error"] = f"hello: {exc}"
        if advert_timeout_s is None:
            return found
        try:
            advert = await asyncio.wait_for(seen, advert_timeout_s)
            found["advertised"] = {"arch": advert.arch, "runtime": advert.runtime, "protocol": advert.protocol,
                                   "address": advert.address}
        except TimeoutError:
            found["error"] = f"{found.get('error', '')}; no advert in {advert_timeout_s:.0f} s".lstrip("; ")
    finally:
        await client.close()
        await browser.close()
    return found


def disk_bytes(path: Path) -> int:
    """Disk use of a directory tree in bytes, as ``du -s`` counts it: allocated blocks, each inode once."""
    seen, total = set(), 0
    for folder, dirs, names in os.walk(path):
        for name in [".", *names]:
            stat = os.lstat(os.path.join(folder, name))
            if (stat.st_dev, stat.st_ino) not in seen:
                seen.add((stat.st_dev, stat.st_ino))
                total += stat.st_blocks * 512
    return total


def venv_mb(path: Path) -> float:
    """``disk_bytes`` in MiB, to one decimal."""
    return round(disk_bytes(path) / 2**20, 1)


def package_sizes(venv: Path) -> tuple[dict[str, float], dict[str, str]]:
    """MiB of each installed distribution's files (its RECORD, sizes read from disk) and its version."""
    sizes, versions = {}, {}
    for record in sorted(venv.glob("lib/python3*/site-packages/*.dist-info/RECORD")):
        site = record.parent.parent
        with open(record, newline="") as f:
            total = sum((site / row[0]).stat().st_size for row in csv.reader(f)
                        if row and (site / row[0]).is_file())
        name, version = _dist_info_name(record.parent)
        sizes[name], versions[name] = round(total / 2**20, 1), version
    return dict(sorted(sizes.items(), key=lambda item: -item[1])), versions


def _dist_info_name(dist_info: Path) -> tuple[str, str]:
    fields = {}
    for line in (dist_info / "METADATA").read_text(errors="replace").splitlines():
        if not line.strip():
            break
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return fields["Name"], fields["Version"]


def wheel_sources(report: dict) -> dict[str, str]:
    """Distribution name -> the file or URL pip installed it from."""
    return {item["metadata"]["name"]: item["download_info"]["url"] for item in report["install"]}


OUTPUTS = ("loss", "b_step_norm", "g", "logits")  # what a selfcheck run computes (step: the first three)


def output_difference(run: dict, reference: dict) -> float:
    """Largest absolute difference over the outputs of the reference's selfcheck run (loss, g, the
    step's size, the logits: those of the methods its program has); inf when ``run`` lacks one."""
    import numpy as np

    keys = [key for key in OUTPUTS if key in reference]
    if any(key not in run for key in keys):
        return float("inf")
    return max(float(np.max(np.abs(np.asarray(run[k], np.float64) - np.asarray(reference[k], np.float64))))
               for k in keys)


# -- the benchmark ------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--root", type=Path, action="append", default=[],
                        help="a Debian root of another architecture to measure too, through chroot + qemu-user "
                             "(repeatable; README says how to make one)")
    parser.add_argument("--no-host", action="store_true",
                        help="measure only the --root platforms (the host's last entry is kept)")
    parser.add_argument("--python", default=None,
                        help="the host's Python to build the venvs with (default: the one running deftly)")
    parser.add_argument("--torch-index", default=None,
                        help="the index torch alone comes from, e.g. https://download.pytorch.org/whl/cpu "
                             "(default: pip's own, which on these build machines holds the CPU wheel)")
    parser.add_argument("--variants", default="documented",
                        help=f"comma-separated install variants to build on each platform: {', '.join(VARIANTS)} "
                             "(default: documented)")
    parser.add_argument("--work-dir", type=Path, default=Path.home() / ".cache" / "deftly" / "bench-install",
                        help="where the programs and the project's wheel are built")


def _programs(work: Path) -> dict[str, Path]:
    """The tiny test program twice, XNNPACK-delegated and on portable kernels only: each one's manifest
    (its method files and weights lie beside it)."""
    from export.models import load_tokenizer, tiny_llama
    from export.program import ExportConfig, export_program

    loaded = tiny_llama(num_layers=2, hidden_size=64, tokenizer=load_tokenizer(progress=lambda _m: None))
    config = ExportConfig(model="tiny", layers="1-1", seq_len=32, methods=("step", "eval"), length_buckets=(16,))
    programs = {}
    for delegate in ("xnnpack", "portable"):
        result = export_program(replace(config, delegate=delegate), work / "programs" / delegate / "step.pte",
                                loaded=loaded, workers=1)
        programs[delegate] = result.manifest_path
    return programs


def measure_variant(platform_: Platform, scratch: str, wheel: str, variant: str, programs: dict[str, str],
                    references: dict[str, dict], torch_index: str | None) -> dict:
    """Build one variant's venv on the platform, check it, measure it, and remove it."""
    venv = f"{scratch}/venv-{variant}"
    built = build_agent_venv(platform_, venv, f"{scratch}/{wheel}", f"{scratch}/{REQUIREMENTS.name}",
                             variant, torch_index)
    idle = selfcheck(platform_, f"{venv}/bin/python", None)
    sizes, versions = package_sizes(platform_.host_path(venv))
    entry = {
        "how": VARIANTS[variant],
        "venv_mb": venv_mb(platform_.host_path(venv)),
        "packages_mb": sizes, "packages": versions, "sources": built["sources"],
        "install_s": built["install_s"],
        "imports": idle.get("modules") or {"device_agent.program": idle["stderr"] or "no report"},
        "rss_mb_after_import_program": idle.get("rss_mb_after_import_program"),
        "import_program_s": idle.get("import_program_s"),
        "commands": built["commands"] + [shlex.join([f"{venv}/bin/python", "-m", SELFCHECK, "[PROGRAM.pte]"])],
        "programs": {},
    }
    for name, path in programs.items():
        check = selfcheck(platform_, f"{venv}/bin/python", path)
        run = check.get("run", {})
        outcome = {"ran": check["returncode"] == 0 and "loss" in run, "returncode": check["returncode"]}
        if outcome["ran"]:
            outcome |= {"loss": run["loss"], "step_s": run["step_s"], "rss_mb": run["rss_mb"],
                        "max_abs_difference_from_reference": output_difference(run, references[name])}
        else:
            outcome["error"] = run.get("error") or check["stderr"] or "no report"
        entry["programs"][name] = outcome
    entry["program_ran"] = any(outcome["ran"] for outcome in entry["programs"].values())
    entry["agent"] = agent_answers(platform_, f"{venv}/bin/python", f"{scratch}/agent-state-{variant}")
    shutil.rmtree(platform_.host_path(venv), ignore_errors=True)
    return entry


def measure_platform(platform_: Platform, wheel: Path, programs: dict[str, Path], references: dict[str, dict],
                     variants: list[str], torch_index: str | None, done: Callable[[dict], None]) -> dict:
    """Stage the wheel, the requirements and the programs on the platform, then measure each variant.

    ``done(entry)`` is called after each variant, so a long run that is stopped keeps what it measured.
    """
    scratch = platform_.scratch()
    staged = platform_.host_path(scratch)
    staged.mkdir(parents=True, exist_ok=True)
    for old in staged.glob("deftly-*.whl"):
        old.unlink()
    shutil.copy2(wheel, staged / wheel.name)
    shutil.copy2(REQUIREMENTS, staged / REQUIREMENTS.name)
    paths = {}
    for name, manifest in programs.items():
        target = staged / "programs" / name
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(manifest.parent, target)
        paths[name] = f"{scratch}/programs/{name}/{manifest.name}"
    about = platform_.run([platform_.python, "-c", "import platform; print(platform.machine(), "
                                                   "platform.python_version())"])
    machine, python = about.stdout.split()
    entry = {"date": dt.date.today().isoformat(), "machine": machine, "python": python,
             "emulated": machine != platform.machine(), "torch_index": torch_index, "variants": {}}
    if entry["emulated"]:
        qemu = subprocess.run(["sh", "-c", f"qemu-{machine}-static --version | head -1"], capture_output=True,
                              text=True)
        entry["emulator"] = qemu.stdout.strip() or "qemu-user through binfmt_misc"
    for variant in variants:
        entry["variants"][variant] = measure_variant(platform_, scratch, wheel.name, variant, paths, references,
                                                     torch_index)
        done(entry)
    return entry


def install_figure(entry: dict) -> dict | None:
    """A platform's install figure: its smallest variant in which a program ran or, where none ran, its
    smallest variant built (``program_ran`` false says so); None when it has no variant.

    Returns:
        ``mb``, ``variant``, ``program_ran``, ``agent_hello`` (its agent said hello, advertising or, that
        failing, by address) and ``agent_advertised`` (it was seen advertising; both None for an entry
        measured before that check), ``torch`` (the version installed), ``emulated`` and ``date``.
    """
    variants = entry["variants"]
    if not variants:
        return None
    ran = [(v["venv_mb"], name) for name, v in variants.items() if v["program_ran"]]
    mb, name = min(ran or [(v["venv_mb"], name) for name, v in variants.items()])
    variant = variants[name]
    agent = variant.get("agent")
    hello = None if agent is None else agent["hello"] is not None or \
        (agent.get("without_advert") or {}).get("hello") is not None
    return {"mb": mb, "variant": name, "program_ran": variant["program_ran"], "agent_hello": hello,
            "agent_advertised": None if agent is None else agent["advertised"] is not None,
            "torch": variant.get("packages", {}).get("torch"), "emulated": entry["emulated"], "date": entry["date"]}


def recorded_install_mb(out_dir: Path) -> dict | str:
    """install.json's ``install_mb`` (per platform) in ``out_dir``: what ``deftly bench agent`` reports under
    that key; a sentence when no ``deftly bench install`` result is there."""
    path = Path(out_dir) / "install.json"
    if not path.exists():
        return f"not measured: no {path.name} in {out_dir} (run deftly bench install)"
    try:
        return json.loads(path.read_text())["install_mb"]
    except (json.JSONDecodeError, KeyError) as exc:
        raise InputError(f"{path}: not a deftly bench install result ({type(exc).__name__}: {exc})") from None


def run(args: argparse.Namespace) -> dict:
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        raise InputError(f"--variants {args.variants!r}: choose from {', '.join(VARIANTS)}")
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    programs = _programs(work)
    # The reference: the same check in the environment running this bench (the desktop's).
    references = {}
    for name, manifest in programs.items():
        result = subprocess.run([sys.executable, "-m", SELFCHECK, str(manifest)], capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"the {name} program does not run in this environment:\n{result.stderr[-3000:]}")
        references[name] = _report(result.stdout)["run"]
    wheel = project_wheel(work / "wheel")

    out = Path(args.out_dir) / "install.json"
    platforms = json.loads(out.read_text()).get("platforms", {}) if out.exists() else {}

    def write(entry: dict) -> None:
        platforms[entry["machine"]] = entry
        write_results(platforms, out)

    host_python = args.python or getattr(sys, "_base_executable", sys.executable)
    roots = ([] if args.no_host else [None]) + list(args.root)
    if not roots:
        raise InputError("--no-host without --root: nothing to measure")
    for root in roots:
        with Platform(host_python if root is None else "/usr/bin/python3", root) as platform_:
            measure_platform(platform_, wheel, programs, references, variants, args.torch_index, write)
    results = json.loads(out.read_text())
    return {"install_mb": results["install_mb"],
            "ran": {machine: {variant: {name: p["ran"] for name, p in v["programs"].items()}
                              for variant, v in entry["variants"].items()} for machine, entry in platforms.items()}}


def write_results(platforms: dict[str, dict], out: Path) -> None:
    """install.json (and its PNG) from every platform's entry."""
    results = {
        "benchmark": "install",
        "requirements": REQUIREMENTS.name,
        "install_mb": {machine: install_figure(entry) for machine, entry in sorted(platforms.items())},
        "target": TARGET,
        "platforms": dict(sorted(platforms.items())),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    draw(results, out.with_suffix(".png"))
    # agent.json beside it reports the same figures under the same key (issue 20's list of agent keys):
    # refreshed here from this file, as `deftly bench agent` reads them from it, never typed in.
    agent = out.parent / "agent.json"
    if agent.exists():
        agent_results = json.loads(agent.read_text())
        agent_results["install_mb"] = recorded_install_mb(out.parent)
        agent.write_text(json.dumps(agent_results, indent=2) + "\n")


def draw(results: dict, path: Path) -> None:
    """One stacked bar per platform and variant: the venv's MiB by distribution (grey: the rest)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars = [(f"{machine}{' (emulated)' if entry['emulated'] else ''}\n{variant}\n"
             f"torch {v.get('packages', {}).get('torch', '?')}\n{'ran' if v['program_ran'] else 'no program ran'}",
             v["venv_mb"], v["packages_mb"]) for machine, entry in results["platforms"].items()
            for variant, v in entry["variants"].items()]
    big = sorted({name for _, _, sizes in bars for name, mb in sizes.items() if mb >= 40})
    color = {name: f"C{i % 10}" for i, name in enumerate(big)}
    fig, ax = plt.subplots(figsize=(2.5 + 1.9 * len(bars), 5))
    for x, (label, total, sizes) in enumerate(bars):
        bottom = 0.0
        for name, mb in sizes.items():
            if name not in color or mb < 40:
                continue
            ax.bar(x, mb, bottom=bottom, color=color[name], edgecolor="white")
            if mb >= 60:  # a label fits
                ax.text(x, bottom + mb / 2, f"{name} {mb:.0f}", ha="center", va="center", fontsize=7)
            bottom += mb
        ax.bar(x, max(total - bottom, 0), bottom=bottom, color="lightgrey", edgecolor="white")
        ax.text(x, total, f"{total:.0f} MiB", ha="center", va="bottom", fontsize=8)
    ax.axhline(TARGET_MIB, color="red", linestyle="--", linewidth=1)
    ax.text(len(bars) - 0.5, TARGET_MIB, "aarch64 target, 1000 MB (953.7 MiB)", color="red", fontsize=7, ha="right", va="bottom")
    ax.set_xticks(range(len(bars)), [label for label, _, _ in bars], fontsize=7)
    ax.set_ylabel("MiB on disk")
    ax.set_title("The device agent's venv (grey: pip, setuptools, bytecode, packages under 40 MiB; "
                 "unlabelled: under 60 MiB)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
