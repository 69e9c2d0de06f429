"""The lean guided call (issue 14): the same numbers as the general per-row path, with less work per call."""
import numpy as np
import pytest
import torch

import autoguidance as ag
from autoguidance.guidance import CPU_SPLIT_ELEMENTS, split_passes
from autoguidance.nets.edm2 import EDM2Precond
from autoguidance.perturb import Dropout
from autoguidance.rng import (DropoutMasks, SamplingRun, _as_u64, current_keys, dropout_factors, dropout_factors_np,
                              dropout_scale, mix_keys, mix_keys_np, mix_keys_per_salt, mix_keys_per_salt_np,
                              noise_context)
from autoguidance.schedules import Constant, Interval, Ramp
from autoguidance.train.edm import digits_net_config

from conftest import assert_same_state, state_snapshot
from helpers import assert_batch_close, tiny_denoiser_mlp


def _digits_net(dropout=0.0):
    torch.manual_seed(0)
    net = EDM2Precond(**digits_net_config("XXS", 10, dropout))
    with torch.no_grad():
        net.unet.out_gain.fill_(1.0)
    return net.eval().requires_grad_(False)


def test_numpy_key_mixing_is_the_torch_mixing_bit_for_bit():
    keys = torch.tensor([0, 1, -1, 2**63 - 1, -2**63, 123456789012345], dtype=torch.int64)
    for salts in ((0xD120,), (5, -1), (3, 0xB10C, 7)):
        assert np.array_equal(mix_keys_np(_as_u64(keys), *salts).view(np.int64), mix_keys(keys, *salts).numpy())
    assert np.array_equal(mix_keys_per_salt_np(_as_u64(keys), range(5)).view(np.int64),
                          mix_keys_per_salt(keys, range(5)).numpy())


@pytest.mark.parametrize("numel", [1, 7, 64, 771])
@pytest.mark.parametrize("pad", [0, 3])
def test_dropout_factors_of_many_sites_are_the_per_site_masks(numel, pad):
    p = 0.1
    masks = DropoutMasks(torch.tensor(p))
    thr, inv = masks._params(torch.device("cpu"))
    keys = mix_keys(torch.arange(24), 9).view(4, 6)
    seeds32 = (((keys + (1 << 31)) & 0xFFFFFFFF) - (1 << 31)).to(torch.int32)
    f = dropout_factors(seeds32, numel, thr, inv, pad)
    g = dropout_factors_np(seeds32.numpy().view(np.uint32), numel, int(thr), int(inv), pad)
    ref = dropout_scale(keys.flatten(), [numel], torch.full((24,), p)).view(4, 6, numel)
    assert torch.equal(f, g)
    assert torch.equal(f[:, pad:], ref)
    assert bool((f[:, :pad] == 1).all())


def test_constant_schedules_say_so():
    assert Constant(2.5).constant() == 2.5
    assert Interval(2.0, 0.1, 1.0).constant() is None
    assert Ramp(3.0, 1.0).constant() is None


def _sample(D, n, shape, labels=None, steps=4, sigma_max=5.0, sampler=ag.sample_heun):
    seeds = list(range(100, 100 + n))
    sig = ag.sigmas_karras(steps, sigma_max=sigma_max)
    x0 = ag.rng.StackedGenerators(seeds).randn(shape) * sig[0]
    with torch.no_grad():
        return sampler(D, x0, sig, labels=labels, seeds=seeds, progress=False)


