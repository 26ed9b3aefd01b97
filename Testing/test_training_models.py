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


def test_dyconv_annealing_trains_hot_but_validates_at_the_inference_temperature(tmp_path, monkeypatch):
    """MS-LKSeg anneals its DyConv temperature 30 → 1 during training; validation (which
    picks best.pt) must see the network as inference and the checkpoint run it, at 1."""
    from LesionSegLib.models.mslkseg import MSLKSeg
    from LesionSegLib.training import loop, trainer
    from training_helpers import write_folder

    def temperatures(model):
        return {round(m.temperature, 3) for m in model.modules() if hasattr(m, "temperature")}

    seen = {"train": [], "val": []}
    original_validate = loop.validate_epoch
    original_forward = MSLKSeg.forward

    def spy_validate(ddp_model, model, *args, **kw):
        seen["val"].append(temperatures(model))
        return original_validate(ddp_model, model, *args, **kw)

    def spy_forward(self, x):
        if self.training:
            seen["train"].append(temperatures(self))
        return original_forward(self, x)

    monkeypatch.setattr(loop, "validate_epoch", spy_validate)
    monkeypatch.setattr(MSLKSeg, "forward", spy_forward)
    data = write_folder(tmp_path / "d", 4, 32, 3, prefix="case")
    trainer.train("mslkseg", data, tmp_path / "run", seed=0, recipe_overrides={
        "epochs": 2, "batch_size": 2, "epoch_length": 2, "size": [32, 32], "val_fraction": 0.5,
        "checkpoint_every_steps": 0, "model_config": {"widths": [8, 16, 32, 64, 128]},
        "dyconv_temperature": {"start": 30.0, "end": 1.0, "epochs": 10}})
    assert seen["train"][0] == {30.0} and seen["train"][-1] == {27.1}   # epoch 1: 30 - 29/10
    assert seen["val"] == [{1.0}, {1.0}]
