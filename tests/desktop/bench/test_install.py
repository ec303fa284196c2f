"""The agent's documented install: requirements-agent.txt against the `agent` extra, the bench's measures,
and (slow) a fresh venv built exactly as the README says, running a real program."""
from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
from packaging.requirements import Requirement

from desktop.bench.install import (
    REPO,
    REQUIREMENTS,
    Platform,
    agent_answers,
    build_agent_venv,
    canonical,
    disk_bytes,
    output_difference,
    package_sizes,
    project_wheel,
    read_pins,
    recorded_install_mb,
    selfcheck,
    venv_mb,
    write_results,
)
from shared.errors import InputError


def _agent_extra() -> list[Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return [Requirement(line) for line in project["optional-dependencies"]["agent"]]


def test_the_file_pins_every_distribution_of_the_agent_extra_at_a_version_it_admits() -> None:
    pins = read_pins()
    for requirement in _agent_extra():
        key = canonical(requirement.name)
        assert key in pins, f"{REQUIREMENTS.name} has no pin for {requirement.name} (the agent extra has it)"
        assert requirement.specifier.contains(pins[key].version, prereleases=True), \
            f"{REQUIREMENTS.name} pins {key}=={pins[key].version}; the agent extra asks {requirement}"


@pytest.mark.parametrize("machine", ["x86_64", "aarch64"])
def test_every_other_pin_is_a_declared_dependency_of_a_pinned_distribution(machine: str) -> None:
    # Nothing in the file beyond the extra but what its distributions need (ifaddr for zeroconf,
    # typing-extensions for torch), read from their metadata in this environment.
    pins = read_pins()
    extra = {canonical(r.name) for r in _agent_extra()}
    needed = set()
    for name in extra:
        for line in metadata.requires(name) or []:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate(
                    {"extra": "", "platform_machine": machine, "platform_system": "Linux", "sys_platform": "linux"}):
                needed.add(canonical(requirement.name))
    assert set(pins) - extra <= needed, f"pinned, but neither in the extra nor needed by it: {set(pins) - extra - needed}"


def test_a_line_it_cannot_read_is_refused_with_its_number(tmp_path) -> None:
    path = tmp_path / "requirements.txt"
    path.write_text("# comment\nnumpy==2.4.6  # why\ntorch>=2.10\n")
    with pytest.raises(InputError, match=r"requirements.txt:3: 'torch>=2.10' is not name==version"):
        read_pins(path)
    path.write_text("numpy==2.4.6\nNumPy==2.4.5\n")
    with pytest.raises(InputError, match=r"requirements.txt:2: NumPy is pinned twice"):
        read_pins(path)
    path.write_text("\n# only\nTyping_Extensions==4.16.0\n")
    assert list(read_pins(path)) == ["typing-extensions"] and read_pins(path)["typing-extensions"].version == "4.16.0"


def test_disk_bytes_counts_what_du_counts(tmp_path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "big").write_bytes(b"x" * 3_000_000)
    (tmp_path / "small").write_bytes(b"y" * 10)
    (tmp_path / "a" / "link").hardlink_to(tmp_path / "a" / "big")  # du counts an inode once
    du_kib = int(subprocess.run(["du", "-sk", str(tmp_path)], capture_output=True, text=True).stdout.split()[0])
    assert disk_bytes(tmp_path) == du_kib * 1024
    assert venv_mb(tmp_path) == round(du_kib / 1024, 1)


def test_package_sizes_sum_each_distributions_recorded_files(tmp_path) -> None:
    site = tmp_path / "lib" / "python3.11" / "site-packages"
    (site / "pkg").mkdir(parents=True)
    (site / "pkg" / "mod.so").write_bytes(b"z" * (3 * 2**20))
    info = site / "pkg-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: Pkg\nVersion: 1.0\n\nlong description: x\n")
    (info / "RECORD").write_text("pkg/mod.so,sha256=abc,3145728\npkg-1.0.dist-info/METADATA,,\n"
                                 "pkg-1.0.dist-info/RECORD,,\npkg/gone.py,,\n")
    sizes, versions = package_sizes(tmp_path)
    assert sizes == {"Pkg": 3.0} and versions == {"Pkg": "1.0"}


