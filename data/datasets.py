"""
Stage data sets: JSONL records -> Samples (token ids, next-token targets with -100, the images they show).

Design choices
- One reader for every stage: a JSONL file (one record per line; image paths relative to that file, or
  absolute) or a mixture JSON `{"datasets": [{"path": "a.jsonl", "weight": 1.0}, ...]}`. A record becomes a
  Sample once, when the data set is loaded: tokenised, its images' headers read (to count tiles) and its
  targets made. The loader then only decodes pixels.
- Stage 1 (alignment), LLaVA's "plain" template: `[image tokens] caption <|endoftext|>`, loss on the caption
  and the <|endoftext|>. `{"image", "caption"}` and LLaVA-Med's alignment layout (caption = the gpt turn;
  the human turn's text is ignored, as LLaVA's plain template ignores it) are read.
- Stage 2 (mid-training): `{"text"}` or interleaved `{"content": [{"type": "text"|"image", ...}]}` ->
  `text-and-image tokens <|endoftext|>`, loss on every text token and the <|endoftext|>, never on (or
  towards) image tokens: the token before an image has no target.
- Stage 3 (instructions): LLaVA conversations rendered in harmony (data.harmony); loss on the assistant output.
  LLaVA roles: human/user -> user, gpt/assistant -> assistant, system/developer -> a developer message
  ("# Instructions\n\n..."). A gpt turn's optional "thinking" goes to the analysis channel.
- Each image is (tiles x tokens_per_tile) image-token ids; tiles from vision.num_tiles when max_tiles > 1.
- Bad input (malformed JSON, missing or unreadable image, empty conversation, unknown role, placeholders
  without images, ...) raises DataError "file:line: reason" by default; with skip_bad=True the record is
  skipped and counted in a DataReport whose summary lists every skipped line. Never silent.
"""
import json
import os
from dataclasses import dataclass, field

from PIL import Image

import vision

from .harmony import IMAGE_PLACEHOLDER, RenderError, developer_text, render_conversation, targets_from_mask
from .tokenizer import ENDOFTEXT, IMAGE_TOKEN_ID, encode_ordinary

@dataclass
class Sample:
    ids: list                    # token ids (image placeholders expanded to image-token runs)
    targets: list                # targets[t] follows ids[t]; -100 = no loss
    images: list                 # image paths, in the order of their runs in ids
    image_spans: list            # (start, end) of each image's run
    image_tiles: list            # tiles per image (the run is tiles * tokens_per_tile long)
    source: str = ""             # "file.jsonl:line", for error messages

    def __len__(self):
        return len(self.ids)


@dataclass
class ImageTokens:
    """How images become tokens: the model's tiling and feature count, and the placeholder id."""
    max_tiles: int = 1
    image_size: int = 336
    tokens_per_tile: int = 576       # (image_size // patch) ** 2 with the 'default' feature strategy
    image_token_id: int = IMAGE_TOKEN_ID
    verify: bool = False             # decode every image fully at load time (catches truncated files)

    def tiles(self, path) -> int:
        """Tiles of the image at `path`; raises BadRecord when it is missing or unreadable."""
        if not os.path.isfile(path):
            raise BadRecord(f"image not found: {path}")
        try:
            with Image.open(path) as image:
                if self.verify:
                    image.load()
                width, height = image.size
        except Exception as e:
            raise BadRecord(f"cannot read image {path}: {type(e).__name__}: {e}") from None
        if self.max_tiles == 1:
            return 1
        return vision.num_tiles(width, height, self.max_tiles, self.image_size)


class BadRecord(ValueError):
    """A record that cannot become a sample; the reader adds file and line."""


class DataError(ValueError):
    """Bad input, located: '<file>:<line>: <reason>'."""


@dataclass
class DataReport:
    skipped: list = field(default_factory=list)   # (file, line, reason) of each skipped record
    samples: int = 0
    truncated: int = 0                            # over-long samples cut to seq_len (packing.truncate)
    dropped: int = 0                              # over-long samples that could not be cut safely

    def summary(self, limit=20) -> str:
        lines = [f"{self.samples} samples read, {len(self.skipped)} records skipped, "
                 f"{self.truncated} truncated, {self.dropped} dropped as too long"]
        reasons = {}
        for _, _, reason in self.skipped:
            kind = reason.split(":")[0]
            reasons[kind] = reasons.get(kind, 0) + 1
        lines += [f"  skipped {n} x {kind}" for kind, n in sorted(reasons.items())]
        lines += [f"  {file}:{line}: {reason}" for file, line, reason in self.skipped[:limit]]
        if len(self.skipped) > limit:
            lines.append(f"  ... and {len(self.skipped) - limit} more")
        return "\n".join(lines)


