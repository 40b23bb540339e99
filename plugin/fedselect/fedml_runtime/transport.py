"""Who may talk on the cross-silo channel, and how much: TLS credentials, rank names, message limits.

* **Mutual TLS** (default; ``deploy.insecure: true`` turns it off): every party listens with
  ``grpc.ssl_server_credentials(..., require_client_auth=True)`` and connects with
  ``grpc.ssl_channel_credentials`` carrying its own key and certificate, all signed by the
  federation's CA (``fedselect certs``). A connection without a certificate of that CA fails in
  the TLS handshake, before any message is read.
* **Ranks from certificates**: a receiver takes the sender's rank from the certificate the
  handshake verified (:func:`peer_rank`), never from the message; a sender checks that the
  receiver's certificate names the rank it means to reach (:meth:`Transport.target_name`:
  ``fedselect-rank-K``, or ``deploy.server_name`` for the server).
* **Limits**: a cap on one message's size, from the model (:func:`message_cap`; its values,
  one mask bit per entry, and slack) or ``deploy.max_message_mb``, and a bounded receive queue
  (``deploy.receive_queue``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import grpc
import torch

from fedselect.certs import PartyCredentials, load_party, rank_from_name, rank_name
from fedselect.deploy_config import DeployConfig

MB = 1 << 20
# before the server knows the model (clients are joining), one message carries a data descriptor
JOIN_CAP_BYTES = 16 * MB
# what a message may hold beyond the model's values and mask bits (headers, metadata, plans, JSON)
SLACK_FRACTION = 0.25
SLACK_MIN_BYTES = 4 * MB


@dataclass(frozen=True)
class Transport:
    """How one party's channel talks: TLS credentials (None: insecure), names, limits."""

    rank: int
    tls: PartyCredentials | None = None
    server_name: str | None = None
    # the message cap fixed by deploy.max_message_mb; None: derived from the model
    max_message_bytes: int | None = None
    queue_size: int = 64

    @property
    def secure(self) -> bool:
        return self.tls is not None

    def server_credentials(self) -> grpc.ServerCredentials:
        assert self.tls is not None
        return grpc.ssl_server_credentials([(self.tls.key_pem, self.tls.cert_pem)],
                                           root_certificates=self.tls.ca_pem, require_client_auth=True)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        assert self.tls is not None
        return grpc.ssl_channel_credentials(root_certificates=self.tls.ca_pem, private_key=self.tls.key_pem,
                                            certificate_chain=self.tls.cert_pem)

    def target_name(self, rank: int) -> str:
        """The name the certificate of ``rank`` must carry (checked by the TLS handshake)."""
        if rank == 0 and self.server_name:
            return self.server_name
        return rank_name(rank)

    def initial_cap(self, model_cap: int | None) -> int:
        """The message cap a channel starts with: configured, else the model's, else the join phase's."""
        return self.max_message_bytes or model_cap or JOIN_CAP_BYTES

    def describe(self) -> str:
        return "mutual TLS" if self.secure else "INSECURE (deploy.insecure: true): no TLS, ranks unauthenticated"


def transport_for(deploy: DeployConfig, rank: int, num_clients: int) -> Transport:
    """The transport of party ``rank``; with TLS on, its files are read and checked now
    (a :class:`~fedselect.options.ConfigError` naming the key and the file if they are not right)."""
    tls = None if deploy.insecure else load_party(deploy.tls_files(rank), rank)
    cap = None if deploy.max_message_mb is None else int(deploy.max_message_mb * MB)
    queue_size = deploy.receive_queue or 4 * num_clients + 8
    return Transport(rank=rank, tls=tls, server_name=deploy.server_name, max_message_bytes=cap,
                     queue_size=queue_size)


def peer_rank(context: grpc.ServicerContext) -> int | None:
    """The rank named by the verified certificate of an RPC's peer; None without TLS or a rank name."""
    names = context.auth_context().get("x509_common_name") or []
    return rank_from_name(names[0]) if len(names) == 1 else None


def _tensors(obj: Any) -> Iterable[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from _tensors(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from _tensors(value)


def message_cap(params: Any) -> int:
    """The largest message a party of a federation of this model may send or receive, in bytes.

    A model message is at most every value of ``params`` (a state dict, or any container of
    tensors); an upload, at most every value plus one mask bit per entry. Slack: a quarter more,
    at least 4 MiB (serialization headers, metadata, plans and evaluations in JSON).
    """
    values = entries = 0
    for t in _tensors(params):
        values += t.numel() * t.element_size()
        entries += t.numel()
    base = values + math.ceil(entries / 8)
    return base + max(SLACK_MIN_BYTES, int(base * SLACK_FRACTION))
