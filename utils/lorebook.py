"""Lorebooks (SillyTavern World Info and a card's character_book) and the notes placed after the
history, as one prompt context that training and serving both apply: `Context.apply(messages)`
takes a conversation that ends where the model is to reply, and gives the messages the model sees.

Sources:
    a V2/V3 card's `character_book` (utils.cards): entries with keys, secondary_keys, content,
        enabled, insertion_order, case_sensitive, constant, selective, position "before_char" |
        "after_char", and SillyTavern's own numbers under `extensions` (position, depth,
        selectiveLogic, match_whole_words, scan_depth, role), which take precedence, as on import
    a SillyTavern World Info file: {"entries": {"0": {key, keysecondary, content, disable, order,
        constant, selective, selectiveLogic, position, depth, caseSensitive, matchWholeWords,
        scanDepth, useProbability, probability, ...}, ...}}

Activation, as SillyTavern's world-info.js does it:
    - the scanned text is the newest `scan_depth` messages (book or entry; default 2, ST's
      world_info_depth), each as "name: text" (ST's "include names", on by default);
    - an entry fires if it is `constant`, or if any primary key is found; with `selective` and
      secondary keys, selectiveLogic then decides: 0 AND ANY (one of them found), 1 NOT ALL (not
      all found), 2 NOT ANY (none found), 3 AND ALL (all found);
    - matching ignores case unless the entry is case-sensitive; whole-word matching (where the
      entry asks) of a one-word key wants a non-word character or an end on both sides, with
      JavaScript's ASCII \\w, so a Chinese key next to Chinese text still matches, as in ST; a key of
      several words is a plain substring;
    - `disable` (or enabled: false) entries never fire, nor does an entry with useProbability and
      probability 0; other probabilities fire always (training and serving must agree, and a dice
      roll would not);
    - fired entries are taken by insertion order, highest first, while their content fits in the
      budget (the smallest token_budget of the books, else DEFAULT_BUDGET); the first that does not
      fit ends the taking, as ST's budget overflow does. The budget counts characters, an upper
      bound of Baichuan2's tokens on Chinese text, so that data_helper.py needs no tokenizer and
      both sides count alike. Inserted, each position's entries come lowest order first.
Not done: recursion (entries firing on other entries' content), inclusion groups, timed effects
(sticky, cooldown, delay), vector matching; entries that use them fire on their keys alone.

Positions (ST's world_info_position numbers):
    0 before / 5 before the examples   -> before the character's system prompt
    1 after  / 6 after the examples    -> after it (our examples are training rows, not prompt text)
    4 at depth N                       -> N messages from the end of the conversation
    2, 3 Author's Note top/bottom      -> at depth 4, where ST's Author's Note sits by default
    7 outlet                           -> nowhere: no prompt of ours has an {{outlet::}} macro
Text placed in the conversation (at depth, the card's depth prompt, post_history_instructions) is
folded into the user turn beside it, as SillyTavern's Semi-strict prompt post-processing folds a
later system message: after a user message it is appended to it, else prepended to the next user
message, else it becomes a user message of its own; parts are joined by a blank line. The post-
history instructions come last, after the depth-0 text, as ST places them after the chat history.

Entries are untrusted input: a regular-expression key ("/.../flags", which ST runs as a regex) is
refused, since a crafted pattern can run for hours on a long chat; a book has at most MAX_ENTRIES
entries, MAX_KEYS keys an entry, and MAX_BOOK_CHARS characters of keys and content in all. A problem
is a UserError naming the file and the entry.
"""

import re
from dataclasses import dataclass, replace

from utils.cli import UserError

