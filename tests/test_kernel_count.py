"""What routing costs where users run it: on a GPU every operator is a kernel launch and every data-dependent one a
host sync, so DAMC's routed projections must add a constant, small number of operators to a prefill, whatever the
number of modalities and however their runs interleave, none of them data-dependent, and nothing to a decode step."""

import pytest

from benchmarks.kernel_count import LAYOUTS, MODALITY_COUNTS, measure


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("modalities", MODALITY_COUNTS)
def test_routed_projections_add_three_operators_and_no_sync(modalities, layout):
    row = measure(modalities, layout)
    assert row["modality_tokens"] > 0
    # The shrink matmul, the mask, the accumulating expand matmul: the same for every prompt.
    assert row["extra_per_projection"] == 3
    assert row["data_dependent_inside"]["damc"] == row["data_dependent_inside"]["naive"]
    assert row["decode_extra_ops"] == 0 and row["decode_data_dependent"] == 0


def test_per_delta_storage_adds_only_the_concatenation_of_its_factors():
    row = measure(4, "interleaved", lora_layout="per_delta")
    assert row["extra_per_projection"] == 5
    assert row["data_dependent_inside"]["damc"] == row["data_dependent_inside"]["naive"]
