"""Every Triton launch the lease makes, recorded without running: the set the lease compiles in
parallel before it times anything, and the set CI compiles ahead of time for sm_80 and sm_90.

    python -m benchmarks.workloads [--device cuda]     # the unique launches, counted per kernel

A workload calls the public API as the lease does: the kernel checks at their fixed sizes
(``benchmarks.kernel_checks``) and each benchmark's fused contender, forward and backward, at
its target shapes (the shapes of the issues' targets). Inside
:func:`fastssl.kernels._launch.record_launches` no kernel runs: each launch is described as a
GPU's JIT specialises it (dtypes, 16-byte alignment, integers equal to 1 or divisible by 16,
the constexprs and compile options a GPU gets). On a CPU the record runs under
``TRITON_INTERPRET=1`` (so that the Python layer takes the kernels), on uninitialised tensors.
"""

from __future__ import annotations

import argparse
import collections
import json

import torch

from benchmarks import kernel_checks


def _empty(*shape, dtype=torch.float32, device, grad=False):
    # Uninitialised: nothing runs while launches are recorded, and filling gigabytes takes time.
    x = torch.empty(shape, dtype=dtype, device=device)
    return x.requires_grad_() if grad else x


def _dino_targets(device: torch.device) -> None:
    """DinoLoss at benchmarks.dino's and benchmarks.train_step's targets; the DINOv3 CLS and iBOT
    steps at benchmarks.dinov3's."""
    from benchmarks import dino, dinov3
    from fastssl import DinoLoss
    from fastssl.functional import dino_cross_entropy, sinkhorn_knopp

    problems = {(c.ncrops, c.B, c.K, dino.DTYPES[c.dtype]) for c in dino.PRESETS["target"].cases}
    problems.add((12, 64, 65536, torch.bfloat16))  # the training step: 2 + 10 crops under bf16 autocast
    for ncrops, B, K, dtype in sorted(problems, key=str):
        loss_fn = DinoLoss(K, ncrops, 0.04, 0.04, 0, 1, backend="triton").to(device)
        student = _empty(ncrops * B, K, dtype=dtype, device=device, grad=True)
        torch.autograd.grad(loss_fn(student, _empty(2 * B, K, dtype=dtype, device=device), 0), student)
    for case in dinov3.PRESETS["target"].cases:
        dtype, K = dinov3.DTYPES[case.dtype], case.K
        if case.kind == "cls":
            targets = sinkhorn_knopp(_empty(2, case.B, K, dtype=dtype, device=device), 0.07, backend="triton")
            for S, diagonal in ((dinov3.LOCAL, False), (2, True)):
                student = _empty(S, case.B, K, dtype=dtype, device=device, grad=True)
                dino_cross_entropy(student, targets, ignore_diagonal=diagonal, backend="triton").backward()
        else:
            targets = sinkhorn_knopp(_empty(case.rows, K, dtype=dtype, device=device), 0.07, backend="triton")
            student = _empty(case.rows, K, dtype=dtype, device=device, grad=True)
            dino_cross_entropy(student, targets, weights=_empty(case.rows, device=device), scale=1 / case.B,
                               backend="triton").backward()


def _ema_targets(device: torch.device) -> None:
    """The EMA update of benchmarks.ema's target parameter sets."""
    from benchmarks import ema
    from fastssl import ema_update_

    for case in ema.PRESETS["target"].cases:
        teacher, student = ema.make_tensors(case, device)
        ema_update_(teacher, student, ema.MOMENTUM, backend="triton")


def _paws_targets(device: torch.device) -> None:
    """The soft nearest neighbours at benchmarks.paws' targets, forward and (training) backward."""
    from benchmarks import paws
    from fastssl.functional import snn

    for case in paws.PRESETS["target"].cases:
        dtype = paws.DTYPES[case.dtype]
        query = _empty(case.N, case.d, dtype=dtype, device=device, grad=case.train)
        supports = _empty(case.M, case.d, dtype=dtype, device=device, grad=case.train)
        if case.labels == "ids":  # zeros, not garbage: class ids are range-checked
            probs = snn(query, supports, torch.zeros(case.M, dtype=torch.int64, device=device), paws.TAU,
                        num_classes=case.C, backend="triton")
        else:
            probs = snn(query, supports, _empty(case.M, case.C, device=device), paws.TAU, backend="triton")
        if case.train:
            torch.autograd.grad(probs, (query, supports), torch.empty_like(probs))


def _gram_targets(device: torch.device) -> None:
    """The Gram loss at benchmarks.gram's targets, forward and backward to the student."""
    from benchmarks import gram
    from fastssl.functional import gram_loss

    for case in gram.PRESETS["target"].cases:
        dtype = gram.DTYPES[case.dtype]
        student = _empty(case.B, case.N, case.d, dtype=dtype, device=device, grad=True)
        teacher = _empty(case.B, case.N, case.d, dtype=dtype, device=device)
        loss = gram_loss(student, teacher, img_level=case.img_level, remove_neg=False, backend="triton")
        torch.autograd.grad(loss, student)


def _koleo_targets(device: torch.device) -> None:
    """KoLeo's top-k search at benchmarks.koleo's targets."""
    from benchmarks import koleo
    from fastssl.functional import koleo_loss

    for case in koleo.PRESETS["target"].cases:
        x = _empty(case.B, case.D, dtype=koleo.DTYPES[case.dtype], device=device, grad=True)
        torch.autograd.grad(koleo_loss(x, backend="triton"), x)


