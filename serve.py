"""
Serve a checkpoint through the OpenAI API, with a one-page web chat and a side-by-side arena whose picks are
preference pairs that dpo.py and reward.py train on as they are. Standard library http.server, no framework.

    python serve.py --out_dir=out-sft                                   # http://127.0.0.1:8000
    python serve.py --out_dir=out-sft --out_dir_b=out-dpo --prefs=prefs.jsonl   # the arena: two models
    python dpo.py --init_from=out-sft --data=prefs.jsonl                 # train on the picks

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="none")
    client.chat.completions.create(model="out-sft", messages=[{"role": "user", "content": "Hi"}], stream=True)

Endpoints: POST /v1/chat/completions and /v1/completions (each with stream=true: server-sent events as
OpenAI sends them), GET /v1/models, GET /health, GET / (the page, chat.html), POST /arena/vote.
A model's id is its out_dir's name. Chat models (fine-tuned with the chat tokens) answer in their template; a
base model continues the messages' text.

Continuous batching: each model has one decoding thread and a KV cache of max_batch rows. A request is
prefilled alone into a free row and joins the running batch at the next step; every step decodes one token
of every row, each at its own position (model._run with a position per row), and a row that ends (a stop
token or string, max_tokens, a client gone) frees its row at once. Requests beyond the rows wait in a queue
of max_queue; more get 429. Each request samples with its own generator (seed), so its text does not depend
on what else runs beside it.
"""
import codecs
import json
import queue
import random
import select
import socket
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch

from common import die

# -----------------------------------------------------------------------------
# config (python serve.py --help lists these)
out_dir = "out"               # the model: a checkpoint directory (its name is the model's id)
init_from = "resume"          # or gpt2, gpt2-medium, ..., a Hugging Face directory (as sample.py)
out_dir_b = ""                # a second checkpoint for the arena (else the arena compares two samples of one)
host = "127.0.0.1"            # 0.0.0.0 serves other machines too: set api_key then
port = 8000
api_key = ""                  # when set, /v1/* needs the header "Authorization: Bearer <api_key>"
prefs = "prefs.jsonl"         # the arena's picks are appended here as {prompt, chosen, rejected}
device = "auto"
quantize = ""                 # '' | 'int8' | 'int4': decode with quantized weights on the CPU (quant.py)
max_batch = 8                 # rows decoded together, per model
max_queue = 64                # requests waiting for a row, per model; more are answered 429
max_tokens_limit = 4096       # the largest max_tokens a request may ask for (the context caps it anyway)
max_messages = 128
max_chars = 100_000           # characters of prompt per request
max_body = 1 << 20            # bytes of a request body
max_n = 8                     # choices per request
# -----------------------------------------------------------------------------


class ApiError(Exception):
    """A request's mistake: the HTTP status and OpenAI's error object."""

    def __init__(self, status, message, param=None, code=None, kind="invalid_request_error"):
        super().__init__(message)
        self.status, self.body = status, {"error": {"message": message, "type": kind, "param": param, "code": code}}


class Seq:
    """One choice being generated: its prompt, settings, and the events it posts to its request's queue."""

    def __init__(self, ids, max_new, temperature, top_p, stops, seed, out, index, device="cpu"):
        self.ids, self.max_new, self.temperature, self.top_p, self.stops = ids, max_new, temperature, top_p, stops
        self.gen = torch.Generator(device=device).manual_seed(seed)  # its own: its text depends on nothing else
        self.out, self.index = out, index
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text, self.sent, self.n, self.pos, self.last = "", 0, 0, len(ids), None
        self.cancelled = self.done = False


