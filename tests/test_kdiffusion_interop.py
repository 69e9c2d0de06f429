"""Samplers beside EDM Heun (DPM-Solver++(2M) against k-diffusion), k-diffusion interop both ways, conditioning
mappings through guidance, and argument validation."""
from __future__ import annotations

import importlib.util
import math
import sys
import types
from pathlib import Path

import pytest
import torch

import autoguidance as ag
from autoguidance.sampling import sample_dpmpp_2m, sample_flow_euler
from autoguidance.toy import tree_mixture
from helpers import GaussianDenoiser


def _k_diffusion(*names):
    """k-diffusion's modules loaded on their own (its package __init__ imports torchvision, which does not import
    beside the CPU torch build): `sampling` and `external` need only `utils.append_dims` from the package."""
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None:
        pytest.skip("k-diffusion is not installed (pip install --no-deps k-diffusion torchdiffeq torchsde)")
    root = Path(spec.submodule_search_locations[0])
    pkg = sys.modules.get("_kd_interop") or types.ModuleType("_kd_interop")
    pkg.__path__ = [str(root)]
    utils = types.ModuleType("_kd_interop.utils")
    utils.append_dims = lambda x, n: x[(...,) + (None,) * (n - x.ndim)]
    sys.modules.setdefault("_kd_interop", pkg)
    sys.modules.setdefault("_kd_interop.utils", utils)
    pkg.utils = sys.modules["_kd_interop.utils"]
    out = []
    for name in names:
        full = f"_kd_interop.{name}"
        if full not in sys.modules:
            s = importlib.util.spec_from_file_location(full, root / f"{name}.py")
            mod = importlib.util.module_from_spec(s)
            sys.modules[full] = mod
            s.loader.exec_module(mod)
            setattr(pkg, name, mod)
        out.append(sys.modules[full])
    return out


def test_dpmpp_2m_equals_k_diffusion_on_the_shipped_toy_model():
    (kd,) = _k_diffusion("sampling")
    net = ag.load("toy-denoiser-main")
    x0 = tree_mixture("A").sample(256, 5.0, generator=torch.Generator().manual_seed(0))
    sig = ag.sigmas_karras(16, 0.002, 5.0, 7.0)
    with torch.no_grad():
        ours = sample_dpmpp_2m(net, x0.clone(), sig, progress=False)
        theirs = kd.sample_dpmpp_2m(lambda x, s: net(x, s), x0.clone(), kd.get_sigmas_karras(16, 0.002, 5.0, 7.0),
                                    disable=True)
    assert (ours - theirs).abs().max().item() < 1e-5
    assert ag.sampling.SAMPLERS["dpmpp_2m"] is sample_dpmpp_2m


def test_our_guided_denoiser_runs_in_k_diffusion_samplers():
    (kd,) = _k_diffusion("sampling")
    net, guide = GaussianDenoiser(0.3), GaussianDenoiser(0.1, 0.6)
    G = ag.autoguidance(net, guide, 2.0)
    x = torch.randn(8, 2) * 5
    sig = ag.sigmas_karras(8, 0.002, 5.0, 7.0)
    torch.testing.assert_close(kd.sample_dpmpp_2m(G, x, sig, disable=True), sample_dpmpp_2m(G, x, sig, progress=False),
                               atol=1e-5, rtol=0)


def test_k_diffusion_discrete_eps_wrapper_of_a_diffusers_unet_is_a_net_of_insitu():
    diffusers = pytest.importorskip("diffusers")
    (ext,) = _k_diffusion("external")
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=12, norm_num_groups=8, attention_head_dim=8).eval().requires_grad_(False)

    class Eps(torch.nn.Module):          # k-diffusion's wrappers expect the inner model to return eps
        def __init__(self, unet):
            super().__init__()
            self.unet = unet

        def forward(self, x, t, **kwargs):
            return self.unet(x, t, return_dict=False, **kwargs)[0]

    sched = diffusers.DDPMScheduler(num_train_timesteps=1000)
    kd_net = ext.DiscreteEpsDDPMDenoiser(Eps(unet), sched.alphas_cumprod, quantize=False)
    cond = {"encoder_hidden_states": torch.randn(2, 5, 12)}
    x, sigma = torch.randn(2, 4, 8, 8) * 3, torch.tensor([3.0, 3.0])
    G = ag.insitu(kd_net, 3.0, 0.1, where="*.ff.net.2")
    with torch.no_grad():
        out = G(x, sigma, cond)
        exact = kd_net(x, sigma, **cond)
        at_w1 = ag.insitu(kd_net, 1.0, 0.1, where="*.ff.net.2")(x, sigma, cond)
    assert G.stats["forward_calls"] == 1 and torch.isfinite(out).all() and not torch.allclose(out, exact)
    torch.testing.assert_close(at_w1, exact)
    with pytest.raises(TypeError, match="mapping"):
        G(x, sigma, torch.randn(2, 3))


