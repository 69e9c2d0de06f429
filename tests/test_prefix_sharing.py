"""Prefix sharing (`autoguidance.perturb.prefix`): the network up to the first perturbed module runs once for the
exact and the degraded pass; results equal the unshared call up to the float rounding of kernels at another batch
size (`helpers.assert_batch_close`; bit for bit only where nothing is shared)."""
import torch

import autoguidance as ag
from autoguidance.nets.edm2 import EDM2Precond
from autoguidance.perturb import Dropout, InputNoise
from autoguidance.train.edm import digits_net_config

from conftest import assert_same_state, state_snapshot
from helpers import assert_batch_close


def _digits_net():
    torch.manual_seed(0)
    net = EDM2Precond(**digits_net_config("XXS", 10, 0.0))
    with torch.no_grad():
        net.unet.out_gain.fill_(1.0)
    return net.eval().requires_grad_(False)


def _last_sites(net, k):
    return [n for n, m in net.named_modules() if isinstance(m, torch.nn.Dropout)][-k:]


def _sample(D, n, shape, labels=None, steps=4, sigma_max=80.0):
    seeds = list(range(n))
    sig = ag.sigmas_karras(steps, sigma_max=sigma_max)
    x0 = ag.rng.StackedGenerators(seeds).randn(shape) * sig[0]
    with torch.no_grad():
        return ag.sample_heun(D, x0, sig, labels=labels, seeds=seeds, progress=False)


def test_shared_prefix_equals_the_unshared_call_on_a_unet():
    net = _digits_net()
    before = state_snapshot(net)
    for n, k in ((1, 1), (5, 4), (16, 4)):
        labels = torch.nn.functional.one_hot(torch.arange(n) % 10, 10).float()
        where = _last_sites(net, k)
        plain = ag.insitu(net, 2.0, 0.1, where=where)
        shared = ag.insitu(net, 2.0, 0.1, where=where, share_prefix=True)
        a, b = _sample(plain, n, [1, 8, 8], labels), _sample(shared, n, [1, 8, 8], labels)
        # every call after the run's first (which records the module order) shares its prefix
        assert shared.stats["shared_prefix_calls"] == shared.stats["forward_calls"] - 1 > 0
        assert_batch_close(b, a)                                 # the prefix ran on n rows instead of 2n
    assert_same_state(before, state_snapshot(net))


def test_shared_prefix_on_the_shipped_unet_equals_the_unshared_call():
    """The shipped digits U-Net at 16 rows per pass. On some CPUs N and 2N rows give the same bits
    (scripts/measure_batch_invariance.py), but no kernel promises it (issue 21: an AMD EPYC differed), so the
    samples are compared to float32 rounding."""
    net = ag.load("digits-s-T-ema050")
    labels = torch.nn.functional.one_hot(torch.arange(16) % 10, 10).float()
    where = _last_sites(net, 4)
    a = _sample(ag.insitu(net, 2.0, 0.1, where=where), 16, [1, 8, 8], labels)
    b = _sample(ag.insitu(net, 2.0, 0.1, where=where, share_prefix=True), 16, [1, 8, 8], labels)
    assert_batch_close(b, a)


