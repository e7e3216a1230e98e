"""
Prepare a dataset: raw text (embedded, downloaded or local) -> clean documents -> tokenizer ->
token shards in llm.c's .bin layout plus meta.json, all in data/<dataset>/. train.py calls prepare()
itself when the data it needs is missing.

    python prepare.py                                        # pydocs: the docs inside this Python, offline
    python prepare.py --dataset=shakespeare --tokenizer=byte # character level, as nanoGPT's shakespeare_char
    python prepare.py --dataset=local --input=notes/ --vocab_size=8192
    python prepare.py --dataset=fineweb10B --num_shards=8    # GPT-2-tokenized shards, downloaded as they are

Datasets, what one document is, and how val is chosen (deterministic, by whole documents):
  pydocs       the pydoc_data topics (one document each) and every public, importable standard-library module
               (one document: its docstring, then its classes', methods' and functions' docstrings; tests,
               private modules and modules with side effects left out). val = the top-level packages whose
               name hashes into the first val_frac (all of email.* goes one way), listed in docs.json.
  shakespeare  tiny Shakespeare (1.1 MB), read like a local .txt. val = the last val_frac of documents,
               i.e. about the last 10% of the text, as in nanoGPT.
  tinystories  TinyStories V2 (GPT-4 stories, ~2 GB): one story per document; val = its own valid file.
  fineweb10B   llm.c's GPT-2-tokenized FineWeb shards (kjj0/fineweb10B-gpt2), 100M tokens each: no text step.
  local        --input=a .txt, a .jsonl with a "text" field per line (one document per line), or a folder of
               them (recursively, sorted by path). A .txt is cut at blank lines into documents of at least
               chunk_chars characters, or at <|endoftext|> if it holds any. val = the last val_frac of documents.

Layout of data/<dataset>/: raw/ (downloads, the pydocs extract), tokenizer/ (ours, when trained),
train_000000.bin..., val_000000.bin, meta.json, docs.json (document names per split, up to 200k documents).
A .bin is an int32 header[256] = [20240520, version, n_tokens, 0, ...] then the tokens: uint16 (version 1)
or uint32 (version 2, vocabularies over 65,535). Each document is preceded by the end-of-text token.
Downloads honour --mirror=URL (or $PREPARE_MIRROR): every file is then fetched as URL/<file name>;
huggingface.co URLs also honour $HF_ENDPOINT.
Re-running skips what is done: verified downloads, the pydocs extract, a tokenizer trained on the same text,
and everything when meta.json shows the same data. --force=True rebuilds all but the downloads.
"""
import hashlib
import inspect
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import clean as C
from common import Progress, atomic_path, configure, die, download, fmt_num

# -----------------------------------------------------------------------------
# default config
dataset = "pydocs"            # pydocs | shakespeare | tinystories | fineweb10B | local
data_root = "data"            # the data goes to data_root/dataset
input = ""                    # dataset=local: a .txt, a .jsonl or a folder of them
tokenizer = "bpe"             # bpe (ours, trained on the train split) | gpt2 | byte
vocab_size = 4096             # bpe only
tokenizer_path = ""           # bpe: a saved tokenizer folder to use instead of training; gpt2: a ranks file
tokenizer_train_chars = 200_000_000  # bpe trains on at most this many characters of the train split
val_frac = 0.1                # share of documents (pydocs: of top-level packages) held out for validation
min_doc_chars = 16            # documents shorter than this (after stripping whitespace) are dropped
filters = ""                  # clean.py's quality rules, comma-separated: gopher, repetition, c4, fineweb
dedup = "exact"               # comma-separated: exact, minhash (near duplicates, clean.py)
quality_model = ""            # a clean.py classifier: keep the best-scoring quality_keep of the documents
quality_keep = 1.0
chunk_chars = 8192            # a .txt is cut at blank lines into documents of at least this many characters
shard_tokens = 100_000_000    # tokens per .bin shard (llm.c's size)
num_shards = 0                # fineweb10B: train shards (100M tokens each, 103 in all); 0: those here, or 8
num_threads = 0               # encoding threads; 0 = all cores
mirror = ""                   # base URL to fetch every download from instead of its origin
retries = 4                   # download attempts after the first, with exponential backoff
force = False                 # rebuild everything but verified downloads, even when it exists