class Engine:
    """One model's decoding thread: continuous batching over a KV cache of max_batch rows (see the top)."""

    def __init__(self, name, model, tok, ckpt, dev, max_batch, max_queue):
        from common import precision
        self.name, self.model, self.tok, self.dev = name, model.eval(), tok, dev
        self.chat = bool((ckpt or {}).get("chat")) and model.config.vocab_size >= tok.n_vocab
        self.system = ((ckpt or {}).get("config") or {}).get("system_prompt") or "" if self.chat else ""
        self.stop_ids = {tok.special["<|end|>"], tok.eot_id} if self.chat else {tok.eot_id}
        self.max_queue, self.waiting, self.active = max_queue, queue.Queue(), []
        self.generated = 0  # tokens sampled since the start (GET /health shows it)
        _, self.ctx = precision(dev)
        with self.ctx:
            self.cache = model.kv_cache(max_batch, model.config.block_size, dev)
        for k, v in self.cache:  # a row reads (masked) columns past its own end: they must hold finite numbers
            k.zero_()
            v.zero_()
        model.decode_weights(torch.device(dev).type == "cpu")  # the transposed copies batch-1 decoding reads
        threading.Thread(target=self.loop, daemon=True, name=f"engine-{name}").start()

    def submit(self, seqs):
        if self.waiting.qsize() + len(seqs) > self.max_queue:
            raise ApiError(429, f"model {self.name} has {self.waiting.qsize()} requests waiting already (max_queue="
                                f"{self.max_queue}): retry later", code="rate_limit_exceeded", kind="rate_limit_error")
        for s in seqs:
            self.waiting.put(s)

    def loop(self):
        rows = len(self.cache[0][0])
        while True:
            new = [] if self.active else [self.waiting.get()]  # idle: sleep until a request comes
            while len(self.active) + len(new) < rows and not self.waiting.empty():
                new.append(self.waiting.get_nowait())
            try:
                with torch.inference_mode(), self.ctx:
                    for s in new:
                        if not s.cancelled:
                            self.prefill(s)
                    self.drop_finished()
                    if self.active:
                        self.step()
                        self.drop_finished()
            except Exception as e:  # a bug must not hang the clients: each gets an error, the server goes on
                for s in {id(s): s for s in self.active + new}.values():
                    if not s.done:
                        s.out.put((s.index, "error", f"{type(e).__name__}: {e}"))
                self.active = []
                print(f"engine {self.name}: {type(e).__name__}: {e}", file=sys.stderr)

    def rows(self, n):
        return [(k[:n], v[:n]) for k, v in self.cache]

    def prefill(self, s):
        row = len(self.active)
        cache = [(k[row:row + 1], v[row:row + 1]) for k, v in self.cache]
        logits = self.model._run(torch.tensor([s.ids], device=self.dev), cache, pos=0, last_only=True)
        self.active.append(s)
        self.take(s, logits[0, -1])

    def step(self):
        x = torch.tensor([[s.last] for s in self.active], device=self.dev)
        pos = torch.tensor([s.pos for s in self.active], device=self.dev)
        logits = self.model._run(x, self.rows(len(self.active)), pos=pos)
        for i, s in enumerate(self.active):
            s.pos += 1
            self.take(s, logits[i, -1])

    def take(self, s, logits):
        """Sample s's next token and post what text it makes final; end s when it is done."""
        from model import sample_next
        t = int(sample_next(logits[None].float(), s.temperature, None, s.top_p, s.gen)[0])
        s.n, s.last, self.generated = s.n + 1, t, self.generated + 1
        if t in self.stop_ids:
            s.text += s.decoder.decode(b"", final=True)
            return self.finish(s, "stop")
        s.text += s.decoder.decode(self.tok.decode_bytes([t]) if t < self.tok.n_vocab else b"")
        cut = min((i for i in (s.text.find(x) for x in s.stops) if i >= 0), default=-1)
        if cut >= 0:  # (what came before it was never sent past a possible start of it: see hold below)
            s.text = s.text[:cut]
            return self.finish(s, "stop")
        if s.n >= s.max_new or s.pos >= self.model.config.block_size:
            s.text += s.decoder.decode(b"", final=True)
            return self.finish(s, "length")
        # hold back a tail that may become a stop string (and half a character, which the decoder keeps)
        hold = max((k for x in s.stops for k in range(1, len(x)) if s.text.endswith(x[:k])), default=0)
        if len(s.text) - hold > s.sent:
            s.out.put((s.index, "text", s.text[s.sent:len(s.text) - hold]))
            s.sent = len(s.text) - hold

    def finish(self, s, reason):
        if len(s.text) > s.sent:
            s.out.put((s.index, "text", s.text[s.sent:]))
        s.done = True
        s.out.put((s.index, "done", {"finish_reason": reason, "completion_tokens": s.n}))

    def drop_finished(self):
        """Rows of ended or cancelled sequences are freed: the last row moves into the gap (one row's copy)."""
        i = 0
        while i < len(self.active):
            s = self.active[i]
            if not (s.done or s.cancelled):
                i += 1
                continue
            last = len(self.active) - 1
            if i != last:
                for k, v in self.cache:
                    k[i].copy_(k[last])
                    v[i].copy_(v[last])
                self.active[i] = self.active[last]
            self.active.pop()


