"""`method: routed`: DAMC's routed layers for sources that were never decoupled.

Tokens of modality m use `W0 + T_src(m)`, the whole delta of the source it came from; text tokens use
`W0 + merge({T_i})`. The composite is a DAMC composite on disk (same config fields, same stacked factors), so loading,
4-bit, generation and serving need nothing new:

- the merged text delta is folded into the base weights (text tokens, and every decoded token, cost the plain layer);
- the text block of the stacked factors holds the merged delta in low-rank form (modality rows take it off again):
  each source's LoRA stacked with `λ_i` folded in, exactly, when every source's delta is low-rank and the rule is
  linear; otherwise the rank-R truncated SVD of the dense merged delta, R = the sum of the sources' ranks;
- each modality's block holds what its tokens used in their source: the source's own modality LoRA (a decoupled
  source: as DAMC), its text LoRA (a LoRA source: exact), or the rank-r truncated SVD of its dense delta (a full
  fine-tune, `rank:` in the recipe). Two modalities of one source get the same factors; a modality whose source
  changed nothing has no block and its tokens use the text weights.

So modality rows compute `W0 + merge(T) - [merge(T)]_R + [T_src]_r`, exact for LoRA sources and at full rank, and text
rows compute `W0 + merge(T)` exactly. The other LLM parameters (embeddings, norms, LM head, biases) cannot be routed
by the layers and follow the merge, as in DAMC and NaiveMC.
"""

import logging
from dataclasses import dataclass, field

import torch

from modeling_composite.configuration_composite import DEFAULT_LORA_TARGET_MODULES

from .errors import ConversionError
from .low_rank import truncated_svd
from .recipe import Recipe
from .sources import BaseModel, Source


logger = logging.getLogger(__name__)


def low_rank_delta(source: Source) -> bool:
    """Whether a source's text delta on the routed projections is exactly its LoRA: a LoRA without LLM weights (peft,
    modelcompose), or a composite of ours, whose base weights hold `W0` plus, folded, that same LoRA. A full
    fine-tune (and a NaiveMC composite, which has no LoRA of its own) is dense."""
    return source.full_weights is None or (source.format == "composite" and bool(source.text_lora))


def source_rank(source: Source) -> int:
    """The rank of a low-rank source's text LoRA (0 without one)."""
    ranks = {low_rank.rank for low_rank in source.text_lora.values()}
    if len(ranks) > 1:
        raise ConversionError(
            f"{source.label}: its text LoRA has different ranks per layer {sorted(ranks)}; not supported."
        )
    return ranks.pop() if ranks else 0


def check_routed(base: BaseModel, sources: list[Source], recipe: Recipe) -> None:
    """`rank` where a full fine-tune needs it, and nowhere it would go unused; errors name the source and the fix."""
    full_rank = max((min(base.shape(key)) for key in routed_keys(base, sources)), default=0)
    for source in sources:
        own = source.recipe.rank
        if low_rank_delta(source):
            if own is not None:
                raise ConversionError(
                    f"sources[{source.recipe.index}].rank: {source.label} is a LoRA (rank {source_rank(source)}), "
                    "which the routed layers take exactly; `rank` only applies to full fine-tunes, so remove it."
                )
        elif recipe.source_rank(source.recipe) is None:
            raise ConversionError(
                f"{source.label} is a full fine-tune ({source.format}): method routed gives its modality tokens a "
                f"rank-r truncated SVD of its delta, so set `rank:` on the source (or at the top of the recipe for "
                f"every full fine-tune), e.g. `rank: 64`; rank {full_rank} and up keeps it exactly."
            )
    if recipe.rank is not None and all(low_rank_delta(source) or source.recipe.rank is not None for source in sources):
        raise ConversionError(
            "rank: the recipe's `rank` applies to full fine-tune sources without a `rank` of their own, and there is "
            "none (LoRA sources are routed exactly); remove it."
        )


