"""The built-in instruction set: tasks whose answers can be checked exactly.

`make sft` needs demonstrations and a held-out test, with nothing to download. We make
them from the pretraining corpus itself:

corpus tasks (need a play's list of persons, so Shakespeare-like text):
    play_of_character   "Which play has a character named Polonius?"   -> "Hamlet"
    speaker_of_line     "Who speaks this line? Not a mouse stirring."  -> "Francisco"
    play_of_line        "Which play is this line from? ..."            -> "Hamlet"
form tasks (any text; they test following an instruction's form):
    repeat              repeat a line exactly                           -> the line
    first_word          its first word                                  -> "Not"
    last_word           its last word                                   -> "stirring"
    count_words         how many words it has                           -> "4"
    one_word            "Answer in one word: the longest word?"         -> "stirring"

Every task has several phrasings, so the model learns instructions, not one template.

Copying. SentencePiece writes a word inside a sentence with its space: "begin" in "they
did begin" is the one token "▁begin", while "begin" at the start of a text is "be", "g",
"in". A tiny model can learn to copy tokens from the prompt, but hardly to re-spell a word
it has seen only as "▁begin". So the line is always the end of the prompt, after a space,
and the assistant's reply starts with a space (REPLY_PREFIX): the reply " begin" is then
the very token the line holds, and " When time shall serve" the line's own tokens. With
the 4096-piece Shakespeare tokenizer, the reply's tokens occur as they are in the prompt
for 100% of the repeat items, 93% of first-word and 68% of last-word items (the rest have
punctuation merged into the word's last piece, "▁him." for "him"); with the line after a
newline and a reply without the space it was 24%, 25% and 0%. Evaluation strips the
space (train/eval/task_eval.py); an item's "answer" holds the answer without it.

Held-out split. Items are split by their *source*, not by phrasing: every usable line
(its exact text) and every person's name is assigned once, with a fixed seed, to train or
test (two pools, test_fraction of each). A test item asks about a held-out source (a line,
or for play_of_character a name). A training item uses train sources only, and no
held-out name occurs anywhere in it: not as its answer (speaker_of_line), not in its line
(a line that names a held-out person is never trained on, under any task), not in its
question. So no held-out line or name is ever seen in training, under any task or
phrasing (tests/test_tasks.py checks every training message). Names that are in a play's
title or hold one ("Hamlet", "Lady Macbeth", "King Lear", "Richard"), like the titles
themselves, are answers of the play tasks everywhere: they are never held out, and
play_of_character does not ask about them (the question would give its answer away).

Names. The persons the tasks know are those of the plays' lists of persons, and the
speakers their speech headings resolve to (data/plays.py). play_of_character asks only
about a name that belongs to one play: a name counts for every play that lists it or
gives it speeches, with or without a title before it ("Queen Margaret" is "Margaret" too,
who is in four plays), so an ambiguous name ("King Henry", "Queen Margaret") is not asked.

Which lines. A line (of any document) is usable when it has 3..10 words and at most
60 characters (so prompt and answer fit a 128-token context in the chat format), and
each of its words is letters and apostrophes, with at most punctuation (.,;:!?") at
its ends: so "words" are unambiguous (line.split()) and the first, last and longest
words are the words without that punctuation. Lines in upper case (headings) are left
out. For speaker_of_line and play_of_line a line must occur once in the whole corpus,
so the answer is unambiguous.

Validation split. A second share of the sources (VAL_FRACTION of the lines and of the
names, drawn from those not held out for the test) is left out of training the same way:
its items (n_val per task, asked alone) are what a run chooses its checkpoint and its
settings on, so that the test items are scored once, at the end, and never steer anything.
The test split is the same whether or not there is a validation split.

Plays. Which document is a play, who is in it, who speaks a line and the play's title are
read from its text by data/plays.py; the corpus tasks ask only about what it finds.
"""

import functools
import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from checks import Rule, Settings, integer, number, setting
from data.multiturn import held_out_turns, training_conversations
from data.plays import (
    bare_name,
    find_persons,
    find_speeches,
    is_character_name,
    play_title,
    speech_headings,
    without_persons_list,
)
from data.sources import DataConfig, load_documents
from errors import UserError

