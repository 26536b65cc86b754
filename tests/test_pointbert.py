"""The point-cloud encoder's grouping (farthest-point sampling, k nearest neighbours, coordinates relative to each
centre) and reading PointLLM's PointBERT v1.2 checkpoint (`point_bert_v1.2.pt`) into it."""

import pytest
import torch

from conversion.encoder_pointbert import read_pointbert_encoder
from conversion.errors import ConversionError
from fixtures.tiny_sources import pointbert_checkpoint_state
from modeling_composite.modeling_composite import build_encoder
from modeling_composite.modeling_point_encoder import farthest_point_sample, group_points


def _cloud(num_points: int, seed: int) -> torch.Tensor:
    """One random cloud `(1, num_points, 6)`: xyz in the unit ball's neighbourhood, rgb in [0, 1]."""
    generator = torch.Generator().manual_seed(seed)
    return torch.cat(
        [torch.randn(1, num_points, 3, generator=generator), torch.rand(1, num_points, 3, generator=generator)], -1
    )


def test_farthest_point_sampling_spreads_out_from_point_zero():
    # Points on a line at 0, 1, ..., 10 (shuffled so that index order says nothing). Starting at point 0 (position
    # 3), the farthest is 10; then 0, 6 and 7 all lie 3 away and the lowest index (position 0, index 2) wins; then 6
    # and 7 tie again and index 4 (position 7) wins over index 6.
    positions = torch.tensor([3.0, 9.0, 0.0, 10.0, 7.0, 1.0, 6.0, 2.0, 8.0, 5.0, 4.0])
    xyz = torch.stack([positions, torch.zeros(11), torch.zeros(11)], -1).unsqueeze(0)
    chosen = farthest_point_sample(xyz, 4)[0]
    assert positions[chosen].tolist() == [3.0, 10.0, 0.0, 7.0]


def test_farthest_point_sampling_is_deterministic_and_per_cloud():
    clouds = torch.cat([_cloud(300, seed=1), _cloud(300, seed=2)])[..., :3]
    first = farthest_point_sample(clouds, 40)
    assert torch.equal(first, farthest_point_sample(clouds, 40))
    assert torch.equal(first[1:], farthest_point_sample(clouds[1:], 40))  # the other cloud does not matter
    assert first.unique(dim=1).shape[1] == 40  # no point twice
    # Each new centre is the point farthest from those before it.
    xyz = clouds[0]
    for step in range(1, 40):
        nearest_centre = torch.cdist(xyz, xyz[first[0, :step]]).min(-1).values
        assert nearest_centre[first[0, step]] == nearest_centre.max()


def test_groups_hold_the_nearest_points_relative_to_their_centre_with_colours_untouched():
    cloud = _cloud(400, seed=3)
    groups, centres = group_points(cloud, num_groups=16, group_size=8)
    assert groups.shape == (1, 16, 8, 6) and centres.shape == (1, 16, 3)
    assert torch.equal(centres[0], cloud[0, farthest_point_sample(cloud[..., :3], 16)[0], :3])
    distances = torch.cdist(centres[0], cloud[0, :, :3])
    for index in range(16):
        absolute_xyz = groups[0, index, :, :3] + centres[0, index]
        # Which cloud points are in the group: match each grouped point back to the cloud.
        members = torch.cdist(absolute_xyz, cloud[0, :, :3]).argmin(-1)
        assert set(members.tolist()) == set(distances[index].topk(8, largest=False).indices.tolist())
        torch.testing.assert_close(absolute_xyz, cloud[0, members, :3], rtol=0, atol=1e-6)
        assert torch.equal(groups[0, index, :, 3:], cloud[0, members, 3:])  # colours exactly as given
        assert groups[0, index, :, :3].norm(dim=-1).min() == 0  # the centre is its own nearest point


def _published_layout(depth: int = 2, hidden: int = 24) -> dict:
    """`point_bert_v1.2.pt`'s key names and shape pattern at a tiny size (see `fixtures.tiny_sources`)."""
    return pointbert_checkpoint_state(depth=depth, hidden=hidden, encoder_dims=16, point_dims=6, seed=0)


def test_published_layout_converts_completely_and_loads_strictly(tmp_path):
    state = _published_layout()
    torch.save(state, tmp_path / "point_bert_v1.2.pt")
    encoder = read_pointbert_encoder(str(tmp_path / "point_bert_v1.2.pt"), "point source")
    config = encoder.config
    assert (config.point_dims, config.encoder_dims, config.hidden_size, config.num_hidden_layers) == (6, 16, 24, 2)
    assert (config.num_groups, config.group_size, config.mlp_ratio) == (512, 32, 4.0)  # PointLLM v1.2's values
    assert encoder.image_processor is None and len(encoder.weights) == len(state)
    model = build_encoder(config)
    model.load_state_dict({name: lazy.load() for name, lazy in encoder.weights.items()}, strict=True)
    assert torch.equal(model.blocks[1].attn.qkv.weight, state["blocks.blocks.1.attn.qkv.weight"])
    assert torch.equal(model.encoder.second_conv[1].running_var, state["encoder.second_conv.1.running_var"])
    model.eval()
    with torch.no_grad():
        output = model(_cloud(600, seed=4)).last_hidden_state
    assert output.shape == (1, 513, 24) and torch.isfinite(output).all()
    # A folder holding the one checkpoint works too.
    assert read_pointbert_encoder(str(tmp_path), "point source").weights.keys() == encoder.weights.keys()


@pytest.mark.parametrize(
    ("change", "named"),
    [
        (
            lambda state: state.update({"blocks.blocks.0.attn.qkv.bias": torch.zeros(72)}),
            "blocks.blocks.0.attn.qkv.bias",
        ),
        (
            lambda state: state.update({"module.point_encoder.cls_token": torch.zeros(1, 1, 24)}),
            "module.point_encoder",
        ),
        (lambda state: state.pop("blocks.blocks.1.mlp.fc2.bias"), "blocks.1.mlp.fc2.bias"),
        (lambda state: state.update({"pos_embed.2.weight": torch.zeros(24, 64)}), "pos_embed.2.weight"),
    ],
    ids=["extra-key", "training-checkpoint-key", "missing-key", "wrong-shape"],
)
def test_checkpoints_not_in_the_published_layout_fail_naming_the_tensor(tmp_path, change, named):
    state = _published_layout()
    change(state)
    torch.save(state, tmp_path / "point_bert_v1.2.pt")
    with pytest.raises(ConversionError, match=named.replace(".", r"\.")):
        read_pointbert_encoder(str(tmp_path / "point_bert_v1.2.pt"), "point source")


def test_reference_must_name_one_checkpoint(tmp_path):
    with pytest.raises(ConversionError, match="set `encoder:`"):
        read_pointbert_encoder(None, "point source")
    torch.save(_published_layout(), tmp_path / "a.pt")
    torch.save(_published_layout(), tmp_path / "b.bin")
    with pytest.raises(ConversionError, match="exactly one"):
        read_pointbert_encoder(str(tmp_path), "point source")
