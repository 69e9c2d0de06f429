"""`autoguidance digits|mnist ...`: the papers' ImageNet tables, re-measured on real images (8x8 digits, MNIST at
14x14: `image_sets.py`) with EDM2-style U-Nets. The text below names the digits; MNIST runs the same protocol on
its own checkpoints (`autoguidance/weights/mnist`, `scripts/train_mnist_checkpoints.sh`) and its test split.

Protocol (the same for every row; Karras et al. 2024, Sec. 5, at digits scale):

- Models: the shipped checkpoints of `autoguidance/weights/digits` (made by `scripts/train_digits_checkpoints.sh`):
  main S at T; guide XS at T/16 (and T/32, T/8, T/4, T/2 for the guide-length study); S at T/16; XS at T;
  unconditional XS (CFG guide at T, unconditional guide at T/16); S trained with dropout 0.1; unconditional S;
  XS on half the data. Each at two EMA lengths (0.050, 0.150).
- Sampling: EDM Heun, `num_steps` steps, sigma in [0.002, 80], rho 7, one seed per image. Conditional rows draw
  class `seed % 10`, so every seed set is class-balanced like the test split.
- Metrics (`autoguidance.metrics`): FD_digits (Frechet distance in the digits classifier's 64-d feature space),
  precision/recall (k = 3), density/coverage (k = 5), all against the 500-image test split, and the classifier's
  accuracy on the conditioning label.
- Tuning: each method's guidance weight w (and, for separate guide nets, the guide's EMA length; the main's EMA
  is chosen once, by FD without guidance) is swept on seed set 0, the best by FD is kept, and the reported
  numbers are mean and spread (std) over the held-out seed sets 1, 2, 3, never the set used for tuning.

Commands (`cli/image_tables.py`; each writes PNG figures, a Markdown table and a JSON record to --out; `--quick` = few
samples, for CI; the tables and figures are made by `image_tables_report.py`):

    autoguidance digits table          the main table, the sweep figure (FD against w), the sample grids
    autoguidance digits degradations   Karras et al.'s synthetic-degradation table (dropout, input noise)
    autoguidance digits failures       "what did not work": less data, quantized main, interval on autoguidance
    autoguidance digits schedules      constant w vs a sigma interval vs a ramp, for CFG, autoguidance, in-situ
    autoguidance digits guides         autoguidance by XS guides from T/32 to T of one run: how bad should it be?
    autoguidance digits floor          real training images through the same metrics: the floor of FD_digits
    autoguidance digits late           in-situ dropout at late blocks only (last, last 4, decoder) vs every block
    autoguidance digits features       train the feature network of the metrics
    autoguidance digits manifest       add the digits checkpoints to weights/manifest.json
"""
from __future__ import annotations

import copy
import hashlib
import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from ..checkpoint import load
from ..guidance import Guide, Guided, Pass, autoguidance, cfg, cfg_autoguidance, insitu, no_guidance, \
    perturbation_guidance
from ..runs.files import atomic_path, write_json, write_text
from ..metrics.features import extract, load_feature_net
from ..metrics.frechet import frechet_distance_features
from ..metrics.prdc import prdc
from ..sampling import generate
from ..rules import make_rule
from ..schedules import Interval, Ramp, as_schedule
from .image_sets import DIGITS, ImageSet
from .image_tables_report import Row, costs_md, extra_cols, extra_md, fmt_params, plot_grids, plot_pr, plot_sweeps, \
    row_json, table_md, \
    training_costs

__all__ = ["Settings", "FULL", "QUICK", "Lab", "experiment_text", "run_table", "run_degradations", "run_failures", "run_schedules",
           "run_guides", "run_floor", "run_late", "late_sites", "bottleneck_blocks",
           "lowest_encoder_blocks", "skip_bottleneck", "TABLE_PERTURBATIONS", "run_experiment", "quantize_weights", "DIGITS_WEIGHTS", "METRICS", "EXPERIMENTS",
           "NOTES"]

DIGITS_WEIGHTS = DIGITS.weights
METRICS = ("fd", "precision", "recall", "density", "coverage", "accuracy")
INTERVAL = (0.28, 2.9)   # the guidance interval of Kynkaanniemi et al. (EDM2-S 512) in sigma, used as is


@dataclass(frozen=True)
class Settings:
    n:          int = 300                      # images per seed set
    num_steps:  int = 12                       # Heun steps (2 num_steps - 1 denoiser calls)
    tune_set:   int = 0                        # the seed set on which w and EMA lengths are chosen
    eval_sets:  tuple = (1, 2, 3)              # held-out seed sets: mean and spread are over these
    ws:         tuple = (1.1, 1.25, 1.5, 2.0, 3.0)  # guidance weights swept (w = 1 is the unguided row)
    emas:       tuple = ("050", "150")         # EMA lengths (relative std x 1000) of the checkpoints
    guide_emas: Optional[tuple] = None         # the guides' EMA lengths tried, if not every one of `emas`
    batch:      int = 300                      # images per sampler call (results do not depend on it)
    #: w values tried beyond a grid, in order, while the best w on the tuning set is the largest tried (a method
    #: whose best lies at the grid's edge is not tuned yet); () tries none
    ws_extend:  tuple = ()

    def seeds(self, seed_set: int) -> torch.Tensor:
        """Image seeds of a seed set: `seed_set * 1_000_000 + [0, n)`."""
        return seed_set * 1_000_000 + torch.arange(self.n, dtype=torch.int64)


FULL = Settings()
QUICK = Settings(n=40, num_steps=4, eval_sets=(1, 2), ws=(1.5, 2.5), emas=("050", "150"), batch=40)


