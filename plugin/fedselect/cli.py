"""The ``fedselect`` command line: run, partition, algorithms."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from fedselect import __version__
from fedselect.config import ConfigError

EPILOG = """
examples:
  fedselect algorithms
  fedselect run --config configs/smoke.yaml --set train.rounds=3 --set algorithm=local --out run.json
  fedselect partition --config configs/smoke.yaml --out results/partitions/p.json

Data: data.root in the config, else $FEDSELECT_DATA_ROOT, else ./data. Here, point it at the
offline copy: export FEDSELECT_DATA_ROOT=../shared/data. Elsewhere, with network access,
torchvision downloads CIFAR-10/100, MNIST or FashionMNIST into the root on first use.
Tracking: MLflow, sqlite store in <tracking.results_dir>/mlflow.db unless $MLFLOW_TRACKING_URI
is set; open it with `mlflow ui --backend-store-uri sqlite:///results/mlflow.db`.
"""


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, type=Path, help="experiment YAML (see configs/)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, dotted, value in YAML syntax; repeatable "
                             "(e.g. --set train.lr=0.05 --set algorithm=local)")


def _add_plugin_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--plugin", action="append", default=[], metavar="MODULE",
                        help="import MODULE first (it registers extra algorithms); repeatable")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedselect", description="Selective fine-tuning in federated learning, "
                                     "as FedML algorithms, with MLflow tracking.", epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"fedselect {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="train one configured run (FedML single-process simulation)",
                         description="Train one run: load data, partition (cached), build the model, run the "
                                     "registered algorithm through FedMLRunner, log every round to MLflow, and "
                                     "write a run record JSON.")
    _add_config_args(run)
    _add_plugin_arg(run)
    run.add_argument("--out", type=Path, help="write the run record JSON here")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")

    part = sub.add_parser("partition", help="compute and save the client partition of a config",
                          description="Partition the configured dataset over clients (deterministic by seed) and "
                                      "write the partition JSON, a per-client class-count summary JSON next to it "
                                      "(<out>.summary.json) and a plot (<out>.png).")
    _add_config_args(part)
    part.add_argument("--out", type=Path, required=True, help="partition JSON to write")

    cache = sub.add_parser("cache-data", help="decode the configured dataset once into the tensor cache",
                           description="Load the configured dataset (decoding image files on first use) so "
                                       "that later runs read the cached tensors.")
    _add_config_args(cache)

    _add_algorithms_parser(sub)
    check = sub.add_parser("check-config", help="validate a config and print it with defaults filled in",
                           description=CHECK_CONFIG_DESCRIPTION, epilog=CHECK_CONFIG_EPILOG,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_config_args(check)
    _add_plugin_arg(check)
    _add_compare_parser(sub)
    _add_deploy_parsers(sub)
    _add_certs_parser(sub)
    return parser


def cmd_run(ns: argparse.Namespace) -> int:
    from fedselect.config import load_config
    from fedselect.registry import load_plugins

    load_plugins(ns.plugin)
    config = load_config(ns.config, ns.overrides)
    record = _run_checked(config, ns.out, progress=not ns.no_progress)
    print(f"{record['algorithm']} seed {record['seed']}: final mean acc {record['final_mean_acc']:.4f}, "
          f"best {record['best_mean_acc']:.4f} (round {record['best_round'] + 1} of {record['rounds']}), "
          f"bytes up {record['bytes_up']:,} down {record['bytes_down']:,}, {record['wall_seconds']:.1f} s")
    print(logged_line(record))
    return 0


def _run_checked(config: Any, out: Path | None, *, progress: bool) -> dict:
    """``run_experiment`` after the config- and model-time checks (before any data is loaded); a
    budget the model cannot meet found only once the data shaped the model is a config error too."""
    from fedselect.core.selection import InfeasibleBudgetError
    from fedselect.runner.preflight import as_config_error, preflight
    from fedselect.runner.simulate import run_experiment

    preflight(config)
    try:
        return run_experiment(config, record_path=out, progress=progress)
    except InfeasibleBudgetError as exc:
        raise as_config_error(exc, config.model.name) from None


def logged_line(record: dict) -> str:
    """Where a run logged: its MLflow store, experiment and run id, and the command that shows it."""
    uri = record["tracking_uri"]
    return (f"logged to MLflow {uri}, experiment {record['mlflow_experiment']}, run {record['mlflow_run_id']}"
            f" (view: mlflow ui --backend-store-uri {uri})")


def cmd_partition(ns: argparse.Namespace) -> int:
    from fedselect.config import load_config
    from fedselect.data import partition_summary, plot_partition
    from fedselect.runner.federation import compute_partition, load_data

    config = load_config(ns.config, ns.overrides)
    data = load_data(config)
    partition = compute_partition(config, data)
    ns.out.parent.mkdir(parents=True, exist_ok=True)
    partition.save(ns.out)
    summary = partition_summary(partition, data.train_y.numpy(), data.test_y.numpy(), data.classes)
    summary_path = ns.out.with_suffix(".summary.json")
    summary_path.write_text(json.dumps(summary, indent=2))
    plot_partition(summary, ns.out.with_suffix(".png"))
    sizes = [len(t) for t in partition.train_indices]
    print(f"{partition.num_clients} clients, train sizes {min(sizes)}..{max(sizes)}; wrote {ns.out}, "
          f"{summary_path}, {ns.out.with_suffix('.png')}")
    return 0


def cmd_cache_data(ns: argparse.Namespace) -> int:
    from fedselect.config import load_config
    from fedselect.runner.federation import load_data

    data = load_data(load_config(ns.config, ns.overrides))
    print(f"{data.name}: {len(data.train_y)} train / {len(data.test_y)} test images, {data.num_classes} classes "
          f"({data.source})")
    return 0


ALGORITHMS_DESCRIPTION = """\
List the algorithms (built-in and registered by --plugin modules) with a one-line summary, or,
given NAME, NAME's summary and every option it takes under `algo:` in a run config, with its
type, default and meaning (read from the algorithm's options dataclass; docs/ALGORITHMS.md has
the same tables). Imports no torch for the built-in algorithms."""

ALGORITHMS_EPILOG = """\
examples:
  fedselect algorithms
  fedselect algorithms layersel
  fedselect algorithms fedselect --json
  fedselect algorithms --plugin my_package.my_algorithm
