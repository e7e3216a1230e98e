"""
Tokenizers, from scratch: a byte-level BPE trainer, a readable pure-Python encoder, and the fast
path (tiktoken) behind one interface for four kinds:
  'bpe'  ours, trained here on your text (GPT-4's split pattern)
  'gpt2' OpenAI's GPT-2 ranks, read offline from a local .tiktoken file
  'byte' the 256 bytes, for character-level experiments
  'hf'   a Hugging Face model's own byte-level BPE tokenizer.json (from_hf; to_hf writes any kind as one)
Every kind has the same special tokens: end of text and the chat roles (at the top of the vocabulary; an
'hf' tokenizer keeps its own added tokens, its eos as end of text, and gets the chat roles it lacks).

Train one from the command line (prints bytes per token on held-out text, the last 10% of the file):
$ python tokenizer.py --input=FILE --vocab_size=4096 --out=DIR
and use it:
>>> tok = load(DIR); ids = tok.encode("hello"); tok.decode(ids)
"""
import base64
import heapq
import json
import os
import sys
import time
import unicodedata
from collections import Counter, defaultdict
from pathlib import Path

import regex
import tiktoken

from common import Progress, atomic_path, configure, die

# GPT-4's (cl100k) split pattern for our BPE, and GPT-2's for the gpt2 kind: exactly tiktoken's strings.
# Text is first cut into chunks (words with their leading space, numbers of up to 3 digits, punctuation
# runs, whitespace runs); BPE merges never cross a chunk boundary.
GPT4_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
# reserved at the top of every vocabulary, in this order; only ever produced from text when allowed
SPECIAL_TOKENS = ['<|endoftext|>', '<|system|>', '<|user|>', '<|assistant|>', '<|end|>']
ROLES = ('system', 'user', 'assistant')
DEFAULT_GPT2_RANKS = Path(__file__).resolve().parent.parent / "shared" / "data" / "gpt2.tiktoken"

# -----------------------------------------------------------------------------
# training: byte-level BPE with incremental pair counts


def count_chunks(texts, pattern=GPT4_PATTERN, verbose=True):
    """Split every text with the regex and count the distinct chunks: training then works on
    the ~100k distinct chunks with their counts, never on the raw text again."""
    pat = regex.compile(pattern)
    texts = [texts] if isinstance(texts, str) else texts
    total = sum(len(t) for t in texts) if isinstance(texts, (list, tuple)) else None
    progress = Progress(total, "bpe: splitting text", " chars") if verbose else None
    counts = Counter()
    for text in texts:
        for piece in (split_at_safe_newlines(text) if pattern == GPT4_PATTERN else [text]):
            counts.update(pat.findall(piece))
            if progress:
                progress.update(len(piece))
    if progress:
        progress.close()
    return counts


# Under GPT4_PATTERN a newline followed by a line that starts (after spaces/tabs) with a visible character
# always ends a chunk (each whitespace run is cut after its last newline), and the pattern never looks
# back, so cutting the text there changes no chunk. (Not so for GPT-2's pattern: '\n   ' is one chunk.)
SAFE_NEWLINE = regex.compile(r"\n(?=[^\S\r\n]*\S)")


def split_at_safe_newlines(text, size=1 << 20):
    """Yield pieces of about `size` characters that GPT4_PATTERN chunks exactly as it chunks the whole
    text (keeps findall's list of chunks small and lets the progress line move on big corpora)."""
    start = 0
    while len(text) - start > size:
        m = SAFE_NEWLINE.search(text, start + size)
        if m is None:
            break
        yield text[start:m.end()]
        start = m.end()
    yield text[start:]


