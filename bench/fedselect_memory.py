"""Peak memory of FedSelect's per-client state with many clients, side by side with full model copies.

    python bench/fedselect_memory.py --clients 100 --model resnet18 --p 0.5

Each variant runs in its own subprocess so peak RSS (VmHWM) is its own:
  ours       100 FedSelect clients sharing one nn.Module; each keeps its personal values (1-D) and a
             bit-packed mask; one federated round (GradLTN + LocalAlt) on tiny synthetic data.
  full-copy  the same clients, but each also holds a full model state copy (what an implementation that
             keeps one model per client stores), to show what the packed state saves.
Prints peak RSS of each, the bytes of client state, and the ratio.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def child(ns: argparse.Namespace) -> None:
    sys.path.insert(0, str(REPO))
    import torch

    from fedselect.config import load_config_dict
    from fedselect.engine import ImageTransform
    from fedselect.fedml_runtime.runtime import build_fedml_args, fedml_sections
    from fedselect.fedml_runtime.simulation import SimulationFlow
    from fedselect.models import build_model
    from fedselect.runner.federation import build_participants
    from tests.conftest import synthetic_clients

    torch.set_num_threads(2)
    algo = {"p": ns.p, "gradltn_iterations": 2, "gradltn_epochs": 1}
    config = load_config_dict({"algorithm": "fedselect", "device": "cpu", "algo": algo,
                               "data": {"partition": {"num_clients": ns.clients}},
                               "train": {"rounds": 1, "local_epochs": 1, "batch_size": 8, "augment": False}})
    clients = synthetic_clients(ns.clients, n_train=8, n_test=4, size=32)
    args = build_fedml_args(fedml_sections(config))
    torch.manual_seed(0)
    model = build_model(ns.model, 3)
    # synthetic images: their own fixed normalization, no pretrained statistics to respect
    _, trainers, server = build_participants(config, model, clients, device=torch.device("cpu"), args=args,
                                             transform=ImageTransform((0.5,) * 3, (0.25,) * 3, augment=False))
    copies = []
    if ns.variant == "full-copy":
        copies = [{k: v.clone() for k, v in model.state_dict().items()} for _ in trainers]
    start = time.time()
    SimulationFlow(args=args, device="cpu", clients=trainers, server=server, rounds=1, participation=1.0, seed=0,
                   progress=False).run()
    model_bytes = sum(v.numel() * v.element_size() for v in model.state_dict().values())
    state_bytes = sum(t.personal_state_nbytes() for t in trainers)
    copy_bytes = sum(sum(v.numel() * v.element_size() for v in c.values()) for c in copies)
    print(json.dumps({"variant": ns.variant, "peak_rss_mb": peak_rss_mb(), "model_mb": model_bytes / 2**20,
                      "client_state_mb": (state_bytes + copy_bytes) / 2**20, "round_seconds": time.time() - start}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--model", default="cnn", choices=["cnn", "resnet18"])
    parser.add_argument("--p", type=float, default=0.5, help="FedSelect personalization rate")
    parser.add_argument("--variant", choices=["ours", "full-copy"], help=argparse.SUPPRESS)
    ns = parser.parse_args()
    if ns.variant:
        child(ns)
        return
    rows = []
    for variant in ("ours", "full-copy"):
        cmd = [sys.executable, __file__, "--variant", variant, "--clients", str(ns.clients), "--model", ns.model,
               "--p", str(ns.p)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=REPO)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"FedSelect client state, {ns.clients} clients, {ns.model}, p={ns.p}")
    print(f"{'variant':<10} {'peak RSS MB':>12} {'client state MB':>16} {'model MB':>9} {'round s':>8}")
    for r in rows:
        print(f"{r['variant']:<10} {r['peak_rss_mb']:>12.0f} {r['client_state_mb']:>16.1f} {r['model_mb']:>9.1f} "
              f"{r['round_seconds']:>8.1f}")
    ours, full = rows
    print(f"peak RSS ratio full-copy / ours: {full['peak_rss_mb'] / ours['peak_rss_mb']:.2f}x; "
          f"client state per client: {ours['client_state_mb'] / ns.clients:.2f} MB (ours) vs "
          f"{full['client_state_mb'] / ns.clients:.2f} MB (with full copies)")


if __name__ == "__main__":
    main()