VAL_FRACTION = 0.1  # of the sources not held out for the test: the validation split's
CORPUS_TASKS = ("play_of_character", "speaker_of_line", "play_of_line")
FORM_TASKS = ("repeat", "first_word", "last_word", "count_words", "one_word")
TASKS = CORPUS_TASKS + FORM_TASKS

# A line always comes last in the prompt, after a space: see "Copying" in the docstring.
PHRASINGS: dict[str, tuple[str, ...]] = {
    "play_of_character": (
        "Which play has a character named {name}?",
        "In which play does {name} appear?",
        "{name} is a character in which play?",
        "Name the play with a character called {name}.",
    ),
    "speaker_of_line": (
        "Who speaks this line? {line}",
        "Which character says this: {line}",
        "Name the speaker of this line: {line}",
        "Who says the following line? {line}",
    ),
    "play_of_line": (
        "Which play is this line from? {line}",
        "Name the play this line comes from: {line}",
        "From which play is this line: {line}",
        "In which play is this said? {line}",
    ),
    "repeat": (
        "Repeat this line exactly: {line}",
        "Say this back word for word: {line}",
        "Copy the following line without changing anything: {line}",
        "Echo this line: {line}",
    ),
    "first_word": (
        "What is the first word of this line? {line}",
        "Give the first word of the following line: {line}",
        "Which word does this line begin with? {line}",
        "First word of: {line}",
    ),
    "last_word": (
        "What is the last word of this line? {line}",
        "Give the last word of the following line: {line}",
        "Which word does this line end with? {line}",
        "Last word of: {line}",
    ),
    "count_words": (
        "How many words are in this line? {line}",
        "Count the words in the following line: {line}",
        "Count the words: {line}",
        "Give the number of words in this line: {line}",
    ),
    "one_word": (
        "Answer in one word: what is the longest word in this line? {line}",
        "In one word, which is the longest word of this line? {line}",
        "In one word, name the longest word here: {line}",
        "Reply with a single word, the longest one in: {line}",
    ),
}
REPLY_PREFIX = " "  # the assistant's reply starts with a space: see "Copying"

MIN_WORDS, MAX_WORDS, MAX_CHARS = 3, 10, 60
EDGE_PUNCTUATION = '.,;:!?"'
# A usable line: 3..10 words, single spaces; each word letters and apostrophes (starting with
# a letter or one apostrophe, as in 'Tis), with punctuation from EDGE_PUNCTUATION at its ends.
_W = r"""[.,;:!?"]*'?[A-Za-z][A-Za-z']*[.,;:!?"]*"""
USABLE_LINE = re.compile(rf"^{_W}(?: {_W}){{{MIN_WORDS - 1},{MAX_WORDS - 1}}}$")


# ---------------------------------------------------------------------------- words, lines


def strip_word(word: str) -> str:
    """A word without the punctuation at its ends: "there?" -> "there", "'Tis" stays."""
    return word.strip(EDGE_PUNCTUATION)


def usable_line(line: str) -> bool:
    """True for a line the tasks can use (see the module docstring)."""
    if len(line) > MAX_CHARS or line.upper() == line:  # too long, or a heading in capitals
        return False
    return USABLE_LINE.match(line) is not None


def candidate_lines(text: str) -> list[str]:
    """The usable lines of a text (leading and trailing spaces removed), in order."""
    return [s for s in (raw.strip() for raw in text.splitlines()) if usable_line(s)]


def longest_word(line: str) -> str | None:
    """The strictly longest word of the line, or None when two words tie for longest."""
    words = sorted((strip_word(w) for w in line.split()), key=len, reverse=True)
    if len(words) > 1 and len(words[0]) == len(words[1]):
        return None
    return words[0]


# ---------------------------------------------------------------------------- the item set


@dataclass
class TaskSet:
    """Train and held-out test items; each item is a dict
    {"task", "messages": [user, assistant], "answer", "source"} (with "turn": 1 for the
    test items). Training items may be conversations of several questions, and
    test_turns holds held-out items asked as a later question (data/multiturn.py): their
    "messages" are the whole conversation, the rest describes its last question."""

    train: list[dict] = field(default_factory=list)
    test: list[dict] = field(default_factory=list)
    test_turns: list[dict] = field(default_factory=list)
    val: list[dict] = field(default_factory=list)  # the validation items (turn 1)

    def tasks(self) -> list[str]:
        """The tasks that have test items, in TASKS order."""
        present = {item["task"] for item in self.test}
        return [t for t in TASKS if t in present]


