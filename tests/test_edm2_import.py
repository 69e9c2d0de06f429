"""`autoguidance import-edm2`: official state dicts in, checkpoint folders out; pickles only when trusted."""
from __future__ import annotations

import json
import os
import pickle
import sys
import textwrap

import pytest
import torch

import autoguidance as ag
from autoguidance.cli import build_parser, main
from autoguidance.edm2.convert import PickleRefused, import_edm2, read_config, read_state_dict
from autoguidance.nets.edm2 import EDM2Precond
from test_edm2_cpu_path import small_edm2, write_official


@pytest.fixture(scope="module")
def small():
    return small_edm2("edm2-img512-xs", 1000, seed=5)


def _same_net(a: EDM2Precond, b: EDM2Precond) -> None:
    assert a.state_dict().keys() == b.state_dict().keys()
    for k in a.state_dict():
        assert torch.equal(a.state_dict()[k], b.state_dict()[k]), k
    x, labels = torch.randn(2, a.img_channels, 8, 8), torch.eye(a.label_dim)[:2] if a.label_dim else None
    assert torch.equal(a(x, torch.tensor([0.5, 3.0]), labels), b(x, torch.tensor([0.5, 3.0]), labels))


def test_safetensors_and_settings_round_trip(tmp_path, small):
    net, cfg = small
    st, js = write_official(tmp_path, net, cfg, "xs")
    out = import_edm2(st, tmp_path / "ck", config=js)
    back = ag.load(out)
    assert isinstance(back, EDM2Precond) and not back.training
    _same_net(net, back)
    assert back.config == net.config
    meta = back.checkpoint_meta
    assert meta["source"] == "xs.safetensors" and meta["source_format"] == "safetensors"
    assert len(meta["source_sha256"]) == 64


@pytest.mark.parametrize("wrap", [None, "ema", "state_dict"])
def test_torch_files_are_read_with_weights_only(tmp_path, small, wrap):
    net, cfg = small
    state = net.state_dict()
    torch.save(state if wrap is None else {wrap: state, "step": 3}, tmp_path / "net.pt")
    (tmp_path / "net.json").write_text(json.dumps(cfg))
    _same_net(net, ag.load(import_edm2(tmp_path / "net.pt", tmp_path / "ck", config=tmp_path / "net.json")))