AND_ANY, NOT_ALL, NOT_ANY, AND_ALL = range(4)
BEFORE, AFTER, AN_TOP, AN_BOTTOM, AT_DEPTH, EM_TOP, EM_BOTTOM, OUTLET = range(8)
POSITION_NAMES = {"before_char": BEFORE, "after_char": AFTER}
DEFAULT_SCAN_DEPTH = 2  # ST's world_info_depth
DEFAULT_DEPTH = 4  # ST's DEFAULT_DEPTH for at-depth entries, and its Author's Note depth
MAX_SCAN_DEPTH = 1000  # ST's MAX_SCAN_DEPTH
DEFAULT_BUDGET = 1024  # a quarter of Baichuan2's 4,096-token context, as ST's default 25 %
MAX_ENTRIES = 2000
MAX_KEYS = 100
MAX_BOOK_CHARS = 2_000_000
SEPARATOR = "\n\n"  # how Semi-strict joins a folded note to its user turn
_REGEX_KEY = re.compile(r"^/.+/[a-z]*$", re.S)
_ASCII_WORD = re.compile(r"\w", re.ASCII)


@dataclass(frozen=True)
class Entry:
    uid: str
    keys: tuple[str, ...]
    content: str
    secondary: tuple[str, ...] = ()
    logic: int = AND_ANY
    constant: bool = False
    order: int = 100
    position: int = BEFORE
    depth: int = DEFAULT_DEPTH
    case_sensitive: bool = False
    whole_words: bool = False
    scan_depth: int | None = None


@dataclass(frozen=True)
class Lorebook:
    source: str  # the file it came from, for messages and for the rows' "lore" field
    entries: tuple[Entry, ...]
    scan_depth: int = DEFAULT_SCAN_DEPTH
    budget: int | None = None


@dataclass(frozen=True)
class DepthNote:
    text: str
    depth: int


# ---------------------------------------------------------------- reading


def whole_number(value, where: str, low: int, high: int, default: int) -> int:
    """`value` checked to be a whole number from `low` to `high` (None: `default`); else a ValueError
    naming `where`."""
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{where} must be a whole number from {low} to {high}, got {value!r}")
    return value


def _keys(value, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):  # some exporters write one comma-separated string
        value = value.split(",")
    if not isinstance(value, list) or not all(isinstance(k, str) for k in value):
        raise ValueError(f"{where} must be a list of strings")
    if len(value) > MAX_KEYS:
        raise ValueError(f"{where} has {len(value)} keys, more than {MAX_KEYS}")
    keys = tuple(k.strip() for k in value if k.strip())
    for key in keys:
        if _REGEX_KEY.match(key):
            raise ValueError(f"{where}: the regular-expression key {key[:40]!r} is refused (a crafted pattern can "
                             f"run for hours): write its words as plain keys")
    return keys


def _flag(fields: dict, name: str, where: str, default=False) -> bool:
    value = fields.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ValueError(f"{where}.{name} must be true or false, got {value!r}")
    return value


