"""A captioned corpus of drawn shapes, to pretrain a small CLIP whose text side knows the counts.

Images are drawn in the demo set's style (l2rclip.data.demo: same placement, colours and
renderer), with 1..10 shapes. Each image gets one caption, drawn from several templates, that
always states how many shapes there are, as a word ("three") or in digits ("3"), and may add the
shapes' kind, colour, size, position, background, or a count per kind. The templates also cover
every phrasing the project's prompts use (`PROMPT_PHRASINGS`: the zero-shot templates and the
context phrases of params.yaml, the config defaults and the protocol presets), filled with the
count: a word that never appears in a caption keeps its random initial embedding, and a prompt
built from it would measure nothing.

Why the corpus varies what the demo set fixes: in the demo set the shapes' size falls with their
count (the largest radius is 0.3 * size / sqrt(count)), so a model can count by size. The corpus
shrinks the largest radius by a random factor, sometimes gives every shape one radius, and
sometimes uses a single kind or a single named colour, so that only the number of shapes tells
the count and the words for kinds and colours get grounded.

Seed space: image `index` of the corpus with seed `seed` is drawn by numpy's generator on
`SeedSequence(seed, spawn_key=(CORPUS_KEY, index))`, numpy's mechanism for independent child
streams. The demo set seeds its generators with plain entropy lists `[seed, group, count]` and
`[seed, group]` and no spawn key, so no demo image's generator state is a corpus image's (tests
check this for the demo sets the project draws). Nothing is written to disk: images are drawn on
the fly, batch by batch (a 200k-image corpus drawn up front took 4.5 minutes and 2.3 GB).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from l2rclip.data.demo import COUNTS, SHAPES, _background, draw_shapes, place_objects, shape_colours
from l2rclip.ranks import number_words

CORPUS_KEY = 0x434C4950  # "CLIP": the spawn-key word that puts corpus streams apart from the demo set's
CORPUS_VERSION = 1  # bump when a change alters any drawn image or caption

# Named colours as bands of HSV hue (centre, half-width), as the shapes' hue is drawn by the demo style.
COLOURS: dict[str, tuple[float, float]] = {
    "red": (0.0, 0.025),
    "orange": (0.075, 0.02),
    "yellow": (0.155, 0.025),
    "green": (0.33, 0.06),
    "cyan": (0.5, 0.03),
    "blue": (0.63, 0.04),
    "purple": (0.76, 0.03),
    "pink": (0.9, 0.03),
}
PLURALS = {
    "circle": "circles",
    "square": "squares",
    "triangle": "triangles",
    "shape": "shapes",
    "object": "objects",
    "thing": "things",
}
GENERIC_NOUNS = ("shape", "object", "thing")

# Every phrasing of the project's prompts, `{}` the count (ranks.names: words or labels):
# - params.yaml and l2rclip/config.py: model.prompt_template, model.prompt.context_init;
# - protocols/*.yaml: the zero-shot templates and context phrases of each benchmark preset
#   (ages, decades, aesthetic levels), so that their words have trained embeddings too.
PROMPT_PHRASINGS = (
    "a photo of {} shapes.",  # params.yaml model.prompt_template (demo)
    "the number of shapes is {}.",  # params.yaml model.prompt.context_init (demo)
    "a photo of {}.",  # ModelConfig.prompt_template default
    "a photo of a person aged {}.",  # PromptConfig.context_init default; adience template; morph,
    # fgnet, utkface, clap2015 context
    "a photo of a {} year old person.",  # morph, fgnet, utkface, clap2015 zero-shot template
    "a photo taken in the {}.",  # hci template and context
    "a photo of {} aesthetic quality.",  # aesthetics template
    "the aesthetic quality of the photo is {}.",  # aesthetics context
)
NOUN_TEMPLATES = (  # {np}: noun phrase with the count ("three small red circles"), {bg}: dark | light
    "a photo of {np}.",
    "{np}.",
    "there {be} {np}.",
    "a picture of {np} on a {bg} background.",
    "an image with {np}.",
    "{np} on a {bg} background.",
    "a drawing of {np}.",
)


@dataclass(frozen=True)
class Scene:
    """What one corpus image shows, and what its caption may say about it.

    Attributes:
        objects: `[shape, cx, cy, r]` per shape (as l2rclip.data.demo draws them).
        colours: the named colour of every shape, or None where hues are random (demo style).
        background: HSV background.
        image_size: side in pixels.
    """

    objects: list[list[Any]]
    colours: tuple[str, ...] | None
    background: tuple[float, float, float]
    image_size: int

    @property
    def count(self) -> int:
        """Number of shapes."""
        return len(self.objects)

    def kind(self) -> str | None:
        """The kind all shapes share, or None when they are mixed."""
        kinds = {shape for shape, *_ in self.objects}
        return kinds.pop() if len(kinds) == 1 else None

    def colour(self) -> str | None:
        """The named colour all shapes share, or None."""
        names = set(self.colours or (None,))
        return names.pop() if len(names) == 1 else None

    def size_word(self) -> str | None:
        """'small' or 'large' when the shapes' mean radius is clearly one or the other, else None.

        In the demo set one shape has a radius of 0.16-0.30 of the side and ten shapes 0.05-0.095,
        hence small below 0.08, large above 0.17, and no word in between.
        """
        radius = float(np.mean([r for *_, r in self.objects])) / self.image_size
        return "small" if radius < 0.08 else "large" if radius > 0.17 else None

    def position(self) -> str | None:
        """Where the shapes are when they sit together in one third of the image ('on the left'...)."""
        thirds = {(_third(cx, self.image_size), _third(cy, self.image_size)) for _, cx, cy, _ in self.objects}
        if len(thirds) != 1:
            return None
        column, row = thirds.pop()
        vertical = ("at the top", "", "at the bottom")[row]
        horizontal = ("on the left", "", "on the right")[column]
        if vertical and horizontal:
            return f"{vertical} {horizontal.removeprefix('on the ')}"  # "at the top left"
        return vertical or horizontal or "in the centre"


def _third(coordinate: float, size: int) -> int:
    return min(2, int(3 * coordinate / size))


def corpus_rng(seed: int, index: int) -> np.random.Generator:
    """The generator of corpus image `index`: a spawned child stream, apart from every demo stream."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(CORPUS_KEY, index)))


