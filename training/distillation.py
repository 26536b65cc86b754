"""Distillation from the base LLM reading a text version of each sample (optional, beyond the paper's recipe).

A sample may carry `text_conversations`: the same conversation with every modality input written as text (a caption,
an object's name). The base LLM reads that version; the source reads the real one. Every position after the sample's
last modality input holds the same tokens in both, and the input's own last position stands against the last token of
its text (both close the input): at those positions the source is pulled towards the base LLM's hidden states, layer
by layer. The source then learns to hand the LLM what the LLM already knows how to reason with (the
concept behind the input), rather than only the answers of its own training questions, which is what a composite
needs when it meets questions that mix inputs no source saw together.
"""

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel


def load_text_teacher(location: str, device: torch.device | str, dtype: torch.dtype | None = None) -> PreTrainedModel:
    """The frozen base LLM that reads the text versions."""
    teacher = AutoModelForCausalLM.from_pretrained(location, dtype=dtype).to(device).eval()
    teacher.requires_grad_(False)
    return teacher


def aligned_positions(lengths: torch.Tensor, aligned: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, positions) of the last `aligned[b]` tokens of each right-padded row `b` of length `lengths[b]`."""
    rows = torch.repeat_interleave(torch.arange(len(aligned), device=aligned.device), aligned)
    starts = torch.repeat_interleave(lengths - aligned, aligned)
    first_of_row = torch.repeat_interleave(torch.cumsum(aligned, 0) - aligned, aligned)
    offsets = torch.arange(int(aligned.sum()), device=aligned.device) - first_of_row
    return rows, starts + offsets


def hidden_state_distillation_loss(
    student_hidden: tuple[torch.Tensor, ...],
    student_mask: torch.Tensor,
    teacher_hidden: tuple[torch.Tensor, ...],
    teacher_mask: torch.Tensor,
    aligned: torch.Tensor,
) -> torch.Tensor:
    """Mean over the decoder layers of the relative squared error `Σ‖h_s - h_t‖² / Σ‖h_t‖²` at the aligned
    positions (the last `aligned[b]` tokens of row b in both right-padded batches). The embedding output (index 0)
    is left out: the source's input embeddings are not meant to equal the text's token embeddings, and the text after
    the inputs is the same tokens in both."""
    if len(student_hidden) != len(teacher_hidden):
        raise ValueError(
            f"The source's LLM has {len(student_hidden) - 1} layers but the text teacher has "
            f"{len(teacher_hidden) - 1}; "
            "--text_distillation_teacher must be the base LLM the source was built from."
        )
    student_rows, student_positions = aligned_positions(student_mask.sum(-1), aligned)
    teacher_rows, teacher_positions = aligned_positions(teacher_mask.sum(-1), aligned)
    losses = []
    for student_layer, teacher_layer in zip(student_hidden[1:], teacher_hidden[1:]):
        student = student_layer[student_rows, student_positions].float()
        teacher = teacher_layer[teacher_rows, teacher_positions].float()
        losses.append((student - teacher).pow(2).sum() / teacher.pow(2).sum().clamp_min(1e-12))
    return torch.stack(losses).mean()
