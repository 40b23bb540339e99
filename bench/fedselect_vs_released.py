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
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the modules beside this script
from vs_released_children import child_baseline, child_ours, child_prep, child_released  # noqa: E402
from vs_released_report import SIDES, equal_work_rounds, pair_summaries, print_repeats, print_report  # noqa: E402

RELEASED_ENV = "FEDSELECT_RELEASED_REPO"


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
                        help="after the timed runs, run our side again under cProfile, print the top 15 and "
                        "keep the whole profile in <work-dir>/profile-ours.pstats")
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
        stats_path = work / f"profile-{side}.pstats"
        prof_spec = {**spec, "profile": side == "ours", "profile_released": side == "released",
                     "profile_stats": str(stats_path)}
        prof_path = work / f"spec-profile-{side}.json"
        prof_path.write_text(json.dumps(prof_spec))
        print(f"\nprofiling {side} under cProfile ({ns.rounds} rounds; times inflated by the profiler) ...",
              flush=True)
        res, _, _ = launch(side, prof_path, work, prep_path, f"profile-{side}", ns.device)
        if res and res.get("profile"):
            profiles[side] = res["profile"]
            print(res["profile"])
            print(f"(all of it: {stats_path}, for python -m pstats)")
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
