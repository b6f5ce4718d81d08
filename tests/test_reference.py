"""Reference-parity definitions (docs/method.md, section 7b) and index-unit metrics, against hand derivations.

Every expected number below is derived in the comment above it from the definition, on inputs
small enough to do by hand (2-3 images, 3-4 ranks, unit vectors on a circle); the code under
test is never used to produce an expected value.
"""

import dataclasses
import math

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from l2rclip.config import ConfigError, LossConfig, Params, ParamsLoader, load_params, to_flat_dict
from l2rclip.evaluation.predictions import predict_outputs
from l2rclip.evaluation.results import markdown_table
from l2rclip.losses import OrdinalLoss, cop_batch_loss, kl_t2i_loss, reference_supcon_loss, supcon_loss
from l2rclip.metrics import (
    ordinal_metrics,
    ordinalclip_ordinality,
    prototype_ordinality,
    prototype_ordinality_metrics,
)
from l2rclip.models.heads import OrdinalHeadModel
from l2rclip.models.prompts import RankPromptLearner, interpolation_weights
from l2rclip.parity import REFERENCE, dvc_set_args, with_overrides, yaml_scalar
from l2rclip.stages.report import markdown

LN2 = math.log(2.0)


def unit(*angles: float) -> torch.Tensor:
    """Unit vectors in 2-D at the given angles (radians), (len(angles), 2)."""
    a = torch.tensor(angles, dtype=torch.float64)
    return torch.stack([a.cos(), a.sin()], dim=1)


# t0 = (1, 0), t1 = (0, 1), t2 = (-1, 0)
PROTOS = unit(0.0, math.pi / 2, math.pi)


# --- supcon -------------------------------------------------------------------------------------


def test_reference_supcon_two_images_by_hand():
    # labels [0, 2], v0 = (1, 0), v1 = (0, 1), logit_scale = ln 2 -> s = 2.
    # Batch-label prototypes u0 = t0 = (1, 0), u1 = t2 = (-1, 0); logits s <v_i, u_j> = [[2, -2], [0, 0]].
    # Positives: the diagonal (labels differ).
    # i2t rows: row 0 log_softmax([2, -2])[0] = -log(1 + e^-4); row 1 log(1/2) = -ln 2.
    #   i2t = (log(1 + e^-4) + ln 2) / 2
    # t2i rows (transpose [[2, 0], [-2, 0]]): row 0 pos 0: -log(1 + e^-2); row 1 pos 1: -log(e^-2 + 1).
    #   t2i = log(1 + e^-2)
    # reference = i2t + t2i (a sum); t1 (absent rank) is in no denominator.
    v = unit(0.0, math.pi / 2)
    labels = torch.tensor([0, 2])
    expected = (math.log(1 + math.exp(-4)) + LN2) / 2 + math.log(1 + math.exp(-2))
    got = reference_supcon_loss(v, PROTOS, labels, torch.tensor(LN2))
    assert got.item() == pytest.approx(expected)
    moved = PROTOS.clone()
    moved[1] = torch.tensor([0.6, 0.8])  # the absent rank's prototype: no effect on the reference
    assert reference_supcon_loss(v, moved, labels, LN2).item() == pytest.approx(expected)
    assert supcon_loss(v, moved, labels).item() != pytest.approx(supcon_loss(v, PROTOS, labels).item())


def test_reference_supcon_repeated_label_by_hand():
    # labels [0, 0], v0 = (1, 0), v1 = (0, 1), logit_scale 0 -> s = 1; u0 = u1 = t0.
    # logits <v_i, t0> = [[1, 1], [0, 0]], every pair positive.
    # i2t: row 0 mean(log_softmax([1, 1])) = -ln 2; row 1 likewise -> i2t = ln 2.
    # t2i: transpose [[1, 0], [1, 0]]; log_softmax([1, 0]) = [-log(1 + e^-1), -1 - log(1 + e^-1)],
    #   mean = -log(1 + e^-1) - 1/2 per row -> t2i = log(1 + e^-1) + 1/2.
    v = unit(0.0, math.pi / 2)
    expected = LN2 + math.log(1 + math.exp(-1)) + 0.5
    assert reference_supcon_loss(v, PROTOS, torch.tensor([0, 0]), 0.0).item() == pytest.approx(expected)


