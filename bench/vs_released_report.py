"""The report of bench/fedselect_vs_released.py: which rounds count, per-side summaries, the tables.

**Equal-work rounds.** Per round the two sides do not always do the same work: ours skips the
personal pass while a client's mask is still empty (the released code runs it with nothing to
update), the first round carries warm-up, and the released code does not aggregate in its last
round. So when both sides ran, the per-round figures and their ratios are taken over the rounds
that are neither the first nor the last and in which both sides made the same number of training
sample passes (:func:`equal_work_rounds`; with the default schedule, ``--rounds 7`` gives rounds
2-5). One side alone counts its own rounds of full work the same way. Where there are none
(fewer rounds), all rounds but the first count (all of them below 3 rounds), and the report
says so.
"""

from __future__ import annotations

import statistics
from typing import Any

SIDES = ("released", "ours")


def equal_work_rounds(results: dict[str, dict | None]) -> list[int]:
    """Indices of the rounds, neither first nor last, where both sides made the same training passes.

    With one side alone: its rounds, neither first nor last, with its most training passes (ours:
    from round 2, as in a pair), so that a run of one side compares with a pair's figures.
    """
    passes = [{r["round"]: r["train_passes"] for r in (results.get(side) or {}).get("rounds") or []}
              for side in SIDES]
    ran = [side for side in passes if side]
    if not ran:
        return []
    last = min(max(side) for side in ran)
    inner = sorted(i for i in set.intersection(*(set(side) for side in ran)) if 0 < i < last)
    if len(ran) == 1:
        most = max((ran[0][i] for i in inner), default=None)
        return [i for i in inner if ran[0][i] == most]
    return [i for i in inner if passes[0][i] == passes[1][i]]


def measured(rounds: list[dict[str, Any]], only: list[int] | None = None) -> list[dict[str, Any]]:
    """The rounds that count: those in ``only`` when given and any ran, else all of them, or all but
    the first (warm-up) when there are >= 3."""
    if only:
        return [r for r in rounds if r["round"] in only]
    return rounds[1:] if len(rounds) >= 3 else rounds


def pair_summaries(results: dict[str, dict | None]) -> dict[str, dict[str, float | None]]:
    """Each side's summary over the equal-work rounds (or the fallback rounds when there are none)."""
    only = equal_work_rounds(results)
    return {side: summary(results.get(side), only) for side in SIDES}


def summary(res: dict[str, Any] | None, only: list[int] | None = None) -> dict[str, float | None]:
    """One side's per-round medians and per-pass figures over :func:`measured` rounds, and its memory."""
    if not res or not res["rounds"]:
        return {}
    rs = measured(res["rounds"], only)
    seconds = sum(r["seconds"] for r in rs)
    cpu_seconds = sum(r["cpu_seconds"] for r in rs)
    passes = sum(r["train_passes"] for r in rs)
    return {
        "s_per_round": statistics.median(r["seconds"] for r in rs),
        "cpu_s_per_round": statistics.median(r["cpu_seconds"] for r in rs),
        "train_passes_per_round": statistics.median(r["train_passes"] for r in rs),
        "eval_passes_per_round": statistics.median(r["eval_passes"] for r in rs),
        "ms_per_train_pass": 1000 * seconds / passes if passes else None,
        "cpu_ms_per_train_pass": 1000 * cpu_seconds / passes if passes else None,
        "eval_s_per_round": statistics.median(r["eval_seconds"] or 0.0 for r in rs),
        "mask_s_per_round": statistics.median(r["mask_seconds"] for r in rs),
        "train_s_per_round": statistics.median(r["train_seconds"] for r in rs),
        "other_s_per_round": statistics.median(r["other_seconds"] for r in rs),
        "train_ms_per_train_pass": 1000 * sum(r["train_seconds"] for r in rs) / passes if passes else None,
        "peak_rss_mib": res["hwm_total_kb"] / 1024,
        "peak_rss_rounds_mib": res["hwm_rounds_kb"] / 1024 if res["hwm_rounds_kb"] else None,
        "rss_after_setup_mib": res["rss_after_setup_kb"] / 1024,
        "rounds_growth_mib": ((res["hwm_rounds_kb"] - res["rss_after_setup_kb"]) / 1024
                              if res["hwm_rounds_kb"] else None),
        "setup_s": res["setup_seconds"],
    }