@dataclass
class Dataset:
    samples: list                                 # Sample, all parts concatenated
    parts: list                                   # (path, first sample, end sample, weight) per JSONL file
    report: DataReport

# ----------------------------------------------------------------------------------------------------------
# reading


def read_jsonl(path, report, skip_bad):
    """Yields (line number, record dict); a malformed line raises DataError or, with skip_bad, is reported."""
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue  # blank lines (a trailing newline) are not records
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                bad(report, skip_bad, path, line_no, f"malformed JSON: {e.msg} at column {e.colno}")
                continue
            if not isinstance(record, dict):
                bad(report, skip_bad, path, line_no, f"malformed JSON: expected an object, got {type(record).__name__}")
                continue
            yield line_no, record


def bad(report, skip_bad, path, line_no, reason):
    if not skip_bad:
        raise DataError(f"{path}:{line_no}: {reason} (fix the record, or pass --skip_bad (skip_bad=True) to skip "
                        "bad records and list them in the summary)")
    report.skipped.append((str(path), line_no, reason))


def image_paths(value, base_dir) -> list:
    if value is None:
        return []
    paths = [value] if isinstance(value, str) else value
    if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
        raise BadRecord(f"'image' must be a path or a list of paths, got {value!r}")
    return [p if os.path.isabs(p) else os.path.join(base_dir, p) for p in paths]

# ----------------------------------------------------------------------------------------------------------
# records -> samples


class _Builder:
    """Appends text and image runs with a per-token loss flag, then makes the Sample."""

    def __init__(self, tok, image_tokens):
        self.tok, self.spec = tok, image_tokens
        self.ids, self.loss, self.images, self.spans, self.tiles = [], [], [], [], []

    def text(self, text, loss=True):
        ids = encode_ordinary(self.tok, text)
        self.ids += ids
        self.loss += [loss] * len(ids)

    def image(self, path):
        n_tiles = self.spec.tiles(path)
        n = n_tiles * self.spec.tokens_per_tile
        self.spans.append((len(self.ids), len(self.ids) + n))
        self.images.append(path)
        self.tiles.append(n_tiles)
        self.ids += [self.spec.image_token_id] * n
        self.loss += [False] * n

    def end_of_text(self):
        self.ids.append(ENDOFTEXT)
        self.loss.append(True)

    def sample(self, source):
        return Sample(self.ids, targets_from_mask(self.ids, self.loss), self.images, self.spans, self.tiles, source)


def caption_sample(record, base_dir, tok, spec, source) -> Sample:
    """Stage 1: {"image", "caption"} or LLaVA-Med alignment {"image", "conversations": [human, gpt]}."""
    if "caption" in record:
        caption = record["caption"]
    elif "conversations" in record:
        turns = record["conversations"]
        answers = [t.get("value") for t in turns if isinstance(t, dict) and t.get("from") in ("gpt", "assistant")] \
            if isinstance(turns, list) else []
        if not answers:
            raise BadRecord("empty conversation: no gpt turn holds a caption")
        caption = answers[0]
    else:
        raise BadRecord("a stage-1 record needs 'caption' or 'conversations'")
    if not isinstance(caption, str) or not caption.strip():
        raise BadRecord("empty caption")
    images = image_paths(record.get("image"), base_dir)
    if len(images) != 1:
        raise BadRecord(f"a stage-1 record needs exactly one image, got {len(images)}")
    b = _Builder(tok, spec)
    b.image(images[0])
    b.text(caption.replace(IMAGE_PLACEHOLDER, "").strip())
    b.end_of_text()
    return b.sample(source)


def document_sample(record, base_dir, tok, spec, source) -> Sample:
    """Stage 2: {"text"} or {"content": [{"type": "text", "text"}, {"type": "image", "image"}, ...]}."""
    b = _Builder(tok, spec)
    if "text" in record:
        if not isinstance(record["text"], str) or not record["text"].strip():
            raise BadRecord("empty document: 'text' is empty")
        b.text(record["text"])
    elif "content" in record:
        parts = record["content"]
        if not isinstance(parts, list) or not parts:
            raise BadRecord("empty document: 'content' must be a non-empty list")
        for i, part in enumerate(parts):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                b.text(part["text"])
            elif kind == "image":
                if not isinstance(part.get("image"), str):
                    raise BadRecord(f"content[{i}]: image part without an 'image' path")
                b.image(image_paths(part["image"], base_dir)[0])
            else:
                raise BadRecord(f"content[{i}]: expected {{'type': 'text', 'text': ...}} or "
                                f"{{'type': 'image', 'image': ...}}, got {part!r:.80}")
        if not any(b.loss):
            raise BadRecord("empty document: no text")
    else:
        raise BadRecord("a stage-2 record needs 'text' or 'content'")
    b.end_of_text()
    return b.sample(source)


