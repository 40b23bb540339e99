"""Several measurement children on one device at once (bench/study_cost.py --concurrent J1,J2,...):
waves of J jobs that pass a start line together and stop together, their per-run costs, and the
study's projection per J (the method is in bench/study_cost.py's docstring)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fedselect.study import Study

REPO = Path(__file__).resolve().parents[1]
# the script whose --child mode each job runs
STUDY_COST = Path(__file__).resolve().with_name("study_cost.py")


def tail(path: Path, lines: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def fmt_opt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


Setup = dict[str, tuple[dict[str, Any], list[str]]]  # run -> (its config mapping, overrides)
Schedules = dict[str, tuple[int, int, int]]  # run -> (K, period, first steady round)


@dataclass
class Job:
    label: str
    run: str
    k: int
    period: int
    first: int
    dir: Path
    proc: subprocess.Popen | None = None

    @property
    def progress_path(self) -> Path:
        return self.dir / "progress.json"

    @property
    def log_path(self) -> Path:
        return self.dir / "child.log"

    def progress(self) -> dict[str, Any]:
        try:
            return json.loads(self.progress_path.read_text())
        except (OSError, ValueError):
            return {}


@dataclass
class JobCost:
    label: str
    run: str
    concurrent: int
    rounds_done: int
    rounds_wanted: int
    window: tuple[int, int]
    whole_periods: bool
    seconds_per_round: float
    startup_seconds: float
    warmup_seconds: float
    seconds_per_run: float
    round_seconds: list[float]
    passes_per_round: float | None
    threads: int
    device: str
    # with train.client_batching: the run's training calls trained in batches and alone, so far
    # (fedselect.fedml_runtime.simulation.SimulationFlow.batching); None without
    batching: dict[str, int] | None = None


def steady_window(done: int, period: int, first: int) -> tuple[int, int, bool]:
    """Window a..b over rounds 0..done-1 (no forced last evaluation); round 0 only when nothing else ran."""
    last = done - 1
    if last < 1:
        return 0, 0, False
    periods = (last - first + 1) // period
    if periods >= 1:
        return first, first + periods * period - 1, True
    return 1, last, False


def job_cost(job: Job, concurrent: int, rounds_study: int) -> JobCost:
    """A stopped child's figures from its progress file (round 0 starts at the start signal)."""
    prog = job.progress()
    ends, go = prog["ends"], prog["go"]
    if not ends:
        raise RuntimeError(f"{job.label}: no round finished (log: {job.log_path})")
    a, b, whole = steady_window(len(ends), job.period, job.first)

    def t(r: int) -> float:
        return ends[r] if r >= 0 else go

    per_round = (t(b) - t(a - 1)) / (b - a + 1)
    startup = prog["ready"] - prog["launched"]
    warmup = t(a - 1) - go
    passes = prog["passes"]
    return JobCost(label=job.label, run=job.run, concurrent=concurrent, rounds_done=len(ends), rounds_wanted=job.k,
                   window=(a, b), whole_periods=whole and len(ends) >= job.k, seconds_per_round=per_round,
                   startup_seconds=startup, warmup_seconds=warmup,
                   seconds_per_run=startup + warmup + max(rounds_study - a, 0) * per_round,
                   round_seconds=[round(t(r) - t(r - 1), 3) for r in range(len(ends))],
                   passes_per_round=sum(passes) / len(passes) if passes else None,
                   threads=prog.get("threads", 0), device=prog.get("device", "?"), batching=prog.get("batching"))


def launch_job(job: Job, mapping: dict[str, Any], overrides: list[str], go: Path, threads: int,
               stop_after: int | None, go_timeout_s: float) -> None:
    job.dir.mkdir(parents=True, exist_ok=True)
    job.progress_path.unlink(missing_ok=True)
    spec = {"mapping": mapping, "overrides": [*overrides, f"tracking.results_dir={job.dir / 'results'}"],
            "progress": str(job.progress_path), "go": str(go), "threads": threads, "stop_after": stop_after,
            "go_timeout_s": go_timeout_s, "launched": time.time()}
    (job.dir / "job.json").write_text(json.dumps(spec))
    env = {**{k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}, "OMP_NUM_THREADS": str(threads),
           "MKL_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    with job.log_path.open("w") as log:
        cmd = [sys.executable, str(STUDY_COST), "--child", str(job.dir / "job.json")]
        job.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)


def stop_jobs(jobs: list[Job], grace_s: float = 5.0) -> None:
    """Terminate every child still running (what they measured is already in their progress files)."""
    for job in jobs:
        if job.proc is not None and job.proc.poll() is None:
            job.proc.terminate()
    end = time.time() + grace_s
    for job in jobs:
        if job.proc is None:
            continue
        try:
            job.proc.wait(timeout=max(0.1, end - time.time()))
        except subprocess.TimeoutExpired:
            job.proc.kill()
            job.proc.wait()


