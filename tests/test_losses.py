"""Loss terms on tiny hand-computed cases (2-D and 3-D unit vectors)."""

import math

import pytest
import torch
import torch.nn.functional as F

from l2rclip.config import LossConfig
from l2rclip.losses import (
    OrdinalLoss,
    cop_batch_loss,
    cross_entropy_loss,
    cross_modal_ordinal_pairwise_loss,
    kl_t2i_loss,
    ordinal_weights,
    supcon_loss,
)

SQRT2 = math.sqrt(2.0)


def unit(*angles: float) -> torch.Tensor:
    """Points on the unit circle at the given angles (radians), (len(angles), 2)."""
    a = torch.tensor(angles, dtype=torch.float64)
    return torch.stack([a.cos(), a.sin()], dim=1)


def random_case(seed: int = 0, b: int = 6, m: int = 4, e: int = 8):
    g = torch.Generator().manual_seed(seed)
    v = F.normalize(torch.randn(b, e, generator=g, dtype=torch.float64), dim=1)
    t = F.normalize(torch.randn(m, e, generator=g, dtype=torch.float64), dim=1)
    y = torch.randint(0, m, (b,), generator=g)
    return v, t, y


# Three prototypes on a half circle: t0 = (1, 0), t1 = (0, 1), t2 = (-1, 0).
PROTOS = unit(0.0, math.pi / 2, math.pi)


def test_ordinal_weights_by_hand():
    w = ordinal_weights(torch.tensor([0, 2]), torch.tensor([10.0, 20.0, 40.0]))
    # raw |value(y_i) - value_k| = [[0, 10, 30], [30, 20, 0]], max 30
    expected = torch.tensor([[0.0, 1 / 3, 1.0], [1.0, 2 / 3, 0.0]])
    torch.testing.assert_close(w, expected)


def test_ordinal_weights_zero_on_true_rank_and_max_one():
    _, _, y = random_case(3, b=10, m=5)
    w = ordinal_weights(y, torch.tensor([1.0, 2.0, 4.0, 8.0, 16.0]))
    assert torch.all(w[torch.arange(10), y] == 0)
    assert w.max().item() == pytest.approx(1.0)


def test_ordinal_weights_single_rank_is_zero_not_nan():
    w = ordinal_weights(torch.tensor([0, 0]), torch.tensor([5.0]))
    assert torch.equal(w, torch.zeros(2, 1))


def test_cop_by_hand():
    v = torch.stack([PROTOS[0], unit(math.atan2(0.8, 0.6))[0]])  # (1, 0) and (0.6, 0.8)
    y = torch.tensor([0, 1])
    out = cross_modal_ordinal_pairwise_loss(v, PROTOS, y, torch.tensor([0.0, 1.0, 2.0]), 2.0, 0.5)
    # ||(0.6, 0.8) - (0, 1)||^2 = 0.4; W = [[0, .5, 1], [.5, 0, .5]]
    tightness = (0.0 + 0.4) / 2
    diversity = -(0.5 * SQRT2 + 2.0 + 0.5 * math.sqrt(0.8) + 0.5 * math.sqrt(3.2)) / 6
    assert out["tightness"].item() == pytest.approx(tightness)
    assert out["diversity"].item() == pytest.approx(diversity, abs=1e-6)
    assert out["total"].item() == pytest.approx(2.0 * tightness + 0.5 * diversity, abs=1e-6)


def test_cop_invariant_to_batch_order():
    v, t, y = random_case(1)
    values = torch.tensor([0.0, 1.0, 3.0, 7.0])
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    a = cross_modal_ordinal_pairwise_loss(v, t, y, values)
    b = cross_modal_ordinal_pairwise_loss(v[perm], t, y[perm], values)
    for key in ("tightness", "diversity", "total"):
        torch.testing.assert_close(a[key], b[key])


def test_cop_falls_as_image_moves_to_its_prototype():
    protos = unit(0.0, 0.5, 1.0, 1.5)
    start = unit(1.2)
    values = torch.arange(4.0)
    losses = []
    for alpha in (0.0, 0.25, 0.5, 0.75, 1.0):
        v = F.normalize((1 - alpha) * start + alpha * protos[:1], dim=1)
        losses.append(cross_modal_ordinal_pairwise_loss(v, protos, torch.tensor([0]), values)["total"].item())
    assert all(later < earlier for earlier, later in zip(losses, losses[1:], strict=False))