# -----------------------------------------------------------------------------

MAGIC = 20240520
HEADER_INTS = 256
SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
TINYSTORIES_URL = "https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main/TinyStoriesV2-GPT4-{split}.txt"
FINEWEB_URL = "https://huggingface.co/datasets/kjj0/fineweb10B-gpt2/resolve/main/fineweb_{split}_{i:06d}.bin"
MAX_LISTED_DOCS = 200_000  # docs.json lists the documents of smaller corpora
DATASETS = ("pydocs", "shakespeare", "tinystories", "fineweb10B", "local")


def prepare(dataset="pydocs", data_root="data", tokenizer="bpe", vocab_size=4096, input=None, force=False,
            tokenizer_path="", tokenizer_train_chars=200_000_000, val_frac=0.1, min_doc_chars=16, filters="",
            dedup="exact", quality_model="", quality_keep=1.0,
            chunk_chars=8192, shard_tokens=100_000_000, num_shards=0, num_threads=0, mirror="", retries=4):
    """Make data_root/dataset ready (see the module docstring) and return its path. Idempotent: when
    meta.json shows the same settings nothing is redone; different settings need force=True."""
    if dataset not in DATASETS:
        die(f"unknown dataset '{dataset}'; choose one of {', '.join(DATASETS)}")
    if (dataset == "local") != bool(input):
        die("--dataset=local needs --input=PATH (a .txt, .jsonl or a folder)" if dataset == "local"
            else f"--input is only for --dataset=local (got --dataset={dataset})")
    if tokenizer not in ("bpe", "gpt2", "byte"):
        die(f"unknown tokenizer '{tokenizer}'; choose bpe, gpt2 or byte")
    if not 0 < val_frac < 1:
        die(f"val_frac must be between 0 and 1, got {val_frac}")
    if shard_tokens < 1 or vocab_size < 1:
        die("shard_tokens and vocab_size must be positive")
    data_dir = Path(data_root) / dataset
    dl = dict(mirror=mirror or os.environ.get("PREPARE_MIRROR", ""), retries=retries)
    if dataset == "fineweb10B":
        return prepare_fineweb(data_dir, num_shards, tokenizer, force, dl)

    # what the data is (a finished directory that differs is refused unless force) and how it was built
    # (a difference is only noted, so that train.py, which passes just the former, accepts the data)
    what = dict(dataset=dataset, input=str(Path(input).resolve()) if input else None, tokenizer=tokenizer,
                vocab_size=vocab_size if tokenizer == "bpe" else None, tokenizer_path=tokenizer_path or None)
    how = dict(tokenizer_train_chars=tokenizer_train_chars if tokenizer == "bpe" else None, val_frac=val_frac,
               min_doc_chars=min_doc_chars, chunk_chars=chunk_chars, shard_tokens=shard_tokens,
               filters=C.listed(filters, "filters"), dedup=C.listed(dedup, "dedup"),
               quality_model=str(Path(quality_model).resolve()) if quality_model else None, quality_keep=quality_keep)
    if (data_dir / "meta.json").exists() and not force:
        old = load_meta(data_dir).get("settings", {})
        diff = [k for k in what if old.get(k) != what[k]]
        if diff:
            shown = [k for k in diff if None not in (old.get(k), what[k])] or diff  # not the n/a ones
            die(f"{data_dir} holds other data ("
                + ", ".join(f"{k} {old.get(k)!r} there, {what[k]!r} now" for k in shown)
                + "): pass --force=True to rebuild it, or use another --data_root")
        changed = ", ".join(f"{k}={old.get(k)!r}" for k in how if old.get(k) != how[k])
        print(f"{data_dir} is ready" + (f" (built with {changed}; pass --force=True to rebuild with the options "
                                          f"given now)" if changed else "; --force=True rebuilds it"))
        return data_dir

    t0 = time.time()
    docs = load_documents(dataset, data_dir, input, chunk_chars, val_frac, force, dl)
    cleaning = {}
    docs = clean(docs, min_doc_chars, how["filters"], how["dedup"], quality_model, quality_keep, cleaning)
    splits = split_documents(docs, val_frac, f"input '{input}'" if input else f"the {dataset} corpus")
    t_clean = time.time() - t0
    # from here on the directory reads as unfinished until the new meta.json is written
    (data_dir / "meta.json").unlink(missing_ok=True)
    tok, tok_spec, t_tok = get_tokenizer(tokenizer, vocab_size, tokenizer_path, tokenizer_train_chars,
                                         splits["train"], data_dir, force)
    t1 = time.time()
    meta = write_shards(data_dir, splits, tok, shard_tokens, num_threads)
    meta["clean"] = cleaning  # every stage's counts
    meta.update(dataset=dataset, tokenizer=tok_spec, settings={**what, **how},
                timing={"clean_s": round(t_clean, 3), "tokenizer_s": round(t_tok, 3),
                        "encode_write_s": round(time.time() - t1, 3)})
    with atomic_path(data_dir / "meta.json") as tmp:
        tmp.write_text(json.dumps(meta, indent=1) + "\n")
    print(f"wrote {data_dir}: train {fmt_num(meta['train']['tokens'])} tokens in {len(meta['train']['shards'])} "
          f"shard(s), val {fmt_num(meta['val']['tokens'])} tokens; "
          f"{meta['train']['bytes'] / meta['train']['tokens']:.2f} bytes/token (train)")
    return data_dir

