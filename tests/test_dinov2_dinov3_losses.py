"""fastssl.dinov2 / fastssl.dinov3 drop-ins against the authors' definitions in float64: the
CLS loss over lists of crops, the iBOT masked-patch loss, their centers and teacher targets."""

from __future__ import annotations

import pytest
import torch
from helpers import DEVICE, assert_rel_close

from fastssl import dinov2, dinov3
from fastssl.reference import dinov2 as ref


def _loss_fns(namespace, cls, backend, K, **kwargs):
    loss_fn = getattr(namespace, cls)(K, backend=backend, **kwargs).to(DEVICE)
    if namespace is dinov3:
        assert torch.isnan(loss_fn.center).all(), "DINOv3's center is NaN until init_weights()"
        loss_fn.init_weights()
    assert torch.equal(loss_fn.center, torch.zeros_like(loss_fn.center))
    return loss_fn


def _grad(loss, x):
    (g,) = torch.autograd.grad(loss, x)
    return g


# ----------------------------------------------------------------------------- CLS loss

@pytest.mark.parametrize("S,T,diagonal", [(8, 2, False), (2, 2, True), (1, 1, False), (5, 3, True), (3, 12, True)])
def test_dinov3_forward_is_the_mean_over_pairs(backend, S, T, diagonal):
    B, K = 3, 257
    loss_fn = _loss_fns(dinov3, "DINOLoss", backend, K)
    student = torch.randn(S, B, K, device=DEVICE, requires_grad=True)
    x = torch.randn(T * B, K, device=DEVICE)
    probs = loss_fn.sinkhorn_knopp_teacher(x, teacher_temp=0.07).view(T, B, K)
    assert_rel_close(probs, ref.sinkhorn_knopp(x.double(), 0.07).view(T, B, K), 1e-5, "Sinkhorn-Knopp targets")
    loss = loss_fn(student, probs, ignore_diagonal=diagonal)
    s64 = student.detach().double().requires_grad_()
    expected = ref.cross_entropy_over_pairs(s64, probs.double(), 0.1, diagonal, "mean")
    assert_rel_close(loss, expected, 1e-5, "loss")
    assert_rel_close(_grad(loss, student), _grad(expected, s64), 1e-5, "gradient")
    # The fused targets give the same loss without the [T, B, K] probabilities.
    targets = loss_fn.teacher_targets(x, teacher_temp=0.07)
    fused = loss_fn(student, targets, ignore_diagonal=diagonal)
    assert_rel_close(fused, expected, 1e-5, "loss from fused targets")


def test_dinov2_forward_sums_the_batch_means_over_pairs(backend):
    B, K = 4, 300
    loss_fn = _loss_fns(dinov2, "DINOLoss", backend, K)
    students = list(torch.randn(6, B, K, device=DEVICE).requires_grad_().unbind(0))
    x = torch.randn(2 * B, K, device=DEVICE)
    teacher = loss_fn.softmax_center_teacher(x, teacher_temp=0.04).view(2, B, K)
    loss = loss_fn(students, teacher)
    expected = ref.cross_entropy_over_pairs(torch.stack(students).double(), teacher.double(), 0.1,
                                            reduction="sum_of_batch_means")
    assert_rel_close(loss, expected, 1e-5, "local crops' loss")
    # The authors' global term: the student's 2B global rows against the teacher's, swapped.
    glob = torch.randn(2 * B, K, device=DEVICE)
    swapped = torch.cat([teacher[1], teacher[0]])
    expected = ref.cross_entropy_over_pairs(glob.double()[None], swapped.double()[None], 0.1,
                                            reduction="sum_of_batch_means")
    assert_rel_close(loss_fn([glob], [swapped]), expected, 1e-5, "global crops' loss")


