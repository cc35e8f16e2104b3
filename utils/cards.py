"""Character cards (TavernAI / SillyTavern Character Card V1, V2 and V3) as roles.

A card is JSON: V1 has `name`, `description`, `personality`, `scenario`, `first_mes` and
`mes_example` at the top level; V2 (`"spec": "chara_card_v2"`) and V3 (`"chara_card_v3"`) have
them, and more, in a `data` object. Cards mostly travel as a PNG image whose text chunk `chara`
(V1/V2) or `ccv3` (V3) holds that JSON in base64; when both are there, `ccv3` is read, as the V3
spec asks.

How a card becomes a role (utils.prompts.card_role, and `card_dialogues` here):
    name, description, personality, scenario -> the role's description in the project's template
        (utils.prompts.build_system_prompt), as "description\\n性格：personality\\n场景：scenario"
    system_prompt  -> the system prompt instead, only when asked (`card_system_prompt`); its
        {{original}} stands for the prompt the template builds, as in the V2 spec
    first_mes      -> the greeting: the chat's first assistant turn
    mes_example    -> training dialogues, one per `<START>` block; lines `{{user}}: ...` are the
        user's turns and `{{char}}: ...` the character's (a line without a speaker continues the turn)
    first_mes      -> also the masked first assistant turn of each dialogue: context, not trained on
    character_book, post_history_instructions, extensions.depth_prompt -> the card's Context
        (utils.lorebook): entries fired by each conversation, and the notes after the history
{{char}} and {{user}} (and the old <BOT>/<USER>) become the name and `user_name` everywhere.
In SillyTavern's prompt style (utils/prompts.py), mes_example is also read as SillyTavern reads it
(`sillytavern_examples`), for the examples in the system prompt.
Not trained on, with a one-line note: alternate_greetings (web_demo.py's page offers them).

A card is untrusted input. Every problem (too big, not a card, bad base64 or JSON, no name, a
truncated or damaged PNG, a compressed chunk that inflates past its bound, an image past Pillow's
decompression-bomb size) is a one-line UserError naming the file, raised before anything is written.
"""

import base64
import binascii
import json
import os
import re
import struct
import sys
import zlib
from dataclasses import dataclass

from utils.cli import UserError, unsafe_character
from utils.lorebook import DEFAULT_DEPTH, MAX_SCAN_DEPTH, Context, DepthNote, Lorebook, parse_book, whole_number

MAX_CARD_BYTES = 20 * 2**20  # checked before a file is read
MAX_TEXT_BYTES = 8 * 2**20  # a compressed text chunk may inflate to this much
# Pillow's DecompressionBombError size (2 x Image.MAX_IMAGE_PIXELS): the pixels are never decoded
# here, but a card's avatar is an image that other tools will open
MAX_PIXELS = 2 * 89_478_485
USER_NAME = "你"  # what {{user}} becomes: the person chatting, addressed in the second person
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CARD_CHUNKS = ("ccv3", "chara")  # the keywords of the text chunks that hold a card, preferred first
CARD_SPECS = ("chara_card_v2", "chara_card_v3")
TEXT_FIELDS = ("name", "description", "personality", "scenario", "first_mes", "mes_example", "system_prompt",
               "post_history_instructions")
CARD_SUFFIXES = (".json", ".png")
_MACROS = re.compile(r"\{\{(char|user)\}\}|<(BOT|USER)>", re.IGNORECASE)
_START = re.compile(r"<START>", re.IGNORECASE)


