"""
Clean a corpus at web scale: quality rules, exact and MinHash LSH near-duplicate removal, and a fastText-style
quality classifier. prepare.py calls it as a library; it is a command of its own too, because people clean far
more text than they train on.

    python clean.py --input=corpus/ --output=clean/                  # exact + MinHash near-duplicate removal
    python clean.py --input=a.jsonl,b.jsonl.gz --output=clean/ --filters=gopher,repetition,c4,fineweb --workers=2
    python clean.py --input=... --output=... --quality_model=quality.bin --quality_keep=0.9
    python clean.py --train_classifier --positive=wiki.jsonl --negative=forum.jsonl --out=quality.bin
    python clean.py --train_classifier --labeled=train.txt --out=quality.bin       # fastText's __label__ lines

Input: .txt (cut at blank lines into documents of at least chunk_chars, or at <|endoftext|>), .jsonl or
.jsonl.gz with a string "text" (and an optional "id"), a folder of them (recursively, in path order), or a
comma-separated list. Output, in --output:
  docs.jsonl     the kept documents in input order, every field of the input kept ("text" cleaned; "id" added)
  removed.jsonl  one line per removed document: {"id", "stage", "rule"} or {"id", "stage", "duplicate_of"},
                 or {"id", "stage": "quality", "score"}; "id" is the input's, or file:line (file#k for .txt)
  summary.json   documents and bytes removed by each stage and rule (also printed as a table)
  work/          each stage's result: a re-run with the same input and settings skips the stages that are done
The result is the same whatever --workers is (documents are processed in order-keeping chunks).

Stages, in this order (the thresholds are those of datatrove, HuggingFace's pipeline for FineWeb):
  normalize   NFC, '\\n' newlines, lone surrogates to U+FFFD; documents under min_doc_chars dropped ("tiny")
  filters     --filters, in the order given, each rule named in removed.jsonl:
    gopher      Gopher's quality rules (Rae et al. 2021, table A1): 50-100,000 words (not counting words of
                punctuation only), mean word length 3-10, '#' and ellipses at most 0.1 per word, at most 90% of
                lines starting with a bullet and 30% ending in an ellipsis, 80% of words with a letter, and at
                least 2 of the stop words {the, be, to, of, and, that, have, with}
    repetition  Gopher's repetition rules: duplicate paragraphs and lines at most 30% of them and 20% of the
                characters; the most frequent 2/3/4-gram at most 20/18/16% of the characters; duplicated
                5..10-grams at most 15, 14, 13, 12, 11, 10% of the characters
    c4          C4's rules (Raffel et al. 2020), which rewrite the document: keep only the lines that end in
                terminal punctuation (. ? ! " ', not an ellipsis), have 3 words or more, no word over 1000
                characters, no "javascript" and no cookie/terms-of-use notice; citation marks like [1] go; a
                page with "lorem ipsum" or a "{" is dropped, and so is one left with fewer than 5 sentences
    fineweb     FineWeb's extra rules (Penedo et al. 2024): at least 12% of lines end in terminal punctuation,
                at most 67% of lines are 30 characters or shorter, duplicate lines hold at most 1% of the
                characters, and at most 0.3 newlines per word
  exact       the same text twice: the first copy stays
  minhash     near duplicates, as datatrove's minhash.py with FineWeb's setting: the text simplified (lowercase,
              numbers to 0, punctuation to spaces, whitespace collapsed, diacritics stripped), word 5-gram
              shingles hashed to 32 bits, 112 permutations (h*a + b) mod (2^61 - 1) seeded as datatrove's, 14
              bands of 8 rows: documents that share a band are candidates; with jaccard > 0 a candidate pair
              counts only if the exact Jaccard similarity of its shingle sets is at least that (it stops chains
              of false positives); the pairs join clusters (union-find) and each cluster keeps its lowest
              document. A document of fewer than 5 words has no shingle: it is never a near duplicate (exact
              duplicates of it still go). hash_mode='compat' hashes shingles with SHA-1, as datatrove's
              HashConfig(precision=32, hash_fc='sha1') and datasketch's MinHash(scheme='legacy'): the same
              signatures bit for bit; 'fast' (default) hashes them with numpy, many times faster.
  quality     --quality_model: a classifier trained with --train_classifier scores each document (the
              probability of its positive label); the top quality_keep fraction stays (ties: the earlier
              document), or those scoring at least quality_threshold (as GPT-3 and DCLM select their data)
Words are whitespace-separated tokens (datatrove splits with NLTK; the tests give datatrove this same splitter
and compare every decision).
"""
import contextlib
import functools
import gzip
import hashlib
import io
import json
import math
import re
import struct
import sys
import time
import unicodedata
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import regex

from common import Progress, atomic_path, configure, die, fmt_num

# -----------------------------------------------------------------------------
# config (python clean.py --help lists these)
input = ""                 # files or folders, comma-separated
output = ""                # the output folder
filters = ""               # comma-separated: gopher, repetition, c4, fineweb ("" none)
dedup = "exact,minhash"    # comma-separated: exact, minhash ("" none)
min_doc_chars = 16         # documents shorter than this (whitespace stripped) are dropped as "tiny"
chunk_chars = 8192         # a .txt is cut at blank lines into documents of at least this many characters
jaccard = 0.8              # minhash: a candidate pair must have this exact Jaccard similarity (0: off)
hash_mode = "fast"         # minhash shingle hashing: 'fast' (numpy) | 'compat' (SHA-1, as datatrove/datasketch)
quality_model = ""         # a classifier file from --train_classifier: keep the best-scoring documents
quality_keep = 1.0         # the share of documents the classifier keeps, in (0, 1]
quality_threshold = 0.0    # > 0: keep the documents scoring at least this instead
quality_label = "hq"       # the classifier's label whose probability is the score
workers = 1                # processes for the per-document work (the output does not depend on it)
# --train_classifier: a reference-vs-other classifier from files of documents (or fastText __label__ files)
train_classifier = False
positive = ""              # files or folders of documents of the kind to keep (label 'hq')
negative = ""              # files or folders of the rest (label 'lq')
labeled = ""               # or fastText-format files: '__label__X text' per line
out = "quality.bin"        # where the classifier goes
dim = 16                   # the classifier's embedding size
epoch = 5
lr = 0.1
word_ngrams = 2            # unigrams and bigrams
buckets = 1 << 18          # hash buckets of the bigrams
# -----------------------------------------------------------------------------

# the characters datatrove's simplify_text turns into spaces (ASCII punctuation and symbols, control characters,
# and a curated set of others): the compat signatures are bit-identical only with exactly this set
PUNCTUATION = ("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~" + "".join(map(chr, [*range(0, 9), 11, 12, *range(13, 32),
               *range(127, 160)])) + "«´»–—’“”„…∶━►、。〈〉《》「」【】（），：；？！～．１％")