LLAVA_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
               "system": "developer", "developer": "developer"}


def llava_messages(record, system_prompt=None) -> list:
    """LLaVA `conversations` -> harmony messages (see the module docstring for the role mapping)."""
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise BadRecord("empty conversation: 'conversations' must be a non-empty list")
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise BadRecord(f"conversations[{i}] is not an object")
        speaker, value = turn.get("from"), turn.get("value")
        if speaker not in LLAVA_ROLES:
            raise BadRecord(f"unknown role: conversations[{i}] is from {speaker!r}; expected one of {sorted(LLAVA_ROLES)}")
        if not isinstance(value, str):
            raise BadRecord(f"conversations[{i}]: 'value' must be a string")
        role = LLAVA_ROLES[speaker]
        message = {"role": role, "content": developer_text(value) if role == "developer" else value}
        if turn.get("thinking") is not None:
            if role != "assistant":
                raise BadRecord(f"conversations[{i}]: only gpt turns may carry 'thinking'")
            message["thinking"] = turn["thinking"]
        messages.append(message)
    if not any(m["role"] == "assistant" for m in messages):
        raise BadRecord("empty conversation: no gpt turn to learn from")
    return messages


def conversation_sample(record, base_dir, tok, spec, source, system_prompt=None) -> Sample:
    """Stage 3: a LLaVA conversation rendered in harmony; loss on the assistant's output."""
    messages = llava_messages(record, system_prompt)
    images = image_paths(record.get("image"), base_dir)
    n_placeholders = sum(m["content"].count(IMAGE_PLACEHOLDER) for m in messages)
    if n_placeholders > len(images):
        raise BadRecord(f"more <image> placeholders than images: {n_placeholders} placeholders, {len(images)} images")
    if n_placeholders < len(images):
        raise BadRecord(f"{len(images)} images but only {n_placeholders} <image> placeholders")
    tiles = [spec.tiles(path) for path in images]
    try:
        r = render_conversation(tok, messages, [n * spec.tokens_per_tile for n in tiles], spec.image_token_id)
    except RenderError as e:
        raise BadRecord(str(e)) from None
    return Sample(r.ids, targets_from_mask(r.ids, r.loss_mask), images, r.image_spans, tiles, source)


def load_jsonl(path, read_record, tok, image_tokens=None, *, skip_bad=False, report=None) -> list:
    """Samples of one JSONL file, each record made by `read_record` (caption_sample for stage 1, document_sample
    for stage 2, conversation_sample for stage 3). Bad records raise DataError, or with skip_bad go to `report`."""
    spec = image_tokens or ImageTokens()
    report = report if report is not None else DataReport()
    base_dir = os.path.dirname(os.path.abspath(path))
    samples = []
    for line_no, record in read_jsonl(path, report, skip_bad):
        try:
            samples.append(read_record(record, base_dir, tok, spec, f"{path}:{line_no}"))
        except BadRecord as e:
            bad(report, skip_bad, path, line_no, str(e))
    report.samples += len(samples)
    return samples


def read_mixture(path) -> list:
    """[(jsonl path, weight)] of a mixture JSON, paths resolved against the JSON's folder."""
    try:
        with open(path, encoding="utf-8") as f:
            spec = json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: malformed JSON: {e.msg}") from None
    entries = spec.get("datasets") if isinstance(spec, dict) else None
    if not isinstance(entries, list) or not entries:
        raise DataError(f"{path}: a mixture is {{\"datasets\": [{{\"path\": \"a.jsonl\", \"weight\": 1.0}}, ...]}}")
    base_dir = os.path.dirname(os.path.abspath(path))
    out = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
            raise DataError(f"{path}: datasets[{i}] needs a 'path'")
        weight = entry.get("weight", 1.0)
        if not isinstance(weight, (int, float)) or weight < 0:
            raise DataError(f"{path}: datasets[{i}]: weight must be a number >= 0, got {weight!r}")
        p = entry["path"]
        out.append((p if os.path.isabs(p) else os.path.join(base_dir, p), float(weight)))
    return out


def load_dataset(path, read_record, tok, image_tokens=None, *, skip_bad=False) -> Dataset:
    """A stage's data set from a JSONL file (weight 1) or a mixture JSON; `read_record` as in load_jsonl."""
    path = str(path)
    files = read_mixture(path) if path.endswith(".json") else [(path, 1.0)]
    report, samples, parts = DataReport(), [], []
    for file, weight in files:
        start = len(samples)
        samples += load_jsonl(file, read_record, tok, image_tokens, skip_bad=skip_bad, report=report)
        parts.append((file, start, len(samples), weight))
    return Dataset(samples, parts, report)
