"""Perturbations on diffusers models (issue 21, item 8), on the tiny random-weight models of `adapters.tiny`, called
with the inputs their own pipeline gives them (recorded from one pipeline call): SEG on every family's attention
against a dense-kernel reference (and, on a U-Net, against attention written out by hand), TPG on joint blocks
shuffling the image stream, identity attention on Wan / LTX / CogVideoX, CogVideoX's tuple blocks and folded patch
embedding, and default sites (or a one-line refusal naming the flag) for every perturbation on every family."""
from __future__ import annotations

import contextlib
import math

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from autoguidance.adapters import tiny  # noqa: E402
from autoguidance.methods import PERTURBATIONS, make_perturbation  # noqa: E402
from autoguidance.perturb import (BlockDrop, IdentityAttention, SiteError, SkipLayers, SmoothedAttention,  # noqa: E402
                                  TokenShuffle, WeightNoise)
from autoguidance.perturb.tokens import token_permutations  # noqa: E402
from conftest import assert_same_state, state_snapshot  # noqa: E402
from helpers import assert_batch_close  # noqa: E402

#: one tiny pipeline per model family
FAMILIES = ["sd", "sd3", "flux", "dit", "pixart-alpha", "sana", "wan21", "ltx", "cogvideox"]


@pytest.fixture(scope="module")
def calls():
    """kind -> (model, args, kwargs) of the first call the kind's own pipeline makes of its model (no CFG: 2 rows)."""
    cache: dict = {}

    def get(kind):
        if kind not in cache:
            pipe = tiny.build(kind)
            model = tiny.model_of(pipe)
            seen = []
            h = model.register_forward_pre_hook(lambda m, a, k: seen.append((a, k)) if not seen else None,
                                                with_kwargs=True)
            try:
                with torch.no_grad():
                    pipe(**tiny.inputs(kind, steps=1, **tiny.no_cfg_options(kind)))
            finally:
                h.remove()
            cache[kind] = (model, *seen[0])
        return cache[kind]
    return get


def _first(out):
    return out if isinstance(out, torch.Tensor) else out[0]


def _rows(b):
    return torch.tensor([i % 2 == 1 for i in range(b)])


def _batch(args, kwargs):
    return (args[0] if args else kwargs["hidden_states"]).shape[0]


def _run(model, args, kwargs, pert=None, rows=None, record=None):
    """The model's output (and, with `record=module`, that module's (args, kwargs, output) of the call, after the
    perturbation's own hooks), under `pert` degrading `rows` when given."""
    seen: list = []
    with torch.no_grad(), contextlib.ExitStack() as stack:
        if pert is not None:
            b = len(rows)
            stack.enter_context(pert.active(model, rows, torch.arange(b), torch.ones(b)))
        if record is not None:                         # registered last: it sees the perturbed output
            h = record.register_forward_hook(lambda m, a, k, o: seen.append((a, k, o)), with_kwargs=True)
            stack.callback(h.remove)
        out = model(*args, **kwargs)
    return _first(out), seen


# -- SEG ------------------------------------------------------------------------------------------------------------

def _expected_grid(kind, model, args, kwargs):
    """The image-token grid of `kind`'s attention, worked out here from the model's input and config."""
    x = args[0] if args else kwargs["hidden_states"]
    if kind == "sd":                                   # the first down block: full latent resolution
        return tuple(x.shape[2:])
    if kind in ("sd3", "dit", "pixart-alpha", "sana"):
        p = model.config.patch_size
        return x.shape[2] // p, x.shape[3] // p
    if kind == "flux":                                 # a square image: a square grid of packed tokens
        r = math.isqrt(x.shape[1])
        return r, r
    if kind == "wan21":
        pt, ph, pw = model.config.patch_size
        return x.shape[2] // pt, x.shape[3] // ph, x.shape[4] // pw
    if kind == "ltx":
        return kwargs["num_frames"], kwargs["height"], kwargs["width"]
    if kind == "cogvideox":
        p = model.config.patch_size
        return x.shape[1], x.shape[3] // p, x.shape[4] // p
    raise AssertionError(kind)