def test_cop_diversity_more_negative_when_far_prototype_is_farther():
    values = torch.arange(3.0)
    near = cross_modal_ordinal_pairwise_loss(unit(0.0), unit(0.0, 0.3, 0.6), torch.tensor([0]), values)
    far = cross_modal_ordinal_pairwise_loss(unit(0.0), unit(0.0, 0.3, 1.2), torch.tensor([0]), values)
    # only the weight-1 distance changes: 2 sin(0.3) -> 2 sin(0.6), averaged over M = 3
    diff = (2 * math.sin(0.6) - 2 * math.sin(0.3)) / 3
    assert far["diversity"].item() == pytest.approx(near["diversity"].item() - diff)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_no_nan_gradient_when_image_equals_a_prototype(dtype):
    # axis prototypes make every coincident squared distance exactly 0 (no rounding to hide behind)
    t = torch.eye(4, dtype=dtype).requires_grad_(True)
    # image 0 sits on its own prototype; image 1 (rank 0) on the prototype of image 3 (rank 3)
    v = torch.eye(4, dtype=dtype)[[1, 3, 1, 2]].requires_grad_(True)
    y = torch.tensor([1, 0, 1, 3])
    out = cross_modal_ordinal_pairwise_loss(v, t, y, torch.arange(4.0))
    (out["total"] + cop_batch_loss(v, t, y)).backward()
    assert torch.isfinite(v.grad).all() and torch.isfinite(t.grad).all()


def test_cross_entropy_by_hand():
    logits = torch.tensor([[2.0, 0.0], [0.0, 0.0]])
    expected = (math.log(1 + math.exp(-2.0)) + math.log(2.0)) / 2
    assert cross_entropy_loss(logits, torch.tensor([0, 1])).item() == pytest.approx(expected)


def test_kl_t2i_uniform_columns_give_ln2():
    # each column softmax is [0.5, 0.5]; each target is one-hot -> KL = ln 2 per rank
    assert kl_t2i_loss(torch.zeros(2, 2), torch.tensor([0, 1])).item() == pytest.approx(math.log(2.0))


def test_kl_t2i_near_zero_when_columns_match_targets():
    y = torch.tensor([0, 0, 1, 2, 2])
    logits = 40.0 * F.one_hot(y, 4).double()  # rank 3 is absent and must be skipped
    assert kl_t2i_loss(logits, y).item() == pytest.approx(0.0, abs=1e-12)


def test_kl_t2i_skips_absent_rank():
    logits = torch.tensor([[1.0, 5.0], [0.0, -3.0]], dtype=torch.float64)
    p = torch.softmax(torch.tensor([1.0, 0.0], dtype=torch.float64), 0)
    expected = (0.5 * torch.log(0.5 / p)).sum().item()  # only rank 0 is present
    assert kl_t2i_loss(logits, torch.tensor([0, 0])).item() == pytest.approx(expected)


def test_cop_batch_two_images_by_hand():
    v = torch.stack([PROTOS[0], PROTOS[1]])  # (1, 0) label 0, (0, 1) label 2
    loss = cop_batch_loss(v, PROTOS, torch.tensor([0, 2]))
    # w = 1; L_d = -||v0 - t2|| = -2; L_center = -||t0 - t2|| = -2; L_t = (0 + 2) / 2 = 1
    assert loss.item() == pytest.approx(-2.0 + 0.5 * 1.0 + 0.5 * -2.0)


def test_cop_batch_single_image_and_single_rank():
    one = cop_batch_loss(PROTOS[1:2], PROTOS, torch.tensor([2]))
    assert one.item() == pytest.approx(0.5 * 2.0)  # ||(0, 1) - (-1, 0)||^2 = 2
    same = cop_batch_loss(PROTOS[[1, 1]], PROTOS, torch.tensor([2, 2]))
    assert same.item() == pytest.approx(0.5 * 2.0)  # all w_ij = 0


