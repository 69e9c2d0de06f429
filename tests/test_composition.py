"""Issue 21, item 14: a guided denoiser is a denoiser, also inside another guided denoiser on the same module.

Each composition is checked against a reference written by hand from separate network calls (each perturbation
switched on with `Perturbation.active` over every row, keys `current_keys(N)` of the image seeds), so it checks that
each perturbation acts on exactly the rows it means and that the randomness is each image's own. The guided call
runs the net at other batch compositions than the reference: compared with `assert_batch_close`.
"""
from __future__ import annotations

import pytest
import torch

import autoguidance as ag
from autoguidance.nets.edm2 import EDM2Precond
from autoguidance.perturb import Dropout, InputNoise, SiteError, WeightNoise
from autoguidance.rng import SamplingRun, current_keys, noise_context
from autoguidance.train.edm import digits_net_config

from conftest import assert_same_state, state_snapshot
from helpers import assert_batch_close, tiny_denoiser_mlp

N = 6
SEEDS = torch.arange(100, 100 + N)


def _digits_net(seed=0, dropout=0.1):
    torch.manual_seed(seed)
    net = EDM2Precond(**digits_net_config("XXS", 10, dropout))
    with torch.no_grad():
        net.unet.out_gain.fill_(1.0)
    return net.eval().requires_grad_(False)


def _under(net, perts, x, sigma, labels=None):
    """`net(x, sigma, labels)` with every perturbation of `perts` on every row (entered in order), keys of the
    current noise context."""
    keys = current_keys(len(x))
    every = torch.ones(len(x), dtype=torch.bool)
    with torch.no_grad():
        ctxs = [p.active(net, every, keys, sigma) for p in perts]
        for c in ctxs:
            c.__enter__()
        try:
            return net(x, sigma) if labels is None else net(x, sigma, labels)
        finally:
            for c in reversed(ctxs):
                c.__exit__(None, None, None)


def _guide(good, bad, w):
    return good + (w - 1) * (good - bad)


def _calls(D, x, sigma, labels=None, calls=3):
    """`D` at a few denoiser calls of one sampling run (the per-call keys change), with its inputs."""
    run = SamplingRun()
    out = []
    for call in range(calls):
        with noise_context(SEEDS, call, run), torch.no_grad():
            out.append(D(x, sigma) if labels is None else D(x, sigma, labels))
    return out


def _references(fn, calls=3):
    out = []
    for call in range(calls):
        with noise_context(SEEDS, call, SamplingRun()):
            out.append(fn())
    return out


def test_insitu_inside_perturbation_guidance_on_the_same_module():
    """The issue's case: it crashed (dropout factors of N rows on a 2N-row call) inside a sampler and silently
    degraded the wrong rows outside one."""
    net = tiny_denoiser_mlp(dropout=0.1, width=32)
    inner_p, outer_p = Dropout(0.1), Dropout(0.3, where="raw.trunk.act*")
    D = ag.perturbation_guidance(ag.perturbation_guidance(net, 2.0, inner_p), 1.5, outer_p, module=net)
    x, sigma = torch.randn(N, 2), torch.full((N,), 0.8)

    def ref():
        plain = _guide(_under(net, [], x, sigma), _under(net, [inner_p], x, sigma), 2.0)
        bad = _guide(_under(net, [outer_p], x, sigma), _under(net, [outer_p, inner_p], x, sigma), 2.0)
        return _guide(plain, bad, 1.5)
    before = state_snapshot(net)
    for got, want in zip(_calls(D, x, sigma), _references(ref)):
        assert_batch_close(got, want)
    assert_same_state(before, state_snapshot(net))
    with torch.no_grad():                         # outside a sampler: the row index stands for the seed
        want = ref()
        assert_batch_close(D(x, sigma), want)