def make_item(task: str, prompt: str, answer: str, source: str) -> dict:
    """One item: the conversation to train on (or to prompt with) and the exact answer.
    The assistant's message is REPLY_PREFIX + answer; "answer" is the answer itself."""
    messages = [
        {"role": "user", "content": prompt},
        {"role": "assistant", "content": REPLY_PREFIX + answer},
    ]
    return {"task": task, "messages": messages, "answer": answer, "source": source}


def line_answer(task: str, line: str) -> str | None:
    """The answer of a form task about `line`, or None if the task cannot ask about it."""
    words = line.split()
    if task == "repeat":
        return line
    if task == "first_word":
        return strip_word(words[0])
    if task == "last_word":
        return strip_word(words[-1])
    if task == "count_words":
        return str(len(words))
    if task == "one_word":
        return longest_word(line)
    raise ValueError(f"{task} is not a form task")


def _sizes_ok(v) -> bool:
    return (isinstance(v, int) and not isinstance(v, bool) and v >= 0) or isinstance(v, dict)


@dataclass
class TasksConfig(Settings):
    """The built-in tasks' settings; conf/tasks/builtin.yaml gives and explains each value."""

    weight: float = setting(number(0))
    seed: int = setting(integer())
    n_train: Any = setting(Rule("an integer >= 0, or a mapping of each task to one", _sizes_ok))
    n_test: int = setting(integer(0))
    n_val: int = setting(integer(0))
    multi_turn: float = setting(number(0, 1))
    system_share: float = setting(number(0, 1))
    n_test_turns: int = setting(integer(0))

    def prefix(self) -> str:
        return "tasks."

    def check_relations(self) -> None:
        try:
            task_sizes(self.n_train)
        except ValueError as e:
            raise UserError(f"tasks.n_train: {e}") from None

    def build(self, documents: Sequence) -> "TaskSet":
        """The items of every task from `documents` (build_tasks with these settings)."""
        return build_tasks(
            documents,
            self.seed,
            self.n_train,
            self.n_test,
            n_val=self.n_val,
            multi_turn=self.multi_turn,
            system_share=self.system_share,
            n_test_turns=self.n_test_turns,
        )


def task_sizes(n_train: int | Mapping[str, int], tasks: Sequence[str] = TASKS) -> dict:
    """{task: training items} from one number for all tasks or a mapping naming each task;
    ValueError if the mapping names other tasks or a size is not a whole number >= 0."""
    if isinstance(n_train, Mapping):
        sizes = dict(n_train)
        if set(sizes) != set(tasks):
            raise ValueError(
                f"give a size for each of {', '.join(tasks)} (or one number for all); "
                f"got {', '.join(sizes)}"
            )
    else:
        sizes = dict.fromkeys(tasks, n_train)
    bad = {task: n for task, n in sizes.items() if not isinstance(n, int) or n < 0}
    if bad:
        got = bad if isinstance(n_train, Mapping) else repr(n_train)
        raise ValueError(f"sizes must be whole numbers >= 0, got {got}")
    return sizes


# ---------------------------------------------------------------------------- sources


@dataclass
class Sources:
    """What the documents offer the tasks to ask about."""

    lines: list[str]  # every usable line of the corpus, sorted
    unique: list[str]  # the lines that occur once in the corpus, and in a play
    play_of: dict[str, str]  # line -> title of a play it occurs in
    speakers: dict[str, set[str]]  # line -> who speaks it
    characters: dict[str, str]  # a name in exactly one play, not in a title -> that play
    names: list[str] = field(default_factory=list)  # the names that can be held out, sorted

    def speaker_of(self, line: str) -> str | None:
        """The one person who speaks the line, or None (nobody, or several)."""
        who = self.speakers.get(line, ())
        return next(iter(who)) if len(who) == 1 else None


