"""Screenshots of what a user sees: the MLflow run page, the experiment's chart view, the compare
view of a study's runs, and the study's figures, taken with headless Chromium.

    python docs/screenshots/take.py                      # runs a small study first (about 3 min, 2 cores)
    python docs/screenshots/take.py --results results    # screenshots of an existing study's results
    python docs/screenshots/take.py --study default --out docs/screenshots

Needs a `chromium` (or `chromium-browser`, `google-chrome`) on PATH (`apt-get install chromium`);
starts `mlflow ui` on a free loopback port for the duration. Writes mlflow_run.png,
mlflow_charts.png, mlflow_compare.png and figures.png into --out.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BROWSERS = ("chromium", "chromium-browser", "google-chrome")
# a small study with the features the screenshots show: a grid, display names, paired runs
SMALL_STUDY = """study: screenshots
description: screenshot study, CIFAR-10 pathological s=2, 6 clients, small CNN, 4 rounds, 2 seeds
seeds: [0, 1]
base: {base}
labels: {{algo.p: p}}
paired: [[fedselect_p0.5, fedavg]]
runs:
  fedavg: {{algorithm: fedavg}}
  fedrep: {{algorithm: fedrep}}
  fedselect: {{algorithm: fedselect, grid: {{algo.p: [0.25, 0.5]}}}}
  layersel_ilp: {{algorithm: layersel, algo: {{strategy: ilp, budget: 0.67}}}}
"""
SMALL_BASE = {"device": "cpu", "data": {"dataset": "cifar10", "partition": {
    "kind": "pathological", "num_clients": 6, "classes_per_client": 2, "train_per_class": 10, "test_per_class": 20}},
    "model": {"name": "cnn"}, "train": {"rounds": 4, "local_epochs": 1, "batch_size": 16, "lr": 0.01}}


def browser() -> str:
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    raise SystemExit(f"take.py: error: no headless browser on PATH ({', '.join(BROWSERS)}); "
                     "install one, e.g. `apt-get install chromium`")


def run_small_study(work: Path) -> tuple[Path, str]:
    """Run the small study with Snakemake; returns (results dir, study name)."""
    import yaml

    base = work / "base.yaml"
    base.write_text(yaml.safe_dump(SMALL_BASE))
    study = work / "screenshots.yaml"
    study.write_text(SMALL_STUDY.format(base=base.name))
    results = work / "results"
    snakemake = Path(sys.executable).with_name("snakemake")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    print("running the small study (snakemake) ...", flush=True)
    subprocess.run([str(snakemake), "all", "--cores", "2", "--config", f"study_file={study}",
                    f"results_dir={results}"], cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL)
    return results, "screenshots"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_mlflow(store: Path, port: int) -> subprocess.Popen:
    mlflow = Path(sys.executable).with_name("mlflow")
    proc = subprocess.Popen([str(mlflow), "ui", "--backend-store-uri", f"sqlite:///{store}", "--host", "127.0.0.1",
                             "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(120):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
            return proc
        except OSError:
            time.sleep(0.5)
    proc.terminate()
    raise SystemExit("take.py: error: mlflow ui did not answer within 60 s")


def shoot(url: str, out: Path, *, size: str = "1600,1000", wait_ms: int = 20000) -> None:
    """One page as PNG; virtual time lets the MLflow UI's scripts fetch and draw before the shot."""
    subprocess.run([browser(), "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--window-size={size}", f"--virtual-time-budget={wait_ms}", f"--screenshot={out}", url],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=180)
    print(f"wrote {out} ({out.stat().st_size // 1024} KiB)")


def figures_page(figures: Path, work: Path) -> Path:
    """An HTML page showing the study's figures two per row, as a reader of the report sees them."""
    index = json.loads((figures / "index.json").read_text())
    cells = "".join(f'<figure><img src="{(figures / f["file"]).resolve().as_uri()}"><figcaption>{f["caption"]}'
                    f"</figcaption></figure>" for f in index["figures"])
    page = work / "figures.html"
    page.write_text("<html><body style='font-family:sans-serif;margin:16px'><style>figure{display:inline-block;"
                    "width:48%;vertical-align:top;margin:0 1% 16px 0}img{width:100%}figcaption{font-size:13px}"
                    f"</style>{cells}</body></html>")
    return page


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, help="an existing results dir (with mlflow.db and <study>/figures); "
                                                     "default: run a small study in a temporary folder")
    parser.add_argument("--study", default=None, help="the study (experiment) to show (with --results)")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "screenshots", help="where the PNGs go")
    ns = parser.parse_args(argv)
    browser()
    ns.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="fedselect-shots-") as tmp:
        work = Path(tmp)
        results, study = (ns.results, ns.study or "default") if ns.results else run_small_study(work)
        from mlflow.tracking import MlflowClient

        store = (results / "mlflow.db").resolve()
        client = MlflowClient(f"sqlite:///{store}")
        experiment = client.get_experiment_by_name(study)
        if experiment is None:
            raise SystemExit(f"take.py: error: no experiment {study!r} in {store}")
        runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])
        port = free_port()
        server = start_mlflow(store, port)
        try:
            root, eid = f"http://127.0.0.1:{port}/#", experiment.experiment_id
            shoot(f"{root}/experiments/{eid}/runs/{runs[-1].info.run_id}", ns.out / "mlflow_run.png")
            shoot(f"{root}/experiments/{eid}?compareRunsMode=CHART", ns.out / "mlflow_charts.png")
            ids = json.dumps([r.info.run_id for r in runs if r.data.tags.get("seed") == "0"])
            query = urllib.parse.urlencode({"runs": ids, "experiments": json.dumps([eid])})
            shoot(f"{root}/compare-runs?{query}", ns.out / "mlflow_compare.png", size="1600,1400")
        finally:
            server.terminate()
            server.wait(timeout=30)
        shoot(figures_page(results / study / "figures", work).as_uri(), ns.out / "figures.png", size="1600,1500",
              wait_ms=2000)
    return 0


if __name__ == "__main__":
    sys.exit(main())