def _dense_blur(grid, s):
    """`[P, P]` Gaussian blur over the grid's positions, normalised per row, built from pairwise distances."""
    pos = torch.stack(torch.meshgrid(*[torch.arange(g, dtype=torch.float64) for g in grid], indexing="ij"),
                      -1).reshape(-1, len(grid))
    if math.isinf(s):
        return torch.full((len(pos), len(pos)), 1.0 / len(pos), dtype=torch.float64)
    k = torch.exp(-((pos[:, None] - pos[None]) ** 2).sum(-1) / (2 * s * s))
    return k / k.sum(1, keepdim=True)


def _seg_sites(kind, model):
    sites = SmoothedAttention(1.0).sites(model)
    picks = [sites[0]]
    if kind == "flux":                                 # a double block and a single block (text then image)
        picks.append(next((p, m) for p, m in sites if p.startswith("single_transformer_blocks")))
    return picks


@pytest.mark.parametrize("s", [math.inf, 1.5])
@pytest.mark.parametrize("kind", FAMILIES)
def test_seg_blurs_the_image_queries_of_every_family(calls, kind, s):
    model, args, kwargs = calls(kind)
    before = state_snapshot(model)
    rows = _rows(_batch(args, kwargs))
    exact, _ = _run(model, args, kwargs)
    for path, attn in _seg_sites(kind, model):
        got, seen = _run(model, args, kwargs, SmoothedAttention(s, where=[path]), rows, record=attn)
        a, k, out = seen[0]
        q_len = []

        def dense(mod, inp, q):                        # the reference: the same call, queries blurred by hand
            grid = _expected_grid(kind, model, args, kwargs)
            tokens = math.prod(grid)
            text = k["encoder_hidden_states"].shape[1] if kind == "cogvideox" else \
                q.shape[1] - tokens if path.startswith("single_transformer_blocks") else 0
            assert text + tokens == q.shape[1]
            q_len.append(text)
            q = q.clone()
            img = q[rows, text:].double()
            q[rows, text:] = torch.einsum("ij,mjc->mic", _dense_blur(grid, s), img).to(q.dtype)
            return q

        h = attn.to_q.register_forward_hook(dense)
        try:
            with torch.no_grad():
                ref = attn(*a, **k)
        finally:
            h.remove()
        assert_batch_close(_first(out), _first(ref), msg=f"{kind} {path}")
        if not isinstance(out, torch.Tensor):          # joint attention: the text stream is exact attention
            assert_batch_close(out[1], ref[1])
        if kind == "cogvideox":
            assert q_len == [k["encoder_hidden_states"].shape[1]]      # the text tokens came first, unblurred
        assert (got[rows] - exact[rows]).abs().max() > 1e-4, f"{kind} {path}: SEG changed nothing"
        assert_batch_close(got[~rows], exact[~rows])
    assert_same_state(before, state_snapshot(model))


