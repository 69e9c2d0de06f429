"""The free guides against their papers' definitions: SEG, TPG, self-guidance (and SG-prev), SWG."""
from __future__ import annotations

import math

import pytest
import torch

import autoguidance as ag
from autoguidance.guidance import Guided, Guide, Pass, perturbation_guidance
from autoguidance.guides import PreviousStepGuidance, SlidingWindow, window_starts
from autoguidance.methods import make_perturbation
from autoguidance.perturb import NoisierLevel, SmoothedAttention, TokenShuffle
from autoguidance.perturb.seg import blur_tokens, gaussian_blur_matrix
from autoguidance.perturb.tokens import token_permutations
from autoguidance.rng import noise_context
from autoguidance.sampling import sample_heun, sigmas_karras
from autoguidance.schedules import as_schedule
from helpers import assert_batch_close


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _call(model, pert, x, rows, keys=None, sigma=None):
    keys = torch.arange(len(x), dtype=torch.int64) if keys is None else keys
    sigma = torch.ones(len(x)) if sigma is None else sigma
    with pert.active(model, rows, keys, sigma):
        return model(x)


# -- SEG -----------------------------------------------------------------------------------------------------------

class MHANet(torch.nn.Module):
    def __init__(self, d=8):
        super().__init__()
        torch.manual_seed(0)
        self.attn = torch.nn.MultiheadAttention(d, 2, batch_first=True)

    def forward(self, x):
        return self.attn(x, x, x)[0]


