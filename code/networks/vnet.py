"""The V-Net of UA-MT (Yu et al. 2019), as reused by DTC, MC-Net, SS-Net, BCP and the three methods here.

Structurally identical to the anchors' network, with the same module names, so that their state dicts have
our keys (``test_released.py --arch vnet`` evaluates their released files; DTC's heads are renamed there):
encoder conv blocks of 1/2/3/3/3 3x3x3 convolutions at widths n, 2n, 4n, 8n, 16n with stride-2 2x2x2
convolutions between them; decoder blocks of 3/3/2/1 convolutions after stride-2 transposed convolutions
with *additive* skips; a 1x1x1 output convolution; optional ``Dropout3d(0.5)`` after the bottleneck and
the last decoder block. ``VNet(1, 2, 16)`` has 9,448,866 parameters with batchnorm and 9,443,266 without
normalisation (instance norm has no affine parameters, as in the anchors).

Beyond the anchors, :meth:`VNet.encoder` and :meth:`VNet.decoder` are public and
``forward(x, return_features=True)`` also hands back the encoder levels and the last decoder map, which
the contrastive and dual-task methods need.
"""
import torch.nn as nn

NORMALIZATIONS = ("batchnorm", "instancenorm", "groupnorm", "none")


def _norm(normalization, channels):
    """The normalisation layer of the anchors for ``channels`` (None for 'none')."""
    if normalization == "batchnorm":
        return nn.BatchNorm3d(channels)
    if normalization == "groupnorm":
        return nn.GroupNorm(num_groups=16, num_channels=channels)
    if normalization == "instancenorm":
        return nn.InstanceNorm3d(channels)
    if normalization == "none":
        return None
    raise ValueError(f"normalization must be one of {', '.join(NORMALIZATIONS)}, got {normalization!r}")


def _conv_norm_relu(conv, normalization, channels):
    layers = [conv]
    norm = _norm(normalization, channels)
    if norm is not None:
        layers.append(norm)
    layers.append(nn.ReLU(inplace=True))
    return layers


class ConvBlock(nn.Module):
    """``n_stages`` x (3x3x3 convolution, normalisation, ReLU)."""

    def __init__(self, n_stages, n_filters_in, n_filters_out, normalization="none"):
        super().__init__()
        layers = []
        for stage in range(n_stages):
            channels_in = n_filters_in if stage == 0 else n_filters_out
            conv = nn.Conv3d(channels_in, n_filters_out, 3, padding=1)
            layers += _conv_norm_relu(conv, normalization, n_filters_out)
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        return self.conv(x)


class DownsamplingConvBlock(nn.Module):
    """Stride-2 2x2x2 convolution, normalisation, ReLU."""

    def __init__(self, n_filters_in, n_filters_out, stride=2, normalization="none"):
        super().__init__()
        conv = nn.Conv3d(n_filters_in, n_filters_out, stride, padding=0, stride=stride)
        self.conv = nn.Sequential(*_conv_norm_relu(conv, normalization, n_filters_out))

    def forward(self, x):
        return self.conv(x)


class UpsamplingDeconvBlock(nn.Module):
    """Stride-2 2x2x2 transposed convolution, normalisation, ReLU."""

    def __init__(self, n_filters_in, n_filters_out, stride=2, normalization="none"):
        super().__init__()
        conv = nn.ConvTranspose3d(n_filters_in, n_filters_out, stride, padding=0, stride=stride)
        self.conv = nn.Sequential(*_conv_norm_relu(conv, normalization, n_filters_out))

    def forward(self, x):
        return self.conv(x)


