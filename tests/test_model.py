"""The CNN: every registered choice builds and trains a step; sizes are computed, not assumed."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from cnnopt.experiment.config import TrainConfig
from cnnopt.errors import UsageError
from cnnopt.training.model import ACTIVATIONS, CNN, INITS, Residual, PADDING_MODES, POOLS, block_channels, build_model, feature_sizes

TINY = TrainConfig(channels=4, head_width=8, dropout=0.1, head_dropout=0.1)  # the deliberately tiny variant


def step(config: TrainConfig, channels: int = 3, side: int = 8, classes: int = 5) -> CNN:
    """Build the model, run one forward and backward pass in train mode, return it."""
    torch.manual_seed(0)
    model = CNN(config, channels, side, classes)
    x = torch.randn(4, channels, side, side)
    logits = model(x)
    assert logits.shape == (4, classes)
    nn.functional.cross_entropy(logits, torch.arange(4) % classes).backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
    assert any(p.grad.abs().sum() > 0 for p in model.parameters())
    return model


VARIANTS = ([{"activation": name} for name in ACTIVATIONS] + [{"pool": name} for name in POOLS]
            + [{"padding_mode": name} for name in PADDING_MODES] + [{"init": name} for name in INITS]
            + [{"batch_norm": False}, {"batch_norm": True}]
            + [{"convs_per_block": n} for n in (1, 2, 3)] + [{"block": "residual", "convs_per_block": n} for n in (1, 2, 3)]
            + [{"head_layers": n, "head_batch_norm": bn} for n in (0, 1, 2) for bn in (False, True)]
            + [{"kernel_size": 5}, {"kernel_size": 2}, {"growth": 1.5, "blocks": 3}, {"dropout": 0.0, "head_dropout": 0.0}]
            + [{"global_pool": name, "head_layers": n} for name in ("max", "avg") for n in (0, 1)])


@pytest.mark.parametrize("settings", VARIANTS, ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items()))
def test_every_variant_trains_a_step(settings):
    config = dataclasses.replace(TINY, **settings)
    model = step(config)
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 8, 8)).shape == (1, 5)  # eval mode takes a single image, even with BatchNorm


def test_the_lessons_cnn_structure():
    model = CNN(TrainConfig(), 1, 8, 10)
    kinds = [type(layer) for layer in model.features]
    assert kinds == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d, nn.Dropout2d] * 2
    convs = [layer for layer in model.features if isinstance(layer, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [32, 64] and all(c.bias is None for c in convs)  # BN makes a bias redundant
    linears = [layer for layer in model.head if isinstance(layer, nn.Linear)]
    assert [(l.in_features, l.out_features) for l in linears] == [(64 * 2 * 2, 128), (128, 10)]


def test_options_change_the_layers():
    config = dataclasses.replace(TINY, activation="gelu", pool="avg", padding_mode="reflect", batch_norm=False,
                                 convs_per_block=2, head_layers=2, head_batch_norm=True, dropout=0.0)
    model = CNN(config, 3, 8, 5)
    kinds = [type(layer) for layer in model.features]
    assert kinds == [nn.Conv2d, nn.GELU, nn.Conv2d, nn.GELU, nn.AvgPool2d] * 2
    assert all(c.padding_mode == "reflect" and c.bias is not None for c in model.features if isinstance(c, nn.Conv2d))
    assert sum(isinstance(layer, nn.BatchNorm1d) for layer in model.head) == 2
    assert sum(isinstance(layer, nn.Linear) for layer in model.head) == 3


def test_a_residual_block_is_resnet9s_layer():
    config = dataclasses.replace(TINY, block="residual", convs_per_block=3, blocks=2)
    model = CNN(config, 3, 8, 5)
    kinds = [type(layer) for layer in model.features]
    assert kinds == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d, Residual, nn.Dropout2d] * 2
    branches = [layer.branch for layer in model.features if isinstance(layer, Residual)]
    for branch, width in zip(branches, block_channels(config)):
        convs = [layer for layer in branch if isinstance(layer, nn.Conv2d)]
        assert [(c.in_channels, c.out_channels) for c in convs] == [(width, width)] * 2
    plain = CNN(dataclasses.replace(config, block="plain"), 3, 8, 5)
    assert model.num_parameters == plain.num_parameters  # the same convs, laid out otherwise
    residual = model.features[4]
    x = torch.randn(2, 4, 4, 4)
    residual.eval()
    with torch.no_grad():
        assert torch.allclose(residual(x), x + residual.branch(x))


def test_a_residual_net_scripts_and_exports(tmp_path):
    model = CNN(dataclasses.replace(TINY, block="residual", convs_per_block=2), 3, 8, 5).eval()
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        expected = model(x)
        assert torch.allclose(torch.jit.script(model)(x), expected, atol=1e-6)
        program = torch.export.export(model, (x,))
        assert torch.allclose(program.module()(x), expected, atol=1e-6)


@pytest.mark.parametrize("name,pool", [("max", torch.amax), ("avg", torch.mean)])
def test_a_global_pool_gives_the_head_one_value_per_channel_and_scripts_and_exports(name, pool):
    """ResNet-9's head: the last feature map pooled to 1x1, then one linear layer (train.head_layers = 0)."""
    config = dataclasses.replace(TINY, blocks=2, global_pool=name, head_layers=0)
    model = CNN(config, 3, 16, 5).eval()  # two blocks on 16x16: a 4x4 map of 8 channels
    flat = CNN(dataclasses.replace(config, global_pool="none"), 3, 16, 5)
    assert [(l.in_features, l.out_features) for l in model.head] == [(8, 5)]
    assert [(l.in_features, l.out_features) for l in flat.head] == [(8 * 4 * 4, 5)]
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        maps = model.features[:-1](x)  # (3, 8, 4, 4) before the global pool
        assert maps.shape == (3, 8, 4, 4)
        expected = model.head(pool(maps, dim=(2, 3)))
        assert torch.allclose(model(x), expected, atol=1e-6)
        assert torch.allclose(torch.jit.script(model)(x), expected, atol=1e-6)
        assert torch.allclose(torch.export.export(model, (x,)).module()(x), expected, atol=1e-6)