# -----------------------------------------------------------------------------
# documents: a list of (name, text, split) with split 'train', 'val' or None (decided by position)


def load_documents(dataset, data_dir, input, chunk_chars, val_frac, force, dl):
    raw = data_dir / "raw"
    if dataset == "pydocs":
        return pydocs_documents(raw, val_frac, force)
    if dataset == "shakespeare":
        path = download(SHAKESPEARE_URL, raw / "input.txt", sha256=SHAKESPEARE_SHA256, **dl)
        return [(d["id"], d["text"], None) for d in C.text_file_documents(path, "input.txt", chunk_chars)]
    if dataset == "tinystories":
        docs = []
        for split, name in (("train", "train"), ("val", "valid")):
            path = download(TINYSTORIES_URL.format(split=name), raw / f"TinyStoriesV2-GPT4-{name}.txt", **dl)
            docs += [(d["id"], d["text"], split) for d in C.text_file_documents(path, path.name, chunk_chars)]
        return docs
    return [(d["id"], d["text"], None) for d in C.read_documents(C.input_files(input), chunk_chars)]


def clean(docs, min_doc_chars, filters=(), dedup=("exact",), quality_model="", quality_keep=1.0, summary=None):
    """[(name, text, split)] through clean.py's stages (by default: NFC, '\\n' newlines, tiny documents and exact
    duplicates dropped, the first copy staying): the kept ones, in order. `summary`, a dict, gets clean.py's
    summary (documents and bytes removed by each stage and rule)."""
    with tempfile.TemporaryDirectory(prefix="prepare-clean-") as tmp:
        s = C.run(({"id": name, "text": text, "split": split} for name, text, split in docs), tmp, filters, dedup,
                  min_doc_chars, quality_model=quality_model, quality_keep=quality_keep, total=len(docs))
        if summary is not None:
            summary.update(s)
        return [(d["id"], d["text"], d["split"]) for d in C.read_jsonl(Path(tmp) / "docs.jsonl")]


def split_documents(docs, val_frac, source):
    """Documents with a split keep it; the others: the last val_frac of them (at least one) go to val."""
    if not docs:
        die(f"{source} has no documents left after cleaning: it is empty, or every document is shorter "
            f"than min_doc_chars")
    free = [i for i, d in enumerate(docs) if d[2] is None]
    n_val = max(1, round(len(free) * val_frac)) if free else 0
    val_ix = set(free[len(free) - n_val:])
    splits = {"train": [], "val": []}
    for i, (name, text, split) in enumerate(docs):
        splits[split or ("val" if i in val_ix else "train")].append((name, text))
    if not splits["train"] or not splits["val"]:
        die(f"{source} is too small for a train/val split: {len(splits['train'])} train and "
            f"{len(splits['val'])} val documents after cleaning (need at least one each; "
            f"give more text, or a smaller --chunk_chars for a .txt)")
    return splits

