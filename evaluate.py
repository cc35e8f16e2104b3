r"""Evaluate role-play models on the RoleBench-zh test questions: ROUGE-L and perplexity.

Usage (from the repository root):

    # the base model against the fine-tuned one (base + a LoRA checkpoint of train.py), real test questions
    python evaluate.py --data_dir ../shared/rolebench \
        --model base=baichuan-inc/Baichuan2-7B-Chat \
        --model finetuned=baichuan-inc/Baichuan2-7B-Chat::runs/roleplay/epoch-1-step-500 \
        --out_dir runs/eval

    # a quick look: 5 questions per split of a merged model, and the training curves of its run
    python evaluate.py --data_dir ../shared/rolebench --limit 5 \
        --model merged=runs/roleplay-merged --plot_run runs/roleplay --out_dir runs/eval-quick

    # only score the RoleGPT (GPT-4) answers shipped with RoleBench, all test questions, no model
    python evaluate.py --data_dir ../shared/rolebench --baseline_only --out_dir runs/eval-rolegpt

    # only plot the loss / ppl curves of one or more training runs
    python evaluate.py --plot_run runs/roleplay --plot_run runs/roleplay-lr2e-4 --out_dir runs/curves

Models: `--model NAME=PATH` (a full or merged model directory, or a hub id) or
`--model NAME=BASE::ADAPTER` (a base model plus a LoRA adapter directory, e.g. a training
checkpoint). `::` separates the two because `+`, `:` and `=` may all occur in paths; only the
first `=` splits the name off. Names label the rows of the report and key the saved results.

Test questions: with --data_dir (default data/sample), the two RoleBench-zh test files are
read with data_helper's reader, so each question keeps its split and ALL its references
(RoleBench has up to 5 per general question): general = the paper's CUS (role-styled answers
to general instructions), role_specific = SPE (role knowledge). The system prompt is built
from --roles_file like data_helper.py does (a roles file, or character cards). With --test_file (the jsonl that data_helper.py
writes) the rows are grouped into questions by role and input; that file carries no split,
so its questions count as split "unknown" unless a row has a "split" field. A conversation row
(OpenAI messages or ShareGPT, as data_helper.py writes for cards) asks its last user message with
the turns before it in the prompt, its last reply the reference.

Per question and model: one answer (greedy unless --do_sample), scored with ROUGE-L F1
(beta = 1: F = 2PR / (P + R), P = LCS / len(answer), R = LCS / len(reference)) on jieba
words and on characters (whitespace dropped, punctuation kept), against the first reference
and against the best of all references; and the perplexity of the reference replies (each
reference + eos after the chat prompt, token-weighted over all reply tokens). Note: the
`rouge` pip package sets beta = P / R instead, which gives somewhat lower numbers (about 0.02
on the RoleGPT answers). RAW (the paper's role-free raw answers) cannot be measured:
RoleBench-zh does not ship the raw answers.

The RoleGPT answers (default: ../shared/rolebench/rolebench-zh/*/rolegpt_baseline.jsonl next
to the repository, used when present; or --baseline_file) are matched to the test questions
by role + question and scored as one more row, without perplexity.

Output in --out_dir: samples.jsonl (one line per model and question, appended and flushed
as it goes: rerunning the same command resumes, skipping finished questions keyed by model
name + split + role + question; a result made with other settings or another prompt is
redone), results.json, results.md, results.png and, with --plot_run, training_curves.png.
The report files are replaced atomically.
"""

import argparse
import hashlib
import io
import json
import logging
import math
import os
import sys
from dataclasses import dataclass

from utils import UserError, exit_on_user_error, quiet_third_party, read_jsonl, write_atomic
from utils import prompts as prompt_contract
from utils import rolebench

ROOT = os.path.dirname(os.path.abspath(__file__))
SHARED_BENCH = os.path.join(ROOT, "..", "shared", "rolebench")
DEFAULT_BASELINE_FILES = [
    os.path.join(SHARED_BENCH, "rolebench-zh", kind, "rolegpt_baseline.jsonl") for kind in rolebench.KINDS
]
BASELINE_NAME = "RoleGPT"
SPEC_SEPARATOR = "::"
SPLITS = ("general", "role_specific")  # the two RoleBench-zh test files, in report order
SPLIT_LABELS = {"general": "CUS", "role_specific": "SPE", "unknown": "unknown"}
METRICS = ("word_first", "word_best", "char_first", "char_best")
SAMPLES_FILE = "samples.jsonl"
# RoleLLM (arXiv 2310.00746), Table 4, Chinese part, ROUGE-L.
PAPER_TABLE4 = {
    "RoleGLM": {"CUS": 0.5049, "RAW": 0.5255, "SPE": 0.3406},
    "ChatGLM2": {"CUS": 0.3938, "RAW": 0.5060, "SPE": 0.3099},
    "RoleGPT": {"CUS": 0.5368, "RAW": 0.5748, "SPE": 0.2478},
}
CJK_FONTS = ("WenQuanYi Zen Hei", "Noto Sans CJK SC", "Noto Sans SC", "Source Han Sans SC", "SimHei",
             "Microsoft YaHei", "PingFang SC", "AR PL UMing CN")
# scalars that train.py logs, and the panel each goes in (eval_loss shares the loss panel)
CURVE_PANELS = {"train_loss": "loss", "eval_loss": "loss", "ppl": "ppl", "lr": "lr", "tokens_per_s": "tokens_per_s"}


# ---------------------------------------------------------------- arguments


