"""Estimated cost of a whole study on one device, from a few measured rounds of each run.

    python bench/study_cost.py --study fedselect_table1 --device cuda --set model.weights=null

Method. Each selected run of the study (one seed: every seed is assumed to cost the same) is
executed with `fedselect run` in a child process for K rounds, checkpoints off, into a temporary
results dir (own MLflow store), eval_every unchanged. Each round's metrics are logged with a
timestamp taken when the round ended, evaluation included (fedselect.runner.record.RoundLogger); the
start of round 0 is not observable. So:
  s/round   = (t_end(b) - t_end(a-1)) / (b - a + 1) over a window of rounds a..b (a >= 1);
  s per run = (t_end(a-1) - process start) + (process end - t_end(K-1)) + (R - a) * s/round,
where R is the study's number of rounds: process start-up (imports, data load, partition, model
build), round 0 and any warm-up rounds before a are counted as measured, the rest as steady
rounds. "start-up s" in the table is s per run - R * s/round (start-up + teardown + the warm-up
rounds' difference from a steady round). Study total = sum over runs of s per run x seeds;
with --parallel-jobs J it is simply divided by J (assumes J jobs share the device without
slowing each other down, which is optimistic).

Periodic schedules. The window must hold whole periods of every periodic cost, else it
misrepresents them: evaluation (train.eval_every), FedSelect's GradLTN (algo.search_every, on
every n-th participation) and growth (algo.grow_every). The window is the largest whole
number of periods starting at round a = 1, or for growth at the first round after the first
growth (before it the personal pass is empty and skipped). The last measured round is left out
of the window: a run always evaluates after its last round, eval_every or not. The default K
is the smallest that fits one period (at least 5); a smaller --rounds gives a window that is
marked "partial" (it then ends at round K-2, or is round 1 alone when K = 2, which includes
the forced evaluation). Periods count rounds: exact with train.participation = 1.

No-tracking mode (--no-tracking; needs no MLflow). Each measurement child builds the run's
federation as `fedselect run` does (fedselect.runner.federation.build_federation, FedML args,
the SimulationFlow under FedMLRunner) and stamps every round's end itself (on_round_end, after
a CUDA synchronize), without MLflow or a run record. It waits at a start line once its
federation is built, so the start of round 0 is observable: s per run = start-up (launch to
federation built) + (t_end(a-1) - start of round 0) + (R - a) * s/round. Rounds run open-ended
(the study's R), so no measured round is a forced last evaluation; a child is stopped once it
has measured K rounds (default K: the smallest holding one whole period, at least 5). Not
counted in this mode: MLflow's per-round logging and the end-of-run record.

Several jobs on one device (--concurrent J1,J2,...; implies --no-tracking). For each J, J
children share the device at once: the selected runs, cycled to fill J slots (J = 1: each run
alone, one after the other). All J pass the start line together, and all are stopped together
once every one has measured K rounds (or the time share of that J under --deadline-s is spent:
then the windows are what fitted, marked partial; J = 1 gets n_runs/2 shares, any other J one,
of the time left, and unused time passes on). So every measured round ran with J jobs on
the device. Reported per J: each run's s/round and s per run under that sharing (the mean over
its copies), the mix throughput in run-rounds per second (n_runs * J / sum of the runs' s/round:
J jobs progressing at the runs' mean pace) and, for the study, the projected total with J jobs
per device = sum over the study's runs of s per run(J) x seeds / J. Study runs that were not
measured are costed with a measured run named by --proxy RUN=MEASURED (listed as such); the
projection for the whole study is printed when every run is measured or proxied.

Not measured: checkpoint saves (train.checkpoint_every of the study) and the Snakemake
workflow's own overhead. Training sample passes per round (all clients) are the measured
rounds' mean from the run record (`train_sample_passes_total`); a periodic search makes the
mean depend on K. Pretrained weights cost the same as random init: pass --set model.weights=null
where the weights are not available offline.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fedselect.config import ConfigError, ExperimentConfig, load_config_dict
from fedselect.study import Study, StudyError, load_study, run_config, write_run_config
from fedselect.tracking import with_retry

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the module beside this script
from study_cost_waves import measure_concurrency, parse_proxies, report_concurrency, tail  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MIN_ROUNDS = 5


@dataclass
class RunCost:
    run: str
    rounds_measured: int
    rounds_study: int
    window: tuple[int, int]
    whole_periods: bool
    seconds_per_round: float
    startup_seconds: float
    seconds_per_run: float
    wall_seconds: float
    device: str
    # rounds 1..K-1, from round-end timestamps (round 0's start is not observable)
    round_seconds: list[float]
    # training sample passes (forward + backward) of all clients per measured round, from the
    # run record (mask search and layer scoring included; docs/ALGORITHMS.md, "Local work")
    passes_per_round: float | None = None


def resolve_study(name: str) -> Study:
    path = Path(name)
    if path.suffix not in (".yaml", ".yml"):  # a bare name, as Snakemake's --config study=NAME
        path = REPO / "configs" / f"{name}.yaml"
    try:
        return load_study(path)
    except StudyError as exc:
        raise SystemExit(f"--study {name!r}: {exc}") from None


def steady_schedule(config: ExperimentConfig) -> tuple[int, int]:
    """(period, first steady round): every periodic cost repeats each `period` rounds from there."""
    from fedselect.registry import validate_algorithm_options

    periods, first = [config.train.eval_every], 1
    options = validate_algorithm_options(config.algorithm, config.algo)
    search = getattr(options, "mask_search", None)
    if search == "gradltn":
        periods.append(options.search_every)
    elif search == "grow":
        periods.append(options.grow_every)
        # the first growth ends participation max(1, e-1) (FedSelectClient.grow); until then no personal pass
        first = max(2, options.grow_every)
    return math.lcm(*periods), first


def window(k: int, period: int, first: int) -> tuple[int, int, bool]:
    """Rounds a..b whose durations give the steady s/round, and whether they are whole periods."""
    last = k - 2  # round k-1 evaluates whatever eval_every says
    periods = (last - first + 1) // period
    if periods >= 1:
        return first, first + periods * period - 1, True
    return 1, max(1, last), False


def round_ends(record: dict[str, Any]) -> list[float]:
    """Epoch seconds at which each round ended (RoundLogger stamps every round's metrics)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(record["tracking_uri"])
    history = with_retry("metric history", client.get_metric_history, record["mlflow_run_id"], "train_loss")
    ends = {int(m.step): m.timestamp / 1000 for m in history}
    missing = [r for r in range(record["rounds"]) if r not in ends]
    if missing:
        raise RuntimeError(f"no train_loss timestamp for rounds {missing}")
    return [ends[r] for r in range(record["rounds"])]


def measure(study: Study, run: str, seed: int, config: ExperimentConfig, k: int | None, ns: argparse.Namespace,
            work: Path) -> RunCost:
    period, first = steady_schedule(config)
    k = k or max(MIN_ROUNDS, first + period + 1)
    results = work / "results"  # shared by the runs: later runs reuse the cached partition, as in the study
    cfg, record_path, log = work / f"{run}.yaml", work / f"{run}.json", work / f"{run}.log"
    write_run_config(study, run, seed, cfg, results_dir=str(results))
    forced = [f"train.rounds={k}", "train.checkpoint_every=0", f"tracking.results_dir={results}",
              "tracking.tracking_uri=null", f"device={ns.device}"]
    cmd = [sys.executable, "-m", "fedselect.cli", "run", "--config", str(cfg), "--out", str(record_path),
           "--no-progress", *[a for s in [*ns.set, *forced] for a in ("--set", s)]]
    env = {key: v for key, v in os.environ.items() if key != "MLFLOW_TRACKING_URI"}  # keep the user's store clean
    print(f"measuring {run}: {k} rounds ...", file=sys.stderr, flush=True)
    start = time.time()
    with log.open("w") as out:
        rc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO).returncode
    end = time.time()
    if rc != 0:
        raise RuntimeError(f"`fedselect run` for {run!r} exited with {rc}; last lines of its log:\n{tail(log)}")
    record = json.loads(record_path.read_text())
    t = round_ends(record)
    a, b, whole = window(k, period, first)
    per_round = (t[b] - t[a - 1]) / (b - a + 1)
    rounds = config.train.rounds
    per_run = (t[a - 1] - start) + (end - t[-1]) + max(rounds - a, 0) * per_round
    return RunCost(run=run, rounds_measured=k, rounds_study=rounds, window=(a, b), whole_periods=whole,
                   seconds_per_round=per_round, startup_seconds=per_run - rounds * per_round,
                   seconds_per_run=per_run, wall_seconds=end - start, device=record["device"],
                   round_seconds=[round(y - x, 3) for x, y in zip(t[:-1], t[1:], strict=True)],
                   passes_per_round=(record["train_sample_passes_total"] / k
                                     if "train_sample_passes_total" in record else None))