# str.translate looks every character up in a dict (1.25 s on the copyright files); bytes.translate with a
# 256-byte table is ~50x faster, so the ASCII ones go that way and the rest through one regex
ASCII_TO_SPACE = bytes(32 if chr(c) in PUNCTUATION else c for c in range(128)) + bytes(range(128, 256))
OTHER_PUNCTUATION = re.compile("[" + re.escape("".join(c for c in PUNCTUATION if ord(c) >= 128)) + "]")
# a number, decimals included, becomes "0" (any script's digits: hence the regex module)
NUMBER = regex.compile(r"\p{Nd}+([.,،٫⎖⎗⎘]\p{Nd}+)?")
# Gopher's words of punctuation only: the characters above or any sentence-ending mark (Unicode's
# Sentence_Terminal, which datatrove lists by hand)
SYMBOL_WORD = regex.compile("[" + re.escape(PUNCTUATION) + r"\p{Sentence_Terminal}]+")
ENDS_TERMINAL = regex.compile(r"\p{Sentence_Terminal}$")
COMBINING = regex.compile(r"\p{Mn}+")
STOP_WORDS = {"the", "be", "to", "of", "and", "that", "have", "with"}
C4_END = (".", "?", "!", '"', "'")
C4_POLICY = ("terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies", "use cookies")
CITATION = re.compile(r"\[\d*]|\[edit]|\[citation needed]")
SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
NGRAM, BANDS, ROWS, SEED = 5, 14, 8, 1  # FineWeb's MinHash setting: 112 hashes, a pair at s=0.8 is found 92% of the time
MERSENNE = (1 << 61) - 1
STAGES = ("tiny", "filters", "exact", "minhash", "quality")
EOT_TEXT = "<|endoftext|>"

# -----------------------------------------------------------------------------
# reading documents: dicts with "id" and "text" (and whatever else a .jsonl line holds)


def input_files(spec):
    """The files of a comma-separated list of files and folders (folders recursively, in path order), as
    (path, name) with name the path below its folder; one clear error for what is not there or not text."""
    files = []
    for part in [p for p in str(spec).split(",") if p.strip()]:
        path = Path(part.strip())
        if not path.exists():
            die(f"input '{path}' not found (give .txt, .jsonl or .jsonl.gz files, or folders of them)")
        if path.is_file():
            if not path.name.endswith((".txt", ".jsonl", ".jsonl.gz")):
                die(f"input '{path}' is not .txt, .jsonl or .jsonl.gz")
            files.append((path, path.name))
            continue
        found = sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith((".txt", ".jsonl", ".jsonl.gz")))
        if not found:
            die(f"input folder '{path}' holds no .txt, .jsonl or .jsonl.gz files")
        files += [(p, p.relative_to(path).as_posix()) for p in found]
    if not files:
        die("no input: give --input=FILES_OR_FOLDERS (comma-separated)")
    return files


def read_text(path):
    """UTF-8 text with undecodable bytes replaced by U+FFFD; warns how many sequences were replaced."""
    data = Path(path).read_bytes()
    text = data.decode("utf-8", errors="replace")
    bad = text.count("\ufffd") - data.count("\ufffd".encode())
    if bad:
        print(f"warning: {path}: replaced {bad} undecodable byte sequence(s) with U+FFFD", file=sys.stderr)
    return text


def text_file_documents(path, name, chunk_chars):
    """A .txt holding <|endoftext|> gives one document per piece (whitespace around it dropped, as in
    TinyStories); otherwise consecutive paragraphs are grouped into documents of at least chunk_chars, so that
    joining them with blank lines gives the text back exactly."""
    text = read_text(path)
    if EOT_TEXT in text:
        return [{"id": f"{name}#{i}", "text": t.strip()} for i, t in enumerate(text.split(EOT_TEXT))]
    text = normalize(text)  # so that '\r\n\r\n' also counts as a blank line
    docs, parts, n = [], [], 0
    for para in text.split("\n\n"):
        parts.append(para)
        n += len(para) + 2
        if n >= chunk_chars:
            docs.append({"id": f"{name}#{len(docs)}", "text": "\n\n".join(parts)})
            parts, n = [], 0
    if parts:
        docs.append({"id": f"{name}#{len(docs)}", "text": "\n\n".join(parts)})
    return docs


def jsonl_documents(path, name):
    """One document per line, streamed: an object with a string 'text' (and an optional 'id'). Blank lines are
    skipped. A broken line stops everything with its file:line."""
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                line = raw.decode("utf-8", errors="replace")
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    die(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno}); each line must be one JSON object")
                if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                    die(f"{path}:{lineno}: no string 'text' field; each line must look like {{\"text\": \"...\"}}")
                obj["id"] = str(obj["id"]) if obj.get("id") is not None else f"{name}:{lineno}"
                yield obj
    except (OSError, EOFError, zlib.error) as e:  # a truncated or corrupt .gz
        die(f"{path}: cannot be read ({e}); is it a complete .jsonl.gz?")


def count_documents(files, chunk_chars=8192):
    """How many documents read_documents will give (for the progress line's ETA): the non-blank lines of the
    .jsonl files, and the .txt files' documents. A quick pass: no JSON is parsed."""
    n = 0
    for path, name in files:
        if path.name.endswith(".txt"):
            with contextlib.redirect_stderr(io.StringIO()):  # read_documents warns about bad bytes, once
                n += len(text_file_documents(path, name, chunk_chars))
            continue
        try:
            with (gzip.open if path.name.endswith(".gz") else open)(path, "rb") as f:
                n += sum(1 for line in f if line.strip())
        except (OSError, EOFError, zlib.error) as e:
            die(f"{path}: cannot be read ({e}); is it a complete .jsonl.gz?")
    return n


def read_documents(files, chunk_chars=8192):
    for path, name in files:
        if path.name.endswith(".txt"):
            yield from text_file_documents(path, name, chunk_chars)
        else:
            yield from jsonl_documents(path, name)

# -----------------------------------------------------------------------------
# normalisation and the quality rules. A rule takes a document's text and returns (None, text) to keep it, or
# (rule name, text) to drop it; c4 also rewrites the text it keeps.

SURROGATE = re.compile("[\ud800-\udfff]")


def normalize(text):
    """NFC, '\\n' newlines, lone surrogates (JSON allows "\\ud800"; UTF-8 cannot hold them) to U+FFFD."""
    return SURROGATE.sub("\ufffd", unicodedata.normalize("NFC", text.replace("\r\n", "\n").replace("\r", "\n")))


def duplicates(items):
    """(how many items repeat an earlier one, their characters)."""
    seen, n, chars = set(), 0, 0
    for x in items:
        if x in seen:
            n, chars = n + 1, chars + len(x)
        seen.add(x)
    return n, chars


def gopher(text):
    words = text.split()
    content = [w for w in words if not SYMBOL_WORD.fullmatch(w)]  # words of punctuation only do not count
    if len(content) < 50:
        return "gopher_short_doc", text
    if len(content) > 100_000:
        return "gopher_long_doc", text
    mean = sum(map(len, content)) / len(content)
    if mean < 3:
        return "gopher_below_avg_threshold", text
    if mean > 10:
        return "gopher_above_avg_threshold", text
    n = len(words)
    if text.count("#") / n > 0.1:
        return "gopher_too_many_hashes", text
    if (text.count("...") + text.count("…")) / n > 0.1:
        return "gopher_too_many_ellipsis", text
    lines = text.splitlines()
    if sum(l.lstrip().startswith(("•", "-")) for l in lines) / len(lines) > 0.9:
        return "gopher_too_many_bullets", text
    if sum(l.rstrip().endswith(("...", "…")) for l in lines) / len(lines) > 0.3:
        return "gopher_too_many_end_ellipsis", text
    if sum(any(c.isalpha() for c in w) for w in words) / n < 0.8:
        return "gopher_below_alpha_threshold", text
    if len(STOP_WORDS.intersection(words)) < 2:
        return "gopher_enough_stop_words", text
    return None, text


def repeated_ngram_chars(words, n):
    """Characters of the n-grams (words joined without spaces) that repeat an earlier one, scanning left to
    right and jumping past a repeat, so that overlapping repeats are not counted twice (Gopher's rule)."""
    seen, chars, i = set(), 0, 0
    while i < len(words) - n + 1:
        gram = "".join(words[i:i + n])
        if gram in seen:
            chars, i = chars + len(gram), i + n
        else:
            seen.add(gram)
            i += 1
    return chars


