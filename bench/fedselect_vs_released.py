"""Speed and memory of our FedSelect against the authors' released code, at equal algorithmic work.

Both implementations train the same setting in one invocation, each in its own child process
(so peak memory is measured separately): CIFAR-10, 10 clients, pathological partition with 2
classes per client, 20 train / 100 test images per class per client, torchvision ResNet-18 with
random init (or ``--model cnn``: our small CNN, handed to the released code as well), a few
rounds. Reported per side: seconds per round (median over the rounds of equal work: not the
first, not the last, the same training passes on both sides; see bench/vs_released_report.py),
training sample passes per round (forward+backward, counted by a forward hook on the model
while autograd is enabled), evaluation forwards per round, peak RSS (VmHWM of the child), and
the released/ours ratios, including seconds per training sample pass.

Schedule, matched to the released code (``fedselect.py``): every round each of the 10 clients
runs ``--local-epochs`` LocalAlt epochs (one pass over its training data updating the personal
entries, then one updating the shared entries), then every client evaluates on its own test
split; every ``--mask-every`` rounds each client grows its mask by ``--p`` of its still-shared
weight entries (released: ``delta_update``; ours: ``algo.mask_search: grow``). Our side runs
``run_experiment``'s pipeline (SimulationFlow under FedMLRunner) without MLflow tracking.
``--device cuda`` runs both sides on the GPU (the released code picks CUDA itself whenever it
is visible; with ``--device cpu``, the default, CUDA is hidden from both children).
``--ours-search gradltn`` runs the paper's GradLTN search on our side instead (more work per
round; compare seconds per sample pass then).

The released repository is never imported from this repo: pass its checkout with
``--released-repo`` or ``$FEDSELECT_RELEASED_REPO``. It runs unmodified; what this script
changes around it at run time (all in the released child process) is listed in
bench/README.md and printed with the results.

Usage (data root as for any run, e.g. FEDSELECT_DATA_ROOT pointing at the folder with cifar10/):

    python bench/fedselect_vs_released.py --released-repo PATH [--rounds 7] [--local-epochs 1]
        [--model resnet18|cnn] [--device cpu|cuda] [--sides both|ours|released] [--profile] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the report module beside this script
from vs_released_report import SIDES, equal_work_rounds, pair_summaries, print_repeats, print_report  # noqa: E402

RELEASED_ENV = "FEDSELECT_RELEASED_REPO"


# ---------------------------------------------------------------- helpers used by the children


def proc_status_kb(key: str) -> int:
    """A ``kB`` field of /proc/self/status (VmRSS, VmHWM), or -1 where there is none."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return -1


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux: write 5 to /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


class PassCounter:
    """Counts samples through the model's forward: with autograd on (a training pass, always
    followed by a backward in both implementations) or off (evaluation). Training forwards made
    while the model is in eval mode (BatchNorm on running statistics) are counted separately."""

    def __init__(self, model: Any) -> None:
        import torch

        self._grad_enabled = torch.is_grad_enabled
        self.train = 0
        self.eval = 0
        self.train_in_eval_mode = 0
        model.register_forward_hook(self._hook)

    def _hook(self, module: Any, inputs: tuple, output: Any) -> None:
        n = int(inputs[0].shape[0])
        if self._grad_enabled():
            self.train += n
            if not module.training:
                self.train_in_eval_mode += n
        else:
            self.eval += n

    def snapshot(self) -> tuple[int, int, int]:
        return self.train, self.eval, self.train_in_eval_mode


def device_sync(device: str) -> Callable[[], None]:
    """What waits for queued GPU work before a clock is read (nothing on the CPU)."""
    if device.startswith("cuda"):
        import torch

        return torch.cuda.synchronize
    return lambda: None