def test_seg_at_infinite_width_on_a_unet_is_attention_of_the_mean_query(calls):
    """U-Net self-attention written out by hand: every image token of a degraded row attends with the mean query."""
    model, args, kwargs = calls("sd")
    path = "down_blocks.0.attentions.0.transformer_blocks.0.attn1"
    attn = model.get_submodule(path)
    rows = _rows(_batch(args, kwargs))
    _, seen = _run(model, args, kwargs, SmoothedAttention(math.inf, where=path), rows, record=attn)
    a, k, out = seen[0]
    h = a[0] if a else k["hidden_states"]
    with torch.no_grad():
        q, key, v = attn.to_q(h), attn.to_k(h), attn.to_v(h)
    n, length, c = q.shape
    heads, d = attn.heads, c // attn.heads

    def split(t):
        return t.reshape(n, -1, heads, d).transpose(1, 2)               # [n, heads, tokens, d]
    with torch.no_grad():
        q_bar = q.mean(1, keepdim=True).expand(-1, length, -1)
        w = torch.softmax(split(q_bar) @ split(key).transpose(-1, -2) / math.sqrt(d), -1)
        mean_query = attn.to_out[0]((w @ split(v)).transpose(1, 2).reshape(n, length, c))
        w = torch.softmax(split(q) @ split(key).transpose(-1, -2) / math.sqrt(d), -1)
        plain = attn.to_out[0]((w @ split(v)).transpose(1, 2).reshape(n, length, c))
    torch.testing.assert_close(out[rows], mean_query[rows], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out[~rows], plain[~rows], atol=1e-6, rtol=1e-5)
    assert torch.allclose(out[rows][:, :1].expand_as(out[rows]), out[rows], atol=1e-6)   # one output for all tokens


def test_seg_refuses_what_it_cannot_blur(calls):
    model, args, kwargs = calls("sd")
    with pytest.raises(SiteError, match="cross-attention.*attn1"):
        SmoothedAttention(1.0, where="down_blocks.0.attentions.0.transformer_blocks.0.attn2").sites(model)
    attn = model.get_submodule("down_blocks.0.attentions.0.transformer_blocks.0.attn1")
    attn.fused_projections = True                      # as fuse_qkv_projections() leaves it: to_q is not called
    try:
        with pytest.raises(SiteError, match="unfuse_qkv_projections"):
            SmoothedAttention(1.0).sites(model)
    finally:
        attn.fused_projections = False


# -- TPG on joint blocks: the image stream ----------------------------------------------------------------------------

@pytest.mark.parametrize("kind, block, image", [("sd3", "transformer_blocks.0", 1), ("flux", "transformer_blocks.0", 1),
                                                ("flux", "single_transformer_blocks.0", 1),
                                                ("cogvideox", "transformer_blocks.0", 0)])
def test_token_shuffle_on_a_joint_block_shuffles_the_image_stream(calls, kind, block, image):
    model, args, kwargs = calls(kind)
    rows = _rows(_batch(args, kwargs))
    mod = model.get_submodule(block)
    exact, plain = _run(model, args, kwargs, record=mod)
    got, seen = _run(model, args, kwargs, TokenShuffle(where=block), rows, record=mod)
    ref, out = plain[0][2], seen[0][2]
    img = ref[image]
    perm = token_permutations(torch.arange(len(rows))[rows], img.shape[1], 0)
    shuffled = torch.gather(img[rows], 1, perm[:, :, None].expand(-1, -1, img.shape[2]))
    assert_batch_close(out[image][rows], shuffled)
    assert_batch_close(out[image][~rows], img[~rows])
    assert_batch_close(out[1 - image], ref[1 - image])            # the text stream is not shuffled
    assert (got[rows] - exact[rows]).abs().max() > 1e-4, f"{kind} {block}: TPG changed nothing"


# -- identity attention on Wan, LTX, CogVideoX ------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["wan21", "ltx", "cogvideox"])
def test_identity_attention_on_video_transformers_is_the_values(calls, kind):
    model, args, kwargs = calls(kind)
    sites = IdentityAttention().sites(model)
    assert sites and all(p.endswith(".attn1") for p, _ in sites)          # self-attention only
    path, attn = sites[0]
    rows = _rows(_batch(args, kwargs))
    exact, plain = _run(model, args, kwargs, record=attn)
    got, seen = _run(model, args, kwargs, IdentityAttention(where=path), rows, record=attn)
    a, k, out = seen[0]
    h = a[0] if a else k["hidden_states"]
    with torch.no_grad():
        values = attn.to_out[1](attn.to_out[0](attn.to_v(h)))
    assert_batch_close(_first(out)[rows], values[rows])
    assert_batch_close(_first(out)[~rows], _first(plain[0][2])[~rows])
    if kind == "cogvideox":                       # joint attention: the text stream keeps the exact attention
        assert_batch_close(out[1], plain[0][2][1])
    assert (got[rows] - exact[rows]).abs().max() > 1e-4