def train_bpe(text_or_chunks, vocab_size, pattern=GPT4_PATTERN, verbose=True):
    """Learn vocab_size - 256 - len(SPECIAL_TOKENS) merges from a text, a list of texts, or a dict
    {chunk: count}. Returns the merges [(a, b), ...] in order: merge i makes the token with id 256 + i
    (see ranks_from_merges). Each step merges the most frequent adjacent pair, ties broken by the
    smallest pair (a, b) of ids, so the result is deterministic. Pairs are counted with overlaps
    ('aaa' holds ('a','a') twice) and merged left to right ('aaa' -> 'aa' 'a').

    Instead of recounting every pair after each merge, we keep
      counts: pair -> number of occurrences (weighted by chunk count)
      where:  pair -> ids of the chunks that (may) contain it
      heap:   (-count, pair) entries; an entry is stale when the count has changed since it was pushed
    and a merge only visits the chunks in where[pair], adjusting the counts of the pairs around each
    occurrence: (x, a) -> (x, z) and (b, y) -> (z, y). Only pairs containing the new token z gain
    occurrences, and they are pushed afresh after each merge; every other count only drops. So a popped
    entry whose count is out of date is re-pushed with its true count, and the first entry that is up to
    date is the true maximum (the lazy-deletion trick of HF tokenizers' trainer)."""
    n_merges = vocab_size - 256 - len(SPECIAL_TOKENS)
    if n_merges < 0:
        die(f"vocab_size={vocab_size} is too small: BPE needs at least 256 bytes + "
            f"{len(SPECIAL_TOKENS)} special tokens = {256 + len(SPECIAL_TOKENS)}")
    t0 = time.time()
    chunk_counts = text_or_chunks if isinstance(text_or_chunks, dict) else \
        count_chunks(text_or_chunks, pattern, verbose)
    words = [list(chunk.encode("utf-8")) for chunk in chunk_counts]
    freqs = list(chunk_counts.values())

    counts = defaultdict(int)
    where = defaultdict(set)
    for i, (w, f) in enumerate(zip(words, freqs)):
        for pair in zip(w, w[1:]):
            counts[pair] += f
            where[pair].add(i)
    heap = [(-c, pair) for pair, c in counts.items()]
    heapq.heapify(heap)

    vocab = [bytes([i]) for i in range(256)]  # token id -> bytes
    token_id = {b: i for i, b in enumerate(vocab)}
    merges = []
    progress = Progress(n_merges, "bpe: merges", "") if verbose else None
    while len(merges) < n_merges and heap:
        neg_count, pair = heapq.heappop(heap)
        c = counts.get(pair, 0)
        if c != -neg_count:  # stale: re-queue at its true count (if any left)
            if c > 0:
                heapq.heappush(heap, (-c, pair))
            continue
        merges.append(pair)
        a, b = pair
        # in rare corpora two different merges spell the same bytes: they share one id (as in HF)
        new = vocab[a] + vocab[b]
        z = token_id.get(new)
        if z is None:
            z = token_id[new] = len(vocab)
            vocab.append(new)
        touched = set()  # pairs containing z: their counts grew, they get fresh heap entries
        for wi in where.pop(pair):
            w, f = words[wi], freqs[wi]
            i = 0
            while True:
                try:
                    i = w.index(a, i)
                except ValueError:
                    break
                if i + 1 < len(w) and w[i + 1] == b:
                    if i > 0:  # left neighbour x: (x, a) -> (x, z)
                        left = (w[i - 1], a)
                        counts[left] -= f
                        left = (w[i - 1], z)
                        counts[left] += f
                        touched.add(left)
                        where[left].add(wi)
                    if i + 2 < len(w):  # right neighbour y: (b, y) -> (z, y)
                        right = (b, w[i + 2])
                        counts[right] -= f
                        right = (z, w[i + 2])
                        counts[right] += f
                        touched.add(right)
                        where[right].add(wi)
                    w[i:i + 2] = (z,)
                i += 1
        del counts[pair]  # every occurrence is merged now
        for p in touched:
            if counts[p] > 0:
                heapq.heappush(heap, (-counts[p], p))
        if progress:
            progress.update()
    if progress:
        progress.close()
    if verbose and len(merges) < n_merges:
        print(f"bpe: the text has only {len(merges)} distinct merges, fewer than the {n_merges} asked for; "
              f"the vocabulary is smaller than vocab_size={vocab_size}", file=sys.stderr)
    if verbose:
        print(f"bpe: {len(merges)} merges from {len(words)} distinct chunks in {time.time() - t0:.2f}s",
              file=sys.stderr)
    return merges