def parse_args(argv=None):
    examples = __doc__.split("\n\n", 1)[1].split("\nModels:", 1)[0]
    parser = argparse.ArgumentParser(
        description="Score role-play models on the RoleBench-zh test questions (ROUGE-L, perplexity) "
                    "and write a report.",
        epilog=examples + "\nExit status: 0 ok, 1 bad input, 2 bad command line, 130 interrupted (rerun to resume).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    group = parser.add_argument_group("models")
    group.add_argument(
        "--model", action="append", default=[], metavar="NAME=PATH | NAME=BASE::ADAPTER",
        help="a model to evaluate, repeatable: NAME=PATH for a full or merged model directory (or hub id), "
             "NAME=BASE::ADAPTER for a base model plus a LoRA adapter directory")
    group.add_argument("--device", default="auto",
                       help="cpu, cuda, cuda:N or auto (CUDA when present) (default: %(default)s)")
    group.add_argument("--trust_remote_code", action="store_true",
                       help="load model code from the model directory instead of the local baichuan package")

    group = parser.add_argument_group("test questions")
    group.add_argument(
        "--data_dir", default="data/sample",
        help="folder with the RoleBench-zh test files rolebench-zh_general_test.jsonl and "
             "rolebench-zh_role_specific_test.jsonl (default: %(default)s)")
    group.add_argument(
        "--roles_file", default="data/roles.json",
        help="JSON object role name -> description for the system prompt, as for data_helper.py, or a "
             "character card or folder of cards (default: %(default)s)")
    group.add_argument(
        "--test_file", default=None,
        help="instead of --data_dir: a test jsonl written by data_helper.py (rows instruction, input, output, "
             "role; no split, so questions count as split 'unknown' unless a row has a 'split' field)")
    group.add_argument(
        "--roles", default=None,
        help=f"comma-separated roles to evaluate (default: {','.join(rolebench.DEFAULT_ROLES)} with "
             f"--data_dir, every role in --test_file)")
    group.add_argument(
        "--limit", type=int, default=None,
        help="at most N questions per split, taken round-robin over the roles in file order (default: all)")

    group = parser.add_argument_group("generation")
    group.add_argument("--max_new_tokens", type=int, default=256,
                       help="longest answer, in tokens (default: %(default)s)")
    group.add_argument("--batch_size", type=int, default=8,
                       help="questions per generate() call, and reference replies per perplexity forward "
                            "(default: %(default)s)")
    group.add_argument("--do_sample", action="store_true",
                       help="sample instead of greedy decoding (then the model's top_k also applies)")
    group.add_argument("--temperature", type=float, default=None,
                       help="sampling temperature, with --do_sample (default: the model's generation config)")
    group.add_argument("--top_p", type=float, default=None,
                       help="nucleus sampling threshold, with --do_sample (default: the model's generation config)")
    group.add_argument("--repetition_penalty", type=float, default=None,
                       help="1.0 turns it off (default: the model's generation config; 1.05 for Baichuan2)")
    group.add_argument("--seed", type=int, default=0, help="torch seed, set before each model (default: %(default)s)")

    group = parser.add_argument_group("baseline")
    group.add_argument(
        "--baseline_file", action="append", default=None,
        help="jsonl of RoleGPT answers (rows role, question, generated: [answer]), repeatable "
             "(default: ../shared/rolebench/rolebench-zh/{general,role_specific}/rolegpt_baseline.jsonl "
             "next to the repository, when present)")
    group.add_argument("--no_baseline", action="store_true", help="do not score the RoleGPT answers")
    group.add_argument("--baseline_only", action="store_true",
                       help="score only the RoleGPT answers (no model needed; fast on the full test set)")

    group = parser.add_argument_group("output")
    group.add_argument("--out_dir", default="runs/eval",
                       help=f"folder for {SAMPLES_FILE} and the report files (default: %(default)s)")
    group.add_argument(
        "--plot_run", action="append", default=[], metavar="DIR",
        help="a training run folder (train.py's --output_dir) with TensorBoard event files, searched "
             "recursively; repeatable: plots train_loss, eval_loss, ppl, lr, tokens_per_s into "
             "training_curves.png; alone, only plots")
    return parser.parse_args(argv)


@dataclass(frozen=True)
class ModelSpec:
    name: str
    path: str
    adapter: str | None = None

    def settings_key(self):
        """Paths as absolute paths when they exist locally, so cwd changes do not look like new models."""
        local = lambda p: os.path.abspath(p) if p and os.path.exists(p) else p  # noqa: E731
        return {"model": local(self.path), "adapter": local(self.adapter)}


def parse_model_spec(text):
    """`NAME=PATH` or `NAME=BASE::ADAPTER` -> ModelSpec; ValueError with the problem otherwise."""
    name, sep, target = text.partition("=")
    name = name.strip()
    if not sep or not name or not target.strip():
        raise ValueError(f"--model {text!r}: expected NAME=PATH or NAME=BASE{SPEC_SEPARATOR}ADAPTER")
    if any(c.isspace() for c in name) or name == BASELINE_NAME:
        raise ValueError(f"--model {text!r}: the name must have no spaces and not be {BASELINE_NAME!r}")
    path, sep, adapter = target.partition(SPEC_SEPARATOR)
    if sep and (not path.strip() or not adapter.strip() or SPEC_SEPARATOR in adapter):
        raise ValueError(f"--model {text!r}: expected NAME=BASE{SPEC_SEPARATOR}ADAPTER with both parts")
    return ModelSpec(name, path.strip(), adapter.strip() if sep else None)


def check_model_spec(spec):
    """Problems with the directories of one model spec (empty list when fine)."""
    from utils.models import check_model_dir

    problems = []
    try:
        check_model_dir(spec.path, f"--model {spec.name}: model")
    except UserError as error:
        problems.append(str(error))
    if spec.adapter is not None and not os.path.isfile(os.path.join(spec.adapter, "adapter_config.json")):
        problems.append(f"--model {spec.name}: adapter directory {spec.adapter!r} has no adapter_config.json")
    return problems


def find_event_dirs(run_dir):
    """Folders under run_dir (itself included) that hold TensorBoard event files, sorted."""
    found = []
    for folder, _, files in os.walk(run_dir):
        if any(f.startswith("events.out.tfevents") for f in files):
            found.append(folder)
    return sorted(found)


def validate_args(args):
    """Check every argument; return (model specs, roles dict or None, selected roles or None, problems)."""
    problems, specs, roles, selected = [], [], None, None
    for text in args.model:
        try:
            spec = parse_model_spec(text)
        except ValueError as error:
            problems.append(str(error))
            continue
        if any(s.name == spec.name for s in specs):
            problems.append(f"--model: the name {spec.name!r} is given twice")
        specs.append(spec)
        problems.extend(check_model_spec(spec))

    evaluating = bool(args.model) or args.baseline_only
    if args.baseline_only and args.model:
        problems.append("--baseline_only scores no model: leave out --model")
    if args.baseline_only and args.no_baseline:
        problems.append("--baseline_only and --no_baseline contradict each other")
    if not evaluating and not args.plot_run:
        problems.append("nothing to do: give --model (one or more), --baseline_only or --plot_run")

    if evaluating:
        selected = rolebench.split_roles(args.roles) if args.roles is not None else None
        if selected == []:
            problems.append("--roles: no role given")
        if args.test_file is not None:
            if not os.path.isfile(args.test_file):
                problems.append(f"{args.test_file}: test file not found")
        else:
            try:
                roles = prompt_contract.roles_from_file(args.roles_file)
            except UserError as error:
                problems.append(str(error))
            selected = selected or list(rolebench.DEFAULT_ROLES)
            unknown = [name for name in selected if roles is not None and name not in roles]
            if unknown:
                problems.append(f"--roles: {', '.join(unknown)} not in {args.roles_file}")
            if not os.path.isdir(args.data_dir):
                problems.append(f"{args.data_dir}: data folder not found")
            else:
                for kind in rolebench.KINDS:
                    path = os.path.join(args.data_dir, rolebench.INPUT_FILES[(kind, "test")])
                    if not os.path.isfile(path):
                        problems.append(f"{path}: test file not found")
        for path in args.baseline_file or []:
            if not os.path.isfile(path):
                problems.append(f"--baseline_file {path}: file not found")
        if args.baseline_only and not args.baseline_file and not any(map(os.path.isfile, DEFAULT_BASELINE_FILES)):
            problems.append("--baseline_only: no RoleGPT answers at the default place "
                            f"({os.path.normpath(os.path.dirname(os.path.dirname(DEFAULT_BASELINE_FILES[0])))}); "
                            "give --baseline_file")

    for flag, value, low in (("--limit", args.limit, 1), ("--max_new_tokens", args.max_new_tokens, 1),
                             ("--batch_size", args.batch_size, 1)):
        if value is not None and value < low:
            problems.append(f"{flag}: must be at least {low}, got {value}")
    if args.temperature is not None and not args.temperature > 0:
        problems.append(f"--temperature: must be positive, got {args.temperature}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        problems.append(f"--top_p: must be in (0, 1], got {args.top_p}")
    if args.repetition_penalty is not None and not args.repetition_penalty > 0:
        problems.append(f"--repetition_penalty: must be positive, got {args.repetition_penalty}")
    if not args.do_sample and (args.temperature is not None or args.top_p is not None):
        problems.append("--temperature / --top_p only apply with --do_sample")
    if args.model:
        try:
            from utils.models import pick_device_dtype

            pick_device_dtype(args.device)
        except (UserError, RuntimeError) as error:
            problems.append(f"--device: {error}")

    for run_dir in args.plot_run:
        if not os.path.isdir(run_dir):
            problems.append(f"--plot_run {run_dir}: folder not found")
        elif not find_event_dirs(run_dir):
            problems.append(f"--plot_run {run_dir}: no TensorBoard event files (events.out.tfevents.*) in it")
    if os.path.exists(args.out_dir) and not os.path.isdir(args.out_dir):
        problems.append(f"--out_dir {args.out_dir}: exists and is not a folder")
    return specs, roles, selected, problems


# ---------------------------------------------------------------- test questions


def question_key(split, role, question):
    return f"{split}\t{role}\t{question}"


def add_question(questions, index, split, role, question, instruction, references, history=None, ask=None):
    """Append a question, or merge the references of a repeated (split, role, question). A question
    of a conversation has the turns before it (`history`) and its own message (`ask`); its
    `question` text, which keys it, holds both."""
    key = question_key(split, role, question)
    if key in index:
        index[key]["references"].extend(r for r in references if r not in index[key]["references"])
        return
    index[key] = {"split": split, "role": role, "question": question, "instruction": instruction,
                  "references": list(references), **({"history": history, "ask": ask} if history else {})}
    questions.append(index[key])


def rolebench_rows(path):
    """Parsed rows of a file in RoleBench shape; a bad line is a UserError naming file and line."""
    return rolebench.read_rows(path)


def questions_from_data_dir(data_dir, roles, selected):
    """Test questions of the selected roles from the two RoleBench-zh test files, split kept."""
    questions, index = [], {}
    for kind in rolebench.KINDS:
        path = os.path.join(data_dir, rolebench.INPUT_FILES[(kind, "test")])
        for row in rolebench_rows(path):
            if row["role"] in selected:
                instruction = roles[row["role"]].system
                add_question(questions, index, kind, row["role"], row["question"], instruction, row["replies"])
    return questions


def conversation_question(row):
    """(system, earlier turns, last user message, last reply) of a conversation row (OpenAI messages
    or ShareGPT), the last reply being the reference; ValueError names the problem."""
    from utils.data import row_messages, system_of

    messages = row_messages(row)
    system = system_of(messages)
    turns = messages[1:] if system else messages
    last = max((i for i, m in enumerate(turns) if m["role"] == "assistant"), default=0)
    if last == 0 or turns[last - 1]["role"] != "user":
        raise ValueError("the conversation has no user message right before its last reply")
    return system, turns[: last - 1], turns[last - 1]["content"], turns[last]["content"]


def questions_from_test_file(path, selected):
    """Questions grouped from a data_helper.py test jsonl: one per (split, role, input), all outputs
    kept. A conversation row asks its last user message after the turns before it."""
    questions, index = [], {}
    for number, row in read_jsonl(path, rolebench.MAX_LINE_BYTES):
        try:
            if not isinstance(row, dict):
                raise ValueError("expected a JSON object")
            conversation = "messages" in row or "conversations" in row
            for field in ("role",) if conversation else ("instruction", "input", "output", "role"):
                if not isinstance(row.get(field), str) or not row[field].strip():
                    raise ValueError(f"field '{field}' must be a non-empty string")
            system, history, ask, reply = conversation_question(row) if conversation else (
                row["instruction"], [], row["input"], row["output"])
        except ValueError as error:
            raise UserError(f"{path}:{number}: {error}") from None
        split = row.get("split") if row.get("split") in SPLITS else "unknown"
        if selected is None or row["role"] in selected:
            text = "".join(f"{m['role']}: {m['content']}\n" for m in history) + ask
            add_question(questions, index, split, row["role"], text, system, [reply], history, ask)
    return questions


def limit_questions(questions, limit):
    """At most `limit` questions per split, round-robin over the roles (in order of appearance)."""
    if limit is None:
        return questions
    chosen = []
    for split in dict.fromkeys(q["split"] for q in questions):
        by_role = {}
        for q in questions:
            if q["split"] == split:
                by_role.setdefault(q["role"], []).append(q)
        picked, depth = [], 0
        while len(picked) < limit and any(depth < len(qs) for qs in by_role.values()):
            picked += [qs[depth] for qs in by_role.values() if depth < len(qs)][: limit - len(picked)]
            depth += 1
        chosen += picked
    return chosen


def prompt_digest(question):
    """Changes when the prompt or the references of a question change: such a saved result is redone."""
    text = json.dumps([question["instruction"], question["references"]], ensure_ascii=False)
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:12]


# ---------------------------------------------------------------- ROUGE-L


def char_tokens(text):
    """Characters, whitespace dropped, punctuation kept."""
    return [c for c in text if not c.isspace()]


def word_tokens(text):
    """jieba words (precise mode, HMM on), whitespace tokens dropped, punctuation kept."""
    import jieba

    if not getattr(word_tokens, "ready", False):
        jieba.setLogLevel(logging.WARNING)
        jieba.initialize()
        word_tokens.ready = True
    return [w for w in jieba.lcut(text) if w.strip()]


def lcs_length(a, b):
    """Length of the longest common subsequence of two token lists.

    Bit-parallel (Hyyro 2004): bit i of `v` tracks row i of the DP table over `a`; each token
    of `b` updates all rows at once with big-int arithmetic, O(len(b) * len(a) / 64).
    """
    if not a or not b:
        return 0
    masks = {}
    for i, token in enumerate(a):
        masks[token] = masks.get(token, 0) | (1 << i)
    full = (1 << len(a)) - 1
    v = full
    for token in b:
        u = v & masks.get(token, 0)
        v = ((v + u) | (v - u)) & full
    return len(a) - v.bit_count()


def rouge_l(candidate_tokens, reference_tokens):
    """ROUGE-L F1 (beta = 1): 2PR / (P + R) with P = LCS/len(candidate), R = LCS/len(reference).

    That equals 2 * LCS / (len(candidate) + len(reference)); 0.0 when either side is empty.
    """
    lcs = lcs_length(candidate_tokens, reference_tokens)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(candidate_tokens), lcs / len(reference_tokens)
    return 2 * precision * recall / (precision + recall)


def tokenize_references(question):
    """(word tokens, char tokens) of each reference, cached on the question."""
    if "_ref_tokens" not in question:
        question["_ref_tokens"] = [(word_tokens(r), char_tokens(r)) for r in question["references"]]
    return question["_ref_tokens"]


def score_answer(answer, question):
    """The four ROUGE-L F1 variants of one answer against the question's references."""
    refs = tokenize_references(question)
    words, chars = word_tokens(answer), char_tokens(answer)
    word = [rouge_l(words, ref_words) for ref_words, _ in refs]
    char = [rouge_l(chars, ref_chars) for _, ref_chars in refs]
    return {"word_first": word[0], "word_best": max(word), "char_first": char[0], "char_best": max(char)}


# ---------------------------------------------------------------- saved per-sample results


class ResultStore:
    """samples.jsonl: one JSON line per (model, question), appended and flushed as results come.

    On opening, a last line cut short by a crash (no newline, not valid JSON) is dropped from
    the file, so that new lines are not glued onto it. Later lines win over earlier ones.
    """

    def __init__(self, path):
        self.path = path
        self.records = {}
        if os.path.exists(path):
            self._load()
        self.file = open(path, "a", encoding="utf-8")

    def _load(self):
        with open(self.path, "rb") as f:
            data = f.read()
        keep = len(data) if data.endswith(b"\n") or not data else data.rfind(b"\n") + 1
        if keep < len(data):
            print(f"note: {self.path}: ignored a truncated last line", file=sys.stderr)
            with open(self.path, "r+b") as f:
                f.truncate(keep)
        for number, line in enumerate(data[:keep].decode("utf-8", errors="replace").splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                key = (record["model"], question_key(record["split"], record["role"], record["question"]))
            except (json.JSONDecodeError, KeyError, TypeError):
                raise UserError(f"{self.path}:{number}: not a result line; move the file away or use another "
                                f"--out_dir") from None
            self.records[key] = record

    def get(self, model, question, settings):
        """The saved result of `model` on `question`, if made with these settings and this prompt."""
        record = self.records.get((model, question_key(question["split"], question["role"], question["question"])))
        if record and record.get("settings") == settings and record.get("digest") == prompt_digest(question):
            return record
        return None

    def add(self, record):
        self.file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.file.flush()
        key = (record["model"], question_key(record["split"], record["role"], record["question"]))
        self.records[key] = record

    def close(self):
        self.file.close()


def run_settings(spec, args):
    """What a saved result must have been made with to be reused."""
    return {**spec.settings_key(), "max_new_tokens": args.max_new_tokens, "do_sample": args.do_sample,
            "temperature": args.temperature, "top_p": args.top_p,
            "repetition_penalty": args.repetition_penalty, "seed": args.seed if args.do_sample else None}


# ---------------------------------------------------------------- generation and perplexity


def generation_config_for(model, args):
    """The model's generation config with this run's decoding choices; greedy resets the sampling knobs."""
    import copy

    config = copy.deepcopy(model.generation_config)
    config.max_new_tokens = args.max_new_tokens
    config.do_sample = args.do_sample
    if args.do_sample:
        config.temperature = args.temperature if args.temperature is not None else config.temperature
        config.top_p = args.top_p if args.top_p is not None else config.top_p
    else:  # the library defaults, so that greedy decoding raises no warnings about unused flags
        config.temperature, config.top_p, config.top_k = 1.0, 1.0, 50
    if args.repetition_penalty is not None:
        config.repetition_penalty = args.repetition_penalty
    return config


def special_ids(model, tokenizer):
    eos = model.generation_config.eos_token_id
    eos = eos[0] if isinstance(eos, list) else eos
    eos = eos if eos is not None else tokenizer.eos_token_id
    pad = tokenizer.pad_token_id
    pad = pad if pad is not None else model.generation_config.pad_token_id
    return eos, (pad if pad is not None else 0)


def chat_messages(question):
    return [{"role": "system", "content": question["instruction"]}, *question.get("history", []),
            {"role": "user", "content": question.get("ask", question["question"])}]


def generate_answers(model, tokenizer, questions, config):
    """Answers to a batch of questions: left-padded prompts, one generate() call, cut at eos."""
    import torch

    from baichuan.generation_utils import build_chat_input

    eos, pad = special_ids(model, tokenizer)
    config.pad_token_id = pad
    max_length = model.config.model_max_length
    prompts = [build_chat_input(tokenizer, chat_messages(q), model.generation_config, max_length,
                                config.max_new_tokens) for q in questions]
    width = max(len(p) for p in prompts)
    input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=model.device)
    attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=model.device)
    with torch.inference_mode():
        output = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config)
    answers = []
    for row in output[:, width:].tolist():
        if eos in row:
            row = row[: row.index(eos)]
        answers.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    return answers