class Lab:
    """Shared state of one experiment run: checkpoints (loaded once), the feature net, the reference features,
    and every evaluation done so far (keyed by method, parameters and seed set, so rows share work)."""

    def __init__(self, settings: Settings = FULL, weights=None, features=None, progress: bool = True,
                 data: ImageSet = DIGITS, store=None):
        self.s = settings
        self.store = Path(store) if store is not None else None   # evaluations kept on disk: resume, share
        self.data = data
        self.weights = Path(weights) if weights is not None else data.weights
        self.features_path = Path(features) if features is not None else self.weights / "features"
        self._digests: dict[Path, str] = {}         # checkpoint folder -> its weights' sha256 (store keys)
        self.feature_net = load_feature_net(self.features_path)
        test = data.load("test").images
        self.ref = extract(self.feature_net, test)[0]   # the test split's features
        #: precision/recall/density/coverage against a fixed test subset of N images where the set asks for it (the
        #: same N as the samples, as Kynkaanniemi et al. compare sets); FD always against the whole test split
        self.prdc_idx = (torch.randperm(len(test), generator=torch.Generator().manual_seed(0))[:settings.n]
                         if data.prdc_matched and len(test) > settings.n else None)
        #: the further feature spaces `(prefix, net, reference features, identity)` (`ImageSet.spaces`)
        self.spaces: list[tuple] = []
        for prefix, folder in data.spaces[1:]:
            if folder is None:
                from ..metrics.pixels import PixelPCA
                net = PixelPCA.fit(data.load("train").images, dim=32)
                ident = f"pixel-pca32:{net.digest()}"
            else:
                path = self.weights / folder
                if not (path / "config.json").exists():
                    raise FileNotFoundError(f"{data.noun} feature net {folder!r} is missing from {self.weights}: train "
                                            f"it with `autoguidance {data.prefix} {folder}` (see docs)")
                net, ident = load_feature_net(path), self._digest(path)
            self.spaces.append((prefix, net, extract(net, test)[0], ident))
        self.progress = progress
        self._nets: dict[str, torch.nn.Module] = {}
        self.cache: dict[str, dict] = {}
        self.timing: dict[str, float] = {}          # seconds per evaluation (kept out of the numbers)
        self.samples: dict[str, torch.Tensor] = {}  # evaluation -> its first 100 images (first held-out set only)
        self.images: dict[str, torch.Tensor] = {}   # row key -> the samples of its reported parameters
        self.t0 = time.perf_counter()

    # -- checkpoints ---------------------------------------------------------------------------------------------
    def net(self, name: str) -> torch.nn.Module:
        if name not in self._nets:
            path = self.weights / name
            if not (path / "config.json").exists():
                raise FileNotFoundError(f"{self.data.noun} checkpoint {name!r} is missing from {self.weights}: train "
                                        f"the set with `bash {self.data.train_script}` (or pass --weights)")
            self._nets[name] = load(path)
        return self._nets[name]

    # -- one evaluation --------------------------------------------------------------------------------------------
    def _ck(self, build: Callable, params: dict, seed_set: int) -> str:
        """Evaluations are identified by the denoiser builder and its parameters (not the row), so rows that
        share a configuration (e.g. the autoguidance sweep and its 'same EMA' row) share the work."""
        return json.dumps([build.__qualname__, params, seed_set, self.s.n, self.s.num_steps], sort_keys=True)

    def _digest(self, path: Path) -> str:
        """A checkpoint's identity: the sha256 of its weights recorded in its config.json (else of the config);
        read once per path."""
        if path not in self._digests:
            cfg = path / "config.json"
            self._digests[path] = ("missing" if not cfg.exists() else
                                   json.loads(cfg.read_text()).get("sha256") or hashlib.sha256(cfg.read_bytes()).hexdigest())
        return self._digests[path]

    def _store_name(self, ck: str, params: dict, conditional: bool) -> str:
        """The stored evaluation's file stem: a digest of the evaluation's identity, the image set, the checkpoints
        it samples (by their weights' sha256, so a retrained net never reuses an old number) and the metric's net."""
        nets = {k: self._digest(self.weights / v) for k, v in sorted(params.items())
                if k in ("main", "guide", "uncond") and isinstance(v, str)}
        ident = [ck, conditional, self.data.prefix, nets, self._digest(self.features_path), self.s.batch]
        if self.spaces or self.prdc_idx is not None:    # absent for the digits and MNIST: their stored keys stand
            ident.append([[p, i] for p, _, _, i in self.spaces] + [self.prdc_idx is not None])
        return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:32]

    def _load_stored(self, name: str, want_samples: bool) -> Optional[tuple[dict, float, Optional[torch.Tensor]]]:
        rec_path, x_path = self.store / f"{name}.json", self.store / f"{name}.npy"
        if not rec_path.exists() or (want_samples and not x_path.exists()):
            return None
        try:
            stored = json.loads(rec_path.read_text())
            x = torch.from_numpy(np.load(x_path)) if want_samples else None
        except (OSError, ValueError):
            return None    # a damaged file is recomputed (and replaced atomically)
        return stored["metrics"], stored["seconds"], x

    def _save_stored(self, name: str, ck: str, rec: dict, seconds: float, x: Optional[torch.Tensor]) -> None:
        if x is not None:
            with atomic_path(self.store / f"{name}.npy") as tmp:
                with open(tmp, "wb") as f:
                    np.save(f, x.numpy())
        write_json(self.store / f"{name}.json", {"evaluation": json.loads(ck), "metrics": rec,
                                                  "seconds": round(seconds, 2)})

    #: seconds between looks at an evaluation another process is computing
    CLAIM_POLL = 5.0

    def _claim(self, name: str, want_samples: bool) -> tuple[bool, Optional[tuple]]:
        """Take the evaluation `name` for this process (`(True, None)`: compute it), or, while another live process
        on this machine holds its claim (`<name>.claim`, its pid), wait for that process's record and return it
        (`(False, stored)`). A claim whose process is gone is taken over. So processes sharing a store never
        compute one evaluation twice."""
        import os

        self.store.mkdir(parents=True, exist_ok=True)
        path = self.store / f"{name}.claim"
        while True:
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    pid = int(path.read_text().strip() or 0)
                except (OSError, ValueError):
                    pid = 0
                alive = pid > 0
                if alive:
                    try:
                        os.kill(pid, 0)
                    except ProcessLookupError:
                        alive = False
                    except PermissionError:
                        pass
                if not alive:
                    path.unlink(missing_ok=True)    # its process is gone: take the evaluation over
                    continue
                time.sleep(self.CLAIM_POLL)
                stored = self._load_stored(name, want_samples)
                if stored is not None:
                    return False, stored
                continue
            with os.fdopen(fd, "w") as f:
                f.write(str(os.getpid()))
            stored = self._load_stored(name, want_samples)    # finished between our look and our claim
            if stored is not None:
                path.unlink(missing_ok=True)
                return False, stored
            return True, None

    def evaluate(self, key: str, build: Callable, params: dict, seed_set: int, conditional: bool = True) -> dict:
        """Sample seed set `seed_set` with the denoiser `build(self, params)`; metrics against the test split.
        With a store, an evaluation done before (by any run with the same checkpoints and settings) is read back."""
        ck = self._ck(build, params, seed_set)
        if ck in self.cache:
            return self.cache[ck]
        keep = seed_set == self.s.eval_sets[0]
        name = self._store_name(ck, params, conditional) if self.store is not None else None
        stored = self._load_stored(name, keep) if name is not None else None
        claimed = False
        if stored is None and name is not None:
            claimed, stored = self._claim(name, keep)
        if stored is not None:
            rec, self.timing[ck], x = stored
            self.cache[ck] = rec
            if keep:
                self.samples[ck] = x
            if self.progress:
                print(f"  [{time.perf_counter() - self.t0:6.0f}s] {key:22s} {fmt_params(params):44s} set {seed_set}: "
                      f"FD {rec['fd']:7.3f}  (stored)", flush=True)
            return rec
        try:
            seeds = self.s.seeds(seed_set)
            classes = seeds % 10
            labels = torch.nn.functional.one_hot(classes, 10).float() if conditional else None
            D = build(self, params)
            t = time.perf_counter()
            with torch.no_grad():
                x = generate(D, seeds, list(self.data.shape), labels=labels, num_steps=self.s.num_steps,
                             batch=self.s.batch, progress=False)
            rec = self.measure(x, classes if conditional else None)
            self.cache[ck] = rec
            self.timing[ck] = time.perf_counter() - t
            if keep:
                self.samples[ck] = x[:100].clone()
            if name is not None:
                self._save_stored(name, ck, rec, self.timing[ck], self.samples.get(ck))
        finally:
            if claimed:
                (self.store / f"{name}.claim").unlink(missing_ok=True)
        if self.progress:
            print(f"  [{time.perf_counter() - self.t0:6.0f}s] {key:22s} {fmt_params(params):44s} set {seed_set}: "
                  f"FD {rec['fd']:7.3f}  ({self.timing[ck]:.1f}s)", flush=True)
        return rec

    def measure(self, x: torch.Tensor, classes: Optional[torch.Tensor] = None) -> dict:
        """The metrics of images `x` `[N, *data.shape]` against the test split (accuracy when `classes` is given), in
        every feature space of the image set (the further ones prefixed: 'ssl_fd', 'pix_precision', ...)."""
        f, logits = extract(self.feature_net, x)
        rec = {"fd": frechet_distance_features(self.ref, f), **prdc(self._prdc_ref(self.ref), f, 3, 5),
               "accuracy": float((logits.argmax(1) == classes).float().mean()) if classes is not None else None}
        for prefix, net, ref, _ in self.spaces:
            g = extract(net, x)[0]
            rec.update({f"{prefix}_{k}": v for k, v in
                        {"fd": frechet_distance_features(ref, g), **prdc(self._prdc_ref(ref), g, 3, 5)}.items()})
        return rec

    def _prdc_ref(self, ref: torch.Tensor) -> torch.Tensor:
        return ref if self.prdc_idx is None else ref[self.prdc_idx]

    # -- sweep on the tuning set, then the held-out sets ------------------------------------------------------------
    def tune(self, key: str, build: Callable, grid: list[dict], conditional: bool = True) -> dict:
        """Evaluate every `params` of `grid` on the tuning set; keep the best by FD; report it on the held-out sets.
        While the best w is the largest tried, the settings' `ws_extend` values beyond it are tried in order (at the
        best's other parameters) and join the sweep. Returns `{'best', 'sweep': [{params, fd}], 'mean': {metric}, 'std': {metric}, 'runs': [...]}`."""
        if not grid:
            raise ValueError(f"empty parameter grid for {key}")
        sweep = [{"params": p, **self.evaluate(key, build, p, self.s.tune_set, conditional)} for p in grid]
        best = min(sweep, key=lambda r: r["fd"])["params"]
        for w in self.s.ws_extend:                # the best at the edge: go on along w at the best's other params
            tried = [p["w"] for p in grid if isinstance(p.get("w"), (int, float))]
            if not tried or best.get("w") != max(tried):
                break                             # the best lies inside the grid: tuned
            if w <= max(tried):
                continue
            p = dict(best, w=float(w))
            grid = [*grid, p]
            sweep.append({"params": p, **self.evaluate(key, build, p, self.s.tune_set, conditional)})
            best = min(sweep, key=lambda r: r["fd"])["params"]
        return {"best": best, "sweep": sweep, **self.heldout(key, build, best, conditional)}

    def heldout(self, key: str, build: Callable, params: dict, conditional: bool = True) -> dict:
        runs = [self.evaluate(key, build, params, s, conditional) for s in self.s.eval_sets]
        self.images[key] = self.samples.get(self._ck(build, params, self.s.eval_sets[0]))
        return {"params": params, **mean_std(runs), "runs": runs}

    def grid(self, **axes) -> list[dict]:
        """Cartesian product of named axes, in order: `grid(w=[..], guide=[..])`."""
        out = [{}]
        for name, values in axes.items():
            out = [dict(p, **{name: v}) for p in out for v in values]
        return out