def ranks_from_merges(merges):
    """tiktoken's mergeable ranks {token bytes: id}: the 256 bytes, then one token per merge in order
    (a merge that spells an existing token adds nothing, as in train_bpe)."""
    vocab = [bytes([i]) for i in range(256)]
    ranks = {b: i for i, b in enumerate(vocab)}
    for a, b in merges:
        new = vocab[a] + vocab[b]
        if new not in ranks:
            ranks[new] = len(vocab)
            vocab.append(new)
    return ranks

# -----------------------------------------------------------------------------
# encoding, the teaching version: GPT-2's bpe() on bytes, applying merges by rank


def bpe_chunk(piece, ranks, max_rank=None):
    """Token ids of one chunk (bytes): start from single bytes and keep merging the adjacent pair whose
    concatenation has the lowest rank (leftmost on ties), until no adjacent pair is a token.
    max_rank: use only the tokens of lower rank (merges_from_ranks asks how a token itself is made)."""
    limit = float("inf") if max_rank is None else max_rank
    if ranks.get(piece, limit) < limit:  # a whole chunk that is one token is taken as is, as tiktoken does
        return [ranks[piece]]
    parts = [bytes([b]) for b in piece]
    while len(parts) > 1:
        best_rank, best_i = limit, None
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1], limit)
            if rank < best_rank:
                best_rank, best_i = rank, i
        if best_i is None:
            break
        parts[best_i:best_i + 2] = [parts[best_i] + parts[best_i + 1]]
    return [ranks[p] for p in parts]

# -----------------------------------------------------------------------------
# one interface for the kinds (and 'hf': a Hugging Face byte-level BPE tokenizer.json, see from_hf)


class Tokenizer:
    """kind, pattern, ranks {bytes: id}, special {name: id}, n_vocab, eot_id, path (where it was read from,
    so that spec rebuilds it), nfc (Unicode NFC before encoding, as some HF tokenizers do). Encoding and
    decoding go through a tiktoken.Encoding built from the ranks; encode_slow is the pure-Python equivalent."""

    def __init__(self, kind, ranks, pattern, special, path=None, eot='<|endoftext|>', nfc=False):
        self.kind, self.ranks, self.pattern, self.special = kind, ranks, pattern, dict(special)
        self.path, self.nfc = path, nfc
        self.n_vocab = max([*ranks.values(), *self.special.values()]) + 1
        self.eot_id = self.special[eot]
        self.enc = tiktoken.Encoding(f"{kind}-{self.n_vocab}", pat_str=pattern, mergeable_ranks=ranks,
                                     special_tokens=self.special)
        self._pat = None  # compiled pattern, for encode_slow
        self._cache = {}  # chunk -> ids, for encode_slow

    def __repr__(self):
        return f"Tokenizer(kind={self.kind!r}, n_vocab={self.n_vocab}, eot_id={self.eot_id})"

    @property
    def spec(self):
        """What a checkpoint records to rebuild this tokenizer with from_spec: {'kind', 'path'}."""
        return {"kind": self.kind, "path": None if self.path is None else str(self.path)}

    def _normalize(self, text):
        return unicodedata.normalize("NFC", text) if self.nfc else text

    def encode(self, text, allowed_special=()):
        """Token ids of text. Special-token text (e.g. '<|endoftext|>' typed in a document) is encoded as
        plain text unless its name is in allowed_special (a set of names, or 'all')."""
        return self.enc.encode(self._normalize(text), allowed_special=self._allowed(allowed_special),
                               disallowed_special=())

    def encode_batch(self, texts, num_threads=None, allowed_special=()):
        """encode() of many texts on a pool of threads (tiktoken releases the GIL while encoding)."""
        return self.enc.encode_batch([self._normalize(t) for t in texts],
                                     num_threads=num_threads or os.cpu_count() or 1,
                                     allowed_special=self._allowed(allowed_special), disallowed_special=())

    def decode_bytes(self, ids):
        return self.enc.decode_bytes(ids.tolist() if hasattr(ids, "tolist") else ids)  # also tensors, arrays

    def decode(self, ids):
        """Text of ids; a byte sequence that is not UTF-8 (e.g. half a character) becomes U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def encode_slow(self, text, allowed_special=()):
        """encode() in pure Python: split with the pattern, then bpe_chunk each chunk (cached: a corpus has
        far fewer distinct chunks than chunks). Gives exactly tiktoken's ids; for teaching and tests."""
        allowed = self._allowed(allowed_special)
        if self._pat is None:
            self._pat = regex.compile(self.pattern)
        ids, cache = [], self._cache
        text = self._normalize(text)
        pieces = [text]
        if allowed:  # the allowed special tokens cut the text; the pattern chunks what lies between them
            names = sorted(allowed, key=len, reverse=True)
            pieces = regex.split("(" + "|".join(regex.escape(s) for s in names) + ")", text)
        for k, piece in enumerate(pieces):
            if k % 2:  # the separators captured by split
                ids.append(self.special[piece])
                continue
            for chunk in self._pat.findall(piece):
                chunk_ids = cache.get(chunk)
                if chunk_ids is None:
                    chunk_ids = cache[chunk] = bpe_chunk(chunk.encode("utf-8"), self.ranks)
                ids.extend(chunk_ids)
        return ids

    def _allowed(self, allowed_special):
        allowed = set(self.special) if allowed_special == "all" else set(allowed_special)
        if allowed - set(self.special):
            raise ValueError(f"unknown special tokens {sorted(allowed - set(self.special))}; "
                             f"this tokenizer has {list(self.special)}")
        return allowed

    def save(self, dir):
        """dir/tokenizer.tiktoken (tiktoken's format: base64 token, space, rank; one per line, by rank) and
        dir/tokenizer.json (kind, pattern, special tokens); each written whole or not at all."""
        dir = Path(dir)
        dir.mkdir(parents=True, exist_ok=True)
        with atomic_path(dir / "tokenizer.tiktoken") as tmp:
            with open(tmp, "w", encoding="ascii") as f:
                for token, rank in sorted(self.ranks.items(), key=lambda kv: kv[1]):
                    f.write(f"{base64.b64encode(token).decode('ascii')} {rank}\n")
        info = dict(kind=self.kind, pattern=self.pattern, special_tokens=self.special, n_vocab=self.n_vocab)
        with atomic_path(dir / "tokenizer.json") as tmp:
            tmp.write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
        return dir