# -----------------------------------------------------------------------------
# pydocs: the documentation that ships inside the running Python


def pydocs_documents(raw, val_frac, force=False):
    return [(d["name"], d["text"], d["split"]) for d in pydocs_records(raw, val_frac, force)]


def pydocs_records(raw, val_frac, force=False):
    """Extract once into raw/pydocs.jsonl (a fresh interpreter imports the modules, so nothing they do on
    import touches this process). A document goes to val when the hash of its top-level package (or topic)
    falls in the first val_frac of the range: stable as modules come and go between Python versions."""
    path = raw / "pydocs.jsonl"
    stale = path.exists() and '"objects"' not in path.open(encoding="utf-8").readline()  # an older format
    if force or stale or not path.exists():
        t0 = time.time()
        raw.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            code = inspect.getsource(pydocs_extract) + f"\npydocs_extract({str(tmp.resolve())!r})\n"
            # Some signatures show machine state as defaults (cgi's environ=os.environ, the interpreter's
            # path, the venv scheme): the extract runs in an empty environment, so no variable of this shell
            # (a token, a password) reaches the corpus, and under the base interpreter's real path, so a venv
            # and its Python write the same corpus. -I: no PYTHON* variables, no current folder on sys.path.
            python = os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)
            env = {"PYTHONHASHSEED": "0"}
            if "SYSTEMROOT" in os.environ:  # Windows: Python cannot start its random and socket modules without it
                env["SYSTEMROOT"] = os.environ["SYSTEMROOT"]
            r = subprocess.run([python, "-I", "-c", code], cwd=raw, env=env,
                               stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=600)
            if r.returncode != 0 or not tmp.exists():
                die(f"extracting the pydocs corpus failed (exit {r.returncode}): "
                    + (r.stderr.strip().splitlines() or ["no output"])[-1])
        print(f"pydocs: extracted {fmt_num(path.stat().st_size)}B of documentation from Python "
              f"{sys.version.split()[0]} in {time.time() - t0:.1f}s -> {path}")
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    for d in records:
        h = int.from_bytes(hashlib.sha256(d["group"].encode()).digest()[:8], "big")
        d["split"] = "val" if h < val_frac * 2**64 else "train"
    return records


def pydocs_objects(data_root="data", val_frac=0.1):
    """The documented objects of the pydocs corpus, for question answering and multiple choice:
    [{'name': 'json.dumps', 'module': 'json', 'doc': 'its docstring', 'split': 'train'|'val'}],
    in the same train/val split (by top-level package) as the pretraining corpus."""
    records = pydocs_records(Path(data_root) / "pydocs" / "raw", val_frac)
    return [{"name": name, "module": d["name"], "doc": doc, "split": d["split"]}
            for d in records for name, doc in d.get("objects", [])]


