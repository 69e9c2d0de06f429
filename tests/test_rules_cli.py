"""The rules on the command line and in config files: `autoguidance rules`, `sample` / `sweep` flags and TOML keys,
one-line errors for bad values, and the identity of runs made before the rules (unchanged)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from autoguidance.cli import main
from autoguidance.cli.options import parse_steps
from autoguidance.cli.sweep import grid
from autoguidance.methods import MethodSpec, build_method
from autoguidance.rules import APG, RULES, Rescale
from autoguidance.runs.shards import read_shard

TOY = ["--net", "toy-denoiser-main", "--method", "autoguidance", "--gnet", "toy-denoiser-guide", "--w", "3",
       "--sigma-max", "5", "--steps", "4", "--seeds", "0-7", "--shard-size", "8", "--no-progress"]


def test_rules_command_lists_every_rule_with_parameters_space_and_paper(capsys):
    assert main(["rules"]) == 0
    out = capsys.readouterr().out
    for name in RULES:
        assert f"{name} (" in out
    for arxiv in ("2305.08891", "2410.02416", "2503.18886", "2503.18137", "2506.19713", "2508.03442", "2406.08070"):
        assert arxiv in out
    assert "--norm-threshold 0.0" in out and "--rule-space default" in out
    assert "x0 for the library's denoisers, the model's own output in pipelines  (--rule-space x0|eps|v)" in out
    assert main(["rules", "apg", "--json"]) == 0
    (apg,) = json.loads(capsys.readouterr().out)
    assert {p["name"]: p["default"] for p in apg["params"]} == {"eta": 0.0, "norm_threshold": 0.0, "momentum": 0.0,
                                                               "space": None, "form": "conditional"}
    assert main(["rules", "apgg"]) == 2
    assert "unknown rule 'apgg'" in capsys.readouterr().err


def test_sample_with_rule_flags_writes_them_to_the_config_and_reruns_from_it(tmp_path):
    out = tmp_path / "apg"
    flags = ["--rule", "apg", "--eta", "0", "--norm-threshold", "15", "--momentum", "-0.5", "--sampler", "euler"]
    assert main(["sample", *TOY, *flags, "--out", str(out)]) == 0
    text = (out / "config.toml").read_text()
    assert 'rule = "apg"' in text and "momentum = -0.5" in text and "norm_threshold = 15.0" in text
    spec = MethodSpec.from_toml(text)
    assert spec.make_rule() == APG(eta=0.0, norm_threshold=15.0, momentum=-0.5)
    again = tmp_path / "again"
    assert main(["sample", "--config", str(out / "config.toml"), "--seeds", "0-7", "--shard-size", "8",
                 "--no-progress", "--out", str(again)]) == 0
    a = read_shard(out / "shards" / "shard-000000.npz")["samples"]
    assert np.array_equal(a, read_shard(again / "shards" / "shard-000000.npz")["samples"])
    plain = tmp_path / "plain"
    assert main(["sample", *TOY, "--sampler", "euler", "--out", str(plain)]) == 0
    assert not np.allclose(a, read_shard(plain / "shards" / "shard-000000.npz")["samples"])


def test_step_forms_and_cfgpp_from_flags(tmp_path):
    assert parse_steps("7*2,3") == (7.0, 7.0, 3.0)
    out = tmp_path / "steps"
    assert main(["sample", *[f for f in TOY if f not in ("--w", "3")], "--w-steps", "3*3,1", "--rule", "rescale",
                 "--cfgpp", "--sampler", "euler", "--out", str(out)]) == 0
    spec = MethodSpec.from_toml((out / "config.toml").read_text())
    assert spec.w_steps == (3.0, 3.0, 3.0, 1.0) and spec.cfgpp and spec.sampling()["cfgpp"] is True
    assert spec.make_rule() == Rescale()


@pytest.mark.parametrize("extra, match", [
    (["--rule", "apg", "--phi", "0.5"], "rule apg takes no --phi: its parameters are --eta"),
    (["--rule", "rescale", "--phi", "2"], r"phi must be a finite number in \[0, 1\]"),
    (["--w-steps", "3*x"], "--w-steps entry '3\\*x' must be VALUE or VALUE\\*COUNT"),
    (["--w-steps", "3*2"], "give one shape of w|w_steps gives w at every step"),
    (["--window", "0.5,0.1"], "StepWindow needs 0 <= start < stop <= 1"),
    (["--cfgpp", "--sampler", "dpmpp_2m"], "cfgpp runs on the euler and heun samplers"),
    (["--rule", "fdg", "--scales", "1,0.5", "--parallel-weights", "1"], "parallel_weights has 1 values for 2 levels"),
])
def test_bad_rule_flags_end_in_one_line(tmp_path, capsys, extra, match):
    import re

    assert main(["sample", *TOY, *extra, "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and re.search(match, err), err


def test_bad_rule_keys_in_toml_name_the_key(tmp_path, capsys):
    cfg = tmp_path / "c.toml"
    cfg.write_text('net = "toy-denoiser-main"\nmethod = "cfg"\nw = 2.0\nrule = "apg"\neta = "zero"\n')
    assert main(["sample", "--config", str(cfg), "--seeds", "0-3", "--out", str(tmp_path / "x")]) == 2
    assert "method setting eta must be a number" in capsys.readouterr().err
    cfg.write_text('net = "toy-denoiser-main"\nmethod = "none"\nrule = "apg"\n')
    assert main(["sample", "--config", str(cfg), "--seeds", "0-3", "--out", str(tmp_path / "y")]) == 2
    assert "method none has no guidance, so rule would do nothing" in capsys.readouterr().err


def test_specs_without_rule_keys_keep_their_identity():
    spec = MethodSpec(net="toy-denoiser-main", method="cfg", w=2.0)
    assert set(spec.to_dict()) == {"net", "method", "w", "interval", "ramp", "perturbation", "p", "where", "gnet",
                                   "uncond", "a", "preset", "max_batch", "sampler", "steps", "sigma_min",
                                   "sigma_max", "rho", "churn"}
    assert "rule" in spec.replace(rule="apg").to_dict()


def test_sweep_grid_over_rules_gives_each_rule_its_parameters():
    base = MethodSpec(net="toy-denoiser-main", gnet="toy-denoiser-guide")
    params = {"eta": 0.0, "momentum": -0.5, "phi": 0.5}
    specs = grid(base, ["none", "autoguidance"], [2.0, 3.0], [0.1], [None], ["linear", "apg", "rescale"], params)
    rules = {(s.method, s.make_rule().describe()) for s in specs}
    assert rules == {("none", "linear()"), ("autoguidance", "linear()"), ("autoguidance", "apg(momentum=-0.5)"),
                     ("autoguidance", "rescale(phi=0.5)")}
    assert len(specs) == 1 + 3 * 2
    with pytest.raises(ValueError, match="--alpha is a parameter of none of the rules linear, apg"):
        grid(base, ["autoguidance"], [2.0], [0.1], [None], ["linear", "apg"], {"alpha": 2.0})


def test_sweep_runs_a_rules_grid(tmp_path, capsys):
    out = tmp_path / "sw"
    assert main(["sweep", "--net", "toy-denoiser-main", "--gnet", "toy-denoiser-guide", "--methods", "autoguidance",
                 "--rules", "linear,apg", "--eta", "0", "--momentum", "-0.5", "--w", "3", "--sigma-max", "5",
                 "--steps", "4", "--seeds", "0-31", "--space", "raw", "--ref", "toy:A", "--ref-n", "300",
                 "--no-progress", "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())["results"]
    assert sorted(r["rule"] for r in res) == ["apg(momentum=-0.5)", "linear()"]
    assert res[0]["fd"] != res[1]["fd"]


def test_build_method_passes_the_rule_to_every_method():
    nets = {}

    def load(ref):
        from autoguidance.checkpoint import load as ld
        nets.setdefault(ref, ld(ref))
        return nets[ref]

    for method in ("cfg", "autoguidance", "insitu", "perturbation", "cfg-autoguidance"):
        spec = MethodSpec(net="digits-s-T-ema050", method=method, gnet="digits-xs-T16-ema050", w=2.0,
                          uncond="digits-xs-uncond-T-ema050", rule="apg", eta=0.0)
        assert build_method(spec, load=load).rule == APG(eta=0.0), method
    from autoguidance.methods import preset_fields

    fixed = preset_fields("edm2-img512-s-guid-fid")
    with pytest.raises(ValueError, match="preset .* builds its own guided denoiser, so --rule would do nothing"):
        build_method(MethodSpec(**fixed, net="digits-s-T-ema050", preset="edm2-img512-s-guid-fid", rule="apg"),
                     load=load)