@pytest.mark.parametrize("namespace", [dinov2, dinov3], ids=["dinov2", "dinov3"])
def test_softmax_centering_over_steps(backend, namespace):
    # The authors' order: softmax_center_teacher (applies the pending update), then update_center
    # (queues this batch's); the fused teacher_targets(centering="softmax") does both in one pass.
    B, K = 3, 130
    drop_in = _loss_fns(namespace, "DINOLoss", backend, K, center_momentum=0.8)
    fused = _loss_fns(namespace, "DINOLoss", backend, K, center_momentum=0.8)
    reference = ref.CenteredTeacher(torch.zeros(1, K, dtype=torch.float64), momentum=0.8)
    for step in range(4):
        x = torch.randn(2 * B, K, device=DEVICE) * 2 + step
        probs = drop_in.softmax_center_teacher(x, 0.05)
        drop_in.update_center(x)
        targets = fused.teacher_targets(x, 0.05, centering="softmax")
        expected = ref.softmax_center(x.double(), reference.apply(), 0.05)
        reference.update_center(x.double())
        assert_rel_close(probs, expected, 1e-5, f"drop-in targets, step {step}")
        assert_rel_close(targets.probs(), expected, 1e-5, f"fused targets, step {step}")
    drop_in.apply_center_update()
    fused.apply_center_update()
    assert_rel_close(drop_in.center, reference.apply(), 1e-6, "center")
    assert_rel_close(fused.center, reference.center, 1e-6, "fused center")


def test_center_update_waits_for_the_next_call(backend):
    loss_fn = _loss_fns(dinov3, "DINOLoss", backend, 16)
    loss_fn.update_center(torch.ones(4, 16, device=DEVICE))
    assert torch.equal(loss_fn.center, torch.zeros(1, 16, device=DEVICE))
    loss_fn.softmax_center_teacher(torch.randn(4, 16, device=DEVICE), 0.1, update_centers=False)
    assert torch.equal(loss_fn.center, torch.zeros(1, 16, device=DEVICE))
    loss_fn.softmax_center_teacher(torch.randn(4, 16, device=DEVICE), 0.1)
    assert_rel_close(loss_fn.center, torch.full((1, 16), 0.1), 1e-7, "center after the update")


# ----------------------------------------------------------------------------- iBOT

def _masks(B, N):
    masks = torch.rand(B, N, device=DEVICE) < 0.4
    masks[0] = False  # an image without a masked patch
    masks[1] = True   # and one all masked
    return masks


@pytest.mark.parametrize("namespace", [dinov2, dinov3], ids=["dinov2", "dinov3"])
def test_ibot_forward_masked(backend, namespace):
    B, N, K = 5, 49, 300
    loss_fn = _loss_fns(namespace, "iBOTPatchLoss", backend, K)
    masks = _masks(B, N)
    n = int(masks.sum())
    x = torch.randn(n, K, device=DEVICE)
    q = loss_fn.sinkhorn_knopp_teacher(x, 0.07, torch.tensor(n, device=DEVICE))
    assert_rel_close(q, ref.sinkhorn_knopp(x.double(), 0.07), 1e-5, "Sinkhorn-Knopp targets")
    student = torch.randn(n, K, device=DEVICE, requires_grad=True)
    s64 = student.detach().double().requires_grad_()
    # Default weights (1 / masked patches of the image), all rows.
    loss = loss_fn.forward_masked(student, q, masks)
    expected = ref.ibot_loss_masked(s64, q.double(), masks, 0.1)
    assert_rel_close(loss, expected, 1e-5, "loss")
    assert_rel_close(_grad(loss, student), _grad(expected, s64), 1e-5, "gradient")
    # The first rows only, with given weights, as the authors' trainer calls it.
    weights = torch.rand(n - 7, device=DEVICE)
    loss = loss_fn.forward_masked(student, q, masks, n_masked_patches=n - 7, masks_weight=weights)
    expected = ref.ibot_loss_masked(s64, q.double(), masks, 0.1, n - 7, weights.double())
    assert_rel_close(loss, expected, 1e-5, "loss of the first rows")
    # Fused targets in place of the probabilities.
    targets = loss_fn.teacher_targets(x, 0.07)
    assert_rel_close(loss_fn.forward_masked(student, targets, masks, n_masked_patches=n - 7, masks_weight=weights),
                     expected, 1e-5, "loss from fused targets")


