import pytest
import torch

import autoguidance as ag
from autoguidance.perturb import Dropout, SiteError, find_sites, list_sites
from autoguidance.rng import hash_normal, hash_uniform, mix_keys
from conftest import assert_same_state, state_snapshot
from helpers import assert_batch_close, tiny_denoiser_mlp


def _rows(n, on=True):
    return torch.full((n,), on, dtype=torch.bool)


def test_dropout_changes_output_only_when_on_and_reproduces_from_keys():
    net = tiny_denoiser_mlp()
    x, s = torch.randn(8, 2), torch.full((8,), 0.5)
    keys = mix_keys(torch.arange(8), 3)
    clean = net(x, s)
    with Dropout(0.3).active(net, _rows(8), keys, s):
        a = net(x, s)
    with Dropout(0.3).active(net, _rows(8), keys, s):
        b = net(x, s)
    with Dropout(0.3).active(net, _rows(8), mix_keys(torch.arange(8), 4), s):
        c = net(x, s)
    with Dropout(0.0).active(net, _rows(8), keys, s):
        zero = net(x, s)
    with Dropout(0.3).active(net, _rows(8, False), keys, s):
        off = net(x, s)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert (a - clean).abs().min() > 0 and torch.equal(zero, clean) and torch.equal(off, clean)
    assert torch.equal(net(x, s), clean)       # nothing left behind


def test_dropout_rate_and_rescale():
    lin = torch.nn.Sequential(torch.nn.Identity())
    x = torch.ones(4, 20000)
    with Dropout(0.25, where="0").active(lin, _rows(4), torch.arange(4), torch.ones(4)):
        y = lin(x)
    kept = (y != 0).float().mean().item()
    assert abs(kept - 0.75) < 0.01 and torch.allclose(y[y != 0], torch.tensor(1 / 0.75))


def test_channel_mode_drops_whole_channels():
    m = torch.nn.Sequential(torch.nn.Identity())
    x = torch.ones(2, 64, 4, 4)
    with Dropout(0.5, where="0", mode="channel").active(m, _rows(2), torch.arange(2), torch.ones(2)):
        y = m(x)
    per_channel = y.flatten(2)
    assert torch.all(per_channel.amin(2) == per_channel.amax(2))  # constant within each channel
    assert 0 < (per_channel[..., 0] == 0).float().mean() < 1


def test_per_row_masks_do_not_depend_on_batch_neighbours():
    net = tiny_denoiser_mlp()
    x, s = torch.randn(6, 2), torch.full((6,), 0.5)
    keys = mix_keys(torch.arange(6), 1)
    with Dropout(0.3).active(net, _rows(6), keys, s):
        full = net(x, s)
    with Dropout(0.3).active(net, _rows(2), keys[4:], s[4:]):
        tail = net(x[4:], s[4:])
    assert_batch_close(tail, full[4:])


def test_a_net_without_dropout_layers_is_guided_by_naming_sites():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(2, 32), torch.nn.SiLU(), torch.nn.Linear(32, 2))
    D = lambda x, sigma, labels=None: x - net(x)
    x = torch.randn(5, 2)
    g = ag.insitu(D, 3.0, 0.2, where="1", module=net)
    out = g(x, 0.5)
    assert not torch.allclose(out, D(x, 0.5))
    with pytest.raises(TypeError, match="pass module="):
        ag.insitu(D, 3.0, 0.2, where="1")(x, 0.5)
    with pytest.raises(SiteError, match="has no module of type"):
        ag.insitu(D, 3.0, 0.2, module=net)(x, 0.5)    # default sites: nn.Dropout, of which it has none


def test_unknown_site_lists_close_matches():
    net = tiny_denoiser_mlp()
    with pytest.raises(SiteError, match=r"raw\.trunk\.drop0"):
        find_sites(net, ["raw.trunk.dorp0"])
    with pytest.raises(SiteError, match="matches nothing"):
        find_sites(net, "nothing.*")
    assert [p for p, _ in find_sites(net, "raw.trunk.act*")] == ["raw.trunk.act0", "raw.trunk.act1"]


def test_list_sites_reports_types_and_shapes():
    net = tiny_denoiser_mlp()
    rows = {r["path"]: r for r in list_sites(net, torch.zeros(3, 2), 1.0)}
    assert rows["raw.trunk.drop1"]["type"] == "Dropout" and rows["raw.trunk.drop1"]["output_shape"] == [3, 16]
    assert rows["raw.out"]["output_shape"] == [3, 2]
    assert all(len(m._forward_hooks) == 0 for m in net.modules())


@pytest.mark.parametrize("family", ["toy-logp-guide", "toy-denoiser-guide"])
def test_model_state_is_bit_identical_after_insitu_sampling(family):
    net = ag.load(family)
    before = state_snapshot(net)
    ag.generate(ag.insitu(net, 3.0, 0.1), range(64), [2], num_steps=4, sigma_max=5.0, progress=False)
    assert_same_state(before, state_snapshot(net))


class _Exploding(Dropout):
    def _hooks(self, model, rows, keys, sigma):
        def boom(mod, inp, out):
            raise RuntimeError("boom inside the degraded pass")
        return super()._hooks(model, rows, keys, sigma) + [(model.raw.trunk.act1, boom)]


def test_model_state_is_bit_identical_after_an_exception_in_the_degraded_pass():
    net = tiny_denoiser_mlp(dropout=0.1)
    net.train(False)
    net.raw.trunk.drop0.train(True)   # an unusual mix of modes must survive too
    before = state_snapshot(net)
    D = ag.perturbation_guidance(net, 3.0, _Exploding(0.1))
    with pytest.raises(RuntimeError, match="boom"):
        ag.generate(D, range(8), [2], num_steps=3, progress=False)
    assert_same_state(before, state_snapshot(net))


def test_hash_rng_is_deterministic_and_uniform():
    k = mix_keys(torch.arange(4), 7)
    u = hash_uniform(k, (50000,))
    assert torch.equal(u, hash_uniform(k, (50000,)))
    assert 0 <= u.min() and u.max() < 1 and abs(u.mean().item() - 0.5) < 0.01
    z = hash_normal(k, (50000,))
    assert abs(z.mean().item()) < 0.02 and abs(z.std().item() - 1) < 0.02
    assert not torch.equal(hash_uniform(k[:1], (10,)), hash_uniform(k[1:2], (10,)))
