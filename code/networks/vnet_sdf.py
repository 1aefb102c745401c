"""V-Net with a signed-distance head beside the segmentation head (the dual-task V-Net of DTC and UG-MCL).

Both heads read the last decoder map ``x9`` of :class:`networks.vnet.VNet` (after its dropout): the
segmentation head is the V-Net's own ``out_conv`` (logits), the distance head a separate 1x1x1 convolution
followed by ``tanh``, so its output lies in [-1, 1] like the normalised signed distance map of
``utils.losses.compute_sdf`` (negative inside the object). This is the "separate 3D conv + tanh" regression
branch of UG-MCL's Fig. 2 and the layout of DTC's and DTML's ``vnet_sdf``; UG-MCL's released BraTS code
instead takes ``tanh`` of the segmentation logits (see docs/methods/ugmcl.md).
"""
import torch
import torch.nn as nn

from networks.vnet import VNet


class VNetSDF(VNet):
    """``VNet`` whose forward returns ``(segmentation logits [B, n_classes, ...], sdf [B, sdf_channels, ...])``.

    ``sdf_channels`` is 1 by default: the signed distance of the foreground. With 2 classes a background
    channel would only repeat it with the opposite sign.
    """

    def __init__(self, n_channels=1, n_classes=2, n_filters=16, normalization="batchnorm", has_dropout=False,
                 sdf_channels=1):
        super().__init__(n_channels, n_classes, n_filters, normalization, has_dropout)
        self.out_conv_sdf = nn.Conv3d(n_filters, sdf_channels, 1, padding=0)

    def forward(self, x, return_features=False):
        """``(logits, sdf)``; with ``return_features`` also the feature dict of :meth:`VNet.forward`."""
        features = self.encoder(x)
        logits, last = self.decoder(features)
        sdf = torch.tanh(self.out_conv_sdf(last))
        if return_features:
            return logits, sdf, {"encoder": features, "decoder": last}
        return logits, sdf
