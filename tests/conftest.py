import pytest
import torch

# The suite's nets are tiny: one intra-op thread is faster than two on a 2-core machine (no spin-waiting), and
# leaves the other core to the subprocesses some tests launch (which run with OMP_NUM_THREADS=1 too).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def state_snapshot(model: torch.nn.Module) -> dict:
    """Everything that must be bit-identical after guided sampling: tensors, modes, hooks."""
    return {
        "tensors": {k: v.detach().clone() for k, v in model.state_dict(keep_vars=False).items()},
        "params": {k: (p.detach().clone(), p.requires_grad) for k, p in model.named_parameters()},
        "training": {n: m.training for n, m in model.named_modules()},
        "hooks": {n: (len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in model.named_modules()},
    }


def assert_same_state(a: dict, b: dict) -> None:
    assert a["training"] == b["training"]
    assert a["hooks"] == b["hooks"]
    assert a["tensors"].keys() == b["tensors"].keys()
    for k in a["tensors"]:
        assert torch.equal(a["tensors"][k], b["tensors"][k]), k
    for k in a["params"]:
        assert torch.equal(a["params"][k][0], b["params"][k][0]) and a["params"][k][1] == b["params"][k][1], k