def reference_nll(model, tokenizer, question, batch_size):
    """(summed NLL, token count) of the question's reference replies (+ eos) after its chat prompt.

    The model's loss is the mean over the labelled positions of a batch, so it is weighted back
    by the batch's labelled-token count; summing over batches gives a token-weighted total.
    """
    import torch

    from baichuan.generation_utils import build_chat_input

    eos, pad = special_ids(model, tokenizer)
    max_length = model.config.model_max_length
    rows = []
    for reference in question["references"]:
        reply = (tokenizer.encode(reference, add_special_tokens=False) + [eos])[: max_length // 2]
        prompt = build_chat_input(tokenizer, chat_messages(question), model.generation_config, max_length, len(reply))
        rows.append((prompt + reply, [-100] * len(prompt) + reply))
    total, count = 0.0, 0
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        width = max(len(ids) for ids, _ in batch)
        input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in batch], device=model.device)
        labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in batch], device=model.device)
        attention_mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in batch],
                                      device=model.device)
        with torch.inference_mode():
            loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        labelled = int((labels[:, 1:] != -100).sum())
        total += float(loss) * labelled
        count += labelled
    return total, count


def evaluate_model(spec, questions, store, args):
    """Generate, score and save the questions this model has no saved result for."""
    settings = run_settings(spec, args)
    pending = [q for q in questions if store.get(spec.name, q, settings) is None]
    print(f"{spec.name}: {len(questions) - len(pending)} of {len(questions)} questions already done, "
          f"generating {len(pending)}", flush=True)
    if not pending:
        return
    import torch
    from tqdm import tqdm
    from transformers.utils import logging as hf_logging

    from utils.models import load_for_inference

    hf_logging.disable_progress_bar()
    model, tokenizer = load_for_inference(spec.path, spec.adapter, args.device, args.trust_remote_code)
    tokenizer.padding_side = "left"
    config = generation_config_for(model, args)
    torch.manual_seed(args.seed)
    with tqdm(total=len(pending), desc=spec.name, unit="q", file=sys.stderr, dynamic_ncols=True) as bar:
        for start in range(0, len(pending), args.batch_size):
            batch = pending[start : start + args.batch_size]
            for question, answer in zip(batch, generate_answers(model, tokenizer, batch, config)):
                nll, tokens = reference_nll(model, tokenizer, question, args.batch_size)
                store.add({"model": spec.name, "split": question["split"], "role": question["role"],
                           "question": question["question"], "answer": answer,
                           "scores": score_answer(answer, question), "ref_nll": nll, "ref_tokens": tokens,
                           "references": len(question["references"]), "settings": settings,
                           "digest": prompt_digest(question)})
                bar.update(1)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---------------------------------------------------------------- RoleGPT baseline


