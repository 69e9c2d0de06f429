"""Small denoisers for tests: analytic, so expected values are known exactly; and the tolerance of float32 results
computed at different batch compositions."""
import torch

from autoguidance.nets.toy import DenoiserMLP


class GaussianDenoiser:
    """Exact denoiser of N(m, s^2 I): D(x; sigma) = (s^2 x + sigma^2 m) / (s^2 + sigma^2). Labels shift m."""

    def __init__(self, m=0.3, s=0.5):
        self.m, self.s, self.calls = m, s, []

    def __call__(self, x, sigma, labels=None):
        self.calls.append(len(x))
        sigma = torch.as_tensor(sigma, dtype=x.dtype).expand(len(x)).reshape(-1, *([1] * (x.ndim - 1)))
        m = self.m if labels is None else self.m + labels.sum(1).reshape(-1, *([1] * (x.ndim - 1)))
        return (self.s ** 2 * x + sigma ** 2 * m) / (self.s ** 2 + sigma ** 2)


def tiny_denoiser_mlp(seed=0, dropout=0.0, width=16):
    torch.manual_seed(seed)
    net = DenoiserMLP(width=width, num_layers=2, dropout=dropout)
    with torch.no_grad():
        net.raw.out_gain.fill_(1.0)  # a fresh net outputs F = 0; make it non-trivial
    return net.eval().requires_grad_(False)


#: Float results computed at different batch compositions (a batched call vs split calls, one call of 2N rows vs two
#: of N, another max_batch, a shared prefix vs not, a row subset) are NOT bit-identical: CPU GEMM / conv kernels pick
#: their blocking (and so the order of their float32 sums) from the batch size and the CPU's instruction set, so the
#: same row can differ in the last bits between two batch sizes on one machine and not on another (issue 21, item
#: 18: an AMD EPYC differed in the 6th digit where this machine was equal). What the kernels do guarantee is a
#: float32 sum: a relative error of a few hundred ulps of the largest terms after a deep net. So: rtol 1e-5 and
#: atol 1e-5 x the values' scale (the largest |expected|, at least 1). Bit-identity (torch.equal) is kept only where
#: the code guarantees it: the same call at the same batch composition, pure copies and row selections, integers.
BATCH_RTOL = 1e-5
BATCH_ATOL = 1e-5


def assert_batch_close(actual, expected, *, scale=None, rtol: float = BATCH_RTOL, atol: float = BATCH_ATOL,
                       msg=None) -> None:
    """`actual == expected` up to what float32 kernels guarantee across batch compositions (see BATCH_RTOL):
    `|a - e| <= atol * scale + rtol * |e|`, `scale` = max(1, max |expected|) unless given."""
    actual, expected = torch.as_tensor(actual), torch.as_tensor(expected)
    if scale is None:
        scale = max(1.0, float(expected.detach().abs().max())) if expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol * scale, msg=msg)


def save_tiny_image_set_weights(root, data: str, names: dict, emas=("050", "150"), features_resolution=None):
    """Tiny stand-in checkpoints of an image set's tables under `root`: for each `name: (label_dim, dropout)` an
    EDM2-style XXS net of dataset `data` ('mnist14', 'fashion28', ...) at every EMA name (`<name>-ema<e>`), each with
    its own output gain (so the nets differ), and a feature classifier at `features_resolution`."""
    from autoguidance.checkpoint import save
    from autoguidance.nets import DigitsClassifier
    from autoguidance.nets.edm2 import EDM2Precond
    from autoguidance.train.edm import net_config

    torch.manual_seed(0)
    for i, (name, (label_dim, dropout)) in enumerate(names.items()):
        net = EDM2Precond(**net_config(data, "XXS", label_dim, dropout))
        with torch.no_grad():
            net.unet.out_gain.fill_(0.5 + 0.1 * i)
        for ema in emas:
            save(net, root / f"{name}-ema{ema}", meta={"command": "test"})
    if features_resolution is not None:
        save(DigitsClassifier(resolution=features_resolution), root / "features",
             meta={"command": "test", "test_accuracy": 0.1})
    return root