def run_wave(jobs: list[Job], setup: Setup, concurrent: int, threads: int,
             budget_s: float, work: Path) -> tuple[list[Job], dict[str, str], float]:
    """Launch the jobs together, start them together, stop them together once each measured K rounds.

    Returns the jobs that started, the failures (label -> reason with the log's tail) and the wall seconds.
    """
    start = time.time()
    deadline = start + budget_s
    go = work / f"go-J{concurrent}-{jobs[0].label}"
    go.unlink(missing_ok=True)
    single = len(jobs) == 1
    for job in jobs:
        mapping, overrides = setup[job.run]
        launch_job(job, mapping, overrides, go, threads, job.k if single else None, go_timeout_s=budget_s + 60)
    failed: dict[str, str] = {}

    def check_exits() -> None:
        for job in jobs:
            if job.label not in failed and job.proc.poll() not in (None, 0):
                failed[job.label] = f"exited with {job.proc.returncode}; last lines of its log:\n{tail(job.log_path)}"

    while time.time() < deadline:  # the start line: every child has built its federation
        check_exits()
        if all(job.label in failed or "ready" in job.progress() for job in jobs):
            break
        time.sleep(0.1)
    started = [job for job in jobs if job.label not in failed and "ready" in job.progress()]
    for job in jobs:
        if job not in started and job.label not in failed:
            failed[job.label] = f"not ready within the time share ({budget_s:.0f} s); last lines:\n{tail(job.log_path)}"
    go.touch()
    while time.time() < deadline and started:
        check_exits()
        running = [j for j in started if j.label not in failed]
        if all(len(j.progress().get("ends", [])) >= j.k or j.proc.poll() == 0 for j in running):
            break
        time.sleep(0.2)
    check_exits()
    stop_jobs(jobs)  # what they measured is in their progress files; exits from here on are ours
    return [j for j in started if j.label not in failed], failed, time.time() - start


def wave_jobs(runs: list[str], concurrent: int, schedules: Schedules, work: Path,
              wave: str) -> list[Job]:
    """J job slots filled with the runs in turn (run#copy labels)."""
    jobs = []
    for slot in range(concurrent):
        run = runs[slot % len(runs)]
        k, period, first = schedules[run]
        label = f"{run}#{slot // len(runs) + 1}"
        jobs.append(Job(label=label, run=run, k=k, period=period, first=first, dir=work / wave / label))
    return jobs


WAVE_RESERVE_S = 20.0  # kept back for each later wave of a level (its start-up and a few rounds)


def level_weight(level: int, n_runs: int) -> float:
    """A level's share of --deadline-s: J = 1 runs its n runs one after the other, so it gets more."""
    return max(1.0, n_runs / 2) if level == 1 else 1.0


def wave_budget(level_left: float, waves_left: int) -> float:
    """This wave's time: what the level has left, less a reserve for its later waves, at least a fair part."""
    return max(level_left - WAVE_RESERVE_S * (waves_left - 1), level_left / waves_left)


