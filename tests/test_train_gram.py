"""``fastssl-train dinov3 --gram-use-loss`` (DINOv3's Gram anchoring): the Gram teacher takes the EMA teacher's
weights at exactly the configured iterations; the Gram term is the authors' GramLoss on the same features
(against its float64 transcription, the weight included); the weight schedule; bad values are refused by name;
a run stopped and resumed across a refresh is bitwise the straight run; the preset."""

from __future__ import annotations

import pytest
import torch
from test_train import write_folder
from test_train_dinov3 import TINY, cfg_for, read_log

from fastssl.reference.dinov3 import gram_loss as reference_gram_loss
from fastssl.train import checkpoint as ckpt
from fastssl.train import dinov3 as trainer
from fastssl.train.cli import main, parse_args
from fastssl.train.dinov3 import Dinov3Loss, train_dinov3
from fastssl.train.gram_anchor import GramRefresh, GramTeacher

# 8 iterations (epochs of 4, 2 epochs): loaded before iteration 1; replaced after iterations it with it + 1 >= 3
# and it + 1 even, at most twice: after 3 and 5 (not after 7).
GRAM = ("--official-epoch-length", "4", "--gram-use-loss", "--gram-it-load-ema-teacher", "1",
        "--gram-update-frequency", "2", "--gram-it-first-update", "3", "--gram-max-updates", "2",
        "--gram-loss-weight", "0.5")


@pytest.fixture
def folder(tmp_path):
    return write_folder(tmp_path / "data")  # 24 images: 3 iterations of 8 per data pass


def test_the_gram_teacher_refreshes_at_the_configured_iterations(folder, tmp_path, monkeypatch):
    """At each iteration's Gram forward, whether the Gram teacher's weights are the EMA teacher's (which moves
    every step, momentum 0.9): exactly after the load (iteration 1) and after each replacement (after 3 and 5)."""
    seen: list[tuple[int, bool]] = []

    class Watched(GramTeacher):
        def __init__(self, backbone):
            super().__init__(backbone)
            self.source = [backbone]  # the live EMA teacher's backbone, not a submodule

        def patch_features(self, images, grid, mode="bicubic", antialias=False):
            ema = self.source[0].state_dict()
            same = all(torch.equal(t, ema[name]) for name, t in self.backbone.state_dict().items())
            seen.append((len(seen), same))
            return super().patch_features(images, grid, mode, antialias)

    monkeypatch.setattr(trainer, "GramTeacher", Watched)
    train_dinov3(cfg_for(folder, tmp_path / "a", *GRAM))
    assert [it for it, same in enumerate(s for _, s in seen) if same] == [0, 3, 5]  # iterations 1, 4, 6
    assert len(seen) == 7  # a Gram term from iteration 1 (the load) to 7
    refresh = GramRefresh(1, True, 2, 3, 2)
    assert [it for it in range(8) if refresh.loads_before(it)] == [1]
    assert [it for it in range(8) if refresh.updates_after(it, refresh.updates_before(it))] == [3, 5]
    state = ckpt.load_checkpoint(tmp_path / "a" / "checkpoint.pth")
    assert state["gram_updates"] == 2
    rows = [r for r in read_log(tmp_path / "a") if "loss" in r]
    assert rows[0]["gram_loss"] == 0.0 and all(r["gram_loss"] > 0.0 for r in rows[1:])


@pytest.mark.parametrize("options", [
    (),
    ("--gram-img-level", "true", "--gram-remove-neg", "true"),
    ("--gram-tokens-used", "masked", "--gram-remove-only-teacher-neg", "true", "--gram-normalized", "false"),
    ("--gram-tokens-used", "unmasked"),
])
def test_the_gram_term_is_the_authors_gram_loss(folder, tmp_path, options):
    cfg = cfg_for(folder, tmp_path / "a", *GRAM, *options)
    losses = Dinov3Loss(cfg)
    g = torch.Generator().manual_seed(0)
    student = torch.randn(4, 16, 32, generator=g, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(4, 16, 32, generator=g, dtype=torch.float64)
    masks = torch.rand(4, 16, generator=g) < 0.4
    term, loss = losses.gram(student, teacher, masks)
    keep = {"all": slice(None), "masked": masks, "unmasked": ~masks}[cfg.gram_tokens_used]
    expected = reference_gram_loss(student[keep], teacher[keep], img_level=cfg.gram_img_level,
                                   apply_norm=cfg.gram_normalized, remove_neg=cfg.gram_remove_neg,
                                   remove_only_teacher_neg=cfg.gram_remove_only_teacher_neg)
    # The fused loss computes in fp32 (about 1e-7 relative to float64), the reference in float64.
    expected_value = float(expected.detach())
    assert expected.dtype == torch.float64 and expected_value > 0
    assert abs(float(term.detach()) - 0.5 * expected_value) <= 2e-6 * 0.5 * expected_value
    assert abs(float(loss.detach()) - expected_value) <= 2e-6 * expected_value
    (grad,) = torch.autograd.grad(term, student)
    (expected_grad,) = torch.autograd.grad(0.5 * expected, student)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-6 * float(expected_grad.abs().max()))