def pydocs_extract(out_path):
    """Runs alone in `python -I`: writes out_path, one JSON line {name, group, text} per document: every pydoc
    topic, then each public standard-library module in sorted order. Deterministic for a given Python."""
    import contextlib, importlib.util, inspect, io, json, pkgutil, sys, warnings  # noqa: E401
    import pydoc_data.topics
    warnings.simplefilter("ignore")
    # side effects on import (a browser, prints), the test suites and the IDE/demo code
    skip = {"antigravity", "this", "__hello__", "__phello__", "idlelib", "turtledemo", "test", "pydoc_data"}

    def wanted(name):
        parts = name.split(".")
        return not (parts[0] in skip or name.startswith("encodings.")  # generated codec tables
                    or any(p.startswith("_") or p in ("test", "tests") or p.startswith("test_") for p in parts))

    names = set()
    for top in filter(wanted, sys.stdlib_module_names):
        names.add(top)
        try:
            spec = importlib.util.find_spec(top)
        except (ImportError, ValueError):
            continue
        if spec and spec.submodule_search_locations:
            for m in pkgutil.walk_packages(spec.submodule_search_locations, top + ".", onerror=lambda n: None):
                if wanted(m.name):
                    names.add(m.name)

    def header(qualname, obj):
        try:
            sig = str(inspect.signature(obj))
        except (TypeError, ValueError):
            return qualname
        return qualname if " at 0x" in sig else qualname + sig  # default values with addresses vary per run

    def doc(obj):
        d = getattr(obj, "__doc__", None)
        return inspect.cleandoc(d) if isinstance(d, str) and d.strip() else None

    with open(out_path, "w", encoding="utf-8") as out:
        def emit(name, group, text, objects=()):
            out.write(json.dumps({"name": name, "group": group, "text": text, "objects": objects},
                                 ensure_ascii=False) + "\n")
        for key in sorted(pydoc_data.topics.topics):
            emit(f"topic:{key}", f"topic:{key}", pydoc_data.topics.topics[key])
        for name in sorted(names):
            try:
                with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                    mod = importlib.import_module(name)
            except BaseException:  # another platform's module, a missing optional library...
                continue
            parts = [f"Module {name}\n\n{doc(mod)}" if doc(mod) else f"Module {name}"]
            objects = []  # (qualified name, docstring) of each documented class and function
            for k, obj in list(vars(mod).items()):  # definition order
                if k.startswith("_") or getattr(obj, "__module__", None) != name:
                    continue
                if not (inspect.isclass(obj) or inspect.isroutine(obj)):
                    continue
                if doc(obj):
                    parts.append(f"{header(f'{name}.{k}', obj)}\n{doc(obj)}")
                    objects.append((f"{name}.{k}", doc(obj)))
                if inspect.isclass(obj):
                    for mk, m in list(vars(obj).items()):
                        if not mk.startswith("_") and (inspect.isroutine(m) or isinstance(m, property)):
                            if doc(m):
                                fn = m.__func__ if isinstance(m, (classmethod, staticmethod)) else m
                                parts.append(f"{header(f'{name}.{k}.{mk}', fn)}\n{doc(m)}")
                                objects.append((f"{name}.{k}.{mk}", doc(m)))
            if len(parts) > 1 or doc(mod):
                emit(name, name.split(".")[0], "\n\n".join(parts) + "\n", objects)

# -----------------------------------------------------------------------------
# tokenizer


def get_tokenizer(kind, vocab_size, tokenizer_path, train_chars, train_docs, data_dir, force):
    """Returns (tokenizer, spec for meta.json, seconds spent). A bpe tokenizer is trained on the train split
    and saved to data_dir/tokenizer together with a fingerprint of what it was trained on, so that a rerun
    after a crash reuses it instead of training again."""
    import tokenizer as T
    t0 = time.time()
    if kind != "bpe":
        tok = T.get_tokenizer(kind, tokenizer_path or None)
        return tok, {"kind": kind, "path": str(Path(tokenizer_path).resolve()) if tokenizer_path else None}, 0.0
    if tokenizer_path:
        tok = T.load(tokenizer_path)  # its own vocabulary: vocab_size does not apply
        print(f"tokenizer: {tokenizer_path}, {tok.n_vocab} tokens")
        return tok, {"kind": "bpe", "path": str(Path(tokenizer_path).resolve())}, 0.0
    texts, n = [], 0
    for _, text in train_docs:
        if n >= train_chars:
            break
        texts.append(text[:train_chars - n])
        n += len(texts[-1])
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode() + b"\0")
    fingerprint = {"vocab_size": vocab_size, "chars": n, "sha256": h.hexdigest()}
    out = data_dir / "tokenizer"
    stamp = out / "trained_on.json"
    if not force and stamp.exists() and json.loads(stamp.read_text()) == fingerprint:
        print(f"tokenizer: reusing {out} (trained on the same {fmt_num(n)} chars)")
        return T.load(out), {"kind": "bpe", "path": "tokenizer"}, 0.0
    print(f"tokenizer: training BPE, vocab {vocab_size}, on {fmt_num(n)} chars of the train split")
    tok = T.get_tokenizer("bpe", vocab_size=vocab_size, text=texts)
    tmp = data_dir / f".tokenizer.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tok.save(tmp)
        (tmp / "trained_on.json").write_text(json.dumps(fingerprint) + "\n")
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return tok, {"kind": "bpe", "path": "tokenizer"}, time.time() - t0