@dataclass(frozen=True)
class Card:
    path: str
    name: str
    description: str = ""
    personality: str = ""
    scenario: str = ""
    first_mes: str = ""
    mes_example: str = ""
    system_prompt: str = ""
    post_history_instructions: str = ""
    alternate_greetings: tuple[str, ...] = ()
    book: Lorebook | None = None
    depth_note: DepthNote | None = None  # V3's extensions.depth_prompt

    def unused(self) -> list[str]:
        """The parts of the card that are not trained on, in words."""
        return [f"alternate_greetings ({len(self.alternate_greetings)}; the page offers them)"] \
            if self.alternate_greetings else []

    def context(self, user_name: str = USER_NAME, books: tuple[Lorebook, ...] = ()) -> Context:
        """What the card adds to its character's prompt beyond the system prompt (utils.lorebook),
        with the lorebooks `books` given beside it (World Info files) after its own."""
        return Context(self.name, user_name, ((self.book,) if self.book else ()) + tuple(books), self.depth_note,
                       self.post_history_instructions)


# ---------------------------------------------------------------- reading


def is_card(value) -> bool:
    """Whether a JSON value is a character card (rather than a roles file: name -> description)."""
    if not isinstance(value, dict):
        return False
    return value.get("spec") in CARD_SPECS or ("name" in value and "first_mes" in value)


def _read_bytes(path: str, what: str) -> bytes:
    """A file's bytes, its size checked before it is read."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: {what} {'is a directory' if os.path.isdir(path) else 'not found'}")
    try:
        size = os.path.getsize(path)
        if size > MAX_CARD_BYTES:
            raise UserError(f"{path}: {size:,} bytes, more than the {MAX_CARD_BYTES:,} a {what} may have")
        with open(path, "rb") as f:
            data = f.read(MAX_CARD_BYTES + 1)
    except OSError as error:
        raise UserError(f"{path}: cannot read the {what} ({error.strerror})") from None
    if len(data) > MAX_CARD_BYTES:  # it grew after the check
        raise UserError(f"{path}: more than the {MAX_CARD_BYTES:,} bytes a {what} may have")
    return data


def _parse_json(data: bytes, path: str, where: str = ""):
    try:
        return json.loads(data.decode("utf-8-sig"))
    except UnicodeDecodeError as error:
        raise UserError(f"{path}: {where}not valid UTF-8 (byte {error.start})") from None
    except json.JSONDecodeError as error:
        line = "" if where else f":{error.lineno}"
        raise UserError(f"{path}{line}: {where}not valid JSON ({error.msg})") from None
    except RecursionError:
        raise UserError(f"{path}: {where}JSON nested too deeply") from None
    except ValueError as error:  # e.g. an integer past Python's 4,300-digit limit
        raise UserError(f"{path}: {where}not valid JSON ({error})") from None


def _inflate(body: bytes, path: str, keyword: str) -> bytes:
    inflater = zlib.decompressobj()
    try:
        text = inflater.decompress(body, MAX_TEXT_BYTES + 1)
    except zlib.error:
        raise UserError(f"{path}: the compressed {keyword!r} chunk is not valid zlib data") from None
    if len(text) > MAX_TEXT_BYTES:
        raise UserError(f"{path}: the {keyword!r} chunk inflates past {MAX_TEXT_BYTES:,} bytes "
                        f"(a decompression bomb), refused")
    if not inflater.eof:
        raise UserError(f"{path}: the compressed {keyword!r} chunk is cut short")
    return text


def _text_chunk(kind: bytes, keyword: str, rest: bytes, path: str) -> str:
    """The text of a card's tEXt/zTXt/iTXt chunk, after its keyword."""
    if kind == b"tEXt":
        return rest.decode("latin-1")
    if kind == b"zTXt":  # compression method byte, then zlib data
        return _inflate(rest[1:], path, keyword).decode("latin-1")
    compressed, rest = rest[:1] == b"\1", rest[2:]  # iTXt: flag, method, language\0, translated\0, text
    _language, _, rest = rest.partition(b"\0")
    _translated, _, text = rest.partition(b"\0")
    text = _inflate(text, path, keyword) if compressed else text
    try:
        return text.decode("utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{path}: the {keyword!r} chunk is not valid UTF-8") from None


