"""The lesson's CNN, built from hyperparameters.

conv blocks [Conv2d -> BatchNorm2d -> activation] x convs_per_block -> pool -> Dropout2d,
then flatten and an MLP head. blocks=2, convs_per_block=1 is the lesson's CNN; two or three convs
per block give a VGG-style net. block="residual" lays a block out as ResNet-9's layers are (Page,
"How to train your ResNet", 2018; the net behind the fast CIFAR-10 results): its first conv sets the
width, the pool follows it, and the other convs run at the pooled size around a skip connection,
x + convs(x); with one conv per block the two layouts are the same net. train.global_pool = "max" or
"avg" pools the last feature map to 1x1 before the head (ResNet-9's head is a global max pool and one
linear layer: train.head_layers = 0).

train.tta = "flip" makes the net, in eval mode only, average the logits of each image and its mirror
(test-time augmentation, as the fast CIFAR-10 recipes evaluate): val metrics, the test pass and the
exported model all see it, since they all call the net, and a checkpoint rebuilds it from its config.
"""

from __future__ import annotations

import torch
from torch import nn

from cnnopt.experiment.config import TrainConfig, check_section
from cnnopt.errors import UsageError

ACTIVATIONS = {"relu": nn.ReLU, "leaky_relu": nn.LeakyReLU, "gelu": nn.GELU, "silu": nn.SiLU, "elu": nn.ELU}
POOLS = {"max": nn.MaxPool2d, "avg": nn.AvgPool2d}
PADDING_MODES = ("zeros", "reflect", "replicate", "circular")
INITS = ("default", "kaiming", "xavier")
BLOCKS = ("plain", "residual")
GLOBAL_POOLS = {"none": None, "max": nn.AdaptiveMaxPool2d, "avg": nn.AdaptiveAvgPool2d}  # train.global_pool
TTAS = {"none": 1, "flip": 2}  # train.tta: the forward passes a prediction takes


def predictions_per_image(config: TrainConfig) -> int:
    """Forward passes per image when the net predicts (in eval mode): two with train.tta = "flip"."""
    return TTAS[config.tta]


def block_channels(config: TrainConfig) -> list[int]:
    """Output channels of each conv block: channels, then growing by `growth` per block."""
    return [max(1, int(round(config.channels * config.growth**i))) for i in range(config.blocks)]