def test_output_difference_is_the_largest_over_every_output() -> None:
    run = {"loss": 0.5, "b_step_norm": 1.0, "g": [0.1, 0.2], "logits": [[1.0, 2.0]]}
    other = {"loss": 0.5, "b_step_norm": 1.0, "g": [0.1, 0.25], "logits": [[1.0, 2.001]]}
    assert output_difference(run, other) == pytest.approx(0.05)
    assert output_difference(run, run) == 0
    step_only = {"loss": 0.5, "b_step_norm": 1.0, "g": [0.1, 0.2]}  # a block program: no eval method
    assert output_difference(step_only, step_only) == 0
    assert output_difference(step_only, run) == float("inf")  # an output the reference has is missing


@pytest.mark.slow
def test_a_venv_built_the_documented_way_runs_a_program(tiny_program, tmp_path) -> None:
    """README's commands on this machine: a fresh venv, torch alone with --no-deps (from $TORCH_INDEX if
    set, as the Makefile's), `pip install --no-deps -r requirements-agent.txt` and the project with
    --no-deps (pip's cache reused); then the program runs in it, from outside the working tree."""
    from device_agent.selfcheck import run_program

    host = Platform(getattr(sys, "_base_executable", sys.executable))
    wheel = project_wheel(tmp_path / "wheel")
    venv = tmp_path / "venv"
    built = build_agent_venv(host, str(venv), str(wheel), str(REQUIREMENTS), "documented",
                             os.environ.get("TORCH_INDEX") or None)

    # Exactly the file's distributions (and the project, pip, setuptools): none of executorch's declared ones.
    installed = {canonical(name) for name in package_sizes(venv)[1]}
    expected = set(read_pins())
    assert installed - {"deftly", "pip", "setuptools"} == expected, built["commands"]

    program = tmp_path / "program"
    shutil.copytree(tiny_program.pte.parent, program)
    check = selfcheck(host, str(venv / "bin" / "python"), str(program / tiny_program.pte.name))
    failed = {name: outcome for name, outcome in check.get("modules", {}).items() if outcome != "ok"}
    assert check["returncode"] == 0 and not failed, (
        f"the documented install ({REQUIREMENTS.name} with --no-deps) lacks what the agent needs: "
        f"{failed or check.get('run', {}).get('error')}\n{check['stderr']}\n(add the distribution to "
        f"{REQUIREMENTS.name}, and to the agent extra if device_agent imports it)")
    assert Path(check["run"]["program"]).is_relative_to(program)
    assert check["versions"]["torch"].split("+")[0] == read_pins()["torch"].version

    reference = run_program(tiny_program.pte)  # the same check in the development environment
    assert output_difference(check["run"], reference) < 1e-5
    assert np.isfinite(check["run"]["loss"]) and check["run"]["b_step_norm"] > 0


_HELLO = {"arch": "aarch64", "protocol": 1}


def _variant(mb: float, ran: bool, agent: str | None = None) -> dict:
    """A measured variant; ``agent``: "advertised", "by address" (hello only with --no-advertise), "silent"."""
    variant = {"venv_mb": mb, "packages_mb": {"torch": mb * 0.7, "numpy": 60.0}, "packages": {"torch": "2.13.0"},
               "program_ran": ran, "programs": {"portable": {"ran": ran}}}
    if agent == "advertised":
        variant["agent"] = {"hello": _HELLO, "advertised": {"arch": "aarch64"}, "answered": True}
    elif agent is not None:
        again = {"hello": _HELLO if agent == "by address" else None, "advertised": None}
        variant["agent"] = {"hello": None, "advertised": None, "answered": False, "without_advert": again}
    return variant