def load_baseline(paths):
    """(role, question without the leading "<role>，") -> the RoleGPT answer, from files in RoleGPT shape."""
    answers = {}
    for path in paths:
        for row in rolebench_rows(path):
            answers[(row["role"], row["question"])] = row["replies"][0]
    return answers


def baseline_records(questions, answers):
    """Scored records for the questions that have a RoleGPT answer."""
    records = []
    for q in questions:
        answer = answers.get((q["role"], q["question"]))
        if answer is not None:
            records.append({"model": BASELINE_NAME, "split": q["split"], "role": q["role"],
                            "question": q["question"], "answer": answer, "scores": score_answer(answer, q)})
    return records


# ---------------------------------------------------------------- aggregation


def summarize(records):
    """Mean ROUGE-L variants (and perplexity when present) of a list of records."""
    if not records:
        return None
    summary = {"questions": len(records)}
    for metric in METRICS:
        summary[metric] = sum(r["scores"][metric] for r in records) / len(records)
    tokens = sum(r.get("ref_tokens", 0) for r in records)
    summary["ppl"] = math.exp(sum(r["ref_nll"] for r in records) / tokens) if tokens else None
    summary["ref_tokens"] = tokens
    return summary


def aggregate(records, role_order):
    """{"overall", per split, "roles": {role: {"overall", per split}}} of one model's records."""
    def by_split(rows):
        result = {"overall": summarize(rows)}
        for split in dict.fromkeys(r["split"] for r in rows):
            result[split] = summarize([r for r in rows if r["split"] == split])
        return result

    result = by_split(records)
    present = {r["role"] for r in records}
    result["roles"] = {role: by_split([r for r in records if r["role"] == role])
                       for role in role_order if role in present}
    return result