def read_ranks(path):
    """{token bytes: rank} of a .tiktoken file, with a clear error when it is missing or corrupt."""
    path = Path(path)
    if not path.is_file():
        die(f"tokenizer ranks file {path} not found")
    ranks = {}
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                token, rank = line.split()
                token, rank = base64.b64decode(token, validate=True), int(rank)
            except ValueError:
                die(f"{path} line {n} is corrupt (expected 'base64token rank'); restore or re-create the file")
            if token in ranks:
                die(f"{path} line {n}: token {token!r} appears twice; restore or re-create the file")
            ranks[token] = rank
    if not ranks:
        die(f"{path} is empty; restore or re-create the file")
    if sorted(ranks.values()) != list(range(len(ranks))):
        die(f"{path} is corrupt: its ranks are not 0..{len(ranks) - 1} each once; restore or re-create the file")
    return ranks


def specials_after(n):
    """The special tokens numbered from n on."""
    return {name: n + i for i, name in enumerate(SPECIAL_TOKENS)}


def load(dir):
    """The Tokenizer saved in dir by Tokenizer.save()."""
    dir = Path(dir)
    info_path = dir / "tokenizer.json"
    if not info_path.is_file():
        die(f"no tokenizer in {dir}: {info_path.name} is missing "
            f"(train one with `python tokenizer.py --input=FILE --out={dir}`)")
    try:
        info = json.loads(info_path.read_text(encoding="utf-8"))
        kind, pattern, special = info["kind"], info["pattern"], info["special_tokens"]
        regex.compile(pattern)
        if kind not in ("bpe", "gpt2", "byte") or not isinstance(special, dict) \
                or not all(isinstance(k, str) and type(v) is int for k, v in special.items()) \
                or '<|endoftext|>' not in special:
            raise ValueError("unexpected kind or special tokens")
    except (ValueError, KeyError, TypeError, regex.error, UnicodeDecodeError) as e:
        die(f"{info_path} is corrupt ({type(e).__name__}: {e}); delete {dir} and train or save the tokenizer again")
    ranks = read_ranks(dir / "tokenizer.tiktoken")
    if set(special.values()) & set(range(len(ranks))):
        die(f"{info_path} is corrupt: special token ids overlap the ranks in tokenizer.tiktoken")
    return Tokenizer(kind, ranks, pattern, special, path=dir.resolve())


