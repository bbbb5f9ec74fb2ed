"""The PAWS trainer (fastssl-train paws): LARS against its definition, the labelled subset, the support
labels' order, a few steps on tiny images, exact resume, bad data, the authors' checkpoint layout, and
a 2-process gloo run under torchrun."""

from __future__ import annotations

import math
import os

import pytest
import torch
from test_train import read_log, torchrun, write_folder

from fastssl import ClassStratifiedSampler
from fastssl.train import checkpoint as ckpt
from fastssl.train.cli import parse_args
from fastssl.train.data import DataError, ImageFolder, labelled_subset
from fastssl.train.errors import ConfigError
from fastssl.train.optim import Lars
from fastssl.train.paws import (
    PawsConfig,
    build_paws_augment,
    build_paws_model,
    paws_state_from_authors,
    train_paws,
)

TINY = ["--arch", "vit_pico", "--img-size", "16", "--global-crop-size", "16", "--local-crop-size", "8",
        "--multicrop", "2", "--output-dim", "32", "--hidden-dim", "32", "--batch-size-per-gpu", "8",
        "--classes-per-batch", "2", "--supervised-imgs-per-class", "2", "--labels-per-class", "3", "--epochs", "2",
        "--warmup-epochs", "1", "--lr", "3.2", "--start-lr", "0.8", "--final-lr", "0.032", "--num-workers", "0",
        "--progress", "false", "--log-freq", "1", "--saveckp-freq", "0", "--device", "cpu",
        "--blur-sigma", "0.1", "0.5", "--eval-crop-fraction", "1.0"]


@pytest.fixture
def folders(tmp_path):
    return write_folder(tmp_path / "train", 10, classes=4), write_folder(tmp_path / "val", 3, classes=4)


def cfg_for(data, out, *extra) -> PawsConfig:
    train, val = data
    return parse_args(["paws", "--data", str(train), "--val-data", str(val), "--output-dir", str(out), *TINY,
                            *extra])


# ----------------------------------------------------------------------------- LARS

def lars_reference(steps, params, lrs, wd, momentum, trust, nesterov, excluded):
    """The PAWS authors' LARS + SGD, in float64, one parameter at a time (see fastssl/train/optim.py)."""
    params = [p.double().clone() for p in params]
    bufs = [None] * len(params)
    for grads, lr in zip(steps, lrs, strict=True):
        for k, (p, g) in enumerate(zip(params, grads, strict=True)):
            g = g.double()
            if excluded[k]:
                d = g.clone()  # their excluded group has weight decay 0
            else:
                pn, gn = p.norm(), g.norm()
                if pn != 0 and gn != 0:
                    ratio = trust * pn / (gn + pn * wd + 1e-8)
                    d = (g + wd * p) * ratio
                else:
                    d = g.clone()
            d = -lr * d
            bufs[k] = d.clone() if bufs[k] is None else momentum * bufs[k] + d
            p += d + momentum * bufs[k] if nesterov else bufs[k]
    return params


@pytest.mark.parametrize("nesterov", [False, True])
def test_lars_matches_the_authors_definition(nesterov):
    shapes = [(7, 5), (13,), (3, 4, 2), (6,)]
    excluded = [False, True, False, False]
    params = [torch.randn(s) for s in shapes]
    params[3].zero_()  # a zero weight: no adaptation, no decay
    steps = [[torch.randn(s) for s in shapes] for _ in range(4)]
    lrs = [0.5, 1.3, 0.2, 0.9]  # a schedule: where the authors' momentum form differs from torch's SGD
    ps = [torch.nn.Parameter(p.clone()) for p in params]
    opt = Lars([{"params": [ps[0], ps[2], ps[3]]}, {"params": [ps[1]], "lars_exclude": True, "weight_decay": 0.0}],
               lr=0.0, momentum=0.9, weight_decay=1e-2, nesterov=nesterov, trust_coefficient=0.01)
    order = [0, 2, 3, 1]
    for grads, lr in zip(steps, lrs, strict=True):
        for k in order:
            ps[k].grad = grads[k].clone()
        for group in opt.param_groups:
            group["lr"] = lr
        opt.step()
    want = lars_reference(steps, params, lrs, 1e-2, 0.9, 0.01, nesterov, excluded)
    for got, ref in zip(ps, want, strict=True):
        torch.testing.assert_close(got.detach().double(), ref, rtol=1e-5, atol=1e-6)


