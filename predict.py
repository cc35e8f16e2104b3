"""Chat with a fine-tuned Baichuan2 role-play model from the command line.

Usage (from the repository root):

    # one question, one answer (streamed to stdout)
    python predict.py --model_path runs/roleplay-merged --role 李白 "你最喜欢哪首诗？"

    # a base model plus a LoRA adapter
    python predict.py --model_path baichuan-inc/Baichuan2-7B-Chat --adapter runs/roleplay/epoch-1-step-501 \
        --role 张飞 "你平时喜欢做什么？"

    # no question: an interactive multi-turn chat on stdin
    python predict.py --model_path runs/roleplay-merged --role 孙悟空

Interactive commands: `/clear` starts the conversation over, `/role NAME` switches role (and
starts over), `/exit` or end of input (Ctrl-D) quits. Earlier turns go into the prompt; when the
context is full the oldest whole rounds are dropped (baichuan.generation_utils.build_chat_input).

This module also holds the generation helpers that web_demo.py shares: the system prompt of a
role, the sampling settings, and the streamed reply.

Errors (missing model directory, bad adapter, bad roles file, unknown role, bad setting) print
one line `error: ...` on stderr and exit with status 1.
"""

import argparse
import os
import sys
import threading
from collections.abc import Iterator

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from baichuan.generation_utils import stream_chat
from data_helper import DataError, build_system_prompt, load_roles
from utils import UserError, exit_on_user_error, load_for_inference, quiet_third_party

# next to this file, so that the scripts work from any directory
DEFAULT_ROLES_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "roles.json")
DEFAULT_ROLE = "孙悟空"


# ---------------------------------------------------------------- shared with web_demo.py


def load_roles_file(path: str) -> dict[str, str]:
    """Role name -> description; a bad file is a UserError (one line, no traceback)."""
    try:
        return load_roles(path)
    except DataError as error:
        raise UserError(str(error)) from None


def check_role(roles: dict[str, str], role) -> str:
    if not isinstance(role, str) or role not in roles:
        raise UserError(f"unknown role {role!r}; choose one of: {', '.join(roles)}")
    return role


def check_max_new_tokens(max_new_tokens, limit: int | None = None) -> None:
    top = limit or float("inf")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int | float) \
            or not 1 <= max_new_tokens <= top or max_new_tokens % 1:
        bound = f" and {limit}" if limit else ""
        raise UserError(f"max_new_tokens must be a whole number between 1{bound}, got {max_new_tokens!r}")


def check_top_p(top_p) -> None:
    if isinstance(top_p, bool) or not isinstance(top_p, int | float) or not 0 < top_p <= 1:
        raise UserError(f"top_p must be in (0, 1], got {top_p!r}")


def check_temperature(temperature) -> None:
    if isinstance(temperature, bool) or not isinstance(temperature, int | float) or not 0 <= temperature <= 2:
        raise UserError(f"temperature must be in [0, 2] (0 = greedy), got {temperature!r}")


def check_settings(max_new_tokens, top_p, temperature, max_new_tokens_limit: int | None = None) -> None:
    """Refuse settings that generate() would reject with an obscure message, or misuse."""
    check_max_new_tokens(max_new_tokens, max_new_tokens_limit)
    check_top_p(top_p)
    check_temperature(temperature)


def sampling_kwargs(top_p: float, temperature: float, greedy: bool = False) -> dict:
    """generate() keyword arguments; temperature 0 means greedy, as in most chat UIs."""
    if greedy or temperature == 0:
        return {"do_sample": False}
    return {"do_sample": True, "top_p": float(top_p), "temperature": float(temperature)}


def role_messages(roles: dict[str, str], role: str, history: list[dict]) -> list[dict]:
    """The system prompt of `role` followed by the conversation (user/assistant dicts)."""
    system = build_system_prompt(role, roles[role])
    return [{"role": "system", "content": system}, *history]


class _StopOnEvent(StoppingCriteria):
    """Ends generation once `event` is set (a closed web request)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


def reply_stream(
    model,
    tokenizer,
    messages: list[dict],
    max_new_tokens: int,
    top_p: float,
    temperature: float,
    greedy: bool = False,
    stop: threading.Event | None = None,
) -> Iterator[str]:
    """The reply to `messages` as it grows. Setting `stop` ends the generation thread early,
    so an abandoned request does not keep the model busy behind the queue's back."""
    extra = {}
    if stop is not None:
        extra["stopping_criteria"] = StoppingCriteriaList([_StopOnEvent(stop)])
    try:
        yield from stream_chat(
            model,
            tokenizer,
            messages,
            max_new_tokens=int(max_new_tokens),
            **sampling_kwargs(top_p, temperature, greedy),
            **extra,
        )
    except ValueError as error:  # build_chat_input: the prompt leaves no room for the reply
        raise UserError(str(error)) from None


