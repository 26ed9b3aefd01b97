"""Every registered network trains with its recipe's optimiser, schedule and loss
(LesionSegLib.losses.build_loss): a few steps on two fixed images, the loss finite and
falling. The three Res2Net-50 networks are in test_training_res2net.py."""
import pytest

from LesionSegLib import checkpoint

from training_helpers import overfit


@pytest.mark.parametrize("name, steps, overrides", [
    # reduced widths keep the architecture and make the test cheap
    ("unet", 5, {"model_config": {"base_width": 8}}),
    ("msenet", 5, {"model_config": {"widths": [8, 16, 32, 64], "asff_channels": 32}}),
    # L-Seg's recipe: SGD with the prototxt's lr_mults (conv5 x100), lr 1e-6 for a loss
    # summed over pixels, gradient accumulation as Caffe's iter_size (here 2)
    ("lseg", 8, {"accumulate": 2}),
    ("mslkseg", 4, {"model_config": {"widths": [8, 16, 32, 64, 128]}, "size": 32}),
])
def test_network_overfits_two_images(tmp_path, name, steps, overrides):
    size = overrides.pop("size", None)
    losses, result = overfit(name, tmp_path, steps, size=size, **overrides)
    if name == "lseg":
        assert result.history[0]["global_step"] == 4  # 8 batches, an optimiser step every 2
        losses = losses[1::2]
    assert losses[-1] < losses[0], losses
    assert sum(losses[-2:]) < sum(losses[:2]), losses
    if name == "mslkseg":  # trained through the FFT on the CPU, handed back as built
        from LesionSegLib.inference.fastconv import FFTDepthwiseConv2d
        assert not any(isinstance(m, FFTDepthwiseConv2d) for m in result.model.modules())
        assert sum(getattr(m, "kernel_size", None) == (21, 21) for m in result.model.modules()) == 4
    ck = checkpoint.load(result.last_checkpoint)
    assert ck.name == name and ck.provenance["recipe"]["model"] == name
