"""Data of REKD: the built-in seeded tasks with gold rationales, user files (validated up front), tokenisation.

Built-in text task (binary sentiment). A review is 6-20 neutral filler words into which we insert, at random
positions, k in {1, 2} *cues* (a sentiment word of the label's polarity, not negated: "great" for positive,
"awful" for negative) and m in {0, 1} (independent of k) *look-alike distractors* (a negator followed by a
word of the opposite polarity: "not awful" in a positive review, "never great" in a negative one), plus 0-1
neutral negations ("not the"). Counting positive vs negative words (the best bag-of-words rule) is a coin toss
on the reviews with k = m = 1 (1/4 of them): the label is fixed by which sentiment words are *not* negated, i.e.
by context, and a selector that keeps every sentiment word has rationale precision 1/2 to 2/3 on the reviews
with a distractor. (With m up to 2, which makes counting right on only 2/3 of the reviews, our tiny from-scratch
encoders did not learn the negation context within a CPU budget.) Gold rationale = the k cue words (the
smallest subset that fixes the label to a reader who knows the selection convention; "not awful" needs two).

Built-in image task: a grayscale image is a grid of patch_size x patch_size patches, every patch a random binary
pattern (density 1/2) plus Gaussian noise; one or two patches (at random places) carry the class's hidden
pattern instead. Gold rationale = those patches. Per-pixel statistics are the same in every class.

User data. Text: JSONL (one object per line) or CSV (header row) with `text`, `label` (int or string) and optional
`rationale` (list of 0-based whitespace-word indices; in CSV a JSON list or space-separated ints). Images: an .npz
with `images` (N,H,W), (N,H,W,C) or (N,C,H,W), `labels` (N,) and optional `rationale` (N, num_patches) 0/1; or a
folder `root/<class>/<file>.png`. Every problem is reported as DataError with the file and line (or index).
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch


class DataError(ValueError):
    """A bad user data file: the message names the file and the line (or example index)."""


POSITIVE = ["good", "great", "excellent", "superb", "wonderful", "brilliant", "delightful", "charming"]
NEGATIVE = ["bad", "awful", "terrible", "poor", "boring", "dreadful", "weak", "dull"]
NEGATORS = ["not", "never", "hardly"]
FILLER = (
    "the movie film plot actor actress story was is and a with scenes director music ending this it of in its "
    "characters script camera dialogue i we saw watched last night theater cast running time two hours some moments "
    "felt seemed quite very rather overall sequel book version scene score lighting editing pace costumes set "
    "audience critics friend weekend screen minutes opening final act hero villain city summer"
).split()
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[MASK]"]


@dataclass
class TextData:
    """Texts as whitespace words, integer labels, optional gold rationales (word index sets)."""

    words: list[list[str]]
    labels: list[int]
    gold: list[set[int]] | None
    label_names: list[str]


@dataclass
class ImageData:
    """Images [N,C,H,W] float32, labels [N] int64, optional gold patch masks [N,P] bool."""

    images: torch.Tensor
    labels: torch.Tensor
    gold: torch.Tensor | None
    label_names: list[str]


# ----------------------------------------------------------------------------------------------------------------
# built-in tasks


def make_text_task(n: int, seed: int, max_distractors: int = 1) -> TextData:
    """n seeded reviews (labels balanced at random) with their gold cue positions."""
    rng = np.random.default_rng(seed)
    words_all, labels, gold = [], [], []
    for _ in range(n):
        y = int(rng.integers(2))
        k = int(rng.integers(1, 3))
        same, other = (POSITIVE, NEGATIVE) if y == 1 else (NEGATIVE, POSITIVE)
        units: list[tuple[list[str], bool]] = [([str(w)], False) for w in rng.choice(FILLER, rng.integers(6, 21))]
        inserts = [([str(rng.choice(same))], True) for _ in range(k)]
        m = int(rng.integers(0, max_distractors + 1))
        inserts += [([str(rng.choice(NEGATORS)), str(rng.choice(other))], False) for _ in range(m)]
        inserts += [([str(rng.choice(NEGATORS)), str(rng.choice(FILLER))], False) for _ in range(rng.integers(0, 2))]
        for ins in inserts:
            pos = int(rng.integers(len(units) + 1))
            units.insert(pos, ins)
        words, g = [], set()
        for unit, is_cue in units:
            if is_cue:
                g.add(len(words))
            words.extend(unit)
        words_all.append(words)
        labels.append(y)
        gold.append(g)
    return TextData(words_all, labels, gold, ["negative", "positive"])


def image_templates(num_classes: int, patch_size: int, seed: int = 1234) -> np.ndarray:
    """The hidden binary pattern of each class, [num_classes, p, p] (fixed by `seed`, shared by all splits)."""
    rng = np.random.default_rng(seed)
    return (rng.random((num_classes, patch_size, patch_size)) < 0.5).astype(np.float32)


def make_image_task(
    n: int, seed: int, *, image_size: int = 32, patch_size: int = 8, num_classes: int = 4, noise: float = 0.3
) -> ImageData:
    """n seeded images [n,1,S,S]: random binary patches plus noise, 1-2 patches showing the class pattern."""
    rng = np.random.default_rng(seed)
    templates = image_templates(num_classes, patch_size)
    g = image_size // patch_size
    num_patches = g * g
    patches = (rng.random((n, num_patches, patch_size, patch_size)) < 0.5).astype(np.float32)
    labels = rng.integers(num_classes, size=n)
    gold = np.zeros((n, num_patches), dtype=bool)
    for i in range(n):
        k = int(rng.integers(1, 3))
        where = rng.choice(num_patches, size=k, replace=False)
        patches[i, where] = templates[labels[i]]
        gold[i, where] = True
    patches += noise * rng.standard_normal(patches.shape).astype(np.float32)
    # (n, g*g, p, p) -> (n, g, g, p, p) -> (n, g, p, g, p) -> (n, 1, S, S)
    img = (
        patches.reshape(n, g, g, patch_size, patch_size).transpose(0, 1, 3, 2, 4).reshape(n, 1, image_size, image_size)
    )
    names = [f"pattern{c}" for c in range(num_classes)]
    return ImageData(torch.from_numpy(img.copy()), torch.from_numpy(labels).long(), torch.from_numpy(gold), names)


# ----------------------------------------------------------------------------------------------------------------
# user files: text


def _parse_rationale(value, where: str, n_words: int) -> set[int]:
    if isinstance(value, str):
        value = value.strip()
        if value.startswith("["):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: rationale is not a JSON list: {e}") from None
        else:
            try:
                value = [int(t) for t in value.replace(",", " ").split()]
            except ValueError:
                raise DataError(f"{where}: rationale must be word indices, got {value!r}") from None
    if not isinstance(value, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in value):
        raise DataError(f"{where}: rationale must be a list of integer word indices, got {value!r}")
    bad = [i for i in value if not 0 <= i < n_words]
    if bad:
        raise DataError(f"{where}: rationale indices {bad} out of range for a text of {n_words} words")
    return set(value)


def load_text_file(path: str | Path, label_names: list[str] | None = None) -> TextData:
    """A JSONL or CSV file of texts; label_names (from the train file) fixes the label order of a test file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    rows: list[tuple[str, dict]] = []
    if path.suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{i}: not valid JSON: {e.msg}") from None
                if not isinstance(obj, dict):
                    raise DataError(f"{path}:{i}: expected a JSON object, got {type(obj).__name__}")
                rows.append((f"{path}:{i}", obj))
    elif path.suffix == ".csv":
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None or not {"text", "label"} <= set(reader.fieldnames):
                raise DataError(
                    f"{path}:1: the CSV header must name columns 'text' and 'label', got {reader.fieldnames}"
                )
            for obj in reader:
                rows.append((f"{path}:{reader.line_num}", {k: v for k, v in obj.items() if v not in (None, "")}))
    else:
        raise DataError(f"{path}: text data must be .jsonl or .csv")
    if not rows:
        raise DataError(f"{path}: no examples")
    words_all, raw_labels, gold, any_gold = [], [], [], False
    for where, obj in rows:
        for key in ("text", "label"):
            if key not in obj:
                raise DataError(f"{where}: missing field {key!r}")
        text = obj["text"]
        if not isinstance(text, str) or not text.split():
            raise DataError(f"{where}: 'text' must be a non-empty string, got {text!r}")
        words = text.split()
        label = obj["label"]
        if isinstance(label, bool) or not isinstance(label, (int, str)):
            raise DataError(f"{where}: 'label' must be an int or a string, got {label!r}")
        if isinstance(label, str) and label.strip().lstrip("-").isdigit():
            label = int(label)
        words_all.append(words)
        raw_labels.append((where, label))
        if "rationale" in obj:
            any_gold = True
            gold.append(_parse_rationale(obj["rationale"], where, len(words)))
        else:
            gold.append(None)
    if label_names is None:
        kinds = {type(lab) for _, lab in raw_labels}
        if len(kinds) > 1:
            raise DataError(f"{path}: labels mix integers and strings")
        label_names = [str(v) for v in sorted({lab for _, lab in raw_labels})]
        if len(label_names) < 2:
            raise DataError(f"{path}: needs at least 2 distinct labels, got {label_names}")
    index = {name: i for i, name in enumerate(label_names)}
    labels = []
    for where, lab in raw_labels:
        if str(lab) not in index:
            raise DataError(f"{where}: label {lab!r} is not one of the training labels {label_names}")
        labels.append(index[str(lab)])
    if any_gold and any(g is None for g in gold):
        where = rows[[g is None for g in gold].index(True)][0]
        raise DataError(f"{where}: 'rationale' is missing here but given on other lines (give it on all or none)")
    return TextData(words_all, labels, gold if any_gold else None, label_names)