# ---------------------------------------------------------------- no-tracking mode: the child


class _Stop(Exception):
    """Raised from on_round_end when the child has measured what it was asked for."""


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Readers (the parent polls progress files) see the old or the new file, never half of one."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def wait_for(path: Path, timeout_s: float) -> bool:
    """Poll until ``path`` exists; False on timeout."""
    end = time.time() + timeout_s
    while not path.exists():
        if time.time() > end:
            return False
        time.sleep(0.01)
    return True


def run_child(job_path: Path) -> int:
    """One measurement child: build the run's federation, wait at the start line, run and stamp rounds.

    Progress (ready time, start of round 0, every round's end and sample passes) is rewritten after
    every round, so the parent can stop the child at any time and still read what it measured.
    """
    job = json.loads(job_path.read_text())
    progress_path = Path(job["progress"])
    progress: dict[str, Any] = {"launched": job["launched"], "ends": [], "passes": [], "error": None}
    try:
        import torch

        torch.set_num_threads(job["threads"])
        from fedselect.engine import resolve_device
        from fedselect.fedml_bridge import import_fedml
        from fedselect.fedml_runtime.runtime import build_fedml_args, fedml_dataset_tuple, fedml_home, fedml_sections
        from fedselect.fedml_runtime.simulation import SimulationFlow
        from fedselect.runner.federation import build_federation, resolve_algorithm

        config = load_config_dict(job["mapping"], job["overrides"])
        algorithm = resolve_algorithm(config)
        device = resolve_device(config.device)
        results = Path(config.tracking.results_dir)
        results.mkdir(parents=True, exist_ok=True)
        args = build_fedml_args(fedml_sections(config), home=fedml_home(results))
        fed = build_federation(config, device, args, algorithm=algorithm)
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        progress.update(ready=time.time(), device=device_label(device), threads=torch.get_num_threads(),
                        fedml=getattr(import_fedml(), "__version__", "?"))
        write_json_atomic(progress_path, progress)
        if not wait_for(Path(job["go"]), job["go_timeout_s"]):
            raise RuntimeError("no start signal from the parent")

        def on_round_end(result: Any) -> None:
            sync()
            progress["ends"].append(time.time())
            progress["passes"].append(sum(m.get("train_sample_passes", 0.0) for m in result.client_metrics.values()))
            if config.train.client_batching:  # that the clients' calls did train in batches
                progress["batching"] = dict(flow.batching)
            write_json_atomic(progress_path, progress)
            if job["stop_after"] and len(progress["ends"]) >= job["stop_after"]:
                raise _Stop

        flow = SimulationFlow(args=args, device=fed.device, clients=fed.clients, server=fed.server,
                              rounds=config.train.rounds, participation=config.train.participation, seed=config.seed,
                              eval_every=config.train.eval_every, on_round_end=on_round_end, progress=False,
                              batch_clients=config.train.client_batching,
                              batch_max_clients=config.train.client_batch_max)
        dataset = fedml_dataset_tuple(fed.client_data, fed.data.num_classes)
        runner = import_fedml().FedMLRunner(args, fed.device, dataset, fed.model, algorithm_flow=flow)
        progress["go"] = time.time()
        write_json_atomic(progress_path, progress)
        with contextlib.suppress(_Stop):
            runner.run()
    except Exception as exc:
        import traceback

        traceback.print_exc()
        progress["error"] = f"{type(exc).__name__}: {exc}"
        write_json_atomic(progress_path, progress)
        return 1
    progress["finished"] = time.time()
    write_json_atomic(progress_path, progress)
    return 0


