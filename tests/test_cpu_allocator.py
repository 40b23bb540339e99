"""keep_freed_memory: glibc's thresholds are raised once per process, and can be turned off."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

SNIPPET = ("from fedselect.cpu_allocator import keep_freed_memory; "
           "print(keep_freed_memory(), keep_freed_memory())")


def run(env_value: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "FEDSELECT_KEEP_FREED_MEMORY"}
    if env_value is not None:
        env["FEDSELECT_KEEP_FREED_MEMORY"] = env_value
    return subprocess.run([sys.executable, "-c", SNIPPET], env=env, capture_output=True, text=True,
                          check=True).stdout.strip()


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_thresholds_are_set_once_on_glibc() -> None:
    assert run(None) == "True True"


def test_the_environment_turns_it_off() -> None:
    assert run("0") == "False False"


def test_another_value_of_the_variable_is_an_error_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    from fedselect import cpu_allocator
    from fedselect.options import ConfigError

    monkeypatch.setattr(cpu_allocator, "_applied", None)
    monkeypatch.setenv("FEDSELECT_KEEP_FREED_MEMORY", "false")
    with pytest.raises(ConfigError, match="FEDSELECT_KEEP_FREED_MEMORY must be 0 .* got 'false'"):
        cpu_allocator.keep_freed_memory()
    assert cpu_allocator._applied is None  # nothing decided: the next call checks again


def test_cpu_runs_apply_it_and_the_pooling(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from fedselect import engine
    from fedselect.runner import federation

    calls = []
    monkeypatch.setattr(engine, "keep_freed_memory", lambda: calls.append(1) or True)
    train = type("T", (), {"cuda_graphs": False, "channels_last": False, "client_batching": False})()
    config = type("C", (), {"train": train, "device": "cpu"})()
    model = federation.on_device(config, torch.nn.Sequential(torch.nn.MaxPool2d(2)), torch.device("cpu"))
    assert calls == [1]
    from fedselect.cpu_pooling import ChannelsLastMaxPool2d

    assert type(model[0]) is ChannelsLastMaxPool2d  # and the exact channels-last pooling
