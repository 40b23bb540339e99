"""Issue 16: the algorithm catalog (no torch), `fedselect algorithms [NAME]`, generated docs, reference config."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import typing
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from fedselect.algorithms.catalog import describe_options, field_comments
from fedselect.algorithms.docs import check, update
from fedselect.cli import main
from fedselect.config import ExperimentConfig, load_config
from fedselect.options import ConfigError
from fedselect.registry import (
    _REGISTRY,
    BUILTIN_MODULES,
    BUILTINS,
    algorithm_info,
    available_algorithms,
    builtin_options_class,
    get_algorithm,
    register,
    validate_algorithm_options,
)

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "configs" / "reference.yaml"

NO_TORCH = """
import contextlib, io, sys
from fedselect.algorithms.catalog import describe_options
from fedselect.cli import main
from fedselect.config import load_config
from fedselect.registry import BUILTINS, algorithm_info, available_algorithms, validate_algorithm_options
for name in available_algorithms():
    describe_options(algorithm_info(name).options_cls)
    validate_algorithm_options(name, {})
load_config("configs/smoke.yaml", ["algorithm=layersel", "algo.strategy=top", "algo.budget=0.25"])
load_config("configs/reference.yaml")
with contextlib.redirect_stdout(io.StringIO()):
    assert main(["algorithms"]) == 0 and main(["algorithms", "layersel", "--json"]) == 0
    assert main(["check-config", "--config", "configs/smoke.yaml", "--set", "algorithm=fedselect"]) == 0
