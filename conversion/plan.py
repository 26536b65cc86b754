"""Everything the conversion decides before it writes a byte: compatibility checks, the composite's tokenizer and
config, and for every tensor of the composite a recipe to compute it from the base and the sources.

The tensor recipes are checked against the composite model built on the meta device (no memory): the set of keys
must match exactly and every shape known up front must agree, so a source tensor that would not fit fails here with
its name, not halfway through writing.
"""

import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedTokenizerBase

from composition.compose import add_placeholder_tokens
from modeling_composite.configuration_composite import DEFAULT_LORA_TARGET_MODULES, CompositeMLLMConfig
from modeling_composite.configuration_modality import ModalityConfig, settings_of
from modeling_composite.modeling_composite import CompositeMLLMForCausalLM, delta_layout
from modeling_composite.state_dict_keys import (
    LM_HEAD,
    PROJECTOR_TOKENS,
    TEXT_MODEL_PREFIX,
    base_layer_key,
    encoder_key,
    projector_key,
    stacked_factor_key,
)

from .errors import ConversionError
from .merge import MERGE_RULES, merge_deltas
from .recipe import Recipe
from .routed import RoutedSetup, check_routed, routed_setup, source_rank
from .sources import ARCHITECTURE_FIELDS, VOCAB_KEYS, BaseModel, LowRank, ModalityPart, Source
from .tensors import Lazy
from .weighted_sum import WeightedSum


logger = logging.getLogger(__name__)

Producer = Callable[[], torch.Tensor]


@dataclass
class Plan:
    """The composite to write: its config and tokenizer, and a producer (with the expected shape) per tensor."""

    config: CompositeMLLMConfig
    tokenizer: PreTrainedTokenizerBase
    modalities: dict[str, tuple[int, ModalityPart]]
    # method routed: its factors and what they keep (recorded in the config's composition once written).
    routed: RoutedSetup | None = None
    producers: dict[str, Producer] = field(default_factory=dict)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    dtype: torch.dtype = torch.float32


def _torch_dtype(value) -> torch.dtype:
    if isinstance(value, torch.dtype):
        return value
    if isinstance(value, str) and isinstance(getattr(torch, value, None), torch.dtype):
        return getattr(torch, value)
    return torch.float32


def check_compatibility(base: BaseModel, sources: list[Source], recipe: Recipe) -> None:
    """Every source shares the base (architecture, tokenizer, tensor shapes); modality names are unique; DAMC only
    from decoupled sources. Errors name the source, the tensor or field, and what differs."""
    for source in sources:
        _check_architecture(base, source)
        _check_tokenizer(base, source)
        _check_text_tensors(base, source)
    owners: dict[str, str] = {}
    for source in sources:
        for name in source.modalities:
            if name in owners:
                raise ConversionError(
                    f"Two sources claim the modality name {name!r}: {owners[name]} and {source.label}; modality names "
                    f"must be unique in a composite, so rename one (e.g. `rename: {{{name}: {name}_2}}`)."
                )
            owners[name] = source.label
    if recipe.method == "naive":
        for source in sources:
            own = [name for name, part in source.modalities.items() if part.lora_factors]
            if own:
                logger.warning(
                    "%s: method naive does not use its separate %s LoRA (decoupled modality parameters): every token "
                    "uses the merged text parameters. Use method damc to keep it.",
                    source.label,
                    ", ".join(own),
                )
    if recipe.method == "damc":
        plain = [source for source in sources if not source.decoupled]
        if plain:
            raise ConversionError(
                f"method damc needs sources with decoupled modality parameters, but {plain[0].label} "
                f"({plain[0].format}) has none (a full fine-tune or a single shared LoRA); use `method: routed` "
                "(each modality's tokens get their source's whole delta) or `method: naive`."
            )
    if recipe.method == "routed":
        check_routed(base, sources, recipe)


def _check_architecture(base: BaseModel, source: Source) -> None:
    if source.text_config is None:
        return
    for name in ARCHITECTURE_FIELDS:
        expected, got = getattr(base.config, name, None), getattr(source.text_config, name, None)
        if expected != got:
            raise ConversionError(
                f"{source.label}: its LLM's {name} is {got!r} but the base's is {expected!r}; every source must be "
                "fine-tuned from the recipe's base."
            )