def mean_std(runs: list[dict]) -> dict:
    """`{'mean': {metric}, 'std': {metric}}` over the runs (std with ddof 1; 0 for one run; None where a metric is
    None), for every metric of the runs: `METRICS` first, then a set's further feature spaces ('ssl_fd', ...)."""
    keys = list(METRICS) + [k for k in runs[0] if k not in METRICS]
    mean, std = {}, {}
    for m in keys:
        vals = [r[m] for r in runs if r.get(m) is not None]
        mean[m] = float(np.mean(vals)) if vals else None
        std[m] = float(np.std(vals, ddof=1)) if len(vals) > 1 else (0.0 if vals else None)
    return {"mean": mean, "std": std}


# -- denoisers of the rows ------------------------------------------------------------------------------------------

def _ws(lab: Lab) -> list[float]:
    return [float(w) for w in lab.s.ws]


def _guide_names(lab: Lab, prefix: str, guide: bool = True) -> list[str]:
    """The checkpoints of a run's snapshot at the EMA lengths tried: the settings' `guide_emas` for a guide (every
    EMA when None), every EMA for a main."""
    emas = (lab.s.guide_emas or lab.s.emas) if guide else lab.s.emas
    return [f"{prefix}-ema{e}" for e in emas]


def choose_main(lab: Lab, prefix: str, conditional: bool = True) -> tuple[str, dict]:
    """The main net's EMA length: the best FD without guidance on the tuning set."""
    res = lab.tune(f"none:{prefix}", _b_none, lab.grid(main=_guide_names(lab, prefix, guide=False)), conditional)
    return res["best"]["main"], res


