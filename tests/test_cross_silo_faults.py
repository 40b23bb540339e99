"""Cross-silo faults on loopback (issue 17): a stopped client is given up on within peer_timeout_s, a hung
one after response_timeout_s (derived from the federation's pace when unset), and launch-local's exit
status says what became of the federation (0 finished, 1 failed, 2 config error, 124 timed out).

Test-only algorithm ``toyfault`` reaches the processes through ``--plugin tests.test_cross_silo_faults``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from fedselect.algorithms.base import FedAvgClient, FedAvgServer
from fedselect.fedml_runtime.deadlines import FACTOR, FIRST_ANSWER_S, FLOOR_S, AnswerClock, SilenceClock
from fedselect.registry import register
from fedselect.runner.processes import Fleet

from .conftest import REPO
from .test_cross_silo import FEDERATION_TIMEOUT_S, logs, raw_config, start, tiny_folder, wait_for, write_config

_ = tiny_folder  # a fixture, used by name
PLUGIN = ["tests.test_cross_silo_faults"]


@dataclass(frozen=True)
class FaultOptions:
    # every local update waits this long (rounds slow enough to act in)
    sleep_s: float = 0.0
    # this client dies by SIGKILL (as if killed) in this round's local update
    die_client: int = -1
    die_round: int = 1
    # this client's local update never ends from this round on (hung: it still answers probes)
    hang_client: int = -1
    hang_round: int = 1


class FaultClient(FedAvgClient):
    Options = FaultOptions

    def local_update(self):
        o = self.options
        if self.id == o.die_client and self.round_idx >= o.die_round:
            os.kill(os.getpid(), signal.SIGKILL)
        while self.id == o.hang_client and self.round_idx >= o.hang_round:
            time.sleep(1.0)
        time.sleep(o.sleep_s)
        return super().local_update()


register("toyfault", client=FaultClient, server=FedAvgServer, options=FaultOptions,
         summary="test only: FedAvg whose clients die, hang or dawdle on request")


def launch_local(tmp_path: Path, raw: dict, *, timeout_s: float = FEDERATION_TIMEOUT_S,
                 plugins: list[str] = PLUGIN) -> tuple[subprocess.CompletedProcess, float]:
    config = write_config(tmp_path, raw)
    # python -m from the repository: the test plugin module is importable there
    argv = [sys.executable, "-m", "fedselect.cli", "launch-local", "--config", str(config), "--timeout",
            str(timeout_s), "--out", str(tmp_path / "federated.json"), "--log-dir", str(tmp_path / "logs")]
    for plugin in plugins:
        argv += ["--plugin", plugin]
    started = time.monotonic()
    out = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s + 90, cwd=REPO)
    return out, time.monotonic() - started


def last_line(out: subprocess.CompletedProcess) -> str:
    return [line for line in out.stdout.splitlines() if line.strip()][-1]


# ------------------------------------------------------------------ the clocks (offline)

def test_the_derived_answer_limit_follows_the_federation_pace():
    clock = AnswerClock(None)
    assert clock.limit("upload", 100) == FIRST_ANSWER_S  # nothing to derive from yet
    clock.observe("upload", 6.0, 100)  # 0.06 s per sample
    clock.observe("upload", 2.0, 100)  # a faster one does not lower the pace
    assert clock.limit("upload", 100) == FLOOR_S  # 10 x 6 s is under the floor
    assert clock.limit("upload", 1000) == pytest.approx(FACTOR * 0.06 * 1000)  # a client 10x the size
    assert clock.limit("eval", 100) == FIRST_ANSWER_S  # each kind of answer has its own pace
    assert "10x the slowest upload" in clock.describe("upload")
    fixed = AnswerClock(7.0)
    assert fixed.limit("upload", 10**6) == 7.0 and fixed.describe("x") == "deploy.response_timeout_s"
    silence = SilenceClock(60.0, None)
    assert silence.limit() == 60.0 + FIRST_ANSWER_S
    silence.heard(400.0)
    assert silence.limit() == 60.0 + FACTOR * 400.0
    assert SilenceClock(60.0, 5.0).limit() == 65.0


# ------------------------------------------------------------------ federations (real processes)

integration = pytest.mark.integration


@integration
def test_a_stopped_client_is_given_up_within_peer_timeout(tmp_path, tiny_folder):  # noqa: F811
    """SIGSTOP: the kernel still completes TCP handshakes for it, but the process completes no connection;
    the probes see that. Before, only response_timeout_s (3600 s by default) ended the wait."""
    raw = raw_config(tmp_path, tiny_folder, algorithm="toyfault", algo={"sleep_s": 1.0}, train={"rounds": 6},
                     deploy={"on_client_failure": "continue", "peer_timeout_s": 4})
    config = write_config(tmp_path, raw)
    record = tmp_path / "federated.json"
    with Fleet(tmp_path / "logs") as fleet:
        start(fleet, config, [1, 2], record=record, plugins=PLUGIN)
        server, _, victim = fleet.members
        wait_for(server, "round 2/6")
        os.kill(victim.proc.pid, signal.SIGSTOP)
        stopped_at = time.monotonic()
        wait_for(server, "client 1 (rank 2) failed")
        given_up_s = time.monotonic() - stopped_at
        fleet.wait(timeout_s=FEDERATION_TIMEOUT_S, leader="server", grace_s=5)
    print(f"stopped client given up on after {given_up_s:.1f} s (peer_timeout_s 4)")
    assert server.returncode == 0, logs(fleet)
    federated = json.loads(record.read_text())
    assert list(federated["clients_failed"]) == ["1"] and "did not answer" in federated["clients_failed"]["1"]
    assert federated["rounds"] == 6 and federated["evaluated_clients"] == [0]
    assert given_up_s < 4 + 25, given_up_s  # peer_timeout_s, plus probe timeouts and a round under load


@integration
def test_a_hung_client_is_given_up_after_response_timeout(tmp_path, tiny_folder):  # noqa: F811
    """It answers probes (its gRPC threads run) but never uploads: response_timeout_s ends the wait."""
    raw = raw_config(tmp_path, tiny_folder, algorithm="toyfault", algo={"hang_client": 1, "hang_round": 1},
                     train={"rounds": 3}, deploy={"on_client_failure": "continue", "response_timeout_s": 6})
    out, _ = launch_local(tmp_path, raw)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    federated = json.loads((tmp_path / "federated.json").read_text())
    reason = federated["clients_failed"]["1"]
    assert "no upload for" in reason and "while it answered probes" in reason and "deploy.response_timeout_s" in reason
    assert "clients that failed and were left out" in last_line(out) and "client-2" in last_line(out)


@integration
def test_launch_local_exit_status_follows_the_federation(tmp_path, tiny_folder):  # noqa: F811
    """A client killed (-9) mid-run: under continue the federation finishes and launch-local exits 0
    (it used to exit 1); under error the federation fails and launch-local exits 1."""
    kill = {"algorithm": "toyfault", "algo": {"die_client": 1, "die_round": 1}, "train": {"rounds": 3}}
    cont = raw_config(tmp_path / "continue", tiny_folder, **kill, deploy={"on_client_failure": "continue",
                                                                          "peer_timeout_s": 3})
    (tmp_path / "continue").mkdir()
    out, _ = launch_local(tmp_path / "continue", cont)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert "client-2: ended by SIGKILL" in out.stdout
    assert last_line(out) == ("launch-local: the federation finished; clients that failed and were left out "
                              "(deploy.on_client_failure=continue): client-2 (ended by SIGKILL)")
    assert json.loads((tmp_path / "continue" / "federated.json").read_text())["rounds"] == 3
    err = raw_config(tmp_path / "error", tiny_folder, **kill, deploy={"peer_timeout_s": 3})
    (tmp_path / "error").mkdir()
    out, _ = launch_local(tmp_path / "error", err)
    assert out.returncode == 1, out.stdout[-4000:]
    assert last_line(out).startswith("launch-local: the federation failed (server: exit 1): fedselect serve: "
                                     "federation failed: client 1 (rank 2) failed"), last_line(out)


@integration
def test_launch_local_config_error_and_timeout(tmp_path, tiny_folder):  # noqa: F811
    """An image folder's model is known only once the clients describe their data: an infeasible layer
    budget is then found by the server, which exits 2 (no round runs), and so does launch-local. A
    federation that outlasts --timeout is ended: 124."""
    raw = raw_config(tmp_path / "budget", tiny_folder, algorithm="layersel", algo={"budget": 0.01})
    (tmp_path / "budget").mkdir()
    out, took = launch_local(tmp_path / "budget", raw, plugins=[])
    assert out.returncode == 2, out.stdout[-4000:] + out.stderr[-2000:]
    assert last_line(out).startswith("launch-local: config error (server): fedselect: error: config key "
                                     "'algo.budget'"), last_line(out)
    assert "round 1/" not in (tmp_path / "budget" / "logs" / "server.log").read_text()
    slow = raw_config(tmp_path / "slow", tiny_folder, algorithm="toyfault", algo={"sleep_s": 120.0})
    (tmp_path / "slow").mkdir()
    out, took = launch_local(tmp_path / "slow", slow, timeout_s=20)
    assert out.returncode == 124, out.stdout[-4000:]
    assert last_line(out) == "launch-local: timed out after 20 s (--timeout); every process was ended"
    # took also counts launch-local's own start-up, before its clock runs (under load, up to a minute);
    # a federation left to run would take at least 2 rounds x 120 s
    assert took < 20 + 150
