"""Shared fixtures: an isolated HOME for FedML, tiny synthetic federations, the offline data root."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def load_bench(filename: str, name: str):
    """A script of bench/ (not a package) loaded as a module, so tests can call its functions."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO / "bench" / filename)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def shared_data_root() -> Path | None:
    """The offline data copy: $FEDSELECT_DATA_ROOT, else ../shared/data beside the checkout."""
    env = os.environ.get("FEDSELECT_DATA_ROOT")
    candidates = [Path(env)] if env else []
    candidates.append(REPO.parent / "shared" / "data")
    for root in candidates:
        if (root / "cifar10" / "train").is_dir():
            return root
    return None


@pytest.fixture(autouse=True, scope="session")
def _isolated_fedml_home(tmp_path_factory):
    # FedML writes ~/.fedml; keep it out of the user's home and out of the repo
    os.environ["FEDSELECT_FEDML_HOME"] = str(tmp_path_factory.mktemp("fedml-home"))
    os.environ.setdefault("MPLBACKEND", "Agg")
    yield


@pytest.fixture
def data_root() -> Path:
    root = shared_data_root()
    if root is None:
        pytest.skip("offline CIFAR-10 copy not found (set FEDSELECT_DATA_ROOT)")
    return root


def synthetic_clients(num_clients: int = 3, n_train: int = 24, n_test: int = 12, size: int = 16, seed: int = 0):
    """Client datasets whose labels depend on the image (so models can learn them)."""
    from fedselect.engine import ClientDataset

    gen = torch.Generator().manual_seed(seed)
    clients = []
    for cid in range(num_clients):
        def make(n: int, cid: int = cid) -> tuple[torch.Tensor, torch.Tensor]:
            y = (torch.arange(n) + cid) % 3
            x = torch.randint(0, 60, (n, 3, size, size), generator=gen, dtype=torch.uint8)
            x[torch.arange(n), y] += 150  # the label's channel is bright
            return x, y
        (trx, try_), (tex, tey) = make(n_train), make(n_test)
        clients.append(ClientDataset(trx, try_, tex, tey))
    return clients
