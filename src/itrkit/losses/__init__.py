"""Objectives for image-text retrieval (docs/method.md §1): ``nn.Module`` wrappers here, functional forms in
:mod:`itrkit.losses.functional` (``info_nce``, ``triplet``, ``teacher_probs``, ``csa``, ``usa``,
``instance``).

Modules return dicts of named ``*_loss`` tensors already multiplied by their weight (open_clip
style): the total loss is the sum of the values. The functions are not re-exported here because
``triplet`` and ``instance`` would shadow the submodules of the same name.
"""

from itrkit.losses import functional
from itrkit.losses.contrastive import ContrastiveLoss
from itrkit.losses.cusa import CUSALoss, USAProjector
from itrkit.losses.distributed import gather_features, is_dist, rank, world_size
from itrkit.losses.instance import InstanceLoss
from itrkit.losses.triplet import TripletLoss

__all__ = [
    "CUSALoss",
    "ContrastiveLoss",
    "InstanceLoss",
    "TripletLoss",
    "USAProjector",
    "functional",
    "gather_features",
    "is_dist",
    "rank",
    "world_size",
]
