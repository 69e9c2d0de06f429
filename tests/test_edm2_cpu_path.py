"""The EDM2 path end to end on CPU, with small random networks in place of the official checkpoints:

preset -> scaled-down EDM2 nets -> official-format state dict + settings -> `import_edm2` -> `autoguidance.load`
-> `build_preset` -> `generate` -> (img512) decode with a tiny AutoencoderKL built from a config.

Plus the in-situ checks: dropout goes exactly where EDM2 trains it (inside every block's residual branch), no
other module is touched, and the stored weights stay bit-identical (nothing switches EDM2's layers to training
mode, where they would rewrite their weights).
"""
from __future__ import annotations

import json

import pytest
import torch

import autoguidance as ag
from autoguidance.edm2.convert import import_edm2
from autoguidance.edm2.latent import (FINAL_STD, RAW_MEAN, RAW_STD, StabilityVAEDecoder, VAEUnavailable, decode_latents,
                                 latents_to_raw, load_vae, raw_to_latents)
from autoguidance.nets.edm2 import EDM2Block, EDM2Precond, preset_config
from autoguidance.edm2.presets import build_preset, edm2_dropout_sites, get_preset
from conftest import assert_same_state, state_snapshot
from helpers import assert_batch_close

#: The papers' architectures scaled down: 8x8 inputs, two levels, tiny widths; everything else (channels,
#: label_dim, dropout of the size) stays as the preset says.
SCALE = dict(img_resolution=8, model_channels=8, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4],
             channels_per_head=8, logvar_channels=8, use_fp16=False)
STEPS = 6     # sigmas 80, 24.4, 5.84, 0.965, 0.085, 0.002: one step inside every guidance interval
#: One preset per method (and per kind of net): every guidance method runs through the same code.
RUN = ["edm2-img512-s-fid", "edm2-img512-s-guid-fid", "edm2-img512-s-interval-fid", "edm2-img512-s-autog-fid",
       "edm2-img512-s-uncond-autog-fid", "edm2-img64-s-autog-fid", "edm2-img512-s-insitu", "edm2-img512-m-insitu"]


def small_edm2(arch: str, label_dim: int, seed: int = 0) -> tuple[EDM2Precond, dict]:
    """A random EDM2 net of architecture `arch` scaled down by SCALE, with every scalar gain (out_gain, emb_gain;
    0 at initialisation) set to U(0.3, 1.5) so that every path matters. Returns (net in eval mode, settings)."""
    torch.manual_seed(seed)
    cfg = preset_config(arch, label_dim=label_dim, **SCALE)
    net = EDM2Precond(**cfg)
    with torch.no_grad():
        for p in net.parameters():
            if p.ndim == 0:
                p.uniform_(0.3, 1.5)
    return net.eval().requires_grad_(False), cfg


def write_official(folder, net: EDM2Precond, cfg: dict, stem: str):
    """What a user brings from the official repo: the state dict (safetensors) and the constructor settings."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(folder / f"{stem}.safetensors"))
    (folder / f"{stem}.json").write_text(json.dumps(cfg))
    return folder / f"{stem}.safetensors", folder / f"{stem}.json"


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """For every network the RUN presets name: (source net, imported checkpoint folder)."""
    root = tmp_path_factory.mktemp("edm2")
    nets = {}
    for name in RUN:
        preset = get_preset(name)
        for spec in (preset.net, preset.gnet):
            if spec is None or spec in nets:
                continue
            net, cfg = small_edm2(spec.arch, spec.label_dim, seed=len(nets))
            stem = (spec.checkpoint or f"{spec.arch}-{name}").removesuffix(".pkl")
            st, js = write_official(root / "official", net, cfg, stem)
            nets[spec] = (net, import_edm2(st, root / "ckpt" / stem, config=js))
    return nets


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    """A tiny AutoencoderKL (2x upsampling, 4 latent channels) from a config, saved as a local folder."""
    diffusers = pytest.importorskip("diffusers", reason="latent decoding needs the diffusers extra")

    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
                                  down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=4,
                                  sample_size=16)
    folder = tmp_path_factory.mktemp("vae") / "sd-vae-tiny"
    vae.save_pretrained(str(folder))
    return folder


def _labels(label_dim: int, n: int):
    return torch.eye(label_dim)[torch.arange(n) % label_dim] if label_dim else None


def _sample(name: str, imported, seeds=(3, 7)):
    """Load the preset's imported checkpoints, build its guided denoiser and sample `seeds` with STEPS steps.
    Returns (preset, samples, D, [net, gnet or None]); the nets' state is checked unchanged by sampling."""
    preset = get_preset(name)
    nets = [ag.load(imported[spec][1]) if spec is not None else None for spec in (preset.net, preset.gnet)]
    net = nets[0]
    D = build_preset(name, *nets)
    shape = [net.img_channels, net.img_resolution, net.img_resolution]
    before = [state_snapshot(m) for m in nets if m is not None]
    x = ag.generate(D, list(seeds), shape, labels=_labels(net.label_dim, len(seeds)), progress=False,
                    **preset.sampling(num_steps=STEPS))
    for snap, m in zip(before, [m for m in nets if m is not None]):
        assert_same_state(snap, state_snapshot(m))
    assert x.shape == (len(seeds), *shape) and bool(torch.isfinite(x).all())
    return preset, x, D, nets