@pytest.mark.parametrize("namespace", [dinov2, dinov3], ids=["dinov2", "dinov3"])
def test_ibot_forward_dense(backend, namespace):
    B, N, K = 4, 20, 100
    loss_fn = _loss_fns(namespace, "iBOTPatchLoss", backend, K)
    masks = _masks(B, N)
    student = torch.randn(B, N, K, device=DEVICE, requires_grad=True)
    teacher = loss_fn.softmax_center_teacher(torch.randn(B, N, K, device=DEVICE), 0.07)
    loss = loss_fn(student, teacher, masks)
    s64 = student.detach().double().requires_grad_()
    expected = ref.ibot_loss_dense(s64, teacher.double(), masks, 0.1)
    assert_rel_close(loss, expected, 1e-5, "loss")
    assert_rel_close(_grad(loss, student), _grad(expected, s64), 1e-5, "gradient")


def test_ibot_center_from_masked_rows(backend):
    # The authors pass the masked rows as [1, n, K]: the center moves to their mean.
    loss_fn = _loss_fns(dinov3, "iBOTPatchLoss", backend, 8)
    rows = torch.randn(1, 30, 8, device=DEVICE)
    loss_fn.update_center(rows)
    loss_fn.apply_center_update()
    assert loss_fn.center.shape == (1, 1, 8)
    assert_rel_close(loss_fn.center, 0.1 * rows.double().mean(1, keepdim=True), 1e-6, "center")
    # The fused path queues the same update from its own pass over the rows.
    fused = _loss_fns(dinov3, "iBOTPatchLoss", backend, 8)
    fused.teacher_targets(rows[0], 0.07, centering="softmax")
    fused.apply_center_update()
    assert_rel_close(fused.center, loss_fn.center, 1e-6, "fused center")


def test_ibot_sinkhorn_module_without_process_group(backend):
    # The authors' SinkhornKnoppTeacher all-reduces its sample count unconditionally; this one
    # needs no process group.
    loss_fn = _loss_fns(dinov3, "iBOTPatchLoss", backend, 64)
    assert isinstance(loss_fn.sinkhorn_knopp_teacher, dinov3.SinkhornKnoppTeacher)
    x = torch.randn(23, 64, device=DEVICE)
    q = loss_fn.sinkhorn_knopp_teacher(x, teacher_temp=0.07, n_masked_patches_tensor=torch.tensor(23))
    assert_rel_close(q, ref.sinkhorn_knopp(x.double(), 0.07), 1e-5, "probabilities")


def test_ibot_without_masked_patches(backend):
    loss_fn = _loss_fns(dinov3, "iBOTPatchLoss", backend, 32)
    masks = torch.zeros(2, 9, dtype=torch.bool, device=DEVICE)
    student = torch.randn(0, 32, device=DEVICE, requires_grad=True)
    loss = loss_fn.forward_masked(student, torch.empty(0, 32, device=DEVICE), masks)
    loss.backward()
    assert loss.item() == 0.0


# ----------------------------------------------------------------------------- state, errors, compile

def test_state_dicts_load_the_authors_keys():
    class Meta(torch.nn.Module):
        def __init__(self, ns):
            super().__init__()
            self.dino_loss = ns.DINOLoss(40)
            self.ibot_patch_loss = ns.iBOTPatchLoss(30)

    for ns in (dinov2, dinov3):
        model = Meta(ns)
        assert sorted(model.state_dict()) == ["dino_loss.center", "ibot_patch_loss.center"]
        theirs = {"dino_loss.center": torch.randn(1, 40), "ibot_patch_loss.center": torch.randn(1, 1, 30)}
        model.load_state_dict(theirs)
        assert torch.equal(model.dino_loss.center, theirs["dino_loss.center"])
        assert torch.equal(model.ibot_patch_loss.center, theirs["ibot_patch_loss.center"])


