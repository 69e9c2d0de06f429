"""The EDM2 U-Net (`autoguidance.nets.edm2`) against reference outputs of the official NVlabs/edm2 network.

`tests/data/edm2_reference.safetensors` holds, for three small configurations, official state dicts, inputs and
the official outputs (see `tests/data/edm2_reference.json` for how it was made).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import autoguidance.checkpoint as ckpt
from autoguidance.nets import EDM2Precond, EDM2UNet
from autoguidance.nets.edm2 import PRESETS, EDM2Block, count_parameters, preset_config
from autoguidance.nets.mp import normalize

DATA = Path(__file__).parent / "data"
REF_JSON = DATA / "edm2_reference.json"
REF_TENSORS = DATA / "edm2_reference.safetensors"
RTOL = 1e-5

SMALL = dict(img_resolution=8, img_channels=1, label_dim=10, model_channels=32, channel_mult=[1, 2], num_blocks=1,
             attn_resolutions=[4])


@pytest.fixture(scope="module")
def reference():
    from safetensors.torch import load_file

    info = json.loads(REF_JSON.read_text())
    tensors = load_file(str(REF_TENSORS))
    out = {}
    for name, rec in info["configs"].items():
        pre = f"{name}/"
        sub = {k[len(pre):]: v for k, v in tensors.items() if k.startswith(pre)}
        state = {k[len("state/"):]: v for k, v in sub.items() if k.startswith("state/")}
        after = {k[len("state_after_train/"):]: v for k, v in sub.items() if k.startswith("state_after_train/")}
        out[name] = dict(rec, state=state, after=after, **{k: v for k, v in sub.items() if "/" not in k})
    return out


def _net(ref) -> EDM2Precond:
    net = EDM2Precond(**ref["config"])
    net.load_state_dict(ref["state"], strict=True)
    return net.eval()


def _close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = RTOL) -> None:
    """Relative error w.r.t. the tensor's scale (max |expected|), so tiny entries do not dominate."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    err = float((actual - expected).abs().max())
    scale = float(expected.abs().max())
    assert err <= rtol * max(scale, 1e-12), f"max abs error {err:.3g} vs scale {scale:.3g}"


def test_fixture_is_small_and_complete(reference):
    assert REF_TENSORS.stat().st_size < 2_000_000
    assert set(reference) == {"cond_attn_dropout", "uncond", "latent4"}
    assert reference["uncond"]["config"]["label_dim"] == 0
    assert reference["latent4"]["config"]["img_channels"] == 4


@pytest.mark.parametrize("name", ["cond_attn_dropout", "uncond", "latent4"])
def test_state_dict_layout_matches_official(reference, name):
    ref = reference[name]
    ours = EDM2Precond(**ref["config"]).state_dict()
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in ref["state"].items()}
    assert sum(p.numel() for p in EDM2Precond(**ref["config"]).parameters()) == ref["num_params"]


@pytest.mark.parametrize("name", ["cond_attn_dropout", "uncond", "latent4"])
def test_seeded_initialisation_matches_official(reference, name):
    """Modules are created in the official order, so the same seed gives the same random init (the fixture's
    scalar gains were overwritten after init, so they are skipped)."""
    ref = reference[name]
    torch.manual_seed(ref["seed"])
    ours = EDM2Precond(**ref["config"]).state_dict()
    for k, v in ref["state"].items():
        if v.ndim > 0:
            assert torch.equal(ours[k], v), k


@pytest.mark.parametrize("name", ["cond_attn_dropout", "uncond", "latent4"])
def test_eval_outputs_match_official(reference, name):
    ref = reference[name]
    net = _net(ref)
    with torch.no_grad():
        D, logvar = net(ref["x"], ref["sigma"], ref.get("labels"), return_logvar=True)
        D_nolabel = net(ref["x"], ref["sigma"], None)
    _close(D, ref["D"])
    _close(logvar, ref["logvar"])
    _close(D_nolabel, ref["D_nolabel"])


