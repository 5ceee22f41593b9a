"""
Packing for stage 2 (and optionally stage 3): many samples in one row of seq_len tokens.

Design choices
- Attention stays inside each document: a row carries doc_ids (one id per sample, in row order) that the
  attention kernels compare, and position_ids that restart at 0 for every document, so a packed document
  sees exactly what it would see alone. The padding at a row's end is one more "document" (its own id, no
  loss), so no query row is ever fully masked.
- Targets are each sample's own next-token targets, concatenated: the last token of a document has no
  target (-100), so nothing learns to predict across a boundary.
- Best-fit decreasing: longest sample first, each into the open row with the least room that still fits it.
  Deterministic (ties by order), ~90%+ fill on mixed lengths. Which samples share a row does not change the
  gradient (attention is per document), so rows are packed once per epoch and only their order is shuffled.
- Over-long samples (> seq_len) are cut at seq_len, or just before the image run the cut would fall inside
  (an image's tokens are never split: its features come as one block); the cut keeps the target of the last
  kept token (it is the document's true next token). A sample with no trained token left is dropped. Both
  are counted (DataReport.truncated / .dropped).
"""
import bisect

from .datasets import Sample


def truncate(sample: Sample, seq_len: int):
    """`sample` cut to at most seq_len tokens without splitting an image run; None when nothing trainable is left."""
    if len(sample.ids) <= seq_len:
        return sample
    cut = seq_len
    for start, end in sample.image_spans:
        if start < cut < end:
            cut = start  # never keep part of an image's run
    keep = [k for k, (start, end) in enumerate(sample.image_spans) if end <= cut]
    targets = sample.targets[:cut]
    if cut == 0 or all(t == -100 for t in targets):
        return None
    return Sample(sample.ids[:cut], targets, [sample.images[k] for k in keep],
                  [sample.image_spans[k] for k in keep], [sample.image_tiles[k] for k in keep], sample.source)


def truncate_all(samples, seq_len, report=None) -> list:
    """truncate() over a list; dropped samples become None (indices stay stable); counts go to `report`."""
    out = []
    for sample in samples:
        cut = truncate(sample, seq_len)
        if report is not None and cut is None:
            report.dropped += 1
        elif report is not None and cut is not sample:
            report.truncated += 1
        out.append(cut)
    return out


def pack(lengths, seq_len) -> list:
    """Rows of indices into `lengths` (each <= seq_len), each row's total <= seq_len; best-fit decreasing."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])  # stable: ties keep their order
    rows = []
    free = []  # sorted (room left, row index) of rows that still have room
    for i in order:
        n = lengths[i]
        if n > seq_len:
            raise ValueError(f"sample {i} has {n} tokens > seq_len {seq_len}; truncate before packing")
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):
            room, row = free.pop(k)
        else:
            room, row = seq_len, len(rows)
            rows.append([])
        rows[row].append(i)
        if room - n > 0:
            bisect.insort(free, (room - n, row))
    return [sorted(row) for row in rows]


def packed_row(samples, seq_len, pad_id) -> dict:
    """One row of seq_len tokens from `samples` (lists): input_ids, targets, doc_ids, position_ids, images
    [(path, tiles, source)] in the order their runs appear."""
    ids, targets, doc_ids, positions, images = [], [], [], [], []
    for doc, s in enumerate(samples):
        ids += s.ids
        targets += s.targets
        doc_ids += [doc] * len(s.ids)
        positions += range(len(s.ids))
        images += [(path, tiles, s.source) for path, tiles in zip(s.images, s.image_tiles)]
    n_pad = seq_len - len(ids)
    if n_pad < 0:
        raise ValueError(f"row of {len(ids)} tokens exceeds seq_len {seq_len}")
    ids += [pad_id] * n_pad
    targets += [-100] * n_pad
    doc_ids += [len(samples)] * n_pad  # padding is its own document
    positions += range(n_pad)
    return {"input_ids": ids, "targets": targets, "doc_ids": doc_ids, "position_ids": positions, "images": images}