def test_an_unknown_global_pool_is_one_line():
    with pytest.raises(UsageError, match="train.global_pool = 'sum' is not one of none, max, avg"):
        CNN(dataclasses.replace(TINY, global_pool="sum"), 3, 8, 5)


def test_flip_tta_averages_the_mirror_in_eval_only_and_scripts_and_exports():
    plain = CNN(TINY, 3, 8, 5)
    tta = CNN(dataclasses.replace(TINY, tta="flip"), 3, 8, 5)
    tta.load_state_dict(plain.state_dict())
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        plain.eval(), tta.eval()
        expected = (plain(x) + plain(x.flip(3))) / 2
        assert torch.allclose(tta(x), expected, atol=1e-6) and not torch.allclose(tta(x), plain(x), atol=1e-4)
        assert torch.allclose(tta(x.flip(3)), tta(x), atol=1e-6), "an image and its mirror get one prediction"
        assert torch.allclose(torch.jit.script(tta)(x), expected, atol=1e-6)
        assert torch.allclose(torch.export.export(tta, (x,)).module()(x), expected, atol=1e-6)
        plain.train(), tta.train()
        torch.manual_seed(0)
        trained = plain(x)
        torch.manual_seed(0)
        assert torch.allclose(tta(x), trained), "training sees each image once, as augmented"


def test_a_residual_block_refuses_an_even_kernel():
    with pytest.raises(UsageError, match="train.block = 'residual' needs an odd train.kernel_size"):
        CNN(dataclasses.replace(TINY, block="residual", convs_per_block=2, kernel_size=2), 3, 8, 5)