@pytest.mark.parametrize("name", ["cond_attn_dropout", "uncond", "latent4"])
def test_train_mode_matches_official(reference, name):
    """Train mode: same dropout draws (same RNG stream, same places) and the same forced weight normalisation."""
    ref = reference[name]
    net = _net(ref).train()
    torch.manual_seed(ref["train_seed"])
    with torch.no_grad():
        D, logvar = net(ref["x"], ref["sigma"], ref.get("labels"), return_logvar=True)
    _close(D, ref["D_train"])
    _close(logvar, ref["logvar_train"])
    state = net.state_dict()
    changed = [k for k in state if not torch.equal(state[k], ref["state"][k])]
    assert len(changed) == ref["changed_in_train"]
    for k, v in ref["after"].items():  # stored for the 'uncond' net
        torch.testing.assert_close(state[k], v, rtol=RTOL, atol=1e-7)


def test_eval_forward_leaves_stored_weights_bit_identical(reference):
    ref = reference["cond_attn_dropout"]
    net = _net(ref)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with torch.no_grad():
        net(ref["x"], ref["sigma"], ref["labels"], return_logvar=True)
    net(ref["x"], ref["sigma"], ref["labels"]).sum().backward()  # with autograd too
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    # ... whereas one train-mode forward rewrites every weight to unit-norm rows
    net.train()
    with torch.no_grad():
        net(ref["x"], ref["sigma"], ref["labels"])
    w = net.unet.enc["8x8_conv"].weight
    assert not torch.equal(w, before["unet.enc.8x8_conv.weight"])
    torch.testing.assert_close(w, normalize(before["unet.enc.8x8_conv.weight"]), rtol=1e-5, atol=1e-6)


def test_dropout_sites_are_named_modules_in_residual_branches():
    net = EDM2Precond(**SMALL, dropout=0.25).eval()
    blocks = {n: m for n, m in net.named_modules() if isinstance(m, EDM2Block)}
    drops = {n: m for n, m in net.named_modules() if isinstance(m, torch.nn.Dropout)}
    assert set(drops) == {f"{n}.dropout" for n in blocks}
    assert "unet.enc.8x8_block0.dropout" in drops and "unet.dec.4x4_in0.dropout" in drops
    assert all(m.p == 0.25 for m in drops.values())
    # The state dict has no dropout entries: the layout is the official one.
    assert not any(".dropout" in k for k in net.state_dict())

    # Every site is called once per forward, on the residual branch's activation [N, out_channels, H, W]
    # (between the MP-SiLU and conv_res1); replacing its output by zeros removes the residual branch.
    calls = []
    hooks = [m.register_forward_hook(lambda mod, inp, out, n=n: calls.append((n, tuple(inp[0].shape))))
             for n, m in drops.items()]
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        net(x, 1.0)
    for h in hooks:
        h.remove()
    assert sorted(n for n, _ in calls) == sorted(drops)
    for n, shape in calls:
        block = blocks[n[: -len(".dropout")]]
        assert shape[:2] == (2, block.out_channels) and shape[1] == block.conv_res1.in_channels

    block = net.unet.enc["8x8_block0"]
    emb = torch.randn(2, net.unet.emb_noise.out_channels)
    h = torch.randn(2, block.in_channels, 8, 8)
    with torch.no_grad():
        handle = block.dropout.register_forward_hook(lambda mod, inp, out: torch.zeros_like(out))
        y = block(h, emb)
        handle.remove()
        skip = block.conv_skip(h) if block.conv_skip is not None else h
        main = normalize(skip, dim=1) * (1 - block.res_balance) / math.hypot(1 - block.res_balance, block.res_balance)
    assert block.num_heads == 0
    torch.testing.assert_close(y, main)


def test_labels_contract_and_errors():
    torch.manual_seed(0)
    net = EDM2Precond(**SMALL).eval()
    with torch.no_grad():
        for p in net.parameters():
            if p.ndim == 0:
                p.fill_(1.0)
        x = torch.randn(3, 1, 8, 8)
        zero = torch.zeros(3, 10)
        onehot = torch.nn.functional.one_hot(torch.tensor([1, 2, 3]), 10).float()
        # None == all-zero rows == unconditional; a scalar sigma == a per-sample one
        torch.testing.assert_close(net(x, 0.7), net(x, torch.full([3], 0.7), zero), rtol=0, atol=0)
        assert not torch.allclose(net(x, 0.7, onehot), net(x, 0.7, zero))
        # a float64 input gives a float64 D
        assert net(x.double(), 0.7).dtype == torch.float64
        D, logvar = net(x, 0.7, return_logvar=True)
        assert D.shape == x.shape and logvar.shape == (3, 1, 1, 1)

    with pytest.raises(ValueError, match=r"\[N, 1, 8, 8\]"):
        net(torch.randn(3, 3, 8, 8), 1.0)
    with pytest.raises(ValueError, match=r"\[N, 1, 8, 8\]"):
        net(torch.randn(3, 1, 16, 16), 1.0)
    with pytest.raises(ValueError, match=r"\[3, 10\]"):
        net(x, 1.0, torch.zeros(3, 5))
    with pytest.raises(ValueError, match="sigma"):
        net(x, torch.ones(2))
    with pytest.raises(ValueError, match="EDM2UNet expects"):
        net.unet(torch.randn(3, 2, 8, 8), torch.zeros(3), zero)

    # an unconditional net ignores labels, as the official Precond does
    unc = EDM2Precond(**{**SMALL, "label_dim": 0}).eval()
    with torch.no_grad():
        torch.testing.assert_close(unc(x, 0.7, onehot), unc(x, 0.7), rtol=0, atol=0)