def _w(p: dict):
    """The weight of a row: a number, `Interval(w, *interval)` or `Ramp(w, 1, *ramp)` (sigma_from, sigma_to)."""
    if "interval" in p:
        return Interval(p["w"], *p["interval"])
    if "ramp" in p:
        return Ramp(p["w"], 1.0, sigma_from=p["ramp"][0], sigma_to=p["ramp"][1])
    return p["w"]


def _b_none(L, p):
    return no_guidance(L.net(p["main"]))


def _b_cfg(L, p):
    return cfg(L.net(p["main"]), _w(p), uncond=L.net(p["guide"]))


def _b_auto(L, p):
    return autoguidance(L.net(p["main"]), L.net(p["guide"]), _w(p))


def _b_insitu(L, p):
    return insitu(L.net(p["main"]), _w(p), p.get("p", 0.1))


#: the digits records' short names that differ from `autoguidance.methods.PERTURBATIONS` (kept: they key the JSON)
_ALIASES = {"identityattn": "identityattention"}


def _lowest(net: torch.nn.Module) -> str:
    """The lowest resolution of an EDM2 U-Net's blocks as its block names spell it ('4x4' for the 8x8 digits)."""
    return min((k.split("_")[0] for k in net.unet.enc.keys()), key=lambda r: int(r.split("x")[0]))


def bottleneck_blocks(net: torch.nn.Module) -> list[str]:
    """The EDM2 U-Net's shape-keeping blocks in the middle of the net (the skip-layer guide skips them)."""
    r = _lowest(net)
    return [f"unet.dec.{r}_in0", f"unet.dec.{r}_in1"]


def skip_bottleneck(net: torch.nn.Module):
    """Skip-layer guidance on an EDM2 U-Net: its two bottleneck blocks return their input in the guide pass."""
    from ..perturb import SkipLayers

    return SkipLayers(blocks="unet.dec", layers=[b.rsplit(".", 1)[1] for b in bottleneck_blocks(net)])


def lowest_encoder_blocks(net: torch.nn.Module) -> list[str]:
    """The encoder's blocks at the lowest resolution (TPG shuffles their output tokens)."""
    r = _lowest(net)
    return [f"unet.enc.{k}" for k in net.unet.enc.keys() if k.startswith(f"{r}_block")]


def _perturbation(kind: str, strength: float, net: Optional[torch.nn.Module] = None):
    """A perturbation by short name at `strength`: 'tpg' and 'skiplayer' on `net`'s lowest-resolution blocks (as
    the free-guides head-to-head), the others via `methods.make_perturbation` (its default sites)."""
    from ..methods import make_perturbation
    from ..perturb import TokenShuffle

    if kind == "tpg":
        return TokenShuffle(where=lowest_encoder_blocks(net))
    if kind == "skiplayer":
        return skip_bottleneck(net)
    return make_perturbation(_ALIASES.get(kind, kind), strength)


def _b_perturb(L, p):
    net = L.net(p["main"])
    return perturbation_guidance(net, p["w"], _perturbation(p["kind"], p["strength"], net))


def _b_ruled(L, p):
    """The denoiser of a non-linear rule row: method `p['method']` with rule `p['rule']` (`p['rule_args']`)."""
    rule = make_rule(p["rule"], p["rule_args"])
    if p["method"] == "cfg":
        return cfg(L.net(p["main"]), p["w"], uncond=L.net(p["guide"]), rule=rule)
    if p["method"] == "auto":
        return autoguidance(L.net(p["main"]), L.net(p["guide"]), p["w"], rule=rule)
    return insitu(L.net(p["main"]), p["w"], p["p"], rule=rule)


def _b_cfg_auto(L, p):
    return cfg_autoguidance(L.net(p["main"]), L.net(p["guide"]), p["w"], p["a"], uncond=L.net(p["uncond"]))


def _b_degraded(L, p):
    """`D_good` = main under perturbation `good`, `D_bad` = main under `bad` (Karras et al. 2024, Sec. 5.1)."""
    net = L.net(p["main"])
    good = Pass(net, perturbation=_perturbation(*p["good"]))
    if "bad" not in p or p["w"] == 1.0:
        return Guided(good)
    return Guided(good, [Guide(Pass(net, perturbation=_perturbation(*p["bad"])), as_schedule(p["w"]))])


def quantize_weights(net: torch.nn.Module, bits: int = 4) -> torch.nn.Module:
    """A copy of an EDM2 net whose conv/linear weights are quantized to `bits` bits, symmetric and uniform per
    output channel (after EDM2's weight normalisation): the "weight-quantized main" guide of Karras et al."""
    from ..nets.mp import normalize

    if not 2 <= bits <= 16:
        raise ValueError(f"bits must be in [2, 16], got {bits}")
    q = copy.deepcopy(net).eval().requires_grad_(False)
    levels = 2 ** (bits - 1) - 1
    with torch.no_grad():
        for name, p in q.named_parameters():
            if name.endswith("weight") and p.ndim >= 2:
                w = normalize(p.float()).double()
                scale = w.abs().flatten(1).amax(1).clamp_min(1e-12).reshape(-1, *([1] * (w.ndim - 1))) / levels
                p.copy_((torch.round(w / scale) * scale).to(p.dtype))
    return q


def _b_quant(L, p):
    key = f"{p['main']}@q{p['bits']}"
    if key not in L._nets:
        L._nets[key] = quantize_weights(L.net(p["main"]), p["bits"])
    return autoguidance(L.net(p["main"]), L._nets[key], p["w"])


# -- the experiments ---------------------------------------------------------------------------------------------

#: the free guides of each set's main table: on digits the first three tried; on MNIST and Fashion-MNIST the best
#: free guides of the digits head-to-head (docs/free_guides.md: block drop, TPG, skip-layer; the same-run T/16 snapshot and in-situ
#: dropout are rows of the table already)
TABLE_PERTURBATIONS = {
    "digits": (("blockdrop", 0.1, "block drop p = 0.1"), ("inputnoise", 0.2, "input noise +20%"),
               ("identityattn", 1.0, "identity attention")),
    "mnist": (("blockdrop", 0.1, "block drop p = 0.1"), ("tpg", 1.0, "TPG, tokens of the lowest-resolution encoder "
                                                                    "blocks shuffled"),
              ("skiplayer", 1.0, "skip-layer, the 2 bottleneck blocks return their input")),
}
TABLE_PERTURBATIONS["fashion"] = TABLE_PERTURBATIONS["mnist"]     # the same free guides, on the 28x28 nets