def test_lars_excluded_group_keeps_sgds_weight_decay_and_the_trainer_excludes_1d_params(folders, tmp_path):
    p = torch.nn.Parameter(torch.ones(3))
    opt = Lars([{"params": [p], "lars_exclude": True}], lr=1.0, momentum=0.0, weight_decay=0.5)
    p.grad = torch.zeros(3)
    opt.step()  # plain SGD decay, no trust ratio: 1 - lr * wd
    torch.testing.assert_close(p.detach(), torch.full((3,), 0.5))

    from fastssl.train.runtime import param_groups

    model = build_paws_model(cfg_for(folders, tmp_path))
    groups = param_groups(model)
    names = {id(q): n for n, q in model.named_parameters()}
    assert all(q.ndim > 1 for q in groups[0]["params"])  # decayed and LARS-adapted: weights only
    assert {names[id(q)] for q in groups[1]["params"]} >= {"fc.bn1.weight", "fc.fc1.bias", "pred.bn1.bias"}
    assert groups[1]["weight_decay"] == 0.0


def test_lars_bad_arguments():
    p = [torch.nn.Parameter(torch.ones(2))]
    with pytest.raises(ValueError, match="nesterov needs momentum"):
        Lars(p, lr=0.1, momentum=0.0, nesterov=True)
    with pytest.raises(ValueError, match="trust_coefficient"):
        Lars(p, lr=0.1, trust_coefficient=0.0)


# ----------------------------------------------------------------------------- labelled data

def test_labelled_subset_from_names_and_per_class(folders, tmp_path):
    train, _ = folders
    ds = ImageFolder(train)
    names = tmp_path / "names.txt"
    names.write_text("# the 10% split\n001.png\nclass1/002.png\n\n")  # a bare name matches the first class's file
    sub = labelled_subset(ds, names_file=names)
    files = [ds.samples[i][0] for i in sub.indices]
    assert [os.path.relpath(f, train) for f in files] == ["class0/001.png", "class1/002.png"]
    assert sub.targets == [0, 1] and sub.classes == ds.classes
    image, label, index = sub[1]
    assert label == 1 and index == 1 and image.dtype == torch.uint8

    per = labelled_subset(ds, per_class=3, seed=5)
    assert sorted(torch.bincount(torch.tensor(per.targets)).tolist()) == [3, 3, 3, 3]
    assert per.indices == labelled_subset(ds, per_class=3, seed=5).indices  # seeded

    names.write_text("001.png\nnope.png\n")
    with pytest.raises(DataError, match="1 of the 2 images named .* are not in"):
        labelled_subset(ds, names_file=names)
    with pytest.raises(DataError, match="does not exist"):
        labelled_subset(ds, names_file=tmp_path / "missing.txt")
    with pytest.raises(DataError, match="fewer than the 11"):
        labelled_subset(ds, per_class=11)
    with pytest.raises(DataError, match="not both"):
        labelled_subset(ds, names_file=names, per_class=2)


@pytest.mark.parametrize("unique", [True, False])
def test_support_labels_follow_the_gathered_multi_view_order(unique):
    """The slots given to the loss, against the class ids the sampler drew: supports laid out as the
    trainer lays them out (each rank's batch, view-major as DinoAugment returns its crops; ranks
    concatenated as the loss all-gathers them) share a slot exactly when they share a class."""
    targets = torch.arange(12).repeat(5)
    world, views, cpb, spc = 3, 2, 4, 2
    samplers = [ClassStratifiedSampler(targets, cpb, spc, world_size=world, rank=r, unique_classes=unique, seed=7)
                for r in range(world)]
    classes = []
    for smp in samplers:
        _, ids = next(iter(smp.batches()))
        classes += ids * views  # view-major: view 0 of every support, then view 1
    for smp in samplers:
        slots = smp.labels(gathered=True, views=views).tolist()
        assert len(slots) == len(classes) == world * views * cpb * spc
        by_slot: dict[int, set] = {}
        for slot, c in zip(slots, classes, strict=True):
            by_slot.setdefault(slot, set()).add(c)
        assert all(len(v) == 1 for v in by_slot.values()), by_slot  # one class per slot
        if unique:  # and one slot per class: ranks draw disjoint classes
            assert len({next(iter(v)) for v in by_slot.values()}) == len(by_slot) == world * cpb
        local = smp.labels(views=views).tolist()
        assert local == slots[smp.rank * views * cpb * spc:(smp.rank + 1) * views * cpb * spc]
    with pytest.raises(ValueError, match="views must be positive"):
        samplers[0].labels(views=0)


