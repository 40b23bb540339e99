"""The papers' reference numbers as data, and how a study's runs are matched to them.

Sources (numbers as in ``docs/ALGORITHMS.md`` of the shared design docs):

* FedSelect (arXiv 2306.13264), Table 1: mean over clients of the personalized models' test
  accuracy (%) at the final round; CIFAR-10, 10 clients, K = 1, s = 2 or 4 classes per client,
  20 train / 100 test images per class per client, ImageNet-pretrained ResNet-18, 200 rounds.
* Selective layer fine-tuning (arXiv 2408.15600), Table 1: CIFAR-10 test accuracy (%), CLIP
  ViT-B/32, Dirichlet label skew, 100 clients (10 per round), identical budgets at two levels.

A study declares what it reproduces with an optional top-level key::

    paper:
      table: fedselect_table1      # a key of TABLES
      column: s2                   # the column every run is compared with
      runs:                        # optional, per run: a method name, {method, column}, or null
        local: null                # no paper number for this run
        top_b2: {column: budget_2}

A run without an entry under ``runs`` is matched by its algorithm and options: the row whose
algorithm equals the run's and whose options all equal the run's.

Option values are read from the run's MLflow params (``algo.<option>``) only, never from
today's code. Runs logged since resolved options are recorded hold every option of their
algorithm with defaults filled in; older runs hold only the options their config set, and an
option such a run does not hold is unknown: today's default may not be the default the run
used, so guessing it could attribute a run to the wrong paper row. Matching is honest about
it: a row that constrains an option the run did not record is neither matched nor excluded
("undecided"); a run matches a row only when every option the row constrains is recorded and
equal, and no other row of its algorithm is undecided. A run left undecided gets no paper
number: its paper column says which options were not recorded (give its method under
``paper.runs`` to compare it anyway).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    from fedselect.study import Study

Value = float | tuple[float, float]  # one number, or a range reported as "lo-hi"


@dataclass(frozen=True)
class PaperRow:
    method: str
    algorithm: str
    options: dict[str, Any]
    values: dict[str, Value]


@dataclass(frozen=True)
class PaperTable:
    name: str
    source: str
    setting: str
    columns: dict[str, str]
    rows: tuple[PaperRow, ...]

    def row(self, method: str) -> PaperRow:
        for row in self.rows:
            if row.method == method:
                return row
        raise KeyError(f"paper table {self.name!r} has no method {method!r} "
                       f"(methods: {', '.join(r.method for r in self.rows)})")


def _fs(method: str, algorithm: str, s2: Value, s4: Value, **options: Any) -> PaperRow:
    return PaperRow(method, algorithm, options, {"s2": s2, "s4": s4})


FEDSELECT_TABLE1 = PaperTable(
    name="fedselect_table1",
    source="FedSelect (arXiv 2306.13264), Table 1",
    setting="CIFAR-10, 10 clients, every client every round, s classes per client with 20 train / 100 test "
            "images per class, ImageNet-pretrained ResNet-18, 200 rounds, 5 local epochs",
    columns={"s2": "s = 2 classes per client", "s4": "s = 4 classes per client"},
    rows=(
        _fs("FedAvg", "fedavg", 33.54, 52.57),
        _fs("LG-FedAvg", "lg_fedavg", 59.95, 51.35),
        _fs("LotteryFL", "lotteryfl", 73.37, 60.13),
        _fs("Ditto", "ditto", 74.50, 48.85),
        _fs("FedBABU", "fedbabu", 35.65, 53.03),
        _fs("FedPer", "fedper", 30.25, 51.73),
        _fs("FedRep", "fedrep", 82.70, 65.33),
        _fs("FedAlt", "fedalt", 67.32, 65.80),
        _fs("FedSelect (p=0.25)", "fedselect", 84.22, 65.23, p=0.25, mask_search="gradltn"),
        _fs("FedSelect (p=0.50)", "fedselect", 85.64, 65.88, p=0.5, mask_search="gradltn"),
        _fs("FedSelect (p=0.75)", "fedselect", 85.91, 62.91, p=0.75, mask_search="gradltn"),
        # the released code's online mask growth, e = 1, 3, 5 rounds between growth steps
        _fs("FedSelectv2 (e=1,3,5)", "fedselect", (87.46, 87.99), (66.51, 68.65), mask_search="grow"),
    ),
)


def _ls(method: str, strategy: str, budget_1: float, budget_2: float) -> PaperRow:
    return PaperRow(method, "layersel", {"strategy": strategy}, {"budget_1": budget_1, "budget_2": budget_2})


LAYERSEL_TABLE1 = PaperTable(
    name="layersel_table1",
    source="Exploring Selective Layer Fine-Tuning in Federated Learning (arXiv 2408.15600), Table 1, CIFAR-10",
    setting="CIFAR-10, CLIP ViT-B/32, Dirichlet label skew, 100 clients with 10 per round, identical budgets, "
            "batch 64, lr 0.01",
    columns={"budget_1": "the first (smaller) budget level of the paper's table",
             "budget_2": "the second budget level of the paper's table"},
    rows=(
        _ls("Full", "full", 95.43, 95.43),
        _ls("Top", "top", 93.09, 93.61),
        _ls("Bottom", "bottom", 27.38, 32.81),
        _ls("SNR", "snr", 94.47, 90.49),
        _ls("RGN", "rgn", 92.69, 89.48),
        _ls("Ours (ILP)", "ilp", 95.47, 96.05),
    ),
)

TABLES: dict[str, PaperTable] = {t.name: t for t in (FEDSELECT_TABLE1, LAYERSEL_TABLE1)}


class PaperSpecError(ValueError):
    """A study's ``paper:`` key names an unknown table, column, run or method."""


