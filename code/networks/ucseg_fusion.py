"""UC-Seg's uncertainty-aware pseudo-label generation (UPG) head (Huang et al., IEEE TIP 2025;
``module/generate_pseudo_map_attention.py`` and ``module/UC_Seg.py`` of the official code).

From the two subnets' logits ``z1, z2`` [B, C, X, Y, Z] it computes each subnet's evidential uncertainty
``u_k = C / sum(softplus(z_k) + 1)`` (``utils.evidential``), lets ``u1`` attend to ``u2`` to obtain a
spatial weight map ``A`` [B, 1, X, Y, Z] (:class:`UncertaintyCrossAttention`), and fuses
``FusionHead(cat[A z1, A z2])`` into the fused logits. Nothing is detached: losses on the fused logits
train both subnets too.

The attention works on non-overlapping ``patch^3`` tokens of the whole crop with a learned position
embedding per token, so it is built for one input size: every window at inference must have the
training patch size, and each size must be divisible by ``patch``.
"""
import torch
import torch.nn as nn

from utils.errors import UserError
from utils.evidential import dirichlet_uncertainty


def _patchify(volume, patch):
    """[B, C, hp, wp, dp] -> [B, h w d, p p p C] tokens (token order h, w, d; inside: p1, p2, p3, C)."""
    batch, channels, x, y, z = volume.shape
    h, w, d = x // patch, y // patch, z // patch
    tokens = volume.reshape(batch, channels, h, patch, w, patch, d, patch)
    return tokens.permute(0, 2, 4, 6, 3, 5, 7, 1).reshape(batch, h * w * d, patch ** 3 * channels)


def _unpatchify(tokens, grid, patch, channels):
    """Inverse of :func:`_patchify` for a token grid ``(h, w, d)``."""
    batch = tokens.shape[0]
    h, w, d = grid
    volume = tokens.reshape(batch, h, w, d, patch, patch, patch, channels)
    return volume.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(batch, channels, h * patch, w * patch, d * patch)


class CrossAttention(nn.Module):
    """Multi-head attention of queries from one token set to keys and values of another: separate
    q/k/v projections to ``heads x head_dim``, scale ``head_dim^-1/2``, softmax, output projection and
    dropout (no layer norm, as the official code)."""

    def __init__(self, dim, heads=8, head_dim=128, dropout=0.1):
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.scale = head_dim ** -0.5
        self.w_q = nn.Linear(dim, inner)
        self.w_k = nn.Linear(dim, inner)
        self.w_v = nn.Linear(dim, inner)
        self.to_out = nn.Sequential(nn.Linear(inner, dim), nn.Dropout(dropout))

    def _split(self, tokens):
        batch, count, _ = tokens.shape
        return tokens.reshape(batch, count, self.heads, -1).transpose(1, 2)

    def forward(self, queries, context):
        q, k, v = self._split(self.w_q(queries)), self._split(self.w_k(context)), self._split(self.w_v(context))
        weights = torch.softmax(q @ k.transpose(-2, -1) * self.scale, dim=-1)
        out = (weights @ v).transpose(1, 2)
        return self.to_out(out.reshape(out.shape[0], out.shape[1], -1))


class UncertaintyCrossAttention(nn.Module):
    """Spatial weight map from two one-channel uncertainty maps (the official ``Cross_Attention_block``).

    Both maps are cut into ``patch^3`` tokens, embedded by one shared linear layer, given the same
    learned position embedding (``randn``) and dropout; tokens of the first attend to those of the
    second (:class:`CrossAttention`); a residual MLP (``dim -> mlp_dim -> dim``, GELU) and a linear layer
    back to ``patch^3`` values with dropout give the map at full resolution.
    """

    def __init__(self, input_size, patch=16, dim=1024, heads=8, head_dim=128, mlp_dim=384, dropout=0.1,
                 channels=1):
        super().__init__()
        if any(size % patch for size in input_size):
            raise ValueError(f"input size {tuple(input_size)} must be divisible by the token size {patch}")
        self.input_size = tuple(input_size)
        self.patch = patch
        self.channels = channels
        self.grid = tuple(size // patch for size in input_size)
        tokens, token_dim = self.grid[0] * self.grid[1] * self.grid[2], channels * patch ** 3
        self.to_patch_embedding = nn.Linear(token_dim, dim)
        self.pos_embed = nn.Parameter(torch.randn(1, tokens, dim))
        self.dropout = nn.Dropout(dropout)
        self.attn = CrossAttention(dim, heads, head_dim, dropout)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_dim), nn.GELU(), nn.Linear(mlp_dim, dim))
        self.to_out = nn.Sequential(nn.Linear(dim, token_dim), nn.Dropout(dropout))

    def _embed(self, volume):
        return self.dropout(self.to_patch_embedding(_patchify(volume, self.patch)) + self.pos_embed)

    def forward(self, uncertainty1, uncertainty2):
        attended = self.attn(self._embed(uncertainty1), self._embed(uncertainty2))
        attended = self.mlp(attended) + attended
        return _unpatchify(self.to_out(attended), self.grid, self.patch, self.channels)


def _pointwise(channels_in, channels_out):
    """1x1x1 convolution without bias, batch norm, LeakyReLU(0.2)."""
    return nn.Sequential(nn.Conv3d(channels_in, channels_out, 1, bias=False), nn.BatchNorm3d(channels_out),
                         nn.LeakyReLU(0.2, inplace=True))


class FusionHead(nn.Module):
    """Six 1x1x1 stages ``2C -> 16 -> 32 -> 64 -> 32 -> 16 -> C``, each convolution + batch norm +
    LeakyReLU(0.2), the output stage included (the official ``Generate_pseudo_simple``)."""

    WIDTHS = (16, 32, 64, 32, 16)

    def __init__(self, num_classes=2):
        super().__init__()
        widths = (2 * num_classes,) + self.WIDTHS + (num_classes,)
        self.stages = nn.Sequential(*[_pointwise(a, b) for a, b in zip(widths[:-1], widths[1:])])

    def forward(self, x):
        return self.stages(x)


class UncertaintyGuidedFusion(nn.Module):
    """The UPG head: fused logits ``FusionHead(cat[A z1, A z2])`` with ``A`` the cross-attention of the
    subnets' evidential uncertainty maps (``u1`` queries, ``u2`` keys and values)."""

    def __init__(self, input_size, num_classes=2, patch=16, dim=1024, heads=8, head_dim=128, mlp_dim=384,
                 dropout=0.1):
        super().__init__()
        self.cross_attn = UncertaintyCrossAttention(input_size, patch, dim, heads, head_dim, mlp_dim, dropout)
        self.head = FusionHead(num_classes)

    def weight_map(self, logits1, logits2):
        """The spatial weight ``A`` [B, 1, X, Y, Z] from the two subnets' logits."""
        size = tuple(logits1.shape[2:])
        if size != self.cross_attn.input_size or tuple(logits2.shape[2:]) != size:
            expected = "x".join(map(str, self.cross_attn.input_size))
            raise UserError(f"UC-Seg's fusion head was built for {expected} crops, got "
                            f"{'x'.join(map(str, size))}: windows must have the training patch size")
        return self.cross_attn(dirichlet_uncertainty(logits1), dirichlet_uncertainty(logits2))

    def forward(self, logits1, logits2):
        weight = self.weight_map(logits1, logits2)
        return self.head(torch.cat([weight * logits1, weight * logits2], dim=1))