def draw_scene(rng: np.random.Generator, image_size: int) -> tuple[Image.Image, Scene]:
    """Draw one image of 1..10 shapes in the demo style, with sizes, kinds and colours varied.

    Returns:
        The RGB image (image_size x image_size) and its Scene.
    """
    count = int(rng.integers(COUNTS.start, COUNTS.stop))
    background = _background(rng)
    scale = 1.0 if rng.random() < 0.4 else float(rng.uniform(0.35, 1.0))  # size must not tell the count
    kinds = SHAPES if rng.random() < 0.5 else (SHAPES[int(rng.integers(len(SHAPES)))],)
    objects = place_objects(rng, count, image_size, scale=scale, same_size=rng.random() < 0.25, kinds=kinds)
    mode = rng.random()
    names: tuple[str, ...] | None
    if mode < 0.45:  # one named colour
        names = (list(COLOURS)[int(rng.integers(len(COLOURS)))],) * count
    elif mode < 0.7:  # a named colour per shape
        names = tuple(list(COLOURS)[int(i)] for i in rng.integers(len(COLOURS), size=count))
    else:  # the demo set's random hues
        names = None
    hues = None if names is None else [(COLOURS[n][0] + rng.uniform(-1, 1) * COLOURS[n][1]) % 1.0 for n in names]
    image = draw_shapes(objects, shape_colours(rng, objects, background, hues), image_size, background)
    return image, Scene(objects=objects, colours=names, background=background, image_size=image_size)


def count_text(rng: np.random.Generator, count: int) -> str:
    """The count as a word (70 %) or in digits, as rank names are (ranks.names: words | labels)."""
    return number_words(count) if rng.random() < 0.7 else str(count)


def noun_phrase(rng: np.random.Generator, count: int, noun: str, adjectives: Sequence[str] = ()) -> str:
    """'three small red circles', 'one shape', '7 triangles'."""
    words = [count_text(rng, count), *adjectives, noun if count == 1 else PLURALS[noun]]
    return " ".join(words)


