"""
The training data loader: deterministic batches from (seed, step), the same global batch on any number of
processes, images decoded in background workers, resumable.

Design choices
- The data is an endless stream of rows, epoch after epoch. Epoch e is drawn from (seed, e) alone: each
  mixture part contributes its samples `weight` times (weight 2: every sample twice; 0.5: a random half,
  redrawn every epoch), then (with packing) the drawn samples are packed into rows of seq_len, then the rows
  are shuffled. Global step s is rows [s*G, (s+1)*G) of that stream, G = global_batch_size rows.
- Rank r of W takes rows [r*G/W, (r+1)*G/W) of the global batch and splits them into micro-batches of
  micro_batch_size rows (gradient accumulation = G / (W * micro_batch_size)). Nothing depends on W, so the
  run sees the same global batches on 1 or 8 processes.
- A batch is the dict of docs/internals.md: input_ids, targets (B, T) long; pixel_values (N_tiles, 3, S, S)
  or None, in the order the image runs appear, row-major; doc_ids, position_ids (B, T) with packing, else
  None and rows right-padded to the longest in the micro-batch (padding: <|endoftext|>, target -100).
- Images are decoded and preprocessed (vision.image_to_tiles) by a pool of workers, `prefetch` steps ahead.
  Threads by default: Pillow and torch release the GIL in decode/resize/normalise, and threads hand back
  tensors without pickling (measured in docs/data.md); processes are an option.
- state_dict() is {step, seed, global_batch_size, fingerprint of the data}; load_state_dict() continues at
  exactly the next batch, and refuses a different data set, seed or global batch size.
"""
import argparse
import hashlib
import json
import os
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image

import vision

from .datasets import DataError, DataReport, ImageTokens, conversation_sample, load_dataset
from .packing import pack, packed_row, truncate_all
from .tokenizer import ENDOFTEXT, load_tokenizer


def load_tiles(path, max_tiles, image_size, preprocessing=None) -> torch.Tensor:
    """Decode and preprocess one image -> (n_tiles, 3, S, S). Runs in a worker (thread or process).
    preprocessing: the vision tower's (vision.Preprocessing); None is CLIP's at image_size."""
    with Image.open(path) as image:
        return vision.image_to_tiles(image, max_tiles=max_tiles, size=image_size, preprocessing=preprocessing)


def epoch_members(parts, kept, seed, epoch) -> list:
    """Sample indices that make epoch `epoch`: each part's kept samples, `weight` times (fractions drawn)."""
    rng = np.random.default_rng([seed, epoch, 0])
    members = []
    for _, start, end, weight in parts:
        indices = [i for i in range(start, end) if kept[i]]
        whole, fraction = int(weight), weight - int(weight)
        members += indices * whole
        n_extra = round(fraction * len(indices))
        if n_extra:
            members += sorted(rng.choice(indices, size=n_extra, replace=False).tolist())
    return members


