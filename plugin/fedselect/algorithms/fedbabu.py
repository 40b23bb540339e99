"""FedBABU (Oh et al. 2022): body-only federated training, head fine-tuned per client at evaluation.

Oh, Kim, Yun, "FedBABU: Toward Enhanced Representation for Federated Image Classification",
ICLR 2022, arXiv:2106.06042. During federated training the head stays at its (common, random)
initialization and only the body is trained and aggregated (Sec. 4, Alg. 1); personalization
is fine-tuning the global model on each client's training data for a few epochs just before
evaluating it (Sec. 4.2).

On the mask mechanism: the head is kept on the client (never uploaded, never overwritten)
because it never changes, not because it differs between clients; every client's head is the
common initialization, and so is the server's. Local schedule = body-only SGD.
:meth:`FedBABUClient.prepare_for_evaluation` fine-tunes, and :meth:`FedBABUClient.test`
restores the federated state afterwards, so evaluation never leaks into training.
"""

from __future__ import annotations

from fedselect.engine import TrainStats
from fedselect.registry import register

from .base import FedAvgClient, FedAvgServer, Mask
from .fedbabu_options import FedBABUOptions
from .parts import head_entries, train_part

# generator stream of evaluation-time fine-tuning, independent of the training draws
FINETUNE_STREAM = 7


class FedBABUClient(FedAvgClient):
    """FedBABU's client: head frozen at initialization in training; fine-tuned on a copy for evaluation."""

    Options = FedBABUOptions

    def initial_personal_mask(self) -> Mask:
        return self.full_mask(head_entries(self.model))

    def body_entries(self) -> list[str]:
        head = set(head_entries(self.model))
        return [name for name in self.state_entries() if name not in head]

    def local_update(self) -> TrainStats:
        """Oh et al. 2022, Alg. 1: E epochs updating the body only; the head gets no update at all."""
        return train_part(self, self.ctx.config.train.local_epochs, self.body_entries())

    def prepare_for_evaluation(self) -> None:
        """Oh et al. 2022, Sec. 4.2: fine-tune the received global model on the local training split."""
        options = self.options
        part = self.state_entries() if options.finetune_part == "full" else head_entries(self.model)
        train_part(self, options.finetune_epochs, part, stream=FINETUNE_STREAM)


register("fedbabu", client=FedBABUClient, server=FedAvgServer)
