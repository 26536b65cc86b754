"""Benchmarks of composed multimodal models."""

import json
import re
import time
from collections.abc import Callable
from pathlib import Path

import torch


def write_figures(report: dict, path: str | Path) -> Path:
    """Write a benchmark's figures as JSON (creating its folder) and return the path; every benchmark ends with it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1))
    return path


def timed_seconds(run: Callable[[], object], device: str | torch.device = "cpu") -> float:
    """Wall seconds of `run()`. On a GPU the queued work is waited for on both sides, so that the timer stops when
    the work is done rather than when it was launched."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def proc_kib(field: str, path: str = "/proc/self/status") -> int | None:
    """A `field:  N kB` line of a /proc file of this process, in KiB; None where the file or line is missing (not
    Linux, an older kernel)."""
    try:
        text = Path(path).read_text()
    except OSError:
        return None
    match = re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE)
    return int(match.group(1)) if match else None


def huge_page_kib() -> int | None:
    """KiB of this process's memory in transparent huge pages (None where /proc does not say, e.g. not Linux).
    Benchmarks record it because huge pages move CPU timings by more than the overheads measured: torch uses them
    for large tensors with `THP_MEM_ALLOC_ENABLE=1`, or the kernel everywhere when set to `always` (see
    benchmarks/README.md)."""
    return proc_kib("AnonHugePages", "/proc/self/smaps_rollup")
