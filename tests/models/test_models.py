"""The model: prompts, RankFormer, truncated text encoding, gradients, parameter groups."""

import dataclasses
import warnings

import pytest
import torch

from l2rclip.config import ModelConfig, Params, from_dict
from l2rclip.models.backbone import TINY_ARCH, load_backbone, text_tower_modules
from l2rclip.models.factory import build_l2rclip
from l2rclip.models.prompts import interpolation_weights, phrase_embeddings
from l2rclip.models.rankformer import RankFormer
from l2rclip.ranks import RankSpace


@pytest.fixture(scope="module")
def backbone():
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_backbone(TINY_ARCH, "none")


def make_model(backbone, ranks=10, **model):
    model = {"arch": TINY_ARCH, "pretrained": "none", **model}
    params = from_dict(Params, {"ranks": {"start": 1, "stop": ranks}, "model": model})
    torch.manual_seed(0)
    return build_l2rclip(backbone, RankSpace.from_config(params.ranks), params.model)


VARIANTS = [
    {},
    {"prompt": {"context_shared": False, "rank_tokens": 2}},
    {"prompt": {"context_init": "random", "n_context": 8, "interpolation": "plain"}},
    {"prompt": {"interpolation": "gaussian", "n_base": 4}, "rankformer": {"attention": "full"}},
    {
        "prompt": {"interpolation": "inverse_distance", "n_base": 3},
        "rankformer": {"rank_position": True, "layers": 2},
    },
]


@pytest.mark.parametrize("variant", VARIANTS)
def test_truncated_encoding_matches_full_length(backbone, variant):
    model = make_model(backbone, ranks=12, **variant)
    with torch.no_grad():
        block = model.prompt_block()
        truncated = model.text_encoder(block, truncate=True)  # (M, E)
        full = model.text_encoder(block, truncate=False)
    assert truncated.shape == (12, 64)
    assert (truncated - full).abs().max().item() < 1e-5
    assert model.text_encoder.assemble(block, truncate=True)[0].shape[1] == block.shape[1] + 3
    assert model.text_encoder.assemble(block, truncate=False)[0].shape[1] == 77


def test_full_length_encoding_equals_open_clip_encode_text(backbone):
    """With prompts set to a real sentence's tokens, our encoder reproduces CLIP's own encode_text."""
    model = make_model(backbone, ranks=3, prompt={"context_init": "a photo of", "interpolation": "plain"})
    clip, tokenizer = backbone.model, backbone.tokenizer
    with torch.no_grad():
        block = model.prompt_learner()  # (3, 4, D): "a photo of" + rank name token
        ours = model.text_encoder(block)
        reference = clip.encode_text(
            tokenizer([f"a photo of {n}." for n in ("one", "two", "three")]), normalize=True
        )
    assert (ours - reference).abs().max().item() < 1e-5


@pytest.mark.parametrize("variant", VARIANTS)
def test_rankformer_starts_as_identity(backbone, variant):
    model = make_model(backbone, **variant)
    with torch.no_grad():
        assert torch.equal(model.prompt_block(), model.prompt_learner())


def test_rankformer_mixes_ranks_once_trained():
    torch.manual_seed(0)
    former = RankFormer(n_ranks=5, width=16, heads=2)
    for param in former.parameters():
        torch.nn.init.normal_(param, std=0.5)
    prompts = torch.randn(5, 3, 16)  # (M, L, D)
    changed = prompts.clone()
    changed[4] += torch.randn(3, 16)  # only rank 4 moves (not a constant: LayerNorm removes those)
    out, out_changed = former(prompts), former(changed)
    # token attention runs across ranks: rank 0's output depends on rank 4's input
    assert not torch.allclose(out[0], out_changed[0])
    # ...but not across token slots: slot 0 of every rank is independent of slot 1's inputs
    other = prompts.clone()
    other[:, 1] += torch.randn(5, 16)
    assert torch.allclose(former(other)[:, 0], out[:, 0], atol=1e-6)