@pytest.mark.parametrize("name", RUN)
def test_every_method_samples_through_imported_checkpoints(name, imported):
    preset, x, D, (net, _) = _sample(name, imported)
    for a, b in zip(imported[preset.net][0].state_dict().values(), net.state_dict().values()):
        assert torch.equal(a, b)  # the import is exact

    evals = 2 * STEPS - 1
    assert D.stats["main"] == 2 * evals
    if preset.method == "none":
        assert D.stats["guide0"] == 0
    else:  # guidance changes the result, and an interval guides only the noise levels inside it
        plain = ag.generate(ag.no_guidance(net), [3, 7], list(x.shape[1:]), labels=_labels(net.label_dim, 2),
                            progress=False, **preset.sampling(num_steps=STEPS))
        assert not torch.allclose(x, plain, atol=1e-4)
        assert D.stats["guide0"] == (2 * 2 if preset.method == "cfg-interval" else 2 * evals)


@pytest.mark.parametrize("name", ["edm2-img512-s-autog-fid", "edm2-img512-s-insitu"])
def test_img512_samples_decode_through_a_tiny_vae(name, imported, vae_dir):
    preset, x, _, _ = _sample(name, imported)
    assert preset.latent
    images = StabilityVAEDecoder(vae_dir, batch_size=1)(x)  # [2, 4, 8, 8] latents -> [2, 3, 16, 16] uint8
    assert images.dtype == torch.uint8 and images.shape == (2, 3, 16, 16)
    assert int(images.max()) > int(images.min())


def test_presets_accept_checkpoint_folders(imported):
    preset = get_preset("edm2-img512-s-autog-fid")
    D = build_preset(preset.name, str(imported[preset.net][1]), imported[preset.gnet][1])
    assert isinstance(D.main.net, EDM2Precond) and isinstance(D.guides[0].pass_.net, EDM2Precond)
    assert D.guides[0].pass_.net.config["model_channels"] == D.main.net.config["model_channels"]


# -- in-situ autoguidance on EDM2 ----------------------------------------------------------------------------

def _blocks(net):
    return [(path, m) for path, m in net.named_modules() if isinstance(m, EDM2Block)]


@pytest.mark.parametrize("arch, trained_p", [("edm2-img512-s", 0.0), ("edm2-img512-m", 0.1)])
def test_insitu_sites_are_the_residual_branch_dropouts(arch, trained_p):
    net, _ = small_edm2(arch, 1000)
    blocks = _blocks(net)
    sites = edm2_dropout_sites(net)
    # every block (encoder, down, decoder in0/in1/up) has exactly one, and nothing else is a site
    assert sites == [f"{path}.dropout" for path, _ in blocks] and len(sites) == 10
    assert sites == [path for path, m in net.named_modules() if isinstance(m, torch.nn.Dropout)]
    assert {m.dropout.p for _, m in blocks} == {trained_p}  # S: trained without dropout; M: with 0.1
    D = build_preset(f"{arch}-insitu", net)
    pert = D.guides[0].pass_.perturbation
    assert pert.where == sites and pert.p.value == 0.1 and D.guides[0].w.value == 3.0


def test_insitu_applies_dropout_inside_the_residual_branch_and_touches_nothing_else():
    net, _ = small_edm2("edm2-img512-s", 1000)
    D = build_preset("edm2-img512-s-insitu", net)
    pert, p = D.guides[0].pass_.perturbation, 0.1
    sites = set(edm2_dropout_sites(net))
    n = 4
    x, sigma, labels = torch.randn(n, 4, 8, 8), torch.full((n,), 1.3), _labels(1000, n)
    rows = torch.tensor([False, True, False, True])  # degrade rows 1 and 3 only, in one batched call
    keys = torch.arange(n, dtype=torch.int64)
    hooks_before = {path: (len(m._forward_hooks), len(m._forward_pre_hooks)) for path, m in net.named_modules()}

    seen = {}
    with pert.active(net, rows, keys, sigma):
        # Only the dropout sites carry a hook; no module is switched to training mode.
        for path, m in net.named_modules():
            extra = len(m._forward_hooks) - hooks_before[path][0]
            assert extra == (1 if path in sites else 0), path
            assert len(m._forward_pre_hooks) == hooks_before[path][1] and not m.training, path
        # Watch each block: what goes into its dropout, and what reaches its second 3x3 conv (conv_res1).
        spies = []
        for path, block in _blocks(net):
            spies.append(block.dropout.register_forward_pre_hook(
                lambda mod, inp, path=path: seen.setdefault(path, {}).__setitem__("y", inp[0].clone())))
            spies.append(block.conv_res1.register_forward_pre_hook(
                lambda mod, inp, path=path: seen[path].__setitem__("conv_res1_in", inp[0].clone())))
        try:
            D_bad = net(x, sigma, labels)
        finally:
            for h in spies:
                h.remove()
    assert {path: (len(m._forward_hooks), len(m._forward_pre_hooks)) for path, m in net.named_modules()} \
        == hooks_before

    zeros = total = 0
    for path, rec in seen.items():
        y, r = rec["y"], rec["conv_res1_in"]
        mask = torch.where(y != 0, r / y, torch.ones_like(y))
        kept = torch.isclose(mask, torch.full_like(mask, 1 / (1 - p)), rtol=1e-5)
        dropped = mask.abs() < 1e-6
        # exact rows pass unchanged; degraded rows get inverted dropout (0 or 1/(1-p)), as EDM2's training does
        assert torch.equal(r[~rows], y[~rows]), path
        assert bool((kept | dropped)[rows].all()), path
        zeros += int(dropped[rows].sum())
        total += dropped[rows].numel()
    assert abs(zeros / total - p) < 0.02
    D_good = net(x, sigma, labels)
    assert torch.equal(D_bad[~rows], D_good[~rows]) and not torch.allclose(D_bad[rows], D_good[rows])