# -- CogVideoX: tuple blocks, folded patch embedding; block drop's default sites ---------------------------------------

def test_cogvideox_skip_layers_block_drop_and_weight_noise(calls):
    model, args, kwargs = calls("cogvideox")
    before = state_snapshot(model)
    rows = _rows(_batch(args, kwargs))
    block = model.transformer_blocks[0]
    _, seen = _run(model, args, kwargs, SkipLayers(layers=[0]), rows, record=block)
    a, k, out = seen[0]
    h_in, e_in = (a[0] if a else k["hidden_states"]), (a[1] if len(a) > 1 else k["encoder_hidden_states"])
    assert torch.equal(out[0][rows], h_in[rows]) and torch.equal(out[1][rows], e_in[rows])   # pure copies
    assert [p for p, _ in BlockDrop().sites(model)] == ["transformer_blocks.0", "transformer_blocks.1"]
    sites = [p for p, _ in WeightNoise(0.1).sites(model)]
    assert "patch_embed.proj" not in sites and "patch_embed.text_proj" in sites   # frames folded into the batch
    exact, _ = _run(model, args, kwargs)
    for pert in (BlockDrop(1.0), WeightNoise(0.1)):
        got, _ = _run(model, args, kwargs, pert, rows)
        assert (got[rows] - exact[rows]).abs().max() > 1e-4, type(pert).__name__
        assert_batch_close(got[~rows], exact[~rows])
    assert_same_state(before, state_snapshot(model))


@pytest.mark.parametrize("kind, blocks", [("sd3", "transformer_blocks"), ("dit", "transformer_blocks"),
                                          ("pixart-alpha", "transformer_blocks"), ("sana", "transformer_blocks"),
                                          ("wan21", "blocks"), ("ltx", "transformer_blocks")])
def test_block_drop_defaults_to_the_transformer_blocks(calls, kind, blocks):
    model, args, kwargs = calls(kind)
    n_blocks = len(model.get_submodule(blocks))
    assert [p for p, _ in BlockDrop().sites(model)] == [f"{blocks}.{i}" for i in range(n_blocks)]
    rows = _rows(_batch(args, kwargs))
    exact, _ = _run(model, args, kwargs)
    got, _ = _run(model, args, kwargs, BlockDrop(1.0), rows)
    assert (got[rows] - exact[rows]).abs().max() > 1e-4
    assert_batch_close(got[~rows], exact[~rows])


# -- default sites or a one-line refusal naming the flag, for every perturbation on every family ----------------------

UNETS = ("sd", "sdxl", "controlnet")


@pytest.mark.parametrize("kind", FAMILIES + ["flux-dev", "wan22", "sdxl", "controlnet"])
def test_every_perturbation_has_default_sites_or_names_the_flag(calls, kind):
    model = calls(kind)[0] if kind in FAMILIES else tiny.model_of(tiny.build(kind))
    perts = {name: make_perturbation(name, 0.1, None) for name in PERTURBATIONS}
    perts["skiplayers"] = SkipLayers(layers=[0])
    for name, pert in perts.items():
        if not hasattr(pert, "sites"):                 # input noise, noisier level: no sites
            continue
        try:
            sites = pert.sites(model)
        except (SiteError, ValueError) as e:
            msg = str(e)
            assert "\n" not in msg and any(f in msg for f in ("where=", "blocks=", "layers=")), (kind, name, msg)
            # the deliberate refusals: TPG names no default blocks (where=); a U-Net has several block lists
            assert name == "tokenshuffle" or (name == "skiplayers" and kind in UNETS), (kind, name, msg)
            continue
        assert sites, (kind, name)