def device_label(device: Any) -> str:
    import torch

    device = torch.device(device)
    return f"{device} {torch.cuda.get_device_name(device)}" if device.type == "cuda" else str(device)


def device_name(device: str) -> tuple[str, int]:
    """The accelerator's or CPU's model name, and torch's intra-op threads (the children inherit the env)."""
    import torch

    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        return torch.cuda.get_device_name(0), torch.get_num_threads()
    models = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
              if line.startswith("model name")] if Path("/proc/cpuinfo").exists() else []
    return f"CPU: {models[0] if models else 'unknown'} ({os.cpu_count()} logical cores)", torch.get_num_threads()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", required=True, help="study name (configs/NAME.yaml) or path to a study YAML")
    parser.add_argument("--rounds", type=int, help=f"measured rounds K per run (>= 2; default: the smallest K whose "
                        f"window holds one whole period of the run's periodic schedule, at least {MIN_ROUNDS})")
    parser.add_argument("--device", choices=["cpu", "cuda", "auto"], default="auto", help="device of the runs")
    parser.add_argument("--runs", help="comma-separated subset of the study's runs (default: all)")
    parser.add_argument("--seed", type=int, help="the seed measured (default: the study's first); the cost is "
                        "assumed equal for every seed")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="passed to `fedselect run` (repeatable); also counts for the study's rounds")
    parser.add_argument("--parallel-jobs", type=int, default=1, metavar="J",
                        help="MLflow mode: also print the total divided by J (assumes no slowdown; "
                             "--concurrent measures it)")
    parser.add_argument("--no-tracking", action="store_true",
                        help="measure in children that stamp rounds themselves (no MLflow, no run record)")
    parser.add_argument("--concurrent", default=None, metavar="J1,J2,...",
                        help="measure with J jobs sharing the device at once, for each J (implies --no-tracking)")
    parser.add_argument("--deadline-s", type=float, default=None,
                        help="no-tracking: stop measuring after this many seconds in all, shared between the J "
                             "levels (windows cut short are marked partial)")
    parser.add_argument("--threads", type=int, default=None,
                        help="no-tracking: torch threads per child (default: the CPU cores / J)")
    parser.add_argument("--proxy", action="append", default=[], metavar="RUN=MEASURED",
                        help="cost an unmeasured study run as a measured one in the whole-study projection "
                             "(repeatable or comma-separated)")
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="keep the children's configs, progress files and logs here (default: a temporary dir)")
    parser.add_argument("--out-json", type=Path, help="write every figure here")
    ns = parser.parse_args(argv)
    if ns.rounds is not None and ns.rounds < 2:
        parser.error("--rounds must be >= 2 (the per-round time is taken between round ends)")
    if ns.parallel_jobs < 1:
        parser.error("--parallel-jobs must be >= 1")
    try:
        ns.levels = [int(j) for j in ns.concurrent.split(",")] if ns.concurrent else [1]
    except ValueError:
        parser.error(f"--concurrent: comma-separated job counts, got {ns.concurrent!r}")
    if any(j < 1 for j in ns.levels):
        parser.error("--concurrent: every J must be >= 1")
    ns.no_tracking = ns.no_tracking or ns.concurrent is not None
    return ns


