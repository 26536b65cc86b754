"""Benchmarks of composed multimodal models."""

import json
from pathlib import Path


def write_figures(report: dict, path: str | Path) -> Path:
    """Write a benchmark's figures as JSON (creating its folder) and return the path; every benchmark ends with it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1))
    return path