def repetition(text):
    if not text:
        return "empty", text
    for what, parts in (("para", re.split(r"\n{2,}", text.strip())), ("line", re.split(r"\n+", text))):
        n, chars = duplicates(parts)
        if n / len(parts) > 0.3:
            return f"dup_{what}_frac", text
        if chars / len(text) > 0.2:
            return f"dup_{what}_char_frac", text
    words = text.split()
    for n, frac in ((2, 0.2), (3, 0.18), (4, 0.16)):
        grams = [" ".join(words[i:i + n]) for i in range(len(words) - n + 1)]
        if grams:
            gram, count = Counter(grams).most_common(1)[0]  # the first seen of the most frequent
            if len(gram) * count / len(text) > frac:
                return f"top_{n}_gram", text
    for n, frac in ((5, 0.15), (6, 0.14), (7, 0.13), (8, 0.12), (9, 0.11), (10, 0.10)):
        if repeated_ngram_chars(words, n) / len(text) > frac:
            return f"duplicated_{n}_n_grams", text
    return None, text


def sentences(text):
    """Sentences: split after . ! or ? followed by whitespace (datatrove uses NLTK's punkt here)."""
    return [s for s in SENTENCE_END.split(text.strip()) if s]


def c4(text):
    kept, n_sentences = [], 0
    for line in text.splitlines():
        line = line.strip()
        words = line.split()
        if any(len(w) > 1000 for w in words):
            continue
        line = CITATION.sub("", line)
        if not line.endswith(C4_END) or line.endswith("..."):
            continue
        if len(words) < 3:
            continue
        low = line.lower()
        if "lorem ipsum" in low:
            return "lorem_ipsum", text
        if "javascript" in low:
            continue
        if "{" in line:
            return "curly_bracket", text
        if any(p in low for p in C4_POLICY):
            continue
        n_sentences += len(sentences(line))
        kept.append(line)
    if n_sentences < 5:
        return "too_few_sentences", text
    return None, "\n".join(kept).strip()


def fineweb(text):
    lines = [l for l in text.split("\n") if l.strip()]
    if not lines:
        return "empty", text
    if sum(bool(ENDS_TERMINAL.search(l)) for l in lines) / len(lines) < 0.12:
        return "line_punct_ratio", text
    if sum(len(l) <= 30 for l in lines) / len(lines) > 0.67:
        return "short_line_ratio", text
    if duplicates(lines)[1] / len(text.replace("\n", "")) > 0.01:
        return "char_dup_ratio", text
    if text.count("\n") / len(text.split()) > 0.3:
        return "list_ratio", text
    return None, text


FILTERS = {"gopher": gopher, "repetition": repetition, "c4": c4, "fineweb": fineweb}

# -----------------------------------------------------------------------------
# MinHash: shingles -> signatures -> LSH bands -> clusters


def _simplify_unicode(text):
    text = NUMBER.sub("0", text.lower()).encode("utf-8", "surrogatepass").translate(ASCII_TO_SPACE).decode(
        "utf-8", "surrogatepass")  # (bytes >= 128 are left as they are: UTF-8 stays whole)
    if not text.isascii():  # the other punctuation; NFD, then the combining marks dropped: diacritics stripped
        text = COMBINING.sub("", unicodedata.normalize("NFD", OTHER_PUNCTUATION.sub(" ", text)))
    return " ".join(text.split())


# Each step of the normalisation stays within a word (a run without whitespace): a number, a lowercased letter
# (Greek's final sigma looks no further than the next space), a decomposed character. So the words with a
# non-ASCII byte (few, even in texts full of names) go through the Unicode steps one by one, and the rest of the
# text through byte-level ones, many times quicker on long texts (0.72 s -> 0.2 s on the copyright files). There
# the numbers are found without a regex: with every digit a 0 and every ',' a '.' (both turn into spaces later
# anyway), a number is a run of 0s, then maybe '.' and another run; runs shrink to one 0 (a numpy mask: 5x
# quicker than repeated bytes.replace), then each leftmost "0.0" to 0, as NUMBER's leftmost matches would.
ASCII_WHITESPACE = np.zeros(256, bool)
ASCII_WHITESPACE[list(b" \t\n\r\x0b\x0c")] = True
ASCII_LOWER_DIGITS = bytes(range(256)).lower().translate(bytes.maketrans(b"0123456789,", b"0000000000."))


def simplify_bytes(text):
    """datatrove's normalisation before shingling, so that near copies match: the words, joined by one space,
    UTF-8 encoded. (Lowercase, numbers to 0, punctuation to spaces, diacritics stripped.)"""
    b = text.encode("utf-8", "surrogatepass")
    held = []
    if not text.isascii():  # each word with a byte >= 128 is set aside, a lone byte 0x80 in its place
        a = np.frombuffer(b, np.uint8)
        space = np.flatnonzero(ASCII_WHITESPACE[a])
        high = np.flatnonzero(a >= 128)
        k = np.searchsorted(space, high)
        starts = np.where(k > 0, space[np.maximum(k - 1, 0)] + 1, 0) if len(space) else np.zeros_like(high)
        ends = np.append(space, len(b))[k]
        first = np.concatenate(([True], starts[1:] != starts[:-1]))
        pieces, pos = [], 0
        for s, e in zip(starts[first].tolist(), ends[first].tolist()):
            pieces += [b[pos:s], b"\x80"]
            held.append(_simplify_unicode(b[s:e].decode("utf-8", "surrogatepass")).encode("utf-8", "surrogatepass"))
            pos = e
        b = b"".join(pieces) + b[pos:]
    a = np.frombuffer(b.translate(ASCII_LOWER_DIGITS), np.uint8)
    zero = a == 48
    zero[1:] &= ~zero[:-1]  # the first 0 of each run, then a run becomes that 0
    zero |= a != 48
    b = a[zero].tobytes().replace(b"0.0", b"0").translate(ASCII_TO_SPACE)
    if held:
        parts = b.split(b"\x80")
        b = b"".join(x for pair in zip(parts, held) for x in pair) + parts[-1]
    return b" ".join(b.split())


def simplify(text):
    """simplify_bytes as a string."""
    return simplify_bytes(text).decode("utf-8", "surrogatepass")


def sha1_32(s):
    return struct.unpack("<I", hashlib.sha1(s.encode()).digest()[:4])[0]


_POW = np.ones(1, dtype=np.uint64)  # powers of an odd multiplier mod 2^64, and of its inverse (grown on demand)
_INV = np.ones(1, dtype=np.uint64)
_MULT = 0x100000001B3  # FNV's 64-bit prime: odd, so it has an inverse mod 2^64


def _powers(n):
    global _POW, _INV
    if len(_POW) < n:
        k = max(n, 2 * len(_POW))
        one = np.ones(1, dtype=np.uint64)
        _POW = np.concatenate([one, np.cumprod(np.full(k - 1, _MULT, dtype=np.uint64))])  # wraps mod 2^64
        _INV = np.concatenate([one, np.cumprod(np.full(k - 1, pow(_MULT, -1, 1 << 64), dtype=np.uint64))])
    return _POW[:n], _INV[:n]


