"""Modality-routed low-rank layers (DAMC at close to the cost of the plain LLM).

For one linear layer with original weight `W0`, text deltas `T_i` merged with weights `λ_i`, and a modality delta
`M_m` of modality m:

- text tokens use `W_text = W0 + Σ λ_i T_i`;
- tokens of modality m use `W0 + M_m = W_text + M_m - Σ λ_i T_i`.

Every delta is low-rank, `s B A`. A routed projection keeps the original `nn.Linear` as its `base_layer` child and
the factors of all its deltas stacked, in the order of a `DeltaLayout`: the text delta first (`Σ λ_i T_i`, rank
`Σ r_i`), then each modality's own delta. In a composite the text delta is folded into `base_layer` (`W_text`), so
text tokens, which include every decoded token, cost exactly the base layer's one matmul.

A forward pass with modality tokens gets a `RoutingPlan`, built once per forward outside the decoder layers (one host
sync, where the composite counts its placeholders anyway): the span of rows from the first to the last routed token,
and for each row of the span a mask over the stacked columns that keeps the text columns (negated: the text delta is
taken off) and the row's own modality's columns, with every delta's scaling folded in (zero for text rows). Every
routed projection then adds, on that span only,

    output[span] += ((x[span] @ A.T) * mask) @ B.T

three kernels (a matmul, a multiplication, an accumulating matmul) whatever the number of modalities and however
their runs interleave, with no data-dependent shapes and no host syncs inside the decoder layers. Placeholders
expand into long runs, so the span is mostly routed rows; text rows inside it cost their share of the low-rank work,
and so do the columns of modalities other than a row's own (the price of a constant number of kernels).

Storage (`CompositeMLLMConfig.lora_layout`; `state_dict_keys` names every key):
- `stacked` (converted composites): one factor pair per projection, `lora_A.weight` `(R, in)` and `lora_B.weight`
  `(out, R)`, whose column blocks the layout names; a plan uses views of them.
- `per_delta` (sources being trained, which give the text and the modality delta their own learning rates):
  `text_lora_A.weight` / `text_lora_B.weight` and `lora_A.<modality>.weight` / `lora_B.<modality>.weight`, as PEFT
  keys its adapters; a plan concatenates them per forward (two more kernels).
Factors are `nn.Linear` children without bias, so bitsandbytes quantizes them with the base weights when their shapes
fit its kernels (`UnquantizedFactor` otherwise); `llm_int8_skip_modules=[r".*lora_[AB]", "lm_head"]` keeps them in 16
bits.

When training (`text_folded=False`) the base holds `W0`, and the plan's span is every row: text rows get `+Σ λ_i T_i`
and rows of a modality with its own delta get `M_m` instead.

The plan reaches every routed projection through one `RoutingChannel` per model: the composite sets it around its call
of the text model and clears it afterwards, and gradient checkpointing's recomputation (which runs after the forward
returned) re-enters the plan it was recorded with (see `CompositeMLLMPreTrainedModel._set_gradient_checkpointing`).
A text model called on its own sees no plan: text weights only.

Trading memory for speed (`materialize_original_weight`): a projection may also keep a dense copy of `W0`; the span
then goes through `W0` (plus the text delta on its text rows and each row's own modality delta) and the other rows
through `W_text`, each row through one dense matmul, as in the plain LLM. The copy is never saved.
"""

import math
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import initialization as init

from .configuration_composite import LORA_LAYOUTS
from .offload import is_offloaded, weights_loaded
from .state_dict_keys import TEXT


# bitsandbytes' 4-bit kernels need in_features and out_features in these multiples (on CPU it fails otherwise).
QUANTIZABLE_IN_MULTIPLE, QUANTIZABLE_OUT_MULTIPLE = 64, 32


