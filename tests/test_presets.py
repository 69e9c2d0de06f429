"""The papers' configurations by name (`autoguidance.presets`), and the table in docs/presets.md."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from autoguidance.cli import main
from autoguidance.guidance import Guided
from autoguidance.nets.edm2 import PRESETS as ARCHS
from autoguidance.edm2.presets import (METHODS, PRESETS, Preset, build_preset, edm2_dropout_sites, get_preset,
                                  list_presets, presets_markdown)
from helpers import GaussianDenoiser, tiny_denoiser_mlp
from test_edm2_cpu_path import small_edm2

DOCS = Path(__file__).parents[1] / "docs" / "presets.md"

#: (w, FID, FD_DINOv2) as the papers report them (RESEARCH.md section 2 and the official presets).
PAPER = {
    "edm2-img512-s-fid": (1.0, 2.56, None),
    "edm2-img512-s-dino": (1.0, None, 68.64),
    "edm2-img512-s-guid-fid": (1.40, 2.23, None),
    "edm2-img512-s-guid-dino": (1.90, None, 52.32),
    "edm2-img512-s-interval-fid": (2.10, 1.68, None),
    "edm2-img512-s-interval-dino": (3.20, None, 46.25),
    "edm2-img512-s-autog-fid": (2.10, 1.34, None),
    "edm2-img512-s-autog-dino": (2.45, None, 36.67),
    "edm2-img512-xxl-fid": (1.0, 1.91, None),
    "edm2-img512-xxl-dino": (1.0, None, 42.84),
    "edm2-img512-xxl-guid-fid": (1.20, 1.81, None),
    "edm2-img512-xxl-guid-dino": (1.70, None, 33.09),
    "edm2-img512-xxl-interval-fid": (2.00, 1.40, None),
    "edm2-img512-xxl-autog-fid": (2.05, 1.25, None),
    "edm2-img512-xxl-autog-dino": (2.30, None, 24.18),
    "edm2-img512-s-uncond-autog-fid": (2.85, 3.86, None),
    "edm2-img512-s-uncond-autog-dino": (2.90, None, 90.39),
    "edm2-img64-s-autog-fid": (1.70, 1.01, None),
    "edm2-img64-s-autog-dino": (2.20, None, 31.85),
    "edm2-img512-s-insitu": (3.0, 2.57, 90.05),
    "edm2-img512-m-insitu": (3.0, None, None),
}


def test_table_holds_the_papers_numbers():
    assert list_presets() == list(PRESETS) and set(PRESETS) == set(PAPER)
    for name, (w, fid, fd) in PAPER.items():
        p = PRESETS[name]
        assert (p.w, p.fid, p.fd_dinov2) == (w, fid, fd), name
        assert p.tuned_for == ("fd_dinov2" if name.endswith("-dino") else "fid"), name
        assert p.sampler == dict(sampler="heun", num_steps=32, sigma_min=0.002, sigma_max=80.0, rho=7.0)
        assert p.latent == ("img512" in name)


def test_networks_are_the_official_checkpoints():
    for p in PRESETS.values():
        for spec in filter(None, (p.net, p.gnet)):
            assert spec.arch in ARCHS
            if spec.checkpoint is not None:  # official post-hoc EMA file names: {arch}[-uncond]-{kimg}-{ema}.pkl
                uncond = "-uncond" if spec.label_dim == 0 else ""
                assert spec.checkpoint == f"{spec.arch}{uncond}-{spec.kimg:07d}-{spec.ema:.3f}.pkl", p.name
    s = PRESETS["edm2-img512-s-autog-fid"]
    assert (s.net.ema, s.gnet.ema, s.gnet.arch, s.gnet.training(s.net.kimg)) == (0.070, 0.125, "edm2-img512-xs",
                                                                                  "T/16")
    xxl = PRESETS["edm2-img512-xxl-autog-dino"]
    assert (xxl.net.ema, xxl.gnet.ema, xxl.gnet.arch, xxl.gnet.training(xxl.net.kimg)) == (
        0.130, 0.205, "edm2-img512-m", "T/3.5")
    assert PRESETS["edm2-img64-s-autog-fid"].gnet.training(1073741) == "T/8"
    for name in ("edm2-img512-s-guid-fid", "edm2-img512-s-interval-dino", "edm2-img512-s-uncond-autog-fid"):
        assert not PRESETS[name].gnet.conditional  # CFG and unconditional autoguidance guide with uncond nets
    assert PRESETS["edm2-img512-s-interval-fid"].interval == (0.28, 2.90)
    assert PRESETS["edm2-img512-xxl-interval-fid"].interval == (0.19, 1.61)
    for name in ("edm2-img512-s-insitu", "edm2-img512-m-insitu"):
        p = PRESETS[name]
        assert (p.p, p.w_prime, p.w, p.sites, p.gnet) == (0.1, 2.0, 3.0, "edm2-residual", None)
    assert ARCHS["edm2-img512-m"]["dropout"] == 0.1 and ARCHS["edm2-img512-s"]["dropout"] == 0.0


def test_preset_validation():
    net = PRESETS["edm2-img512-s-fid"].net
    with pytest.raises(ValueError, match="unknown method"):
        Preset(name="x", description="", method="pag", net=net)
    with pytest.raises(ValueError, match="needs gnet"):
        Preset(name="x", description="", method="autoguidance", net=net, w=2.0)
    with pytest.raises(ValueError, match="w must be w' \\+ 1"):
        Preset(name="x", description="", method="insitu", net=net, w=2.0, w_prime=2.0, p=0.1, sites="edm2-residual")
    with pytest.raises(ValueError, match=">= 0"):
        Preset(name="x", description="", method="none", net=net, w=-1.0)
    assert set(METHODS) == {"none", "cfg", "cfg-interval", "autoguidance", "insitu"}


def test_build_preset_maps_each_method():
    good, bad = GaussianDenoiser(0.3), GaussianDenoiser(0.1)
    D = build_preset("edm2-img512-s-fid", good)
    assert isinstance(D, Guided) and D.guides == []

    D = build_preset("edm2-img512-s-guid-fid", good, bad)
    (g,) = D.guides
    assert g.pass_.net is bad and g.pass_.drop_labels and float(g.w(torch.ones(1))) == pytest.approx(1.4)

    D = build_preset("edm2-img512-s-interval-fid", good, bad)
    w = D.guides[0].w(torch.tensor([0.28, 0.29, 2.90, 2.91, 80.0]))
    assert torch.allclose(w, torch.tensor([1.0, 2.1, 2.1, 1.0, 1.0]))  # sigma in (0.28, 2.90]

    D = build_preset("edm2-img512-xxl-autog-fid", good, bad)
    assert D.guides[0].pass_.net is bad and not D.guides[0].pass_.drop_labels
    assert float(D.guides[0].w(torch.ones(1))) == pytest.approx(2.05)
    x = torch.randn(5, 2)
    assert torch.allclose(D(x, 0.7), bad(x, 0.7) + 2.05 * (good(x, 0.7) - bad(x, 0.7)), atol=1e-6)


def test_build_preset_errors_say_what_is_missing():
    good = GaussianDenoiser()
    with pytest.raises(ValueError, match=r"needs gnet = XS \(T/16, EMA 0.125\) \(edm2-img512-xs-0134217-0.125.pkl\)"):
        build_preset("edm2-img512-s-autog-fid", good)
    with pytest.raises(ValueError, match="takes no gnet"):
        build_preset("edm2-img512-s-insitu", good, good)
    with pytest.raises(KeyError, match="Did you mean edm2-img512-s-autog-fid"):
        get_preset("edm2-img512-s-autog-fd")
    with pytest.raises(ValueError, match="has no EDM2 blocks"):
        edm2_dropout_sites(tiny_denoiser_mlp())
    with pytest.raises(TypeError, match="EDM2 network module"):
        build_preset("edm2-img512-s-insitu", good)

    cond, _ = small_edm2("edm2-img512-xs", 1000)
    uncond, _ = small_edm2("edm2-img512-xs", 0)
    pixels, _ = small_edm2("edm2-img64-s", 1000)
    with pytest.raises(ValueError, match=r"unconditional \(label_dim = 0\).*label_dim = 1000.*order of net and gnet"):
        build_preset("edm2-img512-s-uncond-autog-fid", cond, uncond)
    with pytest.raises(ValueError, match="4 channels: Stable Diffusion VAE latents"):
        build_preset("edm2-img512-s-autog-fid", pixels, cond)
    with pytest.raises(ValueError, match="autoguidance needs a guide of the same task"):
        bigger, _ = small_edm2("edm2-img512-s", 1000)
        bigger.img_resolution = 16
        build_preset("edm2-img512-s-autog-fid", bigger, cond)


def test_sampling_settings():
    p = get_preset("edm2-img512-s-autog-fid")
    assert p.sampling() == dict(sampler="heun", num_steps=32, sigma_min=0.002, sigma_max=80.0, rho=7.0)
    assert p.sampling(num_steps=8)["num_steps"] == 8 and p.sampler["num_steps"] == 32
    with pytest.raises(ValueError, match="unknown sampler setting"):
        p.sampling(steps=8)


def test_presets_command(capsys):
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in PRESETS) and "1.34" in out
    assert main(["presets", "edm2-img512-s-insitu"]) == 0
    out = capsys.readouterr().out
    assert "w' = 2.0" in out and "p = 0.1" in out and "edm2-img512-s-2147483-0.130.pkl" in out
    assert main(["presets", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["edm2-img512-xxl-autog-fid"]["gnet"]["checkpoint"] == "edm2-img512-m-0268435-0.155.pkl"
    assert main(["presets", "edm2-img512-s-autog"]) == 2
    assert "Did you mean" in capsys.readouterr().err


def test_docs_table_is_the_generated_one(capsys):
    text = DOCS.read_text()
    m = re.search(r"<!-- presets-table:start -->\n(.*?)<!-- presets-table:end -->", text, re.S)
    assert m, "docs/presets.md must hold the table between the presets-table markers"
    assert m.group(1) == presets_markdown(), "regenerate it with: autoguidance presets --markdown"
    assert main(["presets", "--markdown"]) == 0 and capsys.readouterr().out == presets_markdown()
