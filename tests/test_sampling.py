import importlib.util
import sys
import types
from pathlib import Path

import pytest
import torch

import autoguidance as ag
from autoguidance.toy import tree_mixture
from helpers import GaussianDenoiser, assert_batch_close, tiny_denoiser_mlp


def _k_diffusion_sampling():
    """Load k-diffusion's `sampling` module on its own: the package's __init__ imports torchvision, which does
    not import beside the CPU torch build. `sampling` needs only `utils.append_dims` from its package."""
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None:
        pytest.skip("k-diffusion is not installed (pip install --no-deps k-diffusion torchdiffeq torchsde)")
    root = Path(spec.submodule_search_locations[0])
    pkg = types.ModuleType("_kd_alone")
    pkg.__path__ = [str(root)]
    utils = types.ModuleType("_kd_alone.utils")
    utils.append_dims = lambda x, n: x[(...,) + (None,) * (n - x.ndim)]
    sys.modules.setdefault("_kd_alone", pkg)
    sys.modules.setdefault("_kd_alone.utils", utils)
    s = importlib.util.spec_from_file_location("_kd_alone.sampling", root / "sampling.py")
    mod = importlib.util.module_from_spec(s)
    s.loader.exec_module(mod)
    return mod


def test_sigmas_karras_is_edm_eq5():
    s = ag.sigmas_karras(32, 0.002, 5.0, 7.0)
    assert len(s) == 33 and s[-1] == 0
    assert s[0].item() == pytest.approx(5.0) and s[31].item() == pytest.approx(0.002)
    i = 10
    expect = (5.0 ** (1 / 7) + i / 31 * (0.002 ** (1 / 7) - 5.0 ** (1 / 7))) ** 7
    assert s[i].item() == pytest.approx(expect, rel=1e-6)


@pytest.mark.parametrize("name", ["toy-logp-main", "toy-denoiser-main"])
def test_heun_equals_k_diffusion_on_the_shipped_toy_model(name):
    kd = _k_diffusion_sampling()
    net = ag.load(name)
    x0 = tree_mixture("A").sample(512, 5.0, generator=torch.Generator().manual_seed(0))
    ours = ag.sample_heun(net, x0.clone(), ag.sigmas_karras(32, 0.002, 5.0, 7.0), progress=False)
    sig = kd.get_sigmas_karras(32, 0.002, 5.0, 7.0)
    with torch.no_grad():
        theirs = kd.sample_heun(lambda x, s: net(x, s), x0.clone(), sig, disable=True)
    assert (ours - theirs).abs().max().item() < 1e-5


def test_euler_and_heun_with_churn_against_k_diffusion():
    kd = _k_diffusion_sampling()
    net = GaussianDenoiser()
    x0 = torch.randn(16, 2) * 5
    sig = ag.sigmas_karras(8, 0.002, 5.0, 7.0)
    torch.testing.assert_close(ag.sample_euler(net, x0, sig, progress=False),
                               kd.sample_euler(lambda x, s: net(x, s), x0, sig, disable=True), atol=1e-5, rtol=0)
    # churn: the same noise must be used, so feed k-diffusion our per-image draws through the same generators
    from autoguidance.rng import StackedGenerators
    seeds = torch.arange(16)
    ours = ag.sample_heun(net, x0, sig, seeds=seeds, S_churn=4.0, S_min=0.05, S_max=2.0, progress=False)

    class Noise:
        def __init__(self):
            self.g = StackedGenerators(seeds)

    noise = Noise()
    orig = torch.randn_like
    try:
        torch.randn_like = lambda x, **kw: noise.g.randn_like(x)
        theirs = kd.sample_heun(lambda x, s: net(x, s), x0, sig, s_churn=4.0, s_tmin=0.05, s_tmax=2.0, disable=True)
    finally:
        torch.randn_like = orig
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_per_image_seeds_do_not_depend_on_batching():
    net = tiny_denoiser_mlp()
    D = ag.insitu(net, 3.0, 0.1)  # perturbation masks are per image too
    kw = dict(num_steps=6, sigma_max=5.0, S_churn=2.0, progress=False)
    whole = ag.generate(D, range(1000), [2], **kw)
    parts = ag.generate(D, range(1000), [2], batch=250, **kw)
    assert_batch_close(parts, whole)                     # the net's matmuls at 2000 rows against 500
    # and a different seed range gives different samples
    assert not torch.equal(whole[:10], ag.generate(D, range(1000, 1010), [2], **kw))