def add_vnet_decoder(module, n_filters, n_classes, normalization):
    """Give ``module`` the V-Net decoder's layers under the anchors' names (``block_five_up`` ..
    ``block_nine``, ``out_conv``, ``dropout``), for :meth:`VNet.decoder` to run; also used by networks that
    put another encoder under the same decoder."""
    n, kw = n_filters, {"normalization": normalization}
    module.block_five_up = UpsamplingDeconvBlock(16 * n, 8 * n, **kw)
    module.block_six = ConvBlock(3, 8 * n, 8 * n, **kw)
    module.block_six_up = UpsamplingDeconvBlock(8 * n, 4 * n, **kw)
    module.block_seven = ConvBlock(3, 4 * n, 4 * n, **kw)
    module.block_seven_up = UpsamplingDeconvBlock(4 * n, 2 * n, **kw)
    module.block_eight = ConvBlock(2, 2 * n, 2 * n, **kw)
    module.block_eight_up = UpsamplingDeconvBlock(2 * n, n, **kw)
    module.block_nine = ConvBlock(1, n, n, **kw)
    module.out_conv = nn.Conv3d(n, n_classes, 1, padding=0)
    module.dropout = nn.Dropout3d(p=0.5, inplace=False)


class VNet(nn.Module):
    """V-Net for 3D segmentation; input ``[B, n_channels, X, Y, Z]`` with X, Y, Z divisible by 16."""

    def __init__(self, n_channels=3, n_classes=2, n_filters=16, normalization="none", has_dropout=False):
        super().__init__()
        _norm(normalization, 16)  # validates the name before any layer is built
        self.has_dropout = has_dropout
        n = n_filters
        kw = {"normalization": normalization}
        self.block_one = ConvBlock(1, n_channels, n, **kw)
        self.block_one_dw = DownsamplingConvBlock(n, 2 * n, **kw)
        self.block_two = ConvBlock(2, 2 * n, 2 * n, **kw)
        self.block_two_dw = DownsamplingConvBlock(2 * n, 4 * n, **kw)
        self.block_three = ConvBlock(3, 4 * n, 4 * n, **kw)
        self.block_three_dw = DownsamplingConvBlock(4 * n, 8 * n, **kw)
        self.block_four = ConvBlock(3, 8 * n, 8 * n, **kw)
        self.block_four_dw = DownsamplingConvBlock(8 * n, 16 * n, **kw)
        self.block_five = ConvBlock(3, 16 * n, 16 * n, **kw)
        add_vnet_decoder(self, n, n_classes, normalization)

    def encoder(self, x):
        """Return the five encoder levels ``[x1, ..., x5]`` (full to 1/16 resolution).

        Dropout (when enabled) is applied to the bottleneck ``x5``, as in the anchors.
        """
        x1 = self.block_one(x)
        x2 = self.block_two(self.block_one_dw(x1))
        x3 = self.block_three(self.block_two_dw(x2))
        x4 = self.block_four(self.block_three_dw(x3))
        x5 = self.block_five(self.block_four_dw(x4))
        if self.has_dropout:
            x5 = self.dropout(x5)
        return [x1, x2, x3, x4, x5]

    def decoder(self, features):
        """Decode encoder levels; return ``(logits, last_decoder_map)``.

        The last decoder map is the ``n_filters``-channel full-resolution feature after dropout (when
        enabled), i.e. exactly what the output convolution sees.
        """
        x1, x2, x3, x4, x5 = features
        x6 = self.block_six(self.block_five_up(x5) + x4)
        x7 = self.block_seven(self.block_six_up(x6) + x3)
        x8 = self.block_eight(self.block_seven_up(x7) + x2)
        x9 = self.block_nine(self.block_eight_up(x8) + x1)
        if self.has_dropout:
            x9 = self.dropout(x9)
        return self.out_conv(x9), x9

    def forward(self, x, return_features=False):
        """Logits ``[B, n_classes, ...]``; with ``return_features`` also a dict with ``encoder`` (the five
        levels) and ``decoder`` (the last decoder map)."""
        features = self.encoder(x)
        logits, last = self.decoder(features)
        if return_features:
            return logits, {"encoder": features, "decoder": last}
        return logits