def test_ordinal_loss_reference_supcon_reads_the_models_logit_scale():
    v = unit(0.0, math.pi / 2)
    labels = torch.tensor([0, 2])
    outputs = {
        "logits": 2 * v @ PROTOS.T,
        "image_features": v,
        "text_features": PROTOS,
        "logit_scale": torch.tensor(LN2),
    }
    loss = OrdinalLoss([0.0, 1.0, 2.0], ce=0.0, kl_t2i=0.0, cop=0.0, supcon=1.0, supcon_form="reference")
    expected = (math.log(1 + math.exp(-4)) + LN2) / 2 + math.log(1 + math.exp(-2))
    assert loss(outputs, labels)["supcon_loss"].item() == pytest.approx(expected)


# --- cop_batch ----------------------------------------------------------------------------------


def test_cop_batch_pair_normalisation_by_hand():
    # labels [0, 1, 2], v_i = t_{y_i} (tightness 0). Pairs (0,1), (0,2), (1,2): gaps 1, 2, 1;
    # ||v_i - t_{y_j}|| = ||t_{y_i} - t_{y_j}|| = sqrt2, 2, sqrt2.
    # matrix (ours): min over BxB = 0, max 2 -> w = 1/2, 1, 1/2:
    #   L_d = L_center = -(sqrt2/2 + 2 + sqrt2/2)/3 = -(sqrt2 + 2)/3; total 1.5 L_d = -(sqrt2 + 2)/2.
    # pairs (reference): min over pairs = 1, max 2 -> w = 0, 1/2, 0:
    #   L_d = L_center = -(1/2 * 2)/3 = -1/3; total 1.5 * -1/3 = -1/2.
    labels = torch.tensor([0, 1, 2])
    v = PROTOS[labels]
    assert cop_batch_loss(v, PROTOS, labels, "matrix").item() == pytest.approx(-(math.sqrt(2) + 2) / 2)
    assert cop_batch_loss(v, PROTOS, labels, "pairs").item() == pytest.approx(-0.5)


def test_cop_batch_pairs_guards_single_pair_single_label_and_single_image():
    # 2 images labels [0, 2]: one pair, (g - g)/g = 0 -> only 0.5 L_t. v0 = t1 -> ||t1 - t0||^2 = 2,
    # v1 = t2 -> 0; L_t = 1, total 0.5. One label [1, 1]: max gap 0 -> weights 0 (not NaN) -> 0.5 L_t.
    v = PROTOS[[1, 2]].clone().requires_grad_(True)
    loss = cop_batch_loss(v, PROTOS, torch.tensor([0, 2]), "pairs")
    assert loss.item() == pytest.approx(0.5)
    loss.backward()
    assert torch.isfinite(v.grad).all()
    assert cop_batch_loss(PROTOS[[1, 1]], PROTOS, torch.tensor([1, 1]), "pairs").item() == pytest.approx(0.0)
    assert cop_batch_loss(PROTOS[[1]], PROTOS, torch.tensor([0]), "pairs").item() == pytest.approx(0.5 * 2.0)


# --- kl_t2i -------------------------------------------------------------------------------------


def test_kl_t2i_softmax10_target_by_hand():
    # 2 images, labels [0, 1], zero logits: every column softmax over images is [1/2, 1/2].
    # Column 0 target softmax(10 * [1, 0]) = [a, b], a = e^10/(e^10 + 1), b = 1/(e^10 + 1);
    # KL = a ln(2a) + b ln(2b); column 1 mirrors it; mean over the two present ranks = the same.
    # (uniform target [1, 0]: KL = ln 2.)
    a, b = math.exp(10) / (math.exp(10) + 1), 1 / (math.exp(10) + 1)
    logits, labels = torch.zeros(2, 3, dtype=torch.float64), torch.tensor([0, 1])
    expected = a * math.log(2 * a) + b * math.log(2 * b)
    assert kl_t2i_loss(logits, labels, "softmax10").item() == pytest.approx(expected)
    assert kl_t2i_loss(logits, labels, "uniform").item() == pytest.approx(LN2)