class RoundClock:
    """Round boundaries (time and pass counts) and per-round sub-timings of one implementation.

    ``sync`` runs before every clock read, so GPU work queued before a boundary counts before it.
    """

    def __init__(self, counter: PassCounter, sync: Callable[[], None] = lambda: None) -> None:
        self.counter = counter
        self.sync = sync
        self.marks: list[tuple[float, float, tuple[int, int, int]]] = []
        self.eval_s: list[float] = []
        self.mask_s: dict[int, float] = {}
        self.train_s: dict[int, float] = {}
        self.loss: list[float] = []
        self.acc: list[float] = []

    def mark(self) -> None:
        self.sync()
        self.marks.append((time.perf_counter(), time.process_time(), self.counter.snapshot()))

    @property
    def current_round(self) -> int:
        return max(0, len(self.marks) - 1)

    def add_mask_time(self, seconds: float) -> None:
        self.mask_s[self.current_round] = self.mask_s.get(self.current_round, 0.0) + seconds

    def add_train_time(self, seconds: float) -> None:
        self.train_s[self.current_round] = self.train_s.get(self.current_round, 0.0) + seconds

    def rounds(self) -> list[dict[str, Any]]:
        out = []
        for r, ((t0, cpu0, c0), (t1, cpu1, c1)) in enumerate(zip(self.marks, self.marks[1:], strict=False)):
            out.append({
                "round": r,
                "seconds": t1 - t0,
                "cpu_seconds": cpu1 - cpu0,
                "train_passes": c1[0] - c0[0],
                "eval_passes": c1[1] - c0[1],
                "train_passes_eval_mode": c1[2] - c0[2],
                "eval_seconds": self.eval_s[r] if r < len(self.eval_s) else None,
                "mask_seconds": self.mask_s.get(r, 0.0),
                "train_seconds": self.train_s.get(r, 0.0),
                "other_seconds": (t1 - t0) - self.train_s.get(r, 0.0) - self.mask_s.get(r, 0.0)
                - (self.eval_s[r] if r < len(self.eval_s) else 0.0),
                "train_loss": self.loss[r] if r < len(self.loss) else None,
                "mean_acc": self.acc[r] if r < len(self.acc) else None,
            })
        return out


