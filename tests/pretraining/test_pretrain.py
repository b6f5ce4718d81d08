"""The captioned corpus and the pretraining stage of the demo CLIP (issue 20).

The corpus must never draw a demo image, must cover every word of the project's prompts, and must
be the same whatever the number of drawing processes; the stage must write fp16 safetensors that
load as the demo CLIP and say so. The language prior those weights carry is tested in
test_language_path.py.
"""

import hashlib
import json

import numpy as np
import pytest
import torch
import yaml
from scipy.stats import spearmanr
from support.project import ROOT
from torch.utils.data import DataLoader

from l2rclip.config import FallbackConfig, ModelConfig, PretrainConfig, PromptConfig, load_params
from l2rclip.data.demo import COUNTS, demo_image, group_background
from l2rclip.models.backbone import load_backbone
from l2rclip.models.factory import fallback_config
from l2rclip.models.kinds import backbone_kind, backbone_label, kind_of, least_clip
from l2rclip.pretraining.corpus import (
    CORPUS_KEY,
    PROMPT_PHRASINGS,
    CaptionedShapes,
    caption_vocabulary,
    corpus_item,
    corpus_rng,
    draw_scene,
)
from l2rclip.pretraining.pretrain import save_demo_weights
from l2rclip.ranks import number_words
from l2rclip.stages.pretrain import run_pretrain

N_CORPUS = 3000  # corpus images compared with the demo sets (about a second)


def state(rng: np.random.Generator) -> int:
    return rng.bit_generator.state["state"]["state"]


def demo_streams(seed: int, groups: int) -> set[int]:
    """Generator states of every stream a demo set of `seed` and `groups` groups draws from."""
    states = {state(np.random.default_rng([seed, group, count])) for group in range(groups) for count in COUNTS}
    return states | {state(np.random.default_rng([seed, group])) for group in range(groups)}


def test_corpus_streams_are_spawned_children_apart_from_the_demo_sets():
    # Structure: a corpus stream is SeedSequence(seed, spawn_key=(CORPUS_KEY, index)); a demo stream is a
    # root sequence of at most three entropy words without spawn key: numpy pads a spawned sequence's
    # entropy to its pool size before appending the key, so the two never hash the same input.
    sequence = corpus_rng(0, 7).bit_generator.seed_seq
    assert sequence.spawn_key == (CORPUS_KEY, 7) and sequence.entropy == 0
    demo = np.random.default_rng([0, 1, 2]).bit_generator.seed_seq
    assert demo.spawn_key == ()
    # Fact: no corpus image's generator is one of the demo sets the project draws (the demo task with
    # seed 0 and 60 groups, the pretraining check and the language-path test sets).
    corpus = {state(corpus_rng(seed, index)) for seed in (0, 1) for index in range(N_CORPUS)}
    assert len(corpus) == 2 * N_CORPUS
    for seed, groups in ((0, 60), (0, 100), (1, 60), (12345, 20)):
        assert not corpus & demo_streams(seed, groups), f"demo seed {seed} shares a stream with the corpus"


def test_no_demo_image_is_in_the_corpus():
    demo = {
        hashlib.sha256(demo_image(0, group, count, 96)[0].tobytes()).hexdigest()
        for group in range(60)
        for count in COUNTS
    }
    corpus = {hashlib.sha256(corpus_item(0, index, 96)[0].tobytes()).hexdigest() for index in range(N_CORPUS)}
    assert len(demo) == 600 and not demo & corpus


def test_demo_image_is_the_file_generate_demo_writes(tmp_path):
    from PIL import Image

    from l2rclip.data.demo import generate_demo

    table = generate_demo(tmp_path, n_per_rank=2, image_size=64, seed=5)
    for row in table.itertuples():
        group = int(row.group[1:])
        drawn, _ = demo_image(5, group, row.label, 64, group_background(5, group))
        assert np.array_equal(np.asarray(Image.open(tmp_path / row.path)), np.asarray(drawn))


def test_corpus_items_are_a_pure_function_of_seed_and_index():
    first, again, other = corpus_item(3, 11, 96), corpus_item(3, 11, 96), corpus_item(4, 11, 96)
    assert first[0].tobytes() == again[0].tobytes() and first[1] == again[1]
    assert first[0].tobytes() != other[0].tobytes()


def test_every_caption_states_the_count():
    for index in range(400):
        _, text, scene = corpus_item(0, index, 96)
        words = set(text.replace(".", " ").replace(":", " ").replace(",", " ").split())
        assert {number_words(scene.count), str(scene.count)} & words, (scene.count, text)


def prompt_phrases() -> list[str]:
    """Every prompt template and context phrase the project ships: params.yaml, config defaults, protocols."""
    params = load_params(ROOT / "params.yaml")
    phrases = [
        params.model.prompt_template,
        params.model.prompt.context_init,
        ModelConfig().prompt_template,
        PromptConfig().context_init,
        params.pretrain.eval_template,
    ]
    for protocol in sorted((ROOT / "protocols").glob("*.yaml")):
        model = yaml.safe_load(protocol.read_text()).get("params", {}).get("model", {})
        phrases += [model.get("prompt_template"), model.get("prompt", {}).get("context_init")]
    return [p for p in phrases if p and p != "random"]