"""

CHECK_CONFIG_DESCRIPTION = """\
Validate a run config (every key, the algorithm's `algo:` options included) and print it as YAML
with every default filled in; a bad key or value is one error line naming it, exit status 2.
Loads no data and imports no torch for the built-in algorithms, except those whose settings
depend on the model (layersel: its budgets against the model's layers, built without data where
the dataset fixes the model's shape; about 10 s for the imports). configs/reference.yaml lists
every key with its default and meaning; `fedselect algorithms NAME` lists an algorithm's options."""

CHECK_CONFIG_EPILOG = """\
examples:
  fedselect check-config --config configs/smoke.yaml
  fedselect check-config --config configs/smoke.yaml --set algorithm=fedrep --set algo.head_epochs=4
"""


def _add_algorithms_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``algorithms`` on the ``fedselect`` subcommand parsers."""
    parser = sub.add_parser("algorithms", help="list the algorithms, or show one algorithm's options",
                            description=ALGORITHMS_DESCRIPTION, epilog=ALGORITHMS_EPILOG,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", nargs="?", metavar="NAME", help="show this algorithm's options")
    _add_plugin_arg(parser)
    parser.add_argument("--json", action="store_true", help="print JSON (a list, or NAME's record)")


def cmd_algorithms(ns: argparse.Namespace) -> int:
    from fedselect.algorithms.catalog import algorithm_record, format_algorithm, format_table
    from fedselect.registry import algorithm_info, available_algorithms, load_plugins

    load_plugins(ns.plugin)
    if ns.name is not None:
        info = algorithm_info(ns.name)
        sys.stdout.write(json.dumps(algorithm_record(info), indent=2) + "\n" if ns.json else format_algorithm(info))
        return 0
    infos = [algorithm_info(name) for name in available_algorithms()]
    if ns.json:
        sys.stdout.write(json.dumps([algorithm_record(info) for info in infos], indent=2) + "\n")
    else:
        sys.stdout.write(format_table(infos))
    return 0


def cmd_check_config(ns: argparse.Namespace) -> int:
    from fedselect.config import dump_config, load_config
    from fedselect.registry import load_plugins
    from fedselect.runner.preflight import preflight

    load_plugins(ns.plugin)
    config = load_config(ns.config, ns.overrides)
    preflight(config)  # what a run would refuse before loading data (model-time only where it applies)
    print(dump_config(config), end="")
    return 0


def _add_deploy_parsers(sub: argparse._SubParsersAction) -> None:
    """``serve``, ``join`` and ``launch-local`` subcommands."""
    serve = sub.add_parser("serve", help="run a FedML cross-silo server (rank 0; holds no client data)",
                           description="Serve one configured run as a FedML cross-silo server (GRPC): wait "
                                       "for the clients of the config's deploy section, run the rounds, log "
                                       "to MLflow and write the run record. See docs/DEPLOYMENT.md.")
    join = sub.add_parser("join", help="run FedML cross-silo client RANK (1..num_clients) on its own data",
                          description="Join the server of the config's deploy section as client RANK, with "
                                      "only this client's data. See docs/DEPLOYMENT.md.")
    local = sub.add_parser("launch-local", help="a whole cross-silo federation as processes on 127.0.0.1",
                           description="Start a server and N clients as separate processes on loopback "
                                       "(free ports), wait for them, end them all on failure or timeout. Exit "
                                       "status: 0 the federation finished (under deploy.on_client_failure: "
                                       "continue, clients given up on may have died), 1 it failed, 2 a config "
                                       "error, 124 --timeout passed (docs/DEPLOYMENT.md, Exit codes).")
    for p in (serve, join, local):
        _add_config_args(p)
        _add_plugin_arg(p)
    serve.add_argument("--out", type=Path, help="write the run record JSON here")
    join.add_argument("--rank", type=int, required=True, help="this client's rank, 1..data.partition.num_clients")
    local.add_argument("--clients", type=int, help="number of clients (default: data.partition.num_clients)")
    local.add_argument("--timeout", type=float, default=3600.0, help="seconds before everything is ended")
    local.add_argument("--log-dir", type=Path, help="one log file per process (default: under results_dir)")
    local.add_argument("--out", type=Path, help="the server writes the run record JSON here")


def _add_certs_parser(sub: argparse._SubParsersAction) -> None:
    """``certs``: a CA and one key + certificate per party of a cross-silo federation."""
    certs = sub.add_parser("certs", help="make a CA and rank-bound TLS certificates for serve/join",
                           description="Make a certificate authority and, for the server (rank 0) and each client "
                                       "rank 1..N, a key and a certificate naming its rank (fedselect-rank-K), for "
                                       "the mutual TLS of `fedselect serve`/`join`. Keys are written with mode 0600. "
                                       "See docs/DEPLOYMENT.md.")
    certs.add_argument("--out", type=Path, default=Path("certs"), help="folder to write (default: certs)")
    certs.add_argument("--clients", type=int, required=True, help="number of clients N")
    certs.add_argument("--server-host", required=True,
                       help="the server's address as clients reach it (deploy.server_host); put in its certificate")
    certs.add_argument("--client-hosts", default="", help="comma-separated addresses of clients 1..N (optional)")
    certs.add_argument("--days", type=int, default=365, help="validity in days (default 365)")
    certs.add_argument("--force", action="store_true", help="overwrite an existing CA in --out")


def cmd_certs(ns: argparse.Namespace) -> int:
    from fedselect.certs import write_federation

    hosts = [h.strip() for h in ns.client_hosts.split(",") if h.strip()]
    try:
        issued = write_federation(ns.out, clients=ns.clients, server_host=ns.server_host, days=ns.days,
                                  client_hosts=hosts, force=ns.force)
    except (ValueError, FileExistsError) as exc:
        print(f"fedselect certs: error: {exc}", file=sys.stderr)
        return 2
    width = max(len(str(i.path)) for i in issued)
    print(f"wrote a CA and certificates for the server and {ns.clients} clients, valid {ns.days} days:")
    for item in issued:
        print(f"  {str(item.path):<{width}}  ->  {item.machine}")
    print("on every machine, deploy.ca_cert/cert/key name these files (defaults: certs/ca.pem, "
          "certs/rank-{rank}.pem, certs/rank-{rank}.key); copy keys over a secure channel")
    return 0


def _deploy_config(ns: argparse.Namespace) -> Any:
    # grpc's core logs each connection a stopping peer cancels at INFO; keep errors only
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    from fedselect.config import load_config
    from fedselect.registry import load_plugins

    load_plugins(ns.plugin)
    return load_config(ns.config, ns.overrides)


def cmd_serve(ns: argparse.Namespace) -> int:
    from fedselect.fedml_runtime.messages import FederationError
    from fedselect.runner.cross_silo import serve

    config = _deploy_config(ns)
    try:
        record = serve(config, record_path=ns.out)
    except FederationError as exc:
        print(f"fedselect serve: federation failed: {exc}", file=sys.stderr)
        return 1
    print(f"{record['algorithm']} cross-silo: final mean acc {record['final_mean_acc']:.4f}, bytes up "
          f"{record['bytes_up']:,} (wire {sum(record['wire_bytes_up_per_round']):,}), {record['wall_seconds']:.1f} s")
    print(logged_line(record))
    return 0


def cmd_join(ns: argparse.Namespace) -> int:
    from fedselect.fedml_runtime.messages import FederationError
    from fedselect.runner.cross_silo import join

    config = _deploy_config(ns)
    try:
        join(config, ns.rank)
    except FederationError as exc:
        print(f"fedselect join: client rank {ns.rank} failed: {exc}", file=sys.stderr)
        return 1
    print(f"client rank {ns.rank}: federation finished")
    return 0


def cmd_launch_local(ns: argparse.Namespace) -> int:
    from fedselect.registry import load_plugins
    from fedselect.runner.processes import launch_local

    load_plugins(ns.plugin)
    if ns.clients is not None and ns.clients < 1:
        print("fedselect launch-local: error: --clients must be >= 1", file=sys.stderr)
        return 2
    return launch_local(ns.config, ns.overrides, clients=ns.clients, timeout_s=ns.timeout, log_dir=ns.log_dir,
                        plugins=ns.plugin, out=ns.out)


COMPARE_DESCRIPTION = """\
Print the study tables (mean ± std over seeds of final and best-round mean client accuracy,
client spread, bytes per client per round, wall time, training sample passes and compute
where logged) for any set of MLflow runs. Reads: the MLflow store (--tracking-uri; default
$MLFLOW_TRACKING_URI, else results/mlflow.db). Writes: the table to stdout (or --out). Only
FINISHED runs unless --any-status; a variant's repeated seed keeps its latest run (noted
under the table)."""

COMPARE_EPILOG = """\
examples:
  fedselect compare --experiment default
  fedselect compare --tag study=fedselect_cpu_s2 --tag algorithm=fedselect --format csv
  fedselect compare --run-id 03847e32... --run-id a706510d... --group-by algorithm,algo.p
"""


def _add_compare_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``compare`` on the ``fedselect`` subcommand parsers."""
    parser = sub.add_parser("compare", help="tables of mean ± std over seeds for any set of MLflow runs",
                            description=COMPARE_DESCRIPTION, epilog=COMPARE_EPILOG,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", help="MLflow experiment name (a study's name)")
    parser.add_argument("--tag", action="append", default=[], metavar="KEY=VALUE",
                        help="keep runs whose tag KEY equals VALUE; repeatable (all must match)")
    parser.add_argument("--run-id", action="append", default=[], metavar="ID", help="an MLflow run id; repeatable")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else "
                                               "sqlite:///results/mlflow.db)")
    parser.add_argument("--group-by", help="comma-separated tags or params defining a variant (default: the "
                                           "run_variant tag, else the run tag, else the algorithm)")
    parser.add_argument("--format", choices=("markdown", "csv"), default="markdown")
    parser.add_argument("--title", help="heading of the Markdown table")
    parser.add_argument("--any-status", action="store_true", help="include RUNNING/FAILED/KILLED runs")
    parser.add_argument("--out", help="write the table to this file instead of stdout")
    return parser


def cmd_compare(ns: argparse.Namespace) -> int:
    """``fedselect compare``: errors are reported on stderr with exit status 2."""
    from fedselect.config import TrackingConfig
    from fedselect.files import atomic_write_text
    from fedselect.tracking import run_tracking_uri
    from fedselect.tracking.compare import CompareError, compare, parse_tags

    try:
        group_by = [k.strip() for k in ns.group_by.split(",") if k.strip()] if ns.group_by else None
        text = compare(ns.tracking_uri or run_tracking_uri(TrackingConfig()), experiment=ns.experiment,
                       tags=parse_tags(ns.tag), run_ids=ns.run_id, group_by=group_by, fmt=ns.format,
                       title=ns.title, any_status=ns.any_status)
    except (CompareError, FileNotFoundError, ValueError) as exc:
        print(f"fedselect compare: error: {exc}", file=sys.stderr)
        return 2
    if ns.out:
        atomic_write_text(ns.out, text)
    else:
        sys.stdout.write(text)
    return 0


COMMANDS = {"run": cmd_run, "partition": cmd_partition, "cache-data": cmd_cache_data, "algorithms": cmd_algorithms,
            "check-config": cmd_check_config, "compare": cmd_compare, "serve": cmd_serve, "join": cmd_join,
            "launch-local": cmd_launch_local, "certs": cmd_certs}


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if ns.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return COMMANDS[ns.command](ns)
    except (ConfigError, FileNotFoundError) as exc:
        print(f"fedselect: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