def print_repeats(reps: list[dict[str, dict[str, float | None]]]) -> dict[str, float | None]:
    """Per run: both sides' s per round and the ratios; then the median and range of the ratios."""
    rows = []
    for rep in reps:
        rel, ours = rep.get("released") or {}, rep.get("ours") or {}
        ratio = (rel["s_per_round"] / ours["s_per_round"]) if rel.get("s_per_round") and ours.get("s_per_round") \
            else None
        per_pass = (rel["ms_per_train_pass"] / ours["ms_per_train_pass"]) \
            if rel.get("ms_per_train_pass") and ours.get("ms_per_train_pass") else None
        rows.append((rel.get("s_per_round"), ours.get("s_per_round"), ratio, per_pass))
    print(f"\nrepeats: {'run':>3} {'released s/round':>17} {'ours s/round':>13} {'ratio':>7} {'per pass':>9}")
    for i, (a, b, r, q) in enumerate(rows, 1):
        print(f"         {i:3d} {fmt(a):>17} {fmt(b):>13} {fmt(r):>7} {fmt(q):>9}")
    ratios = [r for _, _, r, _ in rows if r is not None]
    per_pass = [q for _, _, _, q in rows if q is not None]
    med = {"ratio_median": statistics.median(ratios) if ratios else None,
           "ratio_min": min(ratios) if ratios else None, "ratio_max": max(ratios) if ratios else None,
           "per_pass_ratio_median": statistics.median(per_pass) if per_pass else None}
    print(f"released/ours per round: median {fmt(med['ratio_median'])} (range {fmt(med['ratio_min'])}-"
          f"{fmt(med['ratio_max'])}); per train sample pass: median {fmt(med['per_pass_ratio_median'])}")
    return med


def fmt(v: float | None, spec: str = ".2f") -> str:
    return "-" if v is None else format(v, spec)


