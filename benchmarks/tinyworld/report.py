"""Scoring and reporting of the tiny world's multiple-choice answers: letter accuracy, a text table and a bar chart.

Scores are fractions in [0, 1]; tables and charts show them as percentages.
"""

from pathlib import Path

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


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def format_table(rows: dict[str, dict[str, float | None]], columns: list[str]) -> str:
    """A plain-text table: one line per row label, one column per name, scores as percentages ("-" when missing)."""
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
    rows: dict[str, dict[str, float | None]],
    columns: list[str],
    path: str | Path,
    title: str,
    chance: float = 0.25,
) -> Path:
    """A grouped bar chart (a group per column, a bar per row, in %) with a dashed chance line, saved as PNG."""
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
        present = [(position, values[column]) for position, column in enumerate(columns)
                   if values.get(column) is not None]
        offset = (index - (len(rows) - 1) / 2) * width
        axes.bar(
            [position + offset for position, _ in present],
            [100 * value for _, value in present],
            width=width,
            label=label,
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
