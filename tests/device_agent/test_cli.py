"""Tests for device_agent/cli.py: what `deftly-agent` prints at start, what it keeps, and what it refuses."""
from __future__ import annotations

import os
import stat
import subprocess
import sys

from desktop.engine.local import REPO


def test_the_banner_says_where_it_listens_its_token_and_what_it_advertises_and_the_token_is_kept(agents) -> None:
    agent = agents(name="bench-pi", token=None)
    token = agent.token
    assert len(token) == 32 and any(f"ws://127.0.0.1:{agent.port}/deftly" in line for line in agent.banner)
    assert any(line.startswith("not advertising (--no-advertise)") for line in agent.banner)
    assert stat.S_IMODE(os.stat(agent.state_dir / "token").st_mode) == 0o600
    agent.restart()
    assert agent.token == token  # the same pairing token after a restart


def test_an_idle_agent_has_not_loaded_torch(agents) -> None:
    agent = agents()
    maps = open(f"/proc/{agent.pid}/maps").read()
    assert "libtorch" not in maps and "_portable_lib" not in maps and "executorch" not in maps


def test_an_unknown_device_class_is_a_clear_error_and_exit_status_2(tmp_path) -> None:
    result = subprocess.run([sys.executable, "-m", "device_agent.cli", "--simulate", "toaster", "--no-advertise",
                             "--state-dir", str(tmp_path)], capture_output=True, text=True, cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=60)
    assert result.returncode == 2
    assert "deftly-agent: --simulate toaster: no such device class" in result.stderr
    assert "Traceback" not in result.stderr


def test_with_tls_it_serves_wss_with_the_certificate_it_keeps_and_prints_its_fingerprint(agents) -> None:
    import hashlib
    import ssl

    agent = agents("--tls", name="tls-pi")
    fingerprint = agent.tls_fingerprint
    kept = ssl.PEM_cert_to_DER_cert((agent.state_dir / "tls.crt").read_text())
    served = ssl.PEM_cert_to_DER_cert(ssl.get_server_certificate(("127.0.0.1", agent.port)))  # a real handshake
    assert fingerprint == hashlib.sha256(kept).hexdigest() == hashlib.sha256(served).hexdigest()
    assert any(f"listening on wss://127.0.0.1:{agent.port}/deftly" in line for line in agent.banner)
    assert any(f"--agent wss://127.0.0.1:{agent.port}#sha256:{fingerprint}" in line for line in agent.banner)
    assert stat.S_IMODE(os.stat(agent.state_dir / "tls.key").st_mode) == 0o600
    maps = open(f"/proc/{agent.pid}/maps").read()
    assert "libtorch" not in maps and "executorch" not in maps  # still idle without the runtime
    agent.restart()
    assert agent.tls_fingerprint == fingerprint  # the same certificate after a restart


def test_an_agent_that_cannot_advertise_says_so_and_keeps_serving(tmp_path, monkeypatch, capsys) -> None:
    import asyncio
    import re
    import socket

    from device_agent import cli

    async def refused(self) -> None:  # what zeroconf meets where multicast is not allowed (qemu-user, Android)
        raise OSError(92, "Protocol not available")

    monkeypatch.setattr(cli.Advert, "start", refused)
    args = cli.parse_args(["--host", "127.0.0.1", "--port", "0", "--state-dir", str(tmp_path / "state")])
    printed: list[str] = []

    async def go() -> None:
        task = asyncio.create_task(cli._run(args))
        try:
            for _ in range(400):
                await asyncio.sleep(0.05)
                printed.append(capsys.readouterr().out)
                if "cannot advertise" in "".join(printed) or task.done():
                    break
            assert not task.done()  # still serving
            port = int(re.search(r"listening on ws://127\.0\.0\.1:(\d+)", "".join(printed)).group(1))
            with socket.create_connection(("127.0.0.1", port), timeout=5):
                pass
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    asyncio.run(go())
    out = "".join(printed)
    assert "cannot advertise on zeroconf (Protocol not available): still serving; add it on the desktop by address" in out
