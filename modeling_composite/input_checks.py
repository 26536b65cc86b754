"""Checks of what a composite is given: a user's mistake becomes a `CompositeInputError` (a `ValueError`) that names
the input or the modality and the numbers, before any encoder or kernel runs, instead of an error from deep inside
torch or an encoder, or silent garbage.

Cost: checks of dtypes and shapes read tensor metadata only. Checks of values (token ids in range, finite modality
inputs, normalised pixels) need one host sync per tensor; they run when a prompt is read (a prefill syncs anyway, to
count placeholders) and never on a decode step (one new token, a cache, no modality inputs) nor while torch.compile
traces, so decode steps stay sync-free and capturable.

Not checked: pixel values scaled to [0, 1] but not normalised (they lie inside the normalised range), audio features
outside the feature extractor's usual range, and anything about the meaning of an input.
"""

import torch

from .configuration_modality import ModalityConfig


class CompositeInputError(ValueError):
    """An input the composite cannot use; the message names the input or modality, the numbers, and the fix."""


# Pixel values as the image processor gives them are `(x / 255 - mean) / std`, at most about 2.7 in magnitude for the
# usual means and stds (CLIP's, ImageNet's, SigLIP's 0.5) and 10 for a std as small as 0.1. Raw pixels (0..255) reach
# far beyond that unless an image is almost black; so a magnitude above this bound means they were not normalised.
NORMALISED_PIXEL_BOUND = 10.0


def _describe(value) -> str:
    if torch.is_tensor(value):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return type(value).__name__


def is_decode_step(input_length: int, past_length: int | None, has_modality_inputs: bool) -> bool:
    """A generated token being fed back: the ids come from the model itself, so value checks are skipped there.
    `past_length` None: a cache whose length is not read (a compilable one keeps it on the device)."""
    continuing = past_length is None or past_length > 0
    return continuing and input_length == 1 and not has_modality_inputs


def _checking_values() -> bool:
    # Reading a value back is a host sync, and a graph break under torch.compile.
    return not torch.compiler.is_compiling()


def check_text_inputs(
    vocab_size: int,
    hidden_size: int,
    input_ids: torch.Tensor | None,
    inputs_embeds: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    past_length: int | None,
    has_modality_inputs: bool,
) -> None:
    """`input_ids` (integer ids in range) or `inputs_embeds` (`(batch, seq, hidden)`), and an `attention_mask` whose
    batch matches and that covers the cached (when `past_length` is known) and the new positions. Ids are
    range-checked except on decode steps."""
    if input_ids is not None:
        if not torch.is_tensor(input_ids) or input_ids.ndim != 2:
            raise CompositeInputError(
                f"input_ids must be a (batch, sequence) tensor of token ids, got {_describe(input_ids)}; a single "
                "sequence needs a batch dimension (input_ids[None])."
            )
        if input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype == torch.bool:
            raise CompositeInputError(
                f"input_ids must hold integer token ids (torch.long), got {input_ids.dtype}; pass the tokenizer's ids "
                "unchanged (a float tensor would be rounded into other tokens)."
            )
        decode_step = is_decode_step(input_ids.shape[1], past_length, has_modality_inputs)
        if not decode_step and input_ids.numel() and _checking_values():
            low, high = (int(value) for value in torch.aminmax(input_ids))
            if low < 0 or high >= vocab_size:
                raise CompositeInputError(
                    f"input_ids holds ids from {low} to {high}, but the vocabulary has {vocab_size} tokens (ids 0 to "
                    f"{vocab_size - 1}); use this composite's own tokenizer (and pad with its pad_token_id, not -100)."
                )
        batch, length = input_ids.shape
    else:
        if not torch.is_tensor(inputs_embeds) or inputs_embeds.ndim != 3 or inputs_embeds.shape[-1] != hidden_size:
            raise CompositeInputError(
                f"inputs_embeds must be a (batch, sequence, {hidden_size}) tensor, got {_describe(inputs_embeds)}."
            )
        if not inputs_embeds.is_floating_point():
            raise CompositeInputError(f"inputs_embeds must be floating point, got {inputs_embeds.dtype}.")
        batch, length = inputs_embeds.shape[:2]
    if attention_mask is None:
        return
    if not torch.is_tensor(attention_mask) or attention_mask.ndim not in (2, 4) or attention_mask.shape[0] != batch:
        raise CompositeInputError(
            f"attention_mask must be a (batch, sequence) tensor for the batch of {batch} prompt(s), got "
            f"{_describe(attention_mask)}; pad the prompts together and pass the mask the tokenizer returns."
        )
    cached = past_length or 0
    if attention_mask.ndim == 2 and attention_mask.shape[1] < cached + length:
        raise CompositeInputError(
            f"attention_mask covers {attention_mask.shape[1]} positions but the model sees {cached + length} "
            f"({cached} cached + {length} new); pass a mask for every position."
        )


def check_labels(labels: torch.Tensor | None, batch: int, length: int, vocab_size: int) -> None:
    """Labels `(batch, seq)` like the inputs, holding token ids or -100 (ignored)."""
    if labels is None:
        return
    if not torch.is_tensor(labels) or labels.is_floating_point() or tuple(labels.shape) != (batch, length):
        raise CompositeInputError(
            f"labels must be an integer tensor of the inputs' shape {(batch, length)}, got {_describe(labels)}."
        )
    if labels.numel() and _checking_values():
        low, high = (int(value) for value in torch.aminmax(labels))
        if (low < 0 and low != -100) or high >= vocab_size:
            raise CompositeInputError(
                f"labels holds values from {low} to {high}; they must be token ids below {vocab_size}, or -100 for "
                "positions without a target."
            )