# ----------------------------------------------------------------------------- training

def test_paws_steps_learn_and_evaluate(tmp_path):
    """Two epochs of the digits preset (real images, 5 labels per class): the cross-entropy and the total
    loss go down, the regulariser stays within its bounds, soft-NN evaluation runs after each epoch."""
    out = tmp_path / "run"
    cfg = parse_args(["paws", "--preset", "paws_digits", "--output-dir", str(out), "--epochs", "2",
                           "--warmup-epochs", "1", "--progress", "false", "--log-freq", "1"])
    result = train_paws(cfg)
    assert result.epoch == 2 and result.step == 2 * 22 and not result.stopped_early
    log = read_log(out)
    steps = [r for r in log if "paws_xent" in r]
    assert len(steps) == 44 and all(math.isfinite(r["loss"]) for r in steps)
    # me-max is minus the entropy of the mean prediction: within [-ln(10 class slots), 0].
    assert all(-math.log(10) - 1e-5 <= r["me_max"] <= 0 for r in steps)

    def mean(key, rows):
        return sum(r[key] for r in rows) / len(rows)

    assert mean("paws_xent", steps[-5:]) < mean("paws_xent", steps[:3]) - 0.2
    assert mean("loss", steps[-5:]) < mean("loss", steps[:3]) - 0.2
    evals = [r for r in log if "snn_top1" in r]
    assert len(evals) == 2 and all(0 <= r["snn_top1"] <= r["snn_top5"] <= 100 for r in evals)
    assert result.snn == {"top1": evals[-1]["snn_top1"], "top5": evals[-1]["snn_top5"]}
    state = ckpt.load_checkpoint(out / "checkpoint.pth")
    assert (state["epoch"], state["step"]) == (2, 0) and state["config"]["supervised_views"] == 2
    # The warm-up starts at start_lr, scaled by the batch (64 / 256), and the schedule is per iteration.
    lrs = [r["lr"] for r in steps]
    assert lrs[0] == pytest.approx(0.8 * 64 / 256) and lrs[21] == pytest.approx(3.2 * 64 / 256)


def test_heads_run_per_resolution_as_the_authors(folders, tmp_path):
    """Backbone and heads once per crop size: the heads' BatchNorms see each resolution's statistics."""
    torch.manual_seed(0)
    model = build_paws_model(cfg_for(folders, tmp_path)).train()
    big, small = torch.randn(6, 3, 16, 16), torch.randn(8, 3, 8, 8)
    h, z = model(big, small)
    h_big = model.fc(model.backbone(big))
    h_small = model.fc(model.backbone(small))
    torch.testing.assert_close(h, torch.cat([h_big, h_small]))
    torch.testing.assert_close(z, torch.cat([model.pred(h_big), model.pred(h_small)]))
    model.eval()
    torch.testing.assert_close(model.embed(big), model.pred(model.fc(model.backbone(big))))  # the eval space: z


def test_paws_augment_is_the_authors_imagenet_pipeline(folders, tmp_path):
    views, supports = build_paws_augment(parse_args(["paws", "--data", "x"]))
    for aug in (views, supports):
        want = {"brightness": (0.2, 1.8), "contrast": (0.2, 1.8), "saturation": (0.2, 1.8), "hue": (-0.2, 0.2)}
        assert {k: pytest.approx(v) for k, v in want.items()} == aug.ranges
        assert (aug.jitter_p, aug.grayscale_p, aug.blur_sigma) == (0.8, 0.2, (0.1, 2.0))
        assert aug.multicrop.interpolation == "bilinear"
    assert views.global_blur_p == (0.5, 0.5) and views.local_blur_p == 0.5
    assert views.global_solarize_p == (0.0, 0.0) and views.local_solarize_p == 0.0
    assert views.multicrop.n_local == 6 and supports.multicrop.n_local == 0 and supports.n_global == 1
    assert views.multicrop.global_scale == (0.14, 1.0) and views.multicrop.local_scale == (0.05, 0.14)
    assert (views.multicrop.global_size, views.multicrop.local_size) == (224, 96)