def test_insitu_sampling_leaves_the_weights_bit_identical(monkeypatch):
    net, _ = small_edm2("edm2-img512-s", 1000)
    with torch.no_grad():  # weights as stored by training: not unit-norm, so a training-mode pass would change them
        for path, m in net.named_modules():
            if hasattr(m, "weight") and isinstance(m.weight, torch.nn.Parameter):
                m.weight.mul_(1.7)
    before = state_snapshot(net)
    modes = []
    real_train = torch.nn.Module.train

    def spy(self, mode=True):
        modes.append(bool(mode))
        return real_train(self, mode)

    monkeypatch.setattr(torch.nn.Module, "train", spy)
    D = build_preset("edm2-img512-s-insitu", net)
    x = ag.generate(D, [0, 1], [4, 8, 8], labels=_labels(1000, 2), progress=False, **get_preset(
        "edm2-img512-s-insitu").sampling(num_steps=STEPS))
    assert bool(torch.isfinite(x).all())
    with pytest.raises(ValueError, match="x must have shape"):  # a pass that raises inside the hooks
        D(torch.randn(2, 3, 8, 8), 1.0, _labels(1000, 2))
    assert True not in modes  # nothing ever asked for training mode
    assert_same_state(before, state_snapshot(net))
    assert D.stats["guide0"] == D.stats["main"] and D.stats["forward_calls"] > 0

    net.train()
    with pytest.raises(ValueError, match="eval mode"):
        build_preset("edm2-img512-s-insitu", net)


# -- latent decoding ---------------------------------------------------------------------------------------------

def test_latent_mapping_is_edm2s():
    x = torch.randn(3, 4, 5, 5)
    raw = latents_to_raw(x)
    mean, std = torch.tensor(RAW_MEAN).reshape(1, 4, 1, 1), torch.tensor(RAW_STD).reshape(1, 4, 1, 1)
    # EDM2 encoders.py: scale = final_std / raw_std, bias = final_mean - raw_mean * scale; raw = (x - bias) / scale
    scale = FINAL_STD / std
    bias = 0.0 - mean * scale
    assert torch.allclose(raw, (x - bias) / scale, atol=1e-5)
    assert torch.allclose(latents_to_raw(torch.zeros(1, 4, 1, 1)).flatten(), torch.tensor(RAW_MEAN))
    assert torch.allclose(raw_to_latents(raw), x, atol=1e-5)
    with pytest.raises(ValueError, match=r"\[N, 4, H, W\]"):
        latents_to_raw(torch.zeros(2, 3, 8, 8))


def test_decode_matches_the_vae_on_raw_latents(vae_dir):
    vae = load_vae(vae_dir)
    assert not vae.training
    z = torch.randn(3, 4, 8, 8) * 0.5
    ref = vae.decode(latents_to_raw(z)).sample.clamp(0, 1)
    out = decode_latents(z, vae, batch_size=2, as_uint8=False)
    assert_batch_close(out, ref)                                  # decoded in chunks of 2 against one of 3
    assert torch.equal(decode_latents(z, vae), (ref * 255).to(torch.uint8))   # one chunk of 3: the same call


def test_vae_errors_say_what_to_do(tmp_path, vae_dir, monkeypatch):
    with pytest.raises(VAEUnavailable, match="never downloads"):
        load_vae(tmp_path / "no-such-folder")
    with pytest.raises(VAEUnavailable, match="no config.json"):
        load_vae(tmp_path)
    monkeypatch.setitem(__import__("sys").modules, "diffusers", None)  # diffusers not installed
    with pytest.raises(VAEUnavailable, match=r"pip install 'autoguidance\[diffusers\]'"):
        load_vae(vae_dir)