def test_config_is_json_and_rebuilds_the_same_layout():
    net = EDM2Precond(**SMALL)
    cfg = json.loads(json.dumps(net.config))
    assert cfg["channel_mult"] == [1, 2] and cfg["use_fp16"] is True and cfg["logvar_channels"] == 128
    assert EDM2Precond.family == "edm2" and isinstance(net.unet, EDM2UNet)
    again = EDM2Precond(**cfg)
    assert {k: v.shape for k, v in again.state_dict().items()} == {k: v.shape for k, v in net.state_dict().items()}


def test_checkpoint_round_trip(tmp_path, reference):
    ref = reference["cond_attn_dropout"]
    net = _net(ref)
    path = ckpt.save(net, tmp_path / "edm2-small", meta={"note": "test"})
    loaded = ckpt.load(path)
    assert isinstance(loaded, EDM2Precond) and not loaded.training
    assert loaded.config == net.config and loaded.checkpoint_meta == {"note": "test"}
    with torch.no_grad():
        torch.testing.assert_close(loaded(ref["x"], ref["sigma"], ref["labels"]),
                                   net(ref["x"], ref["sigma"], ref["labels"]), rtol=0, atol=0)


# Karras et al. (2024), Table 2 (ImageNet-512) and Table 3 (ImageNet-64), in millions of parameters.
PAPER_MPARAMS = {
    "edm2-img512-xs": 125, "edm2-img512-s": 280, "edm2-img512-m": 498, "edm2-img512-l": 777,
    "edm2-img512-xl": 1119, "edm2-img512-xxl": 1523,
    "edm2-img64-s": 280, "edm2-img64-m": 498, "edm2-img64-l": 777, "edm2-img64-xl": 1119,
}


@pytest.mark.parametrize("name", sorted(PAPER_MPARAMS))
def test_preset_parameter_counts_match_the_paper(name):
    n = count_parameters(preset_config(name))
    assert abs(n / 1e6 - PAPER_MPARAMS[name]) <= 0.01 * PAPER_MPARAMS[name]
    assert round(n / 1e6) == PAPER_MPARAMS[name]


def test_presets():
    assert set(PAPER_MPARAMS) <= set(PRESETS)
    for name, cfg in PRESETS.items():
        big = name.rsplit("-", 1)[1] in ("m", "l", "xl", "xxl")
        assert cfg["dropout"] == (0.1 if big else 0.0)
        assert cfg["label_dim"] == 1000 and cfg["img_resolution"] == 64
        assert cfg["img_channels"] == (4 if "img512" in name else 3)
    cfg = preset_config("edm2-img512-xs", label_dim=0)
    assert cfg["label_dim"] == 0 and PRESETS["edm2-img512-xs"]["label_dim"] == 1000
    assert count_parameters("edm2-img512-xs") == count_parameters(PRESETS["edm2-img512-xs"])
    with pytest.raises(KeyError, match="edm2-img512-s"):
        preset_config("edm2-img512-q")


def test_count_parameters_allocates_nothing(monkeypatch):
    built = []
    real_init = EDM2Precond.__init__

    def spy(self, *a, **k):
        real_init(self, *a, **k)
        built.append(self)

    monkeypatch.setattr(EDM2Precond, "__init__", spy)
    count_parameters("edm2-img512-xxl")
    assert built and all(t.is_meta for t in built[0].state_dict().values())