def shingles(text, mode="fast"):
    """The 32-bit hashes of the word 5-grams of the simplified text (uint64 array; empty below 5 words).
    compat: SHA-1 of each n-gram string, as datatrove and datasketch. fast: a polynomial hash of each n-gram's
    bytes, for all of them at once: with G the prefix sums of byte_k * m^k (mod 2^64), the bytes [s, e) hash to
    (G[e] - G[s]) * m^-s; mixed, then its top 32 bits."""
    s = simplify_bytes(text)
    if mode == "compat":
        w = s.decode("utf-8", "surrogatepass").split()
        return np.fromiter((sha1_32(" ".join(w[i:i + NGRAM])) for i in range(len(w) - NGRAM + 1)), dtype=np.uint64)
    b = np.frombuffer(s, dtype=np.uint8)
    spaces = np.flatnonzero(b == 32)
    if len(spaces) < NGRAM - 1 or not len(b):
        return np.zeros(0, dtype=np.uint64)
    starts = np.concatenate([[0], spaces + 1])[:len(spaces) + 1 - (NGRAM - 1)]  # word starts and ends
    ends = np.concatenate([spaces, [len(b)]])[NGRAM - 1:]
    pw, inv = _powers(len(b) + 1)
    with np.errstate(over="ignore"):
        g = np.concatenate([np.zeros(1, np.uint64), np.cumsum(b.astype(np.uint64) * pw[:len(b)], dtype=np.uint64)])
        h = (g[ends] - g[starts]) * inv[starts]
        # murmur3's finalizer: the polynomial hashes of overlapping n-grams are related linearly, and so are the
        # permutations. Unmixed, LSH found too few of the copyright files' pairs of Jaccard 0.4-0.8 (0.068 over
        # 5 permutation seeds, where the S-curve expects 0.085 and SHA-1 gives 0.083); mixed, 0.087
        h ^= h >> np.uint64(33)
        h *= np.uint64(0xFF51AFD7ED558CCD)
        h ^= h >> np.uint64(33)
        h *= np.uint64(0xC4CEB9FE1A85EC53)
        h ^= h >> np.uint64(33)
        return h >> np.uint64(32)


def distinct(h):
    """The distinct values of h, sorted (np.unique hashes them: 8x slower on shingles)."""
    h = np.sort(h)
    return h[np.concatenate(([True], h[1:] != h[:-1]))] if len(h) else h


def permutations(n=BANDS * ROWS, seed=SEED):
    """(a, b) of the n hash permutations, drawn as datatrove draws them (a in [1, p), then b in [0, p))."""
    gen = np.random.RandomState(seed)
    return (gen.randint(1, MERSENNE, dtype=np.uint64, size=n), gen.randint(0, MERSENNE, dtype=np.uint64, size=n))


def signatures(shingle_sets, perms, rows=2048):
    """(n_docs, 112) uint32 MinHash signatures: per permutation, the minimum of ((h*a + b) mod (2^61-1)) over
    the document's shingles, its low 32 bits, as datatrove and datasketch compute it (h*a wraps at 2^64 there
    too). All documents' shingles go through in blocks of `rows` into buffers allocated once (4x faster than
    fresh arrays), and the remainder by the Mersenne prime is a shift and an add instead of a division (4x
    again). An empty set gives all 0xFFFFFFFF."""
    a, b = perms
    p, lo32, s61 = np.uint64(MERSENNE), np.uint64(0xFFFFFFFF), np.uint64(61)
    out = np.full((len(shingle_sets), len(a)), 0xFFFFFFFF, dtype=np.uint64)
    docs = np.array([k for k, s in enumerate(shingle_sets) if len(s)], dtype=np.int64)  # the non-empty ones
    if not len(docs):
        return out.astype(np.uint32)
    h = np.concatenate([shingle_sets[k] for k in docs]).astype(np.uint64)
    ends = np.cumsum([len(shingle_sets[k]) for k in docs])
    starts = ends - [len(shingle_sets[k]) for k in docs]
    x, t = np.empty((rows, len(a)), np.uint64), np.empty((rows, len(a)), np.uint64)
    big = np.empty((rows, len(a)), bool)
    for lo in range(0, len(h), rows):
        n = min(rows, len(h) - lo)
        xx, tt, bb = x[:n], t[:n], big[:n]
        np.multiply(h[lo:lo + n, None], a, out=xx)  # wraps at 2^64, as the references do
        xx += b
        np.right_shift(xx, s61, out=tt)  # x mod p = (x & p) + (x >> 61), less p once if that reaches p
        xx &= p
        xx += tt
        np.greater_equal(xx, p, out=bb)
        if bb.any():  # a sum that reaches p: 8 in 2^61, so the subtraction's pass is almost always skipped
            np.subtract(xx, p, out=xx, where=bb)
        xx &= lo32
        first, last = np.searchsorted(ends, [lo, lo + n - 1], side="right")  # the documents this block touches
        if first == last:  # one document (a long one): a plain min is 2x faster than reduceat
            out[docs[first]] = np.minimum(out[docs[first]], xx.min(0))
            continue
        seg = docs[first:last + 1]
        offsets = np.maximum(starts[first:last + 1], lo) - lo
        out[seg] = np.minimum(out[seg], np.minimum.reduceat(xx, offsets, axis=0))
    return out.astype(np.uint32)


def lsh_buckets(sigs, bands=BANDS, rows=ROWS):
    """For each band, the groups (arrays of document numbers, ascending) of 2 or more documents whose rows in
    that band are equal: the candidates of LSH."""
    groups = []
    for k in range(bands):
        keys = np.ascontiguousarray(sigs[:, k * rows:(k + 1) * rows]).view(np.dtype((np.void, 4 * rows))).ravel()
        _, inv, counts = np.unique(keys, return_inverse=True, return_counts=True)
        order = np.argsort(inv, kind="stable")
        split = np.split(order, np.cumsum(counts)[:-1])
        groups += [g for g in split if len(g) > 1]
    return groups


def candidate_pairs(sigs, bands=BANDS, rows=ROWS):
    """Every pair (i < j) of documents that share a band: what LSH proposes (MinHashLSH's query results)."""
    pairs = set()
    for g in lsh_buckets(sigs, bands, rows):
        g = g.tolist()
        pairs.update((g[x], g[y]) for x in range(len(g)) for y in range(x + 1, len(g)))
    return pairs


def find(parent, i):
    """Union-find's root of i, halving the path on the way (every other node then points to its grandparent)."""
    while parent[i] != i:
        parent[i] = parent[parent[i]]
        i = parent[i]
    return i


def union(parent, i, j):
    """Join the clusters of i and j under the lower root: each cluster's root is its lowest document."""
    ri, rj = find(parent, i), find(parent, j)
    if ri != rj:
        parent[max(ri, rj)] = min(ri, rj)


def jaccard_of(a, b):
    """Exact Jaccard similarity of two sorted sets of shingle hashes."""
    inter = len(np.intersect1d(a, b, assume_unique=True))
    return inter / (len(a) + len(b) - inter) if len(a) + len(b) else 0.0


def clusters(sigs, shingle_sets=None, threshold=0.0):
    """The parent array of the near-duplicate clusters of the documents with signatures `sigs`: find(parent, i)
    is the lowest document of i's cluster. With a threshold, a candidate pair joins only if the Jaccard
    similarity of its shingle sets (shingle_sets(i) -> sorted unique array) is at least that; a pair already in
    one cluster is not checked again (the clusters come out the same, without the quadratic work)."""
    parent = list(range(len(sigs)))
    for g in lsh_buckets(sigs):
        g = g.tolist()
        if not threshold:
            for j in g[1:]:
                union(parent, g[0], j)
            continue
        for x in range(len(g)):
            for y in range(x + 1, len(g)):
                i, j = g[x], g[y]
                if find(parent, i) != find(parent, j) and jaccard_of(shingle_sets(i), shingle_sets(j)) >= threshold:
                    union(parent, i, j)
    return parent

# -----------------------------------------------------------------------------
# the pipeline: documents stream through in order-keeping chunks (one worker or many: the same result), and
# each stage leaves its result in work/, so that a re-run with the same input and settings skips it