def _dinov3_step_targets(device: torch.device) -> None:
    """benchmarks.dinov3_step's training step at its target: the trainer's losses (``Dinov3Loss``'s
    modules) on the bf16 head outputs, the masked patches of every iteration (their count is an
    integer the launches specialise on), KoLeo on the pre-head CLS tokens, and the teacher's
    EMA of the ViT-S/16 with its heads (uninitialised parameters). Under the "dino" workload, its
    EMA and KoLeo launches included."""
    from benchmarks import dinov3_step
    from fastssl.dinov3 import DINOLoss, KoLeoLoss, iBOTPatchLoss
    from fastssl.ema import MomentumTeacher
    from fastssl.train.dinov3 import build_dinov3_model

    for case in dinov3_step.PRESETS["target"].cases:
        cfg, B, dtype = case.config(), case.batch, torch.bfloat16
        with torch.device("meta"):
            student = build_dinov3_model(cfg)
            teacher = build_dinov3_model(cfg, drop_path_rate=0.0)
        student.to_empty(device=device), teacher.to_empty(device=device)
        MomentumTeacher(student, 0.994, teacher=teacher, backend="triton").update(0)
        dino = DINOLoss(cfg.dino_out_dim, student_temp=cfg.student_temp, backend="triton").to(device)
        ibot = iBOTPatchLoss(cfg.ibot_out_dim, student_temp=cfg.student_temp, backend="triton").to(device)
        dino.init_weights(), ibot.init_weights()
        K, K_ibot, n_local = cfg.dino_out_dim, cfg.ibot_out_dim, cfg.local_crops_number
        targets = dino.teacher_targets(_empty(2 * B, K, dtype=dtype, device=device), cfg.teacher_temp,
                                       centering=cfg.centering)
        local = _empty(n_local, B, K, dtype=dtype, device=device, grad=True)
        glob = _empty(2, B, K, dtype=dtype, device=device, grad=True)
        loss = dino(local, targets) + dino(glob, targets, ignore_diagonal=cfg.global_ignore_diagonal)
        torch.autograd.grad(loss, (local, glob))
        for cls_dtype in (torch.float32, dtype):  # the final norm's output: fp32 under autocast, else bf16
            cls = _empty(B, int(student.backbone.embed_dim), dtype=cls_dtype, device=device, grad=True)
            torch.autograd.grad(KoLeoLoss(backend="triton")(cls), cls)
        patches = (cfg.global_crop_size // int(student.backbone.patch_embed.patch_size[0])) ** 2
        masks = torch.zeros(2 * B, patches, dtype=torch.bool, device=device)
        target = dinov3_step.PRESETS["target"]
        for n in sorted(set(dinov3_step.masked_counts(case, target, int(student.backbone.patch_embed.patch_size[0]),
                                                      seed=1000 * list(target.cases).index(case)))):
            ibot_targets = ibot.teacher_targets(_empty(n, K_ibot, dtype=dtype, device=device), cfg.teacher_temp,
                                                centering=cfg.centering)
            masked = _empty(n, K_ibot, dtype=dtype, device=device, grad=True)
            torch.autograd.grad(ibot.forward_masked(masked, ibot_targets, masks, n_masked_patches=n,
                                                    masks_weight=_empty(n, device=device)), masked)


# The most variants the workloads may record. The lease compiles them in parallel on the GPU
# machine's 16 cores before timing anything: at about 0.4 s a variant and architecture (the AOT
# build here, one core), 200 take ~80 s of CPU, about 6 s there, and CI's AOT build (sm_80 and
# sm_90, 2 cores) about 3 minutes. A change that needs more should first find which variants
# its sizes add (``python -m benchmarks.workloads``).
VARIANT_CAP = 200

# Per kernel module: the kernel checks, then the benchmarks' target shapes.
WORKLOADS = {
    "dino": lambda device: (kernel_checks.dino_family(device), _dino_targets(device), _dinov3_step_targets(device)),
    "ema": lambda device: (kernel_checks.ema(device), _ema_targets(device)),
    "snn": lambda device: (kernel_checks.paws(device), _paws_targets(device)),
    "gram": lambda device: (kernel_checks.gram(device), _gram_targets(device)),
    "koleo": lambda device: (kernel_checks.koleo(device), _koleo_targets(device)),
}


def record(device: torch.device, modules=tuple(WORKLOADS)) -> list[dict]:
    """The unique launches of ``modules``' workloads on ``device`` (in the order first made)."""
    from fastssl.kernels._launch import record_launches

    unique = {}
    with record_launches() as launches:
        for name in modules:
            WORKLOADS[name](device)
    for launch in launches:
        unique.setdefault(json.dumps(launch, sort_keys=True), launch)
    return list(unique.values())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--modules", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    parser.add_argument("--json", help="write the launches here")
    args = parser.parse_args(argv)
    launches = record(torch.device(args.device), args.modules)
    for kernel, n in collections.Counter(f"{x['module']}.{x['kernel']}" for x in launches).items():
        print(f"{n:4d}  {kernel}")
    print(f"{len(launches):4d}  variants in all")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(launches, f)


if __name__ == "__main__":
    main()
