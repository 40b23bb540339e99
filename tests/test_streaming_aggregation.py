"""Simulation without a wire: uploads added as they arrive, bytes counted by the wire's own rule."""

from __future__ import annotations

import pytest
import torch

from fedselect.algorithms.base import FedAvgClient
from fedselect.algorithms.payload import LocalUpload, encode_upload, payload_nbytes, upload_nbytes

from .test_algorithms import make_run


def _upload(state: dict[str, torch.Tensor], mask: dict[str, torch.Tensor], names: list[str] | None = None
            ) -> LocalUpload:
    masked = {n: m for n, m in mask.items() if bool(m.any())}
    covered = state if names is None else {n: state[n] for n in names}
    return LocalUpload(client_id=3, num_samples=17, state=covered, personal_mask=masked,
                       personal_counts={n: int(m.sum()) for n, m in masked.items()})


@pytest.mark.parametrize("seed", range(4))
def test_counted_bytes_equal_the_encoded_payload(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    state = {"conv.weight": torch.randn(4, 3, 3, 3, generator=g), "conv.bias": torch.randn(4, generator=g),
             "bn.num_batches_tracked": torch.tensor(5), "head.weight": torch.randn(2, 7, generator=g).half(),
             "odd": torch.randn(13, generator=g)}
    mask = {"conv.weight": torch.rand(4, 3, 3, 3, generator=g) < 0.3,          # partial
            "conv.bias": torch.ones(4, dtype=torch.bool),                      # wholly personal
            "head.weight": torch.rand(2, 7, generator=g) < 0.5,                # partial, half precision
            "odd": torch.zeros(13, dtype=torch.bool)}                          # nothing personal
    for names in (None, ["conv.weight", "odd", "bn.num_batches_tracked"]):
        upload = _upload(state, mask, names)
        encoded = encode_upload(upload.state, upload.personal_mask, client_id=3, num_samples=17)
        assert upload_nbytes(upload) == payload_nbytes(encoded)


def _clients_after_training(algorithm: str, client_cls: type | None = None):
    _, _, args, _, _, _, trainers, server, _ = make_run(algorithm, rounds=1, client_cls=client_cls)
    return args, trainers, server


class HalfMaskedClient(FedAvgClient):
    """A fixed element-wise mask that differs per client, with a wholly personal head."""

    def initial_personal_mask(self):
        g = torch.Generator().manual_seed(self.id)
        mask = {n: torch.rand(v.shape, generator=g) < 0.4 for n, v in self.state_entries().items()
                if v.is_floating_point() and "head" not in n}
        mask.update(self.full_mask(["head.weight"]))
        return mask


@pytest.mark.parametrize("algorithm,client_cls", [("fedavg", None), ("fedavg", HalfMaskedClient)])
def test_streamed_local_uploads_equal_the_wire_path_bit_for_bit(algorithm: str, client_cls: type | None) -> None:
    args, trainers, server = _clients_after_training(algorithm, client_cls)
    start = {k: v.clone() for k, v in server.get_model_params().items()}
    wire: list[tuple[float, dict]] = []
    server.begin_round()
    for trainer in trainers:
        trainer.set_model_params(start)
        trainer.train(None, "cpu", args)
        # both forms of the same upload, before the next client overwrites the shared module
        wire.append((float(trainer.local_sample_number), trainer.get_model_params()))
        assert server.add_local_upload(trainer.local_upload())
        trainer.release_unpacked_mask()
    streamed = server.end_round()
    streamed_mask = server.global_personal_mask
    server.set_model_params(start)
    decoded = server.aggregate(wire)
    assert list(streamed) == list(decoded)
    for name in streamed:
        assert torch.equal(streamed[name], decoded[name]), name
        if streamed[name].is_floating_point():
            assert torch.equal(streamed_mask[name], server.global_personal_mask[name]), name
    moved = [n for n in streamed if not torch.equal(streamed[n], start[n])]
    assert moved, "the round changed nothing: the comparison would be empty"
    if client_cls is HalfMaskedClient:
        assert torch.equal(streamed["head.weight"], start["head.weight"])  # nobody shares the head


def test_server_keeps_sums_not_uploads() -> None:
    """Memory: after any number of uploads the server holds one float64 sum per tensor, no upload."""
    args, trainers, server = _clients_after_training("fedavg", HalfMaskedClient)
    server.begin_round()
    for trainer in trainers:
        trainer.set_model_params(server.get_model_params())
        trainer.train(None, "cpu", args)
        server.add_local_upload(trainer.local_upload())
        trainer.release_unpacked_mask()
    mean = server._mean
    floats = [n for n, v in server.global_state.items() if v.is_floating_point()]
    assert set(mean._sums) <= set(floats)
    assert all(t.dtype == torch.float64 for t in mean._sums.values())


def test_finiteness_is_judged_on_shared_entries_only() -> None:
    """NaN or Inf on personal entries stays home and the upload is accepted; on a shared entry it is
    rejected; finite values whose float32 sum overflows are accepted (the check falls back to
    float64 sums of the shared entries)."""
    from fedselect.algorithms.server import _check_finite_shared

    mask = {"w": torch.tensor([True, False, False, False])}
    for bad in (float("nan"), float("inf")):
        _check_finite_shared(_upload({"w": torch.tensor([bad, 1.0, 2.0, 3.0])}, mask))  # personal: accepted
        with pytest.raises(ValueError, match="non-finite values in 'w'"):
            _check_finite_shared(_upload({"w": torch.tensor([0.0, 1.0, bad, 3.0])}, mask))
    big = torch.full((4,), 3e38)
    assert not torch.isfinite(big.sum())
    _check_finite_shared(_upload({"w": big}, {}))
