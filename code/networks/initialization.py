"""Weight initialisations that make two networks of one architecture start apart (SSL4MIS's CPS).

Both re-draw the weights of every ``nn.Conv3d`` (transposed convolutions keep PyTorch's default, unless
``transposed=True``, as MCF's and UGPL's networks draw them too) and reset batch-norm scales to 1 and
shifts to 0; biases of the convolutions keep their defaults, as in SSL4MIS.
"""
import torch.nn as nn


def _reinit(model, init, transposed=False):
    convolutions = (nn.Conv3d, nn.ConvTranspose3d) if transposed else nn.Conv3d
    for module in model.modules():
        if isinstance(module, convolutions):
            init(module.weight)
        elif isinstance(module, nn.BatchNorm3d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    return model


def kaiming_normal_init(model, transposed=False):
    """He-normal convolution weights (in place; with ``transposed`` also of the transposed convolutions);
    returns ``model``."""
    return _reinit(model, nn.init.kaiming_normal_, transposed)


def xavier_normal_init(model):
    """Glorot-normal convolution weights (in place); returns ``model``."""
    return _reinit(model, nn.init.xavier_normal_)
