"""The judge of the built-in tasks: is a reply right, and if not, how close is it.

One module for both uses, so that what evaluation calls right is what the labeller
rewards:

- evaluation (train/eval/task_eval.py) asks `is_correct(reply, answer, task)`;
- the labeller that stands in for InstructGPT's human raters (the reward model's
  preference data, PPO with `reward=tasks`) asks `grade(item, reply)`, a score in [0, 1]:
  1 exactly when is_correct says so, and below 1 a graded score for a wrong reply, so
  that wrong replies are ranked too (a nearly copied line above a garbled one).

Match rules (is_correct): each item is judged by one of two rules, named in eval.json and
in the score tables:
    exact       the reply equals the answer once surrounding whitespace is removed (the
                built-in replies start with a space; a trailing newline is no error);
                case, punctuation and quotes all count. The rule of `repeat` (the line
                must come back exactly) and the default of the user's eval files.
    normalised  both sides also have inner runs of whitespace made one space, double
                quotes around them removed, trailing . , ; : ! ? removed (repeatedly), and
                are compared case-insensitively (str.casefold): "NOW!!" matches "Now".
                The rule of the other built-in tasks (a word, a name, a title, a number:
                what is asked is the word, not its spelling at a sentence's end), and of
                an eval file given with match: normalised.
An item's rule is its own "match" when it has one (eval files, prompt files), else its
built-in task's (BUILTIN_MATCH).

Grades of a wrong reply (an item carries its task, answer and source line or name), in a
few coarse levels, as a person ranking replies would: replies within a level are ties,
so no pair is made of two near-identical mistakes:
    repeat              how much of the line comes back, in order (difflib's ratio over
                        the words): 0.75 for at least 90% (a near copy), 0.5 for at least
                        60%, 0.25 for at least 30%, else 0
    first/last_word,    0.5 for one word of the line (the right kind of answer, the wrong
    one_word            word), 0.2 for another single word, 0 for anything else
    count_words         a number n when the answer is k: 0.5 if off by one, 0.25 if off by
                        two or three, else 0; 0 for no number
    play_of_character,  0.5 for the title of another play (the right kind of answer),
    play_of_line        0 for anything else
    speaker_of_line     0.3 for a name-like reply (one to three capitalised words), else 0
An empty reply scores 0 everywhere; a wrong reply to an item that is not built in (no
"source") scores 0.
"""

import difflib
import re
from collections.abc import Mapping

from .plays import PLAY_TITLES
from .tasks import TASKS, strip_word

VERSION = 2  # bump when a grade changes: the built-in preference set is then sampled again
REPEAT_LEVELS = ((0.9, 0.75), (0.6, 0.5), (0.3, 0.25))  # (share of the line, grade)
MATCH_RULES = {
    "exact": "the reply equals the answer, surrounding whitespace aside",
    "normalised": "case, surrounding quotes, final .,;:!? and repeated spaces aside",
}
BUILTIN_MATCH = {task: "exact" if task == "repeat" else "normalised" for task in TASKS}
_TRAILING = ".,;:!?"
_TITLES = {title.casefold() for title in PLAY_TITLES.values()}
_NAME_LIKE = re.compile(r"^[A-Z][A-Za-z']*(?: [A-Za-z][A-Za-z']*){0,2}$")


def match_rule(item: Mapping) -> str:
    """The rule an item is judged by: its own "match", else its built-in task's."""
    return item.get("match") or BUILTIN_MATCH.get(item.get("task"), "exact")


def normalize(text: str, rule: str) -> str:
    """The form in which a reply and an answer are compared under `rule` (see above)."""
    if rule not in MATCH_RULES:
        raise ValueError(f"unknown match rule {rule!r}; use {' or '.join(MATCH_RULES)}")
    text = text.strip()
    if rule == "exact":
        return text
    text = " ".join(text.split())
    if len(text) >= 2 and text[0] == text[-1] == '"':
        text = text[1:-1].strip()
    return text.rstrip(_TRAILING).strip().casefold()


def is_correct(reply: str, answer: str, rule: str) -> bool:
    return normalize(reply, rule) == normalize(answer, rule)


def grade(item: Mapping, reply: str) -> float:
    """The labeller's score of `reply` to an item: 1 exactly when is_correct under the
    item's rule, else in [0, 1) (graded for built-in items, 0 for the others)."""
    task, answer, rule = item["task"], item["answer"], match_rule(item)
    if is_correct(reply, answer, rule):
        return 1.0
    said = normalize(reply, rule)
    if not said or "source" not in item:
        return 0.0
    if task == "repeat":
        share = difflib.SequenceMatcher(None, said.split(), answer.strip().split()).ratio()
        return next((grade for least, grade in REPEAT_LEVELS if share >= least), 0.0)
    if task in ("first_word", "last_word", "one_word"):
        if " " in said:
            return 0.0
        words = {strip_word(w).casefold() for w in item["source"].split()}
        return 0.5 if said in words else 0.2
    if task == "count_words":
        off = abs(int(said) - int(answer)) if said.isdigit() else None
        return 0.5 if off == 1 else 0.25 if off in (2, 3) else 0.0
    if task in ("play_of_character", "play_of_line"):
        return 0.5 if said in _TITLES else 0.0
    if task == "speaker_of_line":
        return 0.3 if _NAME_LIKE.match(" ".join(reply.split()).rstrip(_TRAILING)) else 0.0
    return 0.0  # a task without graded scores (a user's eval file): right or wrong