def main(argv: list[str] | None = None) -> int:
    ns = parse_args(argv)
    study = resolve_study(ns.study)
    runs = ns.runs.split(",") if ns.runs else study.run_names()
    unknown = [r for r in runs if r not in study.runs]
    if unknown:
        raise SystemExit(f"--runs: study {study.name!r} has no run {', '.join(map(repr, unknown))} "
                         f"(runs: {', '.join(study.run_names())})")
    seed = study.seeds[0] if ns.seed is None else ns.seed
    try:  # every config is checked before anything runs; the study's schedule with the user's overrides
        configs = {r: load_config_dict(run_config(study, r, seed), ns.set) for r in runs}
    except (ConfigError, StudyError) as exc:
        raise SystemExit(f"error: {exc}") from None
    name, threads = device_name(ns.device)
    with tempfile.TemporaryDirectory(prefix="study-cost-") as tmp:
        work = ns.work_dir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        if ns.no_tracking:
            return main_no_tracking(ns, study, runs, seed, configs, name, work)
        return main_tracking(ns, study, runs, seed, configs, name, threads, work)


def main_no_tracking(ns: argparse.Namespace, study: Study, runs: list[str], seed: int,
                     configs: dict[str, ExperimentConfig], name: str, work: Path) -> int:
    """Every J level of --concurrent, measured by no-tracking children; the whole-study projection."""
    proxies = parse_proxies(ns.proxy, study)
    forced = ["train.checkpoint_every=0", "tracking.tracking_uri=null", f"device={ns.device}"]
    setup = {r: (run_config(study, r, seed), [*ns.set, *forced]) for r in runs}
    schedules = {}
    for run in runs:
        period, first = steady_schedule(configs[run])
        schedules[run] = (ns.rounds or max(MIN_ROUNDS, first + period), period, first)
    rounds_study = {run: configs[run].train.rounds for run in runs}
    costs, failed, walls = measure_concurrency(runs, ns.levels, setup, schedules, rounds_study, ns, work)
    seeds = len(study.seeds)
    print(f"\nstudy {study.name}: {len(runs)} of {len(study.runs)} runs x {seeds} seeds; measured seed {seed}")
    print(f"device: {name}; mode: no-tracking children (no MLflow); J levels {ns.levels}")
    summary = report_concurrency(study, costs, walls, proxies, seeds)
    for label, why in failed.items():
        print(f"FAILED {label}: {why}", file=sys.stderr)
    if ns.out_json:
        ns.out_json.parent.mkdir(parents=True, exist_ok=True)
        ns.out_json.write_text(json.dumps({
            "study": study.name, "seed_measured": seed, "seeds": seeds, "device_name": name, "mode": "no-tracking",
            "runs_measured": runs, "rounds_wanted": {r: schedules[r][0] for r in runs}, "levels": ns.levels,
            "deadline_s": ns.deadline_s, "overrides": ns.set, "proxies": proxies, "failed": failed, **summary},
            indent=2))
    return 1 if failed else 0