# ---------------------------------------------------------------- report: files


def fmt(value, digits=4):
    return "–" if value is None else f"{value:.{digits}f}"


def table_columns(splits):
    columns = []
    for split in [*splits, "overall"]:
        label = SPLIT_LABELS.get(split, split) if split != "overall" else "all"
        columns += [(split, metric, f"{label} {metric.replace('_', ' ')}") for metric in METRICS]
    return columns + [("overall", "ppl", "ppl")]


def table_row(label, result, columns):
    cells = []
    for split, metric, _ in columns:
        summary = result.get(split)
        value = summary.get(metric) if summary else None
        cells.append(fmt(value, 2 if metric == "ppl" else 4))
    return f"| {label} | " + " | ".join(cells) + " |"


def decoding_text(generation):
    g = generation
    text = "greedy" if not g["do_sample"] else (
        f"sampling (temperature {g['temperature'] or 'of the model'}, top_p {g['top_p'] or 'of the model'}, "
        f"seed {g['seed']})")
    penalty = g["repetition_penalty"] if g["repetition_penalty"] is not None else "of the model"
    return f"{text}, max_new_tokens {g['max_new_tokens']}, repetition_penalty {penalty}"


def markdown_report(results, meta):
    splits = meta["splits"]
    columns = table_columns(splits)
    header = "| model | " + " | ".join(c[2] for c in columns) + " |"
    rule = "|---|" + "---:|" * len(columns)
    counts = ", ".join(f"{SPLIT_LABELS.get(s, s)} ({s}) {n}" for s, n in meta["questions_per_split"].items())
    lines = [
        "# RoleBench-zh evaluation",
        "",
        f"Test questions from {meta['source']}: {counts}; roles {', '.join(meta['roles'])}"
        + (f"; at most {meta['limit']} per split (--limit)" if meta["limit"] else "") + ".",
        f"Decoding: {decoding_text(meta['generation'])}.",
        "",
        "For reference, RoleLLM paper (arXiv 2310.00746), Table 4, Chinese, ROUGE-L "
        "(full test set, the paper's own tokenisation and reference choice: compare trends, not decimals):",
        "",
        "| paper model | CUS | RAW | SPE |",
        "|---|---:|---:|---:|",
        *(f"| {name} | {v['CUS']:.4f} | {v['RAW']:.4f} | {v['SPE']:.4f} |" for name, v in PAPER_TABLE4.items()),
        "",
        "## Results",
        "",
        "ROUGE-L F1 (beta = 1), mean over questions: *word* on jieba words, *char* on characters; *first* against "
        "the first reference, *best* against the best-matching of all references. CUS = general questions "
        "answered in role style, SPE = role-specific knowledge questions, all = every question. "
        "RAW is not measured: RoleBench-zh does not ship raw answers. ppl = perplexity of the reference "
        "replies (+ eos) given the chat prompt, token-weighted (lower is better).",
        "",
        header,
        rule,
        *(table_row(name, result, columns) for name, result in results.items()),
        "",
    ]
    for name, note in meta["notes"].items():
        lines.append(f"- {name}: {note}")
    lines += ["", "## Per role", "", "| model / role | " + " | ".join(c[2] for c in columns) + " |", rule]
    for name, result in results.items():
        lines += [table_row(f"{name} / {role}", role_result, columns) for role, role_result in result["roles"].items()]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- report: plots