BAD = [
    (lambda f, i: f(torch.randn(6, 40), torch.rand(2, 3, 40)), "student_logits must be \\[student crops, B, K\\]"),
    (lambda f, i: f.update_center(torch.randn(2, 3, 40)), "teacher_output must be \\[rows, K\\]"),
    (lambda f, i: f.teacher_targets(torch.randn(4, 40), 0.1, centering="mean"), "centering must be one of"),
    (lambda f, i: i.forward_masked(torch.randn(5, 30), torch.rand(5, 30), torch.ones(2, 3)),
     "student_masks_flat must be a boolean"),
    (lambda f, i: i.forward_masked(torch.randn(5, 30), torch.rand(4, 30), torch.ones(2, 3, dtype=torch.bool)),
     "must have the student's 5 rows"),
    (lambda f, i: i.forward_masked(torch.randn(5, 30), torch.rand(5, 30), torch.ones(2, 3, dtype=torch.bool),
                                   n_masked_patches=6), "n_masked_patches=6 must lie in \\[0, 5\\]"),
    (lambda f, i: i.forward_masked(torch.randn(5, 30), torch.rand(5, 30), torch.ones(2, 3, dtype=torch.bool),
                                   masks_weight=torch.ones(4)), "masks_weight must hold one weight per counted row"),
    (lambda f, i: i.update_center(torch.randn(5, 30)), "must be \\[1, n, K\\]"),
]


@pytest.mark.parametrize("call,message", BAD)
def test_bad_inputs_name_the_problem(call, message):
    with pytest.raises(ValueError, match=message):
        call(dinov3.DINOLoss(40), dinov3.iBOTPatchLoss(30))


@pytest.mark.parametrize("cls", [dinov2.DINOLoss, dinov3.DINOLoss, dinov2.iBOTPatchLoss, dinov3.iBOTPatchLoss])
def test_constructor_checks(cls):
    for kwargs, message in [(dict(student_temp=0.0), "student_temp"), (dict(center_momentum=2.0), "center_momentum"),
                            (dict(backend="cuda"), "backend must be one of")]:
        with pytest.raises(ValueError, match=message):
            cls(10, **kwargs)
    with pytest.raises(ValueError, match="out_dim must be a positive integer"):
        cls(0)


def test_torch_compile_fullgraph(backend):
    torch._dynamo.reset()
    B, K = 2, 64
    loss_fn = _loss_fns(dinov3, "DINOLoss", backend, K)
    head = torch.nn.Linear(16, K).to(DEVICE)

    def step(x_s, probs):
        return loss_fn(head(x_s), probs, ignore_diagonal=True)

    compiled = torch.compile(step, fullgraph=True)
    x_s = torch.randn(4, B, 16, device=DEVICE)
    probs = torch.softmax(torch.randn(2, B, K, device=DEVICE), -1)
    eager = step(x_s, probs)
    comp = compiled(x_s, probs)
    assert_rel_close(comp, eager, 1e-5, "compiled loss")
    assert_rel_close(torch.autograd.grad(comp, head.weight)[0], torch.autograd.grad(eager, head.weight)[0], 1e-4,
                     "compiled gradient")


@pytest.mark.parametrize("S,T,diagonal", [(8, 2, False), (2, 2, True), (3, 5, True)])
def test_einsum_baseline_is_the_pairwise_definition(S, T, diagonal):
    # The benchmarks' baseline (the authors' einsum form, fp32) against the pair-by-pair reference.
    student = torch.randn(S, 3, 50, dtype=torch.float64)
    probs = torch.softmax(torch.randn(T, 3, 50, dtype=torch.float64), -1)
    expected = ref.cross_entropy_over_pairs(student, probs, 0.1, diagonal)
    assert_rel_close(ref.cross_entropy_over_pairs_einsum(student, probs.float(), 0.1, diagonal), expected, 1e-6,
                     "einsum form")
