"""A 3D ResNet-34 encoder under the V-Net decoder: subnet A of UGPL (Lu et al. 2025, arXiv 2509.13084).

The released code (AIPMLab/Semi-supervised-Segmentation, ``networks/ResNet34.py`` and ``resnet.py``, taken
from MCF, Wang et al. CVPR 2023) builds it as follows, and so does this module:

- stem: a 7x7x7 convolution with stride 1 (no bias), batch norm, ReLU; MCF's max-pooling is *not* used, so
  the stem keeps the full resolution and plays the role of the V-Net's first level ``x1``;
- four stages of basic residual blocks, [3, 4, 6, 3] blocks at widths 2n, 4n, 8n, 16n (32/64/128/256 for
  n = 16), each stage opening with a stride-2 block (3x3x3 convolution with padding 1, and a stride-2
  1x1x1 convolution + batch norm on the shortcut);
- the V-Net decoder on these five levels: the same blocks, additive skips and module names as
  :class:`networks.vnet.VNet`, ``Dropout3d(0.5)`` on the last decoder map when ``has_dropout`` (there is
  no bottleneck dropout in this network), a 1x1x1 output convolution.

The encoder levels have exactly the V-Net's shapes when every spatial size is a multiple of 16: a stride-2
3x3x3 convolution with padding 1 gives ``ceil(s / 2)``, and the decoder's transposed convolutions double
exactly, so any other size would break an additive skip; :meth:`ResNetVNet.encoder` refuses it with a
clear message. The encoder always uses batch norm, as the released code; ``normalization`` applies to the
decoder. Weights keep PyTorch's default initialisation; UGPL's script re-draws them (He-normal).
"""
import torch.nn as nn

from networks.vnet import VNet, add_vnet_decoder

STAGE_BLOCKS = (3, 4, 6, 3)
DOWNSAMPLING = 16


def _conv3(channels_in, channels_out, stride=1):
    return nn.Conv3d(channels_in, channels_out, 3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """ResNet's basic block in 3D: two 3x3x3 convolutions with batch norm, an identity or projection
    shortcut (1x1x1 convolution + batch norm when the stride or width changes), ReLU after the sum."""

    def __init__(self, channels_in, channels_out, stride=1):
        super().__init__()
        self.conv1 = _conv3(channels_in, channels_out, stride)
        self.bn1 = nn.BatchNorm3d(channels_out)
        self.conv2 = _conv3(channels_out, channels_out)
        self.bn2 = nn.BatchNorm3d(channels_out)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = None
        if stride != 1 or channels_in != channels_out:
            self.shortcut = nn.Sequential(nn.Conv3d(channels_in, channels_out, 1, stride=stride, bias=False),
                                          nn.BatchNorm3d(channels_out))

    def forward(self, x):
        residual = x if self.shortcut is None else self.shortcut(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + residual)


def _stage(channels_in, channels_out, blocks):
    """A stage that halves the resolution in its first block."""
    layers = [BasicBlock(channels_in, channels_out, stride=2)]
    layers += [BasicBlock(channels_out, channels_out) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


class ResNetVNet(nn.Module):
    """ResNet-34 encoder + V-Net decoder; input ``[B, n_channels, X, Y, Z]`` with X, Y, Z divisible by 16.

    Same interface as :class:`networks.vnet.VNet`: ``encoder(x)`` -> five levels, ``decoder(levels)`` ->
    ``(logits, last_decoder_map)``, ``forward(x, return_features=False)``.
    """

    def __init__(self, n_channels=1, n_classes=2, n_filters=16, normalization="batchnorm", has_dropout=False):
        super().__init__()
        self.has_dropout = has_dropout
        n = n_filters
        self.stem = nn.Sequential(nn.Conv3d(n_channels, n, 7, padding=3, bias=False), nn.BatchNorm3d(n),
                                  nn.ReLU(inplace=True))
        widths = [n, 2 * n, 4 * n, 8 * n, 16 * n]
        self.layer1, self.layer2, self.layer3, self.layer4 = (
            _stage(widths[i], widths[i + 1], blocks) for i, blocks in enumerate(STAGE_BLOCKS))
        add_vnet_decoder(self, n, n_classes, normalization)

    def encoder(self, x):
        """Return the five levels ``[x1, ..., x5]`` (full to 1/16 resolution, n to 16n channels)."""
        if any(size % DOWNSAMPLING for size in x.shape[2:]):
            raise ValueError(f"ResNetVNet: spatial size {tuple(x.shape[2:])} must be divisible by {DOWNSAMPLING} "
                             "(the stride-2 stages round odd sizes up, which breaks the decoder's skips)")
        x1 = self.stem(x)
        x2 = self.layer1(x1)
        x3 = self.layer2(x2)
        x4 = self.layer3(x3)
        return [x1, x2, x3, x4, self.layer4(x4)]

    decoder = VNet.decoder  # the V-Net's decoder over the same module names
    forward = VNet.forward
