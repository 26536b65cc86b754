"""`method: routed`: DAMC's routed layers for sources that were never decoupled.

Tokens of modality m use `W0 + T_src(m)`, the whole delta of the source it came from; text tokens use
`W0 + merge({T_i})`. The composite is a DAMC composite on disk (same config fields, same stacked factors), so loading,
4-bit, generation and serving need nothing new:

- the merged text delta is folded into the base weights (text tokens, and every decoded token, cost the plain layer);
- each modality's block holds what its tokens used in their source: the source's own modality LoRA (a decoupled
  source: as DAMC), its text LoRA (a LoRA source: exact), or `[T_src]_r`, the rank-r truncated SVD of its dense delta
  (a full fine-tune, `rank:` in the recipe). Two modalities of one source get the same factors; a modality whose
  source changed nothing has no block and its tokens use the text weights;
- the text block holds the merged delta in low-rank form, which modality rows take off again: with the linear rule
  the sources' own factors stacked with `λ_i` folded into B (`Σ λ_i [T_i]`, rank R = Σ r_i, no SVD of its own; exact
  for LoRAs, as in DAMC); a ties / dare merge is no combination of the deltas, so there it is the rank-R truncated
  SVD of the dense merged delta.

So modality rows compute `W0 + merge(T) - text_block + [T_src]_r` (the text block `Σ λ_i [T_i]` or `[merge(T)]_R`):
exact for LoRA sources under the linear rule and at full rank; text rows compute `W0 + merge(T)` exactly at every
rank. The other LLM parameters (embeddings, norms, LM head, biases)
cannot be routed by the layers and follow the merge, as in DAMC and NaiveMC.
"""

import logging
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from modeling_composite.configuration_composite import DEFAULT_LORA_TARGET_MODULES

from .errors import ConversionError
from .formats import SOURCE_FORMATS
from .low_rank import truncated_svd
from .merge import MERGE_RULES
from .recipe import Recipe
from .sources import BaseModel, LowRank, Source


logger = logging.getLogger(__name__)


def low_rank_delta(source: Source) -> bool:
    """Whether a source's text delta on the routed projections is exactly its LoRA: a LoRA without LLM weights (peft,
    modelcompose), or a composite of ours whose base weights hold `W0` plus, folded, exactly that LoRA (its format
    folds it, and its provenance says the factors are the whole delta: see `Source.text_lora_exact`). A full
    fine-tune, a NaiveMC composite (no LoRA of its own) and a composite whose text factors only approximate its merged
    delta (ties / dare, or routed from full fine-tunes) are dense."""
    if source.full_weights is None:
        return True
    return SOURCE_FORMATS[source.format].folds_text_lora and bool(source.text_lora) and source.text_lora_exact


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
    full_rank = _full_rank(base, routed_keys(base, sources))
    for source in sources:
        own = source.recipe.rank
        if low_rank_delta(source):
            if own is not None:
                raise ConversionError(
                    f"sources[{source.recipe.index}].rank: {source.label} is a LoRA (rank {source_rank(source)}), "
                    "which the routed layers hold at its own rank; `rank` only applies to full fine-tunes, so remove "
                    "it."
                )
        elif recipe.source_rank(source.recipe) is None:
            raise ConversionError(
                f"{source.label} is a full fine-tune ({source.format}): method routed gives its modality tokens a "
                f"rank-r truncated SVD of its delta, so set `rank:` on the source (or at the top of the recipe for "
                f"every full fine-tune), e.g. `rank: 64`; rank {full_rank} and up keeps it exactly."
            )
    if recipe.rank is not None and all(low_rank_delta(source) or source.recipe.rank is not None for source in sources):
        # A default, like PEFT's `r` beside `rank_pattern`: unused is worth a word, not a refusal (the λ search's
        # one-source candidates inherit it, whatever their source is).
        logger.warning(
            "rank: the recipe's `rank` (%d) applies to full fine-tunes without a `rank` of their own, and "
            "no source is one; it is unused.",
            recipe.rank,
        )