def device_label(device: Any) -> str:
    """The device a child ran on, with the GPU's name (e.g. 'cuda:0 NVIDIA H100 80GB HBM3')."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return f"{device} {torch.cuda.get_device_name(device)}"
    return str(device)


def profile_text(profiler: Any, top: int = 15) -> str:
    import io
    import pstats

    buf = io.StringIO()
    stats = pstats.Stats(profiler, stream=buf).strip_dirs()
    buf.write(f"--- top {top} by cumulative time ---\n")
    stats.sort_stats("cumulative").print_stats(top)
    buf.write(f"--- top {top} by own (total) time ---\n")
    stats.sort_stats("tottime").print_stats(top)
    buf.write("--- who calls the top 8 by own time ---\n")
    stats.print_callers(8)
    return buf.getvalue()


def our_config(spec: dict[str, Any]) -> Any:
    from fedselect.config import load_config_dict

    # the released code: BatchNorm statistics stay on the client, and every LocalAlt epoch is a
    # full pass over v then a full pass over u
    algo: dict[str, Any] = {"p": spec["p"], "maskable": "weights", "localalt_epoch": "two_passes"}
    if spec["ours_search"] == "grow":
        algo.update(mask_search="grow", grow_every=spec["mask_every"], grow_target=spec["grow_target"])
    else:
        algo.update(mask_search="gradltn", gradltn_iterations=spec["gradltn_iterations"],
                    gradltn_epochs=spec["gradltn_epochs"])
    data: dict[str, Any] = {
        "dataset": "cifar10", "download": False,
        "partition": {"kind": "pathological", "num_clients": spec["clients"], "classes_per_client": 2,
                      "train_per_class": spec["train_per_class"], "test_per_class": spec["test_per_class"]},
    }
    if spec.get("data_root"):
        data["root"] = spec["data_root"]
    return load_config_dict({
        "algorithm": "fedselect", "seed": spec["seed"], "device": spec.get("device", "cpu"), "data": data,
        "model": {"name": spec["model"]},
        "train": {"rounds": spec["rounds"], "local_epochs": spec["local_epochs"], "batch_size": spec["batch_size"],
                  "lr": spec["lr"], "momentum": 0.0, "weight_decay": 0.0, "participation": 1.0, "augment": True,
                  "eval_every": 1, "weighted_aggregation": False, "norm_buffers": "personal"},
        "algo": algo,
        "tracking": {"results_dir": str(Path(spec["work_dir"]) / "ours")},
    }, spec.get("ours_set") or ())


# ---------------------------------------------------------------- children


def child_prep(spec: dict[str, Any]) -> dict[str, Any]:
    """Our data and partition; a torchvision-format CIFAR-10 copy for the released code."""
    import pickle

    import numpy as np

    from fedselect.runner.federation import default_partition_path, get_partition, load_data

    config = our_config(spec)
    data = load_data(config)
    get_partition(config, data)
    out = {"partition_path": str(default_partition_path(config)), "num_classes": data.num_classes,
           "source": data.source}
    if spec["released_repo"]:
        root = Path(spec["work_dir"]) / "torchvision"
        folder = root / "cifar-10-batches-py"
        marker = folder / "source.json"
        ident = {"source": data.source, "train": list(data.train_x.shape), "test": list(data.test_x.shape),
                 "label_sum": [int(data.train_y.sum()), int(data.test_y.sum())]}
        if not marker.exists() or json.loads(marker.read_text()) != ident:
            folder.mkdir(parents=True, exist_ok=True)
            train_x = data.train_x.reshape(len(data.train_x), -1).numpy()
            train_y = data.train_y.tolist()
            per = (len(train_y) + 4) // 5
            for b in range(5):
                batch = {"data": np.ascontiguousarray(train_x[b * per:(b + 1) * per]),
                         "labels": train_y[b * per:(b + 1) * per], "batch_label": f"training batch {b + 1} of 5"}
                with open(folder / f"data_batch_{b + 1}", "wb") as fh:
                    pickle.dump(batch, fh, protocol=4)
            with open(folder / "test_batch", "wb") as fh:
                pickle.dump({"data": data.test_x.reshape(len(data.test_x), -1).numpy(),
                             "labels": data.test_y.tolist(), "batch_label": "testing batch 1 of 1"}, fh, protocol=4)
            with open(folder / "batches.meta", "wb") as fh:
                pickle.dump({"label_names": list(data.classes), "num_cases_per_batch": per,
                             "num_vis": 3072}, fh, protocol=4)
            marker.write_text(json.dumps(ident))
        out["torchvision_root"] = str(root)
    return out


def child_ours(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    t_setup = time.perf_counter()
    from fedselect.fedml_runtime.runtime import (
        build_fedml_args,
        fedml_dataset_tuple,
        fedml_home,
        fedml_sections,
        import_fedml,
    )
    from fedselect.fedml_runtime.simulation import SimulationFlow
    from fedselect.runner.federation import build_federation

    config = our_config(spec)
    device = torch.device(config.device)
    args = build_fedml_args(fedml_sections(config), home=fedml_home(Path(spec["work_dir"]) / "ours"))
    # the same builder as `fedselect run`: data, partition, seeded model, transform, clients, server
    fed = build_federation(config, device, args)
    data, clients, model, trainers, server = fed.data, fed.client_data, fed.model, fed.clients, fed.server

    counter = PassCounter(model)
    sync = device_sync(config.device)
    clock = RoundClock(counter, sync)

    def on_round_end(result: Any) -> None:
        clock.loss.append(result.train_loss)
        clock.acc.append(result.mean_accuracy)
        clock.mark()

    flow = SimulationFlow(args=args, device=device, clients=trainers, server=server, rounds=config.train.rounds,
                          participation=config.train.participation, seed=config.seed, eval_every=1,
                          on_round_end=on_round_end, progress=False)
    evaluate_all = flow.evaluate_all

    def timed_evaluate_all() -> Any:
        sync()
        t = time.perf_counter()
        try:
            return evaluate_all()
        finally:
            sync()
            clock.eval_s.append(time.perf_counter() - t)

    flow.evaluate_all = timed_evaluate_all
    for trainer in trainers:  # the grow variant's mask update (GradLTN's is training: counted in passes)
        if hasattr(trainer, "grow"):

            def timed_grow(grow: Any = trainer.grow) -> Any:
                sync()
                t = time.perf_counter()
                try:
                    return grow()
                finally:
                    sync()
                    clock.add_mask_time(time.perf_counter() - t)

            trainer.grow = timed_grow

        def timed_train_passes(*a: Any, train_passes: Any = trainer.train_passes, **k: Any) -> Any:
            sync()
            t = time.perf_counter()
            try:
                return train_passes(*a, **k)
            finally:
                sync()
                clock.add_train_time(time.perf_counter() - t)

        trainer.train_passes = timed_train_passes

    fedml = import_fedml()
    runner = fedml.FedMLRunner(args, device, fedml_dataset_tuple(clients, data.num_classes), model,
                               algorithm_flow=flow)
    setup_s = time.perf_counter() - t_setup
    hwm_setup = proc_status_kb("VmHWM")
    rss_setup = proc_status_kb("VmRSS")
    reset = reset_peak_rss()
    error = None
    profiler = None
    if spec.get("profile"):
        import cProfile

        profiler = cProfile.Profile()
    clock.mark()
    try:
        if profiler is not None:
            profiler.enable()
        runner.run()
    except Exception as exc:  # a diverged run raises in the server's upload check
        error = f"{type(exc).__name__}: {exc}"
    finally:
        if profiler is not None:
            profiler.disable()
    personal = [t.round_metrics().get("personal_fraction") for t in trainers]
    return {
        "side": "ours", "device": device_label(device),
        "setup_seconds": setup_s, "rss_after_setup_kb": rss_setup, "hwm_setup_kb": hwm_setup,
        "hwm_rounds_kb": proc_status_kb("VmHWM") if reset else None, "hwm_total_kb": max(hwm_setup, proc_status_kb(
            "VmHWM")), "rounds": clock.rounds(), "error": error, "torch_threads": torch.get_num_threads(),
        "final_personal_fraction_mean": statistics.fmean(personal) if personal and None not in personal else None,
        "profile": profile_text(profiler) if profiler is not None else None,
    }


class _FinalEvalSkipped(Exception):
    """Raised in place of the released code's final 10x10 cross-client evaluation."""