_PERMS = {}


def _first_pass(job):
    """The per-document work, in a worker: normalize, drop the tiny, apply the rules, then the exact hash and the
    MinHash signature of each survivor. job: (chunk of (number, doc), filter names, min_doc_chars, hash mode
    or None). Returns per document ("drop", i, id, stage, rule, bytes) or ("keep", i, doc, bytes, hash, signature
    or None (no shingle: under 5 words, or no minhash), bytes the c4 rule cut from a document it kept)."""
    chunk, names, min_chars, mode = job
    out, sets = [], []
    for i, doc in chunk:
        raw = doc["text"]
        size = len(raw.encode("utf-8", errors="surrogatepass"))
        text = normalize(raw)
        if len(text.strip()) < min_chars:
            out.append(("drop", i, doc["id"], "tiny", f"under {min_chars} chars", size))
            continue
        rule, before = None, len(text.encode())
        for name in names:
            rule, text = FILTERS[name](text)
            if rule:
                break
        if rule:
            out.append(("drop", i, doc["id"], "filters", f"{name}:{rule}", size))
            continue
        data = text.encode()
        out.append(["keep", i, {**doc, "text": text}, size, hashlib.blake2b(data, digest_size=16).digest(), None,
                    before - len(data)])
        sh = distinct(shingles(text, mode)) if mode else ()  # each shingle once: fewer rows to permute
        if len(sh):
            sets.append((len(out) - 1, sh))
    if sets:
        perms = _PERMS.setdefault("p", permutations())
        for (k, _), sig in zip(sets, signatures([s for _, s in sets], perms)):
            out[k][5] = sig
    return out


def _chunks(docs, size=64):
    chunk = []
    for i, doc in enumerate(docs):
        chunk.append((i, doc))
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _stamp_ok(path, want):
    try:
        return json.loads(Path(path).read_text()).get("key") == want
    except (OSError, ValueError):
        return False


def _write_json(path, obj):
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj) + "\n")


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)


def run(docs, out_dir, filters=(), dedup=("exact", "minhash"), min_doc_chars=16, jaccard=0.8, hash_mode="fast",
        quality_model="", quality_keep=1.0, quality_threshold=0.0, workers=1, fingerprint=None, total=None,
        log=print, quality_label="hq"):
    """Clean `docs` (an iterable of dicts with "id" and "text") into out_dir (see the module docstring) and
    return the summary. fingerprint: what identifies the input (None: never skip a stage); total: the number of
    documents, for the progress line's ETA."""
    filters, dedup = list(filters), list(dedup)
    bad = [f for f in filters if f not in FILTERS] + [d for d in dedup if d not in ("exact", "minhash")]
    if bad:
        die(f"unknown filter or dedup '{bad[0]}': filters are {', '.join(FILTERS)}; dedup is exact, minhash")
    if not 0 < quality_keep <= 1:
        die(f"quality_keep must be in (0, 1], got {quality_keep}")
    model = classifier_for(quality_model, quality_label) if quality_model else None  # checked before any work
    out, work = Path(out_dir), Path(out_dir) / "work"
    work.mkdir(parents=True, exist_ok=True)
    mode = hash_mode if "minhash" in dedup else None
    t0 = time.time()

    # 1. normalize, rules, exact hashes and signatures
    key1 = {"input": fingerprint, "filters": filters, "min_doc_chars": min_doc_chars, "hash": mode}
    if fingerprint is not None and _stamp_ok(work / "stage1.json", key1):
        log(f"clean: normalize and filters already done ({work / 'stage1.json'}): skipped")
        stage1 = json.loads((work / "stage1.json").read_text())
    else:
        (work / "stage1.json").unlink(missing_ok=True)
        stage1 = _stage_one(docs, work, filters, min_doc_chars, mode, workers, total, key1)
    if stage1["docs"] == 0:
        die("the input holds no documents (empty files?)")

    # 2. exact and near duplicates, among the survivors (rows of kept1.jsonl)
    key2 = {"stage1": stage1["run"], "dedup": dedup, "jaccard": jaccard}
    if _stamp_ok(work / "stage2.json", key2) and fingerprint is not None:
        log("clean: duplicates already found: skipped")
        stage2 = json.loads((work / "stage2.json").read_text())
    else:
        stage2 = _stage_two(work, dedup, jaccard, key2, log)
    gone = {int(k): v for k, v in stage2["removed"].items()}  # row -> [stage, row it duplicates]

    # 3. the quality classifier on what is left
    scores, low = {}, set()
    if model is not None:
        key3 = {"stage2": stage2["key"], "model": _file_key(quality_model), "label": quality_label,
                "keep": quality_keep, "threshold": quality_threshold}
        if _stamp_ok(work / "stage3.json", key3) and fingerprint is not None:
            log("clean: quality scores already computed: skipped")
            stage3 = json.loads((work / "stage3.json").read_text())
        else:
            stage3 = _stage_three(work, model, quality_label, gone, quality_keep, quality_threshold, key3, log)
        scores = {int(k): v for k, v in stage3["scores"].items()}
        low = set(stage3["dropped"])

    # 4. the outputs, in input order: kept documents, and every removal with its reason
    summary = _write_outputs(out, work, gone, scores, low, stage1)
    _write_json(out / "summary.json", summary)
    log(summary_table(summary) + f"\nclean: {time.time() - t0:.1f}s")
    return summary


def _stage_one(docs, work, filters, min_doc_chars, mode, workers, total, key):
    prog = Progress(total, "clean: normalize + filters" + (" + signatures" if mode else ""), unit=" docs")
    n_docs = n_bytes = 0
    hashes, sigs, has_sig, counts = [], [], [], Counter()
    pool = None
    if workers > 1:
        import multiprocessing
        pool = multiprocessing.get_context("spawn").Pool(workers)  # spawn: the caller may hold threads (torch)
    try:
        with atomic_path(work / "kept1.jsonl") as kept_tmp, atomic_path(work / "removed1.jsonl") as rem_tmp, \
                open(kept_tmp, "w", encoding="utf-8") as kept, open(rem_tmp, "w", encoding="utf-8") as removed:
            def take(chunk):
                nonlocal n_docs, n_bytes
                for r in chunk:
                    n_docs += 1
                    if r[0] == "drop":
                        _, i, doc_id, stage, rule, size = r
                        n_bytes += size
                        counts[f"{stage}\t{rule}"] += 1
                        counts[f"{stage}\t{rule}\tbytes"] += size
                        removed.write(json.dumps({"i": i, "id": doc_id, "stage": stage, "rule": rule}) + "\n")
                        continue
                    _, i, doc, size, digest, sig, c4_bytes = r
                    n_bytes += size
                    if c4_bytes:
                        counts["filters\tc4:lines dropped (document kept)"] += 1
                        counts["filters\tc4:lines dropped (document kept)\tbytes"] += c4_bytes
                    kept.write(json.dumps({"i": i, **doc}, ensure_ascii=False) + "\n")
                    hashes.append(np.frombuffer(digest, dtype=np.uint8))
                    has_sig.append(sig is not None)
                    sigs.append(sig if sig is not None else np.full(BANDS * ROWS, 0xFFFFFFFF, dtype=np.uint32))
                prog.update(len(chunk))
            # documents are read here, in this thread (a broken line stops the run with its file:line); the
            # workers get chunks, and their results are taken in order, a bounded number in flight
            pending = []
            for chunk in _chunks(docs):
                job = (chunk, filters, min_doc_chars, mode)
                if pool is None:
                    take(_first_pass(job))
                    continue
                pending.append(pool.apply_async(_first_pass, (job,)))
                while len(pending) > 4 * workers:
                    take(pending.pop(0).get())
            for p in pending:
                take(p.get())
    finally:
        if pool:
            pool.terminate()
    prog.update(0, force=True)
    n = len(hashes)
    np.save(work / "hashes.npy", np.stack(hashes) if n else np.zeros((0, 16), np.uint8))
    np.save(work / "sigs.npy", np.stack(sigs) if n else np.zeros((0, BANDS * ROWS), np.uint32))
    np.save(work / "has_sig.npy", np.array(has_sig, dtype=bool))
    stage1 = {"key": key, "docs": n_docs, "bytes": n_bytes, "kept": n, "counts": dict(counts)}
    stage1["run"] = hashlib.sha256(json.dumps(stage1, sort_keys=True).encode()).hexdigest()[:16]  # what stage 2 builds on
    _write_json(work / "stage1.json", stage1)  # last: the stamp says the files above are complete
    return stage1


