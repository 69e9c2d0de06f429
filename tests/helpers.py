"""Small denoisers for tests: analytic, so expected values are known exactly."""
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
