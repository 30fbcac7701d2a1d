"""qfrewrite's passes, one module per concern. Import them from ``qfrewrite.passes``."""
from .fold_batchnorm import FoldBatchNorm

__all__ = ["FoldBatchNorm"]
