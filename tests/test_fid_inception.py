"""The library's FID Inception-v3 against pytorch-fid, on random weights saved as a pytorch-fid state dict.

pytorch-fid imports torchvision, which does not import beside the CPU torch build. Its `inception.py` touches only
`torchvision.__version__`, `torchvision.models.inception_v3` and the block classes of
`torchvision.models.inception` (its FID blocks subclass them and replace their `forward`); `fid_score.py` imports
`torchvision.transforms` without using it for the Frechet distance. The stub below provides those, written from
torchvision's Inception3 layout (module names, channel counts, BasicConv2d = conv without bias + BN eps 1e-3 +
ReLU); pytorch-fid's own code supplies the FID blocks, the block order, the resize and the normalisation.
"""
from __future__ import annotations

import importlib
import pickle
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from autoguidance.metrics import inception as inc
from autoguidance.metrics.extractors import check_weights, get_extractor
from autoguidance.metrics.frechet import frechet_distance_features


# -- torchvision stub (only what pytorch-fid touches) ---------------------------------------------------------------
class BasicConv2d(nn.Module):
    def __init__(self, cin, cout, **kw):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, bias=False, **kw)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


class InceptionA(nn.Module):
    def __init__(self, cin, pool_features):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(cin, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, kernel_size=1)


class InceptionB(nn.Module):
    def __init__(self, cin):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x):
        d = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), d, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionC(nn.Module):
    def __init__(self, cin, channels_7x7):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)