def _entry(raw, card_shape: bool, where: str) -> Entry | None:
    """An entry of either shape, checked; None for an entry that can never fire."""
    if not isinstance(raw, dict):
        raise ValueError(f"{where} must be an object")
    ext = raw.get("extensions") if card_shape else raw
    ext = ext if isinstance(ext, dict) else {}
    content = raw.get("content", "")
    if not isinstance(content, str):
        raise ValueError(f"{where}.content must be a string")
    if card_shape:
        keys = _keys(raw.get("keys"), f"{where}.keys")
        secondary = _keys(raw.get("secondary_keys"), f"{where}.secondary_keys")
        disabled = not _flag(raw, "enabled", where, True)
        position = raw.get("position")
        if position is not None and position not in POSITION_NAMES:
            raise ValueError(f"{where}.position must be 'before_char' or 'after_char', got {position!r}")
        position = ext.get("position", POSITION_NAMES.get(position, BEFORE))
        order, case = raw.get("insertion_order"), raw.get("case_sensitive", ext.get("case_sensitive"))
        whole, scan = ext.get("match_whole_words"), ext.get("scan_depth")
    else:
        keys = _keys(raw.get("key"), f"{where}.key")
        secondary = _keys(raw.get("keysecondary"), f"{where}.keysecondary")
        disabled = _flag(raw, "disable", where)
        position, order, case = raw.get("position"), raw.get("order"), raw.get("caseSensitive")
        whole, scan = raw.get("matchWholeWords"), raw.get("scanDepth")
    if ext.get("useProbability") and ext.get("probability") == 0:
        disabled = True
    for name, value in (("case_sensitive", case), ("match_whole_words", whole)):
        if value is not None and not isinstance(value, bool):
            raise ValueError(f"{where}: {name} must be true or false, got {value!r}")
    entry = Entry(
        uid=str(raw.get("uid", raw.get("id", where))), keys=keys, content=content.strip(), secondary=secondary,
        logic=whole_number(ext.get("selectiveLogic"), f"{where}.selectiveLogic", 0, 3, AND_ANY),
        constant=_flag(raw, "constant", where), order=whole_number(order, f"{where}.order", -(10**6), 10**6, 100),
        position=whole_number(position, f"{where}.position", 0, 7, BEFORE),
        depth=whole_number(ext.get("depth"), f"{where}.depth", 0, MAX_SCAN_DEPTH, DEFAULT_DEPTH),
        case_sensitive=bool(case), whole_words=bool(whole),
        scan_depth=whole_number(scan, f"{where}.scan_depth", 0, MAX_SCAN_DEPTH, 0) if scan is not None else None,
    )
    if not _flag(raw, "selective", where, True):  # ST checks secondary keys only for selective entries
        entry = replace(entry, secondary=())
    if disabled or not entry.content or entry.position == OUTLET or not (entry.constant or entry.keys):
        return None
    return entry


def parse_book(value, path: str, where: str = "") -> Lorebook:
    """A Lorebook from a character_book object (entries: a list) or a World Info file's value
    (entries: an object of uid -> entry); `where` prefixes field names in messages."""
    if not isinstance(value, dict) or not isinstance(value.get("entries"), (list, dict)):
        raise UserError(f"{path}: {where or 'the file'} is not a lorebook (an object with 'entries')")
    raw_entries = value["entries"]
    card_shape = isinstance(raw_entries, list)
    items = list(enumerate(raw_entries)) if card_shape else list(raw_entries.items())
    if len(items) > MAX_ENTRIES:
        raise UserError(f"{path}: {where}entries: {len(items):,} entries, more than the {MAX_ENTRIES:,} a lorebook "
                        f"may have")
    entries, size = [], 0
    for index, raw in items:
        name = f"{where}entries[{index}]" if card_shape else f"{where}entries[{str(index)!r}]"
        try:
            entry = _entry(raw, card_shape, name)
        except ValueError as error:
            raise UserError(f"{path}: {error}") from None
        if entry is not None:
            size += len(entry.content) + sum(map(len, entry.keys + entry.secondary))
            if size > MAX_BOOK_CHARS:
                raise UserError(f"{path}: {name}: the lorebook's keys and content pass {MAX_BOOK_CHARS:,} characters, "
                                f"refused")
            entries.append(entry)
    try:
        scan = whole_number(value.get("scan_depth"), f"{where}scan_depth", 0, MAX_SCAN_DEPTH, DEFAULT_SCAN_DEPTH)
        budget = whole_number(value.get("token_budget"), f"{where}token_budget", 1, 10**7, 0) or None
    except ValueError as error:
        raise UserError(f"{path}: {error}") from None
    return Lorebook(path, tuple(entries), scan, budget)


def read_lorebook(path: str) -> Lorebook:
    """A SillyTavern World Info file (or a bare character_book) from disk."""
    from utils.cards import _parse_json, _read_bytes  # the same size bound and JSON errors as a card

    return parse_book(_parse_json(_read_bytes(path, "lorebook"), path), path)