def child_released(spec: dict[str, Any], prep: dict[str, Any]) -> dict[str, Any]:
    import importlib.util

    import numpy as np
    import torch
    from torchvision import datasets

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    if spec.get("device", "cpu") == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda, but CUDA is not available to the released code's child")
    t_setup = time.perf_counter()
    build_model = None
    if spec["model"] != "resnet18":  # import ours before their fedselect.py is on sys.path
        from fedselect.models import build_model
    repo = Path(spec["released_repo"]).resolve()
    sys.path.insert(0, str(repo))
    # their fedselect.py would shadow our package of the same name: load it under another name
    module_spec = importlib.util.spec_from_file_location("released_fedselect", repo / "fedselect.py")
    rel = importlib.util.module_from_spec(module_spec)
    sys.modules["released_fedselect"] = rel
    module_spec.loader.exec_module(rel)
    import lottery_ticket
    from utils import train_utils
    from utils.options import lth_args_parser

    argv, sys.argv = sys.argv, sys.argv[:1]
    try:
        args = lth_args_parser()  # their defaults, then the benchmark's setting
    finally:
        sys.argv = argv
    args.seed = spec["seed"]
    args.lr = spec["lr"]
    args.local_bs = spec["batch_size"]
    args.la_epochs = spec["local_epochs"]
    args.com_rounds = spec["rounds"]
    args.lth_epoch_iters = spec["mask_every"]
    args.prune_percent = spec["p"] * 100
    args.prune_target = round(spec["grow_target"] * 100)
    args.clipgradnorm = spec["released_clip"]
    args.num_users, args.frac, args.shard_per_user = spec["clients"], 1.0, 2
    args.num_samples, args.test_size = spec["train_per_class"], spec["test_per_class"]
    args.num_classes = prep["num_classes"]
    args.pretrained_init = False  # no ImageNet download; random init as on our side

    rel.setup_seed(args.seed)
    if spec["model"] == "resnet18":
        model = rel.load_model(args)
    else:
        # as the released load_model does for its ResNet-18: CUDA whenever it is visible
        args.device = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
        model = build_model(spec["model"], args.num_classes).to(args.device)
    if "fc.weight" not in dict(model.named_parameters()):
        # get_mask_from_delta prints eval_layer_sparsity(mask, "fc.weight"): a KeyError for any
        # model whose last layer is not called fc; report the last weight tensor instead
        last = [n for n, _ in model.named_parameters() if n.endswith("weight")][-1]
        original_sparsity = lottery_ticket.eval_layer_sparsity
        lottery_ticket.eval_layer_sparsity = lambda mask, name: original_sparsity(mask, last)

    class LocalCIFAR10(datasets.CIFAR10):
        """torchvision's CIFAR10 on a copy rebuilt from our decoded data (no md5 to match, no download)."""

        train_list = [[name, None] for name, _ in datasets.CIFAR10.train_list]
        test_list = [[name, None] for name, _ in datasets.CIFAR10.test_list]
        meta = {**datasets.CIFAR10.meta, "md5": None}

    dataset_train = LocalCIFAR10(prep["torchvision_root"], train=True, download=False,
                                 transform=train_utils.trans_cifar10_train)
    dataset_test = LocalCIFAR10(prep["torchvision_root"], train=False, download=False,
                                transform=train_utils.trans_cifar10_val)
    partition = json.loads(Path(prep["partition_path"]).read_text())
    dict_users_train = {i: np.asarray(v, dtype=np.int64) for i, v in enumerate(partition["train_indices"])}
    dict_users_test = {i: np.asarray(v, dtype=np.int64) for i, v in enumerate(partition["test_indices"])}
    idxs_users = list(range(spec["clients"]))

    counter = PassCounter(model)
    sync = device_sync(str(args.device))
    clock = RoundClock(counter, sync)
    n_clients = len(idxs_users)
    calls = {"train": 0}
    round_losses: list[float] = []
    original_train = rel.train_personalized

    def train_personalized(*a: Any, **k: Any) -> Any:
        if calls["train"] % n_clients == 0:  # first client of a round: the previous round ended
            if calls["train"]:
                clock.loss.append(statistics.fmean(round_losses))
                round_losses.clear()
            clock.mark()
        calls["train"] += 1
        if spec["released_fix_bn"]:
            a[0].train()  # their model stays in eval mode after the first evaluation
        sync()
        t = time.perf_counter()
        out = original_train(*a, **k)
        sync()
        clock.add_train_time(time.perf_counter() - t)
        round_losses.append(float(out[1]))
        return out

    original_cross = rel.cross_client_eval

    def cross_client_eval(*a: Any, no_cross: bool = True, **k: Any) -> Any:
        if not no_cross:  # after the last round: the final cross-client evaluation
            clock.loss.append(statistics.fmean(round_losses))
            clock.mark()
            if not spec["released_final_eval"]:
                raise _FinalEvalSkipped
        sync()
        t = time.perf_counter()
        out = original_cross(*a, no_cross=no_cross, **k)
        sync()
        if no_cross:
            clock.eval_s.append(time.perf_counter() - t)
            clock.acc.append(float(torch.diag(out).mean()))
        else:
            final_eval["seconds"] = time.perf_counter() - t
        return out

    original_delta = rel.delta_update

    def delta_update(*a: Any, **k: Any) -> Any:
        sync()
        t = time.perf_counter()
        try:
            return original_delta(*a, **k)
        finally:
            sync()
            clock.add_mask_time(time.perf_counter() - t)

    rel.train_personalized = train_personalized
    rel.cross_client_eval = cross_client_eval
    rel.delta_update = delta_update
    final_eval: dict[str, Any] = {"seconds": None}
    result: dict[str, Any] = {}

    setup_s = time.perf_counter() - t_setup
    hwm_setup = proc_status_kb("VmHWM")
    rss_setup = proc_status_kb("VmRSS")
    reset = reset_peak_rss()
    error = None
    profiler = None
    if spec.get("profile_released"):
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    try:
        result = rel.fedselect_algorithm(model, args, dataset_train, dataset_test, dict_users_train,
                                         dict_users_test, np.array([]), idxs_users)
    except _FinalEvalSkipped:
        pass
    except AssertionError as exc:  # MaskLocalAltSGD.step asserts that no parameter is NaN
        error = f"AssertionError in round {clock.current_round}: {exc}"
    finally:
        if profiler is not None:
            profiler.disable()
    masks = result.get("client_masks") if result else None
    return {
        "side": "released", "device": device_label(args.device),
        "setup_seconds": setup_s, "rss_after_setup_kb": rss_setup, "hwm_setup_kb": hwm_setup,
        "hwm_rounds_kb": proc_status_kb("VmHWM") if reset else None, "hwm_total_kb": max(hwm_setup, proc_status_kb(
            "VmHWM")), "rounds": clock.rounds(), "error": error, "torch_threads": torch.get_num_threads(),
        "final_eval_seconds": final_eval["seconds"],
        "final_personal_fraction_mean": None if not masks else statistics.fmean(
            float(sum(m.sum() for m in mask.values()) / sum(m.numel() for m in mask.values()))
            for mask in masks.values() if mask is not None),
        "profile": profile_text(profiler) if profiler is not None else None,
    }