# ----------------------------------------------------------------------------------------------------------------
# user files: images


def _to_nchw(images: np.ndarray, where: str) -> np.ndarray:
    if images.ndim == 3:
        images = images[:, None]
    elif images.ndim == 4:
        if images.shape[-1] in (1, 3) and images.shape[1] not in (1, 3):
            images = images.transpose(0, 3, 1, 2)
    else:
        raise DataError(f"{where}: 'images' must be (N,H,W), (N,H,W,C) or (N,C,H,W), got shape {images.shape}")
    images = images.astype(np.float32)
    if images.max(initial=0) > 1.5:  # 0-255 pixels
        images = images / 255.0
    return images


def load_image_file(path: str | Path, patch_size: int, label_names: list[str] | None = None) -> ImageData:
    """An .npz file or a class-per-folder directory of images; checks shapes, labels and rationale masks."""
    path = Path(path)
    if path.is_dir():
        from PIL import Image

        classes = sorted(p.name for p in path.iterdir() if p.is_dir())
        if label_names is None:
            label_names = classes
        if len(label_names) < 2:
            raise DataError(f"{path}: an image folder needs >= 2 class sub-folders, got {classes}")
        imgs, labels = [], []
        for c in classes:
            if c not in label_names:
                raise DataError(f"{path / c}: class {c!r} is not one of the training classes {label_names}")
            for f in sorted((path / c).iterdir()):
                try:
                    arr = np.asarray(Image.open(f))
                except Exception as e:  # noqa: BLE001 - PIL raises many kinds
                    raise DataError(f"{f}: not a readable image: {e}") from None
                if imgs and arr.shape != imgs[0][1].shape:
                    raise DataError(f"{f}: shape {arr.shape} differs from {imgs[0][0]}: {imgs[0][1].shape}")
                imgs.append((f, arr))
                labels.append(label_names.index(c))
        if not imgs:
            raise DataError(f"{path}: no images found")
        images = _to_nchw(np.stack([a for _, a in imgs]), str(path))
        gold = None
    elif path.suffix == ".npz":
        try:
            z = np.load(path, allow_pickle=False)
        except Exception as e:  # noqa: BLE001
            raise DataError(f"{path}: not a readable .npz: {e}") from None
        for key in ("images", "labels"):
            if key not in z:
                raise DataError(f"{path}: missing array {key!r} (has {sorted(z.files)})")
        images = _to_nchw(np.asarray(z["images"]), f"{path}")
        labels_raw = np.asarray(z["labels"])
        if labels_raw.shape != (images.shape[0],):
            raise DataError(f"{path}: 'labels' must have shape ({images.shape[0]},), got {labels_raw.shape}")
        if not np.issubdtype(labels_raw.dtype, np.integer):
            raise DataError(f"{path}: 'labels' must be integers, got {labels_raw.dtype}")
        if labels_raw.min() < 0:
            i = int(np.argmin(labels_raw))
            raise DataError(f"{path}: labels[{i}] = {labels_raw[i]} is negative")
        if label_names is None:
            label_names = [str(c) for c in range(int(labels_raw.max()) + 1)]
        if labels_raw.max() >= len(label_names):
            i = int(np.argmax(labels_raw))
            raise DataError(f"{path}: labels[{i}] = {labels_raw[i]} is not a training class (< {len(label_names)})")
        labels = labels_raw.tolist()
        gold = None
        h, w = images.shape[2:]
        if h % patch_size or w % patch_size:
            raise DataError(f"{path}: image size {h}x{w} is not a multiple of data.patch_size={patch_size}")
        if "rationale" in z:
            r = np.asarray(z["rationale"])
            num_patches = (h // patch_size) * (w // patch_size)
            if r.shape != (images.shape[0], num_patches):
                raise DataError(
                    f"{path}: 'rationale' must have shape ({images.shape[0]}, {num_patches}), got {r.shape}"
                )
            bad = np.argwhere((r != 0) & (r != 1))
            if len(bad):
                raise DataError(f"{path}: rationale[{bad[0][0]}] holds {r[tuple(bad[0])]}; must be 0/1")
            gold = torch.from_numpy(r.astype(bool))
    else:
        raise DataError(f"{path}: image data must be an .npz file or a folder of class folders")
    if not np.isfinite(images).all():
        i = int(np.argwhere(~np.isfinite(images.reshape(len(images), -1)).all(1))[0][0])
        raise DataError(f"{path}: images[{i}] holds NaN or inf")
    h, w = images.shape[2:]
    if h != w or h % patch_size:
        raise DataError(f"{path}: images must be square with a side that is a multiple of {patch_size}, got {h}x{w}")
    return ImageData(torch.from_numpy(images), torch.tensor(labels, dtype=torch.long), gold, label_names)


# ----------------------------------------------------------------------------------------------------------------
# tokenisation (text)


def build_word_tokenizer(texts: list[list[str]]):
    """A word-level fast tokenizer (`tokenizers` WordLevel, whitespace split, "[CLS] $A") over the given words.

    One token per word, so token i+1 is word i; unknown words map to [UNK].
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS)}
    for words in texts:
        for w in words:
            if w not in vocab:
                vocab[w] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A", special_tokens=[("[CLS]", vocab["[CLS]"])])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", mask_token="[MASK]"
    )


def encode_texts(tokenizer, data: TextData, max_tokens: int) -> dict[str, torch.Tensor]:
    """Token tensors of a TextData: input_ids, attention_mask, word_index (-1 = special/pad) [N,T];
    labels [N]; n_words [N] (words kept after truncation); gold [N,W] bool (absent without gold)."""
    if tokenizer.mask_token_id is None:
        raise DataError("the tokenizer has no mask token: [MASK] replacement needs one")
    enc = tokenizer(
        data.words, is_split_into_words=True, truncation=True, max_length=max_tokens, padding=True, return_tensors="pt"
    )
    n, t = enc["input_ids"].shape
    word_index = torch.full((n, t), -1, dtype=torch.long)
    for i in range(n):
        ids = enc.word_ids(i)
        word_index[i] = torch.tensor([-1 if w is None else w for w in ids])
    n_words = word_index.max(1).values + 1
    out = {
        "input_ids": enc["input_ids"],
        "attention_mask": enc["attention_mask"],
        "word_index": word_index,
        "labels": torch.tensor(data.labels, dtype=torch.long),
        "n_words": n_words,
    }
    if data.gold is not None:
        w = int(n_words.max())
        gold = torch.zeros(n, w, dtype=torch.bool)
        for i, g in enumerate(data.gold):
            for j in g:
                if j < n_words[i]:
                    gold[i, j] = True
        out["gold"] = gold
    return out


def encode_images(data: ImageData) -> dict[str, torch.Tensor]:
    out = {"pixel_values": data.images, "labels": data.labels}
    if data.gold is not None:
        out["gold"] = data.gold
    return out