def book_json(book: Lorebook) -> dict:
    """A Lorebook as a World Info value that parse_book reads back to the same Lorebook, with its
    source: what a record carries so that serving fires the books that training fired."""
    entries = {str(i): {"uid": e.uid, "key": list(e.keys), "keysecondary": list(e.secondary), "content": e.content,
                        "selectiveLogic": e.logic, "constant": e.constant, "order": e.order, "position": e.position,
                        "depth": e.depth, "caseSensitive": e.case_sensitive, "matchWholeWords": e.whole_words,
                        "scanDepth": e.scan_depth} for i, e in enumerate(book.entries)}
    return {"source": book.source, "scan_depth": book.scan_depth, "token_budget": book.budget, "entries": entries}


# ---------------------------------------------------------------- activation


def _found(key: str, text: str, folded: str, entry: Entry) -> bool:
    haystack, needle = (text, key) if entry.case_sensitive else (folded, key.lower())
    if not entry.whole_words or len(needle.split()) > 1:
        return needle in haystack
    start = haystack.find(needle)
    while start != -1:
        end = start + len(needle)
        if (start == 0 or not _ASCII_WORD.match(haystack[start - 1])) and \
                (end == len(haystack) or not _ASCII_WORD.match(haystack[end])):
            return True
        start = haystack.find(needle, start + 1)
    return False


def _fires(entry: Entry, text: str, folded: str) -> bool:
    """Whether `entry` fires on the scanned `text` (`folded`: its lower case, made once per scan)."""
    if entry.constant:
        return True
    if not any(_found(k, text, folded, entry) for k in entry.keys):
        return False
    if not entry.secondary:
        return True
    hits = [_found(k, text, folded, entry) for k in entry.secondary]
    return {AND_ANY: any(hits), NOT_ALL: not all(hits), NOT_ANY: not any(hits), AND_ALL: all(hits)}[entry.logic]


def scan_text(messages: list[dict], depth: int, user_name: str, char_name: str) -> str:
    """The newest `depth` messages of a conversation as ST scans them: "name: text" lines."""
    turns = [m for m in messages if m["role"] != "system"]
    lines = [f"{user_name if m['role'] == 'user' else m.get('name') or char_name}: {m['content']}"
             for m in (turns[-depth:] if depth else [])]
    return "\n".join(lines)


def fire(books, messages: list[dict], user_name: str, char_name: str,
         budget: int = DEFAULT_BUDGET) -> list[tuple[Lorebook, Entry]]:
    """The entries `messages` fire, within the budget, in insertion order (lowest order first)."""
    budgets = [b.budget for b in books if b.budget] + [budget]
    texts = {}  # scan depth -> (text, its lower case)
    fired = []
    for b, book in enumerate(books):
        for e, entry in enumerate(book.entries):
            depth = entry.scan_depth if entry.scan_depth is not None else book.scan_depth
            if depth not in texts:
                text = scan_text(messages, depth, user_name, char_name)
                texts[depth] = text, text.lower()
            if _fires(entry, *texts[depth]):
                fired.append((-entry.order, b, e, book, entry))
    taken, used = [], 0
    for *_, book, entry in sorted(fired, key=lambda f: f[:3]):
        used += len(entry.content)
        if used > min(budgets):
            break
        taken.append((book, entry))
    return taken[::-1]


# ---------------------------------------------------------------- placing


def _fold(messages: list[dict], index: int, text: str) -> None:
    """Put `text` into the conversation before messages[index], as Semi-strict folds a system message."""
    if index > 0 and messages[index - 1]["role"] == "user":
        previous = messages[index - 1]
        messages[index - 1] = {**previous, "content": previous["content"] + SEPARATOR + text}
    elif index < len(messages) and messages[index]["role"] == "user":
        following = messages[index]
        messages[index] = {**following, "content": text + SEPARATOR + following["content"]}
    else:
        messages.insert(index, {"role": "user", "content": text})


