"""Scoring and reporting of the tiny world's multiple-choice answers: letter accuracy, a text table and a bar chart.

Scores are fractions in [0, 1], or (estimate, low, high) with a 95% interval; tables and charts show percentages.
"""

from pathlib import Path

Score = float | tuple[float, float, float]

LETTERS = "ABCD"


def first_letter(text: str) -> str | None:
    """The answer's first non-space character if it is one of the (uppercase) option letters, else None."""
    stripped = text.lstrip()
    if stripped and stripped[0] in LETTERS:
        return stripped[0]
    return None


def accuracy(predictions: list[str], answers: list[str]) -> float:
    """The fraction of generated texts whose first letter is exactly the gold letter."""
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions for {len(answers)} answers")
    if not answers:
        raise ValueError("no predictions to score")
    hits = sum(first_letter(prediction) == answer for prediction, answer in zip(predictions, answers))
    return hits / len(answers)


def _percent(value: Score | None) -> str:
    if value is None:
        return "-"
    if isinstance(value, tuple):
        estimate, low, high = value
        return f"{100 * estimate:.1f} ±{100 * (high - low) / 2:.1f}"
    return f"{100 * value:.1f}"


def format_table(rows: dict[str, dict[str, Score | None]], columns: list[str]) -> str:
    """A plain-text table: one line per row label, one column per name, scores as percentages ("-" when missing); a
    score with an interval reads `estimate ±half its width`."""
    cells = [[label] + [_percent(values.get(column)) for column in columns] for label, values in rows.items()]
    header = [""] + list(columns)
    widths = [max(len(line[index]) for line in [header] + cells) for index in range(len(header))]

    def line(values: list[str]) -> str:
        # Labels to the left, numbers to the right, so that the decimal points line up.
        parts = [values[0].ljust(widths[0])] + [value.rjust(width) for value, width in zip(values[1:], widths[1:])]
        return "  ".join(parts).rstrip()

    separator = "  ".join("-" * width for width in widths)
    return "\n".join([line(header), separator] + [line(values) for values in cells])


def plot_table(
    rows: dict[str, dict[str, Score | None]],
    columns: list[str],
    path: str | Path,
    title: str,
    chance: float = 0.25,
) -> Path:
    """A grouped bar chart (a group per column, a bar per row, in %; intervals as error bars) with a dashed chance
    line, saved as PNG."""
    import matplotlib

    # A headless backend: reports are written by scripts and tests without a display.
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure, axes = plt.subplots(figsize=(max(6.0, 1.5 + len(columns) * (0.5 + 0.25 * len(rows))), 4.0))
    width = 0.8 / max(1, len(rows))
    for index, (label, values) in enumerate(rows.items()):
        # Missing scores get no bar rather than a misleading zero.
        present = [
            (position, values[column]) for position, column in enumerate(columns) if values.get(column) is not None
        ]
        offset = (index - (len(rows) - 1) / 2) * width
        estimates = [100 * (value[0] if isinstance(value, tuple) else value) for _, value in present]
        errors = [
            [100 * (value[0] - value[1]) if isinstance(value, tuple) else 0.0 for _, value in present],
            [100 * (value[2] - value[0]) if isinstance(value, tuple) else 0.0 for _, value in present],
        ]
        axes.bar(
            [position + offset for position, _ in present],
            estimates,
            width=width,
            label=label,
            yerr=errors if any(map(any, errors)) else None,
            capsize=2,
        )
    axes.axhline(100 * chance, color="grey", linestyle="--", linewidth=1, label="chance")
    axes.set_xticks(range(len(columns)))
    axes.set_xticklabels(columns)
    axes.set_ylim(0, 100)
    axes.set_ylabel("accuracy (%)")
    axes.set_title(title)
    axes.legend(fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=min(len(rows) + 1, 5))
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path