def routed_keys(base: BaseModel, sources: list[Source]) -> list[str]:
    """The base's projection weights that routed layers wrap: those the sources' LoRAs target, and with a full
    fine-tune among the sources, every projection of `DEFAULT_LORA_TARGET_MODULES`."""
    names = {key.rsplit(".", 2)[-2] for source in sources
             for key in [*source.text_lora, *(k for part in source.modalities.values() for k in part.lora_factors)]}
    if not all(low_rank_delta(source) for source in sources):
        names.update(DEFAULT_LORA_TARGET_MODULES)
    return [key for key in base.keys() if key.startswith("model.") and key.endswith(".weight")
            and key.rsplit(".", 2)[-2] in names and len(base.shape(key)) == 2]


@dataclass
class ModalityDelta:
    """What the tokens of one modality get: `modality_lora` (the source's own modality LoRA, as DAMC), `source_lora`
    (the source's text LoRA, its scaling folded into B) or `svd` (a truncated SVD of the source's dense delta)."""

    source: int
    how: str
    rank: int
    alpha: float


@dataclass
class RoutedSetup:
    """The routed layers of a `method: routed` composite: ranks, and the factor producers, which also measure how
    much of each dense delta the factors keep."""

    base: BaseModel
    sources: list[Source]
    weights: list[float]
    recipe: Recipe
    modalities: dict[str, ModalityDelta]
    text_rank: int
    text_exact: bool
    target_modules: list[str]
    # Squared Frobenius norms kept / total, per source index and for the text block ("text").
    energy: dict = field(default_factory=dict)
    _factors: dict = field(default_factory=dict)

    @property
    def text_lora(self) -> dict | None:
        if self.text_rank == 0 or not self.modalities:
            return None
        return {"r": self.text_rank, "alpha": float(self.text_rank), "folded": True}

    def modality_lora(self, name: str) -> dict | None:
        delta = self.modalities.get(name)
        return None if delta is None else {"r": delta.rank, "alpha": delta.alpha}

    def factor(self, key: str, side: str, block: str, merged: "callable") -> torch.Tensor:
        """Side `A` or `B` of one block (`text` or a modality) of projection `key`. The factors of a projection are
        computed once, when its first factor is asked for, and dropped when its last one was (the writer asks for
        them one after the other), so memory holds one projection's dense deltas at most."""
        if key not in self._factors:
            self._factors[key] = self._compute(key, merged)
        pending = self._factors[key]
        tensor = pending.pop((block, side))
        if not pending:
            del self._factors[key]
        return tensor

    def _compute(self, key: str, merged: "callable") -> dict[tuple[str, str], torch.Tensor]:
        out_features, in_features = self.base.shape(key)
        blocks: dict[tuple[str, str], torch.Tensor] = {}
        base_tensor = None
        if self.text_rank:
            if self.text_exact:
                parts_a, parts_b = [], []
                for source, weight in zip(self.sources, self.weights):
                    rank, low_rank = source_rank(source), source.text_lora.get(key)
                    parts_a.append(low_rank.lora_a.load().float() if low_rank else torch.zeros(rank, in_features))
                    parts_b.append(low_rank.lora_b.load().float() * (weight * low_rank.scaling) if low_rank
                                   else torch.zeros(out_features, rank))
                blocks["text", "A"], blocks["text", "B"] = torch.cat(parts_a), torch.cat(parts_b, dim=1)
            else:
                base_tensor = self.base.get(key).float()
                factors = truncated_svd(merged(key) - base_tensor, self.text_rank, seed=_seed(key, -1))
                self._measure("text", factors)
                blocks["text", "A"], blocks["text", "B"] = factors.lora_a, factors.lora_b
        by_source: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for name, delta in self.modalities.items():
            source = self.sources[delta.source]
            if delta.how == "modality_lora":
                low_rank = source.modalities[name].lora_factors.get(key)
                pair = (low_rank.lora_a.load().float(), low_rank.lora_b.load().float()) if low_rank else None
            elif delta.source in by_source:
                pair = by_source[delta.source]  # a second modality of the same source: the same delta
            elif delta.how == "source_lora":
                low_rank = source.text_lora.get(key)
                pair = (low_rank.lora_a.load().float(), low_rank.lora_b.load().float() * low_rank.scaling) \
                    if low_rank else None
                by_source[delta.source] = pair
            else:
                base_tensor = self.base.get(key).float() if base_tensor is None else base_tensor
                factors = truncated_svd(source.text_delta(key, base_tensor), delta.rank, seed=_seed(key, delta.source))
                self._measure(delta.source, factors)
                pair = by_source[delta.source] = (factors.lora_a, factors.lora_b)
            if pair is None:
                pair = (torch.zeros(delta.rank, in_features), torch.zeros(out_features, delta.rank))
            blocks[name, "A"], blocks[name, "B"] = pair
        return blocks

    def _measure(self, who, factors) -> None:
        kept, total = self.energy.get(who, (0.0, 0.0))
        self.energy[who] = (kept + factors.kept, total + factors.total)

    def provenance(self) -> dict:
        """What the config's `composition` records about the routing (after every factor was written): per source
        its rank and the share of its delta's squared Frobenius norm (over every routed projection) that its factors
        keep, and the same for the text block."""
        ranks = {}
        for delta in self.modalities.values():
            if delta.how != "modality_lora":
                ranks[delta.source] = delta.rank
        sources = []
        for index in range(len(self.sources)):
            entry = {"rank": ranks.get(index), "energy_kept": None}
            if index in ranks:
                entry["energy_kept"] = _share(self.energy.get(index)) if index in self.energy else 1.0
            sources.append(entry)
        text = {"rank": self.text_rank, "energy_kept": 1.0 if self.text_exact else _share(self.energy.get("text"))}
        return {"sources": sources, "text": text,
                "modalities": {name: {"source": delta.source, "delta": delta.how, "rank": delta.rank}
                               for name, delta in self.modalities.items()}}


