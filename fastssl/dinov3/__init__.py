"""Drop-ins for the DINOv3 authors' losses (facebookresearch/dinov3, ``dinov3/loss/``), fused.

``from fastssl.dinov3 import DINOLoss, iBOTPatchLoss, SinkhornKnoppTeacher`` in place of the
authors' imports: same constructors, methods, semantics and state-dict keys, the same numbers,
without the per-crop fp32 log-softmax, and with Sinkhorn-Knopp in the log domain (it works on
one process without a process group, where the authors' iBOT all-reduces unconditionally).
Each loss also has ``teacher_targets(...)``, the fused form of its teacher probabilities.
``KoLeoLoss``, ``KoLeoLossDistributed`` (``fastssl.losses.koleo``) and ``GramLoss``
(``fastssl.losses.gram``: no similarity matrix is ever built) complete the objective.
"""

from ..losses.gram import GramLoss
from ..losses.koleo import KoLeoLoss, KoLeoLossDistributed
from .loss import DINOLoss, SinkhornKnoppTeacher, iBOTPatchLoss

__all__ = ["DINOLoss", "GramLoss", "KoLeoLoss", "KoLeoLossDistributed", "SinkhornKnoppTeacher", "iBOTPatchLoss"]
