"""`model.image_tower: auto`: what each kind of machine and backbone trains."""

import pytest

from l2rclip.config import ModelConfig
from l2rclip.models.factory import image_tower_note, resolve_image_tower


@pytest.mark.parametrize(
    ("device", "kind", "schedule", "expected"),
    [
        ("cpu", "clip", "one_stage", "frozen"),  # a laptop with real CLIP: features cached, prompts trained
        ("cuda", "clip", "one_stage", "train"),  # the paper's fine-tuning
        ("cuda:1", "clip", "one_stage", "train"),
        ("cpu", "demo", "one_stage", "train"),  # the shipped demo CLIP trains in seconds
        ("cpu", "random", "one_stage", "train"),  # a random tower has everything to learn
        ("cpu", "clip", "two_stage", "train"),  # stage 2 is the fine-tuning
    ],
)
def test_auto_resolves_by_device_backbone_and_schedule(device, kind, schedule, expected):
    used = resolve_image_tower(ModelConfig(image_tower="auto"), kind, device, schedule)
    assert used.image_tower == expected
    assert used == ModelConfig(image_tower=expected)  # nothing else changes
    note = image_tower_note(ModelConfig(image_tower="auto"), used)
    assert note.startswith("image tower frozen" if expected == "frozen" else "image tower fine-tuned")
    assert "model.image_tower auto" in note


@pytest.mark.parametrize("chosen", ["train", "frozen"])
def test_an_explicit_choice_is_kept_on_every_machine(chosen):
    for device in ("cpu", "cuda"):
        used = resolve_image_tower(ModelConfig(image_tower=chosen), "clip", device, "one_stage")
        assert used.image_tower == chosen
        assert "auto" not in image_tower_note(used, used)