def test_kl_t2i_softmax10_repeated_label_by_hand():
    # 3 images, labels [0, 0, 1], zero logits -> predictions 1/3 each.
    # Column 0: softmax(10 * [1, 1, 0]) = [a, a, b], a = e^10/(2e^10 + 1), b = 1/(2e^10 + 1);
    #   KL0 = 2 a ln(3a) + b ln(3b).
    # Column 1: softmax(10 * [0, 0, 1]) = [c, c, d], c = 1/(e^10 + 2), d = e^10/(e^10 + 2);
    #   KL1 = 2 c ln(3c) + d ln(3d). Result (KL0 + KL1) / 2; rank 2 is absent and skipped.
    e = math.exp(10)
    a, b, c, d = e / (2 * e + 1), 1 / (2 * e + 1), 1 / (e + 2), e / (e + 2)
    kl0 = 2 * a * math.log(3 * a) + b * math.log(3 * b)
    kl1 = 2 * c * math.log(3 * c) + d * math.log(3 * d)
    got = kl_t2i_loss(torch.zeros(3, 3, dtype=torch.float64), torch.tensor([0, 0, 1]), "softmax10")
    assert got.item() == pytest.approx((kl0 + kl1) / 2)


# --- interpolation ------------------------------------------------------------------------------


def test_inverse_distance_eps_by_hand():
    # M = 3, B = 2: bases at ranks 0 and 2. Rank 0: d = [0, 2], w ~ [1/eps, 1/(2 + eps)],
    # normalised w00 = (2 + eps) / (2 + 2 eps). Rank 1: d = [1, 1] -> [1/2, 1/2].
    for eps in (1e-3, 1e-5):
        w = interpolation_weights(3, 2, "inverse_distance", eps=eps).double()
        assert w[0, 0].item() == pytest.approx((2 + eps) / (2 + 2 * eps), rel=1e-6)
        assert w[1].tolist() == pytest.approx([0.5, 0.5])


def test_gaussian_width_in_rank_units_by_hand():
    # M = 3, B = 2 (bases at 0 and 2, spacing 2). Rank 0: d = [0, 2].
    # OrdinalCLIP exp(-d^2) = [1, e^-4] -> w00 = 1/(1 + e^-4): unit rank, sigma 1/sqrt2 (2 sigma^2 = 1).
    # Ours, sigma 1 in base spacings: exp(-d^2 / (2 * 2^2)) = [1, e^-0.5] -> w00 = 1/(1 + e^-0.5).
    reference = interpolation_weights(3, 2, "gaussian", sigma=math.sqrt(0.5), unit="rank")
    ours = interpolation_weights(3, 2, "gaussian", sigma=1.0)
    assert reference[0, 0].item() == pytest.approx(1 / (1 + math.exp(-4)), rel=1e-6)
    assert ours[0, 0].item() == pytest.approx(1 / (1 + math.exp(-0.5)), rel=1e-6)
    with pytest.raises(ValueError, match="gaussian_unit"):
        interpolation_weights(3, 2, "gaussian", unit="years")


def test_prompt_learner_uses_the_interpolation_switches():
    learner = RankPromptLearner(
        nn.Embedding(5, 4),
        tokenizer=None,
        rank_names=["a", "b", "c"],
        context_init="random",
        rank_init="random",
        interpolation="inverse_distance",
        inverse_distance_eps=1e-5,
    )
    assert learner.weights[0, 0].item() == pytest.approx((2 + 1e-5) / (2 + 2e-5), rel=1e-6)


# --- ordinality ---------------------------------------------------------------------------------


