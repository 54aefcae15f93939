"""The grader: the trust boundary between model text and the trainer.

Model text is untrusted. In the trainer's process it is only matched by linear-time scans (the
final box, at most BOXED_SCAN_CHARS characters from the end), refused when the boxed answer is
longer than MAX_ANSWER_CHARS, and converted with ``int()`` when it spells a plain integer. Every
other answer goes to math-verify's LaTeX parser, and only to that: never to eval/exec, ``sympify``
or sympy's ``parse_expr`` (which evaluate Python; math-verify's own expression extractor calls
``parse_expr``, so model answers are parsed with its LaTeX extractor alone).

math-verify turns hostile input (a power tower, a huge factorial, thousands of nested braces) into
seconds of CPU or gigabytes of memory, and its own time limits rely on SIGALRM, which neither
interrupts C code nor works outside a main thread. So that path runs in worker processes:

- a worker is a fresh interpreter (``sys.executable -c ...``): no fork of a trainer holding torch,
  CUDA and an in-process vLLM, and no multiprocessing spawn/forkserver either, which would re-import
  the trainer's ``__main__`` in every worker and unpickle what a worker sends back. One JSON line per
  job goes each way over the worker's stdin/stdout, so nothing a worker says is unpickled;
- every job has a wall-clock limit (``timeout_s``): a worker past it is killed and replaced, its item
  scores 0 and counts as "killed"; a worker that dies mid-job (or speaks out of protocol) counts as
  "crash", its item scores 0; other items of the batch are unaffected;
- inside a worker math-verify runs in the main thread with its own limits (half of ``timeout_s``
  for each parse and each comparison), so most slow answers end without a restart
  ("timeout"); the address space is capped (WORKER_MEMORY_LIMIT_BYTES), SIGINT is ignored (the
  trainer shuts workers down) and a worker dies with its parent (Linux PR_SET_PDEATHSIG).

``workers=0`` grades in-process (tests, debugging): bounded only by math-verify's own limits, and
only in the main thread (elsewhere it runs without limits; MAX_ANSWER_CHARS still applies).
"""

from __future__ import annotations

import ctypes
import functools
import importlib
import json
import logging
import os
import re
import selectors
import signal
import subprocess
import sys
import threading
import time
import weakref
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache

log = logging.getLogger("fastgrpo.rewards.grader")

# ----------------------------------------------------------------------------------------------
# Finding the final answer (runs in the trainer's process: linear time, no parsing)
# ----------------------------------------------------------------------------------------------

# Only the end of a completion is searched, so the work per completion is bounded whatever the
# model writes: 10,000 characters is ~2,500 tokens of trailing text, far more than follows a
# final answer. A box that starts earlier than that is not seen.
BOXED_SCAN_CHARS = 10_000
_BOX_START = re.compile(r"\\(?:boxed|fbox)\s*\{")  # no nested quantifiers: linear time


def _closing_brace(text: str, open_index: int) -> int | None:
    """Index of the brace closing ``text[open_index] == "{"``, skipping escaped ``\\{`` / ``\\}``."""
    depth, i = 0, open_index
    while i < len(text):
        char = text[i]
        if char == "\\":
            i += 2  # \{ and \} are literal braces; \\ is an escaped backslash
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return None


def last_box(text: str) -> tuple[str, str] | None:
    """(content, text after the box) of the last top-level box, None if absent or unbalanced."""
    window = text[-BOXED_SCAN_CHARS:]
    last, position = None, 0
    while (match := _BOX_START.search(window, position)) is not None:
        close = _closing_brace(window, match.end() - 1)
        if close is None:
            return None  # the final box is cut off (e.g. truncated generation): no final answer
        last = (window[match.end() : close], window[close + 1 :])
        position = close + 1
    return last