def expected_item_shape(kind: str, entry: ModalityConfig, encoder_config) -> tuple[int | None, ...]:
    """The shape of one input item of a modality (None: any size) that its encoder takes, or only the number of
    dimensions (all None) for an encoder this file does not know."""
    model_type = getattr(encoder_config, "model_type", None)
    if kind in ("image", "video") and hasattr(encoder_config, "image_size"):
        size = encoder_config.image_size
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        image = (getattr(encoder_config, "num_channels", 3), height, width)
        return image if kind == "image" else (entry.num_frames, *image)
    if model_type == "qwen2_audio_encoder":
        # Whisper-style: two convolutions (strides 1 and 2) over a fixed window of 2 x max_source_positions frames.
        return (encoder_config.num_mel_bins, 2 * encoder_config.max_source_positions)
    if model_type == "composite_beats" or (kind == "audio" and hasattr(encoder_config, "patch_size")):
        return (None, encoder_config.num_mel_bins)  # frames x mel bins; `_check_beats_frames` checks the frames
    if kind == "point" and hasattr(encoder_config, "point_dims"):
        return (None, encoder_config.point_dims)
    return (None,) * {"image": 3, "video": 4, "audio": 2, "point": 2}[kind]


_DIMENSION_NAMES = {
    "image": "(channels, height, width)",
    "video": "(frames, channels, height, width)",
    "audio": "(mel bins, frames) or (frames, mel bins)",
    "point": "(points, values per point)",
}


def check_modality_items(
    name: str, kind: str, entry: ModalityConfig, encoder_config, items, check_values: bool = True
) -> None:
    """One modality's input tensor `(items, ...)`: floating point, the item shape its encoder takes, and (with
    `check_values`) finite, with pixels normalised."""
    expected = expected_item_shape(kind, entry, encoder_config)
    wanted = "(items, " + _DIMENSION_NAMES[kind][1:]
    if not torch.is_tensor(items) or items.ndim != len(expected) + 1 or items.numel() == 0:
        raise CompositeInputError(
            f"Modality {name!r} ({kind}) takes a non-empty tensor {wanted}, got {_describe(items)}; let the processor "
            "prepare the inputs."
        )
    if not items.is_floating_point():
        what = "normalised pixel values" if kind in ("image", "video") else "floating-point values"
        raise CompositeInputError(
            f"Modality {name!r} ({kind}) takes {what}, got {items.dtype}; let the processor prepare the inputs."
        )
    if any(size is not None and size != got for size, got in zip(expected, items.shape[1:])):
        shown = tuple("any" if size is None else size for size in expected)
        raise CompositeInputError(
            f"Modality {name!r} ({kind}): each item must have shape {shown} {_DIMENSION_NAMES[kind]}, got "
            f"{tuple(items.shape[1:])} (input {tuple(items.shape)}); use the composite's own processor, whose "
            "settings match the encoder."
        )
    if kind == "point":
        least = max(getattr(encoder_config, "num_groups", 1), getattr(encoder_config, "group_size", 1))
        if items.shape[1] < least:
            raise CompositeInputError(
                f"Modality {name!r} (point): each cloud needs at least {least} points, got {items.shape[1]}."
            )
    if expected[0] is None and kind == "audio" and hasattr(encoder_config, "patch_size"):
        _check_beats_frames(name, entry, encoder_config, items.shape[1])
    if check_values and _checking_values():
        _check_values(name, kind, items)


def _check_beats_frames(name: str, entry: ModalityConfig, encoder_config, frames: int) -> None:
    """A patch-based audio encoder (BEATs) yields (frames // patch) x (mel bins // patch) features, which must be the
    config's `tokens_per_item` (the feature extractor's window)."""
    patch = encoder_config.patch_size
    per_time_patch = encoder_config.num_mel_bins // patch
    tokens = entry.tokens_per_item + (1 if entry.feature_select == "patch" else 0)
    if tokens % per_time_patch == 0 and frames // patch != tokens // per_time_patch:
        raise CompositeInputError(
            f"Modality {name!r} (audio): each clip must have {tokens // per_time_patch * patch} frames (the feature "
            f"extractor's window), got {frames}; let the processor prepare the inputs."
        )


def _check_values(name: str, kind: str, items: torch.Tensor) -> None:
    largest = float(items.detach().abs().amax())  # NaN and Inf propagate: one reduction, one sync
    if largest != largest or largest == float("inf"):
        bad = int((~torch.isfinite(items)).sum())
        raise CompositeInputError(
            f"Modality {name!r} ({kind}): the input holds {bad} NaN or infinite value(s) of {items.numel()}; clean "
            "the input (a NaN point or pixel makes every output NaN)."
        )
    if kind in ("image", "video") and largest > NORMALISED_PIXEL_BOUND:
        raise CompositeInputError(
            f"Modality {name!r} ({kind}): pixel values reach {largest:g}, but normalised pixels stay within "
            f"±{NORMALISED_PIXEL_BOUND:g}; these look like raw 0-255 values. Pass the images through the processor "
            "(it rescales and normalises them)."
        )


def check_generation_length(
    max_positions: int | None, prompt_length: int, max_new_tokens: int | None, max_length: int | None
) -> None:
    """Refuse a `generate()` call that would run past the text model's positions before it starts."""
    if max_positions is None:
        return
    total = prompt_length + max_new_tokens if max_new_tokens is not None else max_length
    if total is not None and total > max_positions:
        budget = max(max_positions - prompt_length, 0)
        asked = f"{prompt_length} in the prompt + {max_new_tokens} new" if max_new_tokens is not None else "max_length"
        raise CompositeInputError(
            f"generate() would run to {total} positions ({asked}) but the text model has {max_positions} "
            f"(max_position_embeddings); ask for at most {budget} new tokens, or shorten the prompt."
        )


__all__ = ["CompositeInputError"]