def _cfg_grid(lab: Lab, main: str) -> list[dict]:
    """The main table's CFG grid: the unconditional XS at T (both EMAs) as the guide, every w."""
    return lab.grid(main=[main], guide=_guide_names(lab, "xs-uncond-T"), w=_ws(lab))


def _auto_grid(lab: Lab, main: str) -> list[dict]:
    """The main table's autoguidance grid: the XS at T/16 (both EMAs) as the guide, every w."""
    return lab.grid(main=[main], guide=_guide_names(lab, "xs-T16"), w=_ws(lab))


def run_table(lab: Lab, methods: Optional[list[str]] = None) -> list[Row]:
    """The main table (Karras et al. 2024, Table 1 at digits scale, plus the in-situ and perturbation rows)."""
    W = _ws(lab)
    rows_of_set = lab.data.table_rows
    want = (lambda k: (methods is None and (rows_of_set is None or k in rows_of_set)) or (methods is not None and k in methods))
    main, _ = choose_main(lab, "s-T")
    rows: list[Row] = []

    def add(key, label, build, grid, paper="", group="conditional", conditional=True, force=False):
        if force or want(key):
            rows.append(Row(key, label, lab.tune(key, build, grid, conditional), paper, group))

    rows.append(Row("none", "S, no guidance", lab.heldout("none:s-T", _b_none, {"main": main}),
                    "FID 2.56 / FD_DINOv2 68.64", lab_key="none:s-T"))
    add("cfg", "CFG (uncond. XS at T)", _b_cfg, _cfg_grid(lab, main), "2.23 (w 1.40) / 52.32 (w 1.90)")
    add("cfg-interval", f"CFG, interval sigma in ({INTERVAL[0]}, {INTERVAL[1]}]", _b_cfg,
        lab.grid(main=[main], guide=_guide_names(lab, "xs-uncond-T"), interval=[list(INTERVAL)], w=W),
        "1.68 (w 2.10) / 46.25 (w 3.20)")
    add("auto", "autoguidance (XS, T/16)", _b_auto, _auto_grid(lab, main), "**1.34** (w 2.10) / **36.67** (w 2.45)")
    if want("auto-same-ema"):
        same = f"xs-T16-ema{main.rsplit('ema', 1)[1]}"
        add("auto-same-ema", "- guide EMA = main's EMA", _b_auto, lab.grid(main=[main], guide=[same], w=W),
            "1.53 (w 1.95) / 40.81 (w 2.25)")
    add("auto-S-T16", "- reduce training only (S, T/16)", _b_auto,
        lab.grid(main=[main], guide=_guide_names(lab, "s-T16"), w=W), "1.51 (w 2.20) / 42.27 (w 2.55)")
    add("auto-XS-T", "- reduce capacity only (XS, T)", _b_auto,
        lab.grid(main=[main], guide=_guide_names(lab, "xs-T"), w=W), "2.13 (w 1.80) / 59.89 (w 1.90)")
    add("insitu", "in-situ dropout p = 0.1 (main without dropout)", _b_insitu, lab.grid(main=[main], p=[0.1], w=W),
        "2.57 / 90.05 (w' 2.0 = w 3.0; EDM2-S)")
    for kind, strength, label in TABLE_PERTURBATIONS[lab.data.prefix]:
        add(kind, f"perturbation: {label}", _b_perturb,
            lab.grid(main=[main], kind=[kind], strength=[strength], w=W), "-")
    if want("cfg+auto"):
        best_cfg = next((r.result["best"]["guide"] for r in rows if r.key == "cfg"), _guide_names(lab, "xs-uncond-T")[-1])
        best_auto = next((r.result["best"]["guide"] for r in rows if r.key == "auto"), _guide_names(lab, "xs-T16")[-1])
        add("cfg+auto", "CFG + autoguidance (a = 0.5)", _b_cfg_auto,
            lab.grid(main=[main], guide=[best_auto], uncond=[best_cfg], a=[0.5], w=W), "(App. B.2: no FID given)")
    for method, rule, args, label in lab.data.table_rules:    # the best rules of the rules study, where a set has them
        key = f"{method}+{rule}"
        base = {"cfg": _cfg_grid, "auto": _auto_grid}[method](lab, main)
        add(key, f"{label} with {make_rule(rule, args).describe()}", _b_ruled,
            [dict(p, method=method, rule=rule, rule_args=args) for p in base], "-", force=want("rules"))
    made = lab.weights / "made-guide"
    if want("made-guide") and (made / "guide.json").exists():
        from ..guidemaker import ema_folder, read_record

        rec = read_record(made)
        emas = lab.s.guide_emas or (str(round(1000 * rec["ema"])).zfill(3),)   # the settings' guide EMAs, if shipped
        guides = [str(ema_folder(made, int(e) / 1000, rec).relative_to(lab.weights)) for e in emas]
        add("made-guide", f"autoguidance by a made guide ({rec['recipe']}, {rec['budget']['spent_fraction_of_main']:.1%} "
            "of the main's training FLOPs)", _b_auto, lab.grid(main=[main], guide=guides, w=W), "-")
    if want("dropout-main"):
        drop_main, _ = choose_main(lab, "s-dropout-T")
        rows.append(Row("none-dropout", "S trained with dropout 0.1, no guidance",
                        lab.heldout("none:s-dropout-T", _b_none, {"main": drop_main}), "(EDM2-M..XXL train with 0.1)",
                        "dropout-trained main", lab_key="none:s-dropout-T"))
        add("insitu-dropout", "in-situ dropout p = 0.1 (main trained with dropout)", _b_insitu,
            lab.grid(main=[drop_main], p=[0.1], w=W), "-", "dropout-trained main", force=True)
    if want("uncond"):
        # The unconditional S main (s-uncond-T) when shipped; otherwise the unconditional XS at T, guided by its own
        # T/16 snapshot (reduced training only: the training budget of this machine did not cover a fourth S run).
        shipped_s = (lab.weights / f"s-uncond-T-ema{lab.s.emas[0]}" / "config.json").exists()
        prefix, size = ("s-uncond-T", "S") if shipped_s else ("xs-uncond-T", "XS")
        u_main, _ = choose_main(lab, prefix, conditional=False)
        rows.append(Row("uncond-none", f"unconditional {size}, no guidance",
                        lab.heldout(f"none:{prefix}", _b_none, {"main": u_main}, conditional=False),
                        "11.67 / 209.53", "unconditional", lab_key=f"none:{prefix}"))
        add("uncond-auto", f"unconditional {size} + autoguidance (uncond. XS, T/16)", _b_auto,
            lab.grid(main=[u_main], guide=_guide_names(lab, "xs-uncond-T16"), w=W), "3.86 (w 2.85) / 90.39",
            "unconditional", conditional=False, force=True)
    return rows


