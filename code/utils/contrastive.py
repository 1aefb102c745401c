"""InfoNCE losses on 3D feature maps: prototypes against a memory queue, and regions between two networks.

Both are the InfoNCE of van den Oord et al. (2018) / MoCo (He et al., CVPR 2020): the cross-entropy of
``[positive, negatives] / temperature`` with the positive as the target. UC-Seg (Huang et al., IEEE TIP
2025, ``module/denseCL_SSIM.py`` of the official code) uses raw dot products of ReLU features, without the
usual L2 normalisation; ``normalize=True`` gives the cosine-similarity variant. Device-agnostic.
"""
import torch
import torch.nn.functional as F


def info_nce(positive, negatives, temperature):
    """Mean over rows of ``CE([positive, negatives] / temperature, 0)`` for similarities ``positive`` [N]
    and ``negatives`` [N, K]."""
    logits = torch.cat([positive.unsqueeze(1), negatives], dim=1) / temperature
    target = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
    return F.cross_entropy(logits, target)


def masked_global_pool(features, mask):
    """``mean over all voxels of features * mask``: [B, D, ...] and a [B, 1, ...] mask give [B, D].

    The mean runs over every voxel, not only the masked ones, so the vector also scales with the
    region's size (UC-Seg's class prototypes and queue entries, an ``AdaptiveAvgPool3d(1)`` of the product).
    """
    return torch.mean(features * mask, dim=tuple(range(2, features.dim())))


def prototype_queue_contrast(prototypes, positive, negatives, temperature, normalize=False):
    """InfoNCE of class prototypes [B, D] against the mean of their class's queue ``positive`` [D] and the
    queue entries of the other classes ``negatives`` [K, D] (UC-Seg's intra-subnet feature enhancement)."""
    if normalize:
        prototypes, positive, negatives = (F.normalize(t, dim=-1) for t in (prototypes, positive, negatives))
    return info_nce(prototypes @ positive, prototypes @ negatives.t(), temperature)


def regional_info_nce(features1, features2, regions=3, temperature=0.3, normalize=False):
    """InfoNCE between the region vectors of two networks' feature maps [B, D, X, Y, Z].

    Each map is average-pooled to ``regions^3`` cells. Cell ``i`` of sample ``b`` of the first network has
    the same cell of the same sample of the second as its positive and every other cell ``j != i`` of every
    sample of the second as negatives (``B (R - 1)`` of them). Mean over samples and cells; the gradient
    reaches both networks (UC-Seg's inter-subnet consistency).
    """
    pooled1 = F.adaptive_avg_pool3d(features1, regions).flatten(2)
    pooled2 = F.adaptive_avg_pool3d(features2, regions).flatten(2)
    if normalize:
        pooled1, pooled2 = F.normalize(pooled1, dim=1), F.normalize(pooled2, dim=1)
    batch, _, cells = pooled1.shape
    similarity = torch.einsum("bdi,edj->biej", pooled1, pooled2)  # [B, R, B, R]
    index = torch.arange(cells, device=similarity.device)
    samples = torch.arange(batch, device=similarity.device)
    positive = similarity[samples[:, None], index[None, :], samples[:, None], index[None, :]]
    others = torch.stack([torch.cat([index[:i], index[i + 1:]]) for i in range(cells)])  # [R, R - 1]
    negatives = similarity.gather(3, others.view(1, cells, 1, cells - 1).expand(batch, cells, batch, cells - 1))
    return info_nce(positive.reshape(-1), negatives.reshape(batch * cells, -1), temperature)
