"""fedselect: selective fine-tuning in federated learning, as a FedML plugin."""

from fedselect._version import __version__

__all__ = ["__version__"]