class _Reuse(torch.nn.Module):
    """A net that calls one module before and after its perturbed site, and does tensor work between modules."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.emb = torch.nn.Linear(1, 8)
        self.a = torch.nn.Linear(2, 8)
        self.b = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.SiLU())
        self.drop = torch.nn.Dropout(0.0)
        self.c = torch.nn.Linear(8, 2)

    def forward(self, x, sigma, labels=None):
        e = self.emb(sigma.log()[:, None])
        y = self.b(self.a(x) + e)
        y = self.drop(y) * 1.5
        return x + self.c(y + self.emb(sigma.log()[:, None] * 2))      # emb again, after the site


def test_a_module_called_again_after_the_site_and_the_recorded_roots():
    net = _Reuse().eval().requires_grad_(False)
    plain = ag.insitu(net, 3.0, 0.2, where="drop")
    shared = ag.insitu(net, 3.0, 0.2, where="drop", share_prefix=True)
    a, b = _sample(plain, 16, [2], sigma_max=5.0), _sample(shared, 16, [2], sigma_max=5.0)
    assert shared.stats["shared_prefix_calls"] > 0
    assert_batch_close(b, a)
    assert all(len(m._forward_hooks) == 0 and len(m._forward_pre_hooks) == 0 for m in net.modules())


def test_what_cannot_be_shared_runs_unshared():
    net = _digits_net()
    labels = torch.nn.functional.one_hot(torch.arange(4) % 10, 10).float()
    # input noise changes the degraded rows' inputs: nothing to share
    D = ag.perturbation_guidance(net, 2.0, InputNoise(0.2), share_prefix=True)
    ref = ag.perturbation_guidance(net, 2.0, InputNoise(0.2))
    # nothing shared: the same calls as the unshared run, bit for bit
    assert torch.equal(_sample(D, 4, [1, 8, 8], labels), _sample(ref, 4, [1, 8, 8], labels))
    assert D.stats["shared_prefix_calls"] == 0
    # an explicit max_batch that splits the passes: no shared call
    D = ag.insitu(net, 2.0, 0.1, where=_last_sites(net, 2), share_prefix=True, max_batch=4)
    ref = ag.insitu(net, 2.0, 0.1, where=_last_sites(net, 2), max_batch=4)
    assert torch.equal(_sample(D, 4, [1, 8, 8], labels), _sample(ref, 4, [1, 8, 8], labels))
    assert D.stats["shared_prefix_calls"] == 0


class _TupleOut(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(2, 4)

    def forward(self, x):
        return self.lin(x), 3                                           # a non-tensor output: cannot duplicate


class _OddNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(2)
        self.first = _TupleOut()
        self.drop = torch.nn.Dropout(0.0)
        self.out = torch.nn.Linear(4, 2)

    def forward(self, x, sigma, labels=None):
        y, k = self.first(x)
        return x + self.out(self.drop(y * k)) * sigma[:, None]


def test_a_prefix_output_that_cannot_be_duplicated_falls_back_to_the_full_call():
    net = _OddNet().eval().requires_grad_(False)
    shared = ag.insitu(net, 3.0, 0.2, where="drop", share_prefix=True)
    plain = ag.insitu(net, 3.0, 0.2, where="drop")
    # every call that returns is a full unshared call (the shared one raised and was redone): bit for bit
    assert torch.equal(_sample(shared, 6, [2], sigma_max=5.0), _sample(plain, 6, [2], sigma_max=5.0))
    assert shared.stats["shared_prefix_calls"] == 0
    assert all(len(m._forward_hooks) == 0 and len(m._forward_pre_hooks) == 0 for m in net.modules())


def test_sharing_keeps_masks_of_the_plain_dropout():
    net = _digits_net()
    labels = torch.nn.functional.one_hot(torch.arange(3) % 10, 10).float()
    pert = Dropout(0.3, where=_last_sites(net, 3))
    a = _sample(ag.perturbation_guidance(net, 2.0, pert), 3, [1, 8, 8], labels)
    b = _sample(ag.perturbation_guidance(net, 2.0, pert, share_prefix=True), 3, [1, 8, 8], labels)
    assert_batch_close(b, a)


def test_late_site_variants_of_the_digits_study():
    from autoguidance.experiments.image_tables import late_sites

    net = _digits_net()
    every = [n for n, m in net.named_modules() if isinstance(m, torch.nn.Dropout)]
    assert late_sites(net, "all") == every
    assert late_sites(net, "last4") == every[-4:] and late_sites(net, "last1") == every[-1:]
    assert late_sites(net, "decoder") == [n for n in every if n.startswith("unet.dec.")]
