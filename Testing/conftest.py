import math
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SHARED_DATA = ROOT.parent / "shared" / "data"


def smoke_size(card) -> int:
    """Smallest side the card says the network accepts (≥ 64), for fast CPU tests."""
    inp = card["input"]
    div = inp.get("size_divisor", 1)
    return int(math.ceil(max(inp.get("min_size", 64), 64) / div) * div)


def randomize_norm_stats(model, seed: int = 0) -> None:
    """Give every BatchNorm non-trivial statistics and affine parameters, as in a trained
    network, so that fusion tests are not satisfied by identity BNs."""
    import torch
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) * 1.5 + 0.5)
                if m.affine:
                    m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.2)


@pytest.fixture(autouse=True)
def _deterministic_torch():
    try:
        import torch
    except ImportError:  # pragma: no cover
        yield
        return
    torch.manual_seed(0)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    yield


# ---- the Slicer logic's tests (slicer-core): a scene, a logic on it, a threshold network
@pytest.fixture(scope="module")
def unet_checkpoint(tmp_path_factory):
    """A checkpoint of helpers.threshold_unet: its lesions are known exactly."""
    from helpers import THRESHOLD_PRESET, threshold_unet

    from LesionSegLib import checkpoint, models
    path = tmp_path_factory.mktemp("weights") / "unet-threshold.pt"
    checkpoint.save(path, threshold_unet(), config=models.config("unet", base_width=4, depth=2),
                    preset=THRESHOLD_PRESET, provenance={"note": "hand-set threshold weights for tests"})
    return path


@pytest.fixture()
def scene():
    from LesionSegLib.slicer import bridge
    s = bridge.new_scene()
    yield s
    s.Clear(1)


@pytest.fixture()
def logic(scene, tmp_path, monkeypatch):
    """LesionSegLogic on ``scene``, with a weights cache of its own (never the user's)."""
    from LesionSegLib.slicer.logic import LesionSegLogic
    monkeypatch.setenv("LESIONSEG_CACHE", str(tmp_path / "cache"))
    return LesionSegLogic(scene=scene)
