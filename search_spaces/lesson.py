"""The lesson's study: how learning rate, batch size and regularisation set the lesson's CNN's accuracy.

Scientific: lr, batch_size, dropout, weight_decay, batch_norm (what the lesson asks about).
Nuisance: optimizer and momentum (tuned so each lr is judged with a fitting optimizer), channels of
the first block (the one design knob the lesson varies).
Fixed: the rest of the architecture (2 blocks of one conv, a 128-unit head), the onecycle schedule
and the augmentation, as the experiment's [train] table sets them.

Ranges: lr spans 1e-4..0.5 on a log scale because adam wants ~1e-3 and sgd with onecycle ~0.05-0.3;
below and above that the net either barely moves in 10 epochs or diverges. batch_size 32-128 fits a
1.3k-image train split (16+ steps per epoch). weight_decay 1e-6..1e-2 on a log scale brackets the
usual 5e-4. Dropout above 0.5 only slows a net this small.
"""

from cnnopt.experiment.space import Choice, Float, Space

SPACE = Space(
    name="lesson",
    description=__doc__,
    params=(
        Float("lr", 1e-4, 0.5, log=True, grid=(0.003, 0.03, 0.3)),
        Choice("batch_size", (32, 64, 128), grid=(32, 128)),
        Float("dropout", 0.0, 0.5, grid=(0.0, 0.25)),
        Choice("optimizer", ("sgd", "adam", "adamw"), grid=("sgd", "adamw")),
        Float("momentum", 0.8, 0.99, when={"optimizer": ("sgd",)}, grid=(0.9,)),
        Float("weight_decay", 1e-6, 1e-2, log=True, grid=(5e-4,)),
        Choice("batch_norm", (True, False)),
        Choice("channels", (8, 16, 32, 64), grid=(16, 32)),
    ),
)
