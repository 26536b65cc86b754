"""Choosing λ beyond the paper's 1/N, on the tiny world: a small grid of uniform λ, scored on the validation split
(supervised: unimodal and open tiny-MCUB questions; multiple choice is at chance for every model since issue 23, so
it would only add noise), or by agreement with the sources on their own single-modality inputs (unsupervised: no
labels; the composite should answer what each source answers alone). Only validation questions are used to choose;
the test split only reports the choice.
"""

from pathlib import Path

from conversion.weight_search import search_grid

from .evaluate import first_tokens, is_correct, score
from .questions import mcub_open_split, unimodal_split
from .run import METHODS, Settings, compose, load
from .world import MODALITIES, make_concepts


GRID = (0.0, 0.1, 0.25, 0.5, 1.0)


def _validation(settings: Settings):
    concepts = make_concepts(settings.seed)
    unimodal = {
        m: unimodal_split(concepts, m, settings.unimodal_questions // 2, settings.seed, "val") for m in MODALITIES
    }
    mcub = {k: mcub_open_split(concepts, k, settings.mcub_questions // 2, settings.seed, "val") for k in (2, 3, 4)}
    return {concept.name: concept for concept in concepts}, unimodal, mcub


def search(work: Path, sources: dict[str, Path], settings: Settings, grid: tuple[float, ...] = GRID) -> dict:
    """For each method and each λ of the grid: the supervised validation score (mean over unimodal and open tiny-MCUB
    accuracies) and the unsupervised agreement score; returns them with the λ each criterion picks."""
    by_name, unimodal, mcub = _validation(settings)
    reference: dict[str, dict[str, list[str]]] = {}
    for family in dict.fromkeys(method.sources for method in METHODS.values()):
        reference[family] = {}
        for modality in MODALITIES:
            model, processor = load(sources[f"{modality}-{family}"])
            reference[family][modality] = first_tokens(model, processor, unimodal[modality], by_name, "val")
    results: dict = {}
    for name, method in METHODS.items():
        folders: dict[float, Path] = {}  # the caller scores the test split on the picked λ's composite

        def compose_at(value: float) -> Path:
            weights = dict.fromkeys(MODALITIES, value)
            folders[value] = compose(work / f"lambda-{value}", sources, name, weights)
            return folders[value]

        def scores(folder: Path) -> dict[str, float]:
            model, processor = load(folder)
            accuracies, agreement = [], []
            for modality in MODALITIES:
                # One pass answers both criteria: scored against the labels, and against the source's answers.
                answers = first_tokens(model, processor, unimodal[modality], by_name, "val")
                accuracies.append(sum(map(is_correct, unimodal[modality], answers)) / len(answers))
                same = sum(a == b for a, b in zip(answers, reference[method.sources][modality]))
                agreement.append(same / len(answers))
            accuracies += [score(model, processor, mcub[k], by_name, "val") for k in mcub]
            return {"validation": sum(accuracies) / len(accuracies), "agreement": sum(agreement) / len(agreement)}

        table, picks = search_grid(grid, compose_at, scores, label=f"λ search {name}")
        results[name] = {
            "grid": {value: {**row, "folder": str(folders[value])} for value, row in table.items()},
            "supervised": picks["validation"],
            "unsupervised": picks["agreement"],
        }
    return results