@pytest.mark.parametrize("side", [4, 8, 9, 16, 31, 32])
def test_flatten_size_is_computed_for_any_image_size(side):
    config = dataclasses.replace(TINY, blocks=2)
    model = step(config, channels=1, side=side)
    first = next(layer for layer in model.head if isinstance(layer, nn.Linear))
    assert first.in_features == block_channels(config)[-1] * (side // 4) ** 2


def test_feature_sizes_follow_same_padding_and_pooling():
    assert feature_sizes(TrainConfig(blocks=3), 32) == [16, 8, 4]
    assert feature_sizes(TrainConfig(blocks=2, kernel_size=2), 9) == [5, 3]  # an even kernel grows the side by one


@pytest.mark.parametrize("mode,fails", [("reflect", True), ("circular", False), ("zeros", False), ("replicate", False)])
def test_a_padding_the_feature_map_cannot_give_is_a_usage_error_not_a_torch_traceback(mode, fails):
    """Reflect padding needs more pixels than it pads (circular as many): a 5x5 kernel pads 2 on 2x2 maps."""
    config = dataclasses.replace(TINY, blocks=3, kernel_size=5, padding_mode=mode)
    if fails:
        with pytest.raises(UsageError, match=f"train.padding_mode = '{mode}' pads 2 pixels, which a 2x2 feature map"):
            CNN(config, 1, 8, 10)
    else:  # circular pads 2 from 2: it trains
        assert CNN(config, 1, 8, 10)(torch.zeros(2, 1, 8, 8)).shape == (2, 10)
    with pytest.raises(UsageError, match="pads 2 pixels, which a 1x1"):
        CNN(dataclasses.replace(config, padding_mode="circular", blocks=4), 1, 8, 10)


@pytest.mark.parametrize("mode", ["reflect", "circular", "zeros"])
def test_a_residual_blocks_later_convs_are_checked_at_the_pooled_side(mode):
    """A residual block's first conv runs before its pooling, the others after: on 8x8 input with 3 blocks the
    third block's second conv pads a 1x1 map, which reflect padding cannot do (circular can)."""
    config = dataclasses.replace(TINY, block="residual", convs_per_block=2, blocks=3, padding_mode=mode)
    if mode != "reflect":
        assert CNN(config, 1, 8, 10)(torch.zeros(2, 1, 8, 8)).shape == (2, 10)
        return
    with pytest.raises(UsageError, match=f"train.padding_mode = '{mode}' pads 1 pixels, which a 1x1 feature map "
                                         "in conv block 3"):
        CNN(config, 1, 8, 10)


@pytest.mark.parametrize("blocks,side,block", [(4, 8, 4), (3, 4, 3), (1, 1, 1)])
def test_a_vanishing_feature_map_names_the_block(blocks, side, block):
    with pytest.raises(UsageError) as caught:
        CNN(dataclasses.replace(TINY, blocks=blocks), 1, side, 10)
    message = str(caught.value)
    assert f"conv block {block} of {blocks}" in message and f"{side}x{side}" in message
    assert "train.blocks" in message and "data.image_size" in message


@pytest.mark.parametrize("name,value", [("activation", "tanh"), ("pool", "min"), ("padding_mode", "mirror"),
                                        ("init", "orthogonal"), ("block", "dense"),
                                        ("tta", "crop")])
def test_unknown_choice_is_a_usage_error(name, value):
    with pytest.raises(UsageError, match=f"train.{name} = '{value}' is not one of"):
        CNN(dataclasses.replace(TINY, **{name: value}), 1, 8, 10)


@pytest.mark.parametrize("name", ["blocks", "convs_per_block", "channels", "kernel_size"])
def test_sizes_below_one_are_rejected(name):
    with pytest.raises(UsageError, match=f"train.{name} = 0 is not allowed: it must be >= 1"):
        CNN(dataclasses.replace(TINY, **{name: 0}), 1, 8, 10)


@pytest.mark.parametrize("setting, fragment", [
    ({"channels": 100_000_000}, "is too big to build: .* parameters, more than 1,000,000,000; lower them"),
    ({"head_width": 2_000_000_000}, "is too big to build"),
    ({"growth": 1e30}, r"cannot be built \("),  # sizes past what a tensor can hold
])
def test_a_network_too_big_to_build_is_one_line_before_anything_allocates(setting, fragment):
    """The allocator's error (720,000,000,000,000,000 bytes) or an overflow was a traceback."""
    from cnnopt.training.model import build_model

    config = dataclasses.replace(TINY, **setting)
    with pytest.raises(UsageError, match=rf"the network train.channels = .* describe {fragment}"):
        build_model(config, {"channels": 1, "image_size": 8, "class_names": list("0123456789")})


def test_num_parameters_counts_every_weight():
    config = dataclasses.replace(TINY, blocks=1, channels=2, batch_norm=True, head_layers=1, head_width=3)
    model = CNN(config, 1, 4, 5)
    conv = 2 * 1 * 3 * 3  # no bias under BatchNorm
    batch_norm = 2 + 2
    head = (2 * 2 * 2) * 3 + 3 + 3 * 5 + 5
    assert model.num_parameters == conv + batch_norm + head == sum(p.numel() for p in model.parameters())


def test_channels_grow_per_block():
    assert block_channels(TrainConfig(blocks=3, channels=16, growth=2.0)) == [16, 32, 64]
    assert block_channels(TrainConfig(blocks=3, channels=10, growth=1.5)) == [10, 15, 22]


@pytest.mark.parametrize("scheme", ["kaiming", "xavier"])
def test_init_changes_weights_and_zeros_biases(scheme):
    config = dataclasses.replace(TINY, batch_norm=False)
    torch.manual_seed(0)
    default = CNN(config, 1, 8, 10)
    torch.manual_seed(0)
    initialised = CNN(dataclasses.replace(config, init=scheme), 1, 8, 10)
    for (name, before), after in zip(default.named_parameters(), initialised.parameters()):
        if name.endswith("bias"):
            assert (after == 0).all(), name
        else:
            assert not torch.equal(before, after), name


def test_build_model_reads_the_preprocessing():
    model = build_model(TINY, {"channels": 3, "image_size": 16, "class_names": list("abc"), "mean": [0] * 3,
                               "std": [1] * 3})
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 3)