@dataclass(frozen=True)
class Context:
    """What a character's prompt gets beyond its system prompt: lorebooks, a depth note (V3's
    depth_prompt) and post-history instructions, with the names its macros and scans use."""

    char_name: str
    user_name: str
    books: tuple[Lorebook, ...] = ()
    depth_note: DepthNote | None = None
    post_history: str = ""
    extra_system: str = ""  # after everything in the system prompt (a group scene's note)
    budget: int = DEFAULT_BUDGET

    @property
    def by_conversation(self) -> bool:
        """Whether it places anything by the conversation (lorebook entries, a depth note, post-history
        instructions): then what a reply is served after depends on the chat before it."""
        return bool(self.books or self.depth_note or self.post_history)

    def to_json(self) -> dict:
        """The context as JSON (data_helper.py's prompts.json; for a model's record later)."""
        note = {"prompt": self.depth_note.text, "depth": self.depth_note.depth} if self.depth_note else None
        return {"char_name": self.char_name, "user_name": self.user_name,
                "lorebooks": [book_json(b) for b in self.books],
                "depth_prompt": note, "post_history_instructions": self.post_history, "budget": self.budget}

    @classmethod
    def from_json(cls, value: dict, path: str) -> "Context":
        """A context from to_json's value, checked as a lorebook file is (`path` names it in errors)."""
        try:
            note = value.get("depth_prompt")
            books = tuple(replace(parse_book(b, path), source=b.get("source", path))
                          for b in value.get("lorebooks", []))
            return cls(value["char_name"], value["user_name"], books,
                       DepthNote(note["prompt"], note["depth"]) if note else None,
                       value.get("post_history_instructions", ""), budget=value.get("budget", DEFAULT_BUDGET))
        except (AttributeError, KeyError, TypeError) as error:
            raise UserError(f"{path}: not a prompt context ({type(error).__name__}: {error})") from None

    def _sub(self, text: str) -> str:
        from utils.cards import substitute

        return substitute(text, self.char_name, self.user_name)

    def _post(self) -> str:
        return self._sub(self.post_history.replace("{{original}}", ""))

    def notes(self) -> list[str]:
        """The depth note and post-history instructions as apply places them, macros filled: what a
        client such as SillyTavern sends of the same card as later system messages of its own."""
        depth = self._sub(self.depth_note.text) if self.depth_note else ""
        return [text for text in (depth, self._post()) if text.strip()]

    def apply(self, messages: list[dict]) -> tuple[list[dict], list[str]]:
        """The messages the model sees for the reply after `messages` (a system message first, or
        none), and the fired entries as "file#uid". The one function for training and serving."""
        has_system = bool(messages) and messages[0]["role"] == "system"
        system = messages[0]["content"] if has_system else ""
        turns = list(messages[1:] if has_system else messages)
        fired = fire(self.books, turns, self.user_name, self.char_name, self.budget)
        before = [self._sub(e.content) for _, e in fired if e.position in (BEFORE, EM_TOP)]
        after = [self._sub(e.content) for _, e in fired if e.position in (AFTER, EM_BOTTOM)]
        depths: dict[int, list[str]] = {}
        if self.depth_note and self.depth_note.text.strip():
            depths.setdefault(self.depth_note.depth, []).append(self._sub(self.depth_note.text))
        for _, e in fired:
            if e.position in (AT_DEPTH, AN_TOP, AN_BOTTOM):
                depths.setdefault(e.depth if e.position == AT_DEPTH else DEFAULT_DEPTH, []).append(self._sub(e.content))
        # every depth counts the conversation's own messages; the shallowest is placed first, so
        # that a message inserted there does not move the places of the deeper ones
        count = len(turns)
        for depth in sorted(depths):
            _fold(turns, max(0, count - depth), "\n".join(depths[depth]))
        post = self._post()
        if post:
            _fold(turns, len(turns), post)
        system = "\n".join(part for part in (*before, system, *after, self.extra_system) if part)
        out = ([{"role": "system", "content": system}] if system else []) + turns
        return out, [f"{book.source}#{entry.uid}" for book, entry in fired]
