"""Modality-routed low-rank layers (DAMC at close to the cost of the plain LLM).

For one linear layer with original weight `W0`, text deltas `T_i` merged with weights `λ_i`, and a modality delta
`M_m` of modality m:

- text tokens use `W_text = W0 + Σ λ_i T_i`;
- tokens of modality m use `W0 + M_m = W_text + M_m - Σ λ_i T_i`.

The wrapper keeps the original `nn.Linear` as its `base_layer` child and each low-rank factor as an `nn.Linear` child
without bias, as PEFT does (`lora_A.<modality>.weight`, `text_lora_A.weight`). bitsandbytes quantizes modules whose
type is exactly `nn.Linear`, so a 4-bit composite quantizes the factors with the base weights: at 7B shape a
4-modality composite holds about 2.5B factor parameters beside 6.5B in the base projections.
`llm_int8_skip_modules=[r".*lora_[AB]", "lm_head"]` keeps them in 16 bits where wanted (training on a 4-bit base);
factors whose rank fits no 4-bit kernel (`UnquantizedFactor`) always stay so.

In a composite the text delta is folded into `base_layer` (`text_lora.folded=True`), so text tokens, which include
every decoded token, cost exactly one dense matmul. Only the rows of a modality get the two low-rank products `M_m`
and `-Σ λ_i T_i`, nothing is computed for other rows. Without autograd, and when the rows come in long blocks
(placeholders expand into runs of hundreds of tokens), the products accumulate into the output's rows in place;
otherwise the rows of all modalities are gathered once, corrected, and added back. When training (`folded=False`), the
base holds `W0` and the text delta is added to every row, then taken off the rows of modalities that have their own
delta.

Trading memory for speed (`materialize_original_weights`): a wrapper may also keep a dense copy of `W0`, so that
the rows of modality m cost one dense matmul with `W0` plus only `M_m`, instead of the dense matmul with `W_text`
plus the two low-rank products, the text one of rank `Σ r_i`. Text rows then go through `W_text` and modality rows
through `W0`, each row through one dense matmul, as in the plain LLM: one matmul per block of consecutive rows that
share a weight (matmuls over a few hundred rows cost more per row on CPU), or per gathered group. The copy is never
saved.

The rows of each modality reach the wrappers as the `modality_routing` keyword argument of the LLM's forward: every
decoder layer passes its keyword arguments on to its attention module, where a pre-hook reads (and removes) it and
stores it in the shared `RoutingState` used by that layer's projections. Because the argument travels with each
layer's call, it is right under gradient checkpointing too, whose recomputation replays the layer's call after the
forward pass has returned.
"""

import inspect
import math
from dataclasses import dataclass

import torch
from torch import nn
from transformers import initialization as init


ROUTING_KWARG = "modality_routing"
# Fewest rows per block, on average, for which routed layers work on blocks of consecutive rows in place rather than
# gather the rows (see ModalityRouting.contiguous_blocks). On CPU a matmul over a few hundred rows already costs 15-40%
# more per row than one over a thousand: hence blocks (not one matmul per modality run), and a floor on their size.
MIN_MEAN_BLOCK = 64
# bitsandbytes' 4-bit kernels need in_features and out_features in these multiples (on CPU it fails otherwise).
QUANTIZABLE_IN_MULTIPLE, QUANTIZABLE_OUT_MULTIPLE = 64, 32


@dataclass
class RowBlock:
    """Consecutive rows `[start, stop)` that one dense weight serves: text rows (`spans` None) or rows of routed
    modalities, whose own runs `spans` lists as `(name, start, stop)`."""

    start: int
    stop: int
    spans: list[tuple[str, int, int]] | None


