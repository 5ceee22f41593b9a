"""
data/: everything between files on disk and the token/image batches of the three stages and of eval.py.

- tokenizer.py  o200k_harmony as a `tokenizers.Tokenizer`, built offline from the packaged ranks and cached;
                special-token ids (IMAGE_TOKEN_ID = 200017 is the image placeholder).
- harmony.py    harmony chat rendering: ids, the loss mask on the assistant's output, generation prompts,
                <image> placeholders expanded to image-token runs.
- datasets.py   the stage JSONL formats and mixtures -> Samples (ids, targets with -100, images); bad input
                errors ("file:line: reason") or, with skip_bad, a counted summary.
- packing.py    packing to seq_len with doc_ids / position_ids per document; safe truncation.
- loader.py     the deterministic, resumable, rank-sliced loader with background image workers.

Importing the package imports nothing heavy; import the module you need.
"""
