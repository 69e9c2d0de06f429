"""`autoguidance sites MODEL`: module paths, types and output shapes of a checkpoint."""
from __future__ import annotations

import pytest
import torch

import autoguidance.checkpoint as ckpt
from autoguidance.cli import main
from autoguidance.nets.edm2 import EDM2Precond
from autoguidance.cli.sites import example_shape, site_table, sites


def _rows(text: str) -> dict[str, list[str]]:
    lines = text.strip().splitlines()
    assert lines[0].split() == ["path", "type", "output", "shape"]
    return {cols[0]: cols[1:] for cols in (line.split() for line in lines[1:])}


def test_sites_of_a_shipped_toy_net(capsys):
    assert main(["sites", "toy-logp-guide"]) == 0
    rows = _rows(capsys.readouterr().out)
    assert rows["trunk.drop0"] == ["Dropout", "1x32"]
    assert rows["trunk.fc3"] == ["MPLinear", "1x32"]


def test_sites_of_an_edm2_checkpoint_with_filter_and_shape(tmp_path, capsys):
    torch.manual_seed(0)
    net = EDM2Precond(img_resolution=8, img_channels=3, label_dim=10, model_channels=16, channel_mult=[1, 2],
                      num_blocks=1, attn_resolutions=[4], channels_per_head=8)
    path = ckpt.save(net, tmp_path / "edm2-tiny")
    assert example_shape(net) == [1, 3, 8, 8]
    assert main(["sites", str(path), "--filter", "*.dropout"]) == 0
    rows = _rows(capsys.readouterr().out)
    assert rows and all(p.endswith(".dropout") and t == "Dropout" for p, (t, _) in rows.items())
    assert rows["unet.enc.8x8_block0.dropout"][1] == "1x16x8x8"
    assert rows["unet.enc.4x4_block0.dropout"][1] == "1x32x4x4"
    assert main(["sites", str(path), "--example-shape", "2,3,8,8", "--filter", "unet.*.attn"]) == 0
    rows = _rows(capsys.readouterr().out)
    assert rows["unet.dec.4x4_in0.attn"] == ["EDM2Attention", "2x4x8x16"]   # [N, heads, C/heads, HW]


def test_sites_errors_say_how_to_fix(tmp_path, capsys):
    assert main(["sites", "toy-logp-gide"]) == 2
    assert "Did you mean toy-logp-guide" in capsys.readouterr().err
    assert main(["sites", "toy-logp-guide", "--example-shape", "1,two"]) == 2
    assert "--example-shape" in capsys.readouterr().err
    assert main(["sites", "toy-logp-guide", "--filter", "nothing*"]) == 2
    assert "matches --filter" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--example-shape"):
        example_shape(torch.nn.Linear(2, 2))


class _Denoiser(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(2, 3)

    def forward(self, x, sigma, labels=None):
        return self.lin(x)


def test_site_table_marks_non_tensor_outputs():
    rows = sites(_Denoiser(), [4, 2])          # a denoiser: called as D(x, sigma = 1)
    assert rows == [{"path": "lin", "type": "Linear", "output_shape": [4, 3]}]
    text = site_table([{"path": "a.b", "type": "MultiheadAttention", "output_shape": None}])
    assert text.splitlines()[1].split() == ["a.b", "MultiheadAttention", "-"]
