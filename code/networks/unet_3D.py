"""SSL4MIS's 3D U-Net (``networks/unet_3D.py``, after Oktay et al.'s attention-gated U-Net code base), as
UC-Seg's first subnet uses it.

``UNet3D(in_channels, n_classes, n_filters=16)``: encoder blocks of two 3x3x3 convolutions, each with
instance norm (SSL4MIS calls the switch ``is_batchnorm`` but builds ``InstanceNorm3d``, without affine
parameters) and ReLU, at widths 16, 32, 64, 128 and a 256-wide centre (``n_filters`` times 1, 2, 4, 8, 16;
SSL4MIS's ``feature_scale=4`` is ``n_filters=16``), with 2x2x2 max pooling between
them; decoder blocks that upsample trilinearly by 2, concatenate the skip, and apply the same double
convolution; a 1x1x1 output convolution. ``Dropout(p=0.3)`` (element-wise) follows the centre and the last
decoder block. Every convolution is He-normal initialised (fan-in). The module names are SSL4MIS's, so its
checkpoints load. Inputs must be divisible by 16 (four poolings); SSL4MIS pads the skip when the upsampled
map is larger, which never happens then, so that step is left out.

``forward(x, return_features=True)`` also returns ``{"encoder": [conv1, conv2, conv3, conv4, centre],
"decoder": up1}`` (the centre and ``up1`` after their dropout), like ``networks.vnet.VNet``.
"""
import torch
import torch.nn as nn

NORMALIZATIONS = ("instancenorm", "none")


def _conv_norm_relu(channels_in, channels_out, normalization):
    layers = [nn.Conv3d(channels_in, channels_out, 3, 1, 1)]
    if normalization == "instancenorm":
        layers.append(nn.InstanceNorm3d(channels_out))
    layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class UnetConv3(nn.Module):
    """Two (3x3x3 convolution, instance norm, ReLU) stages."""

    def __init__(self, in_size, out_size, normalization="instancenorm"):
        super().__init__()
        self.conv1 = _conv_norm_relu(in_size, out_size, normalization)
        self.conv2 = _conv_norm_relu(out_size, out_size, normalization)

    def forward(self, x):
        return self.conv2(self.conv1(x))


class UnetUp3_CT(nn.Module):
    """Trilinear x2 upsampling of the deeper map, concatenation with the skip, :class:`UnetConv3`."""

    def __init__(self, in_size, out_size, normalization="instancenorm"):
        super().__init__()
        self.conv = UnetConv3(in_size + out_size, out_size, normalization)
        self.up = nn.Upsample(scale_factor=(2, 2, 2), mode="trilinear")

    def forward(self, skip, deeper):
        return self.conv(torch.cat([skip, self.up(deeper)], dim=1))


class UNet3D(nn.Module):
    """SSL4MIS ``unet_3D``; input ``[B, in_channels, X, Y, Z]`` with X, Y, Z divisible by 16."""

    def __init__(self, in_channels=1, n_classes=2, n_filters=16, normalization="instancenorm", dropout=0.3):
        super().__init__()
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {', '.join(NORMALIZATIONS)}, got {normalization!r}")
        filters = [n_filters * factor for factor in (1, 2, 4, 8, 16)]
        self.conv1 = UnetConv3(in_channels, filters[0], normalization)
        self.maxpool1 = nn.MaxPool3d(kernel_size=(2, 2, 2))
        self.conv2 = UnetConv3(filters[0], filters[1], normalization)
        self.maxpool2 = nn.MaxPool3d(kernel_size=(2, 2, 2))
        self.conv3 = UnetConv3(filters[1], filters[2], normalization)
        self.maxpool3 = nn.MaxPool3d(kernel_size=(2, 2, 2))
        self.conv4 = UnetConv3(filters[2], filters[3], normalization)
        self.maxpool4 = nn.MaxPool3d(kernel_size=(2, 2, 2))
        self.center = UnetConv3(filters[3], filters[4], normalization)
        self.up_concat4 = UnetUp3_CT(filters[4], filters[3], normalization)
        self.up_concat3 = UnetUp3_CT(filters[3], filters[2], normalization)
        self.up_concat2 = UnetUp3_CT(filters[2], filters[1], normalization)
        self.up_concat1 = UnetUp3_CT(filters[1], filters[0], normalization)
        self.final = nn.Conv3d(filters[0], n_classes, 1)
        self.dropout1 = nn.Dropout(p=dropout)
        self.dropout2 = nn.Dropout(p=dropout)
        for module in self.modules():
            if isinstance(module, nn.Conv3d):
                nn.init.kaiming_normal_(module.weight, a=0, mode="fan_in")

    def encoder(self, x):
        """The five encoder levels ``[conv1, ..., conv4, centre]`` (full to 1/16 resolution); dropout
        (train mode) is applied to the centre."""
        conv1 = self.conv1(x)
        conv2 = self.conv2(self.maxpool1(conv1))
        conv3 = self.conv3(self.maxpool2(conv2))
        conv4 = self.conv4(self.maxpool3(conv3))
        center = self.dropout1(self.center(self.maxpool4(conv4)))
        return [conv1, conv2, conv3, conv4, center]

    def decoder(self, features):
        """Decode the encoder levels; return ``(logits, last_decoder_map)`` (the map after dropout)."""
        conv1, conv2, conv3, conv4, center = features
        up4 = self.up_concat4(conv4, center)
        up3 = self.up_concat3(conv3, up4)
        up2 = self.up_concat2(conv2, up3)
        up1 = self.dropout2(self.up_concat1(conv1, up2))
        return self.final(up1), up1

    def forward(self, x, return_features=False):
        """Logits ``[B, n_classes, ...]``; with ``return_features`` also ``{"encoder", "decoder"}``."""
        features = self.encoder(x)
        logits, last = self.decoder(features)
        if return_features:
            return logits, {"encoder": features, "decoder": last}
        return logits
