"""Drop-ins for the DINOv2 authors' losses (facebookresearch/dinov2, ``dinov2/loss/``), fused.

``from fastssl.dinov2 import DINOLoss, iBOTPatchLoss`` in place of ``from dinov2.loss import
...``: same constructors, methods, semantics and state-dict keys, the same numbers, without
the per-crop fp32 log-softmax, and with Sinkhorn-Knopp in the log domain. Each module also
has ``teacher_targets(...)``, the fused form of its teacher probabilities. ``KoLeoLoss`` is
``fastssl.losses.koleo``'s, shared with ``fastssl.dinov3``.
"""

from ..losses.koleo import KoLeoLoss
from .loss import DINOLoss, iBOTPatchLoss

__all__ = ["DINOLoss", "KoLeoLoss", "iBOTPatchLoss"]