def _stage_two(work, dedup, jaccard, key, log):
    hashes, sigs = np.load(work / "hashes.npy"), np.load(work / "sigs.npy")
    has_sig = np.load(work / "has_sig.npy")
    removed = {}
    if "exact" in dedup:
        first = {}
        for row, h in enumerate(hashes):
            first.setdefault(h.tobytes(), row)
            if first[h.tobytes()] != row:
                removed[row] = ["exact", first[h.tobytes()]]
    if "minhash" in dedup:
        rows = np.flatnonzero(has_sig & ~np.isin(np.arange(len(sigs)), list(removed)))
        t = time.time()
        sets = {}
        if jaccard:  # the shingles of the documents LSH puts in a bucket, read back from kept1.jsonl
            need = set()
            for g in lsh_buckets(sigs[rows]):
                need.update(rows[g].tolist())
            for row, doc in enumerate(read_jsonl(work / "kept1.jsonl")):
                if row in need:
                    sets[row] = distinct(shingles(doc["text"], "fast"))
        parent = clusters(sigs[rows], lambda k: sets[int(rows[k])], jaccard)
        for k, row in enumerate(rows.tolist()):
            root = find(parent, k)
            if root != k:
                removed[row] = ["minhash", int(rows[root])]
        log(f"clean: minhash: {len(rows):,} documents, {sum(v[0] == 'minhash' for v in removed.values()):,} near "
            f"duplicates ({time.time() - t:.1f}s)")
    stage2 = {"key": key, "removed": {str(k): v for k, v in sorted(removed.items())}}
    _write_json(work / "stage2.json", stage2)
    return stage2


def _stage_three(work, model, label, gone, keep, threshold, key, log):
    rows, texts, probs = [], [], []
    positive = labels_of(model).index(label)
    for row, doc in enumerate(read_jsonl(work / "kept1.jsonl")):
        if row not in gone:
            rows.append(row)
            texts.append(doc["text"])
        if len(texts) == 256:
            probs.append(predict_proba(model, texts)[:, positive])
            texts = []
    if texts:
        probs.append(predict_proba(model, texts)[:, positive])
    scores = np.concatenate(probs) if probs else np.zeros(0)
    if threshold > 0:
        chosen = set(np.flatnonzero(scores >= threshold).tolist())
    else:
        chosen = set(quantile_keep(scores, keep).tolist())
    dropped = [rows[k] for k in range(len(rows)) if k not in chosen]
    log(f"clean: quality: {len(rows):,} documents scored, {len(dropped):,} below "
        + (f"the threshold {threshold}" if threshold > 0 else f"the top {keep:.0%}"))
    stage3 = {"key": key, "scores": {str(r): round(float(s), 6) for r, s in zip(rows, scores)}, "dropped": dropped}
    _write_json(work / "stage3.json", stage3)
    return stage3


def _file_key(path):
    st = Path(path).stat()
    return [str(Path(path).resolve()), st.st_size, st.st_mtime_ns]


def _write_outputs(out, work, gone, scores, low, stage1):
    """docs.jsonl and removed.jsonl in input order (the filters' removals, in order already, are merged with the
    later stages' by document number), and the counts of the summary."""
    counts = Counter(stage1["counts"])
    ids = {}  # the ids of the rows others duplicate (always earlier rows)
    targets = {v[1] for v in gone.values()}
    earlier = read_jsonl(work / "removed1.jsonl")
    pending = next(earlier, None)
    kept_docs = kept_bytes = 0
    with atomic_path(out / "docs.jsonl") as docs_tmp, atomic_path(out / "removed.jsonl") as rem_tmp, \
            open(docs_tmp, "w", encoding="utf-8") as docs, open(rem_tmp, "w", encoding="utf-8") as removed:
        def flush_before(i):
            nonlocal pending
            while pending is not None and (i is None or pending["i"] < i):
                removed.write(json.dumps({k: pending[k] for k in ("id", "stage", "rule")}, ensure_ascii=False) + "\n")
                pending = next(earlier, None)
        for row, doc in enumerate(read_jsonl(work / "kept1.jsonl")):
            flush_before(doc["i"])
            if row in targets:
                ids[row] = doc["id"]
            size = len(doc["text"].encode())
            if row in gone:
                stage, of = gone[row]
                removed.write(json.dumps({"id": doc["id"], "stage": stage, "duplicate_of": ids[of]}, ensure_ascii=False) + "\n")
                counts[f"{stage}\tduplicate"] += 1
                counts[f"{stage}\tduplicate\tbytes"] += size
            elif row in low:
                removed.write(json.dumps({"id": doc["id"], "stage": "quality", "score": scores[row]}, ensure_ascii=False) + "\n")
                counts["quality\tlow score"] += 1
                counts["quality\tlow score\tbytes"] += size
            else:
                del doc["i"]
                docs.write(json.dumps(doc, ensure_ascii=False) + "\n")
                kept_docs, kept_bytes = kept_docs + 1, kept_bytes + size
        flush_before(None)
    rules = [{"stage": k.split("\t")[0], "rule": k.split("\t")[1], "docs": v, "bytes": counts[k + "\tbytes"]}
             for k, v in counts.items() if not k.endswith("\tbytes")]
    rules.sort(key=lambda r: (STAGES.index(r["stage"]), -r["bytes"]))
    return {"input": {"docs": stage1["docs"], "bytes": stage1["bytes"]}, "kept": {"docs": kept_docs, "bytes": kept_bytes},
            "removed": rules}


def summary_table(summary):
    """The summary as a table: documents and bytes removed by each stage and rule, then what is kept."""
    n, b = summary["input"]["docs"], summary["input"]["bytes"]
    lines = [f"{'stage':<9} {'rule':<44} {'docs':>9} {'% docs':>7} {'bytes':>10} {'% bytes':>8}",
             f"{'input':<9} {'':<44} {n:>9,} {'':>7} {fmt_num(b):>10} {'':>8}"]
    for r in summary["removed"]:
        lines.append(f"{r['stage']:<9} {r['rule']:<44} {r['docs']:>9,} {100 * r['docs'] / n:>6.1f}% "
                     f"{fmt_num(r['bytes']):>10} {100 * r['bytes'] / max(b, 1):>7.1f}%")
    k = summary["kept"]
    lines.append(f"{'kept':<9} {'':<44} {k['docs']:>9,} {100 * k['docs'] / n:>6.1f}% {fmt_num(k['bytes']):>10} "
                 f"{100 * k['bytes'] / max(b, 1):>7.1f}%")
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# the quality classifier: fastText's supervised model (Joulin et al. 2016, "Bag of Tricks for Efficient Text
# Classification") from scratch in numpy.
#   features  the example's words (whitespace split, plus fastText's end-of-line token "</s>") that are in the
#             vocabulary, and its word bigrams hashed into `buckets` extra rows (out-of-vocabulary words too)
#   model     hidden = mean of the features' input rows; softmax(output @ hidden) over the labels
#   training  plain SGD one example at a time, in order, lr decaying linearly to 0 over all the tokens of all
#             epochs, touching only the rows the example uses (so a step costs its length, not the matrix)
# Features, hashing and update rule are fastText's `supervised` with softmax loss (the tests check them against
# the real thing). The defaults: fastText's epoch and lr; dim 16 and 2**18 buckets instead of its 100 and 2M
# (800 MB of float32s): 16 MB per model, enough for a quality score (raise buckets for large training sets).

