"""`autoguidance sweep`: grid expansion, results that resume after a kill, ranks that share the grid."""
from __future__ import annotations

import json
import os

import pytest

from autoguidance.runs import dist
from autoguidance.cli import main
from autoguidance.methods import MethodSpec
from autoguidance.cli.sweep import append_result, grid, parse_intervals, read_results

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


SWEEP = ["sweep", "--net", "toy-denoiser-main", "--gnet", "toy-denoiser-guide", "--methods", "none,autoguidance",
         "--w", "2,3", "--sigma-max", "5", "--steps", "4", "--seeds", "0-31", "--space", "raw", "--ref", "toy:A",
         "--ref-n", "300", "--no-progress"]
METRICS = ("fd", "precision", "recall", "density", "coverage", "n", "n_ref")


def _metrics(folder) -> dict:
    res = json.loads((folder / "results.json").read_text())["results"]
    return {r["label"]: {k: r[k] for k in METRICS} for r in res}


def _same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for label in a:
        for k in METRICS:
            assert abs(a[label][k] - b[label][k]) < 1e-9, (label, k)


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep") / "full"
    assert main([*SWEEP, "--out", str(out)]) == 0
    return out


def test_grid_expansion():
    base = MethodSpec(net="toy-denoiser-main")
    specs = grid(base, ["none", "cfg", "cfg-interval", "insitu"], [1.5, 3.0], [0.05, 0.1],
                 parse_intervals("none,0.3:2"))
    count = {m: sum(s.method == m for s in specs) for m in ("none", "cfg", "cfg-interval", "insitu")}
    assert count == {"none": 1, "cfg": 4, "cfg-interval": 2, "insitu": 8}
    assert all(s.interval == (0.3, 2.0) for s in specs if s.method == "cfg-interval")
    with pytest.raises(ValueError, match="unknown method"):
        grid(base, ["cgf"], [2.0], [0.1], [None])
    with pytest.raises(ValueError, match="LO:HI"):
        parse_intervals("0.3-2")


def test_jsonl_survives_a_torn_line(tmp_path):
    path = tmp_path / "r.jsonl"
    append_result(path, {"key": "a", "fd": 1.0})
    with open(path, "a") as f:
        f.write('{"key": "b", "fd"')                            # a process killed mid-write
    append_result(path, {"key": "c", "fd": 3.0})
    assert sorted(read_results(path)) == ["a", "c"]


def test_sweep_outputs(full):
    res = json.loads((full / "results.json").read_text())
    assert [r["label"] for r in res["results"]] == ["none w=1", "autoguidance w=2", "autoguidance w=3"]
    assert all(r["n"] == 32 and r["fd"] > 0 for r in res["results"])
    assert (full / "sweep.png").stat().st_size > 1000
    rec = json.loads((full / "run.json").read_text())
    assert rec["status"] == "complete" and rec["seeds"] == "0-31" and len(rec["config"]["specs"]) == 3


def test_interrupted_sweep_resumes_to_the_same_results(full, tmp_path):
    out = tmp_path / "resumed"
    out.mkdir()
    lines = (full / "results.jsonl").read_text().splitlines()
    (out / "results.jsonl").write_text(lines[0] + "\n" + lines[1][:40])   # one point done, one torn
    assert main([*SWEEP, "--out", str(out)]) == 0
    _same(_metrics(out), _metrics(full))
    kept = json.loads((out / "results.jsonl").read_text().splitlines()[0])
    assert kept == json.loads(lines[0])                               # the finished point was not redone


def test_two_ranks_killed_then_resumed(full, tmp_path):
    out = tmp_path / "ranks"
    runs = dist.launch_local(2, [*SWEEP, "--out", out], env={**ENV, "AUTOGUIDANCE_STOP_AFTER_POINTS": "1"},
                             timeout=240)
    assert [r.returncode for r in runs] == [3, 3], runs[0].stderr[-3000:]   # each rank exited hard after a point
    assert sorted(rec["rank"] for rec in read_results(out / "results.jsonl").values()) == [0, 1]
    assert main([*SWEEP, "--out", str(out)]) == 0
    _same(_metrics(out), _metrics(full))