# -----------------------------------------------------------------------------
# shards


def write_bin(path, tokens):
    """One llm.c shard, written to a temp name and renamed."""
    header = np.zeros(HEADER_INTS, dtype=np.int32)
    header[:3] = MAGIC, 1 if tokens.dtype == np.uint16 else 2, len(tokens)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(header.tobytes())
            f.write(tokens.tobytes())


def read_bin(path):
    """The tokens of one shard as a read-only np.memmap; a bad header or size stops with a clear error."""
    path = Path(path)
    try:
        dtype, n = bin_header(path)
    except ValueError as e:
        die(f"{e}; re-run `python prepare.py --dataset={path.parent.name} --force=True`")
    if n == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=HEADER_INTS * 4, shape=(n,))


def bin_header(path):
    """(dtype, n_tokens) of a shard whose header and size agree, else ValueError saying what is wrong."""
    try:
        size = path.stat().st_size
        header = np.fromfile(path, dtype=np.int32, count=HEADER_INTS)
    except OSError as e:
        raise ValueError(f"cannot read token shard {path} ({e.strerror})")
    if len(header) < HEADER_INTS or header[0] != MAGIC or header[1] not in (1, 2):
        raise ValueError(f"{path} is not a token shard (bad header)")
    dtype = np.uint16 if header[1] == 1 else np.uint32
    n = int(header[2])
    expected = HEADER_INTS * 4 + n * np.dtype(dtype).itemsize
    if n < 0 or size != expected:
        raise ValueError(f"{path} is truncated or corrupt ({size} bytes; its header promises {n} tokens "
                         f"= {expected} bytes)")
    return dtype, n


def load_meta(data_dir):
    """meta.json of a prepared directory, with the tokenizer path made absolute."""
    path = Path(data_dir) / "meta.json"
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        die(f"{path} not found: prepare the data first with `python prepare.py --dataset={Path(data_dir).name}`")
    except (OSError, ValueError) as e:
        die(f"{path} is unreadable ({e}); re-run `python prepare.py --dataset={Path(data_dir).name} --force=True`")
    p = meta.get("tokenizer", {}).get("path")
    if p:
        meta["tokenizer"]["path"] = str((Path(data_dir) / p).resolve())
    return meta


def write_shards(data_dir, splits, tok, shard_tokens, num_threads):
    """Encode each split (eot before every document) in parallel batches and cut the token stream into shards
    of exactly shard_tokens (documents run across shard boundaries, as in llm.c). Each shard is written
    atomically; if the run fails, the shards it wrote are removed again."""
    dtype = np.uint16 if tok.n_vocab <= 65535 else np.uint32
    eot = tok.eot_id
    threads = num_threads or os.cpu_count() or 1
    meta = {"vocab_size": tok.n_vocab, "eot_id": eot, "dtype": np.dtype(dtype).name}
    written = []
    try:
        for split, docs in splits.items():
            total = sum(len(t.encode()) for _, t in docs)
            prog = Progress(total, f"encode {split}", "B")
            shards, pending, n_pending, n_tokens = [], [], 0, 0

            def flush(tokens):
                path = data_dir / f"{split}_{len(shards):06d}.bin"
                write_bin(path, tokens)
                written.append(path)
                shards.append(path.name)

            for batch in batches(docs, 4_000_000):
                texts = [t for _, t in batch]
                ids = tok.encode_batch(texts, num_threads=threads)
                lens = np.fromiter((len(x) + 1 for x in ids), dtype=np.int64, count=len(ids))
                arr = np.empty(int(lens.sum()), dtype=dtype)
                starts = np.concatenate([[0], np.cumsum(lens)[:-1]])
                arr[starts] = eot
                for s, x in zip(starts, ids):
                    arr[s + 1:s + 1 + len(x)] = x
                pending.append(arr)
                n_pending += len(arr)
                n_tokens += len(arr)
                while n_pending >= shard_tokens:
                    cat = np.concatenate(pending)
                    flush(cat[:shard_tokens])
                    pending, n_pending = [cat[shard_tokens:]], len(cat) - shard_tokens
                prog.update(sum(len(t.encode()) for t in texts))
            if n_pending:
                flush(np.concatenate(pending))
            prog.close()
            meta[split] = {"tokens": n_tokens, "bytes": total, "docs": len(docs), "shards": shards}
        # shards of an earlier, larger run would otherwise linger beside the new ones
        for old in sorted(data_dir.glob("*_[0-9][0-9][0-9][0-9][0-9][0-9].bin")):
            if old not in written and old.name.split("_")[0] in splits:
                old.unlink()
        # the document names per split (pydocs: which modules are held out), when that is a small file
        (data_dir / "docs.json").unlink(missing_ok=True)
        if sum(len(d) for d in splits.values()) <= MAX_LISTED_DOCS:
            with atomic_path(data_dir / "docs.json") as tmp:
                tmp.write_text(json.dumps({s: [n for n, _ in d] for s, d in splits.items()}, ensure_ascii=False))
            meta["docs_file"] = "docs.json"
    except BaseException:
        for p in written:
            p.unlink(missing_ok=True)
        raise
    return meta