def png_card_texts(data: bytes, path: str) -> dict[str, str]:
    """The card chunks of a PNG file (keyword -> text), checked chunk by chunk up to IEND.

    Written by hand rather than with Pillow: Pillow reads the text chunks that follow the image
    data (where SillyTavern writes the card) only by decoding every pixel first, and a card needs
    none of them. Only the first chunk of each card keyword is read, and inflated within
    MAX_TEXT_BYTES: a later one is never used, and inflating thousands of copies of one was minutes
    of CPU from a 20 MB file.
    """
    texts, pos = {}, len(PNG_SIGNATURE)
    while True:
        if pos + 8 > len(data):
            raise UserError(f"{path}: truncated PNG (the file ends before its IEND chunk)")
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        end = pos + 12 + length
        if end > len(data):
            raise UserError(f"{path}: truncated PNG (chunk {kind.decode('latin-1')!r} runs past the end of the file)")
        body = data[pos + 8 : end - 4]
        if zlib.crc32(kind + body) != int.from_bytes(data[end - 4 : end], "big"):
            raise UserError(f"{path}: damaged PNG (chunk {kind.decode('latin-1')!r} fails its CRC check)")
        if kind == b"IHDR" and length >= 8:
            width, height = struct.unpack(">II", body[:8])
            if width * height > MAX_PIXELS:
                raise UserError(f"{path}: a PNG of {width} x {height} pixels (more than {MAX_PIXELS:,}) is "
                                f"a decompression bomb, refused")
        elif kind in (b"tEXt", b"zTXt", b"iTXt"):
            keyword, _, rest = body.partition(b"\0")
            keyword = keyword.decode("latin-1")
            if keyword in CARD_CHUNKS and keyword not in texts:
                texts[keyword] = _text_chunk(kind, keyword, rest, path)
        elif kind == b"IEND":
            return texts
        pos = end


def _png_card(data: bytes, path: str):
    texts = png_card_texts(data, path)
    keyword = next((k for k in CARD_CHUNKS if k in texts), None)
    if keyword is None:
        raise UserError(f"{path}: a PNG without a character card (no 'chara' or 'ccv3' text chunk)")
    try:
        raw = base64.b64decode("".join(texts[keyword].split()), validate=True)
    except (binascii.Error, ValueError):
        raise UserError(f"{path}: the {keyword!r} chunk is not valid base64") from None
    return _parse_json(raw, path, f"the {keyword!r} chunk is ")


def _text(fields: dict, key: str, path: str, prefix: str) -> str:
    value = fields.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise UserError(f"{path}: field {prefix}{key} must be a string, got {type(value).__name__}")
    return value


def parse_card(value, path: str) -> Card:
    """A checked Card from the JSON value of a V1, V2 or V3 card."""
    if not is_card(value):
        raise UserError(f"{path}: not a character card (no spec chara_card_v2/v3, nor V1's name and first_mes)")
    fields, prefix = value, ""
    if value.get("spec") in CARD_SPECS:
        fields, prefix = value.get("data"), "data."
        if not isinstance(fields, dict):
            raise UserError(f"{path}: a {value['spec']} card needs a 'data' object")
    texts = {key: _text(fields, key, path, prefix) for key in TEXT_FIELDS}
    texts["name"] = texts["name"].strip()
    if not texts["name"]:
        raise UserError(f"{path}: the character card has no name (field {prefix}name)")
    char = unsafe_character(texts["name"])
    if char:  # the name is printed in messages and on the page: see utils.prompts.name_problem
        raise UserError(f"{path}: the character's name {texts['name']!r} (field {prefix}name) contains {char}, "
                        f"refused")
    greetings = fields.get("alternate_greetings") or []
    if not isinstance(greetings, list) or not all(isinstance(g, str) for g in greetings):
        raise UserError(f"{path}: field {prefix}alternate_greetings must be a list of strings")
    book = fields.get("character_book")
    if book is not None:
        if not isinstance(book, dict) or not isinstance(book.get("entries"), list):
            raise UserError(f"{path}: field {prefix}character_book must be an object with a list of entries")
        book = parse_book(book, path, f"{prefix}character_book.")
    return Card(path=path, alternate_greetings=tuple(greetings), book=book,
                depth_note=_depth_note(fields, path, prefix), **texts)