class InceptionD(nn.Module):
    def __init__(self, cin):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x):
        a = self.branch3x3_2(self.branch3x3_1(x))
        b = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([a, b, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionE(nn.Module):
    def __init__(self, cin):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(cin, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)


class Inception3(nn.Module):
    def __init__(self, num_classes=1000, aux_logits=True, init_weights=None, weights=None):
        super().__init__()
        assert not aux_logits and weights is None
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = InceptionA(192, 32), InceptionA(256, 64), InceptionA(288, 64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b, self.Mixed_6c = InceptionC(768, 128), InceptionC(768, 160)
        self.Mixed_6d, self.Mixed_6e = InceptionC(768, 160), InceptionC(768, 192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b, self.Mixed_7c = InceptionE(1280), InceptionE(2048)
        self.fc = nn.Linear(2048, num_classes)


@pytest.fixture(scope="module")
def pytorch_fid():
    """pytorch-fid's `inception` and `fid_score` modules, imported beside a torchvision stub (then removed)."""
    pytest.importorskip("pytorch_fid", reason="pip install --no-deps pytorch-fid==0.3.0")
    tv = types.ModuleType("torchvision")
    tv.__version__ = "0.20.0"
    tv.models = types.ModuleType("torchvision.models")
    tv.models.inception = types.ModuleType("torchvision.models.inception")
    for c in (BasicConv2d, InceptionA, InceptionB, InceptionC, InceptionD, InceptionE, Inception3):
        setattr(tv.models.inception, c.__name__, c)
    tv.models.inception_v3 = lambda **kw: Inception3(**kw)
    tv.transforms = types.ModuleType("torchvision.transforms")
    stubs = {"torchvision": tv, "torchvision.models": tv.models, "torchvision.models.inception": tv.models.inception,
             "torchvision.transforms": tv.transforms}
    saved = {k: sys.modules.get(k) for k in stubs}
    sys.modules.update(stubs)
    try:
        for k in [k for k in sys.modules if k.startswith("pytorch_fid")]:
            del sys.modules[k]
        mods = types.SimpleNamespace(inception=importlib.import_module("pytorch_fid.inception"),
                                     fid_score=importlib.import_module("pytorch_fid.fid_score"))
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
        for k in [k for k in sys.modules if k.startswith("pytorch_fid")]:
            del sys.modules[k]
    return mods


def random_inception_state(seed: int = 0) -> dict:
    """Random weights in the official file's layout, scaled so activations stay O(1) through the network."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for k, v in inc.FIDInceptionV3().state_dict().items():
        if k.endswith("conv.weight"):
            state[k] = torch.randn(v.shape, generator=g) * (2 / v[0].numel()) ** 0.5
        elif k.endswith("bn.weight") or k.endswith("running_var"):
            state[k] = 0.5 + torch.rand(v.shape, generator=g)
        elif k.endswith("bn.bias") or k.endswith("running_mean"):
            state[k] = 0.1 * torch.randn(v.shape, generator=g)
        elif k.startswith("fc."):
            state[k] = 0.01 * torch.randn(v.shape, generator=g)
        else:
            state[k] = v     # num_batches_tracked
    return state


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("inc") / "random-inception.pth"
    torch.save(random_inception_state(), path)
    return path


def _images(seed: int, n: int, hw=(40, 48)) -> torch.Tensor:
    """Smooth-ish uint8-valued images [n, 3, H, W] in [0, 255]."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 5, 6, generator=g)
    x = F.interpolate(low, size=hw, mode="bilinear", align_corners=False) + 0.15 * torch.rand(n, 3, *hw, generator=g)
    return (x.clamp(0, 1) * 255).round()


def test_fid_equals_pytorch_fid_on_its_own_features(pytorch_fid, weights, monkeypatch):
    """FID of two image sets: ours (pytorch-fid convention, our network, our Frechet distance) vs pytorch-fid's
    InceptionV3 with the same state dict and its calculate_frechet_distance."""
    monkeypatch.setattr(pytorch_fid.inception, "load_state_dict_from_url",
                        lambda url, progress=True: torch.load(weights, weights_only=True))
    ref = pytorch_fid.inception.InceptionV3([3]).eval()
    a, b = _images(1, 6), _images(2, 6)
    with torch.no_grad():
        theirs = [ref(x / 255)[0].squeeze(-1).squeeze(-1).double().numpy() for x in (a, b)]
        net = inc.load_fid_inception(weights, official_only=False)
        ours = [net(inc.preprocess(x, "pytorch-fid")).double().numpy() for x in (a, b)]
    assert np.abs(theirs[0]).mean() > 0.05                       # the random network's features are not vanishing
    np.testing.assert_allclose(ours[0], theirs[0], rtol=1e-4, atol=1e-5 * np.abs(theirs[0]).max())
    # pytorch-fid's calculate_frechet_distance (scipy sqrtm) takes ~20 s on a singular 2048 x 2048 product. FD is
    # invariant under translation and rotation of the feature space, and 12 features span an 11-d affine subspace:
    # give it the features in an orthonormal basis of that subspace (the same FD exactly; better conditioned).
    both = np.concatenate(theirs)
    basis = np.linalg.svd(both[1:] - both[0], full_matrices=False)[2]          # [11, 2048], orthonormal rows
    a2, b2 = ((t - both[0]) @ basis.T for t in theirs)
    fid_theirs = pytorch_fid.fid_score.calculate_frechet_distance(
        a2.mean(0), np.cov(a2, rowvar=False), b2.mean(0), np.cov(b2, rowvar=False))
    fid_ours = frechet_distance_features(ours[0], ours[1])
    assert fid_theirs > 0 and abs(fid_ours - fid_theirs) <= 1e-4 * fid_theirs


def test_extractor_uses_the_nvlabs_convention_by_default_and_it_differs_from_pytorch_fid(weights):
    nv = get_extractor("inception", inception_weights=str(weights), official_only=False)
    pf = get_extractor("inception", inception_weights=str(weights), official_only=False,
                       inception_convention="pytorch-fid")
    x = _images(3, 4) / 127.5 - 1                                # samples in [-1, 1]
    f_nv, f_pf = nv(x), pf(x)
    assert f_nv.shape == (4, 2048) and f_nv.dtype == torch.float64
    net = inc.load_fid_inception(weights, official_only=False)
    with torch.no_grad():
        manual = net((inc.resize_tf1((x * 127.5 + 128).floor().clamp(0, 255), 299) - 128) / 128).double()
    torch.testing.assert_close(f_nv, manual)
    assert (f_nv - f_pf).norm() > 1e-3 * f_nv.norm()             # the two conventions are different numbers


def test_tf1_resize_equals_nvlabs_affine_grid_formulation():
    """NVlabs' detector resizes with affine_grid / grid_sample shifted so that output pixel j reads input j*in/out
    (TF1's resize_bilinear); our separable gather must match it."""
    x = torch.rand(2, 3, 37, 50) * 255
    n, c, h, w = x.shape
    theta = torch.eye(2, 3).unsqueeze(0).repeat(n, 1, 1)
    theta[:, 0, 2] += theta[:, 0, 0] / w - theta[:, 0, 0] / 299
    theta[:, 1, 2] += theta[:, 1, 1] / h - theta[:, 1, 1] / 299
    grid = F.affine_grid(theta, [n, c, 299, 299], align_corners=False)
    want = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    torch.testing.assert_close(inc.resize_tf1(x, 299), want, atol=2e-3, rtol=0)
    same = torch.rand(1, 3, 299, 299)
    assert torch.equal(inc.resize_tf1(same, 299), same)          # already 299: untouched


def test_wrong_files_give_one_line_errors(tmp_path, weights):
    def one_line(e):
        assert "\n" not in str(e.value)
        return str(e.value)

    with pytest.raises(FileNotFoundError) as e:
        get_extractor("inception", inception_weights=str(tmp_path / "missing.pth"))
    assert inc.OFFICIAL_FILE in one_line(e) and "pytorch-fid/releases" in str(e.value)
    with pytest.raises(ValueError) as e:                          # right structure, not the official file
        get_extractor("inception", inception_weights=str(weights))
    assert "SHA-256" in one_line(e) and inc.OFFICIAL_SHA256_PREFIX in str(e.value)
    other = tmp_path / "other-net.pth"                            # another network's state dict
    torch.save({"conv.weight": torch.zeros(8, 3, 3, 3)}, other)
    with pytest.raises(ValueError) as e:
        get_extractor("inception", inception_weights=str(other), official_only=False)
    assert "not the FID Inception-v3 state dict" in one_line(e)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(weights.read_bytes()[:100000])
    with pytest.raises(ValueError) as e:
        get_extractor("inception", inception_weights=str(truncated), official_only=False)
    assert "cannot be read as a state dict" in one_line(e)


def test_bad_images_give_one_line_errors(weights):
    ex = get_extractor("inception", inception_weights=str(weights), official_only=False)
    for bad, words in ((torch.rand(2, 4, 16, 16), "channels"), (torch.rand(2, 3, 16, 16) * 255, "x / 127.5 - 1"),
                       (torch.full((2, 3, 16, 16), float("nan")), "non-finite")):
        with pytest.raises(ValueError, match=words) as e:
            ex(bad)
        assert "\n" not in str(e.value)


class _Marker:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):      # unpickling this runs `open(path, 'w')`: the marker file appears
        return (open, (self.path, "w"))


@pytest.mark.parametrize("name", ["evil.pkl", "evil.pth", "evil.pt2"])
def test_code_running_files_are_refused_without_trust(tmp_path, name):
    marker = tmp_path / "pwned"
    path = tmp_path / name
    path.write_bytes(pickle.dumps(_Marker(str(marker))))
    for space, kw in (("inception", "inception_weights"), ("dinov2", "dinov2_weights")):
        with pytest.raises(ValueError) as e:
            get_extractor(space, **{kw: str(path)}, official_only=False)
        assert "\n" not in str(e.value)
        assert not marker.exists()


def test_torchscript_is_refused_without_trust_and_runs_with_it(tmp_path):
    class Mean(nn.Module):                     # stands in for NVlabs' detector: [N, 3, H, W] in [0, 255] -> [N, 3]
        def forward(self, x):
            return x.mean((2, 3))

    path = tmp_path / "detector.pt"
    torch.jit.trace(Mean(), torch.zeros(1, 3, 4, 4)).save(str(path))
    with pytest.raises(ValueError, match="TorchScript archive, which runs code"):
        check_weights("inception", inception_weights=str(path))
    ex = get_extractor("inception", inception_weights=str(path), trust_pickle=True)
    f = ex(torch.zeros(2, 1, 4, 4))            # grey images in [-1, 1] -> [0, 255] floor, 3 channels
    assert torch.equal(f, torch.full((2, 3), 128.0, dtype=torch.float64))