# ---------------------------------------------------------------- command line


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """The model flags that predict.py and web_demo.py share."""
    group = parser.add_argument_group("model")
    group.add_argument("--model_path", required=True, help="merged model directory, or the base model with --adapter")
    group.add_argument("--adapter", help="LoRA adapter directory (a training checkpoint) to put on --model_path")
    group.add_argument("--device", default="auto", help="auto (CUDA if present, else CPU), cpu, cuda or cuda:N")
    group.add_argument(
        "--trust_remote_code", action="store_true",
        help="let transformers run code shipped in the model directory (off unless asked)")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("question", nargs="?", help="ask this one question and exit; without it, chat on stdin")

    add_model_args(parser)

    group = parser.add_argument_group("role")
    group.add_argument("--role", default=DEFAULT_ROLE, help="who the model plays (default: %(default)s)")
    group.add_argument("--roles_file", default=DEFAULT_ROLES_FILE,
                       help="JSON object role name -> description (default: data/roles.json)")

    group = parser.add_argument_group("generation")
    group.add_argument("--max_new_tokens", type=int, default=512, help="longest reply in tokens (default: %(default)s)")
    group.add_argument("--top_p", type=float, default=0.8, help="nucleus sampling mass (default: %(default)s)")
    group.add_argument("--temperature", type=float, default=0.8,
                       help="sampling temperature, 0 = greedy (default: %(default)s)")
    group.add_argument("--greedy", action="store_true", help="always pick the likeliest token (ignores top_p, temperature)")
    return parser.parse_args(argv)


def answer(model, tokenizer, messages: list[dict], args, out=sys.stdout) -> str:
    """Stream one reply to `out` and return it."""
    printed = ""
    for reply in reply_stream(model, tokenizer, messages, args.max_new_tokens, args.top_p, args.temperature,
                              args.greedy):
        # stream_chat yields the whole reply so far; print only what is new
        out.write(reply[len(printed):])
        out.flush()
        printed = reply
    out.write("\n")
    out.flush()
    return printed


def read_line(prompt: str) -> str | None:
    """One line of input, or None at end of input. The prompt only shows on a terminal."""
    try:
        return input(prompt if sys.stdin.isatty() else "")
    except EOFError:
        return None


def interactive(model, tokenizer, roles: dict[str, str], role: str, args) -> None:
    print(f"chatting with {role}; /clear starts over, /role NAME switches, /exit quits", file=sys.stderr)
    history: list[dict] = []
    while (line := read_line("你> ")) is not None:
        line = line.strip()
        if not line:
            continue
        if line == "/exit":
            break
        if line == "/clear":
            history = []
            print("(conversation cleared)", file=sys.stderr)
            continue
        if line.startswith("/role"):
            name = line[len("/role"):].strip()
            if name not in roles:
                # a typo here should not end the session, only be reported
                print(f"error: unknown role {name!r}; choose one of: {', '.join(roles)}", file=sys.stderr)
            else:
                role, history = name, []
                print(f"(now chatting with {role}; conversation cleared)", file=sys.stderr)
            continue
        history.append({"role": "user", "content": line})
        sys.stdout.write(f"{role}> ")
        reply = answer(model, tokenizer, role_messages(roles, role, history), args)
        history.append({"role": "assistant", "content": reply})


def main(argv=None) -> None:
    args = parse_args(argv)
    quiet_third_party()
    check_settings(args.max_new_tokens, args.top_p, args.temperature)
    roles = load_roles_file(args.roles_file)
    role = check_role(roles, args.role)
    if args.question is not None and not args.question.strip():
        raise UserError("the question is empty")
    model, tokenizer = load_for_inference(args.model_path, args.adapter, args.device, args.trust_remote_code)
    if args.question is not None:
        answer(model, tokenizer, role_messages(roles, role, [{"role": "user", "content": args.question}]), args)
    else:
        interactive(model, tokenizer, roles, role, args)


if __name__ == "__main__":
    try:
        exit_on_user_error(main)
    except KeyboardInterrupt:
        sys.exit(130)