def _full_rank(base: BaseModel, keys: list[str]) -> int:
    """The largest rank any routed projection can have: from this rank up, a truncated SVD keeps a delta whole."""
    return max((min(base.shape(key)) for key in keys), default=0)


def routed_keys(base: BaseModel, sources: list[Source]) -> list[str]:
    """The base's projection weights that routed layers wrap: those the sources' LoRAs target, and with a full
    fine-tune among the sources, every projection of `DEFAULT_LORA_TARGET_MODULES`."""
    names = {
        key.rsplit(".", 2)[-2]
        for source in sources
        for key in [*source.text_lora, *(k for part in source.modalities.values() for k in part.lora_factors)]
    }
    if not all(low_rank_delta(source) for source in sources):
        names.update(DEFAULT_LORA_TARGET_MODULES)
    return [
        key
        for key in base.keys()
        if key.startswith("model.")
        and key.endswith(".weight")
        and key.rsplit(".", 2)[-2] in names
        and len(base.shape(key)) == 2
    ]


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
    # Per source: the rank of its routed delta (its LoRA's, or the truncated SVD's), 0 where it has none.
    ranks: list[int]
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

    @property
    def reads_merge(self) -> bool:
        """Whether the factors need each projection's merged weight: to measure the text block against it when the
        sources' stacked factors are not exact, or for its SVD when the merge is no weighted sum."""
        return bool(self.text_rank) and not self.text_exact

    def modality_lora(self, name: str) -> dict | None:
        delta = self.modalities.get(name)
        return None if delta is None else {"r": delta.rank, "alpha": delta.alpha}

    def factor(self, key: str, side: str, block: str, merged: Callable[[str], torch.Tensor]) -> torch.Tensor:
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

    def _compute(self, key: str, merged: Callable[[str], torch.Tensor]) -> dict[tuple[str, str], torch.Tensor]:
        out_features, in_features = self.base.shape(key)
        blocks: dict[tuple[str, str], torch.Tensor] = {}
        base_tensor = None
        pairs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

        def source_pair(index: int) -> tuple[torch.Tensor, torch.Tensor]:
            """The factors of source `index`'s whole delta on this projection (scaling folded into B), computed once:
            its LoRA, or the truncated SVD of its dense delta (zeros where it changed nothing)."""
            nonlocal base_tensor
            if index not in pairs:
                source, rank = self.sources[index], self.ranks[index]
                if low_rank_delta(source):
                    low_rank = source.text_lora.get(key)
                    pairs[index] = _pair(low_rank, rank, in_features, out_features, fold_scaling=True)
                else:
                    base_tensor = self.base.get(key).float() if base_tensor is None else base_tensor
                    factors = truncated_svd(source.text_delta(key, base_tensor), rank, seed=_seed(key, index))
                    self._measure(index, factors.kept, factors.total)
                    pairs[index] = (factors.lora_a, factors.lora_b)
            return pairs[index]

        for name, delta in self.modalities.items():
            if delta.how == "modality_lora":
                low_rank = self.sources[delta.source].modalities[name].lora_factors.get(key)
                # Unscaled: its own scaling is the config's (`alpha / r`), as DAMC writes it.
                blocks[name, "A"], blocks[name, "B"] = _pair(low_rank, delta.rank, in_features, out_features, False)
            else:
                blocks[name, "A"], blocks[name, "B"] = source_pair(delta.source)
        if not self.text_rank:
            return blocks
        if MERGE_RULES[self.recipe.merge.rule].is_weighted_sum:
            # `Σ λ_i T_i` from the sources' own factors, λ_i folded into B: no SVD of its own; exact for LoRAs.
            indices = [index for index, rank in enumerate(self.ranks) if rank]
            blocks["text", "A"] = torch.cat([source_pair(index)[0] for index in indices])
            blocks["text", "B"] = torch.cat([source_pair(index)[1] * self.weights[index] for index in indices], dim=1)
            if not self.text_exact:
                base_tensor = self.base.get(key).float() if base_tensor is None else base_tensor
                target = merged(key) - base_tensor
                left_out = target - blocks["text", "B"] @ blocks["text", "A"]
                total = float(target.square().sum())
                self._measure("text", total - float(left_out.square().sum()), total)
        else:
            # A ties / dare merge is no combination of the deltas: its best rank-R approximation instead.
            base_tensor = self.base.get(key).float() if base_tensor is None else base_tensor
            factors = truncated_svd(merged(key) - base_tensor, self.text_rank, seed=_seed(key, -1))
            self._measure("text", factors.kept, factors.total)
            blocks["text", "A"], blocks["text", "B"] = factors.lora_a, factors.lora_b
        return blocks

    def _measure(self, who: int | str, kept: float, total: float) -> None:
        """Add one projection's squared Frobenius norms: of the delta, and of it minus what its factors leave out."""
        kept_so_far, total_so_far = self.energy.get(who, (0.0, 0.0))
        self.energy[who] = (kept_so_far + kept, total_so_far + total)

    def provenance(self) -> dict:
        """What the config's `composition` records about the routing (after every factor was written): per source
        its rank and the energy its factors keep, `1 - Σ_p |T_p - B_p A_p|² / Σ_p |T_p|²` over the routed
        projections p (squared Frobenius norms; for a truncated SVD, an orthogonal projection of `T_p`, this is also
        `Σ_p |B_p A_p|² / Σ_p |T_p|²`), and the same for the text block against the merged delta."""
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
        return {
            "sources": sources,
            "text": text,
            "modalities": {
                name: {"source": delta.source, "delta": delta.how, "rank": delta.rank}
                for name, delta in self.modalities.items()
            },
        }


