"""The perturbations of in-situ guidance (`autoguidance.perturb`): block drop, input noise, weight noise, identity
attention (and dropout alongside, for the shared contract).

Each one: changes the degraded rows when on, changes nothing when off or at strength 0, reproduces from the keys,
gives in one batched exact+degraded call what two separate calls give, and leaves the model exactly as it was.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import autoguidance as ag
from autoguidance.nets.edm2 import EDM2Attention, EDM2Block, EDM2Precond
from autoguidance.perturb import (BlockDrop, Dropout, IdentityAttention, InputNoise, SiteError, WeightNoise,
                                  dropout_keep, find_sites)
from autoguidance.perturb.base import _RowSet
from autoguidance.rng import dropout_scale, hash_normal, mix_keys, mix_keys_per_salt
from autoguidance.schedules import Interval
from conftest import assert_same_state, state_snapshot
from helpers import assert_batch_close, tiny_denoiser_mlp

TINY = dict(img_resolution=8, img_channels=3, label_dim=0, model_channels=16, channel_mult=[1, 2], num_blocks=1,
            attn_resolutions=[4], channels_per_head=8)


def tiny_edm2(seed: int = 0) -> EDM2Precond:
    torch.manual_seed(seed)
    net = EDM2Precond(**TINY)
    with torch.no_grad():
        for p in net.parameters():
            if p.ndim == 0:
                p.fill_(0.7)  # the gains start at 0 (F = 0); make every branch count
    return net.eval().requires_grad_(False)


PERTURBATIONS = {
    "dropout": lambda s: Dropout(0.3 * s),
    "dropout-channel": lambda s: Dropout(0.3 * s, mode="channel"),
    "block-drop": lambda s: BlockDrop(0.5 * s),
    "input-noise": lambda s: InputNoise(0.2 * s),
    "weight-noise": lambda s: WeightNoise(0.2 * s),
    "identity-attention": lambda s: IdentityAttention(1.0 * s),
}
RANDOM = {"dropout", "dropout-channel", "block-drop", "input-noise", "weight-noise"}


def degraded(pert, net, x, sigma, rows, keys):
    """One call of `net` with the rows `rows` degraded by `pert` (what `Guided` does)."""
    x, sigma = pert.transform_inputs(x, sigma, rows, keys)
    with pert.active(net, rows, keys, sigma):
        return net(x, sigma)


def _inputs(n=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 8, 8, generator=g), torch.full((n,), 1.3), mix_keys(torch.arange(n) + 100, 7)


@pytest.mark.parametrize("kind", sorted(PERTURBATIONS))
def test_changes_output_only_when_on_and_reproduces_from_keys(kind):
    net = tiny_edm2()
    x, s, keys = _inputs()
    clean = net(x, s)
    on, off = torch.ones(4, dtype=torch.bool), torch.zeros(4, dtype=torch.bool)
    a = degraded(PERTURBATIONS[kind](1), net, x, s, on, keys)
    b = degraded(PERTURBATIONS[kind](1), net, x, s, on, keys)
    assert torch.equal(a, b)                                       # reproducible from the keys
    assert ((a - clean).flatten(1).abs().amax(1) > 1e-4).all()     # every degraded row changes
    if kind in RANDOM:
        c = degraded(PERTURBATIONS[kind](1), net, x, s, on, mix_keys(keys, 1))
        assert not torch.equal(a, c)                               # other keys, other draws
    assert torch.equal(degraded(PERTURBATIONS[kind](0), net, x, s, on, keys), clean)   # strength 0
    assert torch.equal(degraded(PERTURBATIONS[kind](1), net, x, s, off, keys), clean)  # no row degraded
    assert torch.equal(net(x, s), clean)                           # nothing left behind
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in net.modules())


@pytest.mark.parametrize("kind", sorted(PERTURBATIONS))
def test_batched_exact_and_degraded_call_equals_two_calls(kind):
    net = tiny_edm2()
    x, s, keys = _inputs(3)
    pert = PERTURBATIONS[kind](1)
    rows = torch.tensor([False] * 3 + [True] * 3)
    both = degraded(pert, net, torch.cat([x, x]), torch.cat([s, s]), rows, torch.cat([keys, keys]))
    exact = net(x, s)
    bad = degraded(pert, net, x, s, torch.ones(3, dtype=torch.bool), keys)
    assert_batch_close(both[:3], exact)                           # 6 rows in one call against 3
    assert_batch_close(both[3:], bad)
    # ... and a row's draw does not depend on the rows it shares the batch with
    tail = degraded(pert, net, x[1:], s[1:], torch.ones(2, dtype=torch.bool), keys[1:])
    assert_batch_close(tail, bad[1:])


@pytest.mark.parametrize("kind", sorted(PERTURBATIONS))
def test_guided_batched_equals_sequential_and_model_is_untouched(kind):
    net = tiny_edm2()
    before = state_snapshot(net)
    x, s, _ = _inputs(4)
    one_call = ag.perturbation_guidance(net, 2.5, PERTURBATIONS[kind](1))
    two_calls = ag.perturbation_guidance(net, 2.5, PERTURBATIONS[kind](1), max_batch=4)
    a, b = one_call(x, s), two_calls(x, s)
    assert one_call.stats["forward_calls"] == 1 and two_calls.stats["forward_calls"] == 2  # 8 rows, max_batch 4
    assert_batch_close(b, a)                                      # 8 rows in one call against 2 x 4
    out = ag.generate(one_call, range(3), [3, 8, 8], num_steps=3, progress=False)
    assert torch.isfinite(out).all()
    assert_same_state(before, state_snapshot(net))


def test_strength_schedules_follow_sigma():
    """p(sigma): a strength that is 0 outside (0.5, 2] leaves the rows at other noise levels exact."""
    net = tiny_edm2()
    x, _, keys = _inputs(4)
    s = torch.tensor([0.1, 1.0, 1.5, 5.0])
    clean = net(x, s)
    for pert in [BlockDrop(Interval(1.0, 0.5, 2.0, outside=0.0)), InputNoise(Interval(0.3, 0.5, 2.0, outside=0.0)),
                 WeightNoise(Interval(0.3, 0.5, 2.0, outside=0.0)),
                 IdentityAttention(Interval(1.0, 0.5, 2.0, outside=0.0))]:
        out = degraded(pert, net, x, s, torch.ones(4, dtype=torch.bool), keys)
        assert torch.equal(out[[0, 3]], clean[[0, 3]]), pert.name   # strength 0 rows of the same 4-row call
        assert ((out[[1, 2]] - clean[[1, 2]]).flatten(1).abs().amax(1) > 1e-4).all(), pert.name


def test_sampling_does_not_depend_on_batch_size():
    net = tiny_edm2()
    for pert in [BlockDrop(0.3), WeightNoise(0.2)]:
        D = ag.perturbation_guidance(net, 2.0, pert)
        whole = ag.generate(D, range(4), [3, 8, 8], num_steps=3, progress=False)
        split = ag.generate(D, range(4), [3, 8, 8], num_steps=3, batch=2, progress=False)
        assert_batch_close(split, whole)


def test_dropout_masks_are_32_bit_counter_hashes():
    """`dropout_keep` is u >= p with 16-bit uniforms u from lowbias32(seed ^ j * 0x9E3779B9): the high halves for
    the first half of the row, the low halves for the second, as uint32 arithmetic (numpy) computes them; the
    int32 tensor ops must wrap the same way."""
    keys = mix_keys(torch.arange(5), 3)
    p = torch.tensor([0.0, 0.1, 0.5, 0.9, 0.999])
    keep = dropout_keep(keys, [3, 7, 100], p)                  # 2100 elements: 1050 hashes per row
    seeds = (keys.numpy() & 0xFFFFFFFF).astype(np.uint32)
    x = (np.arange(1050, dtype=np.uint32)[None] * np.uint32(0x9E3779B9)) ^ seeds[:, None]
    for shift, mul in ((16, 0x7FEB352D), (15, 0x846CA68B), (16, None)):
        x ^= x >> np.uint32(shift)
        if mul is not None:
            x *= np.uint32(mul)
    u = np.concatenate([x >> np.uint32(16), x & np.uint32(0xFFFF)], axis=1) / 65536.0
    assert np.array_equal(keep.numpy().reshape(5, -1), u >= np.ceil(p.double().numpy() * 65536)[:, None] / 65536)
    rate = 1 - keep.float().mean((1, 2, 3))
    assert rate[0] == 0 and all(abs(rate[i] - p[i]) < 0.02 for i in range(1, 5))
    big = dropout_keep(mix_keys(torch.arange(64), 1), [4097], torch.full((64,), 0.25))   # odd length
    assert big.shape == (64, 4097) and abs(1 - big.float().mean().item() - 0.25) < 0.005
    assert (big[0] != big[1]).any()


def test_dropout_multipliers_are_the_masks_rescaled_bit_for_bit():
    """`dropout_scale` (the int32 path the hooks use) is exactly `keep / (1 - p)` in float32, for even, odd and
    channel-shaped rows, and per-site keys made in one vectorised pass equal the per-site `mix_keys`."""
    keys = mix_keys(torch.arange(6), 9)
    p = torch.tensor([0.0, 0.1, 0.25, 0.5, 0.9, 0.999])
    for shape in ([3, 7, 100], [4097], [16, 1, 1], [1]):
        scale = dropout_scale(keys, shape, p)
        ref = dropout_keep(keys, shape, p).to(torch.float32).div_((1 - p).reshape(-1, *[1] * len(shape)))
        assert scale.dtype == torch.float32 and scale.shape == (6, *shape)
        assert torch.equal(scale, ref)
    sites = mix_keys_per_salt(keys, range(5))
    assert sites.shape == (5, 6) and all(torch.equal(sites[i], mix_keys(keys, i)) for i in range(5))


@pytest.mark.parametrize("rows", [[4, 5, 6, 7], [0, 1, 2, 3, 4, 5, 6, 7], [1, 2], [0, 3, 6]])
def test_row_products_write_only_the_degraded_rows(rows):
    """`_RowSet.put_product` (the write of a dropout hook: factors made chunk by chunk straight into the result for
    a contiguous run) equals the gather-multiply-scatter it replaces, and never writes its input."""
    t = torch.randn(8, 3, 5)
    before = t.clone()
    idx = torch.tensor(rows)
    factor = torch.rand(len(rows), 3, 5)
    want = t.index_copy(0, idx, t[idx] * factor)
    for chunk in (1, 3, None):                          # factors made chunk by chunk, as the dropout hooks do
        made = []
        got = _RowSet(idx).put_product(t, lambda i, j: made.append((i, j)) or factor[i:j], chunk)
        assert torch.equal(got, want) and torch.equal(t, before)
        contiguous = rows == list(range(rows[0], rows[-1] + 1))
        assert made == ([(i, min(len(rows), i + chunk)) for i in range(0, len(rows), chunk)]
                        if chunk and contiguous else [(0, len(rows))])
    g = t.clone().requires_grad_(True)                 # with autograd: the differentiable path, same values
    out = _RowSet(idx).put_product(g, lambda i, j: factor[i:j], 2)
    out.sum().backward()
    assert torch.equal(out.detach(), want)
    assert torch.equal(g.grad, torch.ones_like(t).index_copy(0, idx, factor))


# -- block drop --------------------------------------------------------------------------------------------------

class _Residual(torch.nn.Module):
    def __init__(self, width=4):
        super().__init__()
        self.lin = torch.nn.Linear(width, width)

    def forward(self, x):
        return x + self.lin(x)

    def skip_path(self, x):
        return 2 * x


def test_block_drop_rate_and_paths():
    model = torch.nn.Sequential(_Residual(), _Residual())
    x = torch.randn(4000, 4)
    rows, keys = torch.ones(4000, dtype=torch.bool), mix_keys(torch.arange(4000), 3)
    clean = model[0](x)
    with BlockDrop(0.25, where="0", path="input").active(model, rows, keys, torch.ones(4000)):
        y = model[0](x)
    dropped = (y == x).all(1)
    assert abs(dropped.float().mean().item() - 0.25) < 0.03
    assert torch.equal(y[~dropped], clean[~dropped])
    with BlockDrop(1.0, where=_Residual).active(model, rows[:8], keys[:8], torch.ones(8)):   # path 'auto' -> skip
        assert torch.equal(model[0](x[:8]), 2 * x[:8])


def test_block_drop_on_edm2_uses_the_skip_path():
    net = tiny_edm2()
    block = net.unet.enc["8x8_block0"]
    h, emb = torch.randn(2, block.in_channels, 8, 8), torch.randn(2, net.unet.emb_noise.out_channels)
    with BlockDrop(1.0, where="unet.enc.8x8_block0").active(net, torch.ones(2, dtype=torch.bool),
                                                             torch.arange(2), torch.ones(2)):
        y = block(h, emb)
    assert torch.equal(y, block.skip_path(h, emb)) and not torch.equal(y, block(h, emb))
    sites = BlockDrop().sites(net)
    assert sites and all(isinstance(m, EDM2Block) for _, m in sites)
    # a block that changes the shape cannot return its input
    with pytest.raises(ValueError, match="cannot return its input"):
        degraded(BlockDrop(1.0, where="unet.enc.4x4_down", path="input"), net, *_inputs(2)[:2],
                 torch.ones(2, dtype=torch.bool), torch.arange(2))
    with pytest.raises(SiteError, match="where="):
        BlockDrop(0.1).sites(tiny_denoiser_mlp())        # no block with a skip path: name them
    with pytest.raises(TypeError, match="no skip path"):
        degraded(BlockDrop(1.0, where="raw.trunk.fc0", path="skip"), tiny_denoiser_mlp(), torch.randn(2, 2),
                 torch.ones(2), torch.ones(2, dtype=torch.bool), torch.arange(2))


# -- input noise -------------------------------------------------------------------------------------------------

def test_input_noise_is_karras_plus_k():
    x, s = torch.zeros(3, 20000), torch.tensor([0.5, 2.0, 2.0])
    keys = torch.arange(3)
    rows = torch.tensor([True, True, False])
    x2, s2 = InputNoise(0.1).transform_inputs(x, s, rows, keys)
    torch.testing.assert_close(s2, torch.tensor([0.55, 2.2, 2.0]))
    for i in range(2):   # sqrt(s'^2 - s^2) = s sqrt(1.21 - 1)
        assert abs(x2[i].std().item() / (s[i].item() * math.sqrt(0.21)) - 1) < 0.02
    assert torch.equal(x2[2], x[2])
    n = hash_normal(mix_keys(keys[:1], 0x1A9E), [20000])[0]
    torch.testing.assert_close(x2[0], 0.5 * math.sqrt(0.21) * n)
    with pytest.raises(ValueError, match=">= 0"):
        InputNoise(-0.1)


def test_input_noise_needs_no_sites_and_guides_a_toy_net():
    net = ag.load("toy-denoiser-guide")
    before = state_snapshot(net)
    D = ag.perturbation_guidance(net, 2.0, InputNoise(0.2))
    a = ag.generate(D, range(16), [2], num_steps=4, sigma_max=5.0, progress=False)
    b = ag.generate(ag.no_guidance(net), range(16), [2], num_steps=4, sigma_max=5.0, progress=False)
    assert not torch.allclose(a, b)
    assert_same_state(before, state_snapshot(net))


# -- weight noise ------------------------------------------------------------------------------------------------

def test_weight_noise_is_multiplicative_per_row_and_leaves_weights_alone():
    lin = torch.nn.Sequential(torch.nn.Linear(1, 20000, bias=False))
    w = lin[0].weight.detach().clone()
    rows = torch.tensor([True, False, True])
    with WeightNoise(0.3, where="0").active(lin, rows, torch.arange(3), torch.ones(3)):
        y = lin(torch.ones(3, 1))
    assert torch.equal(lin[0].weight, w)
    assert torch.equal(y[1], w[:, 0])                    # the exact row is exact
    z = (y[[0, 2]] / w[:, 0] - 1) / 0.3                  # W' = W (1 + 0.3 n): n ~ N(0, 1), per row
    assert abs(z.mean().item()) < 0.03 and abs(z.std().item() - 1) < 0.03
    assert (z[0] - z[1]).abs().mean() > 0.5


def test_weight_noise_sites_and_errors():
    net = tiny_edm2()
    sites = WeightNoise().sites(net)
    assert sites and all(hasattr(m, "weight") for _, m in sites)
    assert [p for p, _ in WeightNoise(where="unet.enc.8x8_block0", params="conv_res*.weight").sites(net)] == \
        ["unet.enc.8x8_block0"]
    with pytest.raises(SiteError, match="nested"):
        WeightNoise(where=["unet.enc.8x8_block0", "unet.enc.8x8_block0.conv_res0"], params="*weight").sites(net)
    with pytest.raises(SiteError, match="no parameter matching"):
        WeightNoise(where="unet.enc.8x8_block0.dropout").sites(net)


def test_weight_noise_and_dropout_on_one_site_compose_in_either_order():
    """Issue 21, item 14: weight noise recomputes its site's degraded rows from the inputs; it runs first among the
    site's hooks, so dropout on the same site acts on the noisy output whichever was entered first (before, a
    dropout entered first was overwritten on the degraded rows)."""
    lin = torch.nn.Sequential(torch.nn.Linear(3, 64))
    x, sigma, keys = torch.randn(4, 3), torch.ones(4), torch.arange(4)
    rows = torch.tensor([True, False, True, True])
    wn, drop = WeightNoise(0.3, where="0"), Dropout(0.5, where="0")
    with torch.no_grad():
        with wn.active(lin, rows, keys, sigma):
            noisy = lin(x)
        with drop.active(lin, rows, keys, sigma):
            dropped = lin(x)
        outs = []
        for first, second in ((wn, drop), (drop, wn)):
            with first.active(lin, rows, keys, sigma), second.active(lin, rows, keys, sigma):
                outs.append(lin(x))
    factor = dropped[rows] / lin(x)[rows]                  # the dropout multipliers of the degraded rows
    assert torch.equal(outs[0], outs[1])                   # the same ops in the same order: bit for bit
    torch.testing.assert_close(outs[0][rows], noisy[rows] * factor)
    assert torch.equal(outs[0][1], lin(x)[1])              # the exact row is exact


def test_weight_noise_refuses_a_forward_replaced_on_the_instance():
    """An instance forward (an offload or wrapper hook) is bound to the module itself: a recompute would run it on
    the clean weights, silently. Refused in one line."""
    net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Linear(8, 2))
    inner = net[1].forward
    net[1].forward = lambda x: inner(x)
    with torch.no_grad(), WeightNoise(0.3, where="1").active(net, torch.ones(2, dtype=torch.bool), torch.arange(2),
                                                            torch.ones(2)):
        with pytest.raises(SiteError, match=r"cannot recompute '1' \(Linear\): its forward is replaced") as e:
            net(torch.randn(2, 3))
    assert "\n" not in str(e.value)
    assert not net[1]._forward_hooks


def test_weight_noise_on_a_log_density_net_under_autograd():
    """The toy log-density net differentiates through the recomputed rows (score by autograd)."""
    net = ag.load("toy-logp-guide")
    before = state_snapshot(net)
    D = ag.perturbation_guidance(net, 2.0, WeightNoise(0.2, where="trunk.fc*"))
    x = torch.randn(6, 2)
    out = D(x, 0.7)
    assert torch.isfinite(out).all() and not torch.allclose(out, net(x, 0.7))
    assert_same_state(before, state_snapshot(net))


# -- identity attention ------------------------------------------------------------------------------------------

def test_identity_attention_on_edm2_outputs_the_values():
    net = tiny_edm2()
    sites = IdentityAttention().sites(net)
    assert sites and all(isinstance(m, EDM2Attention) and p.endswith(".attn") for p, m in sites)
    q, k, v = torch.randn(3, 2, 2, 8, 16).unbind(0)
    attn = sites[0][1]
    rows = torch.tensor([True, False])
    with IdentityAttention(1.0).active(net, rows, torch.arange(2), torch.ones(2)):
        out = attn(q, k, v)
    assert torch.equal(out[0], v[0]) and torch.equal(out[1], attn(q, k, v)[1])
    with IdentityAttention(0.25).active(net, rows, torch.arange(2), torch.ones(2)):
        half = attn(q, k, v)
    torch.testing.assert_close(half[0], 0.75 * attn(q, k, v)[0] + 0.25 * v[0])


@pytest.mark.parametrize("batch_first", [True, False])
def test_identity_attention_on_multihead_attention(batch_first):
    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(8, 2, batch_first=batch_first).eval()
    model = torch.nn.ModuleDict({"attn": mha})
    h = torch.randn(3, 5, 8) if batch_first else torch.randn(5, 3, 8)
    rows = torch.tensor([False, True, True])
    with IdentityAttention().active(model, rows, torch.arange(3), torch.ones(3)):
        out, _ = mha(h, h, h)
    values = mha.out_proj(torch.nn.functional.linear(h, mha.in_proj_weight[16:], mha.in_proj_bias[16:]))
    clean, _ = mha(h, h, h)
    b = 0 if batch_first else 1
    torch.testing.assert_close(out.select(b, 1), values.select(b, 1))
    assert torch.equal(out.select(b, 0), clean.select(b, 0))
    with pytest.raises(ValueError, match="self-attention"):
        with IdentityAttention().active(model, rows, torch.arange(3), torch.ones(3)):
            mha(h, h[:2] if not batch_first else h[:, :2], h[:2] if not batch_first else h[:, :2])


def test_identity_attention_rejects_modules_that_are_not_attention():
    with pytest.raises(TypeError, match="not a supported attention module"):
        IdentityAttention(where="unet.enc.8x8_block0.conv_res0").sites(tiny_edm2())
    with pytest.raises(SiteError, match="identity attention"):
        IdentityAttention().sites(tiny_denoiser_mlp())
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        IdentityAttention(1.5)


# -- the model is left exactly as it was --------------------------------------------------------------------------

class _Boom(Exception):
    pass


@pytest.mark.parametrize("kind", sorted(PERTURBATIONS))
def test_model_state_is_bit_identical_after_an_exception_in_the_degraded_pass(kind, monkeypatch):
    net = tiny_edm2()
    net.unet.enc["8x8_block0"].dropout.train(True)        # an unusual mix of modes must survive too
    net.unet.enc["8x8_block0"].register_forward_hook(lambda m, i, o: None)   # and the user's own hooks
    before = state_snapshot(net)
    pert = PERTURBATIONS[kind](1)
    original = type(pert)._hooks

    def exploding(self, model, rows, keys, sigma):
        def boom(mod, args, out):
            raise _Boom("inside the degraded pass")
        return list(original(self, model, rows, keys, sigma)) + [(model.unet.out_conv, boom)]

    monkeypatch.setattr(type(pert), "_hooks", exploding)   # raises after (weight noise: during) the degradation
    with pytest.raises(_Boom):
        ag.generate(ag.perturbation_guidance(net, 2.0, pert), range(2), [3, 8, 8], num_steps=2, progress=False)
    monkeypatch.undo()
    assert_same_state(before, state_snapshot(net))


def test_find_sites_still_resolves_globs_on_edm2():
    net = tiny_edm2()
    assert [p for p, _ in find_sites(net, "unet.*.attn")] == [p for p, _ in IdentityAttention().sites(net)]


def test_skip_layers_on_a_module_dict_equals_block_drop_of_the_same_blocks():
    """EDM2 keeps its blocks in ModuleDicts: SkipLayers takes their keys (or indices in order) and does exactly
    what BlockDrop(p=1, path='input') does on the same blocks."""
    import autoguidance as ag
    from autoguidance.checkpoint import load
    from autoguidance.perturb import SkipLayers

    net = load("digits-s-T-ema150")
    x, sigma = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0)), torch.full((3,), 1.5)
    labels = torch.eye(10)[:3]
    by_key = SkipLayers(blocks="unet.dec", layers=["4x4_in0", "4x4_in1"])
    by_index = SkipLayers(blocks="unet.dec", layers=[0, 1])
    drop = BlockDrop(1.0, where=["unet.dec.4x4_in0", "unet.dec.4x4_in1"], path="input")
    assert [n for n, _ in by_key.sites(net)] == ["unet.dec.4x4_in0", "unet.dec.4x4_in1"]
    with torch.no_grad():
        outs = [ag.perturbation_guidance(net, 2.0, p)(x, sigma, labels) for p in (by_key, by_index, drop)]
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    with pytest.raises(SiteError, match=r"\['nope'\] not in unet.dec: it has 9 blocks \(4x4_in0"):
        SkipLayers(blocks="unet.dec", layers=["nope"]).sites(net)