#: where the late-site in-situ guides put their dropout, as a slice of the net's dropout sites in forward order
LATE_SITES = {"all": "every block (default sites)", "decoder": "decoder blocks only", "last4": "last 4 blocks",
              "last1": "last block"}
#: the weights swept by the late-site study: the table's, and two above it (a weaker degradation may want more w)
LATE_EXTRA_WS = (4.0, 6.0)


def late_sites(net: torch.nn.Module, which: str) -> list[str]:
    """The dropout sites (module paths, forward order) of `net` for a late-site variant of `LATE_SITES`."""
    paths = [n for n, m in net.named_modules() if n and isinstance(m, torch.nn.Dropout)]
    if which == "all":
        return paths
    if which == "decoder":
        return [q for q in paths if ".dec." in f".{q}"]
    if which.startswith("last"):
        return paths[-int(which[4:]):]
    raise ValueError(f"unknown late-site variant {which!r}; known: {', '.join(LATE_SITES)}")


def _b_insitu_sites(L, p):
    net = L.net(p["main"])
    return insitu(net, _w(p), p.get("p", 0.1), where=late_sites(net, p["sites"]))


def run_late(lab: Lab) -> list[Row]:
    """Is a guide that perturbs only the late blocks as good as all-block dropout? In-situ dropout p = 0.1 at every
    block, at the decoder blocks, at the last 4 and at the last block, on the main trained without dropout and on
    the one trained with it; each at its best w (the table's grid plus 4 and 6) on the tuning set."""
    W = _ws(lab) + [w for w in LATE_EXTRA_WS if w not in _ws(lab)]
    rows: list[Row] = []
    for prefix, group in (("s-T", "main without dropout"), ("s-dropout-T", "main trained with dropout")):
        main, _ = choose_main(lab, prefix)
        rows.append(Row(f"none:{prefix}", f"S ({group}), no guidance",
                        lab.heldout(f"none:{prefix}", _b_none, {"main": main}), "", group, lab_key=f"none:{prefix}"))
        for which, label in LATE_SITES.items():
            key = f"late:{prefix}:{which}"
            n_sites = len(late_sites(lab.net(main), which))
            rows.append(Row(key, f"in-situ dropout 0.1 at {label} ({n_sites} site{'s' if n_sites != 1 else ''})",
                            lab.tune(key, _b_insitu_sites, lab.grid(main=[main], sites=[which], p=[0.1], w=W)),
                            "", group, lab_key=f"none:{prefix}"))
    return rows


def run_degradations(lab: Lab) -> list[Row]:
    """Karras et al. 2024, Sec. 5.1: degrade the dropout-free main synthetically; guide the less degraded copy by
    the more degraded one. Matched pairs should undo the damage, mismatched pairs should not."""
    main, _ = choose_main(lab, "s-T")
    W = [1.0] + [w for w in _ws(lab) if w != 1.0]
    d5, d10, n10, n20 = ("dropout", 0.05), ("dropout", 0.10), ("inputnoise", 0.10), ("inputnoise", 0.20)
    names = {d5: "dropout 5%", d10: "dropout 10%", n10: "input noise +10%", n20: "input noise +20%"}
    alone = {}
    for deg in (d5, d10, n10, n20):
        alone[deg] = lab.heldout(f"deg:{names[deg]}", _b_degraded, {"main": main, "good": list(deg)})
    rows = [Row("base", "main (S at T, no dropout), undegraded", lab.heldout("none:s-T", _b_none, {"main": main}),
                "2.56", lab_key="none:s-T")]
    paper = {(d5, d10): "4.98 / 15.00 / 2.55 (w 2.25)", (n10, n20): "3.96 / 9.73 / 2.56 (w 2.00)",
             (d5, n20): "no gain: best w = 1", (n10, d10): "no gain: best w = 1"}
    for good, bad in ((d5, d10), (n10, n20), (d5, n20), (n10, d10)):
        key = f"deg:{names[good]}|{names[bad]}"
        params = [{"main": main, "good": list(good), "bad": list(bad), "w": w} for w in W]
        sweep = [{"params": params[0], **lab.evaluate(f"deg:{names[good]}", _b_degraded,
                                                      {"main": main, "good": list(good)}, lab.s.tune_set)}]
        sweep += [{"params": p, **lab.evaluate(key, _b_degraded, p, lab.s.tune_set)} for p in params[1:]]
        best = min(sweep, key=lambda r: r["fd"])["params"]
        res = {"best": best, "sweep": sweep}
        if best["w"] == 1.0:   # w = 1 is D_good alone: no gain from the guide
            res.update({k: alone[good][k] for k in ("mean", "std", "runs")}, params=best)
        else:
            res.update(lab.heldout(key, _b_degraded, best))
        res["good_alone"], res["bad_alone"] = alone[good], alone[bad]
        rows.append(Row(key[4:], f"D_good {names[good]}, D_bad {names[bad]}", res,
                        paper[(good, bad)], "matched" if good[0] == bad[0] else "mismatched", lab_key=key))
    return rows


def run_failures(lab: Lab) -> list[Row]:
    """Karras et al. 2024, Sec. 5: guides that did not work (less data, quantization, interval on autoguidance)."""
    main, _ = choose_main(lab, "s-T")
    W = _ws(lab)
    rows = [Row("auto", "autoguidance (XS, T/16), for reference", lab.tune("auto", _b_auto, _auto_grid(lab, main)),
                "1.34")]
    rows.append(Row("auto-half-data", "guide XS, T/16, trained on half the data",
                    lab.tune("auto-half-data", _b_auto, lab.grid(main=[main], guide=_guide_names(lab, "xs-half-T16"),
                                                                 w=W)), "did not work"))
    rows.append(Row("auto-quantized", "guide = main with 4-bit weights",
                    lab.tune("auto-quantized", _b_quant, lab.grid(main=[main], bits=[4], w=W)), "did not work"))
    best_guide = rows[0].result["best"]["guide"]
    rows.append(Row("auto-interval", f"autoguidance + interval ({INTERVAL[0]}, {INTERVAL[1]}]",
                    lab.tune("auto-interval", _b_auto, lab.grid(main=[main], guide=[best_guide],
                                                               interval=[list(INTERVAL)], w=W)),
                    "removed part of the gain"))
    return rows