@dataclass(frozen=True)
class PaperSpec:
    """A study's ``paper:`` declaration, checked against the table and the study's runs."""

    table: PaperTable
    column: str | None
    # run name -> (method or None for "no paper number", column)
    runs: dict[str, tuple[str | None, str | None]] = field(default_factory=dict)

    def column_for(self, run: str) -> str | None:
        return self.runs.get(run, (None, None))[1] or self.column


def parse_paper_spec(raw: Mapping[str, Any] | None, run_names: Sequence[str], *, where: str = "study") -> \
        PaperSpec | None:
    """Validate a ``paper:`` mapping; None when the study declares none. Errors name the key."""
    if raw is None:
        return None
    if not isinstance(raw, Mapping) or "table" not in raw:
        raise PaperSpecError(f"{where}: key 'paper' must be a mapping with a 'table' (one of {', '.join(TABLES)})")
    unknown = sorted(set(raw) - {"table", "column", "runs"})
    if unknown:
        raise PaperSpecError(f"{where}: key 'paper.{unknown[0]}' is not known (table, column, runs)")
    table = TABLES.get(raw["table"])
    if table is None:
        raise PaperSpecError(f"{where}: key 'paper.table': unknown table {raw['table']!r} "
                             f"(tables: {', '.join(TABLES)})")

    def check_column(column: Any, key: str) -> str | None:
        if column is not None and column not in table.columns:
            raise PaperSpecError(f"{where}: key '{key}': table {table.name} has no column {column!r} "
                                 f"(columns: {', '.join(table.columns)})")
        return column

    column = check_column(raw.get("column"), "paper.column")
    runs: dict[str, tuple[str | None, str | None]] = {}
    for run, entry in (raw.get("runs") or {}).items():
        key = f"paper.runs.{run}"
        if run not in run_names:
            raise PaperSpecError(f"{where}: key '{key}': the study has no run {run!r}")
        if entry is None or isinstance(entry, str):
            method, run_column = entry, None
        elif isinstance(entry, Mapping) and set(entry) <= {"method", "column"}:
            method, run_column = entry.get("method"), check_column(entry.get("column"), f"{key}.column")
        else:
            raise PaperSpecError(f"{where}: key '{key}': expected a method name, null, or {{method, column}}")
        if method is not None:
            try:
                table.row(method)
            except KeyError as exc:
                raise PaperSpecError(f"{where}: key '{key}': {exc.args[0]}") from None
        # an entry with a column only keeps automatic matching of the method ("" marks it)
        runs[run] = (method if method is not None or entry is None else "", run_column)
    if column is None and not any(c for _, c in runs.values()):
        raise PaperSpecError(f"{where}: key 'paper.column' is missing: give it, or a column per run under "
                             f"paper.runs (columns of {table.name}: {', '.join(table.columns)})")
    return PaperSpec(table=table, column=column, runs=runs)


def read_study_paper(study: Study) -> PaperSpec | None:
    """The ``paper:`` key of a loaded study (its column templates and run stems already resolved
    per run by :func:`fedselect.study.load_study`)."""
    return parse_paper_spec(study.paper, study.run_names(), where=str(study.path))


# -------------------------------------------------------------------------------- matching


class _NotRecorded:
    """The value of an option a run did not record (a run from before resolved options were logged)."""

    def __repr__(self) -> str:
        return "NOT_RECORDED"


NOT_RECORDED: Any = _NotRecorded()


def parse_option(value: Any) -> Any:
    """A logged param (a string) back to its YAML value: ``"0.25"`` -> 0.25."""
    if not isinstance(value, str):
        return value
    try:
        return yaml.safe_load(value)
    except yaml.YAMLError:
        return value


