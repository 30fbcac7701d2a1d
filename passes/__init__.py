"""qfrewrite's passes, one module per concern. Import them from ``qfrewrite.passes``."""
from .absorb_bias import AbsorbBias
from .correct_bias import CorrectBias
from .cross_layer_equalization import CrossLayerEqualization
from .fold_batchnorm import FoldBatchNorm
from .fold_dead_channels import FoldDeadChannels
from .insert_fakequant import InsertFakeQuant
from .learned_rounding import LearnedRounding
from .relu6_to_relu import ReLU6ToReLU
from .remove_depthwise_bn_relu6 import RemoveDepthwiseBNReLU6
from .select_best import SelectBest

__all__ = ["AbsorbBias", "CorrectBias", "CrossLayerEqualization", "FoldBatchNorm", "FoldDeadChannels",
           "InsertFakeQuant", "LearnedRounding", "ReLU6ToReLU", "RemoveDepthwiseBNReLU6", "SelectBest"]