def extract_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` or ``\\fbox{...}``, whitespace-stripped.

    Braces nest (``\\boxed{\\frac{1}{2}}`` -> ``\\frac{1}{2}``); a box inside a box belongs to the
    outer one. None when there is no box or the last one never closes (an unclosed final box is
    not an answer even if an earlier box closed). Only the last BOXED_SCAN_CHARS characters are
    scanned. ``\\boxed{}`` gives "" (present but empty).
    """
    box = last_box(text)
    return None if box is None else box[0].strip()


# ----------------------------------------------------------------------------------------------
# Comparing one answer with the gold answer
# ----------------------------------------------------------------------------------------------

# A boxed answer longer than this is scored 0 without parsing: the longest gold answer in the
# shipped eval/train sets has 204 characters, and math-verify's cost (and the size of the log
# line its timeout writes: the whole input) grows with the input.
MAX_ANSWER_CHARS = 1_000
# ASCII digits only: int() also reads fullwidth or Arabic-Indic digits, which leave the fast path.
_INTEGER = re.compile(r"[+-]?[0-9]+")
_THOUSANDS = re.compile(r"[+-]?[0-9]{1,3}(?:,[0-9]{3})+")


def as_plain_integer(text: str) -> int | None:
    """The integer a plain answer spells ("42", " +42 ", "1,000", "42.0", "042"), else None.

    Leading zeros do not matter: AIME's gold "025" equals a boxed 25 (math-verify agrees).
    """
    text = text.replace(" ", "")
    if len(text) > MAX_ANSWER_CHARS:  # int() refuses > 4,300 digits; such text is no plain answer
        return None
    if text.endswith(".0"):
        text = text[:-2]
    if _THOUSANDS.fullmatch(text):
        text = text.replace(",", "")
    if not _INTEGER.fullmatch(text):
        return None
    return int(text)


@lru_cache(maxsize=1)
def latex_only_extraction() -> list:
    from math_verify import LatexExtractionConfig

    return [LatexExtractionConfig()]


_GOLD_CACHE: dict[tuple[str, int | None], tuple] = {}
_GOLD_CACHE_SIZE = 8192


def parse_gold(gold: str, parsing_timeout: int | None) -> tuple:
    # Gold answers are the dataset's (trusted): math-verify's default extractors, the
    # expression one included, read plain forms such as "0.5" or "1/2".
    from math_verify import parse

    key = (gold, parsing_timeout)
    if key in _GOLD_CACHE:
        return _GOLD_CACHE[key]
    timeouts = _MathVerifyTimeouts.count
    parsed = parse(f"${gold}$", parsing_timeout=parsing_timeout)
    if not parsed:
        parsed = parse(gold, parsing_timeout=parsing_timeout)
    # A parse cut short by the time limit is not cached: seen in a cold worker on a loaded machine,
    # "\left( 3, \frac{\pi}{2} \right)" timed out once, and a cached failure failed every later
    # answer to that problem.
    if _MathVerifyTimeouts.count == timeouts:
        if len(_GOLD_CACHE) >= _GOLD_CACHE_SIZE:
            del _GOLD_CACHE[next(iter(_GOLD_CACHE))]
        _GOLD_CACHE[key] = tuple(parsed)
    return tuple(parsed)


def math_verify_equal(predicted: str, gold: str, *, timeout_s: int = 1) -> bool:
    """math-verify's verdict on the boxed content ``predicted`` against ``gold``.

    ``predicted`` is parsed by the LaTeX extractor only (no ``parse_expr``, which evaluates Python).
    ``timeout_s`` (whole seconds: SIGALRM) bounds each parse and each comparison; it applies only in
    the main thread, elsewhere math-verify runs without a limit.
    """
    from math_verify import parse, verify

    limit = timeout_s if threading.current_thread() is threading.main_thread() else None
    gold_parsed = parse_gold(gold, limit)
    predicted_parsed = parse(f"\\boxed{{{predicted}}}", extraction_config=latex_only_extraction(), parsing_timeout=limit)
    if not gold_parsed or not predicted_parsed:
        # Nothing math-verify can read on one side: only the identical string counts.
        return predicted.strip() == gold.strip()
    return bool(verify(list(gold_parsed), predicted_parsed, timeout_seconds=limit))


class _MathVerifyTimeouts(logging.Filter):
    """Counts math-verify's timeouts (it scores them False and says so only in a log line) and drops
    those lines: they quote the whole input (one hostile completion wrote 400 KB)."""

    count = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if str(record.msg).startswith("Timeout"):
            _MathVerifyTimeouts.count += 1
            return False
        return True


for _logger_name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_logger_name).addFilter(_MathVerifyTimeouts())

GradeFn = Callable[[str, str], bool]


def grade_one(grade_fn: GradeFn, predicted: str, gold: str) -> tuple[bool, str]:
    """(correct, kind) for one answer; never raises (except KeyboardInterrupt/SystemExit).

    kind: "math_verify" (graded), "timeout" (math-verify hit its limit and scored it wrong),
    "error" (an exception: a sympy error, a RecursionError, a MemoryError under the worker's cap).
    """
    before = _MathVerifyTimeouts.count
    try:
        correct = bool(grade_fn(predicted, gold))
    except Exception:  # noqa: BLE001 - any failure to grade is a wrong answer, counted
        return False, "error"
    except BaseException as exc:  # math-verify's TimeoutException derives from BaseException
        if type(exc).__name__ != "TimeoutException":
            raise
        return False, "timeout"
    if not correct and _MathVerifyTimeouts.count != before:
        return False, "timeout"
    return correct, "math_verify"


# ----------------------------------------------------------------------------------------------
# Worker processes
# ----------------------------------------------------------------------------------------------

# A worker's address space: it holds ~64 MB (VmSize) after grading; 1 GiB ends a runaway
# big-integer computation with a MemoryError (scored 0) long before it can hurt the trainer.
WORKER_MEMORY_LIMIT_BYTES = 1 << 30
# A worker imports math-verify (~0.5 s alone); on a loaded machine allow much more.
WORKER_START_TIMEOUT_S = 60.0
# A worker's reply is one short JSON line; anything longer is out of protocol.
_MAX_REPLY_BYTES = 1 << 16
_KINDS = ("math_verify", "timeout", "error")
_WORKER_BOOT = "from fastgrpo.rewards.grader import _worker_main; _worker_main()"
# Answers of the usual shapes (fraction, tuple with pi, root, polynomial, interval, set, degrees).
_WARM_UP = (("\\frac{1}{2}", "0.5"), ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3, \\frac{\\pi}{2})"),
            ("2\\sqrt{3}", "\\sqrt{12}"), ("x^2 + 1", "1 + x^2"), ("[1, 2)", "[1,2)"), ("\\{1, 2\\}", "\\{2, 1\\}"),
            ("30^\\circ", "30"))


class GraderError(RuntimeError):
    """The grader cannot work at all (a worker failed to start); individual answers never raise."""


def _function_path(fn: Callable) -> str:
    """"module:qualname" of a module-level function, for a worker to import."""
    module, qualname = getattr(fn, "__module__", None), getattr(fn, "__qualname__", "")
    if not module or "<" in qualname or module == "__main__":
        raise TypeError(f"grade_fn must be a module-level function importable by a worker, got {fn!r}")
    return f"{module}:{qualname}"


def _import_function(path: str) -> Callable:
    module, qualname = path.split(":", 1)
    obj = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _die_with_parent() -> None:
    # The kernel signals the worker when the thread that started it ends: the trainer grades from
    # its main thread; a pool used from a short-lived thread sees its workers die (counted, replaced).
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass


def _cap_memory(limit: int) -> None:
    try:
        import resource
    except ImportError:  # not POSIX
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


def _worker_main() -> None:
    """A worker's loop: an init line, then one job line in, one reply line out, until stdin closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent()
    replies = os.fdopen(os.dup(1), "w", encoding="ascii")
    os.dup2(2, 1)  # stray prints from any library go to stderr, never into the protocol
    first_line = sys.stdin.readline()
    if not first_line:
        return  # the trainer closed the pool before the worker started
    init = json.loads(first_line)
    if os.getppid() != init["parent_pid"]:
        return  # the parent died before PR_SET_PDEATHSIG took effect
    _cap_memory(init["memory_limit"])
    if init["grade_fn"]:
        grade_fn = _import_function(init["grade_fn"])
    else:
        grade_fn = functools.partial(math_verify_equal, timeout_s=init["math_verify_timeout_s"])
        for predicted, gold in _WARM_UP:  # load math-verify, its grammar and sympy before the clock runs
            grade_one(grade_fn, predicted, gold)
    replies.write('{"ready": true}\n')
    replies.flush()
    for line in sys.stdin:
        job = json.loads(line)
        correct, kind = grade_one(grade_fn, job["predicted"], job["gold"])
        replies.write(json.dumps({"id": job["id"], "correct": correct, "kind": kind}) + "\n")
        replies.flush()


class _Worker:
    """The trainer's handle on one worker process."""

    def __init__(self, init: dict, selector: selectors.BaseSelector):
        env = dict(os.environ)
        # The worker imports fastgrpo (and a test's grade_fn) the way the trainer did.
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p and os.path.isdir(p))
        self.proc = subprocess.Popen([sys.executable, "-c", _WORKER_BOOT], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, env=env, close_fds=True)
        self.fd = self.proc.stdout.fileno()
        os.set_blocking(self.fd, False)
        self.buffer = b""
        self.ready = False
        self.started = time.monotonic()
        self.job: tuple[int, float] | None = None  # (item index, deadline)
        self.selector = selector
        selector.register(self.fd, selectors.EVENT_READ, self)
        self.send(init)

    def send(self, message: dict) -> None:
        self.proc.stdin.write((json.dumps(message) + "\n").encode("ascii"))
        self.proc.stdin.flush()

    def read_lines(self) -> list[bytes] | None:
        """Complete lines received so far; None at end of file (the worker is gone)."""
        try:
            data = os.read(self.fd, 1 << 16)
        except BlockingIOError:
            return []
        if not data:
            return None
        self.buffer += data
        *lines, self.buffer = self.buffer.split(b"\n")
        if len(self.buffer) > _MAX_REPLY_BYTES:
            raise ValueError("reply too long")
        return lines

    def stop(self) -> None:
        """Kill the worker and reap it (a worker holds nothing worth a graceful exit; SIGKILL is instant)."""
        try:
            self.selector.unregister(self.fd)
        except (KeyError, ValueError):
            pass
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                stream.close()
            except OSError:
                pass


def _shutdown(workers: list[_Worker]) -> None:
    for worker in workers:
        worker.stop()
    workers.clear()


# ----------------------------------------------------------------------------------------------
# The grader
# ----------------------------------------------------------------------------------------------


@dataclass
class GradeResult:
    """correct[i] for each completion; stats counts how items were decided: "integer" (compared in
    the trainer), "math_verify", "no_answer" (no final box, or an empty one), "too_long", "error",
    "timeout" (math-verify's own limit), "killed" (past timeout_s, worker replaced), "crash"."""

    correct: list[bool]
    stats: Counter = field(default_factory=Counter)

    @property
    def timeouts(self) -> int:
        return self.stats["timeout"] + self.stats["killed"]


class Grader:
    """Grades (completion, gold answer) pairs: ``grade(completions, golds) -> GradeResult``.

    workers: worker processes for the math-verify path (0 = grade in-process); started on first
    need, reused across calls, replaced when killed or crashed. timeout_s: wall-clock limit per
    item in a worker. grade_fn: ``fn(predicted, gold) -> bool`` used instead of math-verify (a
    module-level function: the workers import it; for tests). Not thread-safe across calls (a lock
    serializes them). ``close()`` (also at interpreter exit) stops the workers.
    """

    def __init__(self, workers: int = 2, timeout_s: float = 5.0, grade_fn: GradeFn | None = None):
        if not isinstance(workers, int) or workers < 0:
            raise ValueError(f"workers must be an integer >= 0, got {workers!r}")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s!r}")
        self.workers = workers
        self.timeout_s = float(timeout_s)
        # math-verify's limits are whole seconds, for each parse and each comparison. Half the hard
        # limit: most slow answers end gracefully (no restart), and a legitimate answer is not cut
        # short on a loaded machine (at 1 s, a cold worker on a 2-core machine at load 10 timed
        # out on a MATH-500 gold answer).
        self.math_verify_timeout_s = max(1, int(timeout_s / 2))
        self._grade_fn_path = _function_path(grade_fn) if grade_fn is not None and workers else None
        self._grade_fn = grade_fn or functools.partial(math_verify_equal, timeout_s=self.math_verify_timeout_s)
        self._pool: list[_Worker] = []
        self._selector: selectors.BaseSelector | None = None
        self._lock = threading.Lock()
        self._finalizer = weakref.finalize(self, _shutdown, self._pool)

    def grade(self, completions: list[str], golds: list[str]) -> GradeResult:
        """Grade the last box of each completion against its gold answer; never raises for an answer."""
        if len(completions) != len(golds):
            raise ValueError(f"got {len(completions)} completions but {len(golds)} gold answers; one per completion")
        result = GradeResult([False] * len(completions))
        jobs: list[tuple[int, str, str]] = []
        for index, (text, gold) in enumerate(zip(completions, golds)):
            predicted = extract_boxed(text)
            if not predicted:
                result.stats["no_answer"] += 1
            elif len(predicted) > MAX_ANSWER_CHARS:
                result.stats["too_long"] += 1
            elif (p := as_plain_integer(predicted)) is not None and (g := as_plain_integer(gold)) is not None:
                result.stats["integer"] += 1
                result.correct[index] = p == g
            else:
                jobs.append((index, predicted, gold))
        if jobs:
            with self._lock:
                (self._grade_in_workers if self.workers else self._grade_in_process)(jobs, result)
        return result

    def _grade_in_process(self, jobs: list[tuple[int, str, str]], result: GradeResult) -> None:
        for index, predicted, gold in jobs:
            result.correct[index], kind = grade_one(self._grade_fn, predicted, gold)
            result.stats[kind] += 1

    # -- the pool ------------------------------------------------------------------------------

    def _start_worker(self) -> None:
        if self._selector is None:
            self._selector = selectors.DefaultSelector()
        init = {"parent_pid": os.getpid(), "grade_fn": self._grade_fn_path,
                "math_verify_timeout_s": self.math_verify_timeout_s, "memory_limit": WORKER_MEMORY_LIMIT_BYTES}
        self._pool.append(_Worker(init, self._selector))

    def _retire(self, worker: _Worker, result: GradeResult, kind: str) -> None:
        """Stop a worker that timed out, crashed or broke protocol; its item scores 0 as ``kind``."""
        if worker.job is not None:
            result.stats[kind] += 1
            worker.job = None
        elif not worker.ready:
            code = worker.proc.poll()
            worker.stop()
            self._pool.remove(worker)
            raise GraderError(f"a grader worker failed to start (exit code {code}); its stderr is above")
        worker.stop()
        self._pool.remove(worker)

    def _grade_in_workers(self, jobs: list[tuple[int, str, str]], result: GradeResult) -> None:
        pending = deque(jobs)
        while pending or any(w.job for w in self._pool):
            while len(self._pool) < min(self.workers, len(pending) + sum(w.job is not None for w in self._pool)):
                self._start_worker()
            for worker in self._pool:
                if pending and worker.ready and worker.job is None:
                    index, predicted, gold = pending.popleft()
                    worker.job = (index, time.monotonic() + self.timeout_s)
                    try:
                        worker.send({"id": index, "predicted": predicted, "gold": gold})
                    except OSError:  # the worker is gone; its item scores 0
                        self._retire(worker, result, "crash")
                        break
            now = time.monotonic()
            deadlines = [w.job[1] if w.job else w.started + WORKER_START_TIMEOUT_S
                         for w in self._pool if w.job or not w.ready]
            wait_s = max(0.0, min(deadlines) - now) if deadlines else 0.0
            for key, _ in self._selector.select(wait_s):
                if key.data in self._pool:
                    self._receive(key.data, result)
            now = time.monotonic()
            for worker in list(self._pool):
                if worker.job is not None and now > worker.job[1]:
                    self._retire(worker, result, "killed")
                elif not worker.ready and now > worker.started + WORKER_START_TIMEOUT_S:
                    self._retire(worker, result, "crash")

    def _receive(self, worker: _Worker, result: GradeResult) -> None:
        try:
            lines = worker.read_lines()
            if lines is None:
                return self._retire(worker, result, "crash")
            for line in lines:
                reply = json.loads(line)
                if not isinstance(reply, dict):
                    raise ValueError("a reply is a JSON object")
                if not worker.ready:
                    if reply != {"ready": True}:
                        raise ValueError("expected the ready line")
                    worker.ready = True
                    continue
                if worker.job is None or reply.get("id") != worker.job[0] or not isinstance(reply.get("correct"), bool):
                    raise ValueError("a reply that answers no job")
                result.correct[worker.job[0]] = reply["correct"]
                result.stats[reply["kind"] if reply.get("kind") in _KINDS else "error"] += 1
                worker.job = None
        except (ValueError, UnicodeDecodeError):  # out of protocol: treat the worker as broken
            self._retire(worker, result, "crash")

    def close(self) -> None:
        """Stop the workers; a later grade() starts new ones."""
        with self._lock:
            _shutdown(self._pool)

    def __enter__(self) -> Grader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def worker_pids(self) -> list[int]:
        return [w.proc.pid for w in self._pool]


_SHARED: Grader | None = None


def shared_grader(workers: int, timeout_s: float) -> Grader:
    """The process-wide grader with these settings (an earlier one with other settings is closed)."""
    global _SHARED
    if _SHARED is None or (_SHARED.workers, _SHARED.timeout_s) != (workers, float(timeout_s)):
        if _SHARED is not None:
            _SHARED.close()
        _SHARED = Grader(workers, timeout_s)
    return _SHARED
