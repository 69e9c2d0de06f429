"""The library's DINOv2 against transformers' Dinov2Model, weights mapped key by key (tiny ViT, random weights)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from autoguidance.metrics import dinov2 as dino
from autoguidance.metrics.extractors import get_extractor

from helpers import assert_batch_close

TINY = dino.ViTConfig(dim=128, depth=2, heads=2, patch=14, grid=4)     # 56 x 56 images -> 4 x 4 patches


def random_state(config: dino.ViTConfig, seed: int = 0) -> dict:
    """Random weights with the official key names (`dinov2_vitl14_pretrain.pth` layout)."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for k, v in dino.DINOv2(config).state_dict().items():
        scale = 1.0 if ("norm" in k and k.endswith("weight")) or k.endswith("gamma") else 0.0
        state[k] = scale + (0.3 if scale else 0.05) * torch.randn(v.shape, generator=g)
    return state


def to_transformers(state: dict, depth: int, names: set) -> dict:
    """The official keys mapped to transformers' Dinov2Model names (either generation of attention names)."""
    out = {"embeddings.cls_token": state["cls_token"], "embeddings.mask_token": state["mask_token"],
           "embeddings.position_embeddings": state["pos_embed"],
           "embeddings.patch_embeddings.projection.weight": state["patch_embed.proj.weight"],
           "embeddings.patch_embeddings.projection.bias": state["patch_embed.proj.bias"],
           "layernorm.weight": state["norm.weight"], "layernorm.bias": state["norm.bias"]}
    new = "encoder.layer.0.attention.q_proj.weight" in names
    qkv = ["q_proj", "k_proj", "v_proj"] if new else ["attention.query", "attention.key", "attention.value"]
    proj = "o_proj" if new else "output.dense"
    for i in range(depth):
        a, b = f"blocks.{i}.", f"encoder.layer.{i}."
        for t in ("weight", "bias"):
            for part, name in zip(state[a + f"attn.qkv.{t}"].chunk(3), qkv):
                out[b + f"attention.{name}.{t}"] = part
            out[b + f"attention.{proj}.{t}"] = state[a + f"attn.proj.{t}"]
            for n in ("norm1", "norm2", "mlp.fc1", "mlp.fc2"):
                out[b + f"{n}.{t}"] = state[a + f"{n}.{t}"]
        out[b + "layer_scale1.lambda1"] = state[a + "ls1.gamma"]
        out[b + "layer_scale2.lambda1"] = state[a + "ls2.gamma"]
    return out


def test_features_equal_transformers_dinov2():
    transformers = pytest.importorskip("transformers", reason="pip install transformers (test only)")
    cfg = transformers.Dinov2Config(hidden_size=TINY.dim, num_hidden_layers=TINY.depth,
                                    num_attention_heads=TINY.heads, intermediate_size=4 * TINY.dim,
                                    image_size=TINY.grid * TINY.patch, patch_size=TINY.patch, layer_norm_eps=1e-6)
    hf = transformers.Dinov2Model(cfg).eval()
    state = random_state(TINY)
    mapped = to_transformers(state, TINY.depth, set(hf.state_dict()))
    assert set(mapped) == set(hf.state_dict())                     # every transformers parameter is mapped
    hf.load_state_dict(mapped, strict=True)
    ours = dino.DINOv2(TINY).eval()
    ours.load_state_dict(state, strict=True)
    x = torch.randn(5, 3, 56, 56, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf(pixel_values=x).pooler_output                    # class token after the final layernorm
        got = ours(x)
    assert got.shape == (5, TINY.dim) and want.abs().mean() > 0.1
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_position_embeddings_resize_to_the_input_grid_as_dinov2_does():
    net = dino.DINOv2(TINY)
    net.load_state_dict(random_state(TINY))
    assert torch.equal(net.position_embedding(4, 4), net.pos_embed)       # native grid: the stored table
    pe = net.position_embedding(16, 16)                                   # 224 / 14
    assert pe.shape == (1, 1 + 16 * 16, TINY.dim) and torch.equal(pe[:, 0], net.pos_embed[:, 0])
    # DINOv2 passes scale_factor (16 + 0.1) / 4, not size=16: the sampling positions differ from size-based ones
    by_size = F.interpolate(net.pos_embed[:, 1:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2), size=(16, 16),
                            mode="bicubic").permute(0, 2, 3, 1).reshape(1, 256, -1)
    assert not torch.allclose(pe[:, 1:], by_size, atol=1e-4)
    assert net(torch.randn(2, 3, 224, 224)).shape == (2, TINY.dim)


def test_extractor_with_edm2_preprocessing_any_batch(tmp_path):
    path = tmp_path / "tiny-dinov2.pth"
    state = random_state(TINY)
    torch.save(state, path)
    x = torch.rand(5, 3, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1
    f = get_extractor("dinov2", dinov2_weights=str(path), official_only=False)(x)
    f3 = get_extractor("dinov2", dinov2_weights=str(path), official_only=False, batch=3)(x)
    assert f.shape == (5, TINY.dim) and f.dtype == torch.float64
    assert_batch_close(f3, f)                                   # batch split does not matter
    net = dino.DINOv2(dino.ViTConfig.from_state(state))
    net.load_state_dict(state)
    u8 = (x * 127.5 + 128).floor().clamp(0, 255)
    manual = F.interpolate(u8, size=(224, 224), mode="bicubic", antialias=True) / 255
    manual = (manual - torch.tensor(dino.MEAN).reshape(1, 3, 1, 1)) / torch.tensor(dino.STD).reshape(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(f, net(manual).double(), rtol=1e-5, atol=1e-5)


def test_wrong_dinov2_files_give_one_line_errors(tmp_path):
    path = tmp_path / "tiny.pth"
    torch.save(random_state(TINY), path)
    with pytest.raises(ValueError) as e:                          # the default demands ViT-L/14
        get_extractor("dinov2", dinov2_weights=str(path))
    assert "not DINOv2 ViT-L/14" in str(e.value) and dino.OFFICIAL_FILE in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(FileNotFoundError) as e:
        get_extractor("dinov2", dinov2_weights=str(tmp_path / "dinov2_vitl14_pretrain.pth"))
    assert "dl.fbaipublicfiles.com" in str(e.value) and "\n" not in str(e.value)
    other = tmp_path / "inception.pth"
    torch.save({"Conv2d_1a_3x3.conv.weight": torch.zeros(32, 3, 3, 3)}, other)
    with pytest.raises(ValueError, match="not a DINOv2 ViT state dict") as e:
        get_extractor("dinov2", dinov2_weights=str(other), official_only=False)
    assert "\n" not in str(e.value)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(ValueError, match="cannot be read as a state dict"):
        get_extractor("dinov2", dinov2_weights=str(truncated), official_only=False)
