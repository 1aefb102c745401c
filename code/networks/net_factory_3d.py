"""Build 3D networks by name, on the CPU; the caller moves them to its device.

Unlike the SSL4MIS factory this never calls ``.cuda()`` and an unknown name is a clear error rather
than a silent ``None``.
"""
from networks.resnet_vnet import ResNetVNet
from networks.unet_3D import UNet3D
from networks.vnet import VNet
from networks.vnet_sdf import VNetSDF
from utils.errors import UserError


def _with_vnet_defaults(kw):
    """The anchors' V-Net settings (16 filters, batchnorm, no dropout) under any given keyword arguments."""
    return {"n_filters": 16, "normalization": "batchnorm", "has_dropout": False, **kw}


_BUILDERS = {
    "vnet": lambda in_chns, class_num, **kw: VNet(in_chns, class_num, **_with_vnet_defaults(kw)),
    "vnet_sdf": lambda in_chns, class_num, **kw: VNetSDF(in_chns, class_num, **_with_vnet_defaults(kw)),
    "resnet_vnet": lambda in_chns, class_num, **kw: ResNetVNet(in_chns, class_num, **_with_vnet_defaults(kw)),
    "unet_3D": lambda in_chns, class_num, **kw: UNet3D(in_chns, class_num, **kw),
}


# The networks built with the V-Net's settings (filters, normalisation, dropout) that return logits alone: the
# --model choices of a script that trains plain segmentation networks.
PLAIN_VNETS = ("vnet", "resnet_vnet")


def available_networks():
    """Names accepted by :func:`net_factory_3d`."""
    return sorted(_BUILDERS)


def net_factory_3d(name, in_chns=1, class_num=2, **kwargs):
    """Return a freshly initialised network ``name`` on the CPU.

    ``vnet`` defaults to the anchors' settings: 16 filters, batchnorm, no dropout; keyword arguments
    (``n_filters``, ``normalization``, ``has_dropout``) override them. ``vnet_sdf`` is the same V-Net with
    a signed-distance head (``sdf_channels``, default 1) and returns ``(logits, sdf)``; ``resnet_vnet`` is
    UGPL's ResNet-34 encoder under the V-Net decoder (same defaults); ``unet_3D`` is SSL4MIS's 3D U-Net
    (instance norm, its own keyword arguments).
    """
    if name not in _BUILDERS:
        raise UserError(f"unknown network {name!r}; available: {', '.join(available_networks())}")
    return _BUILDERS[name](in_chns, class_num, **kwargs)
