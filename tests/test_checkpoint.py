import json

import pytest
import torch

import autoguidance as ag
from autoguidance.checkpoint import CheckpointError, load_config
from helpers import tiny_denoiser_mlp


def test_save_load_round_trip_is_exact(tmp_path):
    net = tiny_denoiser_mlp(dropout=0.1)
    ag.save(net, tmp_path / "ck", meta={"note": "test"})
    back = ag.load(tmp_path / "ck")
    assert not back.training and not any(p.requires_grad for p in back.parameters())
    for (k, a), (k2, b) in zip(net.state_dict().items(), back.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    assert back.config == net.config and back.checkpoint_meta == {"note": "test"}
    x = torch.randn(4, 2)
    assert torch.equal(net(x, 0.3), back(x, 0.3))


def test_every_shipped_checkpoint_loads_and_records_its_command():
    names = ag.shipped()
    assert {"toy-logp-guide", "toy-logp-uncond", "toy-denoiser-guide"} <= set(names)
    for name, rec in names.items():
        assert rec["command"].startswith("autoguidance ")
        net = ag.load(name)
        assert net.checkpoint_meta["command"] == rec["command"]


def test_missing_checkpoint_names_close_matches(tmp_path):
    with pytest.raises(FileNotFoundError, match="Did you mean toy-logp-guide"):
        ag.load("toy-logp-guid")
    with pytest.raises(FileNotFoundError, match="model.safetensors and config.json"):
        ag.load(tmp_path / "nothing-here")


def test_corrupt_checkpoints_are_reported(tmp_path):
    net = tiny_denoiser_mlp()
    path = ag.save(net, tmp_path / "ck")
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        ag.load(path)
    path = ag.save(net, tmp_path / "ck2")
    (path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        ag.load(path)
    path = ag.save(net, tmp_path / "ck3")
    cfg = json.loads((path / "config.json").read_text())
    cfg["config"]["width"] = 32
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="does not match its config.json"):
        ag.load(path)
    (path / "config.json").unlink()
    with pytest.raises(CheckpointError, match="no config.json"):
        load_config(path)


def test_save_is_atomic_and_replaces(tmp_path):
    net = tiny_denoiser_mlp()
    ag.save(net, tmp_path / "ck")
    ag.save(tiny_denoiser_mlp(seed=1), tmp_path / "ck")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]
    assert not torch.equal(ag.load(tmp_path / "ck").raw.trunk.inp.weight, net.raw.trunk.inp.weight)


def test_toy_nets_reject_wrong_shapes_and_labels():
    net = ag.load("toy-logp-guide")
    with pytest.raises(ValueError, match=r"shape \[N, 2\]"):
        net(torch.zeros(4, 3), 1.0)
    with pytest.raises(ValueError, match="2 axes"):
        net(torch.zeros(4), 1.0)
    with pytest.raises(ValueError, match="takes labels=None"):
        net(torch.zeros(4, 2), 1.0, torch.zeros(4, 10))


def test_builtin_families_load_in_a_fresh_process_even_after_a_custom_registration():
    import subprocess
    import sys
    code = ("import autoguidance as ag; from autoguidance.checkpoint import register_family; "
            "register_family('mine', lambda **k: None); "
            "print(type(ag.load('digits-features')).__name__, type(ag.load('toy-logp-main')).__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["DigitsClassifier", "LogDensityMLP"]