def test_captions_cover_every_word_of_the_projects_prompts():
    vocabulary = caption_vocabulary(0, N_CORPUS)
    phrases = prompt_phrases()
    assert "a photo of a person aged" in phrases and "a photo of {} shapes." in phrases
    words = {w for p in phrases for w in p.replace("{}", " ").replace(".", " . ").split()}
    words |= {number_words(n) for n in COUNTS} | {str(n) for n in COUNTS}
    rare = {w: vocabulary[w] for w in sorted(words) if vocabulary[w] < 20}
    assert not rare, f"prompt words (nearly) absent from {N_CORPUS} captions: {rare}"
    assert {p.replace("{}", "").split()[0] for p in PROMPT_PHRASINGS} <= set(vocabulary)


def test_size_does_not_tell_the_count_in_the_corpus_as_it_does_in_the_demo_set():
    corpus = [draw_scene(corpus_rng(0, i), 96)[1] for i in range(1000)]
    corpus_rho = spearmanr([s.count for s in corpus], [np.mean([o[3] for o in s.objects]) for s in corpus])[0]
    demo = [
        (count, np.mean([o[3] for o in demo_image(0, g, count, 96)[1]])) for g in range(30) for count in COUNTS
    ]
    demo_rho = spearmanr(*zip(*demo, strict=True))[0]
    assert demo_rho < -0.9 and corpus_rho > -0.75, (demo_rho, corpus_rho)


def test_batches_do_not_depend_on_the_number_of_drawing_processes():
    dataset = CaptionedShapes(
        0,
        batch_size=4,
        steps=3,
        image_size=64,
        transform=lambda im: torch.tensor(np.asarray(im)).permute(2, 0, 1),
        tokenizer=lambda texts: torch.tensor([len(t) for t in texts]),
    )
    serial = list(DataLoader(dataset, batch_size=None, num_workers=0))
    parallel = list(DataLoader(dataset, batch_size=None, num_workers=2))
    assert len(serial) == len(parallel) == 3
    for (a, ta), (b, tb) in zip(serial, parallel, strict=True):
        assert torch.equal(a, b) and torch.equal(ta, tb)
    assert torch.equal(serial[1][0][0], dataset.batch(1)[0][0])


def test_stage_writes_fp16_weights_that_load_as_the_demo_clip(tmp_path):
    config = PretrainConfig(
        steps=3,
        batch_size=8,
        warmup_steps=1,
        workers=0,
        threads=1,
        log_every=1,
        eval_every=2,
        eval_per_count=2,
        experiment=None,
    )
    weights = tmp_path / "demo.safetensors"
    metrics = run_pretrain(config, weights, tmp_path / "records")
    assert set(metrics) >= {"zero_shot/accuracy", "zero_shot/mae", "zero_shot/ordinality", "file_bytes"}
    assert json.loads((tmp_path / "records" / "metrics.json").read_text()) == pytest.approx(metrics)
    assert len((tmp_path / "records" / "history.csv").read_text().splitlines()) == 1 + 3
    assert (tmp_path / "records" / "checks.csv").read_text().splitlines()[0].startswith("step,accuracy")
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}  # noqa: SIM118 - not a dict
        recorded = json.loads(f.metadata()["l2rclip"])
        assert (recorded["kind"], recorded["arch"], recorded["pretrain"]["steps"]) == ("demo", "L2RCLIP-Demo", 3)
    loaded = load_backbone("L2RCLIP-Demo", str(weights))
    assert loaded.kind == "demo" and not loaded.is_clip
    assert metrics["file_bytes"] == weights.stat().st_size < 8e6
    # the same weights give the same bytes (git keeps every version of the shipped file)
    copies = [tmp_path / "a.safetensors", tmp_path / "b.safetensors"]
    for copy in copies:
        save_demo_weights(loaded.model, copy, {"arch": "L2RCLIP-Demo", "note": "x", "corpus_version": 1})
    assert copies[0].read_bytes() == copies[1].read_bytes()


def test_backbone_kinds_and_labels(tmp_path):
    assert backbone_kind("L2RCLIP-Tiny", "none") == "random" and backbone_kind("ViT-B-16", "openai") == "clip"
    assert backbone_kind("L2RCLIP-Demo", "demo") == "demo"
    plain = tmp_path / "plain.safetensors"
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(plain))
    assert backbone_kind("ViT-B-16", str(plain)) == "clip"
    assert backbone_label("clip") == "" and "NOT CLIP" in backbone_label("random")
    assert "DEMO CLIP" in backbone_label("demo") and "drawn shapes" in backbone_label({"backbone_kind": "demo"})
    assert kind_of({"is_clip": False}) == "random" and kind_of({"backbone": "L2RCLIP-Demo", "pretrained": "demo"})
    assert least_clip(["clip", "demo", "clip"]) == "demo" and least_clip(["demo", "random"]) == "random"
    with pytest.raises(ValueError, match="expected one of"):
        backbone_label("fake")


def test_the_offline_fallback_is_the_demo_clip_where_it_ships():
    demo = fallback_config(ModelConfig(fallback=FallbackConfig(arch="L2RCLIP-Demo")))
    tiny = fallback_config(ModelConfig(fallback=FallbackConfig(arch="L2RCLIP-Tiny")))
    assert (demo.arch, demo.pretrained) == ("L2RCLIP-Demo", "demo")
    assert (tiny.arch, tiny.pretrained) == ("L2RCLIP-Tiny", "none")
    assert load_params(ROOT / "params.yaml").model.fallback.arch == "L2RCLIP-Demo"
    with pytest.raises(ValueError, match="ship for model.arch L2RCLIP-Demo only"):
        load_backbone("L2RCLIP-Tiny", "demo")