LABEL_PREFIX = "__label__"
EOS = "</s>"  # fastText ends every example with this token; it is an ordinary vocabulary word (a learned bias)
# fastText's readWord splits on exactly these characters (C isspace plus NUL), not on Unicode spaces
SPACES = re.compile(r"[ \t\n\v\f\r\0]+")
NGRAM_MULT = 116049371  # fastText's multiplier for folding word hashes into an n-gram hash
MAGIC, VERSION = "clean.py quality classifier", 1


def read_fasttext(path):
    """(texts, labels) from fastText's format: one example a line, '__label__X words ...'. Several leading
    labels are allowed (the first is used); blank lines are skipped; texts come back single-spaced.
    fastText reads bytes: bytes that are not UTF-8 come back as surrogate escapes, hashed and written as
    the same bytes."""
    texts, labels = [], []
    # only '\n' ends a line, as in fastText
    with open(path, encoding="utf-8", errors="surrogateescape", newline="\n") as f:
        for lineno, line in enumerate(f, 1):
            words = [w for w in SPACES.split(line) if w]
            if not words:
                continue
            if not words[0].startswith(LABEL_PREFIX):
                raise ValueError(f"{path}:{lineno}: no {LABEL_PREFIX} at the start of the line "
                                 f"(fastText format is '{LABEL_PREFIX}X text')")
            k = next((i for i, w in enumerate(words) if not w.startswith(LABEL_PREFIX)), len(words))
            labels.append(words[0][len(LABEL_PREFIX):])
            texts.append(" ".join(words[k:]))
    return texts, labels


def write_fasttext(path, texts, labels):
    """Write examples in fastText's format; a text is written as its words joined by single spaces (so a
    newline inside it becomes a space), which is all that fastText or read_fasttext sees of it anyway."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8", errors="surrogateescape", newline="\n") as f:
        for text, label in zip(texts, labels, strict=True):
            if not label or SPACES.search(label):
                raise ValueError(f"label {label!r} must be non-empty with no whitespace")
            f.write(f"{LABEL_PREFIX}{label} {' '.join(w for w in SPACES.split(text) if w)}\n")


def ft_tokens(text):
    """fastText's tokens of one example: its whitespace-separated words, then "</s>"."""
    return [w for w in SPACES.split(text) if w] + [EOS]


@functools.lru_cache(maxsize=1 << 18)
def fnv1a(word):
    """fastText's word hash: 32-bit FNV-1a over the UTF-8 bytes, each byte sign-extended first (fastText
    hashes C chars, signed on x86, and froze that so released models hash alike everywhere)."""
    h = 2166136261
    for b in word.encode("utf-8", "surrogateescape"):
        h = ((h ^ (b | 0xFFFFFF00 if b >= 128 else b)) * 16777619) & 0xFFFFFFFF
    return h


def ft_features(words, vocab, buckets, word_ngrams):
    """Input-matrix rows of one tokenized example: its in-vocabulary words, then one row per word n-gram
    (n = 2..word_ngrams) at len(vocab) + hash % buckets. Unknown words still take part in the n-grams."""
    ids = np.array([vocab[w] for w in words if w in vocab], dtype=np.int64)
    # fastText stores word hashes as int32 and widens them to uint64 with sign extension: h >= 2**31 gets
    # 32 high one-bits before h = h * NGRAM_MULT + next (mod 2**64). numpy's uint64 wraps the same way.
    h = np.array([fnv1a(w) for w in words], np.uint32).view(np.int32).astype(np.int64).view(np.uint64)
    grams, parts = h, [ids]
    for _ in range(2, word_ngrams + 1):
        grams = grams[:-1] * np.uint64(NGRAM_MULT) + h[len(h) - len(grams) + 1:]
        parts.append((grams % np.uint64(buckets)).astype(np.int64) + len(vocab))
    return np.concatenate(parts)


def _example(text, vocab, buckets, word_ngrams):
    """(rows, counts, n): the distinct feature rows of a text, how often each occurs, and n = their total.
    The mean of the rows is counts @ input[rows] / n, so only those rows are ever read or written."""
    ids = ft_features(ft_tokens(text), vocab, buckets, word_ngrams)
    rows, counts = np.unique(ids, return_counts=True)
    return rows, counts.astype(np.float32), len(ids)


def _softmax(z):
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def fit_classifier(texts, labels, dim=16, epoch=5, lr=0.1, word_ngrams=2, buckets=1 << 18, min_count=1, seed=0):
    """fastText's supervised training (softmax loss, one thread) on texts and their labels -> a model dict:
    numpy arrays 'input' and 'output', and 'vocab', 'labels' (column order), 'word_ngrams', 'buckets'."""
    if len(texts) != len(labels) or not texts:
        raise ValueError(f"need one label per text and at least one text ({len(texts)} texts, {len(labels)} labels)")
    counts = Counter(w for t in texts for w in ft_tokens(t))
    # most frequent first, ties in order of first appearance (fastText sorts its vocabulary by count too)
    words = [w for w, c in counts.most_common() if c >= min_count]
    vocab = {w: i for i, w in enumerate(words)}
    names = sorted(set(labels))
    y = [names.index(label) for label in labels]
    rng = np.random.default_rng(seed)
    # fastText's init: input uniform in [-1/dim, 1/dim]; output zero, so training starts at uniform probabilities
    wi = (rng.random((len(words) + buckets, dim), dtype=np.float32) * 2 - 1) / dim
    wo = np.zeros((len(names), dim), np.float32)
    examples = [_example(t, vocab, buckets, word_ngrams) for t in texts]
    ntokens = [len(ft_tokens(t)) for t in texts]
    total, seen = epoch * sum(ntokens), 0
    onehot = np.eye(len(names), dtype=np.float32)
    for _ in range(epoch):
        for (rows, cnt, n), target, ntok in zip(examples, y, ntokens):
            lr_t = lr * (1 - seen / total)  # fastText recomputes it every 100 tokens; we do it every example
            seen += ntok
            if n == 0:  # no known word and no n-gram (only possible when min_count drops "</s>")
                continue
            hidden = cnt @ wi[rows] / n
            p = _softmax(wo @ hidden)
            # fastText, per label i: alpha = lr (1[i=y] - p_i); grad += alpha wo[i]; wo[i] += alpha hidden.
            # Each wo[i] is read before it is written and by no other label, so the loop is two matrix lines.
            alpha = lr_t * (onehot[target] - p)
            grad = alpha @ wo
            wo += np.outer(alpha, hidden)
            # supervised mode divides the gradient by the number of features, as the mean did in the forward
            # pass; a feature that occurs k times in the example gets it k times
            wi[rows] += cnt[:, None] * (grad / n)
    return dict(input=wi, output=wo, vocab=words, labels=names, word_ngrams=word_ngrams, buckets=buckets)


def labels_of(model):
    """The label names, in predict_proba's column order."""
    return list(model["labels"])


