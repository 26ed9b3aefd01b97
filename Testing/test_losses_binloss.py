"""L-Seg's multi-channel bin loss: values and gradients against hand computation and a
plain-Python rendering of the Caffe layer's loops (one image at a time)."""
import math

import pytest
import torch

from LesionSegLib.losses import bin_selection, build_loss, multi_channel_bin_loss, probability_bin
from LesionSegLib.losses.binloss import positives_from_label


def logit(p):
    return math.log(p / (1.0 - p))


def ce(x, t):
    """Numerically stable sigmoid cross-entropy, the layer's formula."""
    return max(x, 0.0) - x * t + math.log1p(math.exp(-abs(x)))


def sig(x):
    return 1.0 / (1.0 + math.exp(-x))


def caffe_reference(x, label, key=10.0, num_label=None, buggy_backward=False):
    """Forward value and gradient of the layer for ONE image, written as the layer's
    description reads: x[c][j] logits (channels × pixels), label[j] in 0..C.
    ``buggy_backward`` reproduces the released Backward, whose fourth branch repeats the
    third condition."""
    C, n = len(x), len(label)
    num_label = C if num_label is None else num_label
    count_pos_k, bin_count, bin_loss, pos_loss = [0.0] * C, [[0] * 5 for _ in range(C)], \
        [[0.0] * 5 for _ in range(C)], [0.0] * C
    def bin_of(p):
        return 0 if p < 0.2 else 1 if p < 0.4 else 2 if p < 0.6 else 3 if p < 0.8 else 4
    for c in range(C):
        for j in range(n):
            if label[j] == c + 1:
                count_pos_k[c] += key
                pos_loss[c] += ce(x[c][j], 1.0)
            else:
                b = bin_of(sig(x[c][j]))
                bin_count[c][b] += 1
                bin_loss[c][b] += ce(x[c][j], 0.0)
    lowest = []
    for c in range(C):
        P, cnt = count_pos_k[c], bin_count[c]
        if P == 0:
            lowest.append(0)
        elif P <= cnt[4]:
            lowest.append(4)
        elif P <= cnt[4] + cnt[3]:
            lowest.append(3)
        elif P <= cnt[4] + cnt[3] + cnt[2]:
            lowest.append(2)
        elif P <= cnt[4] + cnt[3] + cnt[2] + cnt[1]:
            lowest.append(1)
        else:
            lowest.append(0)
    sel_count = [sum(bin_count[c][b] for b in range(lowest[c], 5)) for c in range(C)]
    sel_loss = [sum(bin_loss[c][b] for b in range(lowest[c], 5)) for c in range(C)]
    cp = sum(count_pos_k[c] / key for c in range(C)) if key else sum(
        sum(1 for j in range(n) if label[j] == c + 1) for c in range(C))
    cn = sum(int(sel_count[c] / num_label) for c in range(C))
    if cp + cn == 0:
        return 0.0, [[0.0] * n for _ in range(C)], lowest
    loss = sum(pos_loss[c] * cn / (cp + cn) + sel_loss[c] * cp / (cp + cn) for c in range(C))
    grad = [[0.0] * n for _ in range(C)]
    for c in range(C):
        low = lowest[c]
        if buggy_backward and low == 1:
            low = 0  # the released Backward: the 4+3+2+1 case falls through to "all negatives"
        for j in range(n):
            s = sig(x[c][j])
            if label[j] == c + 1:
                grad[c][j] = (s - 1.0) * cn / (cp + cn)
            elif bin_of(s) >= low:
                grad[c][j] = s * cp / (cp + cn)
    return loss, grad, lowest


def run(x, label, **kw):
    """Our loss and gradient for a (1, C, H, W) float64 logit tensor."""
    x = x.clone().requires_grad_(True)
    loss = multi_channel_bin_loss(x, label, **kw)
    loss.backward()
    return loss.item(), x.grad


# --- bins --------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_probability_bins_and_exact_boundaries(dtype):
    p = torch.tensor([0.0, 0.1999, 0.2, 0.3999, 0.4, 0.5999, 0.6, 0.7999, 0.8, 0.9999, 1.0], dtype=dtype)
    assert probability_bin(p).tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 4]