def feature_sizes(config: TrainConfig, image_size: int) -> list[int]:
    """Side of the feature map after each block; raises UsageError where it would vanish, or where a conv's
    reflect or circular padding is wider than the map it pads. A plain block's convs run before its pooling;
    a residual block's first conv does, and the others run at the pooled side."""
    sizes, side = [], image_size
    k = config.kernel_size
    before_pool = config.convs_per_block if config.block != "residual" else 1

    def conv(side: int, index: int) -> int:
        if config.padding_mode in ("reflect", "circular") and k // 2 >= side + (config.padding_mode == "circular"):
            raise UsageError(f"train.padding_mode = {config.padding_mode!r} pads {k // 2} pixels, which a "
                             f"{side}x{side} feature map in conv block {index + 1} cannot give; use "
                             "padding_mode zeros or replicate, a smaller train.kernel_size or fewer train.blocks")
        return side + 2 * (k // 2) - k + 1  # 'same' padding for odd kernels

    for index in range(config.blocks):
        for _ in range(before_pool):
            side = conv(side, index)
        side //= 2  # 2x2 pooling, floor
        if side < 1:
            raise UsageError(f"conv block {index + 1} of {config.blocks} would shrink the {image_size}x{image_size} "
                             f"input below 1x1; use fewer train.blocks or a larger data.image_size")
        for _ in range(config.convs_per_block - before_pool):
            side = conv(side, index)
        sizes.append(side)
    return sizes


class CNN(nn.Module):
    """Conv blocks, a flatten and an MLP head; `num_parameters` is logged with every run."""

    __jit_unused_properties__ = ["num_parameters"]  # TorchScript must not compile it

    def __init__(self, config: TrainConfig, in_channels: int, image_size: int, num_classes: int):
        super().__init__()
        check_model_choices(config)
        sizes = feature_sizes(config, image_size)
        layers, previous = [], in_channels
        for out in block_channels(config):
            if config.block == "residual":
                layers += conv_unit(config, previous, out) + [POOLS[config.pool](2)]
                if config.convs_per_block > 1:
                    layers.append(Residual(nn.Sequential(*[layer for _ in range(config.convs_per_block - 1)
                                                            for layer in conv_unit(config, out, out)])))
            else:
                for index in range(config.convs_per_block):
                    layers += conv_unit(config, previous if index == 0 else out, out)
                layers.append(POOLS[config.pool](2))
            previous = out
            if config.dropout > 0:
                layers.append(nn.Dropout2d(config.dropout))
        side = sizes[-1]
        if GLOBAL_POOLS[config.global_pool] is not None:  # the last map pooled to 1x1: one value per channel
            layers.append(GLOBAL_POOLS[config.global_pool](1))
            side = 1
        self.features = nn.Sequential(*layers)
        self.flatten = nn.Flatten()
        head, width = [], previous * side**2  # the flatten size, computed
        for _ in range(config.head_layers):
            head.append(nn.Linear(width, config.head_width))
            if config.head_batch_norm:
                head.append(nn.BatchNorm1d(config.head_width))
            head.append(ACTIVATIONS[config.activation]())
            if config.head_dropout > 0:
                head.append(nn.Dropout(config.head_dropout))
            width = config.head_width
        head.append(nn.Linear(width, num_classes))
        self.head = nn.Sequential(*head)
        self.tta: str = config.tta
        initialize(self, config.init, config.activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.head(self.flatten(self.features(x)))  # (N, C, H, W) -> (N, num_classes)
        if self.tta == "flip" and not self.training:  # the mirror's logits too, averaged (train.tta)
            logits = (logits + self.head(self.flatten(self.features(x.flip(3))))) / 2
        return logits

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


class Residual(nn.Module):
    """x + branch(x); the branch keeps the channels and the size, so the sum needs no projection."""

    def __init__(self, branch: nn.Module):
        super().__init__()
        self.branch = branch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.branch(x)  # (N, C, H, W)


def conv_unit(config: TrainConfig, in_channels: int, out_channels: int) -> list[nn.Module]:
    """Conv2d ('same' padding) -> BatchNorm2d (where train.batch_norm) -> activation."""
    layers = [nn.Conv2d(in_channels, out_channels, config.kernel_size, padding=config.kernel_size // 2,
                        padding_mode=config.padding_mode, bias=not config.batch_norm)]
    if config.batch_norm:
        layers.append(nn.BatchNorm2d(out_channels))
    return layers + [ACTIVATIONS[config.activation]()]


MAX_PARAMETERS = 1_000_000_000  # 4 GB of fp32 weights, before gradients and the optimizer's state


def build_model(config: TrainConfig, preprocessing: dict) -> CNN:
    """Build the CNN for a dataset described by `ImageData.preprocessing()`; one too big to build (counted first
    on PyTorch's meta device, which allocates nothing) is a UsageError, not an allocator's traceback."""
    shape = (preprocessing["channels"], preprocessing["image_size"], len(preprocessing["class_names"]))
    try:
        with torch.device("meta"):
            count = CNN(config, *shape).num_parameters
    except (RuntimeError, OverflowError, TypeError) as exc:  # sizes past what a tensor can have (growth = 1e30)
        count, reason = None, str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if count is None or count > MAX_PARAMETERS:
        net = (f"the network train.channels = {config.channels}, growth = {config.growth:g}, blocks = {config.blocks}, "
               f"head_width = {config.head_width} describe")
        why = f"is too big to build: {count:,} parameters, more than {MAX_PARAMETERS:,}" if count is not None \
            else f"cannot be built ({reason})"
        raise UsageError(f"{net} {why}; lower them")
    return CNN(config, *shape)


def initialize(model: nn.Module, scheme: str, activation: str = "relu") -> None:
    """Apply a weight-init scheme to every conv and linear layer; 'default' keeps PyTorch's."""
    # Kaiming's gain: leaky_relu has its own; gelu, silu and elu are close enough to relu's.
    nonlinearity = "leaky_relu" if activation == "leaky_relu" else "relu"
    if scheme == "default":
        return
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            if scheme == "kaiming":
                nn.init.kaiming_normal_(module.weight, nonlinearity=nonlinearity)
            else:
                nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)


def check_model_values(config: TrainConfig) -> None:
    """Each [train] value alone against its own rule (a range, or a named choice: activation, pool, padding,
    init, block, tta, global_pool), without the rules that join two values (`check_model_choices`)."""
    check_section("train", config)
    choices = {"activation": ACTIVATIONS, "pool": POOLS, "padding_mode": PADDING_MODES, "init": INITS, "block": BLOCKS,
               "tta": TTAS, "global_pool": GLOBAL_POOLS}
    for name, allowed in choices.items():
        if getattr(config, name) not in allowed:
            raise UsageError(f"train.{name} = {getattr(config, name)!r} is not one of {', '.join(allowed)}")


def check_model_choices(config: TrainConfig) -> None:
    """A named choice that is not one of its own (`check_model_values`), or two values that do not go together
    (`check_model_pairs`), is one line."""
    check_model_values(config)
    check_model_pairs(config)


def check_model_pairs(config: TrainConfig) -> None:
    """The net's rules that join two [train] values."""
    if config.block == "residual" and config.convs_per_block > 1 and config.kernel_size % 2 == 0:
        raise UsageError(f"train.block = 'residual' needs an odd train.kernel_size (an even one, "
                         f"{config.kernel_size}, changes the feature map's size, so x + convs(x) cannot add up)")
