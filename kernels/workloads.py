"""The problems the AOT build records its kernel launches over (``fastssl.kernels.aot``).

Each workload calls the public API, forward and backward, with the Triton kernels, on
uninitialised CPU tensors inside :func:`fastssl.kernels._launch.record_launches`: nothing
runs, every launch is described as a GPU's JIT would compile it. They are the benchmarks'
target shapes and small odd sizes that reach every tile layout, in every dtype the ops
accept, so that CI compiles for sm_80 / sm_90 what runs there (fp64 inputs included, which
the interpreter would hide: it computes in numpy whatever the types).
"""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _logits(*shape, dtype=torch.float32, grad=False):
    x = torch.empty(shape, dtype=dtype)
    return x.requires_grad_() if grad else x


def dino_family() -> None:
    """DINO (v1) and the DINOv2/DINOv3 CLS and iBOT losses with their teacher targets."""
    from fastssl.functional import dino_cross_entropy, dino_loss, sinkhorn_knopp, softmax_center

    triton = dict(backend="triton")
    # DINO v1 (DinoLoss): 2 global + 8 local crops, B = 64, K = 65,536 (the benchmark's target),
    # 2 + 10 crops at K = 4,096, the fewest crops at an odd size.
    for ncrops, B, K, dtypes in ((10, 64, 65536, FLOAT_DTYPES), (12, 32, 4096, (torch.float16,)),
                                 (2, 3, 1000, (torch.float32,))):
        for dtype in dtypes:
            student = _logits(ncrops * B, K, dtype=dtype, grad=True)
            loss, _ = dino_loss(student, _logits(2 * B, K, dtype=dtype), torch.zeros(1, K), ncrops, 0.04, **triton)
            loss.backward()
    # DINOv3: Sinkhorn-Knopp over the 2 global crops' teacher rows, then the local term (8 crops
    # against 2, every pair) and the global term (2 against 2, diagonal out); K = 65,536 and
    # 262,144 (the benchmark's targets), B = 64. Teacher probabilities as the drop-in takes them.
    for K, dtypes in ((65536, FLOAT_DTYPES), (262144, (torch.bfloat16,))):
        for dtype in dtypes:
            targets = sinkhorn_knopp(_logits(2, 64, K, dtype=dtype), 0.07, **triton)
            for S, diagonal in ((8, False), (2, True)):
                student = _logits(S, 64, K, dtype=dtype, grad=True)
                dino_cross_entropy(student, targets, ignore_diagonal=diagonal, **triton).backward()
                probs = _logits(2, 64, K, dtype=torch.float32)
                dino_cross_entropy(student, probs, ignore_diagonal=diagonal, **triton).backward()
    # Softmax centering (DINOv2's other option) for the CLS terms.
    targets = softmax_center(_logits(2, 64, 65536, dtype=torch.bfloat16), torch.zeros(65536), 0.07, **triton)
    dino_cross_entropy(_logits(8, 64, 65536, dtype=torch.bfloat16, grad=True), targets, **triton).backward()
    # iBOT: 64 images x 196 patches, half masked, K = 65,536: rows with weights, one crop each.
    n = 64 * 196 // 2
    for dtype in (torch.bfloat16, torch.float32):
        teacher = _logits(n, 65536, dtype=dtype)
        for targets in (sinkhorn_knopp(teacher, 0.07, **triton),
                        softmax_center(teacher, torch.zeros(65536), 0.07, **triton)):
            student = _logits(n, 65536, dtype=dtype, grad=True)
            dino_cross_entropy(student, targets, weights=torch.empty(n), scale=1 / 64, **triton).backward()
        dino_cross_entropy(_logits(n, 65536, dtype=dtype, grad=True), _logits(n, 65536), weights=torch.empty(n),
                           scale=1 / 64, **triton).backward()
    # Small odd problems reaching the other tile layouts: more teacher crops than student crops
    # with the diagonal out (a teacher tile of its own), one crop each without weights.
    for S, T, diagonal in ((3, 5, True), (1, 1, False), (12, 12, True)):
        targets = sinkhorn_knopp(_logits(T, 5, 333), 0.07, **triton)
        dino_cross_entropy(_logits(S, 5, 333, grad=True), targets, ignore_diagonal=diagonal, **triton).backward()


WORKLOADS = {"dino": dino_family}