def _check_tokenizer(base: BaseModel, source: Source) -> None:
    if source.tokenizer is None:
        return  # adapters carry no tokenizer: they use the base's
    if len(source.tokenizer) < base.vocab:
        raise ConversionError(
            f"{source.label}: its tokenizer has {len(source.tokenizer)} tokens, fewer than the base's {base.vocab}."
        )
    ids = list(range(base.vocab))
    theirs, ours = source.tokenizer.convert_ids_to_tokens(ids), base.tokenizer.convert_ids_to_tokens(ids)
    for token_id, (their_token, our_token) in enumerate(zip(theirs, ours)):
        if their_token != our_token:
            raise ConversionError(
                f"{source.label}: its tokenizer differs from the base's on the base vocabulary: id {token_id} is "
                f"{their_token!r} there but {our_token!r} in the base; the source must use the base's tokenizer."
            )


def _check_low_rank(source: Source, base: BaseModel, key: str, low_rank: LowRank, what: str) -> None:
    if key not in base.keys():
        raise ConversionError(f"{source.label}: {what} targets {key!r}, which the base LLM does not have.")
    out_features, in_features = base.shape(key)
    rank = low_rank.rank
    if tuple(low_rank.lora_a.shape) != (rank, in_features) or tuple(low_rank.lora_b.shape) != (out_features, rank):
        raise ConversionError(
            f"{source.label}: {what} at {key!r} has A {tuple(low_rank.lora_a.shape)} "
            f"and B {tuple(low_rank.lora_b.shape)}, "
            f"which do not fit the base's weight of shape {(out_features, in_features)}."
        )


def _check_text_tensors(base: BaseModel, source: Source) -> None:
    if source.full_weights is not None:
        missing = sorted(set(base.keys()) - set(source.full_weights))
        extra = sorted(set(source.full_weights) - set(base.keys()))
        if missing or extra:
            problem = f"lacks {missing[:3]}" if missing else f"has tensors the base lacks: {extra[:3]}"
            raise ConversionError(f"{source.label}: its LLM {problem}; it must have the base's architecture.")
        for key, lazy in source.full_weights.items():
            expected, got = base.shape(key), tuple(lazy.shape)
            vocab_ok = key in VOCAB_KEYS and got[1:] == expected[1:] and got[0] >= expected[0]
            if got != expected and not vocab_ok:
                raise ConversionError(
                    f"{source.label}: tensor {key!r} has shape {got} but the base's is {expected}; the source is "
                    "not a fine-tune of this base."
                )
    for key, low_rank in source.text_lora.items():
        _check_low_rank(source, base, key, low_rank, "its text LoRA")
    for part in source.modalities.values():
        for key, low_rank in part.lora_factors.items():
            _check_low_rank(source, base, key, low_rank, f"the {part.name} LoRA")


def _modality_entry(part: ModalityPart, placeholder: str, placeholder_id: int, lora: dict | None) -> ModalityConfig:
    return ModalityConfig.build(
        part.kind,
        part.encoder_config,
        placeholder,
        placeholder_id,
        tokens_per_item=part.tokens_per_item or None,
        audio_frames=getattr(part.feature_extractor, "max_length", 1024),
        **settings_of(part),
        prefix_tokens=part.prefix.shape[0] if part.prefix is not None else 0,
        suffix_tokens=part.suffix.shape[0] if part.suffix is not None else 0,
        lora=lora,
    )


def _target_modules(sources: list[Source]) -> list[str]:
    names = set()
    for source in sources:
        keys = list(source.text_lora) + [key for part in source.modalities.values() for key in part.lora_factors]
        names.update(key.rsplit(".", 2)[-2] for key in keys)
    ordered = [name for name in DEFAULT_LORA_TARGET_MODULES if name in names]
    return ordered + sorted(names - set(ordered))


def _check_modality_ranks(sources: list[Source]) -> None:
    for source in sources:
        for part in source.modalities.values():
            ranks = {low_rank.rank for low_rank in part.lora_factors.values()}
            if len(ranks) > 1 or (ranks and part.lora and part.lora.get("r") not in ranks):
                raise ConversionError(
                    f"{source.label}: its {part.name} LoRA has ranks {sorted(ranks)} across layers (config: "
                    f"{part.lora}); one rank per modality is supported."
                )