@pytest.mark.parametrize("outer_p, inner_p", [
    (WeightNoise(0.2, where="raw.trunk.fc0"), Dropout(0.2)),
    (Dropout(0.3, where="raw.trunk.act*"), InputNoise(0.2)),
    (InputNoise(0.2), Dropout(0.2)),
], ids=["weightnoise-around-dropout", "dropout-around-inputnoise", "inputnoise-around-dropout"])
def test_two_perturbations_on_one_module(outer_p, inner_p):
    net = tiny_denoiser_mlp(dropout=0.1, width=16)
    D = ag.perturbation_guidance(ag.perturbation_guidance(net, 2.5, inner_p, module=net), 2.0, outer_p, module=net)
    x, sigma = torch.randn(N, 2), torch.full((N,), 1.3)

    def under(perts):
        """`_under` with input noise applied as the sampler's rows would be (its transform, keys of the rows)."""
        xs, ss, hooked = x, sigma, []
        for p in perts:
            if isinstance(p, InputNoise):
                xs, ss = p.transform_inputs(xs, ss, torch.ones(N, dtype=torch.bool), current_keys(N))
            else:
                hooked.append(p)
        return _under(net, hooked, xs, ss)

    def ref():
        plain = _guide(under([]), under([inner_p]), 2.5)
        bad = _guide(under([outer_p]), under([outer_p, inner_p]), 2.5)
        return _guide(plain, bad, 2.0)
    before = state_snapshot(net)
    for got, want in zip(_calls(D, x, sigma), _references(ref)):
        assert_batch_close(got, want)
    assert_same_state(before, state_snapshot(net))


def test_cfg_around_autoguidance():
    net, guide = _digits_net(0), _digits_net(1)
    D = ag.cfg(ag.autoguidance(net, guide, 2.0), 1.5)
    x, sigma = torch.randn(N, 1, 8, 8), torch.full((N,), 1.1)
    labels = torch.nn.functional.one_hot(torch.arange(N) % 10, 10).float()
    zero = torch.zeros_like(labels)

    def ref():
        cond = _guide(_under(net, [], x, sigma, labels), _under(guide, [], x, sigma, labels), 2.0)
        uncond = _guide(_under(net, [], x, sigma, zero), _under(guide, [], x, sigma, zero), 2.0)
        return _guide(cond, uncond, 1.5)
    for got, want in zip(_calls(D, x, sigma, labels, calls=1), _references(ref, calls=1)):
        assert_batch_close(got, want)


def test_cfg_around_insitu_keys_each_image_by_its_seed():
    """CFG's batched call of 2N rows reaches the in-situ denoiser inside it: both halves get the image's own
    masks (before: row-index keys, so an image's masks depended on its batch position)."""
    net = _digits_net(0)
    drop = Dropout(0.2)
    D = ag.cfg(ag.perturbation_guidance(net, 2.0, drop), 1.5)
    x, sigma = torch.randn(N, 1, 8, 8), torch.full((N,), 0.9)
    labels = torch.nn.functional.one_hot(torch.arange(N) % 10, 10).float()
    zero = torch.zeros_like(labels)

    def ref():
        cond = _guide(_under(net, [], x, sigma, labels), _under(net, [drop], x, sigma, labels), 2.0)
        uncond = _guide(_under(net, [], x, sigma, zero), _under(net, [drop], x, sigma, zero), 2.0)
        return _guide(cond, uncond, 1.5)
    for got, want in zip(_calls(D, x, sigma, labels, calls=2), _references(ref, calls=2)):
        assert_batch_close(got, want)


def test_autoguidance_whose_guide_is_guided_on_a_row_subset():
    """The interval selects some rows (per-row sigma): the guide pass, itself an in-situ guided denoiser, gets
    those rows only, with their own images' keys (before: the keys of rows 0..M-1)."""
    net, gnet = tiny_denoiser_mlp(seed=0, width=32), tiny_denoiser_mlp(seed=1, dropout=0.1, width=16)
    drop = Dropout(0.2)
    D = ag.autoguidance(net, ag.perturbation_guidance(gnet, 2.0, drop), 2.5, interval=(0.5, 2.0))
    x = torch.randn(N, 2)
    sigma = torch.tensor([0.3, 1.0, 3.0, 1.5, 0.7, 0.2])          # rows 1, 3, 4 inside (0.5, 2]
    inside = (sigma > 0.5) & (sigma <= 2.0)

    def ref():
        main = _under(net, [], x, sigma)
        G = _guide(_under(gnet, [], x, sigma), _under(gnet, [drop], x, sigma), 2.0)
        return torch.where(inside[:, None], _guide(main, G, 2.5), main)
    for got, want in zip(_calls(D, x, sigma), _references(ref)):
        assert_batch_close(got, want)