def test_conditioning_mapping_through_cfg_with_explicit_uncond():
    class Net:
        def __call__(self, x, sigma, labels=None):
            return x * 0.5 + labels["e"].sum(dim=1, keepdim=True) + labels["p"]["q"]

    net = Net()
    x = torch.randn(3, 2)
    lab = {"e": torch.randn(3, 4), "p": {"q": torch.randn(3, 2)}}
    unc = {"e": torch.zeros(4)}                       # "p" is kept from the conditional rows
    out = ag.cfg(net, 3.0, uncond_labels=unc)(x, 0.5, lab)
    cond = net(x, 0.5, lab)
    u = net(x, 0.5, {"e": torch.zeros(3, 4), "p": lab["p"]})
    torch.testing.assert_close(out, u + 3.0 * (cond - u))
    with pytest.raises(ValueError, match=r"'p\.q' has shape \[2, 2\] but the batch has 3 rows"):
        ag.cfg(net, 3.0, uncond_labels=unc)(x, 0.5, {"e": lab["e"], "p": {"q": torch.randn(2, 2)}})


def test_flow_guidance_at_t1_and_schedules_at_sigma_inf():
    class FlowNet:                                       # x0 = x_t - t v with v = x_t (a toy velocity field)
        def __call__(self, x, sigma, labels=None):
            t = sigma / (1 + sigma)
            return (x / (1 + sigma)[:, None]) * (1 - t)[:, None]

        def flow(self, x_t, t, labels=None):
            return x_t - t[:, None] * x_t

    a, b = FlowNet(), FlowNet()
    for w in [2.0, ag.Interval(2.0, 0.5, math.inf), ag.Ramp(3.0, 1.0, 5.0, 0.05)]:
        G = ag.autoguidance(a, b, w)
        x = torch.randn(4, 2)
        torch.testing.assert_close(G.flow(x, 1.0), torch.zeros(4, 2))          # t = 1: x0 = x_t - v, finite
    G = ag.perturbation_guidance(a, 2.0, ag.perturb.InputNoise(0.5))      # moves inputs: converted via EDM form
    x = torch.randn(4, 2)
    with ag.rng.noise_context(torch.arange(4), 0):
        out = G.flow(x, torch.tensor([1.0, 0.5, 0.5, 0.2]))
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[0], torch.zeros(2))                     # t = 1 rows are left as they are
    assert not torch.allclose(out[1:], a.flow(x[1:], torch.tensor([0.5, 0.5, 0.2])))
    ts = torch.tensor([1.0, 0.5, 0.0])
    assert torch.isfinite(sample_flow_euler(ag.autoguidance(a, b, 2.0), torch.randn(4, 2), ts, progress=False)).all()
    with pytest.raises(ValueError, match="flow"):
        sample_flow_euler(GaussianDenoiser(), torch.randn(4, 2), ts, progress=False)


@pytest.mark.parametrize("call, match", [
    (lambda: ag.sigmas_karras(8, 0.002, 5.0, math.inf), "rho"),
    (lambda: ag.sigmas_karras(8, 0.002, 5.0, math.nan), "rho"),
    (lambda: ag.sigmas_karras(8, math.nan, 5.0), "sigma_min"),
    (lambda: ag.sample_heun(GaussianDenoiser(), torch.randn(2, 2), ag.sigmas_karras(4), S_churn=math.nan,
                            progress=False), "S_churn"),
    (lambda: ag.sample_euler(GaussianDenoiser(), torch.randn(2, 2), ag.sigmas_karras(4), S_noise=math.inf,
                             progress=False), "S_noise"),
    (lambda: ag.sample_heun(GaussianDenoiser(), torch.randn(2, 2), ag.sigmas_karras(4), S_min=math.nan,
                            progress=False), "S_min"),
    (lambda: ag.cfg_autoguidance(GaussianDenoiser(), GaussianDenoiser(), 2.0, True), "mixing ratio a"),
    (lambda: ag.autoguidance(GaussianDenoiser(), GaussianDenoiser(), 2.0, max_batch=True), "max_batch"),
    (lambda: ag.cfg(GaussianDenoiser(), 2.0)(torch.randn(2, 2), 1.0), "labels=None"),
])
def test_one_line_errors(call, match):
    with pytest.raises(ValueError, match=match) as e:
        call()
    assert "\n" not in str(e.value)
