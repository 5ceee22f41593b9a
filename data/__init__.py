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
- convert.py    converters for the public releases (benchmarks in eval format, training sets in stage formats).
- mimic.py      chest X-ray reports: the MIMIC-CXR section parser, studies with views and priors, IU-Xray,
                CheXpert Plus.
- pmc.py        PMC Open Access JATS articles and PubMed abstracts as stage-2 documents.
- leakage.py    text/file hashes and exact/near-duplicate image matching that keep eval data out of training.
- prepare.py    raw downloads -> eval sets, leakage-filtered training sets and the three stage mixtures.
- demo.py       the demo data set from packaged medical images, and `make demo`'s closing report.

Importing the package imports nothing heavy; import the module you need.
"""