def get_tokenizer(kind, path=None, vocab_size=None, text=None, verbose=True):
    """'gpt2': GPT-2's ranks from path (default ../shared/data/gpt2.tiktoken), <|endoftext|>=50256, then
               the chat tokens 50257..50260.
    'byte': 256 bytes + the specials (n_vocab 261).
    'bpe':  load(path) when path holds a saved tokenizer; otherwise train on text at vocab_size (ids
            0..V-6 are bytes and merges, the specials are V-5..V-1) and, if path is given, save it there."""
    if kind == "gpt2":
        explicit = Path(path).resolve() if path else None  # recorded in spec; the default stays None (portable)
        path = Path(path or DEFAULT_GPT2_RANKS)
        if not path.is_file():
            die(f"GPT-2 ranks file {path} not found: put OpenAI's gpt2 (r50k_base) .tiktoken file there "
                f"or pass its path")
        ranks = read_ranks(path)
        return Tokenizer("gpt2", ranks, GPT2_PATTERN, specials_after(len(ranks)), path=explicit)
    if kind == "byte":
        return Tokenizer("byte", {bytes([i]): i for i in range(256)}, GPT4_PATTERN, specials_after(256))
    if kind != "bpe":
        die(f"unknown tokenizer kind '{kind}': use bpe, gpt2 or byte")
    if path is not None and (Path(path) / "tokenizer.json").exists():
        return load(path)
    if text is None or vocab_size is None:
        die(f"a bpe tokenizer needs a saved one in path (got {path}) or text and vocab_size to train on")
    ranks = ranks_from_merges(train_bpe(text, vocab_size, verbose=verbose))
    tok = Tokenizer("bpe", ranks, GPT4_PATTERN, specials_after(len(ranks)))
    if path is not None:
        tok.save(path)
    return tok

def from_spec(spec):
    """The tokenizer a checkpoint or meta.json names: {'kind', 'path'} (Tokenizer.spec)."""
    if spec["kind"] == "bpe":
        return load(spec["path"])
    if spec["kind"] == "hf":
        if not spec.get("path"):
            die("the checkpoint names a Hugging Face tokenizer without its directory (tokenizer spec path is None)")
        return from_hf(spec["path"])
    return get_tokenizer(spec["kind"], spec.get("path"))

# -----------------------------------------------------------------------------
# chat template


def render_chat(tok, messages, add_generation_prompt=False):
    """Render [{'role': 'system'|'user'|'assistant', 'content': str}, ...] as
        <|system|>content<|end|><|user|>content<|end|><|assistant|>content<|end|>...
    (no newlines, no leading <|endoftext|>: put tok.eot_id between packed examples yourself).
    Returns (ids, mask): mask is 1 exactly on the assistants' content tokens and their <|end|>, the tokens
    a fine-tune learns to produce. Role markers are special ids; content is encoded as plain text, so a
    '<|end|>' typed in a message cannot end it. add_generation_prompt appends <|assistant|> for sampling."""
    ids, mask = [], []
    end = tok.special['<|end|>']
    for k, msg in enumerate(messages):
        role = msg.get("role") if isinstance(msg, dict) else None
        if role not in ROLES:
            raise ValueError(f"message {k} has role {role!r}; roles are {', '.join(ROLES)}")
        if not isinstance(msg.get("content"), str):
            raise ValueError(f"message {k} ({role}) needs a string 'content'")
        content = tok.encode(msg["content"])
        learn = int(role == "assistant")
        ids += [tok.special[f"<|{role}|>"], *content, end]
        mask += [0] + [learn] * (len(content) + 1)
    if add_generation_prompt:
        ids.append(tok.special['<|assistant|>'])
        mask.append(0)
    return ids, mask

