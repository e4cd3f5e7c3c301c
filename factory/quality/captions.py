"""Caption scores as pycocoevalcap computes them: BLEU-1..4 (`bleu/bleu_scorer.py`, "closest" reference length)
and CIDEr-D (`cider/cider_scorer.py`: n-grams up to 4, document frequencies from the references of the evaluated
set, Gaussian length penalty with sigma 6, clipped counts, x10), on captions tokenized by `tokenize`.

pycocoevalcap tokenizes with Stanford's PTBTokenizer (Java, `-lowerCase -preserveLines`) and then drops the
tokens in its PUNCTUATIONS list. `tokenize` does the same in Python for ordinary English: it lowercases, splits
punctuation and the clitics PTB splits ("don't" -> "do n't", "dog's" -> "dog 's", "cannot" -> "can not",
"gonna" -> "gon na"), writes brackets as PTB does (lowercased, "-lrb-" is not in PUNCTUATIONS, so it stays, as it
does there), and keeps acronyms ("u.s."), decimals, times, prices, hyphenated words and e-mail addresses whole. PTB's rarer rules
(its abbreviation list: "mr." loses its period here; quotes inside words: "rock'n'roll" stays one token) are not
reproduced, so scores on such text can differ slightly.

BLEU is a corpus score: each row keeps its n-gram counts (`BleuCounts`), counts add up, and `bleu` of a sum is
the corpus BLEU of those rows. CIDEr-D depends on the whole set through its document frequencies, so it is scored
over a set of rows at once (`cider_d`).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Sequence

from pydantic import BaseModel, ConfigDict, Field

MAX_N = 4
CIDER_SIGMA = 6.0
# pycocoevalcap's guards against zero counts (bleu_scorer.compute_score).
_BLEU_TINY = 1e-15
_BLEU_SMALL = 1e-9

# pycocoevalcap/tokenizer/ptbtokenizer.py: tokens dropped after PTB tokenization.
PUNCTUATIONS = frozenset({"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-",
                          "--", "...", ";"})
# PTB writes a straight double quote as `` or '', both dropped.
_DROPPED = PUNCTUATIONS | {'"'}
# PTB writes brackets as names; with -lowerCase the names are lowercased and so escape the PUNCTUATIONS filter.
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
_QUOTES = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"'})
_SPLIT_WORDS = re.compile(r"\b(can(?=not\b)|gon(?=na\b)|wan(?=na\b)|got(?=ta\b))")
_CLITIC = re.compile(r"(?<=\w)(n't|'(?:s|re|ve|ll|d|m))\b")
_TOKEN = re.compile(
    r"""n't|'(?:s|re|ve|ll|d|m)\b       # clitics split off above
      | (?:[^\W\d_]\.){2,}              # acronyms: u.s. p.m.
      | \d+(?:[.,:]\d+)+                # 3.5 1,000 3:30
      | \w+(?:[-'@.&/]\w+)*             # words, hyphenated words, e-mail addresses
      | \.\.\.|--|[!?]+                 # runs PTB keeps as one token
      | \S                              # any other mark on its own
    """,
    re.VERBOSE,
)


def tokenize(text: str) -> str:
    """A caption as pycocoevalcap scores it: PTB tokens, lowercased, punctuation tokens dropped, space-joined."""
    text = _CLITIC.sub(r" \1", _SPLIT_WORDS.sub(r"\1 ", text.translate(_QUOTES).lower()))
    tokens = (_BRACKETS.get(token, token) for token in _TOKEN.findall(text))
    return " ".join(token for token in tokens if token not in _DROPPED)


def _ngrams(tokens: str, n: int = MAX_N) -> Counter[tuple[str, ...]]:
    words = tokens.split()
    return Counter(tuple(words[i:i + k]) for k in range(1, n + 1) for i in range(len(words) - k + 1))


class BleuCounts(BaseModel):
    """What BLEU needs of one or more candidates; counts of several rows add up to those of the corpus."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    candidate_length: int = Field(ge=0, description="Candidate tokens")
    reference_length: int = Field(ge=0, description="Tokens of the reference closest in length (ties: the shorter)")
    guesses: tuple[int, ...] = Field(description="Candidate n-grams for n = 1..4")
    matches: tuple[int, ...] = Field(description="Candidate n-grams also in a reference (clipped), n = 1..4")

    def __add__(self, other: BleuCounts) -> BleuCounts:
        return BleuCounts(
            candidate_length=self.candidate_length + other.candidate_length,
            reference_length=self.reference_length + other.reference_length,
            guesses=tuple(a + b for a, b in zip(self.guesses, other.guesses, strict=True)),
            matches=tuple(a + b for a, b in zip(self.matches, other.matches, strict=True)),
        )


_NO_COUNTS = BleuCounts(candidate_length=0, reference_length=0, guesses=(0,) * MAX_N, matches=(0,) * MAX_N)


def bleu_counts(candidate: str, references: Sequence[str]) -> BleuCounts:
    """Counts of one tokenized candidate against its tokenized references."""
    if not references:
        raise ValueError("bleu needs at least one reference")
    counts = _ngrams(candidate)
    most_in_a_reference: Counter[tuple[str, ...]] = Counter()
    for reference in references:
        most_in_a_reference |= _ngrams(reference)
    length = len(candidate.split())
    closest = min((abs(len(reference.split()) - length), len(reference.split())) for reference in references)[1]
    matches = [0] * MAX_N
    for ngram, count in counts.items():
        matches[len(ngram) - 1] += min(most_in_a_reference[ngram], count)
    return BleuCounts(
        candidate_length=length, reference_length=closest,
        guesses=tuple(max(0, length - k + 1) for k in range(1, MAX_N + 1)), matches=tuple(matches),
    )


def bleu(counts: BleuCounts | Iterable[BleuCounts]) -> tuple[float, ...]:
    """BLEU-1..4 of the counts (one row's: its sentence BLEU; a sum or several rows': their corpus BLEU), in
    [0, 1]; pycocoevalcap's `Bleu(4)` reports the same numbers."""
    if not isinstance(counts, BleuCounts):
        counts = sum(counts, start=_NO_COUNTS)
    scores, product = [], 1.0
    for k in range(MAX_N):
        product *= (counts.matches[k] + _BLEU_TINY) / (counts.guesses[k] + _BLEU_SMALL)
        scores.append(product ** (1.0 / (k + 1)))
    ratio = (counts.candidate_length + _BLEU_TINY) / (counts.reference_length + _BLEU_SMALL)
    if ratio < 1:
        scores = [score * math.exp(1 - 1 / ratio) for score in scores]
    return tuple(scores)



def _tfidf(counts: Counter[tuple[str, ...]], frequencies: Counter[tuple[str, ...]], log_rows: float):
    """CIDEr's tf-idf vectors per n-gram order, their norms, and the caption's length in words. (pycocoevalcap's
    `counts2vec` counts bigrams for the length, one fewer: the penalty sees the same difference whenever both
    captions have words, and an empty caption scores 0 whatever its penalty.)"""
    vectors: list[dict[tuple[str, ...], float]] = [{} for _ in range(MAX_N)]
    squares = [0.0] * MAX_N
    words = 0
    for ngram, count in counts.items():
        order = len(ngram) - 1
        weight = count * (log_rows - math.log(max(1.0, frequencies[ngram])))
        vectors[order][ngram] = weight
        squares[order] += weight ** 2
        if order == 0:
            words += count
    return vectors, [math.sqrt(square) for square in squares], words


def _similarity(candidate, reference, sigma: float) -> list[float]:
    (vec, norm, length), (vec_ref, norm_ref, length_ref) = candidate, reference
    penalty = math.e ** (-((length - length_ref) ** 2) / (2 * sigma ** 2))
    values = []
    for order in range(MAX_N):
        value = sum(min(weight, vec_ref[order].get(ngram, 0.0)) * vec_ref[order].get(ngram, 0.0)
                    for ngram, weight in vec[order].items())
        if norm[order] != 0 and norm_ref[order] != 0:
            value /= norm[order] * norm_ref[order]
        values.append(value * penalty)
    return values


def cider_d(candidates: Sequence[str], references: Sequence[Sequence[str]], sigma: float = CIDER_SIGMA) -> list[float]:
    """CIDEr-D of each tokenized candidate against its tokenized references, with document frequencies taken from
    the references of all the rows given: the mean of the result is pycocoevalcap's `Cider()` score of the set."""
    if len(candidates) != len(references):
        raise ValueError(f"cider: {len(candidates)} candidates but {len(references)} reference lists")
    if any(not refs for refs in references):
        raise ValueError("cider needs at least one reference per candidate")
    reference_counts = [[_ngrams(reference) for reference in refs] for refs in references]
    frequencies: Counter[tuple[str, ...]] = Counter()
    for counts in reference_counts:
        frequencies.update(set().union(*counts))
    log_rows = math.log(float(len(candidates))) if candidates else 0.0
    scores = []
    for candidate, counts in zip(candidates, reference_counts):
        vector = _tfidf(_ngrams(candidate), frequencies, log_rows)
        total = [0.0] * MAX_N
        for reference in counts:
            total = [a + b for a, b in zip(total, _similarity(vector, _tfidf(reference, frequencies, log_rows), sigma))]
        scores.append(sum(total) / MAX_N / len(counts) * 10.0)
    return scores
