"""Real text for calibration and evaluation, from packages installed offline.

- chatterbot-corpus English Q/A pairs (retrieval evaluation for MiniLM)
- CPython's ``pydoc_data.topics`` prose (perplexity for LLMs, calibration text for encoders)
"""

from __future__ import annotations

import functools
import importlib.util
import re
from pathlib import Path

from qcompile.models.base import require


@functools.lru_cache(maxsize=1)
def chatterbot_pairs() -> tuple[tuple[str, str], ...]:
    """Unique (question, answer) pairs from the English corpus.

    Each conversation's first two lines form a pair; questions are de-duplicated
    case-insensitively (exact text otherwise), keeping the first answer; files in sorted order.
    """
    yaml = require("yaml")
    spec = importlib.util.find_spec("chatterbot_corpus")
    if spec is None or spec.origin is None:
        require("chatterbot_corpus")
    folder = Path(spec.origin).parent / "data" / "english"
    pairs: list[tuple[str, str]] = []
    seen: set[str] = set()
    for path in sorted(folder.glob("*.yml")):
        doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        for conversation in doc.get("conversations") or []:
            if not isinstance(conversation, list) or len(conversation) < 2:
                continue
            question, answer = str(conversation[0]), str(conversation[1])
            key = question.lower()
            if key in seen:
                continue
            seen.add(key)
            pairs.append((question, answer))
    return tuple(pairs)


@functools.lru_cache(maxsize=1)
def pydoc_text() -> str:
    """CPython's pydoc topics prose, concatenated in sorted-key order."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def pydoc_sentences(n: int, *, min_words: int = 5, max_words: int = 40, from_end: bool = False) -> list[str]:
    """``n`` English sentences from the pydoc prose (calibration text that is not in any eval set);
    ``from_end``: read from the last sentence backwards (held-out text: apart from the calibration
    sentences while the two add up to fewer than the prose holds, about 2,500)."""
    sentences = []
    split = re.split(r"(?<=[.!?])\s+", pydoc_text())
    for sentence in reversed(split) if from_end else split:
        words = sentence.split()
        if min_words <= len(words) <= max_words and not sentence.lstrip().startswith(">>>"):
            sentences.append(" ".join(words))
        if len(sentences) >= n:
            break
    return sentences