def main_tracking(ns: argparse.Namespace, study: Study, runs: list[str], seed: int,
                  configs: dict[str, ExperimentConfig], name: str, threads: int, work: Path) -> int:
    """The MLflow mode: `fedselect run` children, round ends read back from the MLflow store."""
    costs: list[RunCost] = []
    failed: dict[str, str] = {}
    for run in runs:
        try:
            costs.append(measure(study, run, seed, configs[run], ns.rounds, ns, work))
        except (RuntimeError, OSError, KeyError, ValueError) as exc:
            failed[run] = str(exc)
            print(f"FAILED {run}: {exc}", file=sys.stderr)

    seeds = len(study.seeds)
    print(f"\nstudy {study.name}: {len(runs)} of {len(study.runs)} runs x {seeds} seeds; measured seed {seed}")
    print(f"device: {name}; torch threads {threads} (OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')})")
    header = f"{'run':<18} {'K/R rounds':>10} {'window':>9} {'s/round':>9} {'start-up s':>10} " \
             f"{'s per run':>10} {f'x {seeds} seeds':>10} {'passes/round':>12}"
    print(header + "\n" + "-" * len(header))
    for c in costs:
        win = f"{c.window[0]}-{c.window[1]}" + ("" if c.whole_periods else "*")
        print(f"{c.run:<18} {f'{c.rounds_measured}/{c.rounds_study}':>10} {win:>9} {c.seconds_per_round:>9.2f} "
              f"{c.startup_seconds:>10.1f} {c.seconds_per_run:>10.0f} {c.seconds_per_run * seeds:>10.0f} "
              f"{'' if c.passes_per_round is None else f'{c.passes_per_round:.0f}':>12}")
    if any(not c.whole_periods for c in costs):
        print("* partial window: fewer rounds than one whole period of the run's schedule (see --help)")
    total = sum(c.seconds_per_run for c in costs) * seeds
    label = "total" if not failed else f"total of the {len(costs)} measured runs ({len(failed)} FAILED)"
    print(f"{label}, sequential: {total / 3600:.2f} h ({total:.0f} s)")
    if ns.parallel_jobs > 1:
        print(f"{label}, {ns.parallel_jobs} parallel jobs (sequential / {ns.parallel_jobs}, assumes no slowdown): "
              f"{total / ns.parallel_jobs / 3600:.2f} h")
    if ns.out_json:
        ns.out_json.parent.mkdir(parents=True, exist_ok=True)
        ns.out_json.write_text(json.dumps({
            "study": study.name, "seed_measured": seed, "seeds": seeds, "device_name": name, "torch_threads": threads,
            "runs": [asdict(c) for c in costs], "failed": failed, "total_seconds": total,
            "parallel_jobs": ns.parallel_jobs, "total_hours_parallel": total / ns.parallel_jobs / 3600}, indent=2))
    return 1 if failed else 0



if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        sys.exit(run_child(Path(sys.argv[2])))
    sys.exit(main())