def _mha_by_hand(m, q_in, kv_in):
    e, h = m.embed_dim, m.num_heads
    W, b = m.in_proj_weight, m.in_proj_bias
    q = q_in @ W[:e].T + b[:e]
    k = kv_in @ W[e:2 * e].T + b[e:2 * e]
    v = kv_in @ W[2 * e:].T + b[2 * e:]
    n, L, _ = q.shape
    sp = lambda t: t.reshape(n, L, h, e // h).transpose(1, 2)
    a = (sp(q) @ sp(k).transpose(2, 3) / math.sqrt(e // h)).softmax(-1)
    o = (a @ sp(v)).transpose(1, 2).reshape(n, L, e)
    return m.out_proj(o)


def test_blur_limits_and_rows_sum_to_one():
    assert torch.equal(gaussian_blur_matrix(5, 0.0), torch.eye(5))
    assert torch.allclose(gaussian_blur_matrix(5, math.inf), torch.full((5, 5), 0.2))
    b = gaussian_blur_matrix(7, 1.5)
    assert torch.allclose(b.sum(1), torch.ones(7)) and torch.allclose(gaussian_blur_matrix(7, 1e6), torch.full((7, 7), 1 / 7))
    q = torch.randn(2, 3, 12)   # 2-D grid 3 x 4 on the last axis: separable blur == kron of the two 1-D blurs
    got = blur_tokens(q, 1.0, 2, [3, 4])
    K = torch.kron(gaussian_blur_matrix(3, 1.0), gaussian_blur_matrix(4, 1.0))
    assert torch.allclose(got, q @ K.T, atol=1e-6)


def test_seg_mha_limits_by_hand():
    net = MHANet().eval()
    x = torch.randn(3, 6, 8)
    rows = torch.tensor([False, True, True])
    exact = net(x)
    before = _state(net)
    with torch.no_grad():
        s0 = _call(net, SmoothedAttention(0.0), x, rows)
        sinf = _call(net, SmoothedAttention(math.inf), x, rows)
        s2 = _call(net, SmoothedAttention(2.0), x, rows)
        hand_inf = _mha_by_hand(net.attn, x.mean(1, keepdim=True).expand_as(x), x)
        hand_2 = _mha_by_hand(net.attn, blur_tokens(x, 2.0, 1), x)
    assert torch.allclose(s0, exact, atol=1e-6)
    assert torch.equal(sinf[0], exact[0].detach()) and torch.equal(s2[0], exact[0].detach())   # exact row untouched
    assert torch.allclose(sinf[1:], hand_inf[1:], atol=1e-5)
    assert torch.allclose(s2[1:], hand_2[1:], atol=1e-5)
    assert torch.allclose(sinf[1:], sinf[1:, :1].expand_as(sinf[1:]), atol=1e-5)  # every query alike
    assert all(torch.equal(v, before[k]) for k, v in _state(net).items()) and not net.attn._forward_hooks


def test_seg_width_schedule_follows_sigma_per_row():
    from autoguidance.schedules import Ramp

    net, x = MHANet(), torch.randn(3, 6, 8)
    rows = torch.tensor([True, True, False])
    sigma = torch.tensor([10.0, 0.1, 10.0])                     # row 0: s = 4, row 1: s = 0 (exact), row 2: exact
    sched = _call(net, SmoothedAttention(Ramp(4.0, 0.0, sigma_from=10.0, sigma_to=0.1)), x, rows, sigma=sigma)
    fixed = _call(net, SmoothedAttention(4.0), x, rows, sigma=sigma)
    with torch.no_grad():
        exact = net(x)
    assert torch.allclose(sched[0], fixed[0]) and not torch.allclose(sched[0], exact[0])
    assert torch.equal(sched[1], exact[1]) and torch.equal(sched[2], exact[2])
    with pytest.raises(ValueError):
        SmoothedAttention(Ramp(-1.0, 0.0))


def test_seg_edm2_attention_by_hand():
    from autoguidance.nets.edm2 import EDM2Attention

    class Wrap(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = EDM2Attention()

        def forward(self, qkv):
            return self.attn(*qkv.unbind(1))

    net = Wrap()
    qkv = torch.randn(2, 3, 2, 4, 16)   # [N, q/k/v, heads, C/heads, HW = 4 x 4]
    rows = torch.tensor([True, False])
    with torch.no_grad():
        exact = net(qkv)
        q, k, v = qkv.unbind(1)
        for s in (0.0, 1.0, math.inf):
            got = _call(net, SmoothedAttention(s), qkv, rows)
            qb = blur_tokens(q, s, 3, [4, 4])
            hand = v @ (qb.transpose(2, 3) @ (k / 2.0)).softmax(3).transpose(2, 3)
            assert torch.allclose(got[0], hand[0], atol=1e-5)
            assert torch.equal(got[1], exact[1])
        qm = q.mean(3, keepdim=True).expand_as(q)
        hand_inf = v @ (qm.transpose(2, 3) @ (k / 2.0)).softmax(3).transpose(2, 3)
        assert torch.allclose(_call(net, SmoothedAttention(math.inf), qkv, rows)[0], hand_inf[0], atol=1e-5)


def test_seg_rejects_non_attention_and_negative():
    with pytest.raises(ValueError):
        SmoothedAttention(-1.0)
    net = torch.nn.Sequential(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError):
        SmoothedAttention(1.0, where="0").sites(net)


# -- TPG -----------------------------------------------------------------------------------------------------------

class ConvNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.a = torch.nn.Conv2d(2, 3, 1)
        self.b = torch.nn.Conv2d(3, 2, 3, padding=1)

    def forward(self, x):
        return self.b(self.a(x))


def test_tpg_permutation_is_seeded_and_batch_independent():
    keys = torch.tensor([5, 9, 5, 123], dtype=torch.int64)
    p = token_permutations(keys, 37)
    assert all(torch.equal(torch.sort(r).values, torch.arange(37)) for r in p)   # permutations
    assert torch.equal(p[0], p[2]) and not torch.equal(p[0], p[1])                 # per key
    assert torch.equal(token_permutations(keys[3:], 37)[0], p[3])                 # batch-size independent
    assert not torch.equal(token_permutations(keys, 37, site=1)[0], p[0])         # per site


def test_tpg_shuffles_tokens_of_degraded_rows_only():
    net = ConvNet().eval()
    x = torch.randn(4, 2, 3, 5)
    rows = torch.tensor([False, True, False, True])
    keys = torch.tensor([11, 12, 13, 14], dtype=torch.int64)
    pert = TokenShuffle(where="a")
    with torch.no_grad():
        got = _call(net, pert, x, rows, keys)
        exact = net(x)
        h = net.a(x)
        perm = token_permutations(keys[rows], 15)
        tok = h[rows].reshape(2, 3, 15)
        shuffled = torch.stack([tok[i][:, perm[i]] for i in range(2)]).reshape(2, 3, 3, 5)
        hand = net.b(shuffled)
        # the same rows in a batch of their own give the same output (keys, not batch positions, seed it)
        alone = _call(net, pert, x[rows], torch.tensor([True, True]), keys[rows])
    assert torch.equal(got[~rows], exact[~rows])
    assert_batch_close(got[rows], hand)                 # the net's second conv on 4 rows against 2
    assert_batch_close(alone, got[rows])
    assert not torch.allclose(got[rows], exact[rows])
    with pytest.raises(ValueError):
        TokenShuffle().sites(net)


def test_tpg_transformer_tokens_axis1():
    net = MHANet().eval()
    x = torch.randn(2, 6, 8)
    with torch.no_grad():
        got = _call(net, TokenShuffle(where="attn"), x, torch.tensor([True, False]))
        out = net(x)
    perm = token_permutations(torch.tensor([0]), 6)[0]
    assert torch.allclose(got[0], out[0][perm], atol=1e-6) and torch.equal(got[1], out[1])


# -- self-guidance --------------------------------------------------------------------------------------------------

def _toy_denoiser():
    torch.manual_seed(2)
    lin = torch.nn.Linear(3, 2)
    return lambda x, s, labels=None: lin(torch.cat([x, s.log()[:, None]], 1))


def test_self_guidance_is_net_at_noisier_level_by_hand():
    D = _toy_denoiser()
    x, s = torch.randn(5, 2), torch.rand(5) + 0.1
    with torch.no_grad():
        G = perturbation_guidance(D, 2.5, NoisierLevel(0.3))
        got = G(x, s)
        hand = D(x, s) + 1.5 * (D(x, s) - D(x, 1.3 * s))
    assert_batch_close(got, hand)                       # one call of 10 rows against calls of 5
    x2, s2 = NoisierLevel(0.3).transform_inputs(x, s, torch.tensor([True, False, True, False, True]),
                                                torch.arange(5))
    assert torch.equal(x2, x) and torch.allclose(s2[[0, 2, 4]], 1.3 * s[[0, 2, 4]]) and torch.equal(s2[1], s[1])
    assert isinstance(make_perturbation("noisierlevel", 0.2), NoisierLevel)


def test_sg_prev_uses_previous_level_per_image_and_is_batch_independent():
    D = _toy_denoiser()
    calls = []
    G = PreviousStepGuidance(lambda x, s, l=None: (calls.append(s.clone()), D(x, s))[1], 3.0)
    x = torch.randn(2, 2)
    seeds = torch.tensor([7, 8])
    with torch.no_grad():                              # one noise context per denoiser call, as the samplers make
        with noise_context(seeds, 0):
            first = G(x, torch.full((2,), 2.0))
        assert torch.equal(first, D(x, torch.full((2,), 2.0)))             # nothing earlier: unguided
        d_prev = D(x, torch.full((2,), 2.0))
        with noise_context(seeds, 1):
            got = G(x, torch.full((2,), 1.0))
        hand = D(x, torch.ones(2)) + 2 * (D(x, torch.ones(2)) - d_prev)
        assert torch.allclose(got, hand, atol=1e-6)
        with noise_context(seeds, 2):
            again = G(x, torch.full((2,), 1.0))                              # Heun re-evaluates a level
        assert torch.allclose(again, hand, atol=1e-6)
    # batch-size independence: the same seeds sampled in two batches or one give the same images
    sig = sigmas_karras(6, 0.01, 3.0, 7.0)
    x0 = torch.randn(4, 2) * 3
    G1 = PreviousStepGuidance(D, 2.0)
    one = sample_heun(G1, x0.clone(), sig, seeds=torch.arange(4), progress=False)
    G2 = PreviousStepGuidance(D, 2.0)
    a = sample_heun(G2, x0[:2].clone(), sig, seeds=torch.arange(2), progress=False)
    b = sample_heun(G2, x0[2:].clone(), sig, seeds=torch.arange(2, 4), progress=False)
    assert_batch_close(torch.cat([a, b]), one)
    # a new run of the same seeds starts fresh (its first level is higher than the last one stored)
    assert torch.allclose(sample_heun(G1, x0.clone(), sig, seeds=torch.arange(4), progress=False), one, atol=1e-6)
    G1.reset()
    assert G1._seeds is None


def test_sg_prev_as_the_net_of_several_passes_is_refused_naming_the_cause():
    """cfg(PreviousStepGuidance(net)) would give an image's conditional and unconditional rows one shared previous
    prediction (issue 21 leftover: it was refused as "needs distinct image seeds", and with max_batch splitting the
    passes into calls it ran silently wrong); SG-prev over the CFG combination composes."""
    D = _toy_denoiser()
    sig = sigmas_karras(4, 0.01, 3.0, 7.0)
    x0 = torch.randn(2, 2) * 3
    for max_batch in (None, 2):                        # one call of both passes; or one call per pass
        G = ag.cfg(PreviousStepGuidance(D, 2.0), 2.0, uncond_labels=torch.zeros(1), max_batch=max_batch)
        with pytest.raises(ValueError, match=r"net of several passes.*PreviousStepGuidance\(cfg\(net, w_cfg\), w\)"):
            sample_heun(G, x0.clone(), sig, labels=torch.ones(2, 1), seeds=[0, 1], progress=False)
    outer = PreviousStepGuidance(ag.cfg(D, 2.0, uncond_labels=torch.zeros(1)), 2.0)
    out = sample_heun(outer, x0.clone(), sig, labels=torch.ones(2, 1), seeds=[0, 1], progress=False)
    assert torch.isfinite(out).all() and outer.stats["guided_rows"] > 0
    with pytest.raises(ValueError, match="give each image its own seed"):
        sample_heun(PreviousStepGuidance(D, 2.0), x0.clone(), sig, seeds=[3, 3], progress=False)


# -- SWG -----------------------------------------------------------------------------------------------------------

def test_swg_one_window_is_exact_and_windows_average():
    conv = ConvNet().eval()
    net = lambda x, s, l=None: conv(x) * s[:, None, None, None]
    x, s = torch.randn(2, 2, 6, 6), torch.tensor([0.5, 2.0])
    with torch.no_grad():
        assert torch.allclose(SlidingWindow(net, 6)(x, s), net(x, s), atol=1e-6)
        assert torch.allclose(SlidingWindow(net, 8)(x, s), net(x, s), atol=1e-6)
        got = SlidingWindow(net, 4, 2)(x, s)
        acc, cnt = torch.zeros_like(x), torch.zeros(6, 6)
        for t in (0, 2):
            for l in (0, 2):
                acc[:, :, t:t + 4, l:l + 4] += net(x[:, :, t:t + 4, l:l + 4], s)
                cnt[t:t + 4, l:l + 4] += 1
        assert torch.allclose(got, acc / cnt, atol=1e-6)
    assert window_starts(10, 4, 4) == [0, 4, 6] and window_starts(4, 8, 2) == [0]


def test_perturbation_table_builds_the_new_guides():
    assert isinstance(make_perturbation("seg", math.inf, "attn"), SmoothedAttention)
    assert isinstance(make_perturbation("tokenshuffle", 0.1, "a,b"), TokenShuffle)
    with pytest.raises(ValueError):
        make_perturbation("noisierlevel", 0.1, "a")


def test_free_guides_toy_command_smoke(tmp_path):
    from autoguidance.cli import main

    rc = main(["free-guides", "toy", "--out", str(tmp_path), "--n", "32", "--seeds", "1", "--rounds", "1",
               "--steps", "4"])
    assert rc == 0
    import json

    rec = json.loads((tmp_path / "free_guides.json").read_text())
    keys = {(r["family"], r["method"]) for r in rec["rows"]}
    assert ("denoiser", "sg-prev") in keys and ("logp", "selfguidance") in keys
    assert all(r["cost"]["ratio"] > 0 for r in rec["rows"]) and len(rec["search"]) == 2 * 17
    md = (tmp_path / "free_guides.md").read_text()
    assert "toy-claim search" in md and (tmp_path / "free_guides_pareto.png").stat().st_size > 1000


def test_free_guides_on_the_shipped_edm2_unet():
    import autoguidance as ag

    net = ag.load("digits-s-T-ema050")
    x, s = torch.randn(3, 1, 8, 8), torch.full((3,), 1.0)
    lab = torch.nn.functional.one_hot(torch.tensor([1, 2, 3]), 10).float()
    with torch.no_grad():
        exact = net(x, s, lab)
        for pert, differs in ((SmoothedAttention(0.0), False), (SmoothedAttention(math.inf), True),
                              (TokenShuffle(where="unet.enc.8x8_block0"), True)):
            keys = torch.arange(6, dtype=torch.int64)
            rows = torch.tensor([False] * 3 + [True] * 3)
            with pert.active(net, rows, keys, torch.ones(6)):
                out = net(torch.cat([x, x]), torch.cat([s, s]), torch.cat([lab, lab]))
            assert_batch_close(out[:3], exact)                                # exact rows untouched (6 rows vs 3)
            assert (not torch.allclose(out[3:], exact, atol=1e-4)) == differs
        assert torch.equal(SlidingWindow(net, 8)(x, s, lab), exact)        # one window: the same call
