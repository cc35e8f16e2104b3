"""RoleBench-zh files: where they are, and their rows, checked.

A row is {"role", "question", "generated": [reply, ...], "type"?}. Role-specific questions start
with the addressee and a full-width comma (`张飞，…`); only that prefix is removed.
"""

import os
import shutil

from utils.cli import UserError
from utils.files import MAX_LINE_BYTES, read_jsonl

DEFAULT_ROLES = ["孙悟空", "张飞", "李白"]
SPLITS = ("train", "test")
KINDS = ("general", "role_specific")
INPUT_FILES = {(kind, split): f"rolebench-zh_{kind}_{split}.jsonl" for kind in KINDS for split in SPLITS}
HUB_REPO_ID = "ZenMoore/RoleBench"
HUB_PATHS = {key: f"rolebench-zh/{key[0]}/{key[1]}.jsonl" for key in INPUT_FILES}
FULLWIDTH_COMMA = "，"


def split_roles(text: str) -> list[str]:
    """Role names from a comma-separated list (ASCII or full-width commas), in order, once each."""
    names = text.replace(FULLWIDTH_COMMA, ",").split(",")
    return list(dict.fromkeys(name.strip() for name in names if name.strip()))


def strip_addressee(question: str, role: str) -> str:
    """Remove only a leading "<role>，" (e.g. "张飞，"); keep every other comma."""
    prefix = role + FULLWIDTH_COMMA
    return question[len(prefix):].strip() if question.startswith(prefix) else question


def parse_row(row) -> dict:
    """{"role", "question", "replies"} of a checked row; ValueError names the problem."""
    if not isinstance(row, dict):
        raise ValueError(f"expected a JSON object, got {type(row).__name__}")
    for field in ("role", "question", "generated"):
        if field not in row:
            raise ValueError(f"missing field '{field}'")
    for field in ("role", "question"):
        if not isinstance(row[field], str):
            raise ValueError(f"field '{field}' must be a string, got {type(row[field]).__name__}")
    if not isinstance(row["generated"], list):
        raise ValueError(f"field 'generated' must be a list, got {type(row['generated']).__name__}")
    if not row["generated"]:
        raise ValueError("field 'generated' is an empty list")
    for i, reply in enumerate(row["generated"]):
        if not isinstance(reply, str) or not reply.strip():
            raise ValueError(f"generated[{i}] must be a non-empty string")
    kind = row.get("type")
    if kind is not None and not (isinstance(kind, str) or (
            isinstance(kind, list) and all(isinstance(k, str) for k in kind))):
        raise ValueError("field 'type' must be a string or a list of strings")
    question = strip_addressee(row["question"].strip(), row["role"])
    if not question:
        raise ValueError("question is empty")
    return {"role": row["role"], "question": question, "replies": row["generated"]}


def read_rows(path: str, on_bad=None, max_line_bytes: int = MAX_LINE_BYTES):
    """The checked rows of one RoleBench-format file, in file order. A bad line (or one longer than
    `max_line_bytes`) is a UserError naming file and line, or, with `on_bad`, handed to it and
    skipped. An empty file is an error."""
    seen = False
    for number, value in read_jsonl(path, max_line_bytes, on_bad):
        seen = True
        try:
            row = parse_row(value)
        except ValueError as error:
            message = f"{path}:{number}: {error}"
            if on_bad is None:
                raise UserError(message) from None
            on_bad(message)
            continue
        yield row
    if not seen:
        raise UserError(f"{path}: file is empty (no non-blank line)")


def download(data_dir: str) -> None:
    """Fetch the RoleBench-zh files missing from data_dir from the Hugging Face hub; never overwrite."""
    missing = {key: name for key, name in INPUT_FILES.items() if not os.path.isfile(os.path.join(data_dir, name))}
    if not missing:
        print(f"download: all four files already in {data_dir}, nothing fetched")
        return
    by_hand = (f"get them by hand from the dataset {HUB_REPO_ID} on huggingface.co and put "
               + ", ".join(f"{HUB_PATHS[k]} at {os.path.join(data_dir, name)}" for k, name in missing.items()))
    part = None
    try:
        from huggingface_hub import hf_hub_download

        os.makedirs(data_dir, exist_ok=True)
        for key, name in missing.items():
            cached = hf_hub_download(repo_id=HUB_REPO_ID, filename=HUB_PATHS[key], repo_type="dataset")
            target = os.path.join(data_dir, name)
            part = target + ".part"
            shutil.copyfile(cached, part)
            os.replace(part, target)
            print(f"download: {HUB_PATHS[key]} -> {target}")
    except Exception as error:  # offline, no package, 404, disk: all end the same way
        if part and os.path.exists(part):
            os.remove(part)
        reason = str(error).splitlines()[0] if str(error) else ""
        raise UserError(f"could not download from the Hugging Face hub ({type(error).__name__}: {reason}); "
                        f"{by_hand}") from None
