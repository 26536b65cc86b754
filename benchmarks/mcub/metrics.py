"""Scores of the paper's benchmarks.

- Multiple choice (MCUB, AVQA): the paper's metric is strict, the first character of the (stripped) output must equal
  the gold letter (`strict_match`). `forgiving_choice` also reads replies such as "The answer is B.", "(B)", "b" or the
  text of one option, and is reported beside it.
- Open answers (MUSIC-AVQA): the whole output must equal the gold answer after EvalAI's VQA answer normalisation
  (`vqa_normalize`, `music_avqa_match`).
"""

import logging
import re
from collections.abc import Iterable
from typing import Any


logger = logging.getLogger(__name__)

MULTIPLE_CHOICE_TASKS = ("mcub", "avqa")
OPEN_ANSWER_TASKS = ("music-avqa",)
TASKS = MULTIPLE_CHOICE_TASKS + OPEN_ANSWER_TASKS
# Option letters assumed when a question does not list its options in a form `question_options` recognises.
DEFAULT_LETTERS = "ABCD"


# ---------------------------------------------------------------------------------------------------------------------
# Multiple choice


def first_letter(text: str) -> str | None:
    """The first character of the stripped output (what the paper compares with the gold letter), None if empty."""
    stripped = text.strip()
    return stripped[0] if stripped else None


def strict_match(text: str, gold: str) -> bool:
    """The paper's criterion: the output's first character equals the gold answer exactly (case-sensitive; a gold
    answer longer than one character never matches, as in the paper)."""
    return first_letter(text) == gold


# An option marker: "(A) ", "A. ", "A) ", "A: " at the start of the text or after whitespace.
_OPTION_MARKER = re.compile(r"(?:(?<=\s)|^)(?:\(([A-Z])\)|([A-Z])[.):])[ \t]+")
# Text that ends an option: a line break, or a sentence end before more text ("D. red. Answer with ...").
_OPTION_END = re.compile(r"\n|(?<=[.?!])\s")


def question_options(question: str) -> dict[str, str]:
    """Option letter -> option text for questions that list their options as "A. foo" / "(A) foo" / "A) foo" /
    "A: foo" (on separate lines or inline): the longest run of markers A, B, C, ... in order. Empty when fewer than
    two options are found."""
    markers = [
        (match.group(1) or match.group(2), match.start(), match.end()) for match in _OPTION_MARKER.finditer(question)
    ]
    best: list[tuple[str, int, int]] = []
    for start, (letter, _, _) in enumerate(markers):
        if letter != "A":
            continue
        chain = [markers[start]]
        for candidate in markers[start + 1 :]:
            if candidate[0] == chr(ord(chain[-1][0]) + 1):
                chain.append(candidate)
        if len(chain) > len(best):
            best = chain
    if len(best) < 2:
        return {}
    options = {}
    for index, (letter, _, text_start) in enumerate(best):
        text_end = best[index + 1][1] if index + 1 < len(best) else len(question)
        text = question[text_start:text_end]
        cut = _OPTION_END.search(text)
        options[letter] = (text[: cut.start()] if cut else text).strip().rstrip(".;,")
    return options