def test_install_mb_is_the_lightest_variant_that_ran_a_program_else_the_lightest_built(tmp_path) -> None:
    platforms = {
        "aarch64": {"date": "2026-12-01", "emulated": True,
                    "variants": {"documented": _variant(1100.0, False, "by address"),
                                 "torch_with_deps": _variant(4800.0, True, "by address")}},
        "x86_64": {"date": "2026-12-02", "emulated": False,
                   "variants": {"documented": _variant(999.0, True), "extra_with_deps": _variant(1530.0, True)}},
        "riscv64": {"date": "2026-12-01", "emulated": True,
                    "variants": {"documented": _variant(900.0, False, "silent"), "other": _variant(950.0, False)}},
        "armv7l": {"date": "2026-12-01", "emulated": True, "variants": {}},
    }
    out = tmp_path / "install.json"
    write_results(platforms, out)
    results = json.loads(out.read_text())
    common = {"torch": "2.13.0", "date": "2026-12-01", "emulated": True}
    assert results["install_mb"] == {
        "aarch64": {"mb": 4800.0, "variant": "torch_with_deps", "program_ran": True, "agent_hello": True,
                    "agent_advertised": False} | common,
        "armv7l": None,
        "riscv64": {"mb": 900.0, "variant": "documented", "program_ran": False, "agent_hello": False,
                    "agent_advertised": False} | common,
        "x86_64": {"mb": 999.0, "variant": "documented", "program_ran": True, "agent_hello": None,
                   "agent_advertised": None, "torch": "2.13.0", "emulated": False, "date": "2026-12-02"},
    }
    assert results["platforms"] == platforms and out.with_suffix(".png").stat().st_size > 0
    assert not (tmp_path / "agent.json").exists()  # no agent results to add the figures to


def test_the_agent_results_beside_get_the_same_install_figures_and_keep_their_own(tmp_path) -> None:
    agent = tmp_path / "agent.json"
    assert recorded_install_mb(tmp_path).startswith("not measured: no install.json in")
    agent.write_text(json.dumps({"idle_rss_mb": 48.1, "install_mb": {"x86_64": {"mb": 1.0}}}))
    write_results({"x86_64": {"date": "2026-12-01", "emulated": False,
                              "variants": {"documented": _variant(1029.4, True, "advertised")}}}, tmp_path / "install.json")
    figures = json.loads((tmp_path / "install.json").read_text())["install_mb"]
    assert (figures["x86_64"]["mb"], figures["x86_64"]["agent_hello"], figures["x86_64"]["agent_advertised"]) == \
        (1029.4, True, True)
    assert json.loads(agent.read_text()) == {"idle_rss_mb": 48.1, "install_mb": figures}
    assert recorded_install_mb(tmp_path) == figures
    (tmp_path / "install.json").write_text('{"benchmark": "agent"}')
    with pytest.raises(InputError, match=r"install.json: not a deftly bench install result \(KeyError"):
        recorded_install_mb(tmp_path)


def test_an_installed_agent_says_hello_and_is_seen_advertising_then_stops(tmp_path) -> None:
    # This environment's agent (a real process on 127.0.0.1), as the bench checks each fresh venv's.
    started: list = []
    host = Platform(sys.executable)
    start = host.start
    host.start = lambda *args, **kwargs: started.append(start(*args, **kwargs)) or started[-1]
    outcome = agent_answers(host, sys.executable, str(tmp_path / "state"))
    assert outcome["answered"] and outcome["started"], outcome
    assert outcome["hello"]["arch"] == outcome["advertised"]["arch"] == platform.machine()
    assert outcome["advertised"]["address"].startswith("127.0.0.1:")
    assert started[0].poll() is not None and not (tmp_path / "state").exists()
    assert "without_advert" not in outcome  # asked only of an agent that said no hello

    by_address = agent_answers(host, sys.executable, str(tmp_path / "state"), advertise=False)
    assert by_address["answered"] and by_address["advertised"] is None and by_address["hello"]["protocol"] == 1
    assert started[1].poll() is not None


def test_an_install_without_the_agent_is_reported_as_not_started(tmp_path) -> None:
    # The base interpreter has neither the project nor websockets: the agent exits at once, and the check says why.
    outcome = agent_answers(Platform(sys.executable), getattr(sys, "_base_executable", sys.executable),
                            str(tmp_path / "state"), start_timeout_s=60)
    assert outcome == {"started": False, "hello": None, "advertised": None, "answered": False,
                       "error": "no banner in 60 s: []", "exited": outcome["exited"]}
    assert outcome["exited"]["returncode"] == 1
    assert any("ModuleNotFoundError" in line for line in outcome["exited"]["stderr"]), outcome["exited"]
