"""VQA accuracy as the VQAv2 evaluation computes it: min(#humans who gave the answer / 3, 1), averaged over the
ten ways of leaving one human out, after the official answer normalisation.

The rules are those of `vqaEval.py` in GT-Vision-Lab/VQA (the dataset authors' evaluation code, its last change
"Fixed processing answers bug"): human answers are normalised only when they disagree (the released annotations
are already normalised), and a human answer is compared with the others, not with itself. One difference, shared
with lmms-eval's VQAv2 task (how published VLM figures are measured): the prediction is always normalised, so a
model that says "Yes." to a question every human answered "yes" scores 1, where the official script, which leaves
unanimous questions unnormalised, scores 0.

Rows written for a job rather than taken from VQAv2 often carry one to three expected answers; three humans can
never agree among fewer than four, so those rows score by exact match of the normalised answers (1 or 0).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

# Humans who must give an answer for it to count as fully right (VQA's accuracy metric).
AGREEING_HUMANS = 3
# Below this many expected answers the leave-one-out consensus cannot reach 1: exact match instead.
CONSENSUS_MIN_ANSWERS = AGREEING_HUMANS + 1

_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?",
                "!")
_NUMBER_COMMA = re.compile(r"(\d)(,)(\d)")
# As written in the official code: "(?!<=\d)" is a lookahead that cannot fail in front of a ".", so what goes is
# every period not followed by a digit ("3.5" stays, "yes." loses its period).
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
# The official code passes re.UNICODE (32) where re.sub takes its count: at most 32 periods go.
_PERIODS_REMOVED = 32
_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                 "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = frozenset({"a", "an", "the"})
# The official table, keys and values as they are (its capitalised keys never match lowercased text).
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at",
    "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've",
    "someone'dve": "someone'd've", "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}


def strip_punctuation(text: str) -> str:
    """The official `processPunctuation`: a mark touching a space (or any mark, once the text holds a number
    written with a thousands comma) is deleted, other marks become a space; then periods not before a digit go."""
    number_comma = _NUMBER_COMMA.search(text) is not None
    out = text
    for mark in _PUNCTUATION:
        out = out.replace(mark, "" if number_comma or mark + " " in text or " " + mark in text else " ")
    return _PERIOD.sub("", out, count=_PERIODS_REMOVED)


def digits_articles_contractions(text: str) -> str:
    """The official `processDigitArticle`: lowercase, number words to digits, articles out, apostrophes put back
    into contractions ("dont" -> "don't")."""
    words = [_NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    return " ".join(_CONTRACTIONS.get(word, word) for word in words if word not in _ARTICLES)


def _one_line(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def normalize_answer(text: str) -> str:
    """An answer in the form VQA compares: "Two dogs." -> "2 dogs"."""
    return digits_articles_contractions(strip_punctuation(_one_line(text)))


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """Accuracy of `prediction` against the human (or expected) `answers`, in [0, 1]."""
    if not answers:
        raise ValueError("vqa accuracy needs at least one expected answer")
    predicted = normalize_answer(prediction)
    expected = [_one_line(answer) for answer in answers]
    if len(expected) < CONSENSUS_MIN_ANSWERS:
        return float(predicted in {normalize_answer(answer) for answer in expected})
    if len(set(expected)) > 1:
        expected = [normalize_answer(answer) for answer in expected]
    matches = sum(answer == predicted for answer in expected)
    # Each human left out in turn: how many of the others gave the predicted answer.
    per_subset = [min(1.0, (matches - (answer == predicted)) / AGREEING_HUMANS) for answer in expected]
    return sum(per_subset) / len(per_subset)