def build_plan(base: BaseModel, sources: list[Source], recipe: Recipe, composition: dict) -> Plan:
    damc = recipe.method == "damc"
    weights = recipe.weights()
    _check_modality_ranks(sources)
    modalities = {
        name: (index, part) for index, source in enumerate(sources) for name, part in source.modalities.items()
    }
    if not modalities:
        raise ConversionError("The sources contribute no modality; a composite needs at least one.")

    tokenizer = copy.deepcopy(base.tokenizer)
    placeholders = {name: f"<{name}>" for name in modalities}
    try:
        token_ids = add_placeholder_tokens(tokenizer, list(placeholders.values()))
    except ValueError as error:
        raise ConversionError(f"Cannot add the placeholder tokens to the base tokenizer: {error}") from None
    base_rows = base.shape("model.embed_tokens.weight")[0]
    rows = max(base_rows, len(tokenizer))

    text_config = copy.deepcopy(base.config)
    text_config.vocab_size = rows
    dtype = _torch_dtype(recipe.dtype or getattr(base.config, "dtype", None))
    text_ranks = [source_rank(source) if damc else 0 for source in sources]
    text_lora = (
        {"r": sum(text_ranks), "alpha": float(sum(text_ranks)), "folded": True} if damc and sum(text_ranks) else None
    )
    loras = {name: dict(part.lora) if damc and part.lora else None for name, (_, part) in modalities.items()}
    target_modules = _target_modules(sources) if damc else None
    routed = routed_setup(base, sources, recipe) if recipe.method == "routed" else None
    if routed is not None:
        text_lora, target_modules = routed.text_lora, routed.target_modules
        loras = {name: routed.modality_lora(name) for name in modalities}
    config = CompositeMLLMConfig(
        text_config=text_config.to_dict(),
        modalities={
            name: _modality_entry(part, placeholders[name], token_ids[placeholders[name]], loras[name])
            for name, (_, part) in modalities.items()
        },
        lora_target_modules=target_modules,
        text_lora=text_lora,
        lora_layout="stacked",
        composition=composition,
        dtype=dtype,
    )
    plan = Plan(config=config, tokenizer=tokenizer, modalities=modalities, routed=routed, dtype=dtype)
    _plan_llm(plan, base, sources, weights, recipe, text_ranks)
    _plan_modalities(plan)
    _check_against_model(plan)
    return plan