def option_value(raw_options: Mapping[str, Any], key: str) -> Any:
    """The run's value of option ``key`` as logged, or :data:`NOT_RECORDED` when the run did not log it."""
    if key in raw_options:
        return parse_option(raw_options[key])
    return NOT_RECORDED


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, int | float) and isinstance(b, int | float) and not isinstance(a, bool):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)
    return a == b


def _unrecorded_keys(row: PaperRow, raw_options: Mapping[str, Any]) -> list[str] | None:
    """None when a recorded option of the run contradicts the row; else the row's options the run did not record."""
    unrecorded = []
    for key, wanted in row.options.items():
        value = option_value(raw_options, key)
        if value is NOT_RECORDED:
            unrecorded.append(key)
        elif not _same(value, wanted):
            return None
    return unrecorded


def row_candidates(table: PaperTable, algorithm: str, raw_options: Mapping[str, Any]) -> \
        tuple[list[PaperRow], dict[str, list[str]]]:
    """Rows of ``algorithm`` the run matches (every constrained option recorded and equal), and the
    undecided ones: method -> the options it constrains that the run did not record."""
    matched, undecided = [], {}
    for row in table.rows:
        if row.algorithm != algorithm:
            continue
        unrecorded = _unrecorded_keys(row, raw_options)
        if unrecorded == []:
            matched.append(row)
        elif unrecorded:
            undecided[row.method] = unrecorded
    return matched, undecided


def match_row(table: PaperTable, algorithm: str, raw_options: Mapping[str, Any]) -> PaperRow | None:
    """The table's row for a run of ``algorithm`` with these (raw, logged) options; None if none fits
    for certain (see :func:`unrecorded_options` for a run left undecided)."""
    matched, undecided = row_candidates(table, algorithm, raw_options)
    if len(matched) > 1:
        raise PaperSpecError(f"paper table {table.name}: a {algorithm} run with options {dict(raw_options)} matches "
                             f"{', '.join(r.method for r in matched)}; name the method under paper.runs")
    if undecided:
        return None
    return matched[0] if matched else None


def unrecorded_options(table: PaperTable, algorithm: str, raw_options: Mapping[str, Any]) -> list[str]:
    """Options the run did not record that keep it from a paper row (sorted; empty: nothing undecided)."""
    _, undecided = row_candidates(table, algorithm, raw_options)
    return sorted({key for keys in undecided.values() for key in keys})


def format_value(value: Value) -> str:
    return f"{value[0]:.2f}–{value[1]:.2f}" if isinstance(value, tuple) else f"{value:.2f}"


def difference_pp(ours_fraction: float, value: Value) -> float:
    """Our accuracy (a fraction) minus the paper's (%), in points; to a range's nearest end, 0 inside."""
    ours = 100.0 * ours_fraction
    if isinstance(value, tuple):
        low, high = value
        return ours - low if ours < low else ours - high if ours > high else 0.0
    return ours - value


def paper_entry(spec: PaperSpec, run: str, algorithm: str, raw_options: Mapping[str, Any]) -> \
        tuple[PaperRow, str] | None:
    """(row, column) a study run is compared with, or None (no row, no column, or declared null)."""
    method, _ = spec.runs.get(run, ("", None))
    if method is None:
        return None
    row = spec.table.row(method) if method else match_row(spec.table, algorithm, raw_options)
    column = spec.column_for(run)
    if row is None or column is None or column not in row.values:
        return None
    return row, column


def add_paper_columns(rows: Sequence[dict[str, Any]], spec: PaperSpec,
                      options_of: Mapping[str, tuple[str, Mapping[str, Any]]]) -> None:
    """Add ``paper_method``, ``paper_acc`` (text) and ``diff_vs_paper_pp`` to each table row in place.

    ``options_of``: row name -> (algorithm, raw options) shared by the variant's runs. A variant
    whose runs did not record an option that decides its row gets ``paper_method`` "options not
    recorded: <options>" and no paper number.
    """
    for row in rows:
        algorithm, raw = options_of[row["run"]]
        entry = paper_entry(spec, row["run"], algorithm, raw)
        if entry is None:
            automatic = spec.runs.get(row["run"], ("", None))[0] == ""
            unknown = unrecorded_options(spec.table, algorithm, raw) if automatic else []
            method = f"options not recorded: {', '.join(unknown)}" if unknown else ""
            row.update(paper_method=method, paper_acc="", diff_vs_paper_pp=None)
            continue
        paper_row, column = entry
        value = paper_row.values[column]
        row.update(paper_method=f"{paper_row.method} [{column}]", paper_acc=format_value(value),
                   diff_vs_paper_pp=difference_pp(row["final_acc_mean"], value))
