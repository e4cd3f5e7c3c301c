"""Caption scores equal pycocoevalcap's Bleu(4) and Cider() on the same tokenized captions."""

from __future__ import annotations

import shutil

import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider

from factory.quality.captions import bleu, bleu_counts, cider_d, tokenize

# What Stanford's PTBTokenizer (pycocoevalcap 1.2's jar, -lowerCase -preserveLines) followed by pycocoevalcap's
# punctuation filter made of these captions.
PTB = {
    "A man riding a wave on top of a surfboard.": "a man riding a wave on top of a surfboard",
    "Don't you see the dog's bone?": "do n't you see the dog 's bone",
    "It costs $5.50, or 50% off!": "it costs $ 5.50 or 50 % off",
    "Two (2) black-and-white cats; sleeping...": "two -lrb- 2 -rrb- black-and-white cats sleeping",
    'He said "hello" to the U.S. team.': "he said hello to the u.s. team",
    "I can't won't they're I'm we'll he'd you've": "i ca n't wo n't they 're i 'm we 'll he 'd you 've",
    "A  man\twith  spaces": "a man with spaces",
    "The clock reads 12:45 on the tower.": "the clock reads 12:45 on the tower",
    "\u201cCurly quotes\u201d and \u2018single\u2019 caf\u00e9": "curly quotes and single caf\u00e9",
    "The dogs' toys.": "the dogs toys",
    "Hello!!! What?!": "hello !!! what ?!",
    "cannot gonna wanna": "can not gon na wan na",
    "A kitchen with a stove, a sink, and a refrigerator.": "a kitchen with a stove a sink and a refrigerator",
    "e-mail me at foo@bar.com / now & then #1": "e-mail me at foo@bar.com / now & then # 1",
    "3.5kg of A_b": "3.5 kg of a_b",
}

# Five images as COCO gives them: a candidate and its human references, tokenized.
CANDIDATES = [
    "a man riding a wave on top of a surfboard",
    "two dogs playing with a frisbee",
    "a plate of food",
    "kitchen",
    "",
]
REFERENCES = [
    ["a man riding a wave on a surfboard", "a surfer riding a large wave in the ocean",
     "a man on a surfboard riding a wave"],
    ["two dogs playing with a frisbee in the grass", "a couple of dogs that are playing in the grass",
     "two dogs chase a red frisbee on a lawn", "dogs playing frisbee"],
    ["a plate of food with broccoli rice and meat", "a white plate topped with meat and vegetables"],
    ["a kitchen with a stove a sink and a refrigerator", "a small kitchen with white cabinets"],
    ["a red stop sign sitting on the side of a road"],
]


@pytest.mark.parametrize(("caption", "tokens"), list(PTB.items()))
def test_tokenize_matches_ptb_tokenizer_on_plain_text(caption, tokens):
    assert tokenize(caption) == tokens


@pytest.mark.skipif(shutil.which("java") is None, reason="pycocoevalcap's PTBTokenizer runs on Java")
def test_tokenize_matches_the_running_ptb_tokenizer():
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    captions = list(PTB)
    ptb = PTBTokenizer().tokenize({i: [{"caption": caption}] for i, caption in enumerate(captions)})
    assert [tokenize(caption) for caption in captions] == [ptb[i][0] for i in range(len(captions))]


def _coco(values):
    return {i: list(value) if isinstance(value, list) else [value] for i, value in enumerate(values)}


def test_bleu_equals_pycocoevalcap_for_the_corpus_and_each_row():
    expected, per_row = Bleu(4).compute_score(_coco(REFERENCES), _coco(CANDIDATES), verbose=0)
    counts = [bleu_counts(candidate, refs) for candidate, refs in zip(CANDIDATES, REFERENCES)]
    assert bleu(counts) == tuple(expected)
    assert bleu(sum(counts[1:], start=counts[0])) == tuple(expected)  # counts add up to the corpus
    for row, row_counts in enumerate(counts):
        assert bleu(row_counts) == tuple(per_row[k][row] for k in range(4))
    assert 0 < expected[3] < expected[0] < 1


def test_bleu_takes_the_reference_closest_in_length():
    counts = bleu_counts("a b c d e", ["a b", "a b c d e f g", "a b c d"])
    assert counts.reference_length == 4  # 4 and 6 are both one token away: the shorter wins
    assert counts.guesses == (5, 4, 3, 2) and counts.matches == (5, 4, 3, 2)


def test_cider_d_equals_pycocoevalcap():
    expected, per_row = Cider().compute_score(_coco(REFERENCES), _coco(CANDIDATES))
    scores = cider_d(CANDIDATES, REFERENCES)
    assert scores == pytest.approx(list(per_row), rel=1e-12, abs=1e-15)
    assert sum(scores) / len(scores) == pytest.approx(expected, rel=1e-12)
    assert scores[0] > 1 and scores[4] == 0.0


def test_cider_document_frequencies_come_from_the_rows_scored_together():
    alone = cider_d(CANDIDATES[:2], REFERENCES[:2])
    assert alone == pytest.approx(list(Cider().compute_score(_coco(REFERENCES[:2]), _coco(CANDIDATES[:2]))[1]))
    assert alone[0] != pytest.approx(cider_d(CANDIDATES, REFERENCES)[0])


def test_rows_without_references_are_refused():
    with pytest.raises(ValueError, match="at least one reference"):
        bleu_counts("a dog", [])
    with pytest.raises(ValueError, match="at least one reference per candidate"):
        cider_d(["a dog"], [[]])