def gather_sources(documents: Iterable) -> Sources:
    """Every usable line of the documents (anything with .name and .text), and what the
    plays among them say about it and about their persons (data/plays.py)."""
    line_count: dict[str, int] = defaultdict(int)  # line -> occurrences in the corpus
    play_of: dict[str, str] = {}
    speakers: dict[str, set[str]] = defaultdict(set)
    listed: dict[str, str] = {}  # a character name of a list of persons -> (one) play
    plays_of: dict[str, set[str]] = defaultdict(set)  # lower-case name -> plays it is in
    for doc in documents:
        lines = candidate_lines(without_persons_list(doc.text))  # the list is no source of lines
        for line in lines:
            line_count[line] += 1
        persons = find_persons(doc.text)
        if not persons:
            continue
        title = play_title(doc.name)
        play_of.update((line, title) for line in lines)
        for speaker, line in find_speeches(doc.text, persons):
            speakers[line].add(speaker)
        for name in {*persons, *speech_headings(doc.text)}:
            for form in {name.lower(), bare_name(name).lower()}:
                plays_of[form].add(title)
        listed.update((name, title) for name in persons if is_character_name(name))
    lines = sorted(line_count)
    unique = [line for line in lines if line_count[line] == 1 and line in play_of]
    titles = set(play_of.values())
    names = {name for who in speakers.values() for name in who} | set(listed)
    names = sorted(n for n in names if not _shares_a_title(n, titles))
    characters = {  # in one play only, counting "Queen Margaret" as "Margaret" too
        name: title
        for name, title in listed.items()
        if name in names and len(plays_of[name.lower()] | plays_of[bare_name(name).lower()]) == 1
    }
    return Sources(lines, unique, play_of, dict(speakers), characters, names)


def _shares_a_title(name: str, titles: Iterable[str]) -> bool:
    """True for a name inside a play's title or holding one ("Lear", "Lady Macbeth")."""
    return any(mentions([name], title) or mentions([title], name) for title in titles)


def mentions(names: Iterable[str], text: str) -> bool:
    """Whether any of the names occurs in text as whole words ("Ros" is not in "Rosalind")."""
    return name_pattern(tuple(names)).search(text) is not None


@functools.lru_cache(maxsize=64)
def name_pattern(names: tuple[str, ...]) -> re.Pattern:
    """One regular expression for whole-word occurrences of any of the names."""
    if not names:
        return re.compile(r"(?!x)x")  # matches nothing
    alternatives = "|".join(map(re.escape, sorted(names, key=len, reverse=True)))
    return re.compile(rf"(?<![A-Za-z'])(?:{alternatives})(?![A-Za-z'])")


def held_out_sources(sources: Sources, seed: int, test_fraction: float) -> set[str]:
    """The test sources, drawn once for all tasks: a seeded test_fraction of the lines and
    of the names (two separate pools)."""
    rng = np.random.default_rng([seed, len(TASKS)])
    lines = _split(sources.lines, test_fraction, rng)
    return lines | _split(sources.names, test_fraction, rng)


def validation_sources(sources: Sources, held_out: set[str], seed: int, fraction: float) -> set:
    """The validation sources: a seeded `fraction` of the lines and of the names that are
    not held out for the test (a random stream of their own: the test split is unchanged)."""
    rng = np.random.default_rng([seed, len(TASKS), 1])
    lines = _split([x for x in sources.lines if x not in held_out], fraction, rng)
    return lines | _split([x for x in sources.names if x not in held_out], fraction, rng)


def _split(sources: Iterable[str], test_fraction: float, rng: np.random.Generator) -> set[str]:
    """The held-out sources: a seeded random test_fraction of them (at least one)."""
    pool = sorted(set(sources))
    n_test = max(1, round(test_fraction * len(pool))) if pool else 0
    return {pool[i] for i in rng.permutation(len(pool))[:n_test]}


# ---------------------------------------------------------------------------- items


def task_sources(task: str, sources: Sources) -> tuple[list[str], Callable, str]:
    """A task's sources, the answer of a source (None: the task cannot ask about it), and
    the field of the phrasings the source fills in."""
    if task in FORM_TASKS:
        return sources.lines, functools.partial(line_answer, task), "line"
    if task == "play_of_character":
        return sorted(sources.characters), sources.characters.get, "name"
    if task == "speaker_of_line":
        return [x for x in sources.unique if sources.speaker_of(x)], sources.speaker_of, "line"
    return sources.unique, sources.play_of.get, "line"  # play_of_line