class DataLoader:
    """This rank's micro-batches for each global step of one data set (see the module docstring).

    dataset: data.datasets.Dataset. seq_len: the row length (packing) or the cut for over-long samples.
    global_batch_size: rows per optimizer step over all ranks. workers: "thread" | "process"; num_workers=0
    decodes inline. load_images=False skips pixels (pixel_values None) for token-only uses.
    """

    def __init__(self, dataset, *, seq_len, global_batch_size, micro_batch_size, seed=0, rank=0, world_size=1,
                 packing=False, max_tiles=1, image_size=336, num_workers=2, workers="thread", prefetch=2,
                 pad_id=ENDOFTEXT, load_images=True, preprocessing=None):
        per_rank, rest = divmod(global_batch_size, world_size)
        if rest or per_rank % micro_batch_size:
            raise ValueError(f"global_batch_size {global_batch_size} must be a multiple of world_size {world_size} "
                             f"x micro_batch_size {micro_batch_size}")
        self.dataset, self.seq_len, self.seed = dataset, seq_len, seed
        self.global_batch_size, self.micro_batch_size = global_batch_size, micro_batch_size
        self.rank, self.world_size, self.per_rank = rank, world_size, per_rank
        self.grad_accum = per_rank // micro_batch_size
        self.packing, self.max_tiles, self.image_size = packing, max_tiles, image_size
        self.preprocessing = preprocessing  # the tower's vision.Preprocessing; None: CLIP's
        self.pad_id, self.load_images, self.prefetch = pad_id, load_images, prefetch
        # over-long samples: cut where safe or dropped, counted in this loader's report (which also lists
        # the records the data set skipped); several loaders (one per seq_len phase) may share a data set
        self.report = DataReport(skipped=dataset.report.skipped, samples=dataset.report.samples)
        self.samples = truncate_all(dataset.samples, seq_len, self.report)
        kept = [s is not None for s in self.samples]
        if not any(kept):
            raise DataError(f"no sample fits: all {len(kept)} were dropped as longer than seq_len {seq_len}")
        self.kept = kept
        self.epoch_sizes = []      # rows per epoch, computed as the stream reaches them
        self._epoch_cache = {}     # epoch -> rows (the last two are kept)
        self.step = 0
        self.fingerprint = self._fingerprint()
        self.pool = None
        if load_images and num_workers > 0:
            if workers == "thread":
                self.pool = ThreadPoolExecutor(num_workers, thread_name_prefix="medgpt-images")
            elif workers == "process":
                import multiprocessing
                # one torch thread per worker process: num_workers processes already fill the cores
                self.pool = ProcessPoolExecutor(num_workers, mp_context=multiprocessing.get_context("spawn"),
                                                initializer=torch.set_num_threads, initargs=(1,))
            else:
                raise ValueError(f"workers must be 'thread' or 'process', got {workers!r}")
        self._pending = {}  # step -> list (per micro-batch) of lists of futures

    # ------------------------------------------------------------------------------------------------------
    # the row stream

    def _fingerprint(self) -> str:
        """Identifies the data a state belongs to; by file name and line, so the folder may move on resume."""
        h = hashlib.sha256()
        for s in self.samples:
            h.update(b"-" if s is None else f"{os.path.basename(s.source)}:{len(s.ids)}:{s.ids[:16]}:{s.ids[-16:]}".encode())
        for path, start, end, weight in self.dataset.parts:
            h.update(f"{start}:{end}:{weight}".encode())
        h.update(f"{self.seq_len}:{self.packing}".encode())
        return h.hexdigest()[:16]

    def epoch_rows(self, epoch) -> list:
        """Rows (lists of sample indices) of epoch `epoch`, in training order; a pure function of (data, seed)."""
        if epoch not in self._epoch_cache:
            members = epoch_members(self.dataset.parts, self.kept, self.seed, epoch)
            if not members:
                raise DataError("the mixture draws no samples (all weights 0 or all parts empty)")
            if self.packing:
                rows = [[members[j] for j in row] for row in pack([len(self.samples[i]) for i in members], self.seq_len)]
            else:
                rows = [[i] for i in members]
            order = np.random.default_rng([self.seed, epoch, 1]).permutation(len(rows))
            self._epoch_cache[epoch] = [rows[j] for j in order]
            for old in [e for e in self._epoch_cache if e < epoch - 1]:
                del self._epoch_cache[old]
        return self._epoch_cache[epoch]

    def row(self, position) -> list:
        """Row number `position` of the endless stream."""
        epoch, start = 0, 0
        while True:
            if epoch == len(self.epoch_sizes):
                self.epoch_sizes.append(len(self.epoch_rows(epoch)))
            if position < start + self.epoch_sizes[epoch]:
                return self.epoch_rows(epoch)[position - start]
            start += self.epoch_sizes[epoch]
            epoch += 1

    def rank_rows(self, step) -> list:
        """This rank's rows of global step `step`, as micro-batches: [[row, ...], ...]."""
        first = step * self.global_batch_size + self.rank * self.per_rank
        rows = [self.row(first + k) for k in range(self.per_rank)]
        b = self.micro_batch_size
        return [rows[k:k + b] for k in range(0, len(rows), b)]

    # ------------------------------------------------------------------------------------------------------
    # batches

    def collate(self, micro_rows) -> tuple:
        """Token tensors of one micro-batch, and its images [(path, tiles, source)] in the order of their runs."""
        if self.packing:
            rows = [packed_row([self.samples[i] for i in row], self.seq_len, self.pad_id) for row in micro_rows]
            batch = {key: torch.tensor([r[key] for r in rows], dtype=torch.long)
                     for key in ("input_ids", "targets", "doc_ids", "position_ids")}  # (B, seq_len) each
            return batch, [image for r in rows for image in r["images"]]
        samples = [self.samples[row[0]] for row in micro_rows]
        T = max(len(s.ids) for s in samples)
        batch = {
            "input_ids": torch.tensor([s.ids + [self.pad_id] * (T - len(s.ids)) for s in samples]),  # (B, T)
            "targets": torch.tensor([s.targets + [-100] * (T - len(s.ids)) for s in samples]),     # (B, T)
            "doc_ids": None, "position_ids": None,
        }
        return batch, [(p, n, s.source) for s in samples for p, n in zip(s.images, s.image_tiles)]

    def _submit(self, step):
        if step in self._pending:
            return
        jobs = []
        for micro_rows in self.rank_rows(step):
            batch, images = self.collate(micro_rows)
            if self.load_images and self.pool is not None:
                futures = [self.pool.submit(load_tiles, path, self.max_tiles, self.image_size, self.preprocessing)
                           for path, _, _ in images]
            else:
                futures = None
            jobs.append((batch, images, futures))
        self._pending[step] = jobs

    def _pixels(self, images, futures):
        if not images or not self.load_images:
            return None
        tiles = []
        for k, (path, n_tiles, source) in enumerate(images):
            try:
                t = futures[k].result() if futures is not None \
                    else load_tiles(path, self.max_tiles, self.image_size, self.preprocessing)
            except Exception as e:
                raise DataError(f"{source}: cannot decode image {path}: {type(e).__name__}: {e}") from None
            if t.shape[0] != n_tiles:
                raise DataError(f"{source}: image {path} gave {t.shape[0]} tiles, {n_tiles} were counted when the "
                                "data was loaded (did the file change, or max_tiles/image_size differ?)")
            tiles.append(t)
        return torch.cat(tiles)  # (N_tiles, 3, S, S)

    def get_batch(self, step) -> list:
        """This rank's micro-batches (dicts) of global step `step`, without moving the loader's step."""
        self._submit(step)
        jobs = self._pending.pop(step)
        out = []
        for batch, images, futures in jobs:
            batch["pixel_values"] = self._pixels(images, futures)
            out.append(batch)
        return out

    def next_batch(self) -> list:
        """The micro-batches of the current step; the step advances; later steps' images start decoding."""
        for ahead in range(1, self.prefetch + 1):
            self._submit(self.step + ahead)
        batch = self.get_batch(self.step)
        self.step += 1
        return batch

    def __iter__(self):
        while True:
            yield self.next_batch()

    @property
    def rows_per_epoch(self) -> int:
        if not self.epoch_sizes:
            self.row(0)
        return self.epoch_sizes[0]

    # ------------------------------------------------------------------------------------------------------
    # resume

    def state_dict(self) -> dict:
        return {"step": self.step, "seed": self.seed, "global_batch_size": self.global_batch_size,
                "fingerprint": self.fingerprint}

    def load_state_dict(self, state):
        for key in ("seed", "global_batch_size", "fingerprint"):
            if state.get(key) != getattr(self, key):
                raise ValueError(f"loader state: {key} is {state.get(key)!r} in the checkpoint but {getattr(self, key)!r} "
                                 "now; a resumed run must use the same data, seq_len, packing, seed and global batch")
        self.step = int(state["step"])
        self._pending.clear()  # prefetched steps of the old position are discarded

    def close(self):
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)
            self.pool = None