def logit_hitting(p, dtype):
    """A logit whose sigmoid, in ``dtype``, is exactly the boundary value ``p`` (in that dtype)."""
    target = torch.tensor(p, dtype=dtype)
    x = torch.tensor(logit(p), dtype=dtype)
    for direction in (1.0, -1.0):
        y = x.clone()
        for _ in range(200):
            if torch.sigmoid(y) == target:
                return y
            y = torch.nextafter(y, torch.tensor(direction * 100.0, dtype=dtype))
    pytest.skip(f"no {dtype} logit with sigmoid exactly {p}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("p,expected_bin", [(0.2, 1), (0.4, 2), (0.6, 3), (0.8, 4)])
def test_sigmoid_exactly_on_a_boundary_goes_to_the_upper_bin(dtype, p, expected_bin):
    x = logit_hitting(p, dtype)
    logits = x.view(1, 1, 1, 1).expand(1, 1, 1, 3).clone()
    label = torch.zeros(1, 1, 3, dtype=torch.long)
    label[0, 0, 0] = 1  # one positive: P = key·1; two negatives on the boundary
    sel = bin_selection(logits, positives_from_label(label, 1), key=2)
    assert sel.bins[0, 0, 0, 1:].tolist() == [expected_bin, expected_bin]
    assert sel.bin_counts[0, 0].tolist() == [2 if b == expected_bin else 0 for b in range(5)]
    # P = 2 is reached by exactly this bin (and everything above it is empty)
    assert sel.lowest_bin.item() == expected_bin
    assert sel.selected[0, 0, 0].tolist() == [False, True, True]


# --- hand-computed selections --------------------------------------------------------------------

# one channel, 16 pixels: 1 positive (logit 0.3), 15 negatives: bin4 ×3, bin3 ×4, bin2 ×4,
# bin1 ×2, bin0 ×2 (probabilities at bin centres, far from the boundaries)
NEG_PROBS = [0.9, 0.85, 0.95, 0.7, 0.65, 0.75, 0.72, 0.5, 0.45, 0.55, 0.52, 0.3, 0.25, 0.1, 0.05]
NEG_BINS = [4, 4, 4, 3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 0, 0]
POS_LOGIT = 0.3


def hand_case():
    vals = [POS_LOGIT] + [logit(p) for p in NEG_PROBS]
    x = torch.tensor(vals, dtype=torch.float64).view(1, 1, 4, 4)
    label = torch.zeros(1, 4, 4, dtype=torch.long)
    label.view(-1)[0] = 1
    return x, label


@pytest.mark.parametrize("key,lowest", [(3, 4), (5, 3), (7, 3), (10, 2), (11, 2), (13, 1), (14, 0), (0, 0)])
def test_selection_branches_value_and_gradient_by_hand(key, lowest):
    """key·#pos = key; cumulative counts from the top bin are 3, 7, 11, 13, 15."""
    x, label = hand_case()
    loss, grad = run(x, label, key=key)
    sel = [b >= lowest for b in NEG_BINS]
    n_sel = sum(sel)
    cp, cn = 1, n_sel  # one positive; num_label = C = 1, so no division
    w_pos, w_neg = cn / (cp + cn), cp / (cp + cn)
    expected = ce(POS_LOGIT, 1) * w_pos + sum(ce(logit(p), 0) for p, s in zip(NEG_PROBS, sel) if s) * w_neg
    assert loss == pytest.approx(expected, rel=1e-12)
    g = grad.view(-1).tolist()
    assert g[0] == pytest.approx((sig(POS_LOGIT) - 1) * w_pos, rel=1e-12)
    for gi, p, s in zip(g[1:], NEG_PROBS, sel):
        assert gi == pytest.approx(p * w_neg if s else 0.0, rel=1e-9, abs=1e-15)


def test_count_pos_ties_select_the_smaller_set():
    """P equal to a cumulative count (3 = bin4) stops there: the layer tests P <= count."""
    x, label = hand_case()
    _, s = multi_channel_bin_loss(x, label, key=3, return_selection=True)
    assert s.lowest_bin.item() == 4 and s.num_selected.item() == 3


def test_no_positives_anywhere_gives_zero_loss_and_zero_gradient():
    x = torch.randn(1, 4, 5, 6, dtype=torch.float64)
    label = torch.zeros(1, 5, 6, dtype=torch.long)
    loss, grad = run(x, label)
    _, s = multi_channel_bin_loss(x, label, return_selection=True)
    assert s.selected.all() and s.count_pos.item() == 0 and s.count_neg.item() == 4 * (30 // 4)
    assert loss == 0.0
    assert torch.count_nonzero(grad) == 0


def test_cp_plus_cn_zero_is_zero_not_nan():
    x = torch.randn(1, 4, 1, 3, dtype=torch.float64)  # 3 pixels: int(3 / 4) = 0
    label = torch.zeros(1, 1, 3, dtype=torch.long)
    loss, grad = run(x, label)
    assert loss == 0.0 and torch.isfinite(grad).all() and torch.count_nonzero(grad) == 0


def test_positives_but_cn_zero_keeps_only_the_negative_term():
    # 1 positive, 2 negatives, num_label 4: cn = int(2/4) = 0 -> w_pos = 0, w_neg = 1
    x = torch.tensor([[[[1.5, -0.7, 2.2]]]], dtype=torch.float64)
    label = torch.tensor([[[1, 0, 0]]])
    loss, grad = run(x, label, num_label=4)
    assert loss == pytest.approx(ce(-0.7, 0) + ce(2.2, 0), rel=1e-12)
    assert grad.view(-1).tolist() == pytest.approx([0.0, sig(-0.7), sig(2.2)], rel=1e-12)


def test_num_label_divides_the_selected_negative_count():
    x, label = hand_case()
    _, s1 = multi_channel_bin_loss(x, label, key=10, return_selection=True)
    _, s4 = multi_channel_bin_loss(x, label, key=10, num_label=4, return_selection=True)
    assert s1.count_neg.item() == 11 and s4.count_neg.item() == 11 // 4


def test_several_classes_match_the_layer_loops():
    """Four channels; classes 1, 2 and 4 present, 3 absent. Another class's pixels are
    negatives of a channel, class balance is pooled over channels, int(selected/4)."""
    g = torch.Generator().manual_seed(3)
    H, W = 6, 7
    label = torch.zeros(1, H, W, dtype=torch.long)
    label[0, 0, :3] = 1
    label[0, 2, 2:4] = 2
    label[0, 5, 6] = 4
    # probabilities at bin centres ± 0.05, so the bins are unambiguous
    centres = torch.tensor([0.1, 0.3, 0.5, 0.7, 0.9], dtype=torch.float64)
    probs = centres[torch.randint(0, 5, (1, 4, H, W), generator=g)] + \
        (torch.rand(1, 4, H, W, generator=g, dtype=torch.float64) - 0.5) * 0.1
    x = torch.log(probs / (1 - probs))
    loss, grad = run(x, label, key=10)
    ref_loss, ref_grad, lowest = caffe_reference(x[0].reshape(4, -1).tolist(), label.view(-1).tolist(), key=10)
    assert loss == pytest.approx(ref_loss, rel=1e-12)
    assert torch.allclose(grad[0].reshape(4, -1), torch.tensor(ref_grad, dtype=torch.float64), rtol=1e-10, atol=1e-14)
    _, s = multi_channel_bin_loss(x, label, return_selection=True)
    assert s.lowest_bin[0].tolist() == lowest
    assert s.num_pos[0].tolist() == [3, 2, 0, 1]
    assert lowest[2] == 0  # class 3 absent: all negatives
    # pixels of class 1 are negatives of channel 2 (and may be selected there)
    assert not s.positives[0, 1][label[0] == 1].any()


def test_consistent_backward_differs_from_the_caffe_bug_only_where_documented():
    """When bins 4..1 are selected, the released Backward also pushes bin-0 negatives
    down; ours (autograd of the forward) does not."""
    x, label = hand_case()
    _, grad = run(x, label, key=13)  # P = 13 -> bins 4..1
    _, good, lowest = caffe_reference(x[0].reshape(1, -1).tolist(), label.view(-1).tolist(), key=13)
    _, buggy, _ = caffe_reference(x[0].reshape(1, -1).tolist(), label.view(-1).tolist(), key=13,
                                  buggy_backward=True)
    assert lowest == [1]
    ours = grad.view(-1).tolist()
    assert ours == pytest.approx(good[0], rel=1e-10, abs=1e-15)
    differs = [i for i in range(16) if abs(buggy[0][i] - ours[i]) > 1e-12]
    assert differs == [14, 15]  # the two bin-0 negatives (pixels 14, 15)


def test_batch_is_the_sum_of_per_image_losses():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, 8, 8, generator=g, dtype=torch.float64) * 2
    label = torch.randint(0, 5, (3, 8, 8), generator=g)
    label[2] = 0
    label[1][label[1] == 3] = 0
    total = multi_channel_bin_loss(x, label).item()
    parts = [multi_channel_bin_loss(x[i:i + 1], label[i:i + 1]).item() for i in range(3)]
    assert total == pytest.approx(sum(parts), rel=1e-12)
    for i in range(3):  # and each image is the layer's value for batch size 1
        ref, _, _ = caffe_reference(x[i].reshape(4, -1).tolist(), label[i].view(-1).tolist())
        assert parts[i] == pytest.approx(ref, rel=1e-12)


def test_gradcheck_away_from_bin_boundaries():
    g = torch.Generator().manual_seed(2)
    centres = torch.tensor([0.1, 0.3, 0.5, 0.7, 0.9], dtype=torch.float64)
    probs = centres[torch.randint(0, 5, (2, 3, 5, 5), generator=g)] + \
        (torch.rand(2, 3, 5, 5, generator=g, dtype=torch.float64) - 0.5) * 0.1
    x = torch.log(probs / (1 - probs)).requires_grad_(True)
    label = torch.randint(0, 4, (2, 5, 5), generator=g)
    # eps 1e-6 in logit space moves a probability by < 3e-7, far less than the 0.05
    # margin to any boundary, so the selection is constant during the check
    assert torch.autograd.gradcheck(lambda t: multi_channel_bin_loss(t, label, key=2), (x,), eps=1e-6, atol=1e-7)
    assert torch.autograd.gradcheck(lambda t: multi_channel_bin_loss(t, label, key=10), (x,), eps=1e-6, atol=1e-7)


def test_lseg_loss_sums_six_outputs_and_accepts_a_multilabel_mask():
    g = torch.Generator().manual_seed(4)
    outs = tuple(torch.randn(2, 4, 16, 16, generator=g) for _ in range(6))
    label = torch.randint(0, 5, (2, 16, 16), generator=g)
    loss_fn = build_loss("lseg")
    total = loss_fn(outs, {"label": label})
    each = [multi_channel_bin_loss(o, label).item() for o in outs]
    assert total.item() == pytest.approx(sum(each), rel=1e-5)
    comps = loss_fn.last_components
    assert list(comps) == ["dsn1", "dsn2", "dsn3", "dsn4", "dsn5", "fuse", "total"]
    assert comps["fuse"] == pytest.approx(each[5], rel=1e-6)
    # without a label map, positives come from the per-class mask (same thing when the
    # classes do not overlap)
    mask = torch.stack([(label == c + 1) for c in range(4)], 1).float()
    assert loss_fn(outs, {"mask": mask}).item() == pytest.approx(total.item(), rel=1e-6)
    assert loss_fn.config["options"] == {"key": 10.0, "num_label": 4}


def test_lseg_loss_rejects_wrong_output_count_and_label_size():
    loss_fn = build_loss("lseg")
    outs = tuple(torch.zeros(1, 4, 8, 8) for _ in range(5))
    with pytest.raises(ValueError, match="expected 6 output"):
        loss_fn(outs, {"label": torch.zeros(1, 8, 8, dtype=torch.long)})
    with pytest.raises(ValueError, match="label"):
        loss_fn(outs + (outs[0],), {"label": torch.zeros(1, 8, 9, dtype=torch.long)})