def test_the_loss_gets_the_authors_rows(folders, tmp_path, monkeypatch):
    """A spy on the model and the loss: anchors are z of the views, supports z of the supports; targets
    are h of the two global views swapped and h of the supports; supports are views x cpb x spc rows."""
    import fastssl.train.paws as paws_mod

    seen = {}
    model_forward = paws_mod.PawsModel.forward

    def spy_forward(self, *crops):
        seen["crops"] = [c.shape[0] for c in crops]
        seen["h"], seen["z"] = out = model_forward(self, *crops)
        return out

    class SpyLoss(paws_mod.PawsLoss):
        def forward(self, *args):
            seen["args"] = [a.detach().clone() for a in args]
            return super().forward(*args)

    monkeypatch.setattr(paws_mod.PawsModel, "forward", spy_forward)
    monkeypatch.setattr(paws_mod, "PawsLoss", SpyLoss)
    train_paws(cfg_for(folders, tmp_path / "r", "--stop-after-steps", "1", "--supervised-views", "2"))
    h, z = seen["h"].detach(), seen["z"].detach()
    anchor_views, anchor_supports, a_labels, target_views, target_supports, t_labels = seen["args"]
    B, ns = 8, 2 * 2 * 2  # batch; views x classes_per_batch x imgs_per_class
    assert seen["crops"] == [ns + 2 * B, 2 * B]  # supports + 2 global views at 16 px, 2 small views at 8 px
    torch.testing.assert_close(anchor_supports, z[:ns])
    torch.testing.assert_close(anchor_views, z[ns:])
    torch.testing.assert_close(target_supports, h[:ns])
    torch.testing.assert_close(target_views, torch.cat([h[ns + B:ns + 2 * B], h[ns:ns + B]]))
    assert a_labels.tolist() == t_labels.tolist() == [0, 1, 0, 1] * 2


@pytest.mark.parametrize("stop_at", [3, 5])  # mid-epoch, and the last step of epoch 1 (its evaluation runs)
def test_paws_resume_is_exact(folders, tmp_path, stop_at):
    extra = ("--epochs", "2", "--drop-path-rate", "0.2")  # drop path: the global RNG must resume too
    straight = train_paws(cfg_for(folders, tmp_path / "a", *extra))
    first = train_paws(cfg_for(folders, tmp_path / "b", *extra, "--stop-after-steps", str(stop_at)))
    assert first.stopped_early and first.step == stop_at
    second = train_paws(cfg_for(folders, tmp_path / "b", *extra))
    assert second.step == straight.step == 10
    a = ckpt.load_checkpoint(tmp_path / "a" / "checkpoint.pth")
    b = ckpt.load_checkpoint(tmp_path / "b" / "checkpoint.pth")
    for name, t in a["model"].items():
        assert torch.equal(t, b["model"][name]), f"{name} differs after resume"
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values(), strict=True):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])
    # Every epoch was evaluated once, whether the run stopped at its end or not; each step and epoch logged once,
    # an epoch's loss over all its steps (the same as the straight run's).
    log_a, log_b = read_log(tmp_path / "a"), read_log(tmp_path / "b")
    assert [r["epoch"] for r in log_b if "snn_top1" in r] == [1, 2]
    assert [r["step"] for r in log_b if "paws_xent" in r] == list(range(10))
    epoch_losses = [[r["epoch_loss"] for r in log if "epoch_loss" in r] for log in (log_a, log_b)]
    assert len(epoch_losses[0]) == 2 and epoch_losses[0] == epoch_losses[1]


