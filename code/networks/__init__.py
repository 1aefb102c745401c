"""3D segmentation networks; build them by name with ``net_factory_3d``."""
