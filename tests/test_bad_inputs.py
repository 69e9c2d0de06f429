"""Every bad input gets one clear line: a table of command lines and API calls, each with the words its error
must contain. A command exits 2 with exactly one stderr line (`autoguidance: error: ...`) and no traceback; an
API call raises ValueError/TypeError with a one-line message.

Also a script: `python tests/test_bad_inputs.py` runs the table on whatever `autoguidance` imports (e.g.
`PYTHONPATH=/tmp/before` for another version) and prints how many inputs got a clear error, a traceback, an
unclear error (several lines) or nothing at all (silent, exit 0)."""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

SAMPLE = ["sample", "--net", "toy-denoiser-main", "--sigma-max", "5", "--steps", "2", "--seeds", "0-3",
          "--no-progress"]
SWEEP = ["sweep", "--net", "toy-denoiser-main", "--methods", "none", "--sigma-max", "5", "--steps", "2",
         "--seeds", "0-3", "--space", "raw", "--ref", "toy:A", "--ref-n", "50", "--no-prdc", "--no-progress"]
METRICS = ["metrics", "--space", "raw", "--ref", "toy:A", "--ref-n", "50", "--no-prdc"]
AG = ["--method", "autoguidance", "--gnet", "toy-denoiser-guide"]

#: (id, argv with {R} = the fixtures folder, words the one error line must contain)
CLI_CASES = [
    ("out-empty", [*SAMPLE, "--out", ""], "--out"),
    ("out-is-file", [*SAMPLE, "--out", "{R}/afile"], "is a file"),
    ("out-under-file", [*SAMPLE, "--out", "{R}/afile/sub"], "is a file"),
    ("batch-negative", [*SAMPLE, "--batch", "-5", "--out", "{R}/o"], "--batch"),
    ("batch-zero", [*SAMPLE, "--batch", "0", "--out", "{R}/o"], "--batch"),
    ("shard-size-zero", [*SAMPLE, "--shard-size", "0", "--out", "{R}/o"], "--shard-size"),
    ("seeds-huge", ["sample", "--net", "toy-denoiser-main", "--seeds", "0-99999999999", "--out", "{R}/o"], "--seeds"),
    ("seeds-junk", [*SAMPLE, "--seeds", "a-b", "--out", "{R}/o"], "--seeds"),
    ("seeds-backwards", [*SAMPLE, "--seeds", "5-2", "--out", "{R}/o"], "--seeds"),
    ("none-with-w", [*SAMPLE, "--method", "none", "--w", "3", "--out", "{R}/o"], "w would do nothing"),
    ("none-with-interval", [*SAMPLE, "--method", "none", "--interval", "1,2", "--out", "{R}/o"], "interval"),
    ("interval-backwards", [*SAMPLE, "--method", "cfg", "--w", "2", "--interval", "2,1", "--out", "{R}/o"],
     "interval"),
    ("interval-one-number", [*SAMPLE, "--method", "cfg", "--interval", "2", "--out", "{R}/o"], "--interval"),
    ("rho-inf", [*SAMPLE, "--rho", "inf", "--out", "{R}/o"], "rho"),
    ("rho-nan", [*SAMPLE, "--rho", "nan", "--out", "{R}/o"], "rho"),
    ("rho-zero", [*SAMPLE, "--rho", "0", "--out", "{R}/o"], "rho"),
    ("churn-nan", [*SAMPLE, "--churn", "nan", "--out", "{R}/o"], "churn"),
    ("churn-negative", [*SAMPLE, "--churn", "-1", "--out", "{R}/o"], "churn"),
    ("sigma-min-zero", [*SAMPLE, "--sigma-min", "0", "--out", "{R}/o"], "sigma_min"),
    ("sigma-max-nan", [*SAMPLE, "--sigma-max", "nan", "--out", "{R}/o"], "sigma_max"),
    ("sigma-min-above-max", [*SAMPLE, "--sigma-min", "9", "--out", "{R}/o"], "sigma_min"),
    ("steps-zero", [*SAMPLE, "--steps", "0", "--out", "{R}/o"], "steps"),
    ("w-nan", [*SAMPLE, *AG, "--w", "nan", "--out", "{R}/o"], "w"),
    ("w-inf", [*SAMPLE, *AG, "--w", "inf", "--out", "{R}/o"], "w"),
    ("a-out-of-range", [*SAMPLE, "--method", "cfg-autoguidance", "--gnet", "toy-denoiser-guide", "--a", "2",
                        "--out", "{R}/o"], "a"),
    ("max-batch-zero", [*SAMPLE, *AG, "--max-batch", "0", "--out", "{R}/o"], "max_batch"),
    ("p-nan", [*SAMPLE, "--method", "insitu", "--p", "nan", "--out", "{R}/o"], "p"),
    ("net-missing", ["sample", "--net", "no-such-net", "--out", "{R}/o"], "no checkpoint"),
    ("net-none", ["sample", "--out", "{R}/o"], "--net"),
    ("net-is-code", ["sample", "--net", "os:getcwd", "--out", "{R}/o"], "--trust-code"),
    ("gnet-missing", [*SAMPLE, "--method", "autoguidance", "--out", "{R}/o"], "--gnet"),
    ("cfg-interval-no-interval", [*SAMPLE, "--method", "cfg-interval", "--out", "{R}/o"], "--interval"),
    ("classes-out-of-range", ["sample", "--net", "digits-s-T-ema050", "--classes", "99", "--out", "{R}/o"],
     "--classes"),
    ("classes-on-uncond", [*SAMPLE, "--classes", "3", "--out", "{R}/o"], "--classes"),
    ("shape-zero", [*SAMPLE, "--shape", "0,1", "--out", "{R}/o"], "--shape"),
    ("png-of-toy", [*SAMPLE, "--png", "--out", "{R}/o"], "--png"),
    ("config-folder", [*SAMPLE, "--config", "{R}/adir", "--out", "{R}/o"], "--config"),
    ("config-missing", [*SAMPLE, "--config", "{R}/missing.toml", "--out", "{R}/o"], "--config"),
    ("config-not-toml", [*SAMPLE, "--config", "{R}/bad.toml", "--out", "{R}/o"], "TOML"),
    ("config-binary", [*SAMPLE, "--config", "{R}/binary.toml", "--out", "{R}/o"], "--config"),
    ("config-w-string", [*SAMPLE, "--config", "{R}/w_str.toml", "--out", "{R}/o"], "setting w"),
    ("config-w-list", [*SAMPLE, "--config", "{R}/w_list.toml", "--out", "{R}/o"], "setting w"),
    ("config-steps-string", ["sample", "--net", "toy-denoiser-main", "--config", "{R}/steps_str.toml", "--out", "{R}/o"], "setting steps"),
    ("config-steps-float", ["sample", "--net", "toy-denoiser-main", "--config", "{R}/steps_float.toml", "--out", "{R}/o"], "setting steps"),
    ("config-interval-table", [*SAMPLE, "--config", "{R}/interval_dict.toml", "--out", "{R}/o"], "interval"),
    ("config-net-int", ["sample", "--config", "{R}/net_int.toml", "--out", "{R}/o"], "setting net"),
    ("config-method-list", [*SAMPLE, "--config", "{R}/method_list.toml", "--out", "{R}/o"], "setting method"),
    ("config-a-bool", [*SAMPLE, "--config", "{R}/a_bool.toml", "--out", "{R}/o"], "setting a"),
    ("config-max-batch-bool", [*SAMPLE, "--config", "{R}/mb_bool.toml", "--out", "{R}/o"], "max_batch"),
    ("config-unknown-key", [*SAMPLE, "--config", "{R}/unknown.toml", "--out", "{R}/o"], "unknown method setting"),
    ("config-trust-code", [*SAMPLE, "--config", "{R}/trust.toml", "--out", "{R}/o"], "trust_code"),
    ("config-code-net", ["sample", "--config", "{R}/code_net.toml", "--out", "{R}/o"], "--trust-code"),
    ("run-json-is-folder", [*SAMPLE, "--out", "{R}/runjson_dir"], "run.json"),
    ("shards-is-file", [*SAMPLE, "--out", "{R}/shards_file"], "shards"),
    ("png-is-file", [*SAMPLE, "--out", "{R}/png_file"], "png"),
    ("ckpt-config-list", ["sample", "--net", "{R}/ck_list", "--out", "{R}/o"], "config.json"),
    ("ckpt-width-negative", ["sample", "--net", "{R}/ck_width", "--out", "{R}/o"], "config.json"),
    ("ckpt-flipped-bit", ["sample", "--net", "{R}/ck_flip", "--out", "{R}/o"], "sha256"),
    ("ckpt-junk-weights", ["sample", "--net", "{R}/ck_junk", "--out", "{R}/o"], "model.safetensors"),
    ("ckpt-no-weights", ["sample", "--net", "{R}/ck_noweights", "--out", "{R}/o"], "model.safetensors"),
    ("ckpt-config-folder", ["sample", "--net", "{R}/ck_cfgdir", "--out", "{R}/o"], "config.json"),
    ("argparse-w-not-number", [*SAMPLE, "--w", "abc", "--out", "{R}/o"], "--w"),
    ("argparse-bad-method", [*SAMPLE, "--method", "bogus", "--out", "{R}/o"], "--method"),
    ("argparse-no-out", SAMPLE, "--out"),
    ("argparse-no-command", [], "command"),
    ("argparse-unknown-flag", [*SAMPLE, "--wieght", "2", "--out", "{R}/o"], "--wieght"),
    ("sweep-batch-zero", [*SWEEP, "--batch", "0", "--out", "{R}/s"], "--batch"),
    ("sweep-out-empty", [*SWEEP, "--out", ""], "--out"),
    ("sweep-out-is-file", [*SWEEP, "--out", "{R}/afile"], "is a file"),
    ("sweep-inception-not-official", [*SWEEP, "--space", "inception", "--inception-weights", "{R}/four.pt",
                                      "--out", "{R}/sw"], "pt_inception-2015-12-05"),
    ("metrics-inception-not-official", [*METRICS, "--space", "inception", "--inception-weights", "{R}/four.pt"],
     "pt_inception-2015-12-05"),
    ("sweep-ref-stats-junk", [*SWEEP, "--ref-stats", "{R}/junk.npz", "--out", "{R}/s"], "--ref-stats"),
    ("sweep-ref-stats-folder", [*SWEEP, "--ref-stats", "{R}/adir", "--out", "{R}/s"], "--ref-stats"),
    ("sweep-methods-bogus", [*SWEEP, "--methods", "bogus", "--out", "{R}/s"], "--methods"),
    ("sweep-w-nan", [*SWEEP, "--methods", "cfg", "--w", "nan", "--out", "{R}/s"], "w"),
    ("sweep-intervals-backwards", [*SWEEP, "--methods", "cfg", "--intervals", "2:1", "--out", "{R}/s"],
     "interval"),
    ("sweep-seeds-huge", [*SWEEP, "--seeds", "0-99999999999", "--out", "{R}/s"], "--seeds"),
    ("sweep-rho-inf", [*SWEEP, "--rho", "inf", "--out", "{R}/s"], "rho"),
    ("sweep-net-is-code", [*SWEEP, "--net", "os:getcwd", "--out", "{R}/s"], "--trust-code"),
    ("metrics-batch-zero", [*METRICS, "--batch", "0", "{R}/shards_ok"], "--batch"),
    ("metrics-bad-png", ["metrics", "--space", "digits", "--ref", "digits-test", "--no-prdc", "{R}/pngs"],
     "bad.png"),
    ("metrics-source-is-file", [*METRICS, "{R}/afile"], "afile"),
    ("metrics-source-missing", [*METRICS, "{R}/nothing"], "nothing"),
    ("metrics-junk-npz", [*METRICS, "{R}/junk.npz"], "junk.npz"),
    ("metrics-ref-stats-junk", ["metrics", "--space", "raw", "--ref-stats", "{R}/junk.npz"], "--ref-stats"),
    ("metrics-ref-n-zero", [*METRICS[:-3], "--ref-n", "0", "--no-prdc", "{R}/shards_ok"], "--ref-n"),
    ("metrics-out-is-file", [*METRICS, "--out", "{R}/afile", "{R}/shards_ok"], "is a file"),
    ("import-edm2-4-bytes", ["import-edm2", "{R}/four.pt", "--config", "edm2-img512-s", "--out", "{R}/imp"],
     "four.pt"),
    ("import-edm2-missing", ["import-edm2", "{R}/missing.pt", "--config", "edm2-img512-s", "--out", "{R}/imp"],
     "missing.pt"),
]

