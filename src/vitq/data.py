"""Classification image folders: layouts, labels, file lists, calibration subsets, loaders.

Layouts:
  * ``class folders``: ``DIR/<class>/*.jpg`` (the ImageNet val layout with synset folders, or any names);
  * ``flat``: ``DIR/n01440764_tench.JPEG`` (file names start with the WordNet synset; the shared sample).

Labels (:func:`resolve_labels`): ``imagenet``, the position of the synset in the sorted list of the 1000
ImageNet-1k synsets shipped in ``vitq/resources/imagenet_synsets.txt`` (the index timm's heads use);
``folders``, the position of the class folder among the sorted sub-folders of DIR (torchvision's
ImageFolder rule); a mapping file; or ``none`` (label -1: agreement and KL against a reference only).
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Callable, Iterable

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from .zoo import EvalTransform

IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png", ".bmp", ".webp"}


class DataError(ValueError):
    """A data problem (folder, list, image) with a message that names it."""


@lru_cache(maxsize=1)
def imagenet_synsets() -> tuple[str, ...]:
    """The 1000 ImageNet-1k synsets in class-index order."""
    text = resources.files("vitq.resources").joinpath("imagenet_synsets.txt").read_text()
    return tuple(line.strip() for line in text.splitlines() if line.strip())


@lru_cache(maxsize=1)
def _synset_index() -> dict[str, int]:
    return {s: i for i, s in enumerate(imagenet_synsets())}


LABEL_MODES = ("auto", "imagenet", "folders", "none")


def _class_of(rel: Path) -> str:
    """The class name of a file: its top folder, or (flat layout) its file-name prefix before ``_``."""
    return rel.parts[0] if len(rel.parts) > 1 else rel.name.split("_")[0].split(".")[0]


def _read_mapping(path: Path) -> dict[str, int]:
    """A class -> index mapping: JSON ``{"cat": 0, "dog": 1}``, or one class name per line (index = line)."""
    if not path.is_file():
        raise DataError(f"--labels: no such mode or mapping file: {path} (modes: {', '.join(LABEL_MODES)})")
    text = path.read_text()
    if path.suffix.lower() == ".json":
        import json

        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"label mapping {path} is not valid JSON: {exc}") from None
        if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool)
                                                 and v >= 0 for k, v in data.items()):
            raise DataError(f"label mapping {path} must map class names to non-negative integers")
        return data
    names = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    if len(set(names)) != len(names):
        raise DataError(f"label mapping {path} names a class twice")
    return {n: i for i, n in enumerate(names)}


def resolve_labels(root: str | Path, files: list[str], labels: str = "auto") -> tuple[list[int], str]:
    """The label of each file and the mode that gave them.

    Args:
        root: the image folder.
        files: paths relative to ``root``.
        labels: ``auto`` (``folders`` when every file is in a class folder and the folders are not all ImageNet
            synsets; else ``imagenet`` when every file has a synset, in its folder or its name), ``imagenet``,
            ``folders``, ``none``, or the path of a mapping file.

    Raises:
        DataError: naming the file whose class cannot be told, or the bad mapping.
    """
    root = Path(root)
    if labels == "none":
        return [-1] * len(files), "none"
    in_folders = all(len(Path(f).parts) > 1 for f in files)
    if labels == "auto" and in_folders and not all(Path(f).parts[0] in _synset_index() for f in files):
        labels = "folders"  # class folders not named by synsets: their own classes, whatever the file names
    if labels in ("auto", "imagenet"):
        index = _synset_index()
        out = [index.get(_class_of(Path(f)), index.get(Path(f).name.split("_")[0].split(".")[0], -2)) for f in files]
        if -2 not in out:
            return out, "imagenet"
        if labels == "imagenet":
            bad = files[out.index(-2)]
            raise DataError(f"cannot tell the class of {bad}: neither its folder nor its name starts with an ImageNet "
                            "synset (--labels folders for class folders of any name, or --labels none)")
    if labels in ("auto", "folders"):
        flat = [f for f in files if len(Path(f).parts) < 2]
        if flat:
            raise DataError(f"cannot tell the class of {flat[0]}: it is not in a class folder and its name has no "
                            "ImageNet synset (give --labels none to evaluate against the float model only)")
        classes = sorted(d.name for d in root.iterdir() if d.is_dir())
        position = {c: i for i, c in enumerate(classes)}
        return [position[Path(f).parts[0]] for f in files], "folders"
    mapping = _read_mapping(Path(labels))
    missing = sorted({_class_of(Path(f)) for f in files} - set(mapping))
    if missing:
        raise DataError(f"label mapping {labels} has no index for class(es) {', '.join(missing[:3])}")
    return [mapping[_class_of(Path(f))] for f in files], "mapping"


def scan_folder(root: str | Path) -> list[str]:
    """All image files under ``root`` (either layout), as sorted paths relative to ``root``."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data directory not found: {root}")
    files = sorted(
        str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
    )
    if not files:
        raise DataError(f"no images found in {root} (expected *.JPEG files, flat or in synset folders)")
    return files