def caption(rng: np.random.Generator, scene: Scene) -> str:
    """One caption of the scene; every caption states the total count.

    Families (probabilities): a noun phrase in a template (60 %), one of the project's prompt
    phrasings with the count (25 %), a count per kind or per colour when the scene has several
    (15 %, else a noun phrase).
    """
    family = rng.random()
    if family < 0.25:
        return PROMPT_PHRASINGS[int(rng.integers(len(PROMPT_PHRASINGS)))].format(count_text(rng, scene.count))
    if family >= 0.85 and (text := _breakdown(rng, scene)) is not None:
        return text
    kind, colour, size, position = scene.kind(), scene.colour(), scene.size_word(), scene.position()
    noun = kind if kind is not None and rng.random() < 0.7 else GENERIC_NOUNS[int(rng.integers(3))]
    adjectives = [word for word, p in ((size, 0.5), (colour, 0.6)) if word is not None and rng.random() < p]
    phrase = noun_phrase(rng, scene.count, noun, adjectives)
    if position is not None and rng.random() < 0.5:
        return f"{phrase} {position}."
    template = NOUN_TEMPLATES[int(rng.integers(len(NOUN_TEMPLATES)))]
    return template.format(
        np=phrase, be="is" if scene.count == 1 else "are", bg="light" if scene.background[2] > 0.5 else "dark"
    )


def _breakdown(rng: np.random.Generator, scene: Scene) -> str | None:
    """'five shapes: two circles and three squares.' (by kind, or by colour), or None if one group."""
    by_kind = rng.random() < 0.5 or scene.colours is None
    if by_kind:
        groups = Counter(shape for shape, *_ in scene.objects)
        parts = [noun_phrase(rng, n, kind) for kind, n in sorted(groups.items())]
    else:
        groups = Counter(scene.colours)
        parts = [noun_phrase(rng, n, "shape", [name]) for name, n in sorted(groups.items())]
    if len(groups) < 2:
        return None
    listing = ", ".join(parts[:-1]) + " and " + parts[-1]
    return f"{noun_phrase(rng, scene.count, 'shape')}: {listing}."


def corpus_item(seed: int, index: int, image_size: int) -> tuple[Image.Image, str, Scene]:
    """Corpus image `index` of `seed`, its caption and its scene (pure function of the three)."""
    rng = corpus_rng(seed, index)
    image, scene = draw_scene(rng, image_size)
    return image, caption(rng, scene), scene


class CaptionedShapes(IterableDataset):
    """Batches of (images, caption tokens), drawn on the fly; batch `step` depends only on (seed, step).

    Use with `DataLoader(dataset, batch_size=None, num_workers=k)`: worker w draws steps w, w+k, ...
    and the loader returns them in step order, so the batches are the same for any number of
    workers (and image `index` is the same image for any batch size).

    Args:
        seed: corpus seed (not the demo set's: see the module docstring).
        batch_size: images per batch.
        steps: number of batches (steps start_step .. steps-1 are drawn).
        image_size: side of the drawn images (the demo set's `data.demo.image_size`).
        transform: PIL image -> (3, H, W) tensor, the model's evaluation transform.
        tokenizer: the architecture's tokenizer: list of str -> (B, context_length) ids.
        start_step: first step to draw (resuming).
    """

    def __init__(
        self,
        seed: int,
        batch_size: int,
        steps: int,
        image_size: int,
        transform: Callable[[Image.Image], torch.Tensor],
        tokenizer: Callable[[list[str]], torch.Tensor],
        start_step: int = 0,
    ):
        super().__init__()
        self.seed, self.batch_size, self.steps, self.image_size = seed, batch_size, steps, image_size
        self.transform, self.tokenizer, self.start_step = transform, tokenizer, start_step

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (B, 3, H, W) and caption tokens (B, context_length) of batch `step`."""
        first = step * self.batch_size
        items = [corpus_item(self.seed, index, self.image_size) for index in range(first, first + self.batch_size)]
        images = torch.stack([self.transform(image) for image, _, _ in items])  # (B, 3, H, W)
        return images, self.tokenizer([text for _, text, _ in items])  # (B, 3, H, W), (B, C)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        worker = get_worker_info()
        offset, stride = (0, 1) if worker is None else (worker.id, worker.num_workers)
        if worker is not None:
            torch.set_num_threads(1)  # drawing is PIL and numpy; the trainer keeps the other cores
        for step in range(self.start_step + offset, self.steps, stride):
            yield self.batch(step)

    def __len__(self) -> int:
        return max(0, self.steps - self.start_step)


def caption_vocabulary(seed: int, n_images: int, image_size: int = 64) -> Counter:
    """How often each caption word occurs in the first `n_images` captions (for coverage checks)."""
    words: Counter = Counter()
    for index in range(n_images):
        rng = corpus_rng(seed, index)
        _, scene = draw_scene(rng, image_size)
        words.update(caption(rng, scene).replace(".", " .").replace(":", " :").replace(",", " ,").split())
    return words