def test_ordinalclip_ordinality_beside_ours_by_hand():
    # Prototypes at angles 0, 0.5, 0.2: S01 = cos .5 = .878, S02 = cos .2 = .980, S12 = cos .3 = .955.
    # OrdinalCLIP checks S[i, j] > S[i, j+1] for i <= j <= 1: (0,0) 1 > S01 yes; (0,1) S01 > S02 no;
    # (1,1) 1 > S12 yes. Spans {1, 2}: span 1 keeps j - i < 1 -> (0,0), (1,1) -> 1.0; span 2 -> 2/3.
    # Ours: anchor 0 step up 1->2: S02 > S01, a rise -> fail; anchor 2 step down 1->0: S20 = .980 >
    # S21 = .955, a rise -> fail; anchor 1 has no step off the diagonal -> 0 / 2 = 0.0.
    features = unit(0.0, 0.5, 0.2).numpy()
    assert ordinalclip_ordinality(features) == pytest.approx({1: 1.0, 2: 2 / 3})
    assert prototype_ordinality(features) == 0.0
    metrics = prototype_ordinality_metrics(features)
    assert metrics == pytest.approx(
        {
            "ordinality": 0.0,
            "ordinality_ordinalclip": 2 / 3,
            "ordinality_ordinalclip_span1": 1.0,
            "ordinality_ordinalclip_span2": 2 / 3,
        }
    )


def test_ordinalclip_ordinality_spans_and_small_cases():
    # 6 ordered ranks on an arc: every check holds; spans 1, 2, 4 and M-1 = 5.
    ordered = unit(*np.linspace(0.0, 1.5, 6)).numpy()
    assert ordinalclip_ordinality(ordered) == {1: 1.0, 2: 1.0, 4: 1.0, 5: 1.0}
    assert ordinalclip_ordinality(unit(0.0).numpy()) == {}  # one rank: no step
    assert prototype_ordinality_metrics(unit(0.0).numpy()) == {"ordinality": 1.0}


# --- CORAL / CORN published rule -----------------------------------------------------------------


def test_coral_threshold_rule_differs_from_mode_by_hand():
    # CORAL, M = 4, logits [-1, 1, 1]: P(y > k) = sigmoid = [.269, .731, .731] (not monotone).
    # Published rule: count of P > 0.5 = 2. Mode: survival [1, .269, .731, .731, 0] -> differences
    # [.731, -.462, 0, .731] -> clipped [.731, 0, 0, .731] -> argmax rank 0.
    logits = torch.tensor([[-1.0, 1.0, 1.0]])
    threshold = OrdinalHeadModel(nn.Identity(), "coral", 4, width=2, rule="threshold")
    mode = OrdinalHeadModel(nn.Identity(), "coral", 4, width=2, rule="mode")
    assert threshold.predict_ranks(logits).tolist() == [2]
    assert mode.predict_ranks(logits).tolist() == [0]
    assert threshold.has_point_rule and not mode.has_point_rule


def test_corn_threshold_rule_by_hand():
    # CORN, M = 4, logits [3, 0.2, 0.2]: conditionals sigmoid = [.9526, .5498, .5498];
    # P(y > k) = running product = [.9526, .5237, .2879] -> count > 0.5 = 2.
    # Mode: p = [1 - .9526, .9526 - .5237, .5237 - .2879, .2879] = [.047, .429, .236, .288] -> 1.
    logits = torch.tensor([[3.0, 0.2, 0.2]])
    assert OrdinalHeadModel(nn.Identity(), "corn", 4, 2).predict_ranks(logits).tolist() == [2]
    assert OrdinalHeadModel(nn.Identity(), "corn", 4, 2, rule="mode").predict_ranks(logits).tolist() == [1]
    with pytest.raises(ValueError, match="model.head_rule"):
        OrdinalHeadModel(nn.Identity(), "corn", 4, 2, rule="median")