def read_list(list_file: str | Path, root: str | Path) -> list[str]:
    """Read a file list (one relative path per line) and check every file exists under ``root``."""
    list_file, root = Path(list_file), Path(root)
    if not list_file.is_file():
        raise DataError(f"list file not found: {list_file}")
    names = [ln.strip() for ln in list_file.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    if not names:
        raise DataError(f"list file {list_file} names no images")
    seen: set[str] = set()
    dupes = sorted({n for n in names if n in seen or seen.add(n)})
    if dupes:  # a repeated image would count twice in every mean and standard error
        raise DataError(f"list file {list_file} names {len(dupes)} image(s) more than once: {', '.join(dupes[:3])}")
    absent = [n for n in names if not (root / n).is_file()]
    if absent:
        raise DataError(
            f"list file {list_file} names {len(absent)} file(s) missing from {root}, first: {', '.join(absent[:3])}"
        )
    return names


def calibration_subset(root: str | Path, n: int, seed: int, exclude: Iterable[str] = ()) -> list[str]:
    """A seeded random choice of ``n`` images under ``root`` that never overlaps ``exclude``.

    Used when no calibration list is given, so evaluation images cannot leak into calibration.
    """
    banned = set(exclude)
    pool = [f for f in scan_folder(root) if f not in banned]
    if len(pool) < n:
        raise DataError(f"only {len(pool)} images in {root} outside the evaluation set; {n} requested for calibration")
    return sorted(random.Random(seed).sample(pool, n))


def build_transform(t: EvalTransform) -> Callable:
    """timm's own eval transform for the given pinned settings (resize, center crop, normalize)."""
    from timm.data import create_transform

    return create_transform(
        input_size=t.input_size, is_training=False, interpolation=t.interpolation,
        mean=t.mean, std=t.std, crop_pct=t.crop_pct, crop_mode=t.crop_mode,
    )


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB from any PIL mode; 16-bit and 32-bit grey images are scaled, not clipped to white."""
    if img.mode.startswith("I;16") or img.mode == "I":
        import numpy as np

        a = np.asarray(img, dtype=np.float64)
        # PIL keeps 16-bit PNGs as I;16 (or I); their values run to 65535, which a plain convert clips
        scale = 255.0 / 65535.0 if img.mode.startswith("I;16") or a.max(initial=0) > 255 else 1.0
        img = Image.fromarray(np.clip(np.rint(a * scale), 0, 255).astype(np.uint8))
    elif img.mode == "F":
        import numpy as np

        a = np.asarray(img, dtype=np.float64)
        a = a * 255.0 if a.max(initial=0) <= 1.0 else a  # float images in [0, 1] or [0, 255]
        img = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8))
    return img.convert("RGB")


@dataclass
class BadImage:
    """An image that could not be read or transformed (returned, not raised, so the message leaves a
    DataLoader worker as one line)."""

    file: str
    error: str


class ImageNetFiles(Dataset):
    """Labelled images (:func:`resolve_labels`; -1: no label). ``__getitem__`` returns ``(tensor, label)``, or
    a :class:`BadImage` that the collate function sets aside and :class:`ImageLoader` raises or
    (``skip_bad_images``) skips."""

    def __init__(self, root: str | Path, files: list[str], transform: Callable, skip_bad_images: bool = False,
                 labels: str = "auto"):
        self.root = Path(root)
        self.files = list(files)
        if not self.files:
            raise DataError(f"empty dataset in {self.root}")
        self.labels, self.label_mode = resolve_labels(self.root, self.files, labels)
        self.transform = transform
        self.skip_bad_images = skip_bad_images
        self.skipped: list[str] = []  # files skipped in the last pass (filled in the main process)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        path = self.root / self.files[i]
        try:
            with Image.open(path) as img:
                return self.transform(to_rgb(img)), self.labels[i]
        except Exception as exc:  # any decoder or transform failure is this image's problem
            return BadImage(str(path), f"{type(exc).__name__}: {exc}".splitlines()[0])


@dataclass
class Batch:
    images: torch.Tensor
    labels: torch.Tensor
    n_bad: int = 0
    bad: list[BadImage] = field(default_factory=list)


def _collate(items) -> Batch:
    good = [it for it in items if not isinstance(it, BadImage)]
    bad = [it for it in items if isinstance(it, BadImage)]
    if not good:
        return Batch(torch.empty(0), torch.empty(0, dtype=torch.long), len(bad), bad)
    return Batch(torch.stack([g[0] for g in good]), torch.tensor([g[1] for g in good]), len(bad), bad)


class ImageLoader:
    """A DataLoader over :class:`ImageNetFiles` that raises a bad image's error in the main process, as one
    line, or (with ``skip_bad_images``) records it in ``dataset.skipped`` and goes on."""

    def __init__(self, dataset: ImageNetFiles, loader: DataLoader):
        self.dataset, self.loader = dataset, loader

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        self.dataset.skipped = []
        for b in self.loader:
            for bad in b.bad:
                if not self.dataset.skip_bad_images:
                    raise DataError(f"cannot read image {bad.file}: {bad.error} "
                                    "(use --skip-bad-images to skip such files)")
                self.dataset.skipped.append(bad.file)
            yield b


def make_dataset(
    root: str | Path, transform: EvalTransform, list_file: str | Path | None = None,
    limit: int | None = None, skip_bad_images: bool = False, files: list[str] | None = None,
    labels: str = "auto",
) -> ImageNetFiles:
    """Dataset over ``root`` (both layouts): the given ``files``, or those of ``list_file``, or all images;
    then the first ``limit`` of them, labelled as ``labels`` says (:func:`resolve_labels`)."""
    if files is None:
        files = read_list(list_file, root) if list_file else scan_folder(root)
    if limit is not None:
        if limit <= 0:
            raise DataError(f"--limit must be positive, got {limit}")
        files = files[:limit]
    return ImageNetFiles(root, files, build_transform(transform), skip_bad_images, labels)


def make_loader(dataset: ImageNetFiles, batch_size: int = 32, workers: int = 2) -> ImageLoader:
    """Ordered, batched loading with worker processes; yields :class:`Batch`."""
    if batch_size <= 0:
        raise DataError(f"--batch-size must be positive, got {batch_size}")
    if workers < 0:
        raise DataError(f"--workers must be 0 or more, got {workers}")
    return ImageLoader(dataset, DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=workers, collate_fn=_collate,
        persistent_workers=False,
    ))


def load_tensors(dataset: ImageNetFiles, batch_size: int = 32, workers: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode a (small) dataset fully into memory: calibration sets are reused many times."""
    images, labels = [], []
    for b in make_loader(dataset, batch_size, workers):
        if b.images.numel():
            images.append(b.images)
            labels.append(b.labels)
    if not images:
        raise DataError(f"no readable images in {dataset.root}")
    return torch.cat(images), torch.cat(labels)
