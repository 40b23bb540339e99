"""The study file's optional `paired:` key: validated by the schema (shape) and fedselect.study
(both names are runs of the study, A != B); errors name the file and the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedselect.study import StudyError, load_study

RUNS = "runs:\n  fedavg: {algorithm: fedavg}\n  local: {algorithm: local}\n"


def _study(tmp_path: Path, paired: str | None) -> Path:
    path = tmp_path / "s.yaml"
    path.write_text("study: s\nseeds: [0, 1]\n" + RUNS + (f"paired: {paired}\n" if paired is not None else ""))
    return path


def test_paired_pairs_are_read_in_order(tmp_path):
    study = load_study(_study(tmp_path, "[[local, fedavg], [fedavg, local]]"))
    assert study.paired == [("local", "fedavg"), ("fedavg", "local")]
    assert load_study(_study(tmp_path, None)).paired == []


@pytest.mark.parametrize(("paired", "message"), [
    ("[[local, nope]]", "key 'paired.0': 'nope' is not a run of the study \\(runs: fedavg, local\\)"),
    ("[[local, fedavg], [fedavg, fedavg]]", "key 'paired.1': compares run 'fedavg' with itself"),
    ("[[local, fedavg, fedavg]]", "key 'paired.0': .* is too long"),
    ("[[local]]", "key 'paired.0': .* is too short"),
    ("[[local, fedavg], [local, fedavg]]", "key 'paired': .* non-unique"),
    ("[]", "key 'paired': .* should be non-empty"),
    ("{local: fedavg}", "key 'paired': .* is not of type 'array'"),
])
def test_bad_paired_key_is_an_error_naming_file_and_key(tmp_path, paired, message):
    path = _study(tmp_path, paired)
    with pytest.raises(StudyError, match=message) as info:
        load_study(path)
    assert str(info.value).startswith(f"{path}: ")