def _share(measured: tuple[float, float] | None) -> float | None:
    if measured is None:
        return None
    kept, total = measured
    return 1.0 if total == 0 else min(kept / total, 1.0)


def _seed(key: str, index: int) -> int:
    """A fixed seed per tensor and source for the randomized SVD: conversions are reproducible."""
    return sum(key.encode()) * 1009 + index + 1


def routed_setup(base: BaseModel, sources: list[Source], recipe: Recipe) -> RoutedSetup:
    """Decide what every modality's tokens get and the ranks of the stacked factors."""
    keys = routed_keys(base, sources)
    full_rank = max((min(base.shape(key)) for key in keys), default=0)
    modalities: dict[str, ModalityDelta] = {}
    ranks = []
    for index, source in enumerate(sources):
        low_rank = low_rank_delta(source)
        # A rank beyond the layers' full rank would only add columns of zeros.
        rank = source_rank(source) if low_rank else min(recipe.source_rank(source.recipe), full_rank)
        ranks.append(rank)
        for name, part in source.modalities.items():
            if part.lora_factors:
                modalities[name] = ModalityDelta(index, "modality_lora", part.lora["r"], part.lora["alpha"])
            elif rank:
                modalities[name] = ModalityDelta(index, "source_lora" if low_rank else "svd", rank, float(rank))
            else:
                logger.info("%s: it leaves the LLM unchanged, so its %s tokens use the merged text weights.",
                            source.label, name)
    text_exact = recipe.merge.rule == "linear" and all(low_rank_delta(source) for source in sources)
    text_rank = sum(ranks) if text_exact else min(sum(ranks), full_rank)
    target_modules = [name for name in DEFAULT_LORA_TARGET_MODULES
                      if any(key.endswith(f".{name}.weight") for key in keys)]
    target_modules += sorted({key.rsplit(".", 2)[-2] for key in keys} - set(target_modules))
    return RoutedSetup(base, sources, recipe.weights(), recipe, modalities, text_rank if modalities else 0,
                       text_exact, target_modules)