GUIDE_LENGTHS = ("T32", "T16", "T8", "T4", "T2", "T")   # snapshots of the XS guide run (iteration T/32 ... T)


def run_guides(lab: Lab) -> list[Row]:
    """How bad should the guide be? Autoguidance of the S main by the XS net at six points of its training run
    (T/32 ... T: the same run, seed and data), each at its best w and EMA length, beside the guide's own FD and
    class accuracy without guidance (the papers' guides: XS at T/16 for EDM2-S 512, XS at T/8 for ImageNet-64, M at
    T/3.5 for XXL)."""
    main, _ = choose_main(lab, "s-T")
    W = _ws(lab)
    emas = lab.s.guide_emas or lab.s.emas
    if not lab.data.guides_tune_ema:   # the guide EMA of the main table's autoguidance row, for every snapshot
        emas = (lab.tune("auto", _b_auto, _auto_grid(lab, main))["best"]["guide"].rsplit("ema", 1)[1],)
    rows = [Row("none", "S at T, no guidance", lab.heldout("none:s-T", _b_none, {"main": main}), "2.56",
                lab_key="none:s-T")]
    for snap in GUIDE_LENGTHS:
        prefix = f"xs-{snap}"
        res = lab.tune(f"guide:{snap}", _b_auto, lab.grid(main=[main], guide=[f"{prefix}-ema{e}" for e in emas], w=W))
        res["guide_alone"] = lab.heldout(f"none:{prefix}", _b_none, {"main": res["best"]["guide"]})
        label = "T" if snap == "T" else f"T/{snap[1:]}"
        rows.append(Row(f"guide:{snap}", f"autoguidance, XS guide at {label}", res,
                        "1.34 (XS at T/16, w 2.10)" if snap == "T16" else "", lab_key=f"guide:{snap}"))
    return rows


#: the most real images the one-set floor row measures (the metrics hold all pairwise distances of a set in memory)
REAL_ALL_MAX = 10_000


def _real_runs(lab: Lab, n: Optional[int]) -> dict:
    """Real training images through the metrics: per held-out seed set s, `n` images drawn without replacement
    by a generator seeded with s (when n is None, one run of every training image, at most `REAL_ALL_MAX` of them:
    a fixed random subset of a larger split)."""
    d = lab.data.load("train")
    runs = []
    for seed_set in (lab.s.eval_sets if n is not None else (0,)):
        if n is not None:
            idx = torch.randperm(len(d), generator=torch.Generator().manual_seed(seed_set))[:n]
        elif len(d) > REAL_ALL_MAX:
            idx = torch.randperm(len(d), generator=torch.Generator().manual_seed(0))[:REAL_ALL_MAX]
        else:
            idx = torch.arange(len(d))
        runs.append(lab.measure(d.images[idx], d.classes[idx]))
    return {"params": {"n": n if n is not None else min(len(d), REAL_ALL_MAX)}, **mean_std(runs), "runs": runs}


def _floor_methods(lab: Lab, main: str) -> tuple:
    """The main table's best CFG and autoguidance settings, tuned as the table tunes them (the same evaluations:
    read back from the store, or shared in one process, after the table)."""
    out = []
    for label, build, grid in (("CFG (uncond. XS at T", _b_cfg, _cfg_grid(lab, main)),
                               ("autoguidance (XS at T/16", _b_auto, _auto_grid(lab, main))):
        best = dict(lab.tune(label, build, grid)["best"])
        best.pop("main")
        out.append((f"{label}, w {best['w']:g})", build, best))
    return tuple(out)


def run_floor(lab: Lab) -> list[Row]:
    """What FD_digits does real data get? Real training images, drawn like the samples (N per seed set, the same
    held-out sets), measured against the same test split; beside the unguided main and the table's best CFG and
    autoguidance settings. At small N the FD estimate is biased upwards, and how much depends on the sample
    covariance, so this row is the floor the model rows should be read against."""
    main, _ = choose_main(lab, "s-T")
    floor_methods = _floor_methods(lab, main)
    real_all = _real_runs(lab, None)
    rows = [Row("real", f"real {lab.data.noun}: {lab.s.n} training images per seed set", _real_runs(lab, lab.s.n),
                "FID of real data: 0 by construction", group="real"),
            Row("real-all", f"real {lab.data.noun}: {'all ' if real_all['params']['n'] == len(lab.data.load('train')) else ''}"
                f"{real_all['params']['n']} training images (one set)",
                real_all, "", group="real-all"),
            Row("none", "S at T, no guidance", lab.heldout("none:s-T", _b_none, {"main": main}), "2.56",
                group="models", lab_key="none:s-T")]
    for label, build, params in floor_methods:
        key = f"floor:{label}"
        rows.append(Row(key, label, lab.heldout(key, build, dict(params, main=main)), "", group="models"))
    if not lab.data.floor_large:
        return rows
    # The same three at N = 1297 (as many as the real training images; 2N in quick mode) on the same held-out seed
    # sets: does the ranking survive a smaller bias?
    n_big = rows[1].result["params"]["n"] if lab.s.n >= 100 else 2 * lab.s.n
    big = Lab(replace(lab.s, n=n_big, batch=min(lab.s.batch, n_big)), lab.weights, lab.features_path,
              progress=lab.progress, data=lab.data, store=lab.store)
    big._nets = lab._nets                                      # the same checkpoints, loaded once
    for label, build, params in (("S at T, no guidance", _b_none, {}),) + floor_methods:
        key = f"floor-big:{label}"
        res = big.heldout(key, build, dict(params, main=main))
        res["params"] = dict(params, n=n_big)
        rows.append(Row(key, f"{label}, N = {n_big}", res, "", group="models, large N"))
    return rows