def _normalize_words(text: str) -> str:
    """Lower case, punctuation to spaces, single spaces: for comparing a reply with an option's text."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def _letter_pattern(letters: str) -> str:
    return "[" + re.escape(letters) + "]"


def forgiving_choice(text: str, question: str | None = None) -> str | None:
    """The option letter a reply picks, read forgivingly; None when it picks none (or is ambiguous).

    Tried in order: a leading letter ("B", "B.", "B) red", "(B)", "B: red", "b"); a letter after "answer", "option"
    or "choice" ("The answer is B.", "Option (b)"); and, when `question` lists its options, a reply that contains the
    text of exactly one option ("red", "They are all red."). Only the question's option letters count (A-D when it
    lists none), so "I think ..." or "A dog" are not read as choices.
    """
    options = question_options(question) if question else {}
    letters = "".join(options) or DEFAULT_LETTERS
    reply = text.strip().strip("*_`'\"").strip()
    upper, lower = _letter_pattern(letters), _letter_pattern(letters.lower())
    # A leading letter: upper case unless it reads as the article "A" starting a sentence ("A dog ..."); lower case
    # only alone or before a closing mark ("b", "b.", "(b)", "b) red").
    leading = re.match(rf"[(\[]?({upper})(?=[)\].:,]|\s|$)", reply)
    if leading and not re.match(r"A\s+[a-z]", reply):
        return leading.group(1)
    leading = re.match(rf"[(\[]?({lower})(?:[)\].:](?=\s|$)|$)", reply)
    if leading:
        return leading.group(1).upper()
    # "answer", "option", "choice" in any case; the letter upper case, or lower case before a closing mark or the end.
    phrase = re.search(
        rf"\b(?i:answer|option|choice)\b(?:\s+is)?\s*:?\s*[(\[]?(?:({upper})\b|({lower})(?=[)\].:,;!?]|\s*$))", reply
    )
    if phrase:
        return (phrase.group(1) or phrase.group(2)).upper()
    if options:
        words = f" {_normalize_words(reply)} "
        if not words.strip():
            return None
        exact = [letter for letter, option in options.items() if _normalize_words(option) == words.strip()]
        if len(exact) == 1:
            return exact[0]
        contained = [
            letter
            for letter, option in options.items()
            if _normalize_words(option) and f" {_normalize_words(option)} " in words
        ]
        if len(contained) == 1:
            return contained[0]
    return None


def gold_letter(gold: str) -> str | None:
    """The letter of a multiple-choice gold answer ("B", "B.", "(B) red"), None when it has none."""
    return forgiving_choice(gold)


# ---------------------------------------------------------------------------------------------------------------------
# Open answers: EvalAI's VQA answer normalisation (the VQA challenge's evaluation rules, as the paper applies them).

# Tokens without an apostrophe -> their contraction (both sides of a comparison are normalised the same way).
_CONTRACTIONS = dict(
    pair.split(":", 1)
    for pair in """
    aint:ain't arent:aren't cant:can't couldve:could've couldnt:couldn't couldn'tve:couldn't've couldnt've:couldn't've
    didnt:didn't doesnt:doesn't dont:don't hadnt:hadn't hadnt've:hadn't've hadn'tve:hadn't've hasnt:hasn't
    havent:haven't hed:he'd hed've:he'd've he'dve:he'd've hes:he's howd:how'd howll:how'll hows:how's isnt:isn't
    itd:it'd itd've:it'd've it'dve:it'd've itll:it'll maam:ma'am mightnt:mightn't mightnt've:mightn't've
    mightn'tve:mightn't've mightve:might've mustnt:mustn't mustve:must've neednt:needn't notve:not've oclock:o'clock
    oughtnt:oughtn't ow's'at:'ow's'at 'ows'at:'ow's'at 'ow'sat:'ow's'at shant:shan't shed've:she'd've
    she'dve:she'd've shouldve:should've shouldnt:shouldn't shouldnt've:shouldn't've shouldn'tve:shouldn't've
    somebody'd:somebodyd somebodyd've:somebody'd've somebody'dve:somebody'd've somebodyll:somebody'll
    somebodys:somebody's someoned:someone'd someoned've:someone'd've someone'dve:someone'd've someonell:someone'll
    someones:someone's somethingd:something'd somethingd've:something'd've something'dve:something'd've
    somethingll:something'll thats:that's thered:there'd thered've:there'd've there'dve:there'd've therere:there're
    theres:there's theyd:they'd theyd've:they'd've they'dve:they'd've theyll:they'll theyre:they're theyve:they've
    twas:'twas wasnt:wasn't wed've:we'd've we'dve:we'd've weve:we've werent:weren't whatll:what'll whatre:what're
    whats:what's whatve:what've whens:when's whered:where'd wheres:where's whereve:where've whod:who'd
    whod've:who'd've who'dve:who'd've wholl:who'll whos:who's whove:who've whyll:why'll whyre:why're whys:why's
    wont:won't wouldve:would've wouldnt:wouldn't wouldnt've:wouldn't've wouldn'tve:wouldn't've yall:y'all
    yall'll:y'all'll y'allll:y'all'll yall'd've:y'all'd've y'alld've:y'all'd've y'all'dve:y'all'd've youd:you'd
    youd've:you'd've you'dve:you'd've youll:you'll youre:you're youve:you've
    """.split()
)
_NUMBER_WORDS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
_ARTICLES = {"a", "an", "the"}
_PUNCTUATION = (
    ";",
    "/",
    "[",
    "]",
    '"',
    "{",
    "}",
    "(",
    ")",
    "=",
    "+",
    "\\",
    "_",
    "-",
    ">",
    "<",
    "@",
    "`",
    ",",
    "?",
    "!",
)
_COMMA_BETWEEN_DIGITS = re.compile(r"(?<=\d),+(?=\d)")
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")
# The reference evaluator passes `re.UNICODE` (= 32) where `re.sub` takes its count, so at most 32 periods go.
_PERIODS_REMOVED = 32


def _strip_punctuation(text: str) -> str:
    """Each punctuation mark is deleted where it touches a space (or when the text has a comma between digits),
    else replaced by a space; then periods not followed by a digit are deleted."""
    delete_all = _COMMA_BETWEEN_DIGITS.search(text) is not None
    result = text
    for mark in _PUNCTUATION:
        touches_space = f"{mark} " in text or f" {mark}" in text
        result = result.replace(mark, "" if touches_space or delete_all else " ")
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", result, count=_PERIODS_REMOVED)


def vqa_normalize(text: str) -> str:
    """EvalAI's VQA answer normalisation: lower case, commas and question marks dropped, "'s" split off, punctuation
    rules, number words 0-10 to digits, articles removed, contractions restored, single spaces."""
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    text = _strip_punctuation(text)
    words = [_NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    return " ".join(_CONTRACTIONS.get(word, word) for word in words if word not in _ARTICLES)


def music_avqa_match(text: str, gold: str) -> bool:
    """The paper's MUSIC-AVQA criterion: the whole output equals the gold answer after VQA normalisation."""
    return vqa_normalize(text) == vqa_normalize(gold)