def batches(docs, max_chars):
    """Consecutive runs of documents of about max_chars characters (one huge document is a batch of its own)."""
    batch, n = [], 0
    for d in docs:
        batch.append(d)
        n += len(d[1])
        if n >= max_chars:
            yield batch
            batch, n = [], 0
    if batch:
        yield batch

# -----------------------------------------------------------------------------
# fineweb10B: llm.c's GPT-2-tokenized shards, used as they are


def prepare_fineweb(data_dir, n_train, tokenizer, force, dl):
    """Download the val shard and n_train train shards (0: keep the number already listed, or 8) as they
    are, check their headers, and list them in meta.json. Shards already here are not fetched again."""
    if tokenizer != "gpt2":
        print(f"note: fineweb10B comes tokenized with GPT-2's tokenizer; --tokenizer={tokenizer} does not apply")
    if not 0 <= n_train <= 103:
        die(f"num_shards must be between 1 and 103 (fineweb10B has 103 train shards), got {n_train}")
    meta_path = data_dir / "meta.json"
    have = len(load_meta(data_dir)["train"]["shards"]) if meta_path.exists() else 0
    if have and not force and n_train in (0, have):
        print(f"{data_dir} is ready ({have} train shards; --num_shards=N for another number)")
        return data_dir
    n_train = n_train or have or 8
    meta = {"dataset": "fineweb10B", "tokenizer": {"kind": "gpt2", "path": None}, "vocab_size": 50257,
            "eot_id": 50256, "dtype": "uint16", "settings": {"dataset": "fineweb10B", "num_shards": n_train}}
    for split, ids in (("val", [0]), ("train", range(1, n_train + 1))):
        shards, tokens, docs = [], 0, 0
        for i in ids:
            name = f"fineweb_{split}_{i:06d}.bin"
            path = download(FINEWEB_URL.format(split=split, i=i), data_dir / name, **dl)
            try:
                bin_header(path)
            except ValueError as e:  # no checksum is published: the header is the check
                path.unlink()
                die(f"{e}; removed it, run again to download it anew")
            tok = read_bin(path)
            shards.append(name)
            tokens += len(tok)
            docs += int(np.count_nonzero(tok == 50256))
        meta[split] = {"tokens": tokens, "bytes": None, "docs": docs, "shards": shards}
    with atomic_path(meta_path) as tmp:
        tmp.write_text(json.dumps(meta, indent=1) + "\n")
    print(f"{data_dir}: {fmt_num(meta['train']['tokens'])} train and {fmt_num(meta['val']['tokens'])} val tokens")
    return data_dir

if __name__ == "__main__":
    # the config block above = prepare()'s parameters (the module's constants are not options)
    config = configure({k: globals()[k] for k in inspect.signature(prepare).parameters})
    prepare(**config)