def test_one_step_reaches_every_trainable_part_and_no_text_weight(backbone):
    model = make_model(backbone, prompt={"context_init": "random"})
    text_before = {name: p.detach().clone() for name, p in model.text_encoder.named_parameters()}
    text_before.update({name: b.clone() for name, b in model.text_encoder.named_buffers()})
    assert all(not p.requires_grad for p in model.text_encoder.parameters())
    optimizer = torch.optim.Adam(model.param_groups(1e-3, 1e-3, 1e-3))
    images, labels = torch.randn(6, 3, 64, 64), torch.tensor([0, 2, 4, 6, 8, 9])
    for step in range(2):
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(images)["logits"], labels)
        loss.backward()
        grads = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
        if step == 0:
            assert grads["prompt_learner.context"].abs().sum() > 0
            assert grads["prompt_learner.base_embeddings"].abs().sum() > 0
            assert any(
                g is not None and g.abs().sum() > 0 for n, g in grads.items() if n.startswith("rankformer.")
            )
            assert any(
                g is not None and g.abs().sum() > 0 for n, g in grads.items() if n.startswith("image_encoder.")
            )
        optimizer.step()
    # after the first step the zero-initialised projections moved, so alpha gets gradient too
    assert model.rankformer.alpha.grad.abs() > 0
    for name, p in model.text_encoder.named_parameters():
        assert p.grad is None and torch.equal(p, text_before[name]), name
    for name, b in model.text_encoder.named_buffers():
        assert torch.equal(b, text_before[name]), name


def test_text_tower_of_backbone_is_frozen(backbone):
    for part in text_tower_modules(backbone.model):
        params = [part] if isinstance(part, torch.nn.Parameter) else list(part.parameters())
        assert params and all(not p.requires_grad for p in params)


def test_param_groups_by_module_and_frozen_image_tower(backbone):
    model = make_model(backbone)
    groups = {g["name"]: g for g in model.param_groups(1e-4, 2e-4, 1e-6, weight_decay=5e-4)}
    assert set(groups) == {"prompts", "rankformer", "image_tower"}
    assert groups["image_tower"]["lr"] == 1e-6 and groups["rankformer"]["lr"] == 2e-4
    frozen = make_model(backbone, image_tower="frozen", rankformer={"enabled": False})
    assert [g["name"] for g in frozen.param_groups(1e-4, 1e-4, 1e-5)] == ["prompts"]
    assert frozen.rankformer is None


def test_prototype_cache_used_in_eval_and_dropped_in_training(backbone):
    model = make_model(backbone).eval()
    cached = model.cache_prototypes()
    with torch.no_grad():
        torch.nn.init.normal_(model.prompt_learner.context)  # would change fresh prototypes
    assert model.prototypes() is cached
    assert "cached_prototypes" in model.state_dict()
    model.train()
    assert model.cached_prototypes.numel() == 0
    assert not torch.allclose(model.prototypes(), cached)


def test_forward_on_cached_image_features(backbone):
    model = make_model(backbone).eval()
    images = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        direct = model(images)
        cached = model(image_features=model.encode_images(images))
    assert torch.allclose(direct["logits"], cached["logits"])
    assert direct["logits"].shape == (3, 10)
    with pytest.raises(ValueError, match="expected images or image_features"):
        model()


def test_interpolation_weights():
    linear = interpolation_weights(5, 2, "linear")  # (M, B)
    assert torch.allclose(linear[:, 1], torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0]))
    for kind in ("linear", "inverse_distance", "gaussian"):
        w = interpolation_weights(9, 3, kind)
        assert w.shape == (9, 3) and torch.allclose(w.sum(1), torch.ones(9))
        if kind != "inverse_distance":  # Shepard weights are not monotone between far bases
            assert torch.all(w[:, 0].diff() <= 1e-7)  # weight of the first base falls with rank
    assert interpolation_weights(9, 3, "inverse_distance")[4, 1] > 0.99  # rank on a base
    with pytest.raises(ValueError, match="n_base"):
        interpolation_weights(4, 5)


def test_prompt_initialisation_from_phrase_and_names(backbone):
    model = make_model(backbone, prompt={"context_init": "a photo of", "interpolation": "plain"})
    learner, clip = model.prompt_learner, backbone.model
    expected = phrase_embeddings("a photo of", backbone.tokenizer, clip.token_embedding)
    assert learner.n_context == 3 and torch.equal(learner.context, expected)
    seven = phrase_embeddings("seven", backbone.tokenizer, clip.token_embedding).mean(0)
    assert torch.equal(learner.rank_block()[6, 0], seven)
    assert learner().shape == (10, 4, 64)
    specific = make_model(backbone, prompt={"context_shared": False}).prompt_learner
    assert specific.context.shape == (10, specific.n_context, 64)


def test_bad_model_options_are_clear_errors(backbone):
    with pytest.raises(ValueError, match="heads"):
        make_model(backbone, rankformer={"heads": 7})
    with pytest.raises(ValueError, match="n_base"):
        make_model(backbone, ranks=3, prompt={"n_base": 5})
    too_long = dataclasses.replace(
        ModelConfig(), prompt=dataclasses.replace(ModelConfig().prompt, context_init="random", n_context=80)
    )
    model = build_l2rclip(backbone, RankSpace(range(3)), dataclasses.replace(too_long, arch=TINY_ARCH))
    with pytest.raises(ValueError, match="does not fit"):
        model.compute_prototypes()