TOML = {
    "bad.toml": "w = = 3\n", "w_str.toml": 'w = "3"\n', "w_list.toml": "w = [3]\n", "steps_str.toml": 'steps = "x"\n',
    "steps_float.toml": "steps = 2.5\n", "interval_dict.toml": 'method = "cfg"\ninterval = {a = 1}\n',
    "net_int.toml": "net = 3\n", "method_list.toml": 'method = ["cfg"]\n', "a_bool.toml": "a = true\n",
    "mb_bool.toml": "max_batch = true\n", "unknown.toml": "wieght = 2.0\n",
    "trust.toml": 'net = "os:getcwd"\ntrust_code = true\n', "code_net.toml": 'net = "os:getcwd"\n',
}


def make_fixtures(root: Path) -> Path:
    """The files the table's command lines point at."""
    import autoguidance as ag
    from autoguidance.checkpoint import WEIGHTS_DIR, shipped

    root.mkdir(parents=True, exist_ok=True)
    (root / "afile").write_text("a file\n")
    (root / "adir").mkdir()
    for name, text in TOML.items():
        (root / name).write_text(text)
    (root / "binary.toml").write_bytes(b"\xff\xfe\x00bin")
    (root / "runjson_dir" / "run.json").mkdir(parents=True)
    (root / "shards_file").mkdir()
    (root / "shards_file" / "shards").write_text("x")
    (root / "png_file").mkdir()
    (root / "png_file" / "png").write_text("x")
    (root / "junk.npz").write_bytes(b"not a zip at all")
    (root / "four.pt").write_bytes(b"PK\x03\x04")
    (root / "pngs").mkdir()
    (root / "pngs" / "bad.png").write_bytes(b"\x89PNG junk")
    src = WEIGHTS_DIR / shipped()["toy-denoiser-main"]["path"]
    for name in ("ck_list", "ck_width", "ck_flip", "ck_junk", "ck_noweights", "ck_cfgdir"):
        shutil.copytree(src, root / name)
    (root / "ck_list" / "config.json").write_text("[1, 2]")
    cfg = json.loads((src / "config.json").read_text())
    cfg["config"]["width"] = -1
    cfg.pop("sha256", None)
    (root / "ck_width" / "config.json").write_text(json.dumps(cfg))
    data = bytearray((src / "model.safetensors").read_bytes())
    data[-5] ^= 0x01
    (root / "ck_flip" / "model.safetensors").write_bytes(bytes(data))
    (root / "ck_junk" / "model.safetensors").write_bytes(b"junk")
    cfg = json.loads((src / "config.json").read_text())
    cfg.pop("sha256", None)
    (root / "ck_junk" / "config.json").write_text(json.dumps(cfg))
    (root / "ck_noweights" / "model.safetensors").unlink()
    (root / "ck_cfgdir" / "config.json").unlink()
    (root / "ck_cfgdir" / "config.json").mkdir()
    # a sound sample folder (metrics cases whose fault is elsewhere)
    from autoguidance.runs.shards import write_shard
    import numpy as np
    write_shard(root / "shards_ok" / "shards" / "shard-000000.npz", np.zeros((4, 2), np.float32),
                np.arange(4), -np.ones(4, np.int64))
    del ag
    return root