def predict_proba(model, texts):
    """(len(texts), n_labels) array of label probabilities. A text with no feature gets uniform ones."""
    if "index" not in model:  # built once per model: scoring goes in batches
        model["index"] = {w: i for i, w in enumerate(model["vocab"])}
    vocab, wi, wo = model["index"], model["input"], model["output"]
    hidden = np.zeros((len(texts), wi.shape[1]), np.float32)
    for i, text in enumerate(texts):
        rows, cnt, n = _example(text, vocab, model["buckets"], model["word_ngrams"])
        if n:
            hidden[i] = cnt @ wi[rows] / n
    return _softmax(hidden @ wo.T)


def save_classifier(model, path):
    """Write the model as an .npz of plain arrays (no pickle): magic, JSON metadata, input, output."""
    meta = dict(version=VERSION, vocab=model["vocab"], labels=model["labels"],
                word_ngrams=model["word_ngrams"], buckets=model["buckets"])
    with atomic_path(path) as tmp, open(tmp, "wb") as f:  # a file object, so numpy adds no '.npz' to the name
        np.savez(f, magic=np.array(MAGIC), meta=np.array(json.dumps(meta)),
                 input=model["input"], output=model["output"])


def load_classifier(path):
    """Read a model written by save_classifier(); anything else raises ValueError saying why."""
    def bad(why):
        return ValueError(f"{path} is not a quality classifier written by clean.py: {why}")
    with open(path, "rb") as f:  # a missing file stays a FileNotFoundError
        try:
            with np.load(f, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        except Exception as e:  # not a zip, a truncated zip, a bare .npy (no 'with'), pickled data...
            raise bad(f"not a readable .npz archive ({type(e).__name__})") from None
    if arrays.keys() != {"magic", "meta", "input", "output"} or arrays["magic"].shape != () \
            or str(arrays["magic"]) != MAGIC:
        raise bad(f"no '{MAGIC}' magic (arrays: {sorted(arrays)})")
    try:
        meta = json.loads(str(arrays["meta"]))
        vocab, labels, word_ngrams, buckets = meta["vocab"], meta["labels"], meta["word_ngrams"], meta["buckets"]
    except (ValueError, KeyError, TypeError) as e:
        raise bad(f"unreadable metadata ({type(e).__name__}: {e})") from None
    if meta.get("version") != VERSION:
        raise bad(f"format version {meta.get('version')!r}, this code reads version {VERSION}")
    wi, wo = arrays["input"], arrays["output"]
    if wi.dtype != np.float32 or wo.dtype != np.float32 or wi.ndim != 2 \
            or wo.shape != (len(labels), wi.shape[1]) or len(wi) != len(vocab) + buckets:
        raise bad(f"matrix shapes {wi.shape}, {wo.shape} do not match the metadata")
    return dict(input=wi, output=wo, vocab=vocab, labels=labels, word_ngrams=word_ngrams, buckets=buckets)


def quantile_keep(scores, keep):
    """Indices (ascending) of the top `keep` fraction of scores, 0 < keep <= 1: the best
    round-half-up(keep * n) of them, at least 1 when n > 0. Among equal scores the lower index wins, so the
    cut is deterministic; NaN ranks below everything."""
    if not 0 < keep <= 1:
        raise ValueError(f"keep must be in (0, 1], got {keep}")
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 1:
        raise ValueError(f"scores must be one-dimensional, got shape {scores.shape}")
    n = len(scores)
    k = max(1, math.floor(keep * n + 0.5)) if n else 0
    order = np.argsort(-scores, kind="stable")  # stable: equal scores stay in index order
    return np.sort(order[:k])



def classifier_for(path, label):
    """The classifier at path, for scoring by `label`: one clear error if it is missing or not one."""
    if not Path(path).is_file():
        die(f"quality_model '{path}' not found (train one with: python clean.py --train_classifier ...)")
    try:
        model = load_classifier(path)
    except ValueError as e:
        die(f"{e}; train one with: python clean.py --train_classifier ...")
    if label not in labels_of(model):
        die(f"{path} has no label '{label}' (it has {', '.join(labels_of(model))}): set --quality_label")
    return model


def main_train_classifier():
    """A reference-vs-other classifier: documents of the kind to keep (--positive, label 'hq') against the rest
    (--negative, 'lq'), or fastText __label__ files (--labeled). Shuffled with a fixed seed (fastText learns in
    file order: blocks of one label would be forgotten), 10% held out to report accuracy, saved to --out."""
    if labeled:
        texts, labels = [], []
        for path, _ in input_files(labeled):
            try:
                t, l = read_fasttext(path)
            except ValueError as e:
                die(str(e))
            texts, labels = texts + t, labels + l
    elif positive and negative:
        pos = [d["text"] for d in read_documents(input_files(positive), chunk_chars)]
        neg = [d["text"] for d in read_documents(input_files(negative), chunk_chars)]
        texts, labels = pos + neg, ["hq"] * len(pos) + ["lq"] * len(neg)
    else:
        die("--train_classifier needs --positive=FILES and --negative=FILES, or --labeled=FASTTEXT_FILES")
    counts = Counter(labels)
    if len(counts) < 2 or min(counts.values()) < 2:
        die(f"a classifier needs at least 2 labels with 2 examples each, got {dict(counts)}")
    order = np.random.default_rng(0).permutation(len(texts))
    n_val = max(1, len(texts) // 10)
    val, tr = order[:n_val], order[n_val:]
    t0 = time.time()
    model = fit_classifier([texts[i] for i in tr], [labels[i] for i in tr], dim, epoch, lr, word_ngrams, buckets)
    probs = predict_proba(model, [texts[i] for i in val])
    acc = np.mean([labels_of(model)[k] == labels[i] for k, i in zip(probs.argmax(1), val)])
    save_classifier(model, out)
    print(f"trained on {len(tr):,} documents ({', '.join(f'{k} {v:,}' for k, v in sorted(counts.items()))}) in "
          f"{time.time() - t0:.1f}s: held-out accuracy {acc:.3f} on {n_val:,}; wrote {out}")


def fingerprint_of(files, chunk_chars):
    """What identifies an input for skipping done stages: each file's path, size and modification time."""
    return {"files": [_file_key(p) for p, _ in files], "chunk_chars": chunk_chars}


def listed(value, what):
    """'a,b' -> ['a', 'b']; a config value given as a tuple or list is taken as it is."""
    items = value if isinstance(value, (list, tuple)) else [v.strip() for v in str(value).split(",") if v.strip()]
    if len(set(items)) != len(items):
        die(f"{what} lists something twice: {value!r}")
    return list(items)


def main():
    if train_classifier:
        return main_train_classifier()
    if not input or not output:
        die("give --input=FILES_OR_FOLDERS and --output=FOLDER (or --train_classifier)")
    files = input_files(input)
    out_dir = Path(output).resolve()
    inside = [p for p, _ in files if out_dir in p.resolve().parents]
    if inside:
        die(f"--output={output} holds the input file {inside[0]}: choose an output folder outside the input")
    run(read_documents(files, chunk_chars), out_dir, listed(filters, "filters"), listed(dedup, "dedup"), min_doc_chars,
        jaccard, hash_mode, quality_model, quality_keep, quality_threshold, workers, fingerprint_of(files, chunk_chars),
        count_documents(files, chunk_chars), quality_label=quality_label)
    print(f"wrote {out_dir / 'docs.jsonl'}, {out_dir / 'removed.jsonl'} and {out_dir / 'summary.json'}")


if __name__ == "__main__":
    config = configure(globals())
    if hash_mode not in ("fast", "compat"):
        die(f"hash_mode must be 'fast' or 'compat', got {hash_mode!r}")
    if workers < 1:
        die(f"workers must be at least 1, got {workers}")
    main()
