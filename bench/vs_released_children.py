"""The child processes of bench/fedselect_vs_released.py: data preparation, our side, the released
code's side (loaded and run unmodified, with what is changed around it at run time), and the
bare-import baseline. Each returns a JSON-safe dict of its figures."""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from vs_released_measure import (
    ChildFigures,
    PassCounter,
    RoundClock,
    device_label,
    device_sync,
    proc_status_kb,
    profiled,
    timed,
    timed_around,
)


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
    if config.train.client_batching:
        # the pass counter hooks the shared module and the part timers follow one client at a time;
        # batched clients train in threads on model copies (bench/study_cost.py measures that mode)
        raise SystemExit("vs_released: train.client_batching is not measured here; use bench/study_cost.py")
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
    flow.evaluate_all = timed(flow.evaluate_all, sync, clock.eval_s.append)
    for trainer in trainers:  # the mask update: growth, or GradLTN's search less its training calls
        if hasattr(trainer, "grow"):
            trainer.grow = timed(trainer.grow, sync, clock.add_mask_time)
            trainer.run_gradltn = timed_around(trainer.run_gradltn, sync, lambda: clock.train_total,
                                               clock.add_mask_time)
        trainer.train_passes = timed(trainer.train_passes, sync, clock.add_train_time)

    fedml = import_fedml()
    runner = fedml.FedMLRunner(args, device, fedml_dataset_tuple(clients, data.num_classes), model,
                               algorithm_flow=flow)
    figures = ChildFigures(t_setup)
    error = None
    clock.mark()
    with profiled(bool(spec.get("profile"))) as profiler:
        try:
            runner.run()
        except Exception as exc:  # a diverged run raises in the server's upload check
            error = f"{type(exc).__name__}: {exc}"
    personal = [t.round_metrics().get("personal_fraction") for t in trainers]
    return {
        **figures.report("ours", device_label(device), clock, error, torch.get_num_threads(), profiler,
                         spec.get("profile_stats")),
        "final_personal_fraction_mean": statistics.fmean(personal) if personal and None not in personal else None,
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

    rel.train_personalized = train_personalized
    rel.cross_client_eval = cross_client_eval
    rel.delta_update = timed(rel.delta_update, sync, clock.add_mask_time)
    final_eval: dict[str, Any] = {"seconds": None}
    result: dict[str, Any] = {}

    figures = ChildFigures(t_setup)
    error = None
    with profiled(bool(spec.get("profile_released"))) as profiler:
        try:
            result = rel.fedselect_algorithm(model, args, dataset_train, dataset_test, dict_users_train,
                                             dict_users_test, np.array([]), idxs_users)
        except _FinalEvalSkipped:
            pass
        except AssertionError as exc:  # MaskLocalAltSGD.step asserts that no parameter is NaN
            error = f"AssertionError in round {clock.current_round}: {exc}"
    masks = result.get("client_masks") if result else None
    return {
        **figures.report("released", device_label(args.device), clock, error, torch.get_num_threads(), profiler,
                         spec.get("profile_stats")),
        "final_eval_seconds": final_eval["seconds"],
        "final_personal_fraction_mean": None if not masks else statistics.fmean(
            float(sum(m.sum() for m in mask.values()) / sum(m.numel() for m in mask.values()))
            for mask in masks.values() if mask is not None),
    }


def child_baseline(spec: dict[str, Any]) -> dict[str, Any]:
    """RSS of the bare imports both sides need (torch, torchvision), for reference."""
    import torch
    import torchvision  # noqa: F401

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    return {"rss_kb": proc_status_kb("VmRSS")}