def test_callback_and_call_count():
    net = GaussianDenoiser()
    seen = []
    ag.sample_heun(net, torch.randn(4, 2), ag.sigmas_karras(5, 0.01, 2.0), callback=seen.append, progress=False)
    assert [d["i"] for d in seen] == list(range(5)) and seen[-1]["sigma_next"] == 0
    assert len(net.calls) == 2 * 5 - 1            # Heun: no correction on the last step


@pytest.mark.parametrize("kw, match", [
    (dict(num_steps=0), "num_steps must be a positive integer"),
    (dict(sigma_min=2.0, sigma_max=1.0), "inverted"),
    (dict(sigma_min=0.0), "must be finite and > 0"),
    (dict(sigma_min=-1.0), "must be finite and > 0"),
])
def test_bad_schedule_settings(kw, match):
    with pytest.raises(ValueError, match=match):
        ag.sigmas_karras(**{**dict(num_steps=8, sigma_min=0.002, sigma_max=5.0), **kw})


@pytest.mark.parametrize("kw, match", [
    (dict(batch=0), r"batch must be a positive integer .*got 0"),
    (dict(batch=-1), r"batch must be a positive integer .*got -1"),
    (dict(batch=2.5), r"batch must be a positive integer"),
    (dict(batch=True), r"batch must be a positive integer"),
    (dict(num_steps=0), r"num_steps must be a positive integer"),
    (dict(num_steps=True), r"num_steps must be a positive integer"),
    (dict(num_steps=2.5), r"num_steps must be a positive integer"),
    (dict(seeds=[3, -1]), r"seeds must be integers >= 0 .*got -1"),
    (dict(seeds=[0.5, 1.0]), r"seeds must be a 1-D sequence of integers"),
    (dict(shape=2), r"shape must be one sample's shape"),
    (dict(shape=[]), r"shape must be one sample's shape"),
    (dict(shape=[0, 2]), r"shape must be one sample's shape"),
    (dict(shape=[2.0]), r"shape must be one sample's shape"),
    (dict(labels=torch.zeros(3, 1)), r"labels has shape \[3, 1\] for 4 seeds"),
    (dict(labels={"c": torch.zeros(3, 1)}), r"labels entry 'c' has shape \[3, 1\] but the batch has 4 rows"),
    (dict(sigma_min=0.0), r"sigma_min and sigma_max must be finite and > 0"),
    (dict(sigma_max=float("inf")), r"sigma_min and sigma_max must be finite and > 0"),
    (dict(sigma_min=3.0, sigma_max=2.0), r"inverted"),
    (dict(rho=0.0), r"rho must be"),
])
def test_generate_refuses_bad_arguments_in_one_line(kw, match):
    """Issue 21, item 16: batch=0 was read as "all at once" and batch=-1 returned an empty result; every argument
    of generate is checked before anything runs."""
    net = GaussianDenoiser()
    args = {**dict(seeds=range(4), shape=[2], num_steps=2), **kw}
    with pytest.raises(ValueError, match=match) as e:
        ag.generate(net, args.pop("seeds"), args.pop("shape"), progress=False, **args)
    assert "\n" not in str(e.value)
    assert not net.calls                                  # refused before the first denoiser call


def test_generate_accepts_what_it_documents():
    net = GaussianDenoiser()
    kw = dict(num_steps=2, sigma_max=5.0, progress=False)
    whole = ag.generate(net, range(5), (2,), **kw)
    assert whole.shape == (5, 2)
    assert torch.equal(ag.generate(net, range(5), torch.Size([2]), batch=2.0, **kw), whole)   # exact per-row ops
    assert ag.generate(net, [], [2], **kw).shape == (0, 2)


def test_bad_sampler_inputs():
    net = GaussianDenoiser()
    with pytest.raises(ValueError, match="one seed per row"):
        ag.sample_heun(net, torch.randn(4, 2), ag.sigmas_karras(4), seeds=[1, 2], progress=False)
    with pytest.raises(ValueError, match="decreasing"):
        ag.sample_heun(net, torch.randn(4, 2), torch.tensor([1.0, 2.0, 0.0]), progress=False)
    with pytest.raises(ValueError, match="unknown sampler"):
        ag.generate(net, range(2), [2], sampler="dpm")
