"""Issue 11: nothing runs on load, nothing is lost or mixed. One test per broken promise (each failed before)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch

import autoguidance as ag
from autoguidance import perturb
from autoguidance.checkpoint import CheckpointError, shipped
from autoguidance.cli import main
from autoguidance.methods import load_model
from autoguidance.runs.lock import lock_folder
from autoguidance.runs.shards import read_identity, read_shard
from helpers import tiny_denoiser_mlp

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TOY = ["--sigma-max", "5", "--steps", "3", "--shard-size", "4", "--no-progress"]
AG = ["--net", "toy-denoiser-main", "--method", "autoguidance", "--gnet", "toy-denoiser-guide"]


def _one_line_error(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _shards(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((folder / "shards").glob("*.npz"))}


# -- nothing runs on load -------------------------------------------------------------------------------------------

EVIL = """
import pathlib
pathlib.Path("MARKER").write_text("imported")

def make():
    import autoguidance
    return autoguidance.load("toy-denoiser-main")
"""


def _run_cli(args, cwd):
    return subprocess.run([sys.executable, "-m", "autoguidance.cli", *args], cwd=cwd, env=ENV, capture_output=True,
                          text=True, timeout=300)


def test_a_config_naming_code_in_the_cwd_runs_nothing_without_trust_code(tmp_path):
    (tmp_path / "evilmod.py").write_text(EVIL)
    (tmp_path / "evil.toml").write_text('net = "evilmod:make"\n')
    r = _run_cli(["sample", "--config", "evil.toml", "--seeds", "0-3", *TOY, "--out", "out"], tmp_path)
    assert r.returncode == 2
    assert "--trust-code" in _one_line_error(r.stderr)
    assert not (tmp_path / "MARKER").exists()
    # the config file cannot grant the permission itself
    (tmp_path / "evil2.toml").write_text('net = "evilmod:make"\ntrust_code = true\n')
    r = _run_cli(["sample", "--config", "evil2.toml", "--seeds", "0-3", *TOY, "--out", "out"], tmp_path)
    assert r.returncode == 2 and "trust_code" in _one_line_error(r.stderr)
    assert not (tmp_path / "MARKER").exists()
    # the API refuses too
    with pytest.raises(ValueError, match="trust_code"):
        load_model("evilmod:make")
    # with the flag it loads
    r = _run_cli(["sample", "--config", "evil.toml", "--trust-code", "--seeds", "0-3", *TOY, "--out", "out"],
                 tmp_path)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "MARKER").exists() and len(_shards(tmp_path / "out")) == 1


# -- one run per folder ---------------------------------------------------------------------------------------------

def test_a_second_run_on_a_locked_folder_is_refused_and_the_first_result_stays_whole(tmp_path, capsys):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\n"
                               "from autoguidance.runs.lock import lock_folder\n"
                               f"with lock_folder({str(out)!r}, 'autoguidance sample FIRST'):\n"
                               "    print('locked', flush=True); sys.stdin.read()"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=ENV)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert main(["sample", *AG, "--w", "2", "--seeds", "0-7", *TOY, "--out", str(out)]) == 2
        msg = _one_line_error(capsys.readouterr().err)
        assert f"pid {holder.pid}" in msg and "autoguidance sample FIRST" in msg
        assert not (out / "shards").exists()
    finally:
        holder.communicate("", timeout=60)
    # released when the holder exits (also when killed): the next run proceeds
    assert main(["sample", *AG, "--w", "2", "--seeds", "0-7", *TOY, "--out", str(out)]) == 0
    # and while a real run holds it (in this process), another is refused
    with lock_folder(out, "autoguidance sample SECOND"):
        assert main(["sample", *AG, "--w", "3", "--seeds", "0-7", *TOY, "--out", str(out)]) == 2
        assert "SECOND" in _one_line_error(capsys.readouterr().err)
    ids = {read_identity(p) for p in (out / "shards").glob("*.npz")}
    assert len(ids) == 2 and None not in ids        # two shards, both of the one run (w = 2)


def test_two_concurrent_sample_runs_leave_one_consistent_result(tmp_path):
    """Two real processes with different settings on one folder: one runs, the other is refused (exit 2) or,
    if it starts after the first finished, is refused by the resume check; never a mix of shards."""
    out = tmp_path / "race"
    cmds = [[sys.executable, "-m", "autoguidance.cli", "sample", *AG, "--w", w, "--seeds", "0-199", *TOY,
             "--shard-size", "10", "--out", str(out)] for w in ("2", "3")]
    procs = [subprocess.Popen(c, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for c in cmds]
    results = [p.communicate(timeout=300) + (p.returncode,) for p in procs]
    codes = sorted(r[2] for r in results)
    assert codes == [0, 2], results
    loser = next(r for r in results if r[2] == 2)
    _one_line_error(loser[1])
    ids = {read_identity(p) for p in (out / "shards").glob("*.npz")}
    assert len(list((out / "shards").glob("*.npz"))) == 20 and None not in ids
    winner_w = json.loads((out / "run.json").read_text())["config"]["spec"]["w"]
    # rerunning the winner's settings finds every shard done (all of that run)
    r = subprocess.run(cmds[0] if winner_w == 2.0 else cmds[1], env=ENV, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0 and "0 shards sampled, 20 already done" in r.stdout, (r.stdout, r.stderr)


# -- a damaged or deleted run.json cannot mix settings --------------------------------------------------------------

@pytest.mark.parametrize("damage", ["delete", "garbage", "list"])
def test_damaged_run_json_cannot_mix_settings(tmp_path, capsys, damage):
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["sample", *AG, "--w", "3", "--seeds", "0-7", *TOY, "--out", str(a)]) == 0
    assert main(["sample", *AG, "--w", "2", "--seeds", "0-7", *TOY, "--out", str(b)]) == 0
    if damage == "delete":
        (a / "run.json").unlink()
    else:
        (a / "run.json").write_text("{" if damage == "garbage" else "[1, 2]")
    capsys.readouterr()
    assert main(["sample", *AG, "--w", "2", "--seeds", "0-7", *TOY, "--out", str(a)]) == 0
    assert "2 shards sampled, 0 already done" in capsys.readouterr().out    # nothing of w = 3 reused
    assert _shards(a) == _shards(b)


def test_old_shards_without_identity_are_recomputed(tmp_path, capsys):
    from autoguidance.runs.shards import write_shard

    out = tmp_path / "old"
    assert main(["sample", *AG, "--w", "2", "--seeds", "0-3", *TOY, "--out", str(out)]) == 0
    p = out / "shards" / "shard-000000.npz"
    d = read_shard(p)
    write_shard(p, d["samples"], d["seeds"], d["labels"])        # as an older version wrote it: no identity
    capsys.readouterr()
    assert main(["sample", *AG, "--w", "2", "--seeds", "0-3", *TOY, "--out", str(out)]) == 0
    assert "1 shards sampled" in capsys.readouterr().out and read_identity(p) is not None


# -- temporary files are never data ----------------------------------------------------------------------------------

def test_leftover_temporary_files_are_not_read_and_are_cleaned(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["sample", *AG, "--w", "2", "--seeds", "0-23", *TOY, "--out", str(out)]) == 0
    shard = out / "shards" / "shard-000000.npz"
    old_style = out / "shards" / ".shard-000001.npz.k2j4x9_a.npz"        # what a kill left before (mkstemp)
    new_style = out / "shards" / ".tmp-abc123" / "shard-000001.npz"      # what a kill leaves now
    new_style.parent.mkdir()
    shutil.copy(shard, old_style)
    shutil.copy(shard, new_style)
    capsys.readouterr()
    assert main(["metrics", str(out), "--space", "raw", "--ref", "toy:A", "--ref-n", "200", "--no-prdc"]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == 24
    assert main(["sample", *AG, "--w", "2", "--seeds", "0-23", *TOY, "--out", str(out)]) == 0
    assert not old_style.exists() and not new_style.parent.exists()
    assert sorted(p.name for p in (out / "shards").iterdir()) == [f"shard-{i:06d}.npz" for i in range(6)]


def test_atomic_writes_never_match_a_data_glob(tmp_path):
    from autoguidance.runs.files import atomic_path

    with atomic_path(tmp_path / "x.npz") as tmp:
        np.savez(tmp, a=np.zeros(2))
        assert tmp.name.endswith(".npz")
        assert list(tmp_path.glob("*.npz")) == []
    assert [p.name for p in tmp_path.iterdir()] == ["x.npz"]


# -- a changed sweep recomputes --------------------------------------------------------------------------------------

def test_a_changed_sweep_recomputes(tmp_path, capsys):
    out = tmp_path / "sw"
    base = ["sweep", "--net", "toy-denoiser-main", "--methods", "none", "--sigma-max", "5", "--steps", "2",
            "--space", "raw", "--no-prdc", "--no-progress", "--out", str(out)]

    def run(*extra):
        assert main([*base, *extra]) == 0
        capsys.readouterr()
        res = json.loads((out / "results.json").read_text())["results"]
        return len((out / "results.jsonl").read_text().splitlines()), res[0]

    n1, r1 = run("--seeds", "0-31", "--ref", "toy:A", "--ref-n", "200")
    assert n1 == 1 and r1["n"] == 32
    assert run("--seeds", "0-31", "--ref", "toy:A", "--ref-n", "200")[0] == 1          # same: reused
    n2, r2 = run("--seeds", "0-15", "--ref", "toy:A", "--ref-n", "200")               # seeds changed
    assert n2 == 2 and r2["n"] == 16
    n3, r3 = run("--seeds", "0-15", "--ref", "toy:B", "--ref-n", "200")               # reference changed
    assert n3 == 3 and r3["fd"] != r2["fd"]
    n4, _ = run("--seeds", "0-15", "--ref", "toy:B", "--ref-n", "300")                # reference size changed
    assert n4 == 4


def test_sweep_point_keys_depend_on_space_and_nets():
    from autoguidance.cli.sweep import point_key, run_context
    from autoguidance.methods import MethodSpec

    spec = MethodSpec(net="toy-denoiser-main")
    keys = {point_key(spec, run_context([spec], range(4), space=s, ref="toy:A")) for s in ("raw", "digits")}
    keys.add(point_key(spec, run_context([spec], range(4), space="raw", ref="toy:A", classes="0")))
    other = MethodSpec(net="toy-logp-main")
    keys.add(point_key(spec, run_context([other], range(4), space="raw", ref="toy:A")))
    assert len(keys) == 4


# -- checkpoint checksums --------------------------------------------------------------------------------------------

def test_a_flipped_bit_in_checkpoint_tensors_is_refused(tmp_path):
    path = ag.save(tiny_denoiser_mlp(), tmp_path / "ck")
    assert len(json.loads((path / "config.json").read_text())["sha256"]) == 64
    data = bytearray((path / "model.safetensors").read_bytes())
    data[-3] ^= 0x10                                              # inside the tensor data, header intact
    (path / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="model.safetensors: sha256 differs"):
        ag.load(path)
    # a checkpoint without a recorded checksum (older versions) still loads
    path2 = ag.save(tiny_denoiser_mlp(), tmp_path / "ck2")
    cfg = json.loads((path2 / "config.json").read_text())
    del cfg["sha256"]
    (path2 / "config.json").write_text(json.dumps(cfg))
    ag.load(path2)


def test_shipped_checkpoints_carry_their_checksum():
    from autoguidance.checkpoint import WEIGHTS_DIR
    from autoguidance.runs.files import file_sha256

    for name, rec in shipped().items():
        folder = WEIGHTS_DIR / rec["path"]
        cfg = json.loads((folder / "config.json").read_text())
        assert cfg.get("sha256") == file_sha256(folder / "model.safetensors"), name


# -- hooks act only on the call that installed them ------------------------------------------------------------------

def test_threads_do_not_see_each_others_hooks():
    net = tiny_denoiser_mlp(width=16)
    x, sigma = torch.randn(8, 2), torch.full((8,), 0.5)
    with torch.no_grad():
        plain = net(x, sigma)
    pert = perturb.WeightNoise(std=5.0)
    inside, release = threading.Event(), threading.Event()
    seen = {}

    def guided():
        with torch.no_grad(), pert.active(net, torch.ones(8, dtype=torch.bool), torch.arange(8), sigma):
            seen["perturbed"] = net(x, sigma)
            inside.set()
            release.wait(30)
            seen["perturbed_again"] = net(x, sigma)

    t = threading.Thread(target=guided)
    t.start()
    try:
        assert inside.wait(30)
        with torch.no_grad():
            other = net(x, sigma)               # another thread, while the hooks are installed
    finally:
        release.set()
        t.join(30)
    assert torch.equal(other, plain)
    assert not torch.allclose(seen["perturbed"], plain)
    assert torch.equal(seen["perturbed_again"], seen["perturbed"])


def test_weight_noise_while_another_thread_calls_the_same_net():
    """Issue 21, item 15: weight noise recomputed its sites with `functional_call` on the module itself, which swaps
    the module's parameters for the call: 83 of 150 plain calls from another thread raised ("tensor may have escaped
    from inside a function being vmapped"). Now the other thread always sees the plain net (the same call at the
    same batch: bit for bit), and the perturbed pass is the one computed alone."""
    net = tiny_denoiser_mlp(width=32)
    x, sigma = torch.randn(16, 2), torch.full((16,), 0.7)
    D = ag.perturbation_guidance(net, 2.0, perturb.WeightNoise(0.3), module=net)
    with torch.no_grad():
        plain, guided_alone = net(x, sigma), D(x, sigma)
    errors, wrong, started = [], [0], threading.Event()

    def hammer():
        started.set()
        for _ in range(150):
            try:
                with torch.no_grad():
                    out = net(x, sigma)
                wrong[0] += not torch.equal(out, plain)
            except Exception as e:                 # noqa: BLE001 -- counted, reported below
                errors.append(repr(e))

    t = threading.Thread(target=hammer)
    t.start()
    assert started.wait(30)
    guided = []
    with torch.no_grad():
        while t.is_alive() or not guided:
            guided.append(D(x, sigma))
    t.join(30)
    assert not errors, f"{len(errors)} of 150 plain calls raised: {errors[0]}"
    assert wrong[0] == 0
    assert len(guided) > 1
    for g in guided:
        assert torch.equal(g, guided_alone)        # the same call at the same batch composition


# -- torch.compile and hooks -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("perturbation", ["blockdrop", "dropout"])
def test_a_compiled_network_is_refused_by_hooking_perturbations(perturbation):
    """Hooks on a torch.compile'd net gave samples different from eager, depending on the call history: refused
    with one line naming the fix (the uncompiled net works)."""
    from autoguidance.methods import MethodSpec, build_method
    from autoguidance.sampling import generate

    net = ag.load("digits-s-T-ema050")
    compiled = torch.compile(net, backend="eager")
    spec = MethodSpec(net="x", method="perturbation", perturbation=perturbation, p=0.2, w=2.0, steps=2)
    kw = dict(labels=torch.eye(10)[:2], progress=False, **spec.sampling())
    with torch.no_grad():
        with pytest.raises(TypeError, match=r"torch.compile'd network.*_orig_mod"):
            generate(build_method(spec, load=lambda r: compiled), torch.arange(2), [1, 8, 8], **kw)
        generate(build_method(spec, load=lambda r: compiled._orig_mod), torch.arange(2), [1, 8, 8], **kw)
