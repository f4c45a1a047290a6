"""Stage 1 of the flow: images. Datasets (embedded digits, MNIST, Fashion-MNIST), the IDX
reader with md5 checks, splits, dequantization into model space, BPD, inpainting masks.

May import: :mod:`vq2pc.core`.
"""

from vq2pc.data.datasets import (
    DATASET_NAMES,
    DataSplits,
    bpd,
    check_fits,
    check_model_space,
    load_dataset,
    to_model_space,
)

__all__ = ["DATASET_NAMES", "DataSplits", "bpd", "check_fits", "check_model_space", "load_dataset", "to_model_space"]