def api_cases():
    """(id, call, words): Python API calls with bad values."""
    from autoguidance.methods import MethodSpec, load_model
    from autoguidance.runs.seeds import parse_seeds

    return [
        ("spec-rho-inf", lambda: MethodSpec(rho=math.inf), "rho"),
        ("spec-rho-nan", lambda: MethodSpec(rho=math.nan), "rho"),
        ("spec-churn-nan", lambda: MethodSpec(churn=math.nan), "churn"),
        ("spec-w-string", lambda: MethodSpec(method="cfg", w="3"), "w"),
        ("spec-a-bool", lambda: MethodSpec(method="cfg-autoguidance", gnet="g", a=True), "a"),
        ("spec-max-batch-bool", lambda: MethodSpec(max_batch=True), "max_batch"),
        ("spec-max-batch-zero", lambda: MethodSpec(max_batch=0), "max_batch"),
        ("spec-none-with-w", lambda: MethodSpec(method="none", w=3.0), "w"),
        ("spec-none-with-interval", lambda: MethodSpec(method="none", interval=(1, 2)), "interval"),
        ("spec-steps-float", lambda: MethodSpec(steps=2.5), "steps"),
        ("spec-interval-dict", lambda: MethodSpec(method="cfg", interval={"a": 1}), "interval"),
        ("spec-sigma-order", lambda: MethodSpec(sigma_min=5.0, sigma_max=1.0), "sigma_min"),
        ("spec-net-int", lambda: MethodSpec(net=3), "net"),
        ("load-code-untrusted", lambda: load_model("os:getcwd"), "trust_code"),
        ("seeds-huge", lambda: parse_seeds("0-99999999999"), "--seeds"),
    ]