class ModalityRouting:
    """Flat row indices (into `batch * seq`) of the tokens of each modality in one forward pass."""

    def __init__(self, rows: dict[str, torch.Tensor]):
        self.rows = rows
        # Derived row sets, computed by the first layer that asks and shared by the others in the same forward.
        self._grouped: dict[tuple[str, ...], tuple[torch.Tensor, list[tuple[str, int, int]]]] = {}
        self._outside: dict[tuple[int, tuple[str, ...]], torch.Tensor] = {}
        self._blocks: dict[tuple[int, tuple[str, ...]], list[RowBlock] | None] = {}

    def grouped_rows(self, names: tuple[str, ...]) -> tuple[torch.Tensor, list[tuple[str, int, int]]]:
        """The rows of the modalities `names` one after another, and each one's `(name, start, stop)` span in them:
        one gather, then one matmul over all of them where the weights are shared."""
        if names not in self._grouped:
            spans, start = [], 0
            for name in names:
                spans.append((name, start, start + self.rows[name].numel()))
                start += self.rows[name].numel()
            self._grouped[names] = (torch.cat([self.rows[name] for name in names]), spans)
        return self._grouped[names]

    def rows_outside(self, total_rows: int, names: tuple[str, ...]) -> torch.Tensor:
        """Rows of `range(total_rows)` in none of the modalities `names`."""
        key = (total_rows, names)
        if key not in self._outside:
            rows, _ = self.grouped_rows(names)
            outside = torch.ones(total_rows, dtype=torch.bool, device=rows.device)
            outside[rows] = False
            self._outside[key] = outside.nonzero().squeeze(-1)
        return self._outside[key]

    def contiguous_blocks(self, total_rows: int, names: tuple[str, ...]) -> list[RowBlock] | None:
        """`range(total_rows)` cut into blocks of consecutive rows that share one dense weight: text rows (`spans`
        None), or rows of the modalities `names` (`spans`: each modality's runs in the block, as `(name, start,
        stop)`). None when the blocks would average fewer than `MIN_MEAN_BLOCK` rows, where gathering the rows beats
        that many small matmuls. Placeholders expand into long runs, so a prompt has few blocks."""
        key = (total_rows, names)
        if key not in self._blocks:
            labels = torch.zeros(total_rows, dtype=torch.long, device=self.rows[names[0]].device)
            for slot, name in enumerate(names, start=1):
                labels[self.rows[name]] = slot
            starts = [0, *((labels[1:] != labels[:-1]).nonzero().squeeze(-1) + 1).tolist()]
            runs = zip(labels[starts].tolist(), starts, [*starts[1:], total_rows])
            blocks: list[RowBlock] = []
            for slot, start, stop in runs:
                if slot and blocks and blocks[-1].spans is not None:  # extends the modality block before it
                    blocks[-1].spans.append((names[slot - 1], start, stop))
                    blocks[-1].stop = stop
                else:
                    blocks.append(RowBlock(start, stop, [(names[slot - 1], start, stop)] if slot else None))
            self._blocks[key] = blocks if total_rows >= MIN_MEAN_BLOCK * len(blocks) else None
        return self._blocks[key]

    @classmethod
    def from_modality_index(cls, modality_index: torch.Tensor, names: list[str]) -> "ModalityRouting | None":
        """Build from a `(batch, seq)` index (0 = text, i = `names[i - 1]`); None when every token is text."""
        flat = modality_index.reshape(-1)
        present = torch.unique(flat).tolist()
        rows = {names[slot - 1]: (flat == slot).nonzero().squeeze(-1) for slot in present if slot > 0}
        return cls(rows) if rows else None


class UnquantizedFactor(nn.Linear):
    """A low-rank factor that stays in 16/32 bits in a 4-bit model: a subclass, so bitsandbytes (which converts
    modules whose type is exactly `nn.Linear`) leaves it alone. Used for factors whose shape fits no 4-bit kernel
    (small ranks such as 8); they are small."""


def _factor(in_features: int, out_features: int, **factory) -> nn.Linear:
    """One low-rank factor as a linear layer without bias; quantizable only when its shape fits the kernels."""
    fits = in_features % QUANTIZABLE_IN_MULTIPLE == 0 and out_features % QUANTIZABLE_OUT_MULTIPLE == 0
    return (nn.Linear if fits else UnquantizedFactor)(in_features, out_features, bias=False, **factory)