# -----------------------------------------------------------------------------
# Hugging Face tokenizer.json (byte-level BPE): read into a Tokenizer, and written from one

# Our two patterns as HF tokenizers' regex engine (Oniguruma) must read them to split text the same way:
# it reads \p{N}{1,3}+ as "one or more runs of 1-3 digits" (tiktoken: possessive), so GPT-4's is written
# with a plain {1,3}, which matches the same at that place. (Llama 3's tokenizer.json has cl100k's older
# regex, which cuts a whitespace run at the very end of the text after its last newline: not the same.)
# GPT-2's is HF's own GPT-2 regex. A pattern read from a tokenizer.json is written back as it is.
HF_PATTERNS = {
    GPT4_PATTERN: GPT4_PATTERN.replace(r"\p{N}{1,3}+", r"\p{N}{1,3}"),
    GPT2_PATTERN: r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""",
}


def byte_alphabet():
    """{byte: character}: GPT-2's printable stand-in for each byte, the alphabet byte-level BPE vocabularies
    are written in (HF's bytes_to_unicode). Printable Latin-1 bytes stand for themselves, the other 68
    (space, control characters...) for U+0100 onwards, so a token such as b' the' is written 'Ġthe'."""
    printable = {*range(0x21, 0x7f), *range(0xa1, 0xad), *range(0xae, 0x100)}
    shifted = iter(range(0x100, 0x200))
    return {b: chr(b) if b in printable else chr(next(shifted)) for b in range(256)}


def merges_from_ranks(ranks):
    """[(left bytes, right bytes)]: the merge that makes each token, in rank order. It is the two parts that
    tiktoken's BPE leaves in the token's own bytes when it may use only lower ranks, so HF's BPE, applying
    these merges in order, makes what tiktoken makes. A token left in more than two parts has no merge: it is
    only ever a whole chunk (HF's ignore_merges takes such a chunk as is, as tiktoken does)."""
    by_id = {i: b for b, i in ranks.items()}
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) > 1:
            parts = bpe_chunk(token, ranks, max_rank=rank)
            if len(parts) == 2:
                merges.append((by_id[parts[0]], by_id[parts[1]]))
    return merges


def from_hf(dir):
    """The Tokenizer (kind 'hf') of a Hugging Face directory whose tokenizer.json is a byte-level BPE (GPT-2,
    Llama 3, Qwen2, Mistral-Nemo style), encoding at tiktoken's speed: each vocabulary entry, mapped back to
    bytes, has its id as rank; the split regex is the Split pre-tokenizer's (or GPT-2's for ByteLevel's own);
    the added tokens are the special tokens; end of text is tokenizer_config.json's eos_token. Chat tokens
    it lacks (<|system|>, <|user|>, <|assistant|>, <|end|>) get the ids after all of its own, as for GPT-2:
    fine-tuning gives them rows. Any other tokenizer stops with one line saying what it is."""
    dir = Path(dir).resolve()
    path = dir / "tokenizer.json"

    def unsupported(what):
        die(f"{path}: {what}; only byte-level BPE tokenizers are supported (GPT-2, Llama 3, Qwen2 style: "
            f"model BPE, pre-tokenizer ByteLevel, possibly after a Split regex)")

    if not path.is_file():
        die(f"{path} not found: expected a Hugging Face tokenizer.json beside the model")
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
        model, pre, norm = info["model"], info.get("pre_tokenizer") or {}, info.get("normalizer")
        pres = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre] if pre else []
        types = [p.get("type") for p in pres]
        if model.get("type") != "BPE":
            unsupported(f"it is a {model.get('type')} tokenizer")
        if model.get("byte_fallback") or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
            unsupported("it is a SentencePiece-style BPE (byte_fallback or word prefix/suffix)")
        if types not in (["ByteLevel"], ["Split", "ByteLevel"]):
            unsupported(f"its pre-tokenizer is {' + '.join(map(str, types)) or 'missing'}")
        byte_level = pres[-1]
        if byte_level.get("add_prefix_space"):
            unsupported("its ByteLevel pre-tokenizer adds a prefix space (add_prefix_space=true)")
        if types[0] == "Split":  # Llama 3 style: the Split regex cuts the text, ByteLevel only maps bytes
            split = pres[0]
            if "Regex" not in split["pattern"] or split.get("behavior") != "Isolated" or split.get("invert") \
                    or byte_level.get("use_regex", True):
                unsupported("its Split pre-tokenizer is not an isolating regex before ByteLevel(use_regex=false)")
            pattern = split["pattern"]["Regex"]
        elif byte_level.get("use_regex", True):  # GPT-2 style: ByteLevel splits with GPT-2's regex
            pattern = GPT2_PATTERN
        else:
            unsupported("it has no regex to split the text into chunks")
        if norm not in (None, {"type": "NFC"}):
            unsupported(f"its normalizer is {norm.get('type')}")
        if (info.get("decoder") or {"type": "ByteLevel"})["type"] != "ByteLevel":
            unsupported(f"its decoder is {info['decoder']['type']}")
        special = {t["content"]: t["id"] for t in info.get("added_tokens", [])}
        vocab, merges = model["vocab"], model["merges"]
        to_byte = {c: b for b, c in byte_alphabet().items()}
        ranks, special_ids = {}, set(special.values())
        for text, i in vocab.items():
            if i in special_ids:  # e.g. GPT-2's '<|endoftext|>' is in both: a special token here
                continue
            if any(c not in to_byte for c in text):
                unsupported(f"vocabulary entry {text!r} is not in the byte-level alphabet")
            ranks[bytes(to_byte[c] for c in text)] = i
        if not all(bytes([b]) in ranks for b in range(256)):
            unsupported("its vocabulary lacks some of the 256 bytes")
        # tiktoken merges the adjacent pair whose token has the lowest rank (= id), HF the pair listed first:
        # the same order only when the tokens the merges make have ids in merge order
        last = -1
        for k, m in enumerate(merges):
            a, b = m.split(" ") if isinstance(m, str) else m
            made = vocab[a + b]
            if made < last:
                die(f"{path}: merge {k} ({a!r} {b!r}) makes token id {made}, below the {last} of an earlier merge: "
                    f"tiktoken needs token ids in merge order, as HF's trainer and tiktoken conversions give them")
            last = made
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as e:
        die(f"{path} is corrupt ({type(e).__name__}: {e}); download or save the tokenizer again")
    missing = [name for name in SPECIAL_TOKENS[1:] if name not in special]  # the chat tokens
    n = max([*ranks.values(), *special.values()]) + 1  # after every id of the HF tokenizer
    special.update((name, n + k) for k, name in enumerate(missing))
    eos = _read_eos(dir)
    eot = eos if eos in special else "<|endoftext|>"
    if eot not in special:
        die(f"{dir}: no end-of-text token: tokenizer_config.json's eos_token {eos!r} is not one of "
            f"tokenizer.json's added tokens")
    try:
        return Tokenizer("hf", ranks, pattern, special, path=dir, eot=eot, nfc=norm is not None)
    except ValueError as e:  # the split regex is beyond tiktoken's regex engine
        die(f"{path}: tiktoken cannot use its split regex {pattern!r} ({e})")


def _read_eos(dir):
    """The eos_token named in dir/tokenizer_config.json (a string or an AddedToken dict), or None."""
    try:
        eos = json.loads((dir / "tokenizer_config.json").read_text(encoding="utf-8")).get("eos_token")
    except FileNotFoundError:
        return None
    except (ValueError, UnicodeDecodeError, AttributeError) as e:
        die(f"{dir / 'tokenizer_config.json'} is corrupt ({type(e).__name__}: {e})")
    return eos.get("content") if isinstance(eos, dict) else eos


def chat_template(tok):
    """render_chat's template as Jinja, for HF's chat_template, after the end-of-text token that
    chat_data.chat_ids puts first: apply_chat_template then gives our ids exactly."""
    eot = next(name for name, i in tok.special.items() if i == tok.eot_id)
    return ("{{- '" + eot + "' -}}"
            "{%- for message in messages -%}"
            "{%- if message['role'] not in " + str(list(ROLES)) + " -%}"
            "{{- raise_exception('message roles are " + ", ".join(ROLES) + "') -}}{%- endif -%}"
            "{{- '<|' + message['role'] + '|>' + message['content'] + '<|end|>' -}}"
            "{%- endfor -%}"
            "{%- if add_generation_prompt -%}{{- '<|assistant|>' -}}{%- endif -%}")


def to_hf(tok, dir, chat=False, n_rows=None):
    """Write tok into dir as a Hugging Face tokenizer (AutoTokenizer loads it and gives our ids):
    tokenizer.json, a byte-level BPE (vocab in byte_alphabet, merges_from_ranks, our split regex in HF's
    syntax, the special tokens) and tokenizer_config.json (bos and eos: our end of text; with chat, the
    chat_template). n_rows: leave out the special tokens at or above it (a model without their rows)."""
    alphabet = byte_alphabet()

    def text(b):
        return "".join(alphabet[x] for x in b)

    special = sorted((i, name) for name, i in tok.special.items() if n_rows is None or i < n_rows)
    eot = next(name for name, i in tok.special.items() if i == tok.eot_id)
    info = {
        "version": "1.0", "truncation": None, "padding": None,
        # matched exactly as written (not normalized, no space stripped around them), as our allowed_special
        "added_tokens": [dict(id=i, content=name, single_word=False, lstrip=False, rstrip=False,
                              normalized=False, special=True) for i, name in special],
        "normalizer": {"type": "NFC"} if tok.nfc else None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": HF_PATTERNS.get(tok.pattern, tok.pattern)},
             "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
        "post_processor": None,  # no BOS added: our documents and chats start with end of text explicitly
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "ignore_merges": True,  # a chunk that is a whole token is that token, as in tiktoken
                  "vocab": {text(b): i for b, i in sorted(tok.ranks.items(), key=lambda kv: kv[1])},
                  "merges": [f"{text(a)} {text(b)}" for a, b in merges_from_ranks(tok.ranks)]},
    }
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": eot, "eos_token": eot,
              "clean_up_tokenization_spaces": False}  # decode gives the bytes back, no space clean-up
    if chat:
        config["chat_template"] = chat_template(tok)
    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    for name, obj in (("tokenizer.json", info), ("tokenizer_config.json", config)):
        with atomic_path(dir / name) as tmp:
            tmp.write_text(json.dumps(obj, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")

# -----------------------------------------------------------------------------
# command line: train, save, report bytes per token on held-out text


def main(input, vocab_size, out, force):
    path = Path(input)
    if not input or not path.is_file():
        die(f"input file '{input}' not found: pass --input=FILE with UTF-8 text to train on")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        die(f"{path} is not UTF-8 text (bad byte at offset {e.start}); convert it to UTF-8 first")
    if not text.strip():
        die(f"{path} is empty: it needs text to train on")
    if (Path(out) / "tokenizer.json").exists() and not force:
        die(f"{out} already holds a tokenizer; pass --force=True to replace it or choose another --out")
    split = int(len(text) * 0.9)
    train, held = text[:split], text[split:]
    if not train.strip() or not held.strip():
        die(f"{path} is too small to hold out 10% for evaluation; give it more text")
    tok = get_tokenizer("bpe", vocab_size=vocab_size, text=train)
    tok.save(out)
    n_bytes, n_tokens = len(held.encode("utf-8")), len(tok.encode(held))
    print(f"saved {tok.kind} tokenizer, n_vocab {tok.n_vocab}, to {out}")
    print(f"held-out (last 10%): {n_bytes} bytes -> {n_tokens} tokens, {n_bytes / n_tokens:.3f} bytes/token")


if __name__ == "__main__":
    # config, nanoGPT style (`--key=value`); a dict rather than globals() so the module's constants
    # (patterns, special tokens) are not taken for config keys
    config = dict(
        input="",           # UTF-8 text file to train on (the last 10% is held out)
        vocab_size=4096,    # including the 256 bytes and the 5 special tokens
        out="out-tokenizer",  # folder for tokenizer.tiktoken + tokenizer.json
        force=False,        # replace a tokenizer already in out
    )
    configure(config)
    main(**config)