@dataclass(frozen=True)
class DeltaBlock:
    """The columns `[start, stop)` of the stacked factors that hold one delta (`text`, or a modality's), and its
    scaling `alpha / r`."""

    name: str
    start: int
    stop: int
    scaling: float

    @property
    def rank(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class DeltaLayout:
    """The deltas of every routed projection of one model, in stacked column order: the text delta first (when it has
    one), then each modality with its own delta, by name."""

    blocks: tuple[DeltaBlock, ...]
    text_folded: bool = True

    @classmethod
    def build(
        cls, text_rank: int, text_alpha: float | None, modality_ranks: dict[str, tuple[int, float]], text_folded: bool
    ) -> "DeltaLayout":
        blocks, start = [], 0
        if text_rank > 0:
            blocks.append(
                DeltaBlock(TEXT, 0, text_rank, (text_alpha if text_alpha is not None else text_rank) / text_rank)
            )
            start = text_rank
        # By name, not in the config's order: config.json is written with sorted keys, so only an order that does not
        # depend on the dict's survives a save and load.
        for name, (rank, alpha) in sorted(modality_ranks.items()):
            blocks.append(DeltaBlock(name, start, start + rank, alpha / rank))
            start += rank
        return cls(tuple(blocks), text_folded)

    @property
    def rank(self) -> int:
        return self.blocks[-1].stop if self.blocks else 0

    @property
    def text(self) -> DeltaBlock | None:
        return self.blocks[0] if self.blocks and self.blocks[0].name == TEXT else None

    @property
    def modality_blocks(self) -> tuple[DeltaBlock, ...]:
        return tuple(block for block in self.blocks if block.name != TEXT)

    def block(self, name: str) -> DeltaBlock:
        for block in self.blocks:
            if block.name == name:
                return block
        raise KeyError(f"No delta named {name!r}; this layout has {[block.name for block in self.blocks]}.")

    @property
    def needs_plan_for_text(self) -> bool:
        """Whether text rows need low-rank work too: an unfolded text delta (a source being trained)."""
        return self.text is not None and not self.text_folded


@dataclass
class RoutingPlan:
    """Where the low-rank work of one forward pass goes, shared by every routed projection of the model.

    `rows`: the span `[start, stop)` of rows (of the text model's input flattened to `(batch * seq, hidden)`) that
    get low-rank work; `columns`: how many of the stacked columns it needs (the text block and the modality blocks up
    to the last modality present); `mask`: `(stop - start, columns)`, the scaling of each column for each row
    (negative on the text columns of routed rows when the text delta is folded), zero where a row must not use a
    column. `dense_mask` is the mask for projections that keep a dense `W0` (`materialize_original_weight`)."""

    total_rows: int
    rows: tuple[int, int]
    columns: int
    mask: torch.Tensor
    dense_mask: torch.Tensor | None = None
    _cast: dict = field(default_factory=dict, repr=False)

    def mask_for(self, reference: torch.Tensor, dense: bool = False) -> torch.Tensor:
        """The mask on `reference`'s device and in its dtype (cast once per forward, for the few models whose
        layers sit on several devices or whose factors are in another dtype)."""
        mask = self.dense_mask if dense else self.mask
        if mask.device == reference.device and mask.dtype == reference.dtype:
            return mask
        key = (dense, reference.device, reference.dtype)
        if key not in self._cast:
            self._cast[key] = mask.to(device=reference.device, dtype=reference.dtype)
        return self._cast[key]


@dataclass(frozen=True)
class IndexSummary:
    """Per slot of a modality index (0: text, i: the i-th modality): how many positions it has, and the first and
    last of them in the flattened `(batch * seq)` order (`total` and -1 for a slot without positions)."""

    total: int
    counts: tuple[int, ...]
    first: tuple[int, ...]
    last: tuple[int, ...]


def summarize_index(modality_index: torch.Tensor, slots: int) -> IndexSummary:
    """The summary of a `(batch, seq)` modality index with `slots` slots (text included), read from the device with
    one host sync: what a forward pass needs to check its placeholders and to plan its routing."""
    flat = modality_index.reshape(-1)
    total = flat.numel()
    positions = torch.arange(total, device=flat.device)
    counts = torch.bincount(flat, minlength=slots)
    first = torch.full((slots,), total, device=flat.device).scatter_reduce(0, flat, positions, "amin")
    last = torch.full((slots,), -1, device=flat.device).scatter_reduce(0, flat, positions, "amax")
    values = torch.cat([counts[:slots], first, last]).tolist()
    return IndexSummary(total, tuple(values[:slots]), tuple(values[slots : 2 * slots]), tuple(values[2 * slots :]))


def plan_routing(
    modality_index: torch.Tensor,
    layout: DeltaLayout,
    slot_names: list[str],
    dtype: torch.dtype,
    static_shapes: bool = False,
    dense: bool = False,
    summary: IndexSummary | None = None,
) -> RoutingPlan | None:
    """The routing plan of one forward pass from its `(batch, seq)` modality index (0: text, i: `slot_names[i - 1]`).
    None when no row needs low-rank work (a text-only prompt of a composite, whose text delta is folded).

    The default plans the span of routed rows and the columns of the modalities present, from the index's `summary`
    (read here with one host sync when not given). `static_shapes=True` plans every row and every column, with no
    host sync: the same work and shapes whatever the tokens (for graphs compiled once, which must not depend on
    them). `dense=True` also builds the mask for projections that keep a dense `W0`."""
    if not layout.blocks:
        return None
    device = modality_index.device
    flat = modality_index.reshape(-1)
    total_rows = flat.numel()
    block_of_slot = [-1] + [
        next((index for index, block in enumerate(layout.blocks) if block.name == name), -1) for name in slot_names
    ]
    rows, columns = (0, total_rows), layout.rank
    if not static_shapes:
        summary = summary if summary is not None else summarize_index(modality_index, len(block_of_slot))
        routed_slots = [slot for slot, block in enumerate(block_of_slot) if block >= 0 and summary.counts[slot]]
        if routed_slots:
            last_block = max(block_of_slot[slot] for slot in routed_slots)
            columns = layout.blocks[last_block].stop
            span = (
                min(summary.first[slot] for slot in routed_slots),
                max(summary.last[slot] for slot in routed_slots) + 1,
            )
        elif not layout.needs_plan_for_text:
            return None
        else:
            columns = layout.text.stop
        # Unfolded text (training): every row gets low-rank work.
        rows = (0, total_rows) if layout.needs_plan_for_text else span
    start, stop = rows
    span_blocks = torch.tensor(block_of_slot, device=device)[flat[start:stop], None]
    column_block = torch.tensor(
        [index for index, block in enumerate(layout.blocks) for _ in range(block.rank)][:columns], device=device
    )[None]
    column_scale = torch.tensor(
        [
            (-1.0 if block.name == TEXT and layout.text_folded else 1.0) * block.scaling
            for block in layout.blocks
            for _ in range(block.rank)
        ][:columns],
        device=device,
    )[None]
    own = column_block == span_blocks
    is_text_column = torch.zeros_like(own) if layout.text is None else column_block == 0
    is_routed = span_blocks >= 0
    # Folded: routed rows take the text delta off. Unfolded (training): rows without their own delta add it.
    text_use = is_text_column & (is_routed if layout.text_folded else ~is_routed)
    mask = torch.where(own | text_use, column_scale, 0.0)
    dense_mask = None
    if dense and layout.text is not None:
        # A projection computing the span with `W0` adds the text delta back on the span's text rows (and on rows of
        # modalities without a delta of their own), and keeps only each routed row's own delta.
        text_scale = torch.where(is_text_column & ~is_routed, layout.text.scaling, 0.0)
        dense_mask = torch.where(own, column_scale, text_scale).to(dtype)
    return RoutingPlan(total_rows, rows, columns, mask.to(dtype), dense_mask)


class RoutingChannel:
    """The routing plan of the forward pass in flight, read by every routed projection of one model. Only the
    composite's forward (and gradient checkpointing's replay of it) sets it."""

    def __init__(self):
        self.plan: RoutingPlan | None = None


class UnquantizedFactor(nn.Linear):
    """A low-rank factor that stays in 16/32 bits in a 4-bit model: a subclass, so bitsandbytes (which converts
    modules whose type is exactly `nn.Linear`) leaves it alone. Used for factors whose shape fits no 4-bit kernel
    (small ranks such as 8); they are small."""


def _factor(in_features: int, out_features: int, **factory) -> nn.Linear:
    """One low-rank factor as a linear layer without bias; quantizable only when its shape fits the kernels."""
    fits = in_features % QUANTIZABLE_IN_MULTIPLE == 0 and out_features % QUANTIZABLE_OUT_MULTIPLE == 0
    return (nn.Linear if fits else UnquantizedFactor)(in_features, out_features, bias=False, **factory)


def _is_unquantized(layer: nn.Module) -> bool:
    return type(layer) in (nn.Linear, UnquantizedFactor)


class RoutedLinear(nn.Module):
    """A linear layer whose output on the rows of a modality gets that modality's low-rank delta (see module doc)."""

    def __init__(
        self,
        base_layer: nn.Linear,
        channel: RoutingChannel,
        layout: DeltaLayout,
        lora_layout: str = "stacked",
        dropout: float = 0.0,
    ):
        super().__init__()
        if lora_layout not in LORA_LAYOUTS:
            raise ValueError(f"lora_layout must be one of {list(LORA_LAYOUTS)}, got {lora_layout!r}.")
        self.base_layer = base_layer
        self.channel = channel
        self.layout = layout
        self.stacked = lora_layout == "stacked"
        in_features, out_features = base_layer.in_features, base_layer.out_features
        factory = {"device": base_layer.weight.device, "dtype": base_layer.weight.dtype}
        if not factory["dtype"].is_floating_point:
            factory["dtype"] = torch.float32
        if self.stacked:
            self.lora_A = _factor(in_features, layout.rank, **factory)
            self.lora_B = _factor(layout.rank, out_features, **factory)
        else:
            self.lora_A, self.lora_B = nn.ModuleDict(), nn.ModuleDict()
            self.text_lora_A = self.text_lora_B = None
            for block in layout.blocks:
                factor_a, factor_b = (
                    _factor(in_features, block.rank, **factory),
                    _factor(block.rank, out_features, **factory),
                )
                if block.name == TEXT:
                    self.text_lora_A, self.text_lora_B = factor_a, factor_b
                else:
                    self.lora_A[block.name], self.lora_B[block.name] = factor_a, factor_b
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # W0 as a dense tensor, only after materialize_original_weight(); a non-persistent buffer, never saved.
        self.register_buffer("original_weight", None, persistent=False)
        self.reset_lora_parameters()

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    @property
    def weight(self) -> torch.Tensor:
        # Code that inspects `proj.weight` (dtype or device checks) keeps working on the wrapped layer.
        return self.base_layer.weight

    @property
    def text_folded(self) -> bool:
        return self.layout.text_folded

    def _factor_modules(self) -> list[tuple[DeltaBlock | None, nn.Linear, nn.Linear]]:
        """(block, A, B) per stored factor pair: one pair for all blocks when stacked (block None), else one per
        delta, in column order."""
        if self.stacked:
            return [(None, self.lora_A, self.lora_B)]
        pairs = []
        for block in self.layout.blocks:
            if block.name == TEXT:
                pairs.append((block, self.text_lora_A, self.text_lora_B))
            else:
                pairs.append((block, self.lora_A[block.name], self.lora_B[block.name]))
        return pairs

    def factor_parameters(self) -> list[nn.Parameter]:
        """The weights of every low-rank factor (in a 4-bit model, bitsandbytes' packed `Params4bit` where
        quantized)."""
        return [
            factor for _, factor_a, factor_b in self._factor_modules() for factor in (factor_a.weight, factor_b.weight)
        ]

    def delta_factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """`(A, B)` of one delta (`"text"` or a modality name), unscaled (its scaling is `layout.block(name).scaling`):
        views into the stacked factors, or the delta's own weights. Unquantized factors only."""
        block = self.layout.block(name)
        if self.stacked:
            return self.lora_A.weight[block.start : block.stop], self.lora_B.weight[:, block.start : block.stop]
        if block.name == TEXT:
            return self.text_lora_A.weight, self.text_lora_B.weight
        return self.lora_A[name].weight, self.lora_B[name].weight

    def delta_weight(self, name: str) -> torch.Tensor:
        """The dense delta `s B A` of one delta, in float32."""
        factor_a, factor_b = self.delta_factors(name)
        return (factor_b.float() @ factor_a.float()) * self.layout.block(name).scaling

    @torch.no_grad()
    def reset_lora_parameters(self) -> None:
        """PEFT's LoRA initialisation: A Kaiming-uniform, B zero, so that a fresh delta is exactly zero. Factors loaded
        from a checkpoint are left alone (transformers' `init.*` skip tensors it marked as loaded)."""
        for _, factor_a, factor_b in self._factor_modules():
            if factor_a.weight.device.type == "meta" or not factor_a.weight.dtype.is_floating_point:
                continue  # not materialized, or quantized
            # Kaiming's bound depends on the fan-in only, so stacked rows get exactly what each delta's own A would.
            init.kaiming_uniform_(factor_a.weight, a=math.sqrt(5))
            init.zeros_(factor_b.weight)

    @torch.no_grad()
    def materialize_original_weight(self) -> None:
        """Keep `W0 = W_text - Σ λ_i T_i` densely (see the module doc). A no-op without a text delta, where the base
        already is `W0`."""
        if self.layout.text is None or self.original_weight is not None:
            return
        if not self.text_folded:
            raise ValueError(
                "materialize_original_weights() needs the text delta folded into the base weights (a converted "
                "composite); while training, the base already holds the original weights."
            )
        weight = self.base_layer.weight
        if weight.device.type == "meta":
            raise ValueError(
                "materialize_original_weights() needs the base weights in memory, but they are offloaded (meta "
                "device); load the model without offloading to disk or CPU."
            )
        quantized = [layer for _, a, b in self._factor_modules() for layer in (a, b) if not _is_unquantized(layer)]
        if not _is_unquantized(self.base_layer):
            quantized.insert(0, self.base_layer)
        if quantized or not weight.dtype.is_floating_point:
            holder = quantized[0] if quantized else self.base_layer
            raise ValueError(
                f"materialize_original_weights() needs 16- or 32-bit weights, but this layer holds a "
                f"{type(holder).__name__}: a dense copy would undo the quantization. Load the model unquantized, or "
                "keep the default low-rank routing."
            )
        original = (weight.float() - self.delta_weight(TEXT).to(weight.device)).to(weight.dtype)
        self.original_weight = original

    def release_original_weight(self) -> None:
        """Drop the dense `W0` again (back to the low-rank correction on modality rows)."""
        self.original_weight = None

    # -- forward ---------------------------------------------------------------------------------------------------

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        plan = self.channel.plan
        if plan is None and not self.layout.needs_plan_for_text:
            # No modality rows (a text-only prompt, every decode step): exactly the base layer, checked first, with no
            # other work, since this runs for every projection of every decoded token.
            return self.base_layer(hidden_states)
        first_factor = self.lora_A if self.stacked else self._factor_modules()[0][1]
        if is_offloaded(first_factor.weight):
            # `device_map` offloaded this layer, and the factors' weights are used below, not their modules' forwards.
            factors = [factor for _, factor_a, factor_b in self._factor_modules() for factor in (factor_a, factor_b)]
            with weights_loaded(*factors):
                return self._forward_deltas(hidden_states, plan)
        return self._forward_deltas(hidden_states, plan)

    def _forward_deltas(self, hidden_states: torch.Tensor, plan: RoutingPlan | None) -> torch.Tensor:
        if plan is None:
            return self._forward_text_delta(hidden_states)
        flat_input = hidden_states.reshape(-1, hidden_states.shape[-1])
        if flat_input.shape[0] != plan.total_rows:
            raise RuntimeError(
                f"A routed projection got {flat_input.shape[0]} rows but the routing plan is for {plan.total_rows}: "
                f"this text model ({type(self).__name__} inside it) reorders or regroups tokens before its "
                "projections (a mixture of experts?), which DAMC routing does not support."
            )
        start, stop = plan.rows
        if self.original_weight is not None:
            return self._forward_with_original_weight(flat_input, plan).view(*hidden_states.shape[:-1], -1)
        output = self.base_layer(hidden_states)
        span = output.view(-1, output.shape[-1])[start:stop]
        hidden = self._shrink(flat_input[start:stop], plan.columns)
        self._expand_into(span, hidden * plan.mask_for(hidden), plan.columns)
        return output

    def _forward_text_delta(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """No plan and an unfolded text delta (a source's text model called on its own): the text delta on every
        row."""
        text = self.layout.text
        output = self.base_layer(hidden_states)
        flat = output.view(-1, output.shape[-1])
        hidden = self._shrink(hidden_states.reshape(-1, hidden_states.shape[-1]), text.stop) * text.scaling
        self._expand_into(flat, hidden, text.stop)
        return output

    def _factor_input(self, rows: torch.Tensor) -> torch.Tensor:
        """Rows cast to the factors' dtype (hidden states may come in another, e.g. under autocast). Quantized
        factors cast to their compute dtype themselves."""
        factor = self.lora_A if self.stacked else self._factor_modules()[0][1]
        dtype = factor.weight.dtype
        return rows.to(dtype) if dtype.is_floating_point else rows

    def _shrink(self, rows: torch.Tensor, columns: int) -> torch.Tensor:
        """`rows @ A[:columns].T`; with dropout while training, on the dropped-out rows, except for a folded text
        delta (part of the frozen base path, which sees the rows as they are)."""
        rows = self._factor_input(rows)
        dropping = self.training and isinstance(self.dropout, nn.Dropout)
        text = self.layout.text
        if dropping and text is not None and self.text_folded:
            plain, dropped = self._project_a(rows, columns), self._project_a(self.dropout(rows), columns)
            return torch.cat([plain[:, : text.stop], dropped[:, text.stop :]], dim=-1)
        return self._project_a(self.dropout(rows) if dropping else rows, columns)

    def _project_a(self, rows: torch.Tensor, columns: int) -> torch.Tensor:
        if self.stacked:
            if _is_unquantized(self.lora_A):
                return nn.functional.linear(rows, self.lora_A.weight[:columns])
            return self.lora_A(rows)[:, :columns]
        pairs = [(block, factor_a) for block, factor_a, _ in self._factor_modules() if block.start < columns]
        if all(_is_unquantized(factor_a) for _, factor_a in pairs):
            weight = torch.cat([factor_a.weight for _, factor_a in pairs]) if len(pairs) > 1 else pairs[0][1].weight
            return nn.functional.linear(rows, weight)
        return torch.cat([factor_a(rows) for _, factor_a in pairs], dim=-1)

    def _expand_into(self, target: torch.Tensor, hidden: torch.Tensor, columns: int) -> None:
        """`target += hidden @ B[:, :columns].T`, in place: fused into one accumulating matmul for unquantized factors
        of the target's dtype."""
        if self.stacked:
            factor_b = self.lora_B
            if _is_unquantized(factor_b):
                weight = factor_b.weight[:, :columns]
            else:
                padded = nn.functional.pad(hidden, (0, self.layout.rank - columns))
                target.add_(factor_b(padded).to(target.dtype))
                return
        else:
            pairs = [(block, factor_b) for block, _, factor_b in self._factor_modules() if block.start < columns]
            if not all(_is_unquantized(factor_b) for _, factor_b in pairs):
                for block, factor_b in pairs:
                    target.add_(factor_b(hidden[:, block.start : block.stop]).to(target.dtype))
                return
            weight = (
                torch.cat([factor_b.weight for _, factor_b in pairs], dim=1) if len(pairs) > 1 else pairs[0][1].weight
            )
        if target.dtype == hidden.dtype == weight.dtype:
            target.addmm_(hidden, weight.t())
        else:
            target.add_((hidden @ weight.t().to(hidden.dtype)).to(target.dtype))

    def _forward_with_original_weight(self, flat_input: torch.Tensor, plan: RoutingPlan) -> torch.Tensor:
        """Rows outside the span through the base (`W_text`), the span through the dense `W0` plus its rows' deltas
        (the text delta on text rows, each routed row's own delta)."""
        start, stop = plan.rows
        bias = self.base_layer.bias
        span_input = flat_input[start:stop]
        hidden = self._shrink(span_input, plan.columns) * plan.mask_for(span_input, dense=True)
        if torch.is_grad_enabled() or flat_input.dtype != self.original_weight.dtype:
            span = nn.functional.linear(span_input, self.original_weight, bias)
            self._expand_into(span, hidden, plan.columns)
            parts = [self.base_layer(flat_input[:start]), span, self.base_layer(flat_input[stop:])]
            return torch.cat([part for part in parts if part.shape[0]])
        output = flat_input.new_empty(flat_input.shape[0], self.out_features)
        for rows, weight in (
            (slice(0, start), self.base_layer.weight),
            (slice(start, stop), self.original_weight),
            (slice(stop, None), self.base_layer.weight),
        ):
            source, target = flat_input[rows], output[rows]
            if source.shape[0] == 0:
                continue
            if bias is None:
                torch.mm(source, weight.t(), out=target)
            else:
                torch.addmm(bias, source, weight.t(), out=target)
        self._expand_into(output[start:stop], hidden, plan.columns)
        return output

    def extra_repr(self) -> str:
        ranks = {block.name: block.rank for block in self.layout.blocks}
        storage = "stacked" if self.stacked else "per_delta"
        dense = ", original_weight=dense" if self.original_weight is not None else ""
        return f"ranks={ranks}, lora_layout={storage}, text_folded={self.text_folded}{dense}"


def inject_routed_layers(
    language_model: nn.Module,
    channel: RoutingChannel,
    target_modules: list[str],
    layout: DeltaLayout,
    lora_layout: str = "stacked",
    dropout: float = 0.0,
) -> int:
    """Replace every `nn.Linear` of `language_model` whose attribute name is in `target_modules` by a `RoutedLinear`
    reading `channel`. Returns how many were replaced."""
    targets = [
        (name, module)
        for name, module in language_model.named_modules()
        if type(module) is nn.Linear and name.rsplit(".", 1)[-1] in target_modules
    ]
    if not targets:
        raise ValueError(
            f"None of the lora_target_modules {target_modules} names an nn.Linear of the text model "
            f"({type(language_model).__name__}); set lora_target_modules to its projection names."
        )
    for name, module in targets:
        parent_name, _, child_name = name.rpartition(".")
        parent = language_model.get_submodule(parent_name)
        setattr(parent, child_name, RoutedLinear(module, channel, layout, lora_layout, dropout))
    return len(targets)
