"""STAND-IN ``fedml.FedMLRunner``: runs a custom ``algorithm_flow`` only."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


class FedMLRunner:
    """FedML 0.9.6's runner given ``algorithm_flow``: it keeps the flow and ``run()`` calls ``flow.run()``."""

    def __init__(self, args: Any, device: Any, dataset: Any, model: Any, client_trainer: Any = None,
                 server_aggregator: Any = None, algorithm_flow: Any = None) -> None:
        if algorithm_flow is None:
            raise NotImplementedError("fedml stand-in: FedML's own simulators and cross-silo runners are not "
                                      "provided; pass algorithm_flow")
        self.runner = algorithm_flow

    def run(self) -> None:
        self.runner.run()
        self.log_runner_result()

    @staticmethod
    def log_runner_result() -> None:
        """FedML writes a file named after the process id under ~/.fedml/fedml_trace after a run."""
        trace = Path(os.path.expanduser("~")) / ".fedml" / "fedml_trace"
        trace.mkdir(parents=True, exist_ok=True)
        (trace / str(os.getpid())).write_text(str(os.getpid()))