def run_schedules(lab: Lab) -> list[Row]:
    """Does each method want w at all sigmas, or only in an interval, or fading out? Constant w vs the
    interval (0.28, 2.9] vs a ramp from w at sigma >= 10 down to 1 at sigma <= 0.1, each at its best w."""
    main, _ = choose_main(lab, "s-T")
    drop_main, _ = choose_main(lab, "s-dropout-T")
    W = _ws(lab)
    ramp = [10.0, 0.1]
    rows: list[Row] = []
    specs = [("CFG", _b_cfg, {"main": main, "guide": f"xs-uncond-T-ema{lab.s.emas[-1]}"}),
             ("autoguidance", _b_auto, {"main": main, "guide": f"xs-T16-ema{lab.s.emas[-1]}"}),
             ("in-situ (dropout-trained main)", _b_insitu, {"main": drop_main, "p": 0.1})]
    for name, build, base in specs:
        for sched, extra in (("constant w", {}), (f"interval ({INTERVAL[0]}, {INTERVAL[1]}]", {"interval": list(INTERVAL)}),
                             (f"ramp w -> 1 over sigma {ramp[0]:g} -> {ramp[1]:g}", {"ramp": ramp})):
            key = f"sched:{name}:{sched}"
            rows.append(Row(key, f"{name}: {sched}", lab.tune(key, build, [dict(base, **extra, w=w) for w in W]),
                            group=name))
    return rows


# -- outputs -------------------------------------------------------------------------------------------------------

def _write(lab: Lab, out: Path, stem: str, rows: list[Row], title: str, note: str, extra_cols=()) -> dict:
    record = {"experiment": stem, "settings": asdict(lab.s), "rows": [row_json(r) for r in rows],
              "seconds": round(time.perf_counter() - lab.t0, 1)}
    md = table_md(rows, title, note, lab.s, extra_cols, fd_name=lab.data.fd_name)
    md += extra_md(stem.split("_", 1)[1], rows, lab.data.fd_name)
    if stem.endswith("_table"):
        record["training_costs"] = training_costs(lab.weights)
        md += costs_md(record["training_costs"])
    write_json(out / f"{stem}.json", record)
    write_text(out / f"{stem}.md", md)
    return record


EXPERIMENTS = {
    "table": ("digits_table", "Main table: guidance methods on digits (EDM2-style S main)", run_table),
    "degradations": ("digits_degradations", "Synthetic degradations (Karras et al. 2024, Sec. 5.1)", run_degradations),
    "failures": ("digits_failures", "What did not work as a guide (Karras et al. 2024, Sec. 5)", run_failures),
    "schedules": ("digits_schedules", "Schedules of w(sigma): constant vs interval vs ramp", run_schedules),
    "guides": ("digits_guides", "How bad should the guide be? XS guides along one training run", run_guides),
    "floor": ("digits_floor", "The floor: real digits through the same metrics", run_floor),
    "late": ("digits_late", "Late-site in-situ guides: dropout at the last blocks only vs every block", run_late),
}


NOTES = {
    "table": "Best w (and guide EMA) per method; 'ImageNet (papers)' is EDM2-S 512 FID / FD_DINOv2 at its best w "
             "(RESEARCH.md section 2).",
    "degradations": "Main S at T (trained without dropout) degraded at sampling time; guided = D_bad + w (D_good - "
                    "D_bad) at the best w (w = 1 allowed: no gain). Dropout masks of the two passes share per-row "
                    "random numbers (the 10% mask contains the 5% mask).",
    "failures": "Each guide at its best w on the same S main; compare with the first row.",
    "schedules": "Each schedule at its best peak w; guide EMA 0.150; in-situ p = 0.1.",
    "guides": "The S main at T guided by snapshots of ONE XS training run (T = {T} iterations), each at its best w "
              "and {guide_ema}; 'guide alone' is that guide sampled without guidance on the same seeds. dFD is "
              "against the unguided main.",
    "floor": "Real training images drawn like the samples (the same N and held-out seed sets; {real_all} in one "
             "row), against the same test split, beside the unguided main and the main table's best CFG and "
             "autoguidance settings{large}. dFD of the model rows is against the unguided main of their group.",
    "late": "In-situ dropout p = 0.1 at a subset of the main's dropout sites (forward order; 'last block' is the "
            "decoder's last block), each at its best w on the tuning set (the table's grid plus w = 4 and 6). A "
            "late-site guide shares the exact pass up to its first site (prefix sharing), so it costs less: "
            "docs/benchmarks_cost.md. dFD is against the unguided main of the group.",
}


def experiment_text(name: str, data: ImageSet = DIGITS) -> tuple[str, str, str]:
    """`(stem, title, note)` of an experiment on an image set: 'digits_table' / 'mnist_table', ..."""
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown {data.noun} experiment {name!r}; known: {', '.join(EXPERIMENTS)}")
    stem, title, _ = EXPERIMENTS[name]
    n_train = len(data.load("train"))
    large = (f"; the last three rows repeat the models at N = {n_train} per seed set (seeds s * 10^6 + [0, {n_train}), "
             f"extending the N = 300 sets)" if data.floor_large else "")
    guide_ema = ("guide EMA" if data.guides_tune_ema else
                 "the guide EMA length the main table's autoguidance row chose (one EMA: half the cost)")
    real_all = f"all {n_train}" if n_train <= REAL_ALL_MAX else f"{REAL_ALL_MAX} of the {n_train}, drawn once,"
    note = NOTES[name].format(T=data.train_iters, n_train=n_train, large=large, guide_ema=guide_ema,
                              real_all=real_all)
    return stem.replace("digits", data.prefix, 1), title.replace("digits", data.noun), note


def run_experiment(name: str, out, settings: Settings = FULL, weights=None, methods=None,
                   progress: bool = True, lab: Optional[Lab] = None, data: ImageSet = DIGITS) -> dict:
    """Run one experiment from the shipped (or `weights`) checkpoints and write `<stem>.md/.json/.png` to `out`."""
    lab = lab or Lab(settings, weights, progress=progress, data=data)
    stem, title, note = experiment_text(name, lab.data)
    fn = EXPERIMENTS[name][2]
    out = Path(out)
    rows = fn(lab, methods) if name == "table" else fn(lab)
    record = _write(lab, out, stem, rows, title, note, extra_cols(name))
    if name in ("table", "failures", "schedules", "guides"):
        def baseline(r: Row) -> float:
            return lab.evaluate(r.lab_key, _b_none, r.result["params"], lab.s.tune_set,
                                r.group != "unconditional")["fd"]
        plot_sweeps(rows, out / f"{stem}_sweep.png", f"{title}: {lab.data.fd_name} against w", lab.s.tune_set,
                    baseline, fd_name=lab.data.fd_name)
    if name == "table":
        plot_grids(lab.images, rows, out / f"{stem}_samples.png")
        if lab.spaces:
            plot_pr(rows, out / f"{stem}_pr.png", f"{title}: precision against recall over w (tuning set)",
                    lambda r: lab.evaluate(r.lab_key, _b_none, r.result["params"], lab.s.tune_set,
                                           r.group != "unconditional"))
    return record