def task_items(
    task: str,
    sources: Sources,
    held_out: set[str],
    n_train: int,
    n_test: int,
    seed: int,
    validation: set[str] = frozenset(),
    n_val: int = 0,
) -> tuple[list[dict], list[dict], list[dict]]:
    """(train, test, val) items of one task: up to n_test from held-out sources and n_val
    from validation sources, each once, then n_train from the others, repeated in other
    phrasings when there are fewer."""
    pool, answer_of, key = task_sources(task, sources)
    rng = np.random.default_rng([seed, TASKS.index(task)])
    test_pool = [x for x in pool if x in held_out]
    kept_out = held_out | validation
    hidden = name_pattern(tuple(sorted(kept_out.intersection(sources.names))))

    def train_answer(source: str) -> str | None:  # None: kept out, or names a kept-out person
        answer = answer_of(source)
        return None if answer is None or hidden.search(f"{source}\n{answer}") else answer

    train_pool = [x for x in pool if x not in kept_out]
    test = _items(task, test_pool, n_test, answer_of, key, rng, repeat=False)
    train = _items(task, train_pool, n_train, train_answer, key, rng, repeat=True)
    val_pool = [x for x in pool if x in validation]
    val_rng = np.random.default_rng([seed, TASKS.index(task), 1])
    val = _items(task, val_pool, n_val, answer_of, key, val_rng, repeat=False)
    return train, test, val


def _items(task, pool, n, answer_of, key, rng: np.random.Generator, repeat: bool) -> list[dict]:
    """Up to n items from the pool's sources (see _draw), each in a phrasing drawn at random."""
    phrasings = PHRASINGS[task]
    items = []
    for source, answer in _draw(pool, n, answer_of, rng, repeat):
        prompt = phrasings[rng.integers(len(phrasings))].format(**{key: source})
        items.append(make_item(task, prompt, answer, source))
    return items


def _draw(pool: list, n: int, answer_of, rng: np.random.Generator, repeat: bool) -> list:
    """Up to n (source, answer) pairs, sources in a random order, skipping those without an
    answer. With repeat, the pool is gone through again (in a new order) until n are found."""
    out: list = []
    while len(out) < n:
        found = 0
        for i in rng.permutation(len(pool)):
            answer = answer_of(pool[i])
            if answer is not None:
                out.append((pool[i], answer))
                found += 1
                if len(out) == n:
                    break
        if not repeat or found == 0:
            break
    return out


def build_tasks(
    documents: Sequence,
    seed: int = 1234,
    n_train: int | Mapping[str, int] = 600,
    n_test: int = 60,
    test_fraction: float = 0.2,
    n_val: int = 0,
    tasks: Sequence[str] = TASKS,
    multi_turn: float = 0.0,
    system_share: float = 0.0,
    n_test_turns: int = 0,
) -> TaskSet:
    """Train and held-out items for `tasks` from documents (anything with .name and .text).

    n_train items per task for training (an int, or {task: n} naming every task; sources
    repeat, in other phrasings, when there are fewer) and up to n_test per task for testing
    (distinct sources). test_fraction of the lines and of the character names are held out;
    with n_val, VAL_FRACTION of the rest more, for up to n_val validation items per task.
    multi_turn, system_share, n_test_turns: the conversations of data/multiturn.py.
    The same documents, seed and sizes always give the same items. A task with no usable
    source gets no items.
    """
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; known: {', '.join(TASKS)}")
    sizes = task_sizes(n_train, tasks)
    sources = gather_sources(documents)
    held_out = held_out_sources(sources, seed, test_fraction)
    validation = validation_sources(sources, held_out, seed, VAL_FRACTION) if n_val else set()
    result = TaskSet()
    for task in tasks:
        train, test, val = task_items(
            task, sources, held_out, sizes[task], n_test, seed, validation, n_val
        )
        result.train += train
        result.test += [{**item, "turn": 1} for item in test]
        result.val += [{**item, "turn": 1} for item in val]
    rng = np.random.default_rng([seed, len(TASKS) + 1])
    if multi_turn > 0 or system_share > 0:
        result.train = training_conversations(result.train, multi_turn, system_share, rng)
    result.train = [result.train[i] for i in rng.permutation(len(result.train))]
    if n_test_turns > 0:
        rng = np.random.default_rng([seed, len(TASKS) + 2])
        result.test_turns = held_out_turns(result.test, n_test_turns, system_share, rng)
    return result


def builtin_tasks(tasks: TasksConfig, data: DataConfig) -> TaskSet:
    """The built-in tasks made from the `data` corpus, as `tasks` sets them."""
    return tasks.build(load_documents(data))
