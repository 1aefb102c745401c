"""Build 3D networks by name, on the CPU; the caller moves them to its device.

Unlike the SSL4MIS factory this never calls ``.cuda()`` and an unknown name is a clear error rather
than a silent ``None``. Method issues add their networks (``unet_3D``, the ResNet-encoder V-Net) here.
"""
from networks.vnet import VNet
from utils.errors import UserError

_BUILDERS = {
    "vnet": lambda in_chns, class_num, **kw: VNet(
        n_channels=in_chns, n_classes=class_num,
        n_filters=kw.pop("n_filters", 16),
        normalization=kw.pop("normalization", "batchnorm"),
        has_dropout=kw.pop("has_dropout", False), **kw),
}


def available_networks():
    """Names accepted by :func:`net_factory_3d`."""
    return sorted(_BUILDERS)


def net_factory_3d(name, in_chns=1, class_num=2, **kwargs):
    """Return a freshly initialised network ``name`` on the CPU.

    ``vnet`` defaults to the anchors' settings: 16 filters, batchnorm, no dropout; keyword arguments
    (``n_filters``, ``normalization``, ``has_dropout``) override them.
    """
    if name not in _BUILDERS:
        raise UserError(f"unknown network {name!r}; available: {', '.join(available_networks())}")
    return _BUILDERS[name](in_chns, class_num, **kwargs)