class _Marker:
    """Unpickling this object creates a folder: evidence that a pickle was opened."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def test_pickles_are_refused_unopened_with_the_reason_and_the_way_out(tmp_path, capsys):
    marker = tmp_path / "unpickled"
    pkl = tmp_path / "edm2-img512-s-2147483-0.130.pkl"
    pkl.write_bytes(pickle.dumps({"ema": _Marker(marker)}))

    with pytest.raises(PickleRefused) as e:
        import_edm2(pkl, tmp_path / "ck", config="edm2-img512-s")
    msg = str(e.value)
    assert "runs code" in msg and "never opens it" in msg                       # why
    assert "torch.save(net.state_dict()" in msg and "--config net.json" in msg   # what to do instead
    assert "--trust-pickle --edm2-repo" in msg
    with pytest.raises(PickleRefused):
        read_state_dict(pkl)
    assert main(["import-edm2", str(pkl), "--config", "edm2-img512-s", "--out", str(tmp_path / "ck")]) == 2
    assert "--trust-pickle" in capsys.readouterr().err
    assert not marker.exists() and not (tmp_path / "ck").exists()

    # a pickle in disguise: torch.load(weights_only=True) refuses it, again without running it
    disguised = tmp_path / "net.pt"
    torch.save({"ema": _Marker(marker)}, disguised)
    with pytest.raises(PickleRefused, match="weights_only"):
        import_edm2(disguised, tmp_path / "ck", config="edm2-img512-s")
    assert not marker.exists()


def test_help_says_pickles_run_code():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    text = sub.choices["import-edm2"].format_help()
    assert "--trust-pickle" in text and "execute code" in text.lower() and "--edm2-repo" in text


FAKE_NETWORKS = textwrap.dedent('''
    """Stand-in for NVlabs/edm2 training/networks_edm2.py: a Precond that records its constructor kwargs."""
    from autoguidance.nets.edm2 import EDM2Precond

    class Precond(EDM2Precond):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self._init_args = ()
            self._init_kwargs = dict(kwargs)

        @property
        def init_kwargs(self):
            return dict(self._init_kwargs)
''')


def _fake_checkout(root):
    """A folder shaped like a checkout of NVlabs/edm2 (dnnlib/, torch_utils/, training/networks_edm2.py)."""
    for pkg in ("dnnlib", "torch_utils", "training"):
        (root / pkg).mkdir(parents=True)
        (root / pkg / "__init__.py").write_text("")
    (root / "training" / "networks_edm2.py").write_text(FAKE_NETWORKS)
    return root


def _forget(root):
    sys.path[:] = [p for p in sys.path if p != str(root)]
    for name in [n for n in sys.modules if n.split(".")[0] in ("dnnlib", "torch_utils", "training")]:
        del sys.modules[name]


def test_trusted_pickle_is_loaded_with_the_users_checkout(tmp_path, small):
    _, cfg = small
    repo = _fake_checkout(tmp_path / "edm2")
    sys.path.insert(0, str(repo))
    try:  # what the official training writes: {'ema': Precond(...), ...}, the class pickled by reference
        from training.networks_edm2 import Precond
        torch.manual_seed(1)
        official = Precond(**cfg).eval()
        pkl = tmp_path / "edm2-img512-xs-2147483-0.135.pkl"
        pkl.write_bytes(pickle.dumps({"ema": official, "encoder": None}))
    finally:
        _forget(repo)

    with pytest.raises(ValueError, match="needs --edm2-repo"):
        import_edm2(pkl, tmp_path / "ck", trust_pickle=True)
    with pytest.raises(FileNotFoundError, match="not a checkout of NVlabs/edm2"):
        import_edm2(pkl, tmp_path / "ck", trust_pickle=True, edm2_repo=tmp_path / "elsewhere")

    out = import_edm2(pkl, tmp_path / "ck", trust_pickle=True, edm2_repo=repo)  # settings from init_kwargs
    assert str(repo) not in sys.path and "training" not in sys.modules    # the checkout was used for that load only
    back = ag.load(out)
    assert back.checkpoint_meta["source_format"] == "pickle (trusted)"
    assert back.checkpoint_meta["class"].endswith("Precond")
    reference = EDM2Precond(**cfg)
    reference.load_state_dict(official.state_dict())
    _same_net(reference.eval(), back)

    # the CLI path, settings overridden from --config (here: the same values)
    (tmp_path / "cfg.json").write_text(json.dumps({"dropout": cfg["dropout"]}))
    assert main(["import-edm2", str(pkl), "--trust-pickle", "--edm2-repo", str(repo), "--config",
                 str(tmp_path / "cfg.json"), "--out", str(tmp_path / "ck2")]) == 0
    assert ag.load(tmp_path / "ck2").checkpoint_meta["command"].startswith("autoguidance ")


def test_settings_are_checked_against_the_tensors(tmp_path, small):
    net, cfg = small
    st, _ = write_official(tmp_path, net, cfg, "xs")
    with pytest.raises(ValueError, match="holds tensors only: give the network's constructor settings"):
        import_edm2(st, tmp_path / "ck")
    with pytest.raises(ValueError, match=r"do not fit the settings.*another shape.*Check --config"):
        import_edm2(st, tmp_path / "ck", config={**cfg, "model_channels": 16})
    with pytest.raises(ValueError, match=r"missing.*unconditional"):
        import_edm2(st, tmp_path / "ck", config={**cfg, "num_blocks": 2})
    with pytest.raises(ValueError, match=r"unknown setting\(s\) \['chanels'\]"):
        read_config({**cfg, "chanels": 3})
    with pytest.raises(ValueError, match=r"missing required setting\(s\) \['label_dim'\]"):
        read_config({"img_resolution": 8, "img_channels": 4})
    with pytest.raises(FileNotFoundError, match="neither a JSON file nor an EDM2 architecture"):
        read_config("edm2-img512-q")
    assert read_config("edm2-img512-s")["model_channels"] == 192  # settings of a named size
    with pytest.raises(ValueError, match="apply to .pkl files only"):
        import_edm2(st, tmp_path / "ck", config=cfg, trust_pickle=True)


def test_existing_output_is_not_clobbered(tmp_path, small):
    net, cfg = small
    st, js = write_official(tmp_path / "src", net, cfg, "xs")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not empty"):
        import_edm2(st, tmp_path / "mine", config=js)
    with pytest.raises(ValueError, match="not an autoguidance checkpoint"):
        import_edm2(st, tmp_path / "mine", config=js, overwrite=True)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    out = import_edm2(st, tmp_path / "ck", config=js)
    assert import_edm2(st, out, config=js, overwrite=True) == out  # replacing a checkpoint is fine with --force
