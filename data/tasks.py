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
for 100% of the repeat items, 92% of first-word and 70% of last-word items (the rest have
punctuation merged into the word's last piece, "▁him." for "him"); with the line after a
newline and a reply without the space it was 24%, 25% and 0%. Evaluation strips the
space (train/task_eval.py); an item's "answer" holds the answer without it.

Held-out split. Items are split by their *source*, not by phrasing: every usable line
(its exact text) and every character name is assigned once, with a fixed seed, to train
or test. Train items of every task use train sources only and test items test sources
only, so no held-out line or name is ever seen in training, under any task or phrasing.

Which lines. A line (of any document) is usable when it has 3..10 words and at most
60 characters (so prompt and answer fit a 128-token context in the chat format), and
each of its words is letters and apostrophes, with at most punctuation (.,;:!?") at
its ends: so "words" are unambiguous (line.split()) and the first, last and longest
words are the words without that punctuation. Lines in upper case (headings) are left
out. For speaker_of_line and play_of_line a line must occur once in the whole corpus,
so the answer is unambiguous.

Plays. A document is a play when it has a list of persons ("PERSONS REPRESENTED" or
"DRAMATIS PERSONAE", any case): one person per line, "NAME, description". A speech is a
heading line (the speaker: "HAMLET." or an abbreviation "Ham.") after a blank line,
followed by its lines up to the next blank line. A heading counts only when it names
exactly one person of the list (equal to a name, or a prefix of one of its words), and
the answer is that person's name as the list gives it, in title case.
"""

import functools
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

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
PERSONS_HEADING = re.compile(r"^\s*(persons represented|dramatis personae)\b", re.IGNORECASE)
LIST_END = re.compile(r"^\s*(scene\b|act\b|induction\b)", re.IGNORECASE)
HEADING = re.compile(r"^([A-Z][A-Za-z']*(?: [A-Za-z][A-Za-z']*){0,3})(\.?)$")
NAME = re.compile(r"^[A-Za-z][A-Za-z']*(?: [A-Za-z][A-Za-z']*){0,2}$")

# First words that make a list entry a description, not a name ("A Priest", "Two Clowns").
NOT_A_NAME_START = {
    "a",
    "an",
    "the",
    "two",
    "three",
    "four",
    "first",
    "second",
    "third",
    "other",
    "another",
    "several",
    "his",
    "her",
    "their",
    "persons",
    "servants",
}
# Words that alone (or together) are a role or a group, not a name: "Queen", "Old Man".
ROLE_WORDS = set(
    "lord lords lady ladies king queen prince princess duke duchess earl count countess sir "
    "cardinal bishop archbishop gentleman gentlemen gentlewoman officer officers soldier "
    "soldiers servant servants messenger messengers attendant attendants sailor sailors "
    "citizen citizens senator senators musician musicians player players page boy clown "
    "clowns fool man men woman women old young captain doctor physician priest friar nurse "
    "ghost porter herald murderer murderers watch watchman witch witches fairies spirit "
    "spirits shepherd shepherds shepherdesses tribune tribunes keeper gaoler jailer "
    "apothecary chorus epilogue prologue outlaws lieutenant ambassador ambassadors courtier "
    "courtiers hostess host bawd servingman emperor empress general mayor sheriff governor "
    "widow daughter son wife huntsmen mariners mariner nymphs reapers carriers falconers "
    "apparitions others provost poet marshal groom tailor pedant steward boatswain "
    "scrivener chamberlain chancellor war court roman romans greek greeks trojan trojans "
    "goths english french sicilian volscian florentine magnificoes dutchman "
    "other and of the".split()
)
# A first word that makes "X of Y" a title, not a name: "Duke of Venice", "Mayor of York".
TITLE_WORDS = set(
    "king queen prince princess duke duchess earl count countess lord lady emperor cardinal "
    "bishop archbishop archduke marquis marquess mayor governor sheriff clerk abbot "
    "bastard".split()
)
SMALL_WORDS = {"of", "the", "and", "de", "la"}
ROMAN = re.compile(r"^(i{1,3}|iv|v|vi{1,3}|ix|x|xi{1,3})$")  # "Lewis XI", "Richard II"

# Short titles for the Shakespeare corpus (document name = file stem, "_gut" dropped).
PLAY_TITLES = {
    "alls_well_that_ends_well": "All's Well That Ends Well",
    "antony_and_cleopatra": "Antony and Cleopatra",
    "as_you_like_it": "As You Like It",
    "comedy_of_errors": "The Comedy of Errors",
    "coriolanus": "Coriolanus",
    "cymbeline": "Cymbeline",
    "hamlet": "Hamlet",
    "henry_iv_part_1": "Henry IV Part 1",
    "henry_iv_part_2": "Henry IV Part 2",
    "henry_v": "Henry V",
    "henry_vi_part_1": "Henry VI Part 1",
    "henry_vi_part_2": "Henry VI Part 2",
    "henry_vi_part_3": "Henry VI Part 3",
    "henry_viii": "Henry VIII",
    "john": "King John",
    "julius_caesar": "Julius Caesar",
    "lear": "King Lear",
    "loves_labours_lost": "Love's Labour's Lost",
    "macbeth": "Macbeth",
    "measure_for_measure": "Measure for Measure",
    "merchant_of_venice": "The Merchant of Venice",
    "merry_wives_of_windsor": "The Merry Wives of Windsor",
    "midsummer_nights_dream": "A Midsummer Night's Dream",
    "much_ado_about_nothing": "Much Ado About Nothing",
    "othello": "Othello",
    "pericles": "Pericles",
    "richard_ii": "Richard II",
    "richard_iii": "Richard III",
    "romeo_and_juliet": "Romeo and Juliet",
    "taming_of_the_shrew": "The Taming of the Shrew",
    "tempest": "The Tempest",
    "timon_of_athens": "Timon of Athens",
    "tragedy_of_titus_andronicus": "Titus Andronicus",
    "troilus_and_cressida": "Troilus and Cressida",
    "twelfth_night": "Twelfth Night",
    "two_gentlemen_of_verona": "The Two Gentlemen of Verona",
    "winters_tale": "The Winter's Tale",
}


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


# ---------------------------------------------------------------------------- plays


def title_case(name: str) -> str:
    """'LADY MACBETH' -> 'Lady Macbeth'; 'JOHN OF GAUNT' -> 'John of Gaunt'; mixed case kept."""
    if name != name.upper():
        return name
    words = name.lower().split()
    return " ".join(
        w.upper() if ROMAN.match(w) else w if i > 0 and w in SMALL_WORDS else w[:1].upper() + w[1:]
        for i, w in enumerate(words)
    )


def is_person(name: str) -> bool:
    """A list entry for one particular person ("Hamlet", "Duke of Buckingham"), not a
    description ("A Priest") or a role or group alone ("Queen", "Lords")."""
    words = name.lower().split()
    return (
        bool(words) and words[0] not in NOT_A_NAME_START and not all(w in ROLE_WORDS for w in words)
    )


def is_character_name(name: str) -> bool:
    """A person's name fit for "which play has a character named X" ("Polonius", "Lady
    Macbeth"): a person, no lower-case words but "of", "the", ..., and not a title
    ("Duke of Venice")."""
    if not NAME.match(name) or not is_person(name):
        return False
    if any(w[0].islower() and w not in SMALL_WORDS for w in name.split()):
        return False  # "Nurse to Juliet", "Suitors to Bianca": a description
    words = name.lower().split()
    if "of" in words:  # "Duke of Venice", "Magnificoes of Venice": a title or a group
        before = words[: words.index("of")]
        return not all(w in TITLE_WORDS or w in ROLE_WORDS for w in before)
    return True


def persons_block(text: str) -> tuple[int, int] | None:
    """Line numbers [start, end) of a play's list of persons, heading included, or None.

    The list starts at a "PERSONS REPRESENTED" or "DRAMATIS PERSONAE" heading within the
    first 200 lines and ends before a line starting with SCENE or ACT (at most 150 lines).
    """
    lines = text.splitlines()
    start = next((i for i, s in enumerate(lines[:200]) if PERSONS_HEADING.match(s)), None)
    if start is None:
        return None
    end = min(len(lines), start + 150)
    end = next((i for i in range(start + 1, end) if LIST_END.match(lines[i])), end)
    return start, end


def find_persons(text: str) -> list[str] | None:
    """The names in a play's list of persons (title case, in order), or None if it has none.

    Each entry's name is what comes before the first comma, '}' or run of 2+ spaces, with
    a trailing '.' removed; "A and B" gives both. Indented or lower-case lines continue the
    previous entry and are skipped.
    """
    block = persons_block(text)
    if block is None:
        return None
    names: list[str] = []
    for raw in text.splitlines()[block[0] + 1 : block[1]]:
        if not raw.strip() or raw[0].isspace() or not raw[0].isupper():
            continue
        entry = re.split(r",|\}|\s{2,}", raw.strip())[0].strip().rstrip(".").strip()
        for part in entry.split(" and "):
            name = title_case(part.strip())
            if name and NAME.match(name) and name not in names:
                names.append(name)
    return names


def resolve_speaker(heading: str, persons: Sequence[str]) -> str | None:
    """The one person a speech heading names ("Ham." -> "Hamlet"), or None.

    A heading names a person when it equals the name, or is a prefix of the whole name or
    of one of its words (case-insensitive). It must name exactly one person.
    """
    h = heading.rstrip(".").strip().lower()
    if not h:
        return None
    exact = [p for p in persons if p.lower() == h]
    if exact:
        return exact[0]
    matches = [
        p
        for p in persons
        if p.lower().startswith(h) or any(w.startswith(h) for w in p.lower().split())
    ]
    return matches[0] if len(matches) == 1 else None


def find_speeches(text: str, persons: Sequence[str]) -> list[tuple[str, str]]:
    """(speaker, line) for every line of every speech whose heading names one person
    (persons as is_person has it: "LORD." names nobody, even with "Lords" in the list).

    Only the lines right after the heading, up to the next blank line, count; stage
    directions in [brackets] are skipped.
    """
    persons = [p for p in persons if is_person(p)]
    lines = [raw.strip() for raw in text.splitlines()] + [""]
    resolved: dict[str, str | None] = {}  # heading -> person, worked out once per heading
    out = []
    for i in range(1, len(lines) - 1):
        head = lines[i]
        if lines[i - 1] or not lines[i + 1]:
            continue
        m = HEADING.match(head)
        if not m or LIST_END.match(head) or not (m.group(2) or head.isupper()):
            continue
        if head not in resolved:
            resolved[head] = resolve_speaker(m.group(1), persons)
        speaker = resolved[head]
        j = i + 1
        while speaker is not None and lines[j]:
            if not lines[j].startswith("["):
                out.append((speaker, lines[j]))
            j += 1
    return out


def play_title(name: str) -> str:
    """A play's short title: from PLAY_TITLES by document name (a trailing "_gut" is
    ignored), else made from the name: "life_of_timothy" -> "Life of Timothy"."""
    key = name[:-4] if name.endswith("_gut") else name
    if key in PLAY_TITLES:
        return PLAY_TITLES[key]
    words = [w for w in re.split(r"[_\-\s]+", key) if w]
    return " ".join(
        w if i > 0 and w in SMALL_WORDS else w[:1].upper() + w[1:] for i, w in enumerate(words)
    )


# ---------------------------------------------------------------------------- the item set


@dataclass
class TaskSet:
    """Train and held-out test items; each item is a dict
    {"task", "messages": [user, assistant], "answer", "source"}."""

    train: list[dict] = field(default_factory=list)
    test: list[dict] = field(default_factory=list)

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


def _split(sources: Iterable[str], test_fraction: float, rng: np.random.Generator) -> set[str]:
    """The held-out sources: a seeded random test_fraction of them (at least one)."""
    pool = sorted(set(sources))
    n_test = max(1, round(test_fraction * len(pool))) if pool else 0
    return {pool[i] for i in rng.permutation(len(pool))[:n_test]}


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


def build_tasks(
    documents: Sequence,
    seed: int = 1234,
    n_train: int | Mapping[str, int] = 600,
    n_test: int = 60,
    test_fraction: float = 0.2,
    tasks: Sequence[str] = TASKS,
) -> TaskSet:
    """Train and held-out items for `tasks` from documents (anything with .name and .text).

    n_train items per task for training (an int, or {task: n} naming every task; sources
    repeat, in other phrasings, when there are fewer) and up to n_test per task for testing
    (distinct sources). test_fraction of the lines and of the character names are held out.
    The same documents, seed and sizes always give the same items. A task with no usable
    source gets no items.
    """
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; known: {', '.join(TASKS)}")
    sizes = task_sizes(n_train, tasks)

    # Gather the sources: every usable line, and what the plays say about them.
    line_count: dict[str, int] = defaultdict(int)  # line -> occurrences in the corpus
    play_of: dict[str, str] = {}  # line -> title of a play it occurs in
    speakers: dict[str, set[str]] = defaultdict(set)  # line -> who speaks it
    character_plays: dict[str, set] = defaultdict(set)  # lower-case name -> {(name, title)}
    for doc in documents:
        text, block = doc.text, persons_block(doc.text)
        if block is not None:  # the list of persons is no source of lines
            all_lines = text.splitlines()
            text = "\n".join(all_lines[: block[0]] + all_lines[block[1] :])
        lines = candidate_lines(text)
        for line in lines:
            line_count[line] += 1
        persons = find_persons(doc.text)
        if not persons:
            continue
        title = play_title(doc.name)
        play_of.update((line, title) for line in lines)
        for speaker, line in find_speeches(doc.text, persons):
            speakers[line].add(speaker)
        for name in persons:
            if is_character_name(name):
                character_plays[name.lower()].add((name, title))
    lines = sorted(line_count)
    unique = [line for line in lines if line_count[line] == 1 and line in play_of]
    characters = {  # names in exactly one play -> that play
        name: title
        for entries in character_plays.values()
        if len(entries) == 1
        for name, title in entries
    }

    # Split the sources once, for all tasks (lines and names are separate pools).
    rng = np.random.default_rng([seed, len(TASKS)])
    held_out = _split(lines, test_fraction, rng) | _split(characters, test_fraction, rng)

    def speaker_of(line: str) -> str | None:
        who = speakers.get(line, ())
        return next(iter(who)) if len(who) == 1 else None

    # Per task: its sources, the answer for a source (None: not usable), the prompt field.
    pools = {
        "play_of_character": (sorted(characters), characters.get, "name"),
        "speaker_of_line": ([x for x in unique if speaker_of(x)], speaker_of, "line"),
        "play_of_line": (unique, play_of.get, "line"),
    }
    line_split = ([x for x in lines if x in held_out], [x for x in lines if x not in held_out])
    result = TaskSet()
    for task in tasks:
        if task in FORM_TASKS:
            answer_of, key = functools.partial(line_answer, task), "line"
            test, train = line_split
        else:
            sources, answer_of, key = pools[task]
            test = [x for x in sources if x in held_out]
            train = [x for x in sources if x not in held_out]
        rng = np.random.default_rng([seed, TASKS.index(task)])
        phrasings = PHRASINGS[task]
        for items, pool, n, repeat in (
            (result.test, test, n_test, False),
            (result.train, train, sizes[task], True),
        ):
            for source, answer in _draw(pool, n, answer_of, rng, repeat):
                prompt = phrasings[rng.integers(len(phrasings))].format(**{key: source})
                items.append(make_item(task, prompt, answer, source))
    order = np.random.default_rng([seed, len(TASKS) + 1]).permutation(len(result.train))
    result.train = [result.train[i] for i in order]
    return result


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
