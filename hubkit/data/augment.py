"""Training-data augmentation whose random draws depend only on (seed, epoch, sample index).

``RunConfig.augment`` names a preset or gives timm training-transform options:

* ``"light"``: random resized crop (area 50-100 %, aspect 3/4-4/3) and a horizontal flip (p=0.5);
* ``"strong"``: random resized crop (area 8-100 %), horizontal flip and colour jitter (0.4);
* a dict with some of ``scale``, ``ratio``, ``hflip``, ``vflip``, ``color_jitter`` (timm's meanings).

The transform is timm's ``create_transform(is_training=True, ...)`` at the module's input
size, interpolation, mean and std (``hubkit.data.transforms.build_transform``). Each sample is
transformed with the global Python, NumPy and torch generators seeded from a hash of
(seed, epoch, index) and restored afterwards, so an image's augmentation is the same whatever
process, DataLoader worker or torchrun rank decodes it, and a resumed run sees exactly the
images an uninterrupted one would.
"""
from __future__ import annotations

import contextlib
import hashlib
import random
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from ..errors import ConfigError
from .datasets import ImageSamples, Sample
from .images import load_image

PRESETS: dict[str, dict[str, Any]] = {
    "light": {"scale": (0.5, 1.0), "ratio": (3 / 4, 4 / 3), "hflip": 0.5, "vflip": 0.0, "color_jitter": None},
    "strong": {"scale": (0.08, 1.0), "ratio": (3 / 4, 4 / 3), "hflip": 0.5, "vflip": 0.0, "color_jitter": 0.4},
}
OPTIONS = ("scale", "ratio", "hflip", "vflip", "color_jitter")
_HINT = f"use one of {', '.join(PRESETS)}, or a dict with keys from {', '.join(OPTIONS)}"


def augment_options(augment: str | dict | None) -> dict[str, Any] | None:
    """The timm training-transform options ``augment`` stands for (None: no augmentation); checks them."""
    if augment is None:
        return None
    if isinstance(augment, str):
        if augment not in PRESETS:
            raise ConfigError(f"RunConfig.augment: unknown preset {augment!r}", hint=_HINT)
        return dict(PRESETS[augment])
    if not isinstance(augment, dict):
        raise ConfigError(f"RunConfig.augment must be a preset name or a dict, got {type(augment).__name__}", hint=_HINT)
    unknown = sorted(set(augment) - set(OPTIONS))
    if unknown:
        raise ConfigError(f"RunConfig.augment: unknown option(s) {', '.join(map(str, unknown))}", hint=_HINT)
    options = {**PRESETS["light"], **augment}
    for name in ("scale", "ratio"):
        pair = options[name]
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(v, (int, float)) for v in pair)
                and 0 < pair[0] <= pair[1] and (name == "ratio" or pair[1] <= 1)):
            raise ConfigError(f"RunConfig.augment[{name!r}] must be (low, high) with 0 < low <= high"
                              f"{' <= 1' if name == 'scale' else ''}, got {pair!r}")
        options[name] = tuple(float(v) for v in pair)
    for name in ("hflip", "vflip"):
        if not (isinstance(options[name], (int, float)) and 0 <= options[name] <= 1):
            raise ConfigError(f"RunConfig.augment[{name!r}] must be a probability in [0, 1], got {options[name]!r}")
    jitter = options["color_jitter"]
    values = jitter if isinstance(jitter, (list, tuple)) else [jitter]
    if jitter is not None and not (len(values) in (1, 3, 4) and all(isinstance(v, (int, float)) and v >= 0 for v in values)):
        raise ConfigError(f"RunConfig.augment['color_jitter'] must be None, a factor >= 0 or 3-4 factors, got {jitter!r}")
    return options


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for one sample's random draws, a function of (seed, epoch, index) only."""
    digest = hashlib.blake2b(f"{seed}:{epoch}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def global_rng_state(*, cuda: bool = True) -> dict:
    """The states of Python's, NumPy's and torch's global generators (and CUDA's, when present
    and ``cuda``), as tensors and plain containers, so ``torch.load(weights_only=True)`` reads
    them back from a checkpoint."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached]}
    if cuda and torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_global_rng_state(state: dict) -> None:
    """Put back what :func:`global_rng_state` returned (CUDA's only where it was saved and is present)."""
    random.setstate(tuple(x if not isinstance(x, list) else tuple(x) for x in state["python"]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_globally(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextlib.contextmanager
def seeded_globally(seed: int) -> Iterator[None]:
    """Seed Python's, NumPy's and torch's global CPU generators, restoring their states on exit
    (timm's and torchvision's random transforms draw from them). CUDA's state is left alone:
    reading it would initialise CUDA inside DataLoader worker processes."""
    saved = global_rng_state(cuda=False)
    seed_globally(seed)
    try:
        yield
    finally:
        set_global_rng_state(saved)


class AugmentedSamples(ImageSamples):
    """``(transform(image), label)`` where the transform's random draws for sample ``index`` depend
    only on (``seed``, ``epoch``, ``index``): not on the generators' state, workers or ranks."""

    def __init__(self, samples: Sequence[Sample], transform: Callable, *, seed: int, epoch: int):
        super().__init__(samples, transform)
        self.seed, self.epoch = seed, epoch

    def __getitem__(self, index: int):
        sample = self.samples[index]
        image = load_image(sample.source)
        with seeded_globally(sample_seed(self.seed, self.epoch, index)):
            return self.transform(image), sample.label
