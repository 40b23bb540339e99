"""Processes of a cross-silo federation on one machine: ``fedselect launch-local``.

:class:`Fleet` starts processes with their output in log files, waits for them without
spinning, and ends every survivor by its PID (its own process group, so a data-decoding pool
goes with it) on failure, timeout or Ctrl-C. Only the standard library is imported at module
level: the CLI imports this module on every call.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO


@dataclass
class Member:
    """One process of a fleet."""

    name: str
    proc: subprocess.Popen
    log_path: Path
    killed: bool = False

    @property
    def returncode(self) -> int | None:
        return self.proc.poll()


@dataclass
class Fleet:
    """Processes started together and ended together (a context manager: exit kills survivors)."""

    log_dir: Path
    members: list[Member] = field(default_factory=list)
    # whether wait() ended the members because timeout_s passed
    timed_out: bool = False

    def start(self, name: str, argv: list[str], *, env: dict[str, str] | None = None,
              cwd: Path | None = None) -> Member:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"{name}.log"
        with open(log_path, "wb") as out:
            # a session of its own: Ctrl-C reaches only the launcher, which then ends the members
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=env, cwd=cwd, start_new_session=True)
        member = Member(name, proc, log_path)
        self.members.append(member)
        return member

    def wait(self, *, timeout_s: float, leader: str | None = None, grace_s: float = 30.0,
             failed_grace_s: float | None = None, abort_on: tuple[int, ...] = (),
             poll_s: float = 0.2) -> dict[str, int | None]:
        """Wait until all exit, or ``grace_s`` after ``leader`` exits (``failed_grace_s`` when it failed),
        or any member exits with a status in ``abort_on``, or ``timeout_s`` (then :attr:`timed_out`);
        kill the rest.

        Returns each member's exit status (negative: ended by that signal).
        """
        deadline = time.monotonic() + timeout_s
        leader_done: float | None = None
        grace = grace_s
        while any(m.returncode is None for m in self.members):
            now = time.monotonic()
            lead = next((m for m in self.members if m.name == leader), None)
            if lead is not None and lead.returncode is not None and leader_done is None:
                leader_done = now
                if lead.returncode != 0 and failed_grace_s is not None:
                    grace = failed_grace_s
            if now > deadline:
                self.timed_out = True
                break
            if leader_done is not None and now - leader_done > grace:
                break
            if any(m.returncode in abort_on for m in self.members if m.returncode is not None):
                break
            time.sleep(poll_s)
        self.kill_survivors()
        return {m.name: m.returncode for m in self.members}

    def kill(self, member: Member, sig: int = signal.SIGKILL) -> None:
        """Signal one member's process group (its pgid is its PID: start_new_session)."""
        if member.returncode is not None:
            return
        member.killed = True
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(member.proc.pid, sig)

    def kill_survivors(self, grace_s: float = 5.0) -> None:
        """SIGTERM every running member, then SIGKILL whatever is left after ``grace_s``."""
        for m in self.members:
            self.kill(m, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for m in self.members:
            with contextlib.suppress(subprocess.TimeoutExpired):
                m.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            self.kill(m, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                m.proc.wait(timeout=5)

    def __enter__(self) -> Fleet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill_survivors()


def free_port_block(count: int, host: str = "127.0.0.1", tries: int = 50) -> int:
    """A port P such that P..P+count-1 are free on ``host`` now (another process may still take one)."""
    import random

    rng = random.Random(os.getpid() ^ time.time_ns())
    for _ in range(tries):
        base = rng.randrange(20000, 60000 - count)
        socks = []
        try:
            for port in range(base, base + count):
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                socks.append(s)
                s.bind((host, port))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError(f"no block of {count} free ports found on {host}")


def member_argv(command: str, config: Path, overrides: list[str], plugins: list[str], *extra: str) -> list[str]:
    argv = [sys.executable, "-m", "fedselect.cli", command, "--config", str(config)]
    for o in overrides:
        argv += ["--set", o]
    for p in plugins:
        argv += ["--plugin", p]
    return argv + list(extra)


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def throwaway_certs(out: Path, clients: int) -> list[str]:
    """A fresh CA (its key not kept) and certificates for 127.0.0.1 under ``out``; the overrides using them."""
    import json

    from fedselect.certs import CA_CERT, write_federation

    write_federation(out, clients=clients, server_host="127.0.0.1", days=2, force=True, keep_ca_key=False)
    paths = {"ca_cert": out / CA_CERT, "cert": out / "rank-{rank}.pem", "key": out / "rank-{rank}.key"}
    # JSON strings are YAML scalars: any path survives --set
    return [*(f"deploy.{key}={json.dumps(str(path.resolve()))}" for key, path in paths.items()),
            "deploy.server_name=null"]


def launch_local(config_path: Path, overrides: list[str], *, clients: int | None = None, timeout_s: float = 3600.0,
                 log_dir: Path | None = None, plugins: list[str] | None = None, out: Path | None = None,
                 stream: TextIO = sys.stdout) -> int:
    """Server + clients as processes on 127.0.0.1; the exit status of :func:`outcome` (0: finished)."""
    from fedselect.config import load_config

    plugins = list(plugins or [])
    config = load_config(config_path, overrides)
    n = clients or config.data.partition.num_clients
    port = free_port_block(n + 1)
    extra = [f"deploy.server_port={port}", "deploy.server_host=127.0.0.1", "deploy.client_hosts=[]",
             "deploy.bind_host=null"]
    if n != config.data.partition.num_clients:
        extra.append(f"data.partition.num_clients={n}")
    overrides = [*overrides, *extra]
    config = load_config(config_path, overrides)  # the members' config, validated before any start
    from fedselect.runner.preflight import preflight

    preflight(config, model=False)  # config-time checks here; the server runs the model-time ones first
    log_dir = log_dir or Path(config.tracking.results_dir) / "deploy" / time.strftime("local-%Y%m%d-%H%M%S")
    if not config.deploy.insecure:
        overrides += throwaway_certs(log_dir / "certs", n)
        config = load_config(config_path, overrides)
    grace = config.deploy.peer_timeout_s + 4 * config.deploy.heartbeat_s + 30
    security = ("INSECURE (deploy.insecure: true)" if config.deploy.insecure
                else f"mutual TLS, throwaway certificates in {log_dir / 'certs'}")
    print(f"launching server + {n} clients on 127.0.0.1:{port}..{port + n} ({security}); logs in {log_dir}",
          file=stream, flush=True)
    with Fleet(log_dir) as fleet:
        try:
            fleet.start("server", member_argv("serve", config_path, overrides, plugins,
                                              *(["--out", str(out)] if out else [])))
            for rank in range(1, n + 1):
                fleet.start(f"client-{rank}", member_argv("join", config_path, overrides, plugins,
                                                          "--rank", str(rank)))
            # a server that failed has told its clients (or never met them): they get a short grace
            # a config error of any process (exit 2) ends the federation at once
            fleet.wait(timeout_s=timeout_s, leader="server", grace_s=grace, failed_grace_s=10.0, abort_on=(2,))
        except KeyboardInterrupt:
            fleet.kill_survivors()
            print("interrupted: every process of the federation was ended", file=stream, flush=True)
            return 130
        finally:
            for key in (log_dir / "certs").glob("*.key"):  # throwaway: no key outlives the federation
                key.unlink(missing_ok=True)
    failed = [m for m in fleet.members if m.returncode != 0]
    for m in fleet.members:
        print(f"  {m.name}: {state(m)} ({m.log_path})", file=stream)
    for m in failed:
        print(f"--- last lines of {m.name} ---\n{tail(m.log_path)}", file=stream)
    code, last = outcome(fleet, timeout_s=timeout_s, policy=config.deploy.on_client_failure)
    if code == 0:
        print(tail(fleet.members[0].log_path, 2), file=stream)
    print(last, file=stream, flush=True)
    return code


def state(member: Member) -> str:
    """How a member ended: its exit status, the signal that ended it, or killed by the launcher."""
    code = member.returncode
    if member.killed:
        return "killed by launch-local"
    if code is not None and code < 0:
        with contextlib.suppress(ValueError):
            return f"ended by {signal.Signals(-code).name}"
    return f"exit {code}"


def outcome(fleet: Fleet, *, timeout_s: float, policy: str) -> tuple[int, str]:
    """launch-local's exit status and last line, from the server's outcome (docs/DEPLOYMENT.md, "Exit codes").

    0: the server finished the federation as configured (under ``on_client_failure: continue`` clients
    it gave up on may have failed); 2: a config error (the server or a client exited 2); 124: the
    ``--timeout`` ended it; 1: the federation failed otherwise.
    """
    server, *clients = fleet.members
    bad = [c for c in clients if c.returncode != 0]
    names = ", ".join(f"{c.name} ({state(c)})" for c in bad)
    if fleet.timed_out:
        return 124, f"launch-local: timed out after {timeout_s:g} s (--timeout); every process was ended"
    if server.returncode == 0 and (not bad or policy == "continue"):
        gone = f"; clients that failed and were left out (deploy.on_client_failure=continue): {names}" if bad else ""
        return 0, f"launch-local: the federation finished{gone}"
    if server.returncode == 0:
        return 1, f"launch-local: the server finished, but {names} failed (deploy.on_client_failure=error)"
    why = last_line(server.log_path) or state(server)
    if server.returncode == 2 or any(c.returncode == 2 for c in clients):
        culprit = server if server.returncode == 2 else next(c for c in clients if c.returncode == 2)
        return 2, f"launch-local: config error ({culprit.name}): {last_line(culprit.log_path) or state(culprit)}"
    return 1, f"launch-local: the federation failed (server: {state(server)}): {why}"


def last_line(path: Path) -> str:
    """The last non-empty line of a log."""
    lines = [line for line in tail(path, 40).splitlines() if line.strip()]
    return lines[-1].strip() if lines else ""


# ------------------------------------------------------------------------------------ the CLI