def setup_matplotlib():
    """Agg backend and a CJK font when one is installed; returns True when Chinese text can be drawn."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import font_manager

    logging.getLogger("matplotlib.font_manager").setLevel(logging.ERROR)  # "findfont: ... weight" chatter

    names = {f.name for f in font_manager.fontManager.ttflist}
    for name in CJK_FONTS:
        if name in names:
            matplotlib.rcParams["font.sans-serif"] = [name, *matplotlib.rcParams["font.sans-serif"]]
            matplotlib.rcParams["font.family"] = "sans-serif"
            matplotlib.rcParams["axes.unicode_minus"] = False
            return True
    return False


def figure_png(fig):
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def comparison_png(results, splits):
    """Grouped bars: the four ROUGE-L variants and ppl, per split, one bar per model."""
    chinese = setup_matplotlib()
    import matplotlib.pyplot as plt

    split_names = {"general": "CUS 通用" if chinese else "CUS", "role_specific": "SPE 角色知识" if chinese else "SPE",
                   "overall": "总体" if chinese else "all"}
    groups = [*splits, "overall"]
    titles = {"word_first": ("ROUGE-L 词 · 首个参考", "ROUGE-L words, first ref"),
              "word_best": ("ROUGE-L 词 · 最佳参考", "ROUGE-L words, best ref"),
              "char_first": ("ROUGE-L 字 · 首个参考", "ROUGE-L chars, first ref"),
              "char_best": ("ROUGE-L 字 · 最佳参考", "ROUGE-L chars, best ref"),
              "ppl": ("参考回复困惑度 (越低越好)", "reference ppl (lower is better)")}
    fig, axes = plt.subplots(2, 3, figsize=(15, 8), layout="constrained")
    panels = {"word_first": axes[0][0], "word_best": axes[0][1], "ppl": axes[0][2],
              "char_first": axes[1][0], "char_best": axes[1][1]}
    for metric, ax in panels.items():
        names = [n for n in results if metric != "ppl" or results[n]["overall"].get("ppl") is not None]
        width = 0.8 / max(len(names), 1)
        for i, name in enumerate(names):
            values = [(results[name].get(g) or {}).get(metric) for g in groups]
            xs = [j + (i - (len(names) - 1) / 2) * width for j in range(len(groups))]
            bars = ax.bar(xs, [v if v is not None else 0 for v in values], width, label=name,
                          color=f"C{list(results).index(name)}")
            for bar, value in zip(bars, values):
                if value is not None:
                    ax.annotate(f"{value:.3g}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                                ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(groups)), [split_names.get(g, g) for g in groups])
        ax.set_title(titles[metric][0 if chinese else 1])
        if metric != "ppl":
            ax.set_ylim(0, 1)
    panels["word_first"].legend(fontsize=8)
    paper = axes[1][2]
    paper.axis("off")
    text = ["RoleLLM 论文 表4 (中文, ROUGE-L)" if chinese else "RoleLLM paper, Table 4 (Chinese, ROUGE-L)",
            "", "CUS / RAW / SPE"]
    text += [f"{name}: {v['CUS']:.4f} / {v['RAW']:.4f} / {v['SPE']:.4f}" for name, v in PAPER_TABLE4.items()]
    paper.text(0, 0.9, "\n".join(text), va="top", fontsize=10, family=plt.rcParams["font.sans-serif"][0])
    return figure_png(fig)


def read_curves(run_dirs):
    """{series label: {tag: [(step, value), ...]}} from the event files under each run folder."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    series = {}
    for run_dir in run_dirs:
        for folder in find_event_dirs(run_dir):
            label = os.path.normpath(os.path.join(os.path.basename(os.path.normpath(run_dir)),
                                                  os.path.relpath(folder, run_dir)))
            accumulator = EventAccumulator(folder, size_guidance={"scalars": 0})
            accumulator.Reload()
            tags = accumulator.Tags().get("scalars", [])
            curves = {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)] for tag in CURVE_PANELS if tag in tags}
            if curves:
                series[label] = curves
    if not any(tag in curves for curves in series.values() for tag in ("train_loss", "ppl")):
        raise UserError(f"--plot_run: no train_loss or ppl scalars in the event files under {', '.join(run_dirs)}")
    return series