# ---------------------------------------------------------------------------------------------------------------------
# Summary


def score_record(record: dict[str, Any], task: str) -> dict[str, bool]:
    """Per-metric correctness of one record (`text`: the output, `answer`: the gold answer, `prompt`: the question,
    used to read option texts)."""
    if task not in TASKS:
        raise ValueError(f"Unknown task {task!r}; choose one of {list(TASKS)}.")
    text, gold = record["text"], record["answer"]
    if task in OPEN_ANSWER_TASKS:
        return {"vqa_exact_match": music_avqa_match(text, gold)}
    letter = gold_letter(gold)
    choice = forgiving_choice(text, record.get("prompt"))
    return {"first_letter": strict_match(text, gold), "forgiving": letter is not None and choice == letter}


def summarize(records: Iterable[dict[str, Any]], task: str = "mcub") -> dict[str, Any]:
    """Accuracy per metric over `records` (dicts with `text`, `answer` and optionally `prompt`).

    Multiple-choice tasks give `first_letter` (the paper's metric) and `forgiving`, plus `unparsed` (replies the
    forgiving parse reads no letter from); MUSIC-AVQA gives `vqa_exact_match`. Accuracies are fractions of all
    records (the paper's denominator: every question answered).
    """
    records = list(records)
    correct: dict[str, int] = {}
    unparsed = 0
    for record in records:
        for metric, hit in score_record(record, task).items():
            correct[metric] = correct.get(metric, 0) + int(hit)
        if task in MULTIPLE_CHOICE_TASKS and forgiving_choice(record["text"], record.get("prompt")) is None:
            unparsed += 1
    if task in MULTIPLE_CHOICE_TASKS:
        odd = sum(1 for record in records if len(record["answer"]) != 1)
        if odd:
            logger.warning(
                "%d gold answers are not a single letter: the strict first-letter metric never counts them correct.",
                odd,
            )
    total = len(records)
    metrics = {
        metric: {"correct": hits, "total": total, "accuracy": hits / total if total else 0.0}
        for metric, hits in correct.items()
    }
    summary: dict[str, Any] = {"task": task, "total": total, "metrics": metrics}
    if task in MULTIPLE_CHOICE_TASKS:
        summary["unparsed"] = unparsed
    return summary
