"""The linear merge's chunked weighted sum against the whole-tensor arithmetic it replaces."""

import pytest
import torch

from conversion.weighted_sum import WeightedSum


@pytest.mark.parametrize("held_bytes", [1 << 30, 3000])  # all inputs held at once; folded into an accumulator
def test_weighted_sum_is_bit_identical_to_whole_tensor_adds(held_bytes):
    """The chunked sum does the same float32 operations in the same order as `acc = w0 t0; acc += w_i t_i`, then
    one rounding to the output dtype, also when memory limits make it fold the inputs into an accumulator."""
    generator = torch.Generator().manual_seed(0)
    terms = [
        (torch.randn(37, 53, generator=generator).to(dtype), weight)
        for dtype, weight in (
            (torch.bfloat16, -0.5),
            (torch.bfloat16, 1 / 3),
            (torch.float32, 1 / 3),
            (torch.float16, 0.83),
        )
    ]
    expected = terms[0][0].float().mul_(terms[0][1])
    for tensor, weight in terms[1:]:
        expected.add_(tensor, alpha=weight)
    for dtype in (torch.float32, torch.bfloat16):
        total = WeightedSum((37, 53), held_bytes=held_bytes, chunk_elements=100)
        for tensor, weight in terms:
            total.add(tensor, weight)
        result = total.result(dtype)
        assert result.dtype == dtype
        torch.testing.assert_close(result, expected.to(dtype), rtol=0, atol=0)


def test_weighted_sum_refuses_mismatched_shapes_and_no_terms():
    total = WeightedSum((4, 3))
    with pytest.raises(ValueError, match=r"shape \(4, 3\) got a term of shape \(3, 4\)"):
        total.add(torch.zeros(3, 4), 1.0)
    with pytest.raises(ValueError, match="at least one term"):
        total.result(torch.float32)
