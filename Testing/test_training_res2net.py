"""The three Res2Net-50 networks (M2SNet, MSNet, BSNet) train with their recipes'
optimisers and losses: a few steps on fixed images, the loss finite and falling. They
are the most expensive networks on a CPU, so the runs are as short as still shows it."""
import pytest

from training_helpers import overfit


def test_m2snet_trains_with_its_sgd_recipe_and_lossnet(tmp_path):
    # recipe: SGD nesterov 0.9, weight decay 5e-4, triangular schedule; loss: structure
    # + 0.1 LossNet (untrained VGG features here: no ImageNet file in the test machine).
    # lr 0.005 instead of 0.05: one image per batch is far noisier than batches of 16
    with pytest.warns(Warning):  # the loss announces the untrained LossNet loudly
        losses, result = overfit("m2snet", tmp_path, 3, batch=1, **{"optimizer.lr": 0.005})
    assert losses[-1] < losses[0], losses
    assert result.history[0]["train_lossnet"] >= 0


def test_msnet_trains_without_lossnet(tmp_path):
    losses, result = overfit("msnet", tmp_path, 3, batch=1, **{"optimizer.lr": 0.005, "loss": {"lossnet_weight": 0.0}})
    assert losses[-1] < losses[0], losses
    assert "train_lossnet" not in result.history[0]


def test_bsnet_trains_with_the_inf_net_recipe_and_derived_edges(tmp_path):
    # Adam 1e-4, element-wise gradient clamp 0.5, deep supervision + edge BCE; the folder
    # has no Edge/ maps, so edges are derived from the masks
    losses, result = overfit("bsnet", tmp_path, 2, batch=1)
    assert losses[-1] < losses[0], losses
    h = result.history[0]
    assert {"train_edge", "train_lateral_map_2", "train_lateral_map_5"} <= set(h)