def measure_concurrency(runs: list[str], levels: list[int], setup: Setup, schedules: Schedules,
                        rounds_study: dict[str, int], ns: argparse.Namespace,
                        work: Path) -> tuple[dict[int, list[JobCost]], dict[str, str], dict[int, float]]:
    """Every level J: its waves (J = 1: one run at a time), their job costs, failures and wall seconds.

    Under --deadline-s each level gets its weighted share of the time left (unused time passes on).
    """
    costs: dict[int, list[JobCost]] = {}
    failed: dict[str, str] = {}
    walls: dict[int, float] = {}
    deadline = time.time() + ns.deadline_s if ns.deadline_s else None
    for i, level in enumerate(levels):
        waves = [[run] for run in runs] if level == 1 else [runs]
        costs[level], walls[level] = [], 0.0
        threads = ns.threads or max(1, (os.cpu_count() or 1) // level)
        weights = [level_weight(j, len(runs)) for j in levels[i:]]
        level_end = None if deadline is None else time.time() + (deadline - time.time()) * weights[0] / sum(weights)
        for w, wave_runs in enumerate(waves):
            budget = 24 * 3600.0 if level_end is None else wave_budget(level_end - time.time(), len(waves) - w)
            jobs = wave_jobs(wave_runs, level, schedules, work, f"J{level}")
            print(f"J={level}: {', '.join(j.label for j in jobs)} ({threads} thread(s) each, "
                  f"{f'up to {budget:.0f} s' if deadline else 'no deadline'}) ...", file=sys.stderr, flush=True)
            if budget < 5:
                failed.update({f"J{level}:{j.label}": "no time left under --deadline-s" for j in jobs})
                continue
            done, wave_failed, wall = run_wave(jobs, setup, level, threads, budget, work)
            walls[level] += wall
            failed.update({f"J{level}:{label}": why for label, why in wave_failed.items()})
            for job in done:
                try:
                    costs[level].append(job_cost(job, level, rounds_study[job.run]))
                except (RuntimeError, KeyError) as exc:
                    failed[f"J{level}:{job.label}"] = f"{exc}; last lines:\n{tail(job.log_path)}"
    return costs, failed, walls


def per_run(costs: list[JobCost]) -> dict[str, dict[str, Any]]:
    """Each run's mean figures over its copies at one level J."""
    out: dict[str, dict[str, Any]] = {}
    for run in dict.fromkeys(c.run for c in costs):
        mine = [c for c in costs if c.run == run]
        out[run] = {key: sum(getattr(c, key) for c in mine) / len(mine)
                    for key in ("seconds_per_round", "startup_seconds", "seconds_per_run")}
        out[run].update(copies=len(mine), partial=any(not c.whole_periods for c in mine))
    return out


def parse_proxies(items: list[str], study: Study) -> dict[str, str]:
    proxies = {}
    for item in ",".join(items).split(","):
        if not item.strip():
            continue
        run, _, measured = item.partition("=")
        if run not in study.runs or measured not in study.runs:
            raise SystemExit(f"--proxy {item!r}: both sides must be runs of study {study.name!r}")
        proxies[run] = measured
    return proxies


def projection(study: Study, by_level: dict[int, dict[str, dict[str, Any]]], proxies: dict[str, str],
               seeds: int) -> dict[str, Any]:
    """The whole study's total at each J, from measured runs and proxies; None where a run has neither."""
    totals: dict[str, float | None] = {}
    basis = {run: run if any(run in m for m in by_level.values()) else proxies.get(run) for run in study.runs}
    for level, runs in by_level.items():
        if not runs or any(basis[r] not in runs for r in study.runs):
            totals[str(level)] = None
            continue
        totals[str(level)] = sum(runs[basis[r]]["seconds_per_run"] for r in study.runs) * seeds / level / 3600
    known = {k: v for k, v in totals.items() if v is not None}
    best = min(known, key=known.get) if known else None
    return {"basis": basis, "total_hours_by_J": totals, "best_J": int(best) if best else None,
            "best_total_hours": known.get(best) if best else None}


def report_concurrency(study: Study, costs: dict[int, list[JobCost]], walls: dict[int, float],
                       proxies: dict[str, str], seeds: int) -> dict[str, Any]:
    by_level = {level: per_run(c) for level, c in costs.items()}
    print("\nseveral jobs on one device (no-tracking children; s per run for R = the study's rounds)")
    header = f"{'J':>3} {'job':<22} {'rounds':>7} {'window':>8} {'s/round':>9} {'start-up s':>10} {'s per run':>10} " \
             f"{'passes/round':>12} {'threads':>7}"
    print(header + "\n" + "-" * len(header))
    for level, jobs in costs.items():
        for c in jobs:
            win = f"{c.window[0]}-{c.window[1]}" + ("" if c.whole_periods else "*")
            print(f"{level:>3} {c.label:<22} {f'{c.rounds_done}/{c.rounds_wanted}':>7} {win:>8} "
                  f"{c.seconds_per_round:>9.3f} {c.startup_seconds:>10.1f} {c.seconds_per_run:>10.0f} "
                  f"{'' if c.passes_per_round is None else f'{c.passes_per_round:.0f}':>12} {c.threads:>7}")
    print("* partial window (fewer rounds than K, or than one whole period)")
    mix: dict[str, float | None] = {}
    base = by_level.get(1)
    print(f"\n{'J':>3} {'mix run-rounds/s':>17} {'vs J=1':>7}  per-run s/round (slowdown vs J=1)")
    for level, runs in by_level.items():
        total = sum(r["seconds_per_round"] for r in runs.values())
        mix[str(level)] = len(runs) * level / total if total else None
        ref = (len(base) / sum(r["seconds_per_round"] for r in base.values())) if base else None
        ratio = f"{mix[str(level)] / ref:.2f}" if ref and mix[str(level)] else "-"
        detail = ", ".join(f"{run} {r['seconds_per_round']:.2f}"
                           + (f" ({r['seconds_per_round'] / base[run]['seconds_per_round']:.2f}x)"
                              if base and run in base else "") for run, r in runs.items())
        print(f"{level:>3} {fmt_opt(mix[str(level)], '.3f'):>17} {ratio:>7}  {detail}")
    proj = projection(study, by_level, proxies, seeds)
    proxied = {r: b for r, b in proj["basis"].items() if b and b != r}
    missing = [r for r, b in proj["basis"].items() if not b]
    if proxied:
        print(f"\nruns costed by a measured proxy (--proxy): {', '.join(f'{r}={b}' for r, b in proxied.items())}")
    if missing:
        print(f"no figure for the whole study: runs neither measured nor proxied: {', '.join(missing)}")
    for level, hours in proj["total_hours_by_J"].items():
        if hours is not None:
            print(f"study {study.name}, all {len(study.runs)} runs x {seeds} seeds, {level} job(s) per device: "
                  f"{hours:.2f} h")
    if proj["best_J"]:
        print(f"best: {proj['best_J']} jobs per device, {proj['best_total_hours']:.2f} h of one device")
    return {"levels": {str(k): {"jobs": [asdict(c) for c in v], "per_run": by_level[k], "wall_seconds": walls.get(k),
                                "mix_run_rounds_per_s": mix.get(str(k))} for k, v in costs.items()},
            "projection": proj}
