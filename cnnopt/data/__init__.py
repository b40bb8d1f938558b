"""Data: datasets loaded into uint8 tensors (`datasets`) and batched augmentation on the device (`augment`)."""