# ----------------------------------------------------------------------------------------------------------
# throughput: python -m data.loader [--steps 10] [--batch 8] [--max_tiles 1] [--image_size 336]


def real_image_folder(folder) -> list:
    """Real medical images that registry packages ship, written as files: scikit-image's fundus photograph
    (1411 x 1411 JPEG), microaneurysm and histology photographs (CC0), pydicom's CT and MR test slices (16-bit)."""
    try:
        import numpy
        import pydicom
        import skimage
    except ImportError:
        raise SystemExit("the loader benchmark reads sample images from scikit-image and pydicom: "
                         "pip install -r requirements-dev.txt") from None
    os.makedirs(folder, exist_ok=True)
    shipped = os.path.join(os.path.dirname(skimage.__file__), "data")
    paths = [os.path.join(shipped, f) for f in ("retina.jpg", "microaneurysms.png", "ihc.png", "cell.png")]
    dicoms = os.path.join(os.path.dirname(pydicom.__file__), "data", "test_files")
    for name in ("CT_small", "MR_small"):
        pixels = pydicom.dcmread(os.path.join(dicoms, f"{name}.dcm")).pixel_array
        pixels = (pixels.astype(numpy.int32) - pixels.min()).astype(numpy.uint16)  # (H, W), CT is signed
        path = os.path.join(folder, f"{name}.png")
        Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths


def bench(steps=10, batch=8, max_tiles=1, image_size=336):
    tok = load_tokenizer()
    with tempfile.TemporaryDirectory() as tmp:
        paths = real_image_folder(tmp)
        with open(os.path.join(tmp, "conv.jsonl"), "w") as f:
            for i in range(64):
                f.write(json.dumps({"image": paths[i % len(paths)], "conversations": [
                    {"from": "human", "value": "<image>\nWhat modality is this?"},
                    {"from": "gpt", "value": "A medical image."}]}) + "\n")
        spec = ImageTokens(max_tiles=max_tiles, image_size=image_size, tokens_per_tile=(image_size // 14) ** 2)
        dataset = load_dataset(os.path.join(tmp, "conv.jsonl"), conversation_sample, tok, spec)
        print(f"{len(paths)} real images, {batch} samples per step, max_tiles={max_tiles}, image_size={image_size}, "
              f"torch threads={torch.get_num_threads()}")
        for name, kwargs in (("inline", dict(num_workers=0)), ("thread x2", dict(workers="thread", num_workers=2)),
                             ("process x2", dict(workers="process", num_workers=2))):
            loader = DataLoader(dataset, seq_len=8192, global_batch_size=batch, micro_batch_size=batch,
                                max_tiles=max_tiles, image_size=image_size, **kwargs)
            loader.next_batch()  # warm-up: pool start, first decodes
            start = time.perf_counter()
            tiles = 0
            for _ in range(steps):
                tiles += sum(mb["pixel_values"].shape[0] for mb in loader.next_batch())
            seconds = time.perf_counter() - start
            loader.close()
            print(f"{name:11s} {steps * batch / seconds:7.1f} samples/s  {tiles / seconds:7.1f} tiles/s")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="data loader throughput on real medical images (CPU)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max_tiles", type=int, default=1)
    parser.add_argument("--image_size", type=int, default=336)
    args = parser.parse_args()
    bench(args.steps, args.batch, args.max_tiles, args.image_size)