def test_the_loss_weight_schedule_is_the_authors(folder, tmp_path):
    """--gram-loss-weight-schedule: each iteration's logged weight is linear_warmup_cosine_decay's (epochs of 4
    iterations: 4 of warm-up 0 -> 1, a cosine 1 -> 3 over the rest), the constant weight otherwise."""
    from fastssl.train.gram_anchor import linear_warmup_cosine_decay

    train_dinov3(cfg_for(folder, tmp_path / "a", *GRAM, "--gram-loss-weight-schedule", "--gram-loss-weight-start",
                         "0", "--gram-loss-weight-peak", "1", "--gram-loss-weight-end", "3",
                         "--gram-loss-weight-warmup-epochs", "1"))
    weights = [r["gram_loss_weight"] for r in read_log(tmp_path / "a") if "loss" in r]
    expected = linear_warmup_cosine_decay(0.0, 1.0, 3.0, 4, 8).tolist()
    assert weights == pytest.approx(expected, rel=1e-12) and weights[4] == 1.0 and weights[-1] == 3.0
    train_dinov3(cfg_for(folder, tmp_path / "b", *GRAM))
    assert {r["gram_loss_weight"] for r in read_log(tmp_path / "b") if "loss" in r} == {0.5}


def test_the_gram_preset_is_derived():
    base = parse_args(["dinov3", "--data", "x", "--preset", "dinov3_digits"])
    gram = parse_args(["dinov3", "--data", "x", "--preset", "dinov3_digits_gram"])
    differ = {f for f in base.to_dict() if base.to_dict()[f] != gram.to_dict()[f]}
    assert differ == {"preset", "output_dir"} | {f for f in differ if f.startswith("gram_")}
    assert gram.gram_use_loss and gram.gram_it_load_ema_teacher >= 0
    gram.validate()


BAD = [
    (["--gram-use-loss"], "--gram-it-load-ema-teacher must be >= 0 with --gram-use-loss"),
    (["--gram-it-load-ema-teacher", "-2"], "--gram-it-load-ema-teacher must be >= -1, got -2"),
    (["--gram-use-loss", "--gram-it-load-ema-teacher", "0", "--fsdp", "--precision", "bf16"],
     "--fsdp is not supported with --gram-use-loss yet"),
    (["--gram-tokens-used", "masked", "--gram-img-level", "true"],
     "--gram-tokens-used masked or unmasked needs --gram-img-level false, got masked"),
    (["--gram-remove-neg", "true", "--gram-remove-only-teacher-neg", "true"],
     "--gram-remove-only-teacher-neg and --gram-remove-neg exclude each other"),
    (["--gram-update-frequency", "0"], "--gram-update-frequency must be >= 1, got 0"),
    (["--gram-it-first-update", "-1"], "--gram-it-first-update must be >= 0, got -1"),
    (["--gram-max-updates", "-1"], "--gram-max-updates must be >= 0, got -1"),
    (["--gram-loss-weight", "-1"], "--gram-loss-weight must be >= 0, got -1"),
    (["--gram-loss-weight-schedule", "--gram-loss-weight-warmup-epochs", "2", "--gram-loss-weight-cosine-epochs", "1"],
     "--gram-loss-weight-warmup-epochs and --gram-loss-weight-cosine-epochs must fit in --epochs 2, got 2"),
    (["--gram-loss-weight-end", "-1"], "--gram-loss-weight-end must be >= 0, got -1"),
]


