"""Class-wise FIFO memory queues of feature vectors, kept as buffers so checkpoints and ``--resume`` hold them.

A queue per class of ``size`` vectors of dimension ``dim`` (MoCo's queue, He et al. CVPR 2020, split by
class as in UC-Seg's intra-subnet feature enhancement). It starts as random unit vectors; every write
overwrites the oldest entries of its class, in order, wrapping around.

UC-Seg's official code keeps one write pointer for all classes of a queue, so each class fills only
every other block of its queue and the rest stays random for the whole run; ``shared_pointer=True``
reproduces that, the default gives each class its own pointer.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


class ClassMemoryQueue(nn.Module):
    """Buffers ``entries`` [num_classes, size, dim] and ``pointer`` [num_classes] (next slot to write)."""

    def __init__(self, num_classes, dim, size, shared_pointer=False):
        super().__init__()
        if num_classes < 2 or dim < 1 or size < 1:
            raise ValueError(f"ClassMemoryQueue needs >= 2 classes, dim >= 1 and size >= 1, "
                             f"got {num_classes}, {dim}, {size}")
        self.shared_pointer = shared_pointer
        self.register_buffer("entries", F.normalize(torch.randn(num_classes, size, dim), dim=-1))
        self.register_buffer("pointer", torch.zeros(num_classes, dtype=torch.long))

    @property
    def size(self):
        return self.entries.shape[1]

    def positive(self, cls):
        """The mean entry of class ``cls`` [dim], detached."""
        return self.entries[cls].mean(dim=0).detach().clone()

    def negatives(self, cls):
        """Every entry of the other classes [(num_classes - 1) * size, dim], detached."""
        others = [c for c in range(self.entries.shape[0]) if c != cls]
        return self.entries[others].reshape(-1, self.entries.shape[2]).detach().clone()

    @torch.no_grad()
    def push(self, cls, vectors):
        """Write ``vectors`` [n, dim] over the ``n`` oldest entries of class ``cls``, in order."""
        slot = 0 if self.shared_pointer else cls
        start = int(self.pointer[slot])
        index = (start + torch.arange(vectors.shape[0], device=self.entries.device)) % self.size
        self.entries[cls, index] = vectors.detach().to(self.entries.dtype)
        self.pointer[slot] = (start + vectors.shape[0]) % self.size
