"""`autoguidance free-guides digits|proxies|schedules --quick`: the digits head-to-head, the proxy study and the
schedule study end to end on a subset of rows (QUICK settings: 40 images, 4 steps)."""
import json

from autoguidance.cli import main
from autoguidance.experiments.image_tables import bottleneck_blocks, lowest_encoder_blocks
from autoguidance.experiments.free_guides import digits_guides, digits_perturbation


def test_every_digits_guide_builds_on_the_shipped_unet():
    import torch
    from autoguidance.checkpoint import load

    net = load("digits-s-T-ema150")
    names = dict(net.named_modules())
    # the sites of the committed digits records: the 4x4 bottleneck and the encoder's 4x4 blocks
    assert bottleneck_blocks(net) == ["unet.dec.4x4_in0", "unet.dec.4x4_in1"]
    assert lowest_encoder_blocks(net) == ["unet.enc.4x4_block0", "unet.enc.4x4_block1"]
    assert all(b in names for b in bottleneck_blocks(net) + lowest_encoder_blocks(net))
    mnist = load("mnist-s-T-ema050")
    assert bottleneck_blocks(mnist) == ["unet.dec.7x7_in0", "unet.dec.7x7_in1"]
    assert lowest_encoder_blocks(mnist) == ["unet.enc.7x7_block0", "unet.enc.7x7_block1"]
    for g in digits_guides():
        if "kind" in g.base:
            p = digits_perturbation(g.base, net)
            assert p.sites(net) if hasattr(p, "sites") and g.base["kind"] not in ("inputnoise", "selfguidance") else True


def test_free_guides_digits_proxies_schedules_quick(tmp_path):
    out, doc = tmp_path / "fg", tmp_path / "free_guides.md"
    assert main(["free-guides", "digits", "--quick", "--only", "seg,sg-prev", "--out", str(out), "--doc", str(doc)]) == 0
    rec = json.loads((out / "free_guides_digits.json").read_text())
    keys = [r["key"] for r in rec["rows"]]
    assert keys == ["none", "seg", "sg-prev", "none-dropout"]
    seg = rec["rows"][1]
    assert seg["cost"]["ratio"] > 0 and len(seg["runs"]) == 2 and "mean" in seg["dfd"]
    assert (out / "free_guides_digits_pareto.png").stat().st_size > 1000
    assert main(["free-guides", "proxies", "--quick", "--out", str(out), "--doc", str(doc)]) == 0
    prox = json.loads((out / "proxies.json").read_text())
    assert {r["key"] for r in prox["rows"]} == {"seg", "sg-prev"} and "digits" in prox["correlations"]
    assert main(["free-guides", "schedules", "--quick", "--only", "seg", "--out", str(out), "--doc", str(doc)]) == 0
    sched = json.loads((out / "free_guides_schedules.json").read_text())
    assert {r["schedule"] for r in sched["rows"]} == {"constant", "interval", "w-ramp", "p-ramp", "p-ramp-up", "w-star"}
    text = doc.read_text()
    for part in ("## Digits: every free guide", "## Schedules", "## Choosing a guide without sampling",
                 "## The free guides in this library"):
        assert part in text