def _pair(
    low_rank: LowRank | None, rank: int, in_features: int, out_features: int, fold_scaling: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(A, B)` of a LoRA in float32 (its scaling folded into B if asked), or zeros where it has no factors."""
    if low_rank is None:
        return torch.zeros(rank, in_features), torch.zeros(out_features, rank)
    scaling = low_rank.scaling if fold_scaling else 1.0
    return low_rank.lora_a.load().float(), low_rank.lora_b.load().float() * scaling


def _share(measured: tuple[float, float] | None) -> float | None:
    """`kept / total` within [0, 1]. It is below 0 where the stacked text block misses the merged delta by more than
    the delta's own size (sources whose deltas cancel in the merge): none of it is kept, so 0."""
    if measured is None:
        return None
    kept, total = measured
    return 1.0 if total == 0 else min(max(kept / total, 0.0), 1.0)


def _seed(key: str, index: int) -> int:
    """A fixed seed per tensor and source for the randomized SVD: conversions are reproducible (a CRC, not `hash`,
    which Python salts per process)."""
    return zlib.crc32(f"{key}:{index}".encode())


def routed_setup(base: BaseModel, sources: list[Source], recipe: Recipe) -> RoutedSetup:
    """Decide what every modality's tokens get and the ranks of the stacked factors."""
    keys = routed_keys(base, sources)
    full_rank = _full_rank(base, keys)
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
                logger.info(
                    "%s: it leaves the LLM unchanged, so its %s tokens use the merged text weights.",
                    source.label,
                    name,
                )
    weighted_sum = MERGE_RULES[recipe.merge.rule].is_weighted_sum
    text_exact = weighted_sum and all(low_rank_delta(source) for source in sources)
    text_rank = sum(ranks) if weighted_sum else min(sum(ranks), full_rank)
    target_modules = [
        name for name in DEFAULT_LORA_TARGET_MODULES if any(key.endswith(f".{name}.weight") for key in keys)
    ]
    target_modules += sorted({key.rsplit(".", 2)[-2] for key in keys} - set(target_modules))
    return RoutedSetup(
        base,
        sources,
        recipe.weights(),
        recipe,
        modalities,
        ranks,
        text_rank if modalities else 0,
        text_exact,
        target_modules,
    )