def test_supcon_by_hand():
    t = unit(0.0, math.pi / 2)  # orthogonal; cosine 1 with own, 0 with other
    loss = supcon_loss(t.clone(), t, torch.tensor([0, 1]), temperature=1.0)
    # both directions: -log(e / (e + 1)) per row
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-1.0)))
    # asymmetric: images (t0, t0, t1); text->image softmax runs over the 3 images
    loss = supcon_loss(t[[0, 0, 1]], t, torch.tensor([0, 0, 1]), temperature=1.0)
    image_to_text = math.log(1 + math.exp(-1.0))
    text_to_image = (math.log(2 + math.exp(-1.0)) + math.log(1 + 2 * math.exp(-1.0))) / 2
    assert loss.item() == pytest.approx(0.5 * (image_to_text + text_to_image))


def test_supcon_lower_for_aligned_than_shuffled():
    _, t, _ = random_case(4, m=4, e=16)
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    aligned = supcon_loss(t[y], t, y)
    shuffled = supcon_loss(t[y], t, torch.tensor([2, 3, 0, 1, 1, 0]))
    assert aligned.item() < shuffled.item() - 1.0


def outputs_for(seed: int = 5):
    v, t, y = random_case(seed)
    return {"logits": 10.0 * v @ t.T, "image_features": v, "text_features": t}, y


def test_ordinal_loss_default_terms_and_total():
    outputs, y = outputs_for()
    values = [0.0, 1.0, 2.0, 3.0]
    out = OrdinalLoss(values, cop=2.0, cop_tightness=0.5, cop_diversity=3.0)(outputs, y)
    expected_keys = {"ce_loss", "kl_t2i_loss", "cop_loss", "cop_tightness_loss", "cop_diversity_loss", "loss"}
    assert set(out) == expected_keys
    torch.testing.assert_close(out["ce_loss"], cross_entropy_loss(outputs["logits"], y))
    torch.testing.assert_close(out["cop_loss"], 0.5 * out["cop_tightness_loss"] + 3.0 * out["cop_diversity_loss"])
    torch.testing.assert_close(out["loss"], out["ce_loss"] + out["kl_t2i_loss"] + 2.0 * out["cop_loss"])


def test_ordinal_loss_two_stage_terms():
    outputs, y = outputs_for()
    loss = OrdinalLoss([0.0, 1.0, 2.0, 3.0], ce=0.5, kl_t2i=0.0, cop=0.0, cop_batch=2.0, supcon=3.0)
    out = loss(outputs, y)
    assert set(out) == {"ce_loss", "cop_batch_loss", "supcon_loss", "loss"}
    torch.testing.assert_close(
        out["supcon_loss"], supcon_loss(outputs["image_features"], outputs["text_features"], y)
    )
    torch.testing.assert_close(
        out["loss"], 0.5 * out["ce_loss"] + 2.0 * out["cop_batch_loss"] + 3.0 * out["supcon_loss"]
    )


def test_ordinal_loss_skips_zero_weight_terms():
    outputs, y = outputs_for()
    # features are absent: only the logits terms may be computed
    out = OrdinalLoss([0.0, 1.0, 2.0, 3.0], cop=0.0)({"logits": outputs["logits"]}, y)
    assert set(out) == {"ce_loss", "kl_t2i_loss", "loss"}


def test_ordinal_loss_backward_and_from_config():
    outputs, y = outputs_for()
    outputs = {k: v.clone().requires_grad_(True) for k, v in outputs.items()}
    loss = OrdinalLoss.from_config(LossConfig(cop_batch=1.0, supcon=1.0), [0.0, 1.0, 2.0, 3.0])
    out = loss(outputs, y)
    assert len(out) == 8
    out["loss"].backward()
    assert all(torch.isfinite(t.grad).all() for t in outputs.values())


def test_ordinal_loss_errors():
    with pytest.raises(ValueError, match="loss.ce.*loss.supcon"):
        OrdinalLoss([0.0, 1.0], ce=0.0, kl_t2i=0.0, cop=0.0)
    with pytest.raises(ValueError, match="loss.cop"):
        OrdinalLoss([0.0, 1.0], cop=-1.0)
    outputs, y = outputs_for()
    with pytest.raises(ValueError, match="expected 3 ranks"):
        OrdinalLoss([0.0, 1.0, 2.0])(outputs, y)