def test_nested_sampling_is_per_image():
    """An image's sample does not depend on the batch it is in, with the inner perturbation on the outer's module."""
    net = tiny_denoiser_mlp(dropout=0.1, width=16)
    D = ag.perturbation_guidance(ag.insitu(net, 2.0, 0.2), 1.5, Dropout(0.3, where="raw.trunk.act*"), module=net)
    kw = dict(num_steps=4, sigma_max=5.0, progress=False)
    with torch.no_grad():
        whole = ag.generate(D, range(5), [2], batch=5, **kw)
        for batch in (2, 1):
            assert_batch_close(ag.generate(D, range(5), [2], batch=batch, **kw), whole)


def test_outer_prefix_sharing_falls_back_to_the_unshared_call():
    """The outer's prefix sharing cannot cut a call it does not make (the inner's passes are separate calls of the
    module): the call is redone unshared, so the result is the unshared one."""
    net = _digits_net(0)
    inner = ag.insitu(net, 2.0, 0.2)
    where = ["unet.dec.8x8_block1"]
    kw = dict(labels=torch.nn.functional.one_hot(torch.arange(3), 10).float(), num_steps=3, progress=False)
    shared = ag.perturbation_guidance(inner, 1.5, Dropout(0.3, where=where), module=net, share_prefix=True)
    plain = ag.perturbation_guidance(inner, 1.5, Dropout(0.3, where=where), module=net)
    with torch.no_grad():
        a = ag.generate(shared, range(3), [1, 8, 8], **kw)
        b = ag.generate(plain, range(3), [1, 8, 8], **kw)
    assert_batch_close(a, b)
    assert shared.stats["shared_prefix_calls"] == 0


def test_what_cannot_compose_is_refused_in_one_line_and_the_model_is_left_as_found():
    net = tiny_denoiser_mlp(dropout=0.1, width=16)
    x, sigma = torch.randn(N, 2), torch.full((N,), 0.8)
    before = state_snapshot(net)
    # weight noise recomputes its site row by row: a dropout site inside it cannot act there
    D = ag.perturbation_guidance(ag.insitu(net, 2.0, 0.2), 1.5, WeightNoise(0.1, where="raw.trunk", params="*weight"),
                                 module=net)
    with torch.no_grad(), pytest.raises(SiteError, match=r"contains 'raw\.trunk\.drop0'.*do not contain each other") as e:
        D(x, sigma)
    assert "\n" not in str(e.value)
    assert_same_state(before, state_snapshot(net))
    # an inner max_batch would split the call the outer's hooks expect whole
    D = ag.perturbation_guidance(ag.insitu(net, 2.0, 0.2, max_batch=2), 1.5, Dropout(0.3, where="raw.trunk.act*"),
                                 module=net)
    with torch.no_grad(), pytest.raises(ValueError, match=r"max_batch=2 splits a call of 12 rows.*outermost") as e:
        D(x, sigma)
    assert "\n" not in str(e.value)
    assert_same_state(before, state_snapshot(net))
    # two weight noises on one site
    D = ag.perturbation_guidance(ag.perturbation_guidance(net, 2.0, WeightNoise(0.1, where="raw.trunk.fc0")), 1.5,
                                 WeightNoise(0.2, where="raw.trunk.fc0"), module=net)
    with torch.no_grad(), pytest.raises(SiteError, match=r"two weight noise perturbations on site 'raw\.trunk\.fc0'") as e:
        D(x, sigma)
    assert "\n" not in str(e.value)
    assert_same_state(before, state_snapshot(net))
    with torch.no_grad():                             # and it still works afterwards
        ag.insitu(net, 2.0, 0.2)(x, sigma)
    assert_same_state(before, state_snapshot(net))
