"""The ``deploy`` section of a run config: a FedML cross-silo federation's addresses, timeouts,
failure policy, TLS files and each silo's data (``fedselect serve | join | launch-local``;
docs/DEPLOYMENT.md). Validated like the rest of :mod:`fedselect.config`: a bad value is a
:class:`fedselect.options.ConfigError` naming its ``deploy.*`` key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from fedselect.options import check

__all__ = ["DeployConfig"]


@dataclass(frozen=True)
class DeployConfig:
    """A FedML cross-silo federation: addresses, timeouts, failure policy, each silo's data.

    Ports: the server listens on ``server_port``, client rank k (1..num_clients) on
    ``server_port + k`` (see docs/DEPLOYMENT.md).
    """

    # the address clients reach the server at
    server_host: str = "127.0.0.1"
    server_port: int = 8890
    # client rank k is reached at client_hosts[k-1]; empty: every client at server_host (one machine)
    client_hosts: list[str] = field(default_factory=list)
    # the interface every process listens on; None: its own address above (0.0.0.0 behind NAT)
    bind_host: str | None = None
    # seconds the server waits for every client to join (and a client for the server to answer)
    join_timeout_s: float = 300.0
    # a peer whose port refuses connections, or whose process completes none (stopped), this many
    # seconds has failed
    peer_timeout_s: float = 30.0
    # seconds to wait for one expected message (an upload, an evaluation) from a peer that answers
    # probes; null: derived from the federation's pace (1800 s until the first answer of a kind,
    # then max(120 s, 10x the slowest answer so far per sample); fedselect.fedml_runtime.deadlines)
    response_timeout_s: float | None = None
    # seconds between liveness probes of the peers a process is waiting for
    heartbeat_s: float = 2.0
    # a client that fails or never joins: "error" stops the federation naming it, "continue"
    # goes on with the others (logged) while at least min_clients remain
    on_client_failure: Literal["error", "continue"] = "error"
    min_clients: int = 1
    # where a client's data come from: its entry of the configured partition of data.dataset,
    # or its own ImageFolder tree at client_data_dir ("{rank}" and "{client}" are filled in)
    client_data: Literal["partition", "folder"] = "partition"
    client_data_dir: str | None = None
    # folder data: the federation's class names (label = index) and input normalization
    classes: list[str] = field(default_factory=list)
    norm_mean: list[float] = field(default_factory=list)
    norm_std: list[float] = field(default_factory=list)
    # mutual TLS with rank-bound certificates (`fedselect certs`), on unless insecure is true;
    # paths relative to the working directory, "{rank}" filled in with each process's rank
    insecure: bool = False
    ca_cert: str = "certs/ca.pem"
    cert: str = "certs/rank-{rank}.pem"
    key: str = "certs/rank-{rank}.key"
    # the name clients expect in the server's certificate; None: "fedselect-rank-0"
    server_name: str | None = None
    # one message's cap in MB; None: from the model (its values + mask bits + slack)
    max_message_mb: float | None = None
    # messages a process queues before senders wait; None: 4 per client + 8
    receive_queue: int | None = None

    def tls_files(self, rank: int) -> dict[str, Path]:
        """Rank ``rank``'s TLS files by config key; a missing one is a ConfigError naming key and file."""
        files = {f"deploy.{k}": Path(getattr(self, k).replace("{rank}", str(rank))) for k in ("ca_cert", "cert", "key")}
        for key, path in files.items():
            check(path.is_file(), key, f"names {path}, which does not exist (make certificates with `fedselect "
                  "certs`, see docs/DEPLOYMENT.md; deploy.insecure: true turns TLS off)")
        return files

    def __post_init__(self) -> None:
        check(1 <= self.server_port <= 65535, "deploy.server_port", "must be in 1..65535")
        check(self.max_message_mb is None or self.max_message_mb > 0, "deploy.max_message_mb", "must be > 0")
        check(self.receive_queue is None or self.receive_queue >= 1, "deploy.receive_queue", "must be >= 1")
        check(self.insecure or all(getattr(self, k) for k in ("ca_cert", "cert", "key")), "deploy.cert",
              "and deploy.key, deploy.ca_cert must be set unless deploy.insecure is true")
        for key in ("join_timeout_s", "peer_timeout_s", "response_timeout_s", "heartbeat_s"):
            check(getattr(self, key) is None or getattr(self, key) > 0, f"deploy.{key}", "must be > 0")
        check(self.min_clients >= 1, "deploy.min_clients", "must be >= 1")
        if self.client_data == "folder":
            check(bool(self.client_data_dir), "deploy.client_data_dir", "is required for client_data=folder")
            check(bool(self.classes), "deploy.classes", "is required for client_data=folder (labels are "
                   "indices into it, the same on every silo)")
            check(len(self.norm_mean) in (1, 3) and len(self.norm_std) == len(self.norm_mean),
                   "deploy.norm_mean", "and deploy.norm_std are required for client_data=folder (1 or 3 "
                   "values each, the same on every silo)")
            check(all(s > 0 for s in self.norm_std), "deploy.norm_std", "must be > 0")