# -----------------------------------------------------------------------------
# requests: checked before anything is sent, so that an error is never hidden inside a 200 stream


def _get(body, key, types, default, what, check=lambda v: True):
    v = body.get(key, default)
    if v is None:
        return default
    if isinstance(v, bool) and bool not in types or not isinstance(v, types) or not check(v):
        raise ApiError(400, f"'{key}' must be {what}, got {json.dumps(v)[:80]}", param=key)
    return v


def _text(content, where):
    """A message's content: a string, or OpenAI's list of {"type": "text", "text": ...} parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                                         for p in content):
        return "".join(p["text"] for p in content)
    raise ApiError(400, f"{where}.content must be a string or a list of text parts", param=where)


def parse_request(body, chat, engines):
    """(engine, [prompt ids], settings) of a request body, or an ApiError naming what is wrong."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    name = _get(body, "model", (str,), next(iter(engines)), "a string")
    if name not in engines:
        raise ApiError(404, f"the model '{name}' does not exist: this server has {', '.join(engines)}", param="model",
                       code="model_not_found")
    eng = engines[name]
    if chat:
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise ApiError(400, "'messages' must be a non-empty list of {role, content}", param="messages")
        if len(msgs) > max_messages:
            raise ApiError(400, f"{len(msgs)} messages: at most {max_messages} per request", param="messages")
        messages = []
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "developer"):
                raise ApiError(400, f"messages[{i}] must be an object with role system, user or assistant",
                               param=f"messages[{i}]")
            role = "system" if m["role"] == "developer" else m["role"]
            messages.append({"role": role, "content": _text(m.get("content"), f"messages[{i}]")})
        chars = sum(len(m["content"]) for m in messages)
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt:
            raise ApiError(400, "'prompt' must be a non-empty string", param="prompt")
        chars = len(prompt)
    if chars > max_chars:
        raise ApiError(400, f"the prompt has {chars} characters: at most {max_chars} per request", param="messages" if chat else "prompt")
    limit = max_tokens_limit
    max_new = _get(body, "max_completion_tokens", (int,), None, "a positive integer", lambda v: v >= 1)
    max_new = _get(body, "max_tokens", (int,), max_new, f"an integer from 1 to {limit}", lambda v: 1 <= v <= limit)
    if max_new is not None and max_new > limit:
        raise ApiError(400, f"'max_completion_tokens' must be at most {limit}", param="max_completion_tokens")
    temperature = float(_get(body, "temperature", (int, float), 1.0, "a number from 0 to 2", lambda v: 0 <= v <= 2))
    top_p = float(_get(body, "top_p", (int, float), 1.0, "a number in (0, 1]", lambda v: 0 < v <= 1))
    n = _get(body, "n", (int,), 1, f"an integer from 1 to {max_n}", lambda v: 1 <= v <= max_n)
    seed = _get(body, "seed", (int,), None, "an integer")
    stream = _get(body, "stream", (bool,), False, "true or false")
    opts = _get(body, "stream_options", (dict,), {}, "an object")
    usage = _get(opts, "include_usage", (bool,), False, "true or false")
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop or []
    if not isinstance(stops, list) or len(stops) > 4 or not all(isinstance(x, str) and x for x in stops):
        raise ApiError(400, "'stop' must be a non-empty string or a list of up to 4 of them", param="stop")
    tok = eng.tok
    if chat and eng.chat:
        from chat_data import chat_ids, with_system
        ids = chat_ids(tok, with_system(messages, eng.system), add_generation_prompt=True)[0]
    elif chat:  # a base model continues the conversation's text
        ids = [tok.eot_id] + tok.encode("\n\n".join(m["content"] for m in messages))
    else:  # as sample.py: the prompt's own tokens
        ids = tok.encode(prompt)
    room = eng.model.config.block_size - len(ids)
    if room < 1:
        raise ApiError(400, f"the prompt is {len(ids)} tokens, and the model's context is {eng.model.config.block_size}: "
                            f"shorten it", param="messages" if chat else "prompt", code="context_length_exceeded")
    seed = random.getrandbits(62) if seed is None else seed
    return eng, ids, dict(max_new=min(max_new or room, room), temperature=temperature, top_p=top_p, n=n, seed=seed,
                          stream=stream, usage=usage, stops=stops)