def curves_png(series):
    """Panels loss (train_loss, eval_loss), ppl, lr, tokens_per_s, as logged; one line per run and tag."""
    chinese = setup_matplotlib()
    import matplotlib.pyplot as plt

    titles = {"loss": ("损失", "loss"), "ppl": ("困惑度 ppl (测试集)", "perplexity (test set)"),
              "lr": ("学习率", "learning rate"), "tokens_per_s": ("吞吐 (token/s)", "tokens per second")}
    logged = {tag for curves in series.values() for tag in curves}
    panels = list(dict.fromkeys(panel for tag, panel in CURVE_PANELS.items() if tag in logged))
    cols = min(len(panels), 2)
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(7 * cols, 4 * rows), squeeze=False, layout="constrained")
    flat = [a for row in axes for a in row]
    for ax, panel in zip(flat, panels):
        tags = [t for t, p in CURVE_PANELS.items() if p == panel and t in logged]
        for color, (label, curves) in enumerate(series.items()):  # one colour per run, eval dashed
            for tag in tags:
                if tag in curves:
                    steps, values = zip(*sorted(curves[tag]))
                    ax.plot(steps, values, color=f"C{color}", linestyle="--" if tag == "eval_loss" else "-",
                            label=label if len(tags) == 1 else f"{label} {tag}",
                            marker="." if len(steps) < 30 else None)
        if panel == "ppl" and all(v > 0 for c in series.values() for _, v in c.get("ppl", [])):
            ax.set_yscale("log")
        ax.set_title(titles[panel][0 if chinese else 1])
        ax.set_xlabel("步数 (step)" if chinese else "step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in flat[len(panels):]:
        ax.axis("off")
    return figure_png(fig)


# ---------------------------------------------------------------- main


def load_questions(args, roles, selected):
    try:
        if args.test_file is not None:
            questions = questions_from_test_file(args.test_file, selected)
        else:
            questions = questions_from_data_dir(args.data_dir, roles, selected)
    except UserError as error:
        raise UserError(str(error)) from None
    questions = limit_questions(questions, args.limit)
    if not questions:
        raise UserError(f"no test questions for roles {', '.join(selected or ['(any)'])}")
    return questions


def baseline_paths(args):
    if args.no_baseline:
        return []
    if args.baseline_file:
        return args.baseline_file
    return [p for p in DEFAULT_BASELINE_FILES if os.path.isfile(p)]


def run_models(args, specs, questions, role_order):
    """Generate for every model (resuming from samples.jsonl); {name: aggregated result}."""
    store = ResultStore(os.path.join(args.out_dir, SAMPLES_FILE))
    try:
        for spec in specs:
            evaluate_model(spec, questions, store, args)
    finally:
        store.close()
    results = {}
    for spec in specs:
        records = [store.get(spec.name, q, run_settings(spec, args)) for q in questions]
        results[spec.name] = {"kind": "model", "path": spec.path, "adapter": spec.adapter,
                              **aggregate(records, role_order)}
    return results


def run_baseline(args, questions, role_order):
    """(aggregated RoleGPT result, note) or (None, None) when there are no baseline answers to score."""
    paths = baseline_paths(args)
    if not paths:
        return None, None
    try:
        records = baseline_records(questions, load_baseline(paths))
    except UserError as error:
        raise UserError(str(error)) from None
    if not records:
        print(f"note: none of the {len(questions)} test questions is in the baseline files; no {BASELINE_NAME} row",
              file=sys.stderr)
        return None, None
    note = (f"GPT-4 answers shipped with RoleBench, found for {len(records)} of {len(questions)} questions; "
            f"no perplexity (no model).")
    return {"kind": "baseline", "files": paths, **aggregate(records, role_order)}, note


def report_meta(args, questions, splits, role_order, notes):
    decoding = {k: getattr(args, k) for k in ("max_new_tokens", "do_sample", "temperature", "top_p",
                                              "repetition_penalty", "seed")}
    return {"source": args.test_file or args.data_dir, "limit": args.limit, "splits": splits,
            "roles": [r for r in role_order if any(q["role"] == r for q in questions)],
            "questions_per_split": {s: sum(q["split"] == s for q in questions) for s in splits},
            "split_labels": {s: SPLIT_LABELS[s] for s in splits}, "notes": notes, "generation": decoding,
            "rouge_l": "F1 with beta=1 (2PR/(P+R)) on jieba words and on characters; mean over questions",
            "ppl": "exp(token-weighted mean NLL of the reference replies + eos given the chat prompt)",
            "paper_table4_rouge_l": PAPER_TABLE4}


def write_report(out_dir, results, meta):
    write_atomic(os.path.join(out_dir, "results.json"),
                 json.dumps({"meta": meta, "models": results}, ensure_ascii=False, indent=2) + "\n")
    write_atomic(os.path.join(out_dir, "results.md"), markdown_report(results, meta))
    write_atomic(os.path.join(out_dir, "results.png"), comparison_png(results, meta["splits"]))
    columns = table_columns(meta["splits"])
    print("| model | " + " | ".join(c[2] for c in columns) + " |\n|---|" + "---:|" * len(columns))
    for name, result in results.items():
        print(table_row(name, result, columns))


def evaluate(args, specs, roles, selected):
    """Run the models and the baseline over the test questions, then write the report."""
    questions = load_questions(args, roles, selected)
    splits = [s for s in (*SPLITS, "unknown") if any(q["split"] == s for q in questions)]
    role_order = selected or list(dict.fromkeys(q["role"] for q in questions))
    results = run_models(args, specs, questions, role_order) if specs else {}
    baseline, note = run_baseline(args, questions, role_order)
    if baseline is not None:
        results[BASELINE_NAME] = baseline
    if not results:
        raise UserError(f"nothing to report: no {BASELINE_NAME} answer matches the test questions")
    write_report(args.out_dir, results, report_meta(args, questions, splits, role_order,
                                                    {BASELINE_NAME: note} if note else {}))
    written = ["results.json", "results.md", "results.png"] + ([SAMPLES_FILE] if specs else [])
    print(f"wrote {', '.join(written)} to {args.out_dir}")


def main(argv=None):
    args = parse_args(argv)
    specs, roles, selected, problems = validate_args(args)
    if problems:
        raise UserError("\nerror: ".join(problems))
    os.makedirs(args.out_dir, exist_ok=True)
    quiet_third_party()
    if args.model or args.baseline_only:
        evaluate(args, specs, roles, selected)
    if args.plot_run:
        write_atomic(os.path.join(args.out_dir, "training_curves.png"), curves_png(read_curves(args.plot_run)))
        print(f"wrote {os.path.join(args.out_dir, 'training_curves.png')}")


def cli():
    try:
        exit_on_user_error(main)
    except KeyboardInterrupt:
        print(f"\ninterrupted: finished answers are saved in {SAMPLES_FILE}; run the same command again to resume",
              file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    cli()