def run_cli(argv: list[str]) -> tuple[int, str, BaseException | None]:
    """`(exit code, stderr, escaped exception)` of `autoguidance ARGV` run in this process."""
    from autoguidance.cli import main

    err, out = io.StringIO(), io.StringIO()
    exc = None
    code = None
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            code = main(argv)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except BaseException as e:    # noqa: BLE001 - a traceback is what the table detects
            exc = e
    return code, err.getvalue(), exc


def _argv(argv, root, name="x") -> list[str]:
    """Fill in the fixtures folder; `{R}/o` and `{R}/s` become a fresh output folder per case."""
    return [f"{root}/{a[-1]}-{name}" if a in ("{R}/o", "{R}/s") else a.replace("{R}", str(root)) for a in argv]


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    return make_fixtures(tmp_path_factory.mktemp("bad") / "R")


@pytest.mark.parametrize("name,argv,words", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_bad_command_line_gets_one_clear_line(fixtures, name, argv, words, monkeypatch):
    monkeypatch.delenv("AUTOGUIDANCE_DEBUG", raising=False)
    code, err, exc = run_cli(_argv(argv, fixtures, name))
    assert exc is None, f"traceback: {type(exc).__name__}: {exc}"
    lines = err.strip().splitlines()
    assert code == 2, (code, err)
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("autoguidance: error: ") and words in lines[0], lines[0]


@pytest.mark.parametrize("case", range(15), ids=lambda i: f"api-{i}")
def test_bad_api_call_raises_one_clear_line(case):
    name, call, words = api_cases()[case]
    with pytest.raises((ValueError, TypeError)) as info:
        call()
    msg = str(info.value)
    assert "\n" not in msg and words in msg, (name, msg)


def test_debug_switch_shows_the_traceback(fixtures, monkeypatch):
    from autoguidance.cli import main

    monkeypatch.setenv("AUTOGUIDANCE_DEBUG", "1")
    with pytest.raises(ValueError, match="rho"):
        main(_argv([*SAMPLE, "--rho", "inf", "--out", "{R}/o"], fixtures))


def measure() -> dict:
    """Run the table on the importable `autoguidance`; counts of clear / traceback / unclear / silent."""
    counts = {"tried": 0, "clear": 0, "traceback": 0, "unclear": 0, "silent": 0}
    detail = []
    with tempfile.TemporaryDirectory() as d:
        root = make_fixtures(Path(d) / "R")
        cwd = os.getcwd()
        os.chdir(d)
        try:
            for name, argv, words in CLI_CASES:
                code, err, exc = run_cli(_argv(argv, root, name))
                lines = err.strip().splitlines()
                if exc is not None:
                    kind = "traceback"
                elif code == 0:
                    kind = "silent"
                elif len(lines) == 1 and "Traceback" not in err and words in lines[0]:
                    kind = "clear"
                else:
                    kind = "unclear"
                counts["tried"] += 1
                counts[kind] += 1
                detail.append((name, kind, (f"{type(exc).__name__}: {exc}" if exc else (lines[-1] if lines else ""))
                               [:150]))
        finally:
            os.chdir(cwd)
    try:
        cases = api_cases()
    except ImportError as e:
        cases = []
        detail.append(("api", "traceback", str(e)))
    for name, call, words in cases:
        try:
            call()
            kind, msg = "silent", ""
        except (ValueError, TypeError) as e:
            msg = str(e)
            kind = "clear" if "\n" not in msg and words in msg else "unclear"
        except BaseException as e:  # noqa: BLE001
            kind, msg = "traceback", f"{type(e).__name__}: {e}"
        counts["tried"] += 1
        counts[kind] += 1
        detail.append((name, kind, msg[:150]))
    return {"counts": counts, "detail": detail}


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    res = measure()
    for name, kind, msg in res["detail"]:
        print(f"{kind:9s} {name:28s} {msg}")
    print(json.dumps(res["counts"]))