# -----------------------------------------------------------------------------
# HTTP


class Handler(BaseHTTPRequestHandler):
    server_version = "fromscratch-serve/1"
    protocol_version = "HTTP/1.1"
    engines, api_key, prefs, page, lock = {}, "", None, b"", threading.Lock()  # set by make_server

    def log_message(self, fmt, *args):  # quiet: one line per request on stderr is noise at load
        pass

    def send_json(self, status, obj):
        if status >= 400:  # the body may be unread: the connection cannot carry another request
            self.close_connection = True
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.path == "/" or self.path.startswith("/?"):
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(self.page)))
            self.end_headers()
            self.wfile.write(self.page)
        elif self.path == "/health":
            self.send_json(200, {"status": "ok", "models": {n: {"running": len(e.active), "waiting": e.waiting.qsize(),
                                                                "generated_tokens": e.generated}
                                                            for n, e in self.engines.items()}})
        elif self.path == "/v1/models":
            if self.authorized():
                self.send_json(200, {"object": "list", "data": [
                    {"id": n, "object": "model", "created": 0, "owned_by": "fromscratch", "chat": e.chat}
                    for n, e in self.engines.items()]})
        else:
            self.send_json(404, ApiError(404, f"no such path {self.path}").body)

    def authorized(self):
        if self.api_key and self.headers.get("Authorization", "") != f"Bearer {self.api_key}":
            self.send_json(401, ApiError(401, "a valid API key is needed: Authorization: Bearer <api_key>",
                                         code="invalid_api_key").body)
            return False
        return True

    def read_body(self):
        try:
            size = int(self.headers.get("Content-Length", ""))
        except ValueError:
            raise ApiError(411, "the request needs a Content-Length header")
        if size > max_body:
            self.close_connection = True  # the body is not read: the connection cannot be reused
            raise ApiError(413, f"the body is {size} bytes: at most {max_body}")
        try:
            return json.loads(self.rfile.read(size))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the body is not valid JSON ({e})")

    def do_POST(self):
        routes = {"/v1/chat/completions": True, "/v1/completions": False}
        try:
            if self.path == "/arena/vote":
                return self.vote(self.read_body())
            if self.path not in routes:
                raise ApiError(404, f"no such path {self.path}")
            if not self.authorized():
                return
            chat = routes[self.path]
            eng, ids, o = parse_request(self.read_body(), chat, self.engines)
            events = queue.Queue()
            seqs = [Seq(ids, o["max_new"], o["temperature"], o["top_p"], o["stops"], o["seed"] + i, events, i, eng.dev)
                    for i in range(o["n"])]
            eng.submit(seqs)
        except ApiError as e:
            return self.send_json(e.status, e.body)
        try:
            (self.stream if o["stream"] else self.respond)(eng, chat, ids, seqs, events, o)
        except (BrokenPipeError, ConnectionResetError):
            pass
        finally:
            for s in seqs:  # gone or done: the engine frees their rows at its next step
                s.cancelled = True

    def gone(self):
        """Whether the client has closed its side (checked while it waits)."""
        try:
            r, _, _ = select.select([self.connection], [], [], 0)
            return bool(r) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True

    def events(self, seqs, queue_):
        """(index, kind, value) as the engine posts them, until every choice is done; it stops early if the
        client went away (looked at every 0.05 s, busy or not: a reply being generated never leaves the queue idle)."""
        left, looked = len(seqs), time.monotonic()
        while left:
            try:
                ev = queue_.get(timeout=0.05)
            except queue.Empty:
                ev = None
            if time.monotonic() - looked >= 0.05:
                if self.gone():
                    return
                looked = time.monotonic()
            if ev is not None:
                left -= ev[1] in ("done", "error")
                yield ev

    def respond(self, eng, chat, ids, seqs, events, o):
        texts, ends, error = [""] * len(seqs), [None] * len(seqs), None
        for i, kind, v in self.events(seqs, events):
            if kind == "text":
                texts[i] += v
            elif kind == "done":
                ends[i] = v
            else:
                error = v
        if error or None in ends:
            if error:
                self.send_json(500, ApiError(500, f"generation failed: {error}", kind="server_error").body)
            return
        rid, made = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex, int(time.time())
        choices = [({"index": i, "message": {"role": "assistant", "content": t}} if chat else {"index": i, "text": t})
                   | {"finish_reason": e["finish_reason"], "logprobs": None} for i, (t, e) in enumerate(zip(texts, ends))]
        done = sum(e["completion_tokens"] for e in ends)
        self.send_json(200, {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": made,
                             "model": eng.name, "choices": choices,
                             "usage": {"prompt_tokens": len(ids), "completion_tokens": done, "total_tokens": len(ids) + done}})

    def stream(self, eng, chat, ids, seqs, events, o):
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        rid, made = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex, int(time.time())
        extra = {"usage": None} if o["usage"] else {}

        def send(choices, **more):
            obj = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": made,
                   "model": eng.name, "choices": choices, **extra, **more}
            self.wfile.write(b"data: " + json.dumps(obj).encode() + b"\n\n")
            self.wfile.flush()

        if chat:  # the first delta of each choice carries the role
            for s in seqs:
                send([{"index": s.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}])
        done, ended = 0, 0
        for i, kind, v in self.events(seqs, events):
            if kind == "error":  # the status is sent already: the error object goes as an event (as OpenAI does)
                err = ApiError(500, f"generation failed: {v}", kind="server_error").body
                self.wfile.write(b"data: " + json.dumps(err).encode() + b"\n\n")
                return
            if kind == "text":
                send([{"index": i, **({"delta": {"content": v}} if chat else {"text": v}), "logprobs": None,
                       "finish_reason": None}])
            else:
                done, ended = done + v["completion_tokens"], ended + 1
                send([{"index": i, **({"delta": {}} if chat else {"text": ""}), "logprobs": None,
                       "finish_reason": v["finish_reason"]}])
        if ended < len(seqs):  # the client went away
            return
        if o["usage"]:
            send([], usage={"prompt_tokens": len(ids), "completion_tokens": done, "total_tokens": len(ids) + done})
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()

    def vote(self, body):
        """The arena's pick: {messages, a: {model, text}, b: {model, text}, winner: a|b|tie}. A or B is appended
        to the prefs file as dpo.py's {prompt, chosen, rejected} (with both models' names); a tie is kept in
        the votes log beside it (FILE.votes.jsonl) with every pick."""
        if not isinstance(body, dict) or body.get("winner") not in ("a", "b", "tie"):
            raise ApiError(400, "a vote is {messages, a: {model, text}, b: {model, text}, winner: 'a'|'b'|'tie'}")
        sides = [body.get(k) for k in ("a", "b")]
        if not all(isinstance(s, dict) and isinstance(s.get("text"), str) and isinstance(s.get("model"), str) for s in sides):
            raise ApiError(400, "'a' and 'b' must each be {model, text}")
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs or not all(isinstance(m, dict) and m.get("role") in ("system", "user", "assistant")
                                                             and isinstance(m.get("content"), str) for m in msgs):
            raise ApiError(400, "'messages' must be the conversation the two replies answer")
        if self.prefs is None:
            raise ApiError(400, "this server records no votes (start it with --prefs=FILE.jsonl)")
        rec = {"prompt": msgs, "winner": body["winner"], "a": sides[0], "b": sides[1], "time": int(time.time())}
        with self.lock:
            if body["winner"] != "tie":
                win, lose = sides if body["winner"] == "a" else sides[::-1]
                with open(self.prefs, "a", encoding="utf-8") as f:
                    f.write(json.dumps({"prompt": msgs, "chosen": win["text"], "rejected": lose["text"],
                                        "chosen_model": win["model"], "rejected_model": lose["model"]}) + "\n")
            with open(str(self.prefs) + ".votes.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(rec) + "\n")
        self.send_json(200, {"ok": True})


def make_server(engines, host_="127.0.0.1", port_=0, key="", prefs_file=None):
    """The HTTP server for these engines ({name: Engine}), bound and ready for serve_forever()."""
    handler = type("Bound", (Handler,), dict(engines=engines, api_key=key, prefs=prefs_file,
                                             page=(Path(__file__).parent / "chat.html").read_bytes(),
                                             lock=threading.Lock()))
    server = ThreadingHTTPServer((host_, port_), handler)
    server.daemon_threads = True
    return server


def load_engine(init, directory, dev, quant=""):
    from hf import load_model
    from quant import for_decoding
    model, ckpt, tok = load_model(init, directory, dev)
    model = for_decoding(model, quant, dev)
    name = Path(directory).name if init == "resume" else Path(init).name
    return Engine(name, model, tok, ckpt, dev, max_batch, max_queue)


def main():
    from common import pick_device
    from quant import check_mode
    if max_batch < 1 or max_queue < 0 or not 0 < port < 65536 and port != 0:
        die(f"need max_batch >= 1, max_queue >= 0 and a port in 1..65535 (got {max_batch}, {max_queue}, {port})")
    dev = pick_device(device)
    check_mode(quantize)
    engines = {}  # filled once the port is ours: a busy port should not cost the load of a model
    try:
        server = make_server(engines, host, port, api_key, Path(prefs) if prefs else None)
    except OSError as e:
        die(f"cannot listen on {host}:{port} ({e.strerror}): another server is using it? choose another --port")
    for init, directory in ((init_from, out_dir), ("resume", out_dir_b)):
        if directory or init != "resume":
            e = load_engine(init, directory, dev, quantize)
            if e.name in engines:
                e.name = f"{e.name}-b"
            engines[e.name] = e
    if len(engines) == 2:
        a, b = engines.values()
        if a.tok.spec != b.tok.spec:
            print(f"note: {a.name} and {b.name} use different tokenizers ({a.tok.kind}, {b.tok.kind}): the arena works, "
                  f"but their token counts are not comparable", file=sys.stderr)
    desc = ", ".join(f"{n} ({'chat' if e.chat else 'base'}{', ' + quantize if quantize else ''})" for n, e in engines.items())
    print(f"serving {desc} on http://{host}:{server.server_address[1]} (the page at /, the API at /v1); arena picks "
          f"-> {prefs or 'nowhere'}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    from common import configure
    config = configure(globals())
    main()