print(sorted(m for m in ("torch", "fedml") if m in sys.modules))
"""


def test_listing_and_validating_the_builtins_imports_neither_torch_nor_fedml() -> None:
    out = subprocess.run([sys.executable, "-c", NO_TORCH], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_every_builtin_is_listed_with_a_summary_and_documented_options() -> None:
    assert set(BUILTINS) <= set(available_algorithms())
    assert tuple(f"fedselect.algorithms.{name}" for name in BUILTINS) == BUILTIN_MODULES
    for name in BUILTINS:
        info = algorithm_info(name)
        assert info.builtin and info.summary, name
        assert validate_algorithm_options(name, {}) == info.options_cls(), name
        for option in describe_options(info.options_cls):
            assert option.help, f"{name}: option '{option.name}' has no comment above its field"
            assert option.type and option.default is not dataclasses.MISSING, (name, option)


def test_the_implementations_declare_the_catalogs_options_and_old_imports_still_work() -> None:
    from fedselect.algorithms.ditto import DittoOptions
    from fedselect.algorithms.fedalt import FedAltOptions
    from fedselect.algorithms.fedbabu import FedBABUOptions
    from fedselect.algorithms.fedrep import FedRepOptions
    from fedselect.algorithms.fedselect import FedSelectOptions
    from fedselect.algorithms.group_partition import GroupOptions, PartitionSetting
    from fedselect.algorithms.layersel import LayerSelOptions
    from fedselect.algorithms.lg_fedavg import LGFedAvgOptions
    from fedselect.algorithms.lotteryfl import LotteryFLOptions

    moved = {"ditto": DittoOptions, "fedalt": FedAltOptions, "fedbabu": FedBABUOptions, "fedrep": FedRepOptions,
             "fedselect": FedSelectOptions, "layersel": LayerSelOptions, "lg_fedavg": LGFedAvgOptions,
             "lotteryfl": LotteryFLOptions}
    for name in BUILTINS:
        spec = get_algorithm(name)
        assert spec.options_cls is builtin_options_class(name) is spec.client_cls.Options, name
        assert spec.summary == BUILTINS[name].summary, name
        if name in moved:
            assert moved[name] is spec.options_cls, name
    assert issubclass(FedAltOptions, GroupOptions) and FedAltOptions.partition.__class__ is PartitionSetting


@dataclasses.dataclass(frozen=True)
class _Shared:
    # the first field's meaning
    first: int = 1
    second: int = 2


def test_option_meaning_is_the_comment_above_the_field_or_the_field_above() -> None:
    from fedselect.algorithms.layersel_options import LayerSelOptions

    comments = field_comments(LayerSelOptions)
    assert comments["cost"].startswith("a layer's cost")
    assert comments["budget_min"].startswith("heterogeneous budgets, half_normal draw")
    # a field right below another, without a comment of its own, shares that field's
    shared = field_comments(_Shared)
    assert shared == {"first": "the first field's meaning", "second": "the first field's meaning"}
    options = {o.name: o for o in describe_options(builtin_options_class("fedrep"))}
    assert options["head_epochs"].type == "int | null" and options["head_epochs"].default_text == "null"
    options = {o.name: o for o in describe_options(builtin_options_class("fedalt"))}
    assert options["personal_groups"].default_text == "[head]"
    assert options["localalt_epoch"].type == "split | two_passes"


def test_plugins_are_listed_and_may_not_take_a_builtin_name() -> None:
    from fedselect.algorithms.base import FedAvgClient, FedAvgServer

    class OtherClient(FedAvgClient):
        pass

    try:
        register("catalog_toy", client=OtherClient, server=FedAvgServer, summary="a toy")
        assert "catalog_toy" in available_algorithms()
        info = algorithm_info("catalog_toy")
        assert not info.builtin and info.summary == "a toy" and info.module == __name__
        with pytest.raises(ValueError, match="already registered"):
            register("fedavg", client=OtherClient, server=FedAvgServer)
    finally:
        _REGISTRY.pop("catalog_toy", None)
    with pytest.raises(ConfigError, match="config key 'algorithm': unknown algorithm 'nope'"):
        validate_algorithm_options("nope", {})


def test_algorithms_command_lists_every_algorithm_and_one_algorithms_options(capsys: pytest.CaptureFixture) -> None:
    assert main(["algorithms"]) == 0
    out = capsys.readouterr().out
    for name in BUILTINS:
        assert any(line.startswith(f"{name} ") for line in out.splitlines()), name
    assert main(["algorithms", "fedrep"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("fedrep: ") and "head_epochs: int | null = null" in out and "body_epochs" in out
    assert main(["algorithms", "fedavg"]) == 0
    assert "no options" in capsys.readouterr().out
    assert main(["algorithms", "fedselect", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["name"] == "fedselect" and {o["name"] for o in record["options"]} >= {"p", "mask_search"}
    assert main(["algorithms", "--json"]) == 0
    assert {r["name"] for r in json.loads(capsys.readouterr().out)} >= set(BUILTINS)


def test_an_unknown_algorithm_name_is_one_error_line_listing_the_known_ones(capsys: pytest.CaptureFixture) -> None:
    assert main(["algorithms", "fedsel"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fedselect: error: unknown algorithm 'fedsel'")
    assert all(name in err[0] for name in BUILTINS)


def test_the_docs_option_tables_match_the_options_dataclasses() -> None:
    text = (ROOT / "docs" / "ALGORITHMS.md").read_text(encoding="utf-8")
    assert check(text) == [], "regenerate: python -m fedselect.algorithms.docs --write docs/ALGORITHMS.md"
    stale = text.replace("| `prune_rate` | `float` | `0.2` |", "| `prune_rate` | `float` | `0.3` |")
    assert check(stale) == ["block options:lotteryfl: differs from fedselect.algorithms.lotteryfl_options:"
                            "LotteryFLOptions"]
    assert update(stale) == text
    assert any("no block" in p for p in check(text.replace("<!-- options:ditto -->", "")))


def _field_paths(cls: type, prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        yield prefix + (f.name,)
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _field_paths(hints[f.name], prefix + (f.name,))


def _key_lines(node: yaml.Node, prefix: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], int]]:
    for key, value in node.value:
        yield prefix + (key.value,), key.start_mark.line
        if isinstance(value, yaml.MappingNode):
            yield from _key_lines(value, prefix + (key.value,))


def test_the_reference_config_loads_holds_the_defaults_and_documents_every_key() -> None:
    assert load_config(REFERENCE) == ExperimentConfig()
    text = REFERENCE.read_text(encoding="utf-8")
    lines = text.splitlines()
    keys = dict(_key_lines(yaml.compose(text)))
    missing = [".".join(path) for path in _field_paths(ExperimentConfig) if path not in keys]
    assert not missing, f"configs/reference.yaml lacks config keys {missing}"
    for path, row in keys.items():
        assert lines[row - 1].strip().startswith("#") or " # " in lines[row], \
            f"configs/reference.yaml: key {'.'.join(path)} has no comment saying what it does"