def test_paws_bad_data_fails_before_training(folders, tmp_path):
    out = tmp_path / "o"
    with pytest.raises(ConfigError, match="give either --labelled-list or --labels-per-class, not both"):
        cfg_for(folders, out, "--labelled-list", str(tmp_path / "nope.txt"))
    cfg = cfg_for(folders, out).replace(labelled_list=str(tmp_path / "nope.txt"), labels_per_class=None)
    with pytest.raises(DataError, match="does not exist"):
        train_paws(cfg)
    with pytest.raises(ConfigError, match="--classes-per-batch must be at most the 4 labelled classes, got 5"):
        train_paws(cfg_for(folders, out, "--classes-per-batch", "5"))
    other = write_folder(tmp_path / "other", 2, classes=3)
    with pytest.raises(DataError, match="other class folders"):
        train_paws(parse_args(["paws", "--data", str(folders[0]), "--val-data", str(other), "--output-dir",
                               str(out), *TINY]))
    assert not out.exists()


def test_authors_paws_checkpoint_maps_onto_the_model(folders, tmp_path):
    cfg = cfg_for(folders, tmp_path / "x")
    torch.manual_seed(3)
    source = build_paws_model(cfg)
    # Their layout: the encoder is the ResNet itself, with fc / pred attached, saved from DDP.
    theirs = {"encoder": {f"module.{k.removeprefix('backbone.')}": v for k, v in source.state_dict().items()},
              "epoch": 100}
    assert "module.fc.fc1.weight" in theirs["encoder"] and "module.pred.bn1.weight" in theirs["encoder"]
    torch.save(theirs, tmp_path / "paws-latest.pth.tar")
    state = paws_state_from_authors(ckpt.load_checkpoint(tmp_path / "paws-latest.pth.tar"))
    torch.manual_seed(4)
    target = build_paws_model(cfg)
    ckpt.check_state_dict(target, state, "encoder", "paws-latest.pth.tar")
    target.load_state_dict(state)
    for k, v in source.state_dict().items():
        assert torch.equal(target.state_dict()[k], v)


def test_paws_presets_and_overrides():
    args = parse_args(["paws", "--data", "x", "--preset", "paws_resnet50_300ep", "--multicrop", "4"])
    assert (args.epochs, args.multicrop, args.arch, args.lr) == (300, 4, "resnet50", 0.4)
    # The authors' ImageNet config: 6.4 at 64 GPUs x 64 images is 0.4 per 256.
    assert args.lr * 64 * 64 / 256 == pytest.approx(6.4)
    with pytest.raises(SystemExit):
        parse_args(["paws", "--data", "x", "--preset", "dino_vits16"])


def test_torchrun_two_processes_gloo_paws(folders, tmp_path):
    out = tmp_path / "ddp"
    stdout = torchrun("paws", "--data", str(folders[0]), "--val-data", str(folders[1]), "--output-dir", str(out),
                      *TINY, "--batch-size-per-gpu", "4", "--epochs", "1", "--warmup-epochs", "0")
    assert "x 2 process(es)" in stdout and "4 class slots" in stdout  # 2 classes per rank, unique per rank
    state = ckpt.load_checkpoint(out / "checkpoint.pth")
    assert state["epoch"] == 1 and state["config"]["batch_size_per_gpu"] == 4
    assert len([r for r in read_log(out) if "paws_xent" in r]) == 5  # 40 images / (2 x 4): rank 0 alone logs
    assert len([r for r in read_log(out) if "snn_top1" in r]) == 1


def test_resnet_encoder_as_the_authors(folders, tmp_path):
    """A ResNet backbone: the authors' projection width (the trunk's 512 / 2048 features), no zero-init of
    each block's last BatchNorm, and one forward per resolution."""
    cfg = cfg_for(folders, tmp_path).replace(arch="resnet18", output_dim=64, img_size=None,
                                             hidden_dim=None)  # the width defaults to the backbone's
    model = build_paws_model(cfg)
    assert model.fc.fc1.in_features == model.fc.fc1.out_features == 512 and model.pred.fc1.out_features == 16
    assert all(block.bn2.weight.abs().min() > 0 for block in model.backbone.layer1)
    h, z = model(torch.randn(4, 3, 32, 32), torch.randn(6, 3, 16, 16))
    assert h.shape == z.shape == (10, 64)
