"""The receiving end of the cross-silo channel: FedML's ``sendMessage`` RPC, checked before queueing.

For each incoming message, in the gRPC handler thread: who sent it (the rank its verified
certificate names), whether that rank may send here, whether it is under the message cap, and
room in the bounded queue (a sender waits for it, then is refused). What is refused is logged
naming the sender and answered with a gRPC error the sender reads
(:class:`~fedselect.fedml_runtime.grpc_channel.FedSelectChannel` is the ``channel``).
"""

from __future__ import annotations

import queue
from dataclasses import dataclass
from typing import Any

import grpc

from fedselect.fedml_bridge import import_fedml
from fedselect.fedml_runtime.transport import peer_rank

import_fedml()
from fedml.core.distributed.communication.grpc import (  # noqa: E402  (needs the offline patch first)
    grpc_comm_manager_pb2,
    grpc_comm_manager_pb2_grpc,
)


@dataclass(frozen=True)
class Incoming:
    """What the receiving RPC handler queued: the bytes, the sender's certificate rank (None without
    TLS), and, for a message refused there, why (no bytes)."""

    data: bytes
    peer_rank: int | None
    refused: str | None = None


class Servicer(grpc_comm_manager_pb2_grpc.gRPCCommManagerServicer):
    """The receiving end of FedML's ``sendMessage`` RPC: who sent it (certificate), how large, queued."""

    def __init__(self, channel: Any, queue_size: int) -> None:
        self.channel = channel
        self.message_q: queue.Queue[Incoming] = queue.Queue(maxsize=queue_size)

    def sendMessage(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802 (FedML's name)
        ch = self.channel
        rank = peer_rank(context) if ch.transport.secure else None
        sender = (f"rank {rank} (its certificate)" if rank is not None
                  else f"{context.peer()} (claims rank {request.client_id})")
        if ch.transport.secure and not ch.permitted_sender(rank):
            ch.refuse(None, f"refused a message from {sender}: not a rank that may send to rank {ch.client_rank}")
            context.abort(grpc.StatusCode.PERMISSION_DENIED, f"rank {rank} may not send to rank {ch.client_rank}")
        size = len(request.message)
        if size > ch.message_cap:
            why = (f"refused a message of {size:,} bytes from {sender}: over the cap of {ch.message_cap:,} bytes "
                   f"({ch.cap_source})")
            ch.refuse(rank, why)
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, why)
        # a full queue makes senders wait (the pool has one thread per peer), then refuses before their deadline
        wait = min(60.0, max(0.0, (context.time_remaining() or 60.0) - 0.5))
        try:
            self.message_q.put(Incoming(request.message, rank), timeout=wait)
        except queue.Full:
            why = f"refused a message from {sender}: the receive queue ({self.message_q.maxsize}) stayed full"
            ch.refuse(rank, why)
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, why)
        return grpc_comm_manager_pb2.CommResponse()