def child_baseline(spec: dict[str, Any]) -> dict[str, Any]:
    """RSS of the bare imports both sides need (torch, torchvision), for reference."""
    import torch
    import torchvision  # noqa: F401

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    return {"rss_kb": proc_status_kb("VmRSS")}


def run_child() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", required=True, choices=("prep", "baseline", "ours", "released"))
    parser.add_argument("--spec", required=True)
    parser.add_argument("--prep")
    parser.add_argument("--out", required=True)
    ns = parser.parse_args()
    spec = json.loads(Path(ns.spec).read_text())
    if ns.child == "prep":
        out = child_prep(spec)
    elif ns.child == "baseline":
        out = child_baseline(spec)
    elif ns.child == "ours":
        out = child_ours(spec)
    else:
        out = child_released(spec, json.loads(Path(ns.prep).read_text()))
    Path(ns.out).write_text(json.dumps(out, default=str))


# ---------------------------------------------------------------- parent


def launch(kind: str, spec_path: Path, work: Path, prep_path: Path | None, label: str,
           device: str = "cpu") -> tuple[dict | None, int, str]:
    """Run one child; returns (its result, its peak RSS in kB from wait4, its log path).

    On ``device`` cpu the child sees no CUDA device (the released code would otherwise take one).
    """
    out = work / f"{label}.json"
    log = work / f"{label}.log"
    out.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", kind, "--spec", str(spec_path), "--out", str(out)]
    if prep_path is not None:
        cmd += ["--prep", str(prep_path)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0 or not out.exists():
        tail = log.read_text(errors="replace").splitlines()[-25:]
        print(f"[{label}] child failed (exit {proc.returncode}); last lines of {log}:", *tail, sep="\n  ")
        return None, usage.ru_maxrss, str(log)
    return json.loads(out.read_text()), usage.ru_maxrss, str(log)


def git_describe(folder: Path) -> str:
    """HEAD of the git checkout holding ``folder`` (+ '-dirty' with uncommitted changes), or 'unknown'."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=folder, capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=folder,
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("-dirty" if dirty else "")


def released_commit(folder: Path) -> str:
    """The released checkout's commit; for an exported copy (no git of its own, e.g. bench/gpu_check's
    .gpu/released) ``$FEDSELECT_RELEASED_COMMIT``, never the commit of a repository around it."""
    try:
        top = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=folder, capture_output=True, text=True,
                             timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        top = ""
    if top and Path(top).resolve() == folder.resolve():
        return git_describe(folder)
    return os.environ.get("FEDSELECT_RELEASED_COMMIT", "unknown (not a git checkout)")


def run_repeats(first: dict[str, dict | None], sides: tuple[str, ...], n: int, spec_path: Path, work: Path,
                prep_path: Path, device: str) -> list[dict[str, dict[str, float | None]]]:
    """Each side's summary in ``n`` runs: the first is the main run, then n - 1 more with the order of
    the sides alternating, so a machine whose speed drifts between runs shows as spread, and the
    median ratio is taken over side-by-side pairs (each pair over its own equal-work rounds)."""
    reps = [pair_summaries(first)]
    for i in range(1, n):
        order = tuple(reversed(sides)) if i % 2 else sides
        print(f"repeat {i + 1}/{n}: {', '.join(order)} ...", flush=True)
        results = {side: launch(side, spec_path, work, prep_path, f"{side}-repeat{i}", device)[0] for side in order}
        reps.append({side: figures for side, figures in pair_summaries(results).items() if side in sides})
    return reps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--released-repo", default=os.environ.get(RELEASED_ENV),
                        help=f"checkout of lapisrocks/fedselect (default: ${RELEASED_ENV})")
    parser.add_argument("--rounds", type=int, default=7,
                        help="rounds per side (7: rounds 2-5 are at equal work, see bench/README.md)")
    parser.add_argument("--local-epochs", type=int, default=1,
                        help="LocalAlt epochs per round, both sides (released la_epochs; ours train.local_epochs)")
    parser.add_argument("--model", choices=("resnet18", "cnn"), default="resnet18")
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--train-per-class", type=int, default=20)
    parser.add_argument("--test-per-class", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--p", type=float, default=0.25, help="mask growth rate (released prune_percent / 100)")
    parser.add_argument("--grow-target", type=float, default=0.8, help="released prune_target / 100")
    parser.add_argument("--mask-every", type=int, default=1,
                        help="grow masks every this many rounds (released lth_epoch_iters; ours algo.grow_every)")
    parser.add_argument("--ours-search", choices=("grow", "gradltn"), default="grow",
                        help="grow: the released schedule (equal work); gradltn: the paper's search (more work)")
    parser.add_argument("--gradltn-iterations", type=int, default=5)
    parser.add_argument("--gradltn-epochs", type=int, default=5)
    parser.add_argument("--no-released-clip", dest="released_clip", action="store_false",
                        help="run the released code without its --clipgradnorm (it may diverge to NaN)")
    parser.add_argument("--released-fix-bn", action="store_true",
                        help="put the released model back in training mode before each client's training "
                             "(its BatchNorm otherwise stays in eval mode after the first evaluation)")
    parser.add_argument("--released-final-eval", action="store_true",
                        help="also run the released code's final 10x10 cross-client evaluation (timed apart)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="where both sides train: cpu (CUDA hidden from both children) or cuda (both on the GPU)")
    parser.add_argument("--sides", choices=("both", "ours", "released"), default="both")
    parser.add_argument("--ours-set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for our side only, e.g. train.precision=bf16 (repeatable); "
                             "the comparison is then no longer at equal arithmetic")
    parser.add_argument("--order", choices=("released-first", "ours-first"), default="released-first")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeat", type=int, default=1,
                        help="run both sides this many times (their order alternating) and print each run's "
                             "ratio and the median: on a machine whose speed drifts, one pair can mislead")
    parser.add_argument("--threads", type=int, default=None, help="torch threads in each child (default: torch's)")
    parser.add_argument("--data-root", default=None, help="data root (default: $FEDSELECT_DATA_ROOT, else ./data)")
    parser.add_argument("--work-dir", default=str(Path(tempfile.gettempdir()) / "fedselect-bench"),
                        help="scratch folder: partition, torchvision-format copy, child logs")
    parser.add_argument("--profile", action="store_true",
                        help="after the timed runs, run our side again under cProfile and print the top 15")
    parser.add_argument("--profile-released", action="store_true", help="likewise for the released code")
    parser.add_argument("--json", default=None, help="write all figures to this JSON file")
    ns = parser.parse_args()

    sides = SIDES if ns.sides == "both" else (ns.sides,)
    if ns.order == "ours-first":
        sides = tuple(reversed(sides))
    if ns.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            parser.error("--device cuda: CUDA is not available here")
    if ("released" in sides or ns.profile_released) and not ns.released_repo:
        parser.error(f"the released code's checkout is needed: --released-repo or ${RELEASED_ENV}")
    if ns.repeat < 1:
        parser.error(f"--repeat must be >= 1, got {ns.repeat}")
    if ns.released_repo and not (Path(ns.released_repo) / "fedselect.py").is_file():
        parser.error(f"no fedselect.py in {ns.released_repo}")
    work = Path(ns.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    spec = {k: getattr(ns, k) for k in ("rounds", "local_epochs", "model", "clients", "train_per_class",
                                        "test_per_class", "batch_size", "lr", "p", "grow_target", "mask_every",
                                        "ours_search", "gradltn_iterations", "gradltn_epochs", "released_clip",
                                        "released_final_eval", "released_fix_bn", "seed", "threads", "data_root",
                                        "sides", "device", "ours_set")}
    spec.update(work_dir=str(work.resolve()),
                released_repo=str(Path(ns.released_repo).resolve()) if ns.released_repo else None)
    spec["ours_commit"] = git_describe(Path(__file__).resolve().parent)
    spec["released_commit"] = released_commit(Path(ns.released_repo)) if ns.released_repo else None
    spec_path = work / "spec.json"
    spec_path.write_text(json.dumps(spec))

    print("preparing data and partition ...", flush=True)
    prep, _, _ = launch("prep", spec_path, work, None, "prep")
    if prep is None:
        sys.exit(1)
    prep_path = work / "prep.json"
    baseline, _, _ = launch("baseline", spec_path, work, None, "baseline")
    spec["baseline_rss_kb"] = baseline["rss_kb"] if baseline else None
    results: dict[str, dict | None] = {}
    maxrss: dict[str, int] = {}
    for side in sides:
        print(f"running {side} ({ns.rounds} rounds) ...", flush=True)
        t = time.perf_counter()
        results[side], maxrss[side], log = launch(side, spec_path, work, prep_path, side, ns.device)
        print(f"  {side} done in {time.perf_counter() - t:.0f} s (log: {log})", flush=True)
    print_report(spec, results, maxrss)
    repeats = None
    if ns.repeat > 1:
        reps = run_repeats(results, sides, ns.repeat, spec_path, work, prep_path, ns.device)
        repeats = {"runs": reps, **(print_repeats(reps) if set(sides) == set(SIDES) else {})}

    profiles = {}
    for side, wanted in (("ours", ns.profile), ("released", ns.profile_released)):
        if not wanted:
            continue
        prof_spec = {**spec, "profile": side == "ours", "profile_released": side == "released"}
        prof_path = work / f"spec-profile-{side}.json"
        prof_path.write_text(json.dumps(prof_spec))
        print(f"\nprofiling {side} under cProfile ({ns.rounds} rounds; times inflated by the profiler) ...",
              flush=True)
        res, _, _ = launch(side, prof_path, work, prep_path, f"profile-{side}", ns.device)
        if res and res.get("profile"):
            profiles[side] = res["profile"]
            print(res["profile"])
    if ns.json:
        Path(ns.json).write_text(json.dumps({"spec": spec, "results": results, "wait4_maxrss_kb": maxrss,
                                             "equal_work_rounds": equal_work_rounds(results),
                                             "summary": pair_summaries(results),
                                             "repeats": repeats, "profiles": profiles}, indent=2, default=str))


if __name__ == "__main__":
    if "--child" in sys.argv:
        run_child()
    else:
        main()