@pytest.mark.parametrize("n", [1, 5, 16])
@pytest.mark.parametrize("max_batch", [None, "half"])
def test_lean_insitu_equals_the_general_per_row_path(n, max_batch):
    """w = Interval(3, 0, inf) is 3 at every sigma but not declared constant: it takes the general path (rows read
    back, gathered, scattered; masks site by site); the constant w = 3 takes the lean one. Same numbers."""
    net = tiny_denoiser_mlp(dropout=0.1)
    mb = None if max_batch is None else max(1, n // 2)
    lean = ag.insitu(net, 3.0, 0.1, max_batch=mb)
    general = ag.insitu(net, Interval(3.0, 0.0, float("inf")), 0.1, max_batch=mb)
    # both paths make the same network calls (rows, order, chunks) with the same masks: bit for bit
    assert torch.equal(_sample(lean, n, [2], steps=6), _sample(general, n, [2], steps=6))
    assert lean.stats == general.stats


@pytest.mark.parametrize("mode", ["element", "channel"])
def test_lean_insitu_equals_the_general_path_on_a_unet(mode):
    net = _digits_net()
    labels = torch.nn.functional.one_hot(torch.arange(6) % 10, 10).float()
    lean = ag.insitu(net, 2.0, 0.2, mode=mode)
    general = ag.insitu(net, Interval(2.0, 0.0, float("inf")), 0.2, mode=mode)
    a = _sample(lean, 6, [1, 8, 8], labels, sigma_max=80.0)
    b = _sample(general, 6, [1, 8, 8], labels, sigma_max=80.0)
    assert torch.equal(a, b)                                      # the same network calls: bit for bit
    # the DPM-Solver++ sampler declares its run too (its call index is the step)
    a = _sample(lean, 6, [1, 8, 8], labels, sigma_max=80.0, sampler=ag.sample_dpmpp_2m)
    b = _sample(general, 6, [1, 8, 8], labels, sigma_max=80.0, sampler=ag.sample_dpmpp_2m)
    assert torch.equal(a, b)


def test_lean_call_outside_a_sampler_equals_the_general_path():
    net = tiny_denoiser_mlp(dropout=0.1)
    x, s = torch.randn(7, 2), torch.rand(7) + 0.1
    with torch.no_grad():
        a = ag.insitu(net, 3.0, 0.1)(x, s)
        b = ag.insitu(net, Interval(3.0, 0.0, float("inf")), 0.1)(x, s)
    assert torch.equal(a, b)


def test_constant_weight_makes_no_row_read_back(monkeypatch):
    """The lean call never asks which rows are guided or degraded (no nonzero: no host synchronisation)."""
    net = tiny_denoiser_mlp(dropout=0.1)
    D = ag.insitu(net, 3.0, 0.1)
    _sample(D, 4, [2])                                       # learn the sites' shapes in a first run

    def forbidden(*a, **k):
        raise AssertionError("nonzero called on the lean path")
    monkeypatch.setattr(torch, "nonzero", forbidden)
    _sample(D, 4, [2])
    _sample(ag.cfg(ag.load("digits-xs-T-ema050"), 2.0), 3, [1, 8, 8],
            torch.nn.functional.one_hot(torch.arange(3), 10).float(), sigma_max=80.0)


def test_unguided_is_the_net_and_counts_its_call():
    net = tiny_denoiser_mlp()
    U = ag.no_guidance(net)
    x, s = torch.randn(5, 2), torch.full((5,), 0.7)
    with torch.no_grad():
        assert torch.equal(U(x, s), net(x, s))
    assert U.stats["main"] == 5 and U.stats["forward_calls"] == 1
    ident = ag.no_guidance(lambda x, s, l=None: x)
    assert ident(x, s) is not x                                   # always a fresh tensor, as before
    D = ag.insitu(net, 1.0, 0.1)                                  # w = 1: the guide is skipped entirely
    with torch.no_grad():
        assert torch.equal(D(x, s), net(x, s))
    assert D.stats["guide0"] == 0


def test_a_sigma_the_sampler_did_not_declare_is_still_checked():
    D = ag.insitu(tiny_denoiser_mlp(), 3.0, 0.1)
    x = torch.randn(3, 2)
    with pytest.raises(ValueError, match="finite and > 0"):
        D(x, torch.tensor([1.0, 0.0, 1.0]))
    sig = torch.ones(3)
    with noise_context(torch.arange(3), 0, SamplingRun(), sig), pytest.raises(ValueError, match="finite and > 0"):
        D(x, torch.tensor([1.0, float("nan"), 1.0]))


def test_current_keys_in_numpy_equal_the_torch_keys():
    seeds = torch.tensor([5, 9, 2**40, -7])
    with noise_context(seeds, 11, SamplingRun()):
        assert torch.equal(current_keys(4), mix_keys(seeds, 11))
    assert torch.equal(current_keys(3), mix_keys(torch.arange(3), -1))


def test_default_call_policy():
    """One call of 2N rows by default; on a CPU two calls of N rows from CPU_SPLIT_ELEMENTS input elements per pass;
    an explicit max_batch always wins."""
    small, big = torch.zeros(16, 1, 8, 8), torch.zeros(CPU_SPLIT_ELEMENTS // 64, 1, 8, 8)
    assert not split_passes(len(small), small) and split_passes(len(big), big)
    assert not split_passes(1024, torch.zeros(1024, 2))           # the toy MLP: one call up to 8192 rows
    net = tiny_denoiser_mlp(dropout=0.1)
    n = CPU_SPLIT_ELEMENTS // 2
    x, s = torch.randn(n, 2), torch.ones(n)
    D = ag.insitu(net, 3.0, 0.1)
    with torch.no_grad():
        a = D(x, s)
    assert D.stats["forward_calls"] == 2
    E = ag.insitu(net, 3.0, 0.1, max_batch=2 * n)
    with torch.no_grad():
        b = E(x, s)
    assert E.stats["forward_calls"] == 1
    assert_batch_close(b, a)                                      # one call of 2N rows against two of N


def test_model_left_as_found_and_masks_per_seed_after_lean_sampling():
    net = tiny_denoiser_mlp(dropout=0.1)
    before = state_snapshot(net)
    D = ag.insitu(net, 3.0, 0.1)
    a = _sample(D, 8, [2])
    assert_same_state(before, state_snapshot(net))
    # row i depends on its seed only: the same seeds in another batch give the same rows (up to the net's rounding)
    seeds = list(range(100, 108))
    sig = ag.sigmas_karras(4, sigma_max=5.0)
    x0 = ag.rng.StackedGenerators(seeds).randn([2]) * sig[0]
    with torch.no_grad():
        b = torch.cat([ag.sample_heun(D, x0[:3], sig, seeds=seeds[:3], progress=False),
                       ag.sample_heun(D, x0[3:], sig, seeds=seeds[3:], progress=False)])
    assert_batch_close(b, a)


def test_a_subclass_that_changes_hooks_gets_them_called_on_the_lean_path():
    calls = []

    class Counting(Dropout):
        def _hooks(self, model, rows, keys, sigma):
            calls.append(int(rows.sum()))
            return super()._hooks(model, rows, keys, sigma)
    net = tiny_denoiser_mlp(dropout=0.1)
    D = ag.perturbation_guidance(net, 3.0, Counting(0.1))
    with torch.no_grad():
        D(torch.randn(4, 2), torch.ones(4))
    assert calls == [4]