def _depth_note(fields: dict, path: str, prefix: str) -> DepthNote | None:
    """A card's depth prompt (extensions.depth_prompt: {prompt, depth, role}), placed `depth`
    messages from the end of the chat as SillyTavern does (utils.lorebook)."""
    extensions = fields.get("extensions")
    note = extensions.get("depth_prompt") if isinstance(extensions, dict) else None
    if note is None:
        return None
    where = f"field {prefix}extensions.depth_prompt"
    if not isinstance(note, dict) or not isinstance(note.get("prompt", ""), str):
        raise UserError(f"{path}: {where} must be an object with a string 'prompt'")
    try:
        depth = whole_number(note.get("depth"), f"{where}.depth", 0, MAX_SCAN_DEPTH, DEFAULT_DEPTH)
    except ValueError as error:
        raise UserError(f"{path}: {error}") from None
    return DepthNote(note.get("prompt", ""), depth) if note.get("prompt", "").strip() else None


def _file_value(data: bytes, path: str):
    """The JSON value of a card file's bytes: a PNG's card chunk (by its signature, whatever the
    file's name), or the file itself."""
    return _png_card(data, path) if data.startswith(PNG_SIGNATURE) else _parse_json(data, path)


def read_card(path: str) -> Card:
    """One card file: a PNG or JSON."""
    return parse_card(_file_value(_read_bytes(path, "character card"), path), path)


def card_files(folder: str) -> list[str]:
    """The .json and .png files of a folder (not its subfolders), by name; hidden files are left out."""
    try:
        names = sorted(os.listdir(folder))
    except OSError as error:
        raise UserError(f"{folder}: cannot list the folder ({error.strerror})") from None
    paths = [os.path.join(folder, n) for n in names if n.lower().endswith(CARD_SUFFIXES) and not n.startswith(".")]
    if not paths:
        raise UserError(f"{folder}: a folder without character cards (no .json or .png file)")
    return paths


def _noted(card: Card) -> Card:
    unused = card.unused()
    if unused:
        print(f"note: {card.path}: not trained on: {', '.join(unused)}", file=sys.stderr)
    return card


def read_cards(paths: list[str], on_error=None) -> list[Card]:
    """The cards of files and folders, each character once; a card's unused parts get a note. A
    bad card is a UserError, or with `on_error` handed to it as that message and left out, so that
    every bad card can be reported at once."""
    cards, seen = [], {}
    for path in paths:
        try:
            files = card_files(path) if os.path.isdir(path) else [path]
        except UserError as error:
            if on_error is None:
                raise
            on_error(str(error))
            continue
        for file in files:
            try:
                card = read_card(file)
                if card.name in seen:
                    raise UserError(f"{file}: the character {card.name!r} is already given by {seen[card.name]}")
            except UserError as error:
                if on_error is None:
                    raise
                on_error(str(error))
                continue
            seen[card.name] = file
            cards.append(_noted(card))
    return cards


def read_roles_source(path: str) -> tuple[list[Card], object]:
    """What a --roles_file names: (the cards, None) for a card file or a folder of cards, or
    ([], the JSON value) for a roles file, which utils.prompts checks."""
    if os.path.isdir(path):
        return read_cards([path]), None
    data = _read_bytes(path, "roles file")
    value = _file_value(data, path)
    if data.startswith(PNG_SIGNATURE) or is_card(value):
        return [_noted(parse_card(value, path))], None
    return [], value


# ---------------------------------------------------------------- cards as roles


def substitute(text: str, name: str, user_name: str = USER_NAME) -> str:
    """{{char}}/<BOT> -> the character's name, {{user}}/<USER> -> the user's, in any letter case."""
    return _MACROS.sub(lambda m: name if (m[1] or m[2]).lower() in ("char", "bot") else user_name, text).strip()