def print_report(spec: dict[str, Any], results: dict[str, dict | None], maxrss: dict[str, int]) -> None:
    sums = pair_summaries(results)
    only = equal_work_rounds(results)
    print()
    print(f"setting: CIFAR-10, {spec['clients']} clients, pathological s=2, {spec['train_per_class']} train / "
          f"{spec['test_per_class']} test per class per client, {spec['model']} (random init), "
          f"{spec['rounds']} rounds, {spec['local_epochs']} LocalAlt epoch(s) per round, batch {spec['batch_size']}, "
          f"lr {spec['lr']}, p {spec['p']}, mask update every {spec['mask_every']} round(s), "
          f"released grad clipping {'on' if spec['released_clip'] else 'off'}, our mask search: {spec['ours_search']}")
    threads = {s: (results[s] or {}).get("torch_threads") for s in SIDES if results.get(s)}
    devices = {s: (results[s] or {}).get("device") for s in SIDES if results.get(s)}
    print(f"device (--device {spec.get('device', 'cpu')}): {devices}")
    print(f"ours at {spec.get('ours_commit')}; released at {spec.get('released_commit')}")
    counted = (f"the equal-work rounds {only} (the same training passes on both sides, or a lone side's full "
               f"work; not the first, warm-up, nor the last, where the released code does not aggregate)" if only
               else f"{'all but the first' if spec['rounds'] >= 3 else 'all'} (no equal-work rounds: --rounds 5 "
               f"or more gives some)")
    print(f"torch threads: {threads}; rounds measured: {counted}; median for per-round figures")
    rows = [
        ("seconds per round (wall)", "s_per_round", ".2f"),
        ("CPU seconds per round (all threads)", "cpu_s_per_round", ".2f"),
        ("train sample passes per round", "train_passes_per_round", ".0f"),
        ("eval sample forwards per round", "eval_passes_per_round", ".0f"),
        ("ms per train sample pass (eval incl.)", "ms_per_train_pass", ".3f"),
        ("CPU ms per train sample pass", "cpu_ms_per_train_pass", ".3f"),
        ("  of which training passes", "train_s_per_round", ".2f"),
        ("  of which evaluation", "eval_s_per_round", ".2f"),
        ("  of which mask update", "mask_s_per_round", ".2f"),
        ("  of which other (server, up/download)", "other_s_per_round", ".2f"),
        ("ms per train sample pass, training only", "train_ms_per_train_pass", ".3f"),
        ("peak RSS, whole process (MiB)", "peak_rss_mib", ".0f"),
        ("peak RSS during rounds (MiB)", "peak_rss_rounds_mib", ".0f"),
        ("RSS after setup (MiB)", "rss_after_setup_mib", ".0f"),
        ("peak during rounds - RSS after setup", "rounds_growth_mib", ".0f"),
        ("setup seconds (imports, data, model)", "setup_s", ".1f"),
    ]
    width = max(len(r[0]) for r in rows) + 2
    print(f"\n{'':{width}}{'released':>12}{'ours':>12}{'released/ours':>16}")
    for label, key, f in rows:
        a, b = sums["released"].get(key), sums["ours"].get(key)
        ratio = a / b if a is not None and b else None
        print(f"{label:{width}}{fmt(a, f):>12}{fmt(b, f):>12}{fmt(ratio, '.2f'):>16}")
    if spec.get("baseline_rss_kb"):
        print(f"(for reference: RSS after just 'import torch, torchvision': {spec['baseline_rss_kb'] / 1024:.0f} MiB)")
    print(f"{'wait4 ru_maxrss (MiB)':{width}}{fmt(maxrss.get('released', 0) / 1024 or None, '.0f'):>12}"
          f"{fmt(maxrss.get('ours', 0) / 1024 or None, '.0f'):>12}")
    for side in SIDES:
        res = results.get(side)
        if not res:
            continue
        print(f"\n{side}: per round")
        print("  round  seconds  cpu_s  train_passes  (in eval mode)  eval_fwd  train_s  eval_s  mask_s  other_s"
              "  train_loss  mean_acc")
        for r in res["rounds"]:
            print(f"  {r['round']:>5}  {r['seconds']:>7.2f}  {r['cpu_seconds']:>5.1f}  {r['train_passes']:>12}"
                  f"  {r['train_passes_eval_mode']:>14}"
                  f"  {r['eval_passes']:>8}  {r['train_seconds']:>7.2f}  {fmt(r['eval_seconds']):>6}"
                  f"  {r['mask_seconds']:>6.2f}  {r['other_seconds']:>7.2f}"
                  f"  {fmt(r['train_loss'], '.4f'):>10}  {fmt(r['mean_acc'], '.4f'):>8}")
        if res.get("final_personal_fraction_mean") is not None:
            print(f"  mean personal fraction at the end: {res['final_personal_fraction_mean']:.4f}")
        if res.get("final_eval_seconds") is not None:
            print(f"  final 10x10 cross-client evaluation (outside the rounds): {res['final_eval_seconds']:.2f} s")
        if res.get("error"):
            print(f"  STOPPED: {res['error']}")
    print("\nnotes: sample passes are counted by a forward hook on the model, as training when autograd is on "
          "(each such forward is followed by a backward); 'in eval mode' counts training forwards made with "
          "BatchNorm in eval mode (a released-code defect). Accuracy: released = mean of per-batch accuracy, "
          "ours = per-sample.")
    if spec["sides"] in ("both", "released"):
        print("released code ran unmodified; run-time changes around it: loaded under the module name "
              "'released_fedselect'; its get_data/noniid replaced by our partition and a torchvision-format copy "
              "of our CIFAR-10 (md5 checks off, no download); "
              + ("CUDA hidden; " if spec.get("device", "cpu") == "cpu" else "on the GPU (its own CUDA choice); ")
              + "pretrained_init off; "
              "train_personalized/cross_client_eval/delta_update wrapped for timing"
              + ("" if spec["released_final_eval"] else "; the final 10x10 cross-client evaluation skipped")
              + ("; model.train() before each client's training (BatchNorm fix)" if spec["released_fix_bn"] else "")
              + ("; eval_layer_sparsity reports the last weight tensor (it hard-codes 'fc.weight')"
                 if spec["model"] != "resnet18" else "") + ".")