class RoutingState:
    """The routing of the forward pass in flight, shared by every routed layer of one model."""

    def __init__(self):
        self.routing: ModalityRouting | None = None
        self.deliveries = 0

    def receive(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """Forward pre-hook of each attention module: take the routing out of its keyword arguments."""
        if ROUTING_KWARG in kwargs:
            self.routing = kwargs.pop(ROUTING_KWARG)
            self.deliveries += 1
        return args, kwargs


class RoutedLinear(nn.Module):
    """A linear layer whose output on the rows of a modality gets that modality's low-rank delta (see module doc)."""

    def __init__(
        self,
        base_layer: nn.Linear,
        state: RoutingState,
        modality_ranks: dict[str, tuple[int, float]],
        text_rank: int = 0,
        text_alpha: float | None = None,
        text_folded: bool = True,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.base_layer = base_layer
        self.state = state
        in_features, out_features = base_layer.in_features, base_layer.out_features
        factory = {"device": base_layer.weight.device, "dtype": base_layer.weight.dtype}
        if not factory["dtype"].is_floating_point:
            factory["dtype"] = torch.float32
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.scaling: dict[str, float] = {}
        for name, (rank, alpha) in modality_ranks.items():
            self.lora_A[name] = _factor(in_features, rank, **factory)
            self.lora_B[name] = _factor(rank, out_features, **factory)
            self.scaling[name] = alpha / rank
        self.text_folded = text_folded
        if text_rank > 0:
            self.text_lora_A = _factor(in_features, text_rank, **factory)
            self.text_lora_B = _factor(text_rank, out_features, **factory)
            self.text_scaling = (text_alpha if text_alpha is not None else text_rank) / text_rank
        else:
            self.text_lora_A = self.text_lora_B = None
            self.text_scaling = 0.0
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

    def factor_pairs(self) -> list[tuple[nn.Parameter, nn.Parameter]]:
        """The weights (A, B) of every low-rank delta: one per modality, then the stacked text factors if any. In a
        4-bit model they are bitsandbytes' packed `Params4bit`."""
        pairs = [(self.lora_A[name].weight, self.lora_B[name].weight) for name in self.lora_A]
        if self.text_lora_A is not None:
            pairs.append((self.text_lora_A.weight, self.text_lora_B.weight))
        return pairs

    def factor_parameters(self) -> list[nn.Parameter]:
        return [factor for pair in self.factor_pairs() for factor in pair]

    @torch.no_grad()
    def reset_lora_parameters(self) -> None:
        """PEFT's LoRA initialisation: A Kaiming-uniform, B zero, so that a fresh delta is exactly zero. Factors loaded
        from a checkpoint are left alone (transformers' `init.*` skip tensors it marked as loaded)."""
        for lora_a, lora_b in self.factor_pairs():
            if lora_a.device.type == "meta" or not lora_a.dtype.is_floating_point:  # not materialized, or quantized
                continue
            init.kaiming_uniform_(lora_a, a=math.sqrt(5))
            init.zeros_(lora_b)

    @torch.no_grad()
    def materialize_original_weight(self) -> None:
        """Keep `W0 = W_text - Σ λ_i T_i` densely (see the module doc). A no-op without a text delta, where the base
        already is `W0`."""
        if self.text_lora_A is None or self.original_weight is not None:
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
        quantized = [
            layer for layer in (self.base_layer, self.text_lora_A, self.text_lora_B) if not _is_unquantized(layer)
        ]
        if quantized or not weight.dtype.is_floating_point:
            holder = quantized[0] if quantized else self.base_layer
            raise ValueError(
                f"materialize_original_weights() needs 16- or 32-bit weights, but this layer holds a "
                f"{type(holder).__name__}: a dense copy would undo the quantization. Load the model unquantized, or "
                "keep the default low-rank routing."
            )
        text_delta = (self.text_lora_B.weight.float() @ self.text_lora_A.weight.float()) * self.text_scaling
        original = (weight.float() - text_delta.to(weight.device)).to(weight.dtype)
        self.original_weight = original

    def release_original_weight(self) -> None:
        """Drop the dense `W0` again (back to the low-rank correction on modality rows)."""
        self.original_weight = None

    # Low-rank products are taken as (x @ A^T * scaling) @ B^T: the scaling multiplies the narrow intermediate, and
    # the second product can accumulate straight into its target (`_add_product`), with no separate add.

    def _text_hidden(self, rows: torch.Tensor) -> torch.Tensor:
        # A folded text delta sits in the base weight, applied to the rows as they are: taking it off again must see
        # them without dropout too (dropout belongs to the deltas being trained, not to the frozen base path).
        return self.text_lora_A(rows if self.text_folded else self.dropout(rows)) * self.text_scaling

    def _modality_hidden(self, name: str, rows: torch.Tensor) -> torch.Tensor:
        return self.lora_A[name](self.dropout(rows)) * self.scaling[name]

    @staticmethod
    def _add_product(target: torch.Tensor, hidden: torch.Tensor, factor_b: nn.Module, alpha: float = 1.0) -> None:
        """`target += alpha * factor_b(hidden)`, in place: fused into the matmul for an unquantized factor of the
        target's dtype, else computed by the (4-bit) module and added."""
        if _is_unquantized(factor_b) and target.dtype == hidden.dtype == factor_b.weight.dtype:
            target.addmm_(hidden, factor_b.weight.t(), alpha=alpha)
        else:
            target.add_(factor_b(hidden).to(target.dtype), alpha=alpha)

    def _add_modality_deltas(
        self, target: torch.Tensor, source: torch.Tensor, spans: list[tuple[str, int, int]]
    ) -> None:
        """Each modality's own delta, computed on its span of `source`, added in place to the same span of `target`."""
        for name, start, stop in spans:
            self._add_product(target[start:stop], self._modality_hidden(name, source[start:stop]), self.lora_B[name])

    def _factor_input(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The input cast to the factors' dtype (hidden states may come in another, e.g. under autocast). Quantized
        factors cast to their compute dtype themselves."""
        factor = self.lora_B[next(iter(self.lora_B))] if self.lora_B else self.text_lora_B
        dtype = factor.weight.dtype
        return hidden_states.to(dtype) if dtype.is_floating_point else hidden_states

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        routing = self.state.routing
        if routing is None and (self.text_folded or self.text_lora_A is None):
            # A pass with no modality rows (a text-only prompt, every decode step) is exactly the base layer: checked
            # first, with no other work, since this runs for every projection of every decoded token.
            return self.base_layer(hidden_states)
        # A modality without its own delta uses the text weights, like text.
        routed = () if routing is None else tuple(name for name in routing.rows if name in self.lora_A)
        if routed and self.original_weight is not None:
            return self._forward_with_original_weight(hidden_states, routing, routed)
        output = self.base_layer(hidden_states)
        unfolded_text = self.text_lora_A is not None and not self.text_folded
        if not unfolded_text and not routed:
            return output
        flat_input = self._factor_input(hidden_states.reshape(-1, hidden_states.shape[-1]))
        flat_output = output.reshape(-1, output.shape[-1])
        text_hidden = None
        if unfolded_text:
            text_hidden = self._text_hidden(flat_input)
            flat_output = flat_output + self.text_lora_B(text_hidden).to(flat_output.dtype)
        if routed:
            # In place only without autograd, and with the text delta folded (so no dropout mask has to be matched).
            in_place = not torch.is_grad_enabled() and not unfolded_text
            blocks = routing.contiguous_blocks(flat_output.shape[0], routed) if in_place else None
            if blocks is not None:
                self._correct_blocks_in_place(flat_input, flat_output, blocks)
            else:
                self._correct_gathered_rows(flat_input, flat_output, routing, routed, text_hidden)
        return flat_output.view(output.shape)

    def _correct_blocks_in_place(
        self, flat_input: torch.Tensor, flat_output: torch.Tensor, blocks: list[RowBlock]
    ) -> None:
        """Without autograd, rows in long blocks: each modality block takes the text delta off in one product and
        each of its runs adds its modality's delta, all accumulated into the output's rows in place."""
        for block in blocks:
            if block.spans is None:
                continue
            if self.text_lora_A is not None:
                hidden = self._text_hidden(flat_input[block.start : block.stop])
                self._add_product(flat_output[block.start : block.stop], hidden, self.text_lora_B, alpha=-1.0)
            self._add_modality_deltas(flat_output, flat_input, block.spans)

    def _correct_gathered_rows(
        self,
        flat_input: torch.Tensor,
        flat_output: torch.Tensor,
        routing: ModalityRouting,
        routed: tuple[str, ...],
        text_hidden: torch.Tensor | None,
    ) -> None:
        """The general case: gather the rows of every routed modality, compute their deltas, add them back."""
        rows, spans = routing.grouped_rows(routed)
        selected = flat_input.index_select(0, rows)
        if self.text_lora_A is not None:
            # All modality rows take the text delta off in one product; when it is not folded, with the same
            # dropout mask as the text delta that the caller added.
            text_of_rows = text_hidden.index_select(0, rows) if text_hidden is not None else self._text_hidden(selected)
            delta = self.text_lora_B(-text_of_rows)
            self._add_modality_deltas(delta, selected, spans)
        else:
            delta = torch.cat([
                self.lora_B[name](self._modality_hidden(name, selected[start:stop])) for name, start, stop in spans
            ])
        flat_output.index_add_(0, rows, delta.to(flat_output.dtype))

    def _forward_with_original_weight(
        self, hidden_states: torch.Tensor, routing: ModalityRouting, routed: tuple[str, ...]
    ) -> torch.Tensor:
        """Text rows through the base (`W_text`); the rows of every routed modality through the dense `W0` in one
        matmul, plus each modality's own delta."""
        flat_input = hidden_states.reshape(-1, hidden_states.shape[-1])
        if not torch.is_grad_enabled() and flat_input.dtype == self.original_weight.dtype:
            blocks = routing.contiguous_blocks(flat_input.shape[0], routed)
            if blocks is not None:
                return self._write_blocks(flat_input.contiguous(), blocks).view(*hidden_states.shape[:-1], -1)
        rows, spans = routing.grouped_rows(routed)
        selected = flat_input.index_select(0, rows)
        modality_part = nn.functional.linear(selected, self.original_weight, self.base_layer.bias)
        self._add_modality_deltas(modality_part, self._factor_input(selected), spans)
        flat_output = modality_part.new_empty(flat_input.shape[0], modality_part.shape[-1])
        flat_output.index_copy_(0, rows, modality_part)
        text_rows = routing.rows_outside(flat_input.shape[0], routed)
        if text_rows.numel():
            flat_output.index_copy_(0, text_rows, self.base_layer(flat_input.index_select(0, text_rows)))
        return flat_output.view(*hidden_states.shape[:-1], flat_output.shape[-1])

    def _write_blocks(self, flat_input: torch.Tensor, blocks: list[RowBlock]) -> torch.Tensor:
        """Without autograd, when the rows come in long blocks: every block's matmul writes straight into its rows of
        the output (no gather, no scatter), then each modality run adds its own delta in place."""
        bias = self.base_layer.bias
        flat_output = flat_input.new_empty(flat_input.shape[0], self.out_features)
        factor_input = self._factor_input(flat_input)
        for block in blocks:
            source, target = flat_input[block.start : block.stop], flat_output[block.start : block.stop]
            weight = self.base_layer.weight if block.spans is None else self.original_weight
            if bias is None:
                torch.mm(source, weight.t(), out=target)
            else:
                torch.addmm(bias, source, weight.t(), out=target)
            self._add_modality_deltas(flat_output, factor_input, block.spans or [])
        return flat_output

    def extra_repr(self) -> str:
        ranks = {name: self.lora_A[name].out_features for name in self.lora_A}
        text_rank = 0 if self.text_lora_A is None else self.text_lora_A.out_features
        dense = ", original_weight=dense" if self.original_weight is not None else ""
        return f"modality_ranks={ranks}, text_rank={text_rank}, text_folded={self.text_folded}{dense}"


def _is_unquantized(layer: nn.Module) -> bool:
    return type(layer) in (nn.Linear, UnquantizedFactor)


def _accepts_var_keywords(module: nn.Module) -> bool:
    parameters = inspect.signature(module.forward).parameters.values()
    return any(parameter.kind is inspect.Parameter.VAR_KEYWORD for parameter in parameters)


def inject_routed_layers(
    language_model: nn.Module,
    state: RoutingState,
    target_modules: list[str],
    modality_ranks: dict[str, tuple[int, float]],
    text_rank: int,
    text_alpha: float | None,
    text_folded: bool,
    dropout: float,
) -> int:
    """Replace every `nn.Linear` of `language_model` whose attribute name is in `target_modules` by a `RoutedLinear`,
    and hook the parents that receive the decoder layer's keyword arguments. Returns the number of hooked parents."""
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
    hooked_parents: dict[int, nn.Module] = {}
    for name, module in targets:
        parent_name, _, child_name = name.rpartition(".")
        parent = language_model.get_submodule(parent_name)
        routed = RoutedLinear(module, state, modality_ranks, text_rank, text_alpha, text_folded, dropout)
        setattr(parent, child_name, routed)
        if id(parent) not in hooked_parents and _accepts_var_keywords(parent):
            parent.register_forward_pre_hook(state.receive, with_kwargs=True)
            hooked_parents[id(parent)] = parent
    if not hooked_parents:
        raise ValueError(
            f"The modules holding {target_modules} in {type(language_model).__name__} take no keyword arguments, so "
            "token routing cannot reach them; this text architecture is not supported for routed (DAMC) composites."
        )
    return len(hooked_parents)
