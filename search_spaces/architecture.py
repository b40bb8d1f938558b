"""Which CNN design works best: depth, width, block layout, kernel, pooling, activation, head, label
smoothing and augmentation strength.

Scientific: blocks, convs_per_block (1 = the lesson's CNN, 2-3 = VGG-style), block (plain or
residual), channels, growth, kernel_size, pool, activation, the head (a global max pool or the flattened
map; one linear layer or an MLP of head_width), label_smoothing, RandAugment strength.
Nuisance: lr (every design is judged at a learning rate that suits it) and batch_size (the images a
step takes: what a time budget buys epochs with).
Fixed: optimizer, schedule, epochs and the light augmentation of the experiment's [train].

Residual blocks and label smoothing are what the fast CIFAR-10 results use at a budget of minutes:
Page's ResNet-9 (conv, pool, then two convs around a skip in its layers; DAWNBench 2018) reached 94%
test accuracy in 24 epochs, where the best VGG nets of this space reached 0.89-0.90 in 30 (measured on
an H100, 2026-11-25); airbench trains with label smoothing 0.2. The residual layout has the same convs
(the same parameters) as the plain one, so the two compare layout against layout at one size; with
one conv per block the layouts are the same net, so the layout is searched only from two convs on.

The head: ResNet-9 pools its last map to one value per channel and classifies with one linear layer.
Measured side by side on 2 CPU cores (`bench/recipe.py`: the experiment's 3x2-block VGG, 5,000 CIFAR-10
images, 15 epochs, 2 seeds; bench/RESULTS.md), that head reached val accuracy 0.611 and 0.629 against
0.583 and 0.570 for the flatten and MLP head, with half the parameters; a global pool under the MLP head
did not help (0.555 and 0.579). Cutout (`train.cutout`), measured the same way, did not help at that length either,
so it is not searched.

Batch size with lr coupled: Page's ResNet-9 trained at batch 512 and airbench at 1,024. On a GPU a
bigger batch is more images a second for the same net (fewer, larger kernels: at batch 128 the H100
ran the 4x2-block VGG that won a 7-minute study at 15k img/s, a fraction of the card), and a time
budget spends its seconds as epochs. Searched alone, batch size would move the best lr with it (the
sampler would have to learn that coupling from trials); with the experiment's train.lr_batch = 128, lr is
the rate per 128 images and a batch of B trains at lr * B / 128 (the linear scaling rule, Goyal et al.
2017, for the experiment's SGD), so one lr range suits every batch size. Without lr_batch the batch size is still searched, with
lr as given. The grid runs batch 128 only (experiments/cifar10.toml's own). An experiment whose own
batch size is none of the three (digits' 64) gets no baseline trial, with a warning saying so.

Ranges: sized for 32x32 inputs such as CIFAR-10. blocks 2-4 takes a 32x32 image down to 8x8..2x2
(5 blocks would leave 1x1); on 8x8 digits use data.image_size >= 16. Widths 16-64 in the first
block with growth 1.5-2 reach the 32-64-128 VGG net that beats the lesson's CNN by ~13 points of
test accuracy on a 5,000-image CIFAR-10 sample, and go past it. RandAugment magnitude is searched
only when RandAugment is on.
"""

from cnnopt.experiment.space import Choice, Float, Int, Space

SPACE = Space(
    name="architecture",
    description=__doc__,
    params=(
        Int("blocks", 2, 4),
        Int("convs_per_block", 1, 3),
        Choice("block", ("plain", "residual"), when={"convs_per_block": (2, 3)}),  # one conv: the layouts are one net
        Choice("channels", (16, 32, 64)),
        Choice("growth", (1.5, 2.0)),
        Choice("kernel_size", (3, 5)),
        Choice("pool", ("max", "avg")),
        Choice("activation", ("relu", "leaky_relu", "gelu", "silu")),
        Choice("global_pool", ("none", "max"), grid=("none",)),
        Choice("head_layers", (0, 1), grid=(1,)),  # 0: one linear layer (ResNet-9's head on a global pool)
        Choice("head_width", (64, 128, 256, 512), grid=(128, 512), when={"head_layers": (1,)}),
        Choice("label_smoothing", (0.0, 0.1, 0.2), grid=(0.0,)),
        Int("randaugment_ops", 0, 2, grid=(0, 2)),
        Int("randaugment_magnitude", 3, 15, when={"randaugment_ops": (1, 2)}, grid=(9,)),
        Float("lr", 0.01, 0.3, log=True, grid=(0.05,)),
        Choice("batch_size", (128, 256, 512), grid=(128,)),
    ),
)