def _plan_llm(
    plan: Plan, base: BaseModel, sources: list[Source], weights: list[float], recipe: Recipe, text_ranks: list[int]
) -> None:
    rule, density, seed = recipe.merge.rule, recipe.merge.density or 1.0, recipe.merge.seed
    vocab = base.vocab
    rows = plan.config.get_text_config().vocab_size
    routed = set(plan.config.lora_target_modules) if plan.config.has_routed_deltas else set()

    warned: set[int] = set()
    checked = [0] * len(sources)

    def merged(key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        # Every row of the base's embedding / LM head merges like any tensor (rows a source has beyond the base's
        # are its own added tokens: dropped, except its placeholder's row, which `_vocab_rows` places).
        if MERGE_RULES[rule].is_weighted_sum:
            # Vocabulary rows are edited after the merge (`_vocab_rows`), so they stay float32 until written.
            dtype = dtype or (torch.float32 if key in VOCAB_KEYS else plan.dtype)
            merged_tensor = _linear_merge(key, base, sources, weights, warned, checked, dtype)
        else:
            base_tensor = base.get(key).float()
            deltas = [source.text_delta(key, base_tensor) for source in sources]
            _warn_implausible(deltas, base_tensor, key, sources, warned)
            delta = merge_deltas(deltas, weights, rule, density=density, seed=seed, name=key, **recipe.merge.options())
            merged_tensor = base_tensor if delta is None else base_tensor + delta
        return _vocab_rows(merged_tensor, key, rows, vocab, plan) if key in VOCAB_KEYS else merged_tensor

    # A `method: routed` projection whose factors need its float32 merge (the text block's energy, or its SVD under
    # ties / dare) takes one merge for both its base weight and its factors, which the writer produces right after
    # it: held until the next projection's merge, so memory holds one such tensor at most.
    shares_merge = plan.routed is not None and plan.routed.reads_merge
    last_merge: dict[str, torch.Tensor] = {}

    def merged_float32(key: str) -> torch.Tensor:
        if key not in last_merge:
            last_merge.clear()
            last_merge[key] = merged(key, torch.float32)
        return last_merge[key]

    for key in base.keys():
        module, _, parameter = key.rpartition(".")
        is_routed = module.rsplit(".", 1)[-1] in routed and module.startswith("model.")
        composite_module = TEXT_MODEL_PREFIX + module[len("model.") :]
        if key == LM_HEAD:
            out_key = key
        elif is_routed:
            out_key = base_layer_key(composite_module, parameter)
        else:
            out_key = TEXT_MODEL_PREFIX + key[len("model.") :]
        if shares_merge and is_routed and parameter == "weight":
            # Rounded once from float32, as `merged(key)` rounds it: the same bits.
            plan.producers[out_key] = lambda key=key: merged_float32(key).to(plan.dtype)
        else:
            plan.producers[out_key] = lambda key=key: merged(key)
        shape = base.shape(key)
        plan.shapes[out_key] = (rows, *shape[1:]) if key in VOCAB_KEYS else shape
        if is_routed and parameter == "weight":
            if plan.routed is not None:
                _plan_routed_factors(plan, key, composite_module, merged_float32)
            else:
                _plan_routed(plan, key, composite_module, base, sources, weights, text_ranks)


# A fine-tune moves weights by a few percent of their norm; a delta as large as the weight itself means the source
# was most likely not trained from this base (same shapes, other weights).
_IMPLAUSIBLE_RELATIVE_DELTA = 0.5
# The linear merge checks that on a source's first few tensors only: one norm per tensor is a full extra pass.
_PLAUSIBILITY_CHECKS = 4


def _linear_merge(
    key: str,
    base: BaseModel,
    sources: list[Source],
    weights: list[float],
    warned: set[int],
    checked: list[int],
    dtype: torch.dtype,
) -> torch.Tensor:
    """`W0 + Σ λ_i (W_i - W0) + Σ λ_j s_j B_j A_j`, computed as `(1 - Σ λ_i) W0 + Σ λ_i W_i + ...` (i: sources with
    full weights, j: low-rank ones) in float32 from each source's tensor in its own dtype, and returned in `dtype`. A
    `WeightedSum` takes it in one chunked pass and bounds the memory held whatever the number of sources (the other
    rules need every delta at once). With weights summing to 1 (the default 1/N) the base is not read at all."""
    full = [
        (index, source, weight)
        for index, (source, weight) in enumerate(zip(sources, weights))
        if source.full_weights is not None
    ]
    rows = base.shape(key)[0] if key in VOCAB_KEYS else None
    base_weight = 1.0 - sum(weight for _, _, weight in full)
    weighs_base = abs(base_weight) > 1e-9
    checking = key not in VOCAB_KEYS and any(checked[index] < _PLAUSIBILITY_CHECKS for index, _, _ in full)
    base_tensor = base.get(key) if weighs_base or checking else None
    total = WeightedSum(base.shape(key))
    if weighs_base:
        total.add(base_tensor, base_weight)
    for index, source, weight in full:
        tensor = source.full_weights[key].load()
        tensor = tensor[:rows] if rows is not None else tensor
        if checking and checked[index] < _PLAUSIBILITY_CHECKS:
            checked[index] += 1
            base_float = base_tensor.float()
            _warn_implausible([tensor.float() - base_float], base_float, key, [source], warned, index)
        total.add(tensor, weight)
    for source, weight in zip(sources, weights):
        low_rank = source.low_rank_delta(key)
        if low_rank is not None:
            total.add(low_rank, weight)
    return total.result(dtype)


def _warn_implausible(
    deltas: list[torch.Tensor | None],
    base_tensor: torch.Tensor,
    key: str,
    sources: list[Source],
    warned: set[int],
    first_index: int = 0,
) -> None:
    """Warn once per source whose delta is implausibly large (`first_index`: the index of `sources[0]` in `warned`)."""
    base_norm = float(base_tensor.norm())
    for offset, delta in enumerate(deltas):
        index = first_index + offset
        if delta is None or index in warned or base_norm == 0:
            continue
        ratio = float(delta.norm()) / base_norm
        if ratio > _IMPLAUSIBLE_RELATIVE_DELTA:
            warned.add(index)
            logger.warning(
                "%s: its %s differs from the base's by %.0f%% of the base's norm; is it really fine-tuned from this "
                "base?",
                sources[offset].label,
                key,
                100 * ratio,
            )


def _vocab_rows(tensor: torch.Tensor, key: str, rows: int, vocab: int, plan: Plan) -> torch.Tensor:
    """Rows of the embedding / LM head: the base's rows (merged like any tensor, padding rows past the tokenizer
    included), new rows (the mean of the vocabulary's, as transformers' resizing does) up to the new size, and each
    placeholder's row taken from its source where the source had that token (so its logit matches the source's).
    A placeholder's embedding is always replaced by features and its logit suppressed in generation, so the value of
    a placeholder row without a source row does not matter."""
    if tensor.shape[0] < rows:
        extra = tensor[:vocab].mean(dim=0, keepdim=True).expand(rows - tensor.shape[0], -1)
        tensor = torch.cat([tensor, extra])
    for name, (_, part) in plan.modalities.items():
        row = part.placeholder_rows.get(key)
        if row is not None:
            tensor[plan.config.modalities[name].placeholder_id] = row.load().float()
    return tensor


def _plan_routed(
    plan: Plan,
    key: str,
    prefix: str,
    base: BaseModel,
    sources: list[Source],
    weights: list[float],
    text_ranks: list[int],
) -> None:
    """The stacked factors of one routed layer (`lora_layout: stacked`): the text block (each source's text LoRA with
    `λ_i s_i` folded into its B, scaling 1), then each modality's own LoRA as its source trained it (its scaling is in
    the config), in the config's order. Missing factors (a source without a LoRA on this layer) are zeros."""
    out_features, in_features = base.shape(key)
    layout = delta_layout(plan.config)

    def stacked(side: str) -> torch.Tensor:
        blocks = []
        for source, weight, rank in zip(sources, weights, text_ranks):
            low_rank = source.text_lora.get(key)
            if side == "A":
                blocks.append(low_rank.lora_a.load().float() if low_rank else torch.zeros(rank, in_features))
            elif low_rank:
                blocks.append(low_rank.lora_b.load().float() * (weight * low_rank.scaling))
            else:
                blocks.append(torch.zeros(out_features, rank))
        for block in layout.modality_blocks:
            low_rank = plan.modalities[block.name][1].lora_factors.get(key)
            if side == "A":
                blocks.append(low_rank.lora_a.load().float() if low_rank else torch.zeros(block.rank, in_features))
            else:
                blocks.append(low_rank.lora_b.load().float() if low_rank else torch.zeros(out_features, block.rank))
        return torch.cat(blocks, dim=0 if side == "A" else 1)

    plan.producers[stacked_factor_key(prefix, "A")] = lambda: stacked("A")
    plan.producers[stacked_factor_key(prefix, "B")] = lambda: stacked("B")
    plan.shapes[stacked_factor_key(prefix, "A")] = (layout.rank, in_features)
    plan.shapes[stacked_factor_key(prefix, "B")] = (out_features, layout.rank)


def _plan_routed_factors(plan: Plan, key: str, prefix: str, merged: Callable[[str], torch.Tensor]) -> None:
    """The stacked factors of one routed layer of a `method: routed` composite, in the layout's column order (see
    `routed.py`)."""
    out_features, in_features = plan.routed.base.shape(key)
    layout = delta_layout(plan.config)

    def stacked(side: str) -> torch.Tensor:
        blocks = [plan.routed.factor(key, side, block.name, merged) for block in layout.blocks]
        return torch.cat(blocks, dim=0 if side == "A" else 1)

    plan.producers[stacked_factor_key(prefix, "A")] = lambda: stacked("A")
    plan.producers[stacked_factor_key(prefix, "B")] = lambda: stacked("B")
    plan.shapes[stacked_factor_key(prefix, "A")] = (layout.rank, in_features)
    plan.shapes[stacked_factor_key(prefix, "B")] = (out_features, layout.rank)


def _plan_modalities(plan: Plan) -> None:
    for name, (_, part) in plan.modalities.items():
        for key, lazy in part.encoder_weights.items():
            plan.producers[encoder_key(name, key)] = lazy.load
            plan.shapes[encoder_key(name, key)] = tuple(lazy.shape)
        for key, lazy in part.projector_weights.items():
            plan.producers[projector_key(name, key)] = lazy.load
            plan.shapes[projector_key(name, key)] = tuple(lazy.shape)
        for side in PROJECTOR_TOKENS:
            lazy: Lazy | None = getattr(part, side)
            if lazy is not None:
                plan.producers[projector_key(name, side)] = lazy.load
                plan.shapes[projector_key(name, side)] = tuple(lazy.shape)


def expected_state(config: CompositeMLLMConfig) -> dict[str, tuple[int, ...]]:
    """Keys and shapes `save_pretrained` would write for a composite of `config` (built on the meta device)."""
    with torch.device("meta"):
        model = CompositeMLLMForCausalLM(config)
    state = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return state


def _check_against_model(plan: Plan) -> None:
    expected = expected_state(plan.config)
    if plan.config.tie_word_embeddings:
        plan.producers.pop("lm_head.weight", None)
        plan.shapes.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(plan.producers))
    unexpected = sorted(set(plan.producers) - set(expected))
    if missing or unexpected:
        raise ConversionError(
            f"The sources do not fill the composite exactly: missing {missing[:4]}, unexpected {unexpected[:4]}; "
            "a source lacks a part of its encoder/projector or holds tensors of another architecture."
        )
    for key, shape in expected.items():
        if plan.shapes[key] != shape:
            raise ConversionError(
                f"Tensor {key!r} would have shape {plan.shapes[key]} but the composite needs {shape}; the source's "
                "encoder or projector does not fit its config or the base LLM's width."
            )
    # Write in the model's own order, so that shards hold neighbouring layers.
    plan.producers = {key: plan.producers[key] for key in expected}