def test_heads_are_scored_with_their_published_rule():
    # A CORAL head with zero weights and biases [-1, 1, 1] gives every image the logits [-1, 1, 1]
    # (the non-monotone case above): published rank 2, mode rank 0.
    model = OrdinalHeadModel(nn.Identity(), "coral", 4, width=2)
    with torch.no_grad():
        model.head.coral_weights.weight.zero_()
        model.head.coral_bias.copy_(torch.tensor([-1.0, 1.0, 1.0]))
    features = torch.zeros(3, 2)
    probs, point = predict_outputs(model, [{"image_features": features}], torch.device("cpu"))
    assert point.tolist() == [2, 2, 2]
    # labels [2, 2, 3], values 0, 10, 20, 30: published |20-20|, |20-20|, |20-30| -> MAE 10/3, accuracy 2/3,
    # index MAE 1/3; under the mode (rank 0) it would be 20, 20, 30 -> 70/3.
    m = ordinal_metrics(probs, np.array([2, 2, 3]), np.array([0.0, 10.0, 20.0, 30.0]), point=point)
    assert m["mae"] == pytest.approx(10 / 3) and m["mae_argmax"] == pytest.approx(10 / 3)
    assert m["mae_index"] == pytest.approx(1 / 3) and m["accuracy"] == pytest.approx(2 / 3)
    mode = ordinal_metrics(probs, np.array([2, 2, 3]), np.array([0.0, 10.0, 20.0, 30.0]))
    assert mode["mae_argmax"] == pytest.approx(70 / 3)
    with pytest.raises(ValueError, match="point"):
        ordinal_metrics(probs, np.array([2, 2, 3]), np.arange(4.0), point=np.array([0, 4, 1]))


# --- units --------------------------------------------------------------------------------------


def test_mae_in_value_and_index_units_by_hand():
    # Values [0, 2, 4] (spacing 2). Expected index sum_k p_k k: [0, 0.4, 0.25 + 1.5 = 1.75];
    # labels [0, 2, 1] -> |0| + |0.4 - 2| + |1.75 - 1| = 2.35 -> mae_index 2.35/3; value MAE is twice that.
    # Argmax ranks [0, 0, 2] -> index gaps 0, 2, 1 -> 1.0; in values 0, 4, 2 -> 2.0.
    probs = np.array([[1.0, 0.0, 0.0], [0.6, 0.4, 0.0], [0.0, 0.25, 0.75]])
    m = ordinal_metrics(probs, np.array([0, 2, 1]), np.array([0.0, 2.0, 4.0]))
    assert m["mae_index"] == pytest.approx(2.35 / 3) and m["mae"] == pytest.approx(4.7 / 3)
    assert m["mae_argmax_index"] == pytest.approx(1.0) and m["mae_argmax"] == pytest.approx(2.0)


def test_report_states_units_and_results_use_the_papers_unit():
    summary = {
        "test/mae": {"mean": 10.0, "std": 1.0, "folds": [9.0, 11.0]},
        "test/mae_index": {"mean": 1.0, "std": 0.1, "folds": [0.9, 1.1]},
        "test/accuracy": {"mean": 0.5, "std": 0.0, "folds": [0.5, 0.5]},
    }
    header = {
        "source": "hci",
        "method": "l2rclip",
        "backbone": "L2RCLIP-Tiny",
        "is_clip": False,
        "n_folds": 2,
        "train_seconds": 1.0,
        "paper_mae": "test/mae_index",
        "paper_mae_unit": "rank-index",
        "prediction_rule": "argmax+expectation",
    }
    text = markdown(summary, None, header)
    assert "rank-index units: `test/mae_index`" in text and "rank-VALUE units" in text
    assert "| mae_index | 1.0000 |" in text and "`ordinality_ordinalclip` is OrdinalCLIP's" in text
    row = {"name": "hci-1", "params": {"eval": {"paper_mae": "index"}}, "metrics": {**summary, **header}}
    assert "| 1.000 +- 0.100 | rank index |" in markdown_table([row])
    legacy = {"name": "old", "params": {}, "metrics": summary}  # a report written before paper_mae existed
    assert "| 10.000 +- 1.000 | value |" in markdown_table([legacy])
    demo = {
        "name": "demo",
        "params": {},
        "metrics": {**summary, "backbone": "L2RCLIP-Demo", "backbone_kind": "demo"},
    }
    table = markdown_table([demo])
    assert "| L2RCLIP-Demo (DEMO CLIP, NOT real CLIP) |" in table and "*random init" not in table.split("\n")[2]