def card_description(card: Card, user_name: str = USER_NAME) -> str:
    """What the template's {description} is for a card: its description, personality and scenario."""
    parts = [substitute(card.description, card.name, user_name)]
    for label, text in (("性格", card.personality), ("场景", card.scenario)):
        if text.strip():
            parts.append(f"{label}：{substitute(text, card.name, user_name)}")
    return "\n".join(part for part in parts if part)


def _speaker_line(line: str, names: dict[str, str]) -> tuple[str, str] | None:
    """(role, text) of a line `name: text` (or `name：text`) whose name, in any letter case, is one
    of `names` (lower-case name -> role); None for any other line. By hand rather than a regular
    expression of the names: compiling one per card was 6 of the 10 s of a folder of 10,000 cards."""
    stripped = line.lstrip()
    for name, role in names.items():
        if stripped[: len(name)].lower() == name:
            rest = stripped[len(name):].lstrip()
            if rest[:1] in (":", "："):
                return role, rest[2:] if rest[1:2].isspace() else rest[1:]
    return None


def sillytavern_examples(mes_example: str, name: str, user_name: str) -> list[list[dict]]:
    """A card's mes_example as SillyTavern 1.19.0 sends it in a Chat Completion request: per
    `<START>` block, its lines as system messages named example_user / example_assistant, each
    without its leading "Name:" (public/script.js parseMesExamples, public/scripts/openai.js
    parseExampleIntoIndividual). Its quirks are kept, for the same text to the character: a line
    starts a message only when it begins with the exact name and a colon, and lines before the
    block's first such line join its first message, and a block without such a line is an empty
    dialogue (SillyTavern still marks it "[Example Chat]")."""
    text = substitute(mes_example, name, user_name).replace("\r", "")
    if not text or text == "<START>":
        return []
    if not text.startswith("<START>"):  # SillyTavern's test, in this letter case
        text = "<START>\n" + text
    blocks = []
    for block in _START.split(text)[1:]:
        messages, lines, speaker = [], [], None

        def add():
            said = "\n".join(lines).replace(f"{speaker[1]}:", "", 1).strip()
            messages.append({"role": "system", "content": said, "name": speaker[0]})
            lines.clear()

        for line in block.strip().split("\n"):
            starts = ("example_user", user_name) if line.startswith(user_name + ":") else \
                ("example_assistant", name) if line.startswith(name + ":") else None
            if starts and speaker and starts[0] != speaker[0]:
                add()
            speaker = starts or speaker
            lines.append(line)
        if speaker:
            add()
        blocks.append(messages)
    return blocks


def card_dialogues(card: Card, user_name: str = USER_NAME) -> list[list[dict]]:
    """The card's example dialogues (mes_example) as lists of user and assistant messages; a block
    without a line of the character's is left out."""
    names = {"{{char}}": "assistant", "<bot>": "assistant", card.name.lower(): "assistant",
             "{{user}}": "user", "<user>": "user", user_name.lower(): "user"}
    dialogues = []
    # lines are gathered in lists and joined once: adding to a turn's string line by line was
    # quadratic (200,000 lines: 49 s)
    for block in _START.split(card.mes_example):
        turns = []  # [role, its lines]
        for line in block.splitlines():
            said = _speaker_line(line, names)
            if said:
                turns.append((said[0], [said[1]]))
            elif turns:  # a line without a speaker continues the turn
                turns[-1][1].append(line)
        messages = []  # [role, its texts]
        for role, lines in turns:
            text = substitute("\n".join(lines), card.name, user_name)
            if not text:
                continue
            if messages and messages[-1][0] == role:  # one speaker's lines in a row are one turn
                messages[-1][1].append(text)
            else:
                messages.append((role, [text]))
        if any(role == "assistant" for role, _ in messages):
            dialogues.append([{"role": role, "content": "\n".join(texts)} for role, texts in messages])
    return dialogues
