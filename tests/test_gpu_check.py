"""bench/gpu_check end to end on the CPU (--tiny), with the fedml stand-in forced on.

That is the path a GPU machine takes, where FedML does not import: the stand-in
(bench/gpu_standin), our side of bench/fedselect_vs_released.py and bench/study_cost.py's
no-tracking children at J = 1 and 2. The released code's side runs only where its export
(.gpu/released, made by `bench/gpu_check --prepare`) is present; CI has none and skips it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

GPU_CHECK = REPO / "bench" / "gpu_check"
RELEASED = REPO / ".gpu" / "released"

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def tiny_gpu_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A --prepare'd folder with 30 train + 30 test PNGs per class and no wheels or released code."""
    from tests.conftest import shared_data_root

    root = shared_data_root()
    if root is None:
        pytest.skip("offline CIFAR-10 copy not found (set FEDSELECT_DATA_ROOT)")
    gpu = tmp_path_factory.mktemp("gpu")
    proc = subprocess.run(["bash", str(GPU_CHECK), "--prepare", "--gpu-dir", str(gpu), "--data-src", str(root),
                           "--train-per-class", "30", "--test-per-class", "30", "--no-wheels"],
                          env={**os.environ, "FEDSELECT_RELEASED_SRC": ""}, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert len(list((gpu / "data" / "cifar10" / "train" / "cat").glob("*.png"))) == 30
    return gpu


def failure_text(proc: subprocess.CompletedProcess, out: Path) -> str:
    """What failed (study_cost's reasons, the log's FAILED and Error lines), then the end of the output."""
    log = proc.stdout + proc.stderr
    failed = [line for line in log.splitlines() if "FAILED" in line or "Error" in line]
    try:
        reasons = json.loads((out / "study_cost.json").read_text())["failed"]
    except (OSError, ValueError, KeyError):
        reasons = {}
    return json.dumps(reasons, indent=1) + "\n" + "\n".join(failed[:40]) + "\n...\n" + log[-3000:]


def run_check(gpu: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "FEDSELECT_FEDML_STANDIN": "1", "PYTHON": sys.executable, "HOME": str(out.parent / "home")}
    env.pop("OUT", None)
    return subprocess.run(["bash", str(GPU_CHECK), "--gpu-dir", str(gpu), "--device", "cpu", "--tiny",
                           "--out", str(out), "--work", str(out.parent / f"{out.name}-work"), *extra],
                          env=env, capture_output=True, text=True, timeout=560, cwd=REPO)


def test_tiny_check_ours_and_study_cost(tiny_gpu_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    # a budget well above the tiny check's 240 s: the suite runs beside other work (two test workers),
    # and a child that is slow to start must not fail the check; a free machine needs about 100 s
    proc = run_check(tiny_gpu_dir, out, "--sides", "ours", "--budget-s", "480")
    assert proc.returncode == 0, failure_text(proc, out)
    assert "fedml STAND-IN in use" in proc.stdout

    summary = json.loads((out / "summary.json").read_text())
    assert summary["environment"]["fedml_standin"] is True
    assert summary["phases"]["vs_released"]["status"] == "ok"
    assert summary["phases"]["study_cost"]["status"] == "ok"

    vs = json.loads((out / "vs_released.json").read_text())
    ours = vs["summary"]["ours"]
    assert ours["s_per_round"] > 0 and ours["ms_per_train_pass"] > 0
    assert vs["results"]["ours"]["device"] == "cpu"
    assert vs["results"].get("released") is None

    cost = json.loads((out / "study_cost.json").read_text())
    assert cost["mode"] == "no-tracking" and cost["failed"] == {}
    for level in ("1", "2"):
        per_run = cost["levels"][level]["per_run"]
        assert set(per_run) == {"fedavg", "fedselectv2_e1"}
        assert all(r["seconds_per_round"] > 0 and r["seconds_per_run"] > 0 for r in per_run.values())
        assert cost["levels"][level]["mix_run_rounds_per_s"] > 0
    # J = 2 really ran both runs at once: their measured rounds overlap in time
    jobs = {j["run"]: j for j in cost["levels"]["2"]["jobs"]}
    assert len(jobs) == 2 and all(j["concurrent"] == 2 for j in jobs.values())
    projection = cost["projection"]
    assert projection["best_J"] in (1, 2) and projection["best_total_hours"] > 0
    assert set(projection["basis"]) == set(cost["levels"]["1"]["per_run"]) | set(projection["basis"])
    assert (out / "gpu_check.log").read_text().count("STAND-IN") >= 1
    assert (out / "child_logs.tar.gz").stat().st_size > 0

    # step 2c: one call of the clients, one after another and batched
    assert summary["phases"]["client_batching"]["status"] == "ok"
    assert summary["client_batching"]["largest_parameter_difference"] < 1e-5
    # step 2d: one selection of the whole model by every method, the same entries
    assert summary["phases"]["topk"]["status"] == "ok"
    assert summary["topk_methods"]["same_entries"] is True and summary["topk_methods"]["radix"] > 0
    # step 3b: the same runs with a round's clients trained as one batch
    assert summary["phases"]["study_cost_batched"]["status"] == "ok"
    batched = json.loads((out / "study_cost_batched.json").read_text())
    assert batched["failed"] == {} and "train.client_batching=true" in batched["overrides"]
    assert all(r["seconds_per_round"] > 0 for r in batched["levels"]["1"]["per_run"].values())
    assert all(job["batching"]["calls_in_batches"] > 0 for job in batched["levels"]["1"]["jobs"])
    assert all(job["batching"] is None for job in cost["levels"]["1"]["jobs"])
    assert summary["study_cost_batched"]["best_total_hours"] > 0


def test_tiny_check_gradltn_parts(tiny_gpu_dir: Path, tmp_path: Path) -> None:
    """The opt-in phase 2e: the paper's FedSelect alone, its round split into parts."""
    out = tmp_path / "out"
    proc = run_check(tiny_gpu_dir, out, "--phases", "gradltn_parts")
    assert proc.returncode == 0, failure_text(proc, out)
    parts = json.loads((out / "summary.json").read_text())["gradltn_parts"]
    assert parts["s_per_round"] > 0 and parts["mask_s_per_round"] > 0 and parts["train_s_per_round"] > 0
    assert parts["train_passes_per_round"] > 0


def test_tiny_check_released_side(tiny_gpu_dir: Path, tmp_path: Path) -> None:
    if not (RELEASED / "fedselect.py").is_file():
        pytest.skip("the released code's export .gpu/released is absent (bench/gpu_check --prepare "
                    "--released-src <git dir of lapisrocks/fedselect> makes it; CI has no network)")
    gpu = tmp_path / "gpu"
    gpu.mkdir()
    (gpu / "data").symlink_to(tiny_gpu_dir / "data")
    shutil.copytree(RELEASED, gpu / "released")
    out = tmp_path / "out"
    proc = run_check(gpu, out, "--sides", "both", "--phases", "vs_released")
    assert proc.returncode == 0, failure_text(proc, out)
    vs = json.loads((out / "vs_released.json").read_text())
    for side in ("ours", "released"):
        assert vs["summary"][side]["s_per_round"] > 0
        assert vs["summary"][side]["ms_per_train_pass"] > 0
        assert vs["results"][side]["device"] == "cpu"
    assert vs["spec"]["device"] == "cpu"


def test_standin_matches_fedml(tmp_path: Path) -> None:
    """The stand-in gives the args, seeds and default hooks FedML 0.9.6 gives (where FedML is installed)."""
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    results = {}
    for name, extra in (("fedml", []), ("standin", [str(REPO / "bench" / "gpu_standin")])):
        # HOME too: FedMLRunner.run() writes ~/.fedml/fedml_trace/<pid> (both do)
        env = {**os.environ, "FEDSELECT_FEDML_HOME": str(tmp_path / name), "HOME": str(tmp_path / f"{name}-home"),
               "PYTHONPATH": os.pathsep.join([*extra, str(REPO / "plugin")])}
        proc = subprocess.run([sys.executable, str(probe)], env=env, capture_output=True, text=True, timeout=120)
        if name == "fedml" and proc.returncode == 3:
            pytest.skip("FedML is not installed here: nothing to compare the stand-in with")
        assert proc.returncode == 0, proc.stderr[-3000:]
        results[name] = json.loads(proc.stdout.strip().splitlines()[-1])
    assert results["standin"].pop("standin") is True
    assert results["fedml"].pop("standin") is False
    assert results["standin"] == results["fedml"]


PROBE = '''
import json, os, sys
try:
    import fedml
except ImportError:
    sys.exit(3)
import torch
from fedselect.config import load_config_dict
from fedselect.fedml_runtime.runtime import build_fedml_args, fedml_sections

config = load_config_dict({"algorithm": "fedavg", "seed": 7, "data": {"dataset": "cifar10"}, "model": {"name": "cnn"}})
args = build_fedml_args(fedml_sections(config))
seeded = torch.rand(3).tolist()


class Client(fedml.core.ClientTrainer):
    def get_model_params(self): return {}
    def set_model_params(self, p): pass
    def train(self, data, device, args): pass


class Server(fedml.core.ServerAggregator):
    def get_model_params(self): return {}
    def set_model_params(self, p): pass
    def test(self, data, device, args): pass


client, server = Client("model", args), Server("model", args)
uploads = [(1.0, {"w": torch.tensor([1.0, 2.0])}), (3.0, {"w": torch.tensor([5.0, 6.0])})]
before = server.on_before_aggregation(list(uploads))
hooks = [client.on_before_local_training(None, "cpu", args), client.on_after_local_training(None, "cpu", args),
         client.test(None, "cpu", args)]
print(json.dumps({
    "standin": getattr(fedml, "STANDIN", False),
    "args": {k: repr(v) for k, v in sorted(vars(args).items())},
    "seeded": seeded, "cudnn_deterministic": torch.backends.cudnn.deterministic,
    "env": [os.environ.get("FEDML_ENV_VERSION"), os.environ.get("KMP_DUPLICATE_LIB_OK")],
    "client": {k: repr(v) for k, v in sorted(vars(client).items()) if k != "args"},
    "server": sorted(k for k in vars(server) if k != "contribution_assessor_mgr"),
    "before": [len(before[0]), before[1]], "hooks": hooks,
    "aggregate": server.aggregate([(n, dict(p)) for n, p in uploads])["w"].tolist(),
    "after": server.on_after_aggregation("same"),
    "flow": fedml.FedMLRunner(args, "cpu", [], None, algorithm_flow=type("F", (), {"run": lambda s: None})()).run(),
}))
'''