# --- the reference bundle -------------------------------------------------------------------------


def test_reference_bundle_changes_exactly_the_listed_definitions():
    default = Params()
    resolved = with_overrides(default, REFERENCE)
    before, after = to_flat_dict(default), to_flat_dict(resolved)
    changed = {key for key in before if before[key] != after[key]}
    # model.head_rule is listed but the published rule is already the default
    assert changed == set(REFERENCE) - {"model.head_rule"}
    assert {key: after[key] for key in REFERENCE} == REFERENCE
    assert before["model.head_rule"] == "threshold"


def test_a_later_override_of_one_key_still_wins():
    resolved = with_overrides(Params(), {**REFERENCE, "loss.kl_t2i_target": "uniform"})
    assert resolved.loss.kl_t2i_target == "uniform" and resolved.loss.supcon_form == "reference"
    with pytest.raises(ConfigError, match="unknown params key 'loss.supcon_mode'"):
        with_overrides(Params(), {"loss.supcon_mode": "reference"})
    with pytest.raises(ConfigError, match="loss.supcon_form"):
        with_overrides(Params(), {"loss.supcon_form": "authors"})


def test_dvc_set_args_read_back_as_the_same_values(tmp_path):
    args = dvc_set_args(REFERENCE)
    assert args[::2] == ["-S"] * len(REFERENCE)
    for arg in args[1::2]:
        key, text = arg.split("=", 1)
        value = yaml.load(text, Loader=ParamsLoader)  # how params.yaml is read back
        assert value == REFERENCE[key] and type(value) is type(REFERENCE[key]), arg
    assert yaml_scalar(1e-5) == "1.0e-05"
    # DVC writes the float back as `1e-05` (YAML 1.2), which plain PyYAML reads as a string
    params = tmp_path / "params.yaml"
    params.write_text("model:\n  prompt:\n    inverse_distance_eps: 1e-05\ntrain:\n  lr_image: 2E+3\n")
    loaded = load_params(params)
    assert loaded.model.prompt.inverse_distance_eps == 1e-5 and loaded.train.lr_image == 2000.0


def test_reference_loss_config_changes_only_the_listed_terms():
    # On one batch (no repeated label, where the cop_batch normalisations differ), ce and cop are the
    # same under both configs; kl_t2i, cop_batch, supcon differ.
    g = torch.Generator().manual_seed(0)
    v = torch.nn.functional.normalize(torch.randn(3, 3, generator=g, dtype=torch.float64), dim=1)
    t = torch.nn.functional.normalize(torch.randn(3, 3, generator=g, dtype=torch.float64), dim=1)
    labels = torch.tensor([0, 2, 1])
    outputs = {"logits": 10 * v @ t.T, "image_features": v, "text_features": t, "logit_scale": torch.tensor(2.0)}
    reference = with_overrides(Params(), REFERENCE).loss
    ours = LossConfig()
    a = OrdinalLoss.from_config(ours, [0.0, 1.0, 2.0])(outputs, labels)
    b = OrdinalLoss.from_config(reference, [0.0, 1.0, 2.0])(outputs, labels)
    for same in ("ce_loss", "cop_loss"):
        assert a[same].item() == pytest.approx(b[same].item())
    for different in ("kl_t2i_loss", "cop_batch_loss", "supcon_loss"):
        assert a[different].item() != pytest.approx(b[different].item())
    assert (
        dataclasses.replace(reference, supcon_form="ours", cop_batch_weights="matrix", kl_t2i_target="uniform")
        == ours
    )
