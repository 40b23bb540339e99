"""What bench/fedselect_vs_released.py measures inside each child: round boundaries and their
parts, training and evaluation passes, peak memory, and a profile (shared by both sides)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any


def proc_status_kb(key: str) -> int:
    """A ``kB`` field of /proc/self/status (VmRSS, VmHWM), or -1 where there is none."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return -1


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux: write 5 to /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


class PassCounter:
    """Counts samples through the model's forward: with autograd on (a training pass, always
    followed by a backward in both implementations) or off (evaluation). Training forwards made
    while the model is in eval mode (BatchNorm on running statistics) are counted separately."""

    def __init__(self, model: Any) -> None:
        import torch

        self._grad_enabled = torch.is_grad_enabled
        self.train = 0
        self.eval = 0
        self.train_in_eval_mode = 0
        model.register_forward_hook(self._hook)

    def _hook(self, module: Any, inputs: tuple, output: Any) -> None:
        n = int(inputs[0].shape[0])
        if self._grad_enabled():
            self.train += n
            if not module.training:
                self.train_in_eval_mode += n
        else:
            self.eval += n

    def snapshot(self) -> tuple[int, int, int]:
        return self.train, self.eval, self.train_in_eval_mode


def device_sync(device: str) -> Callable[[], None]:
    """What waits for queued GPU work before a clock is read (nothing on the CPU)."""
    if device.startswith("cuda"):
        import torch

        return torch.cuda.synchronize
    return lambda: None


def timed(fn: Callable[..., Any], sync: Callable[[], None], record: Callable[[float], None]) -> Callable[..., Any]:
    """``fn``, whose wall seconds (a device sync before and after) go to ``record`` on every call."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        sync()
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            sync()
            record(time.perf_counter() - t)

    return wrapper


def timed_around(fn: Callable[..., Any], sync: Callable[[], None], inner: Callable[[], float],
                 record: Callable[[float], None]) -> Callable[..., Any]:
    """``fn`` timed as :func:`timed`, less the time ``inner`` (a running total) grew by during the
    call: a mask search's own work, without the training calls it makes (timed as training)."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        sync()
        t, before = time.perf_counter(), inner()
        try:
            return fn(*args, **kwargs)
        finally:
            sync()
            record(time.perf_counter() - t - (inner() - before))

    return wrapper


class RoundClock:
    """Round boundaries (time and pass counts) and per-round sub-timings of one implementation.

    ``sync`` runs before every clock read, so GPU work queued before a boundary counts before it.
    """

    def __init__(self, counter: PassCounter, sync: Callable[[], None] = lambda: None) -> None:
        self.counter = counter
        self.sync = sync
        self.marks: list[tuple[float, float, tuple[int, int, int]]] = []
        self.eval_s: list[float] = []
        self.mask_s: dict[int, float] = {}
        self.train_s: dict[int, float] = {}
        self.train_total = 0.0  # all rounds' training seconds so far (see timed_around)
        self.loss: list[float] = []
        self.acc: list[float] = []

    def mark(self) -> None:
        self.sync()
        self.marks.append((time.perf_counter(), time.process_time(), self.counter.snapshot()))

    @property
    def current_round(self) -> int:
        return max(0, len(self.marks) - 1)

    def add_mask_time(self, seconds: float) -> None:
        self.mask_s[self.current_round] = self.mask_s.get(self.current_round, 0.0) + seconds

    def add_train_time(self, seconds: float) -> None:
        self.train_total += seconds
        self.train_s[self.current_round] = self.train_s.get(self.current_round, 0.0) + seconds

    def rounds(self) -> list[dict[str, Any]]:
        out = []
        for r, ((t0, cpu0, c0), (t1, cpu1, c1)) in enumerate(zip(self.marks, self.marks[1:], strict=False)):
            out.append({
                "round": r,
                "seconds": t1 - t0,
                "cpu_seconds": cpu1 - cpu0,
                "train_passes": c1[0] - c0[0],
                "eval_passes": c1[1] - c0[1],
                "train_passes_eval_mode": c1[2] - c0[2],
                "eval_seconds": self.eval_s[r] if r < len(self.eval_s) else None,
                "mask_seconds": self.mask_s.get(r, 0.0),
                "train_seconds": self.train_s.get(r, 0.0),
                "other_seconds": (t1 - t0) - self.train_s.get(r, 0.0) - self.mask_s.get(r, 0.0)
                - (self.eval_s[r] if r < len(self.eval_s) else 0.0),
                "train_loss": self.loss[r] if r < len(self.loss) else None,
                "mean_acc": self.acc[r] if r < len(self.acc) else None,
            })
        return out


def device_label(device: Any) -> str:
    """The device a child ran on, with the GPU's name (e.g. 'cuda:0 NVIDIA H100 80GB HBM3')."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return f"{device} {torch.cuda.get_device_name(device)}"
    return str(device)


@contextmanager
def profiled(wanted: bool) -> Iterator[Any]:
    """A ``cProfile.Profile`` enabled within the block when ``wanted``, else None."""
    if not wanted:
        yield None
        return
    import cProfile

    profiler = cProfile.Profile()
    profiler.enable()
    try:
        yield profiler
    finally:
        profiler.disable()


def profile_text(profiler: Any, top: int = 15) -> str:
    import io
    import pstats

    buf = io.StringIO()
    stats = pstats.Stats(profiler, stream=buf).strip_dirs()
    buf.write(f"--- top {top} by cumulative time ---\n")
    stats.sort_stats("cumulative").print_stats(top)
    buf.write(f"--- top {top} by own (total) time ---\n")
    stats.sort_stats("tottime").print_stats(top)
    buf.write("--- who calls the top 8 by own time ---\n")
    stats.print_callers(8)
    return buf.getvalue()


class ChildFigures:
    """What each side's child reports beside its rounds: setup time and memory (read when it is made,
    at the end of setup), and the peak memory during the rounds (read by :meth:`report`)."""

    def __init__(self, t_setup: float) -> None:
        self.setup_seconds = time.perf_counter() - t_setup
        self.hwm_setup = proc_status_kb("VmHWM")
        self.rss_setup = proc_status_kb("VmRSS")
        self.reset = reset_peak_rss()

    def report(self, side: str, device: str, clock: RoundClock, error: str | None, threads: int,
               profiler: Any, stats_path: str | None = None) -> dict[str, Any]:
        if profiler is not None and stats_path:  # for pstats / snakeviz: the printed top 15 is a summary
            profiler.dump_stats(stats_path)
        return {
            "side": side, "device": device, "setup_seconds": self.setup_seconds,
            "rss_after_setup_kb": self.rss_setup, "hwm_setup_kb": self.hwm_setup,
            "hwm_rounds_kb": proc_status_kb("VmHWM") if self.reset else None,
            "hwm_total_kb": max(self.hwm_setup, proc_status_kb("VmHWM")), "rounds": clock.rounds(), "error": error,
            "torch_threads": threads, "profile": profile_text(profiler) if profiler is not None else None,
        }