@pytest.mark.parametrize("bad,message", BAD, ids=[" ".join(b) for b, _ in BAD])
def test_a_bad_gram_option_is_refused_by_name(tmp_path, monkeypatch, capsys, bad, message):
    data = write_folder(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    assert main(["dinov3", "--data", str(data), "--output-dir", str(tmp_path / "out"), *TINY, *bad]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"fastssl-train dinov3: error: {message}"), err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # no file, no folder


def test_a_bad_choice_is_refused_by_argparse(capsys):
    for flag in ("--gram-tokens-used", "--gram-global-teacher-resize-method"):
        with pytest.raises(SystemExit) as exit_:
            parse_args(["dinov3", "--data", "x", flag, "nonesuch"])
        assert exit_.value.code == 2
        assert f"argument {flag}: " in capsys.readouterr().err


@pytest.mark.parametrize("stop_at,extra", [(1, ()), (4, ()), (4, ("--gram-teacher-crops-size", "32"))])
def test_resume_across_a_refresh_is_exact(folder, tmp_path, stop_at, extra):
    """Stopped before the load (1) or after the first replacement (4), resumed to the end (a replacement after
    iteration 5 still to come): bitwise the straight run, the Gram teacher and its count included; with the Gram
    teacher's own crops too (32 pixels: its 8 x 8 patch grid resized to the student's 4 x 4)."""
    straight = train_dinov3(cfg_for(folder, tmp_path / "a", *GRAM, *extra))
    first = train_dinov3(cfg_for(folder, tmp_path / "b", *GRAM, *extra, "--stop-after-steps", str(stop_at)))
    assert first.stopped_early and first.step == stop_at
    stopped = ckpt.load_checkpoint(tmp_path / "b" / "checkpoint.pth")
    assert stopped["gram_updates"] == (stop_at == 4)
    second = train_dinov3(cfg_for(folder, tmp_path / "b", *GRAM, *extra))
    assert not second.stopped_early and second.step == straight.step == 8
    a = ckpt.load_checkpoint(tmp_path / "a" / "checkpoint.pth")
    b = ckpt.load_checkpoint(tmp_path / "b" / "checkpoint.pth")
    assert a["gram_updates"] == b["gram_updates"] == 2
    for key in ("student", "teacher", "gram_teacher", "losses"):
        assert a[key].keys() == b[key].keys()
        for name, t in a[key].items():
            assert torch.equal(t, b[key][name]), f"{key}.{name} differs after resume"
    rows = {r["step"]: r["gram_loss"] for r in read_log(tmp_path / "b") if "loss" in r}
    assert rows == {r["step"]: r["gram_loss"] for r in read_log(tmp_path / "a") if "loss" in r}


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_gram_teacher_crops_are_the_global_boxes_at_their_size(tmp_path, device):
    """Without colour distortions, the Gram crops at the global size are the global crops; at another size, the
    same boxes and flips resized (against MultiCrop making them directly, normalised)."""
    from fastssl.augment.multicrop import IMAGENET_MEAN, IMAGENET_STD, CropParams, MultiCrop
    from fastssl.train.dinov3 import build_dinov3_augment, gram_teacher_crops

    cfg = cfg_for(tmp_path, tmp_path / "a", "--color-jitter-p", "0", "--grayscale-p", "0", "--global-blur-p", "0",
                  "0", "--solarize-p", "0", "--flip-p", "0.5")
    augment = build_dinov3_augment(cfg)
    g = torch.Generator(device=device).manual_seed(0)
    images = torch.rand(3, 3, 40, 36, generator=g, device=device)
    crops, _, drawn = augment(images, generator=g, return_params=True)
    torch.testing.assert_close(gram_teacher_crops(augment, images, drawn.crops, 16), crops, rtol=0, atol=1e-6)
    big = gram_teacher_crops(augment, images, drawn.crops, 32)
    assert big.shape == (6, 3, 32, 32)
    direct = MultiCrop(32, 8, 2, 0, mean=IMAGENET_MEAN, std=IMAGENET_STD).apply(
        images.clamp(0, 1), CropParams(drawn.crops.global_boxes, drawn.crops.global_flips,
                                       drawn.crops.local_boxes[:0], drawn.crops.local_flips[:0]))[0]
    assert drawn.crops.global_flips.any() and not drawn.crops.global_flips.all()
    # MultiCrop normalises before any clipping; inside [0, 1] (the bicubic overshoot aside) the two agree.
    inside = (direct * torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
              + torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)).clamp(0, 1)
    torch.testing.assert_close(big, (inside - torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1))
                               / torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1), rtol=0, atol=1e-5)


def test_torchrun_resume_across_a_refresh_is_exact(folder, tmp_path):
    # DDP on 2 gloo processes with the Gram term (each rank's Gram teacher replaced alike, its loss on its own
    # rows): stopped at step 4 (after the first replacement) and resumed to the end, bitwise the straight run.
    from helpers import torchrun

    def run(out, stop):
        torchrun("dinov3", "--data", str(folder), "--output-dir", str(out), *TINY, *GRAM,
                 "--batch-size-per-gpu", "4", "--stop-after-steps", str(stop))
        return ckpt.load_checkpoint(out / "checkpoint.pth")

    straight = run(tmp_path / "a", 7)
    run(tmp_path / "b", 4)
    resumed = run(tmp_path / "b", 3)
    assert straight["gram_updates"] == resumed["gram_updates"] == 2
    for key in ("student", "teacher", "gram_teacher", "losses"):
        for name, t in straight[key].items():
            assert torch.equal(t, resumed[key][name]), f"{key}.{name} differs after resume"
    rows = [r for r in read_log(tmp_path / "b") if "loss" in r]
    assert [r["step"] for r in rows] == list(range(7)) and all(r["gram_loss"] > 0.0 for r in rows[1:])
