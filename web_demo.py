"""Web page to chat with a fine-tuned Baichuan2 role-play model (Gradio).

Launch (from the repository root):

    # a merged model directory
    python web_demo.py --model_path runs/roleplay-merged

    # a base model plus a LoRA adapter (a training checkpoint)
    python web_demo.py --model_path baichuan-inc/Baichuan2-7B-Chat --adapter runs/roleplay/epoch-1-step-501

    # try the page without real weights: a tiny random model (it answers gibberish)
    python -m baichuan.tiny --out runs/tiny --corpus data/sample/rolebench-zh_general_train.jsonl
    python web_demo.py --model_path runs/tiny

    # reachable from other machines (opt-in; there is no login, so only on a trusted network)
    python web_demo.py --model_path runs/roleplay-merged --host 0.0.0.0

then open http://127.0.0.1:9090. The page listens on 127.0.0.1 only and makes no public share
link unless `--host` / `--share` ask for it.

The page: pick a role (switching role starts a new conversation), type a message, and the reply
streams in token by token. Earlier turns go into the prompt; when the context is full the oldest
whole rounds are dropped. The sliders are the settings generation uses (temperature 0 = greedy).

At most `--concurrency` replies are generated at once and `--max_queue` more wait in line;
beyond that Gradio turns requests away and the page shows "This application is currently busy.
Please try again." (API clients get gradio_client's QueueError "Queue is full! Please try again.").

API (gradio_client), the same endpoint the page uses:

    from gradio_client import Client
    client = Client("http://127.0.0.1:9090")
    job = client.submit("你好", [], "张飞", 128, 0.8, 0.8, api_name="/chat")
    for text_box, history in job:   # history grows as the reply streams
        ...
    # history: [{"role": "user", "content": [{"type": "text", "text": "你好"}]}, {"role": "assistant", ...}]
    # pass it back as the second argument for the next turn

An empty or too long message, an unknown role or a bad setting is refused before it joins the
queue: gradio_client raises ValidationError with the reason, the page shows it by the input.
"""

import argparse
import logging
import threading

import gradio as gr

from predict import (
    add_model_args,
    DEFAULT_ROLE,
    DEFAULT_ROLES_FILE,
    check_max_new_tokens,
    check_role,
    check_settings,
    check_temperature,
    check_top_p,
    load_roles_file,
    reply_stream,
    role_messages,
)
from utils import UserError, exit_on_user_error, load_for_inference, quiet_third_party

logger = logging.getLogger("web_demo")

EMPTY_REPLY = "（没有生成内容 / the model produced no text）"


def content_text(content) -> str:
    """Chat message content as plain text.

    Gradio 6 hands a message's content back either as a string or as a list of blocks
    {"type": "text", "text": ...}; files and other components carry no text for the prompt.
    """
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        content = [content]
    if isinstance(content, list):
        return "".join(
            block.get("text", "") for block in content if isinstance(block, dict) and block.get("type") == "text"
        )
    return ""


def refuse(error: UserError) -> gr.Error:
    """A bad request, shown to the user; no traceback in the server log, as nothing broke."""
    return gr.Error(str(error), print_exception=False)


class RolePlayChat:
    """The page's handlers, kept apart from the layout so that tests can call them directly."""

    def __init__(self, model, tokenizer, roles: dict[str, str], max_message_chars: int = 2000):
        self.model = model
        self.tokenizer = tokenizer
        self.roles = roles
        self.max_message_chars = max_message_chars
        self.model_max_length = model.config.model_max_length
        # room for a prompt: a reply may use at most half of the context
        self.max_new_tokens_limit = max(1, self.model_max_length // 2)

    # ------------------------------------------------------------ checks

    def check_message(self, text: str) -> None:
        if not text.strip():
            raise UserError("the message is empty: type something first")
        if len(text) > self.max_message_chars:
            raise UserError(
                f"the message is too long ({len(text)} characters; at most {self.max_message_chars}): shorten it"
            )

    def clean_history(self, history) -> list[dict]:
        """The conversation as {"role", "content": str} dicts, checked, and cut to what can matter.

        History comes from the browser or an API client, so it is checked like any input. Only
        the newest messages that could fit in the context are kept (a token covers at most 16
        characters with Baichuan2's tokenizer), so a huge history costs no tokenizing time.
        """
        if history is None:
            history = []
        if not isinstance(history, list):
            raise UserError("the history must be a list of {role, content} messages")
        messages = []
        for message in history:
            if not isinstance(message, dict) or message.get("role") not in ("user", "assistant"):
                raise UserError("the history may only hold messages with role 'user' or 'assistant'")
            messages.append({"role": message["role"], "content": content_text(message.get("content"))})
        budget = 16 * self.model_max_length
        kept, total = [], 0
        for message in reversed(messages):
            total += len(message["content"])
            if kept and total > budget:
                break
            kept.insert(0, message)
        while len(kept) > 1 and kept[0]["role"] != "user":  # start on a whole round
            kept.pop(0)
        return kept

    def validate(self, message, history, role, max_new_tokens, top_p, temperature) -> list[dict]:
        """Gradio validator of chat(): runs before a request joins the queue, so bad input never
        waits in line. The page shows each problem next to its input without touching the chat;
        gradio_client raises ValidationError with the reasons."""

        def verdict(check, *args):
            try:
                check(*args)
            except UserError as error:
                return gr.validate(False, str(error))
            return gr.validate(True, "")

        return [
            verdict(self.check_message, message if isinstance(message, str) else ""),
            verdict(self.clean_history, history),
            verdict(check_role, self.roles, role),
            verdict(check_max_new_tokens, max_new_tokens, self.max_new_tokens_limit),
            verdict(check_top_p, top_p),
            verdict(check_temperature, temperature),
        ]

    # ------------------------------------------------------------ handlers

    def chat(self, message: str, history, role: str, max_new_tokens, top_p, temperature):
        """One turn: show the message, then stream the reply into the chat. Yields (text box, chat).

        validate() has refused bad input already; the checks are repeated here for callers that
        bypass it (tests, other Blocks), and raise gr.Error before anything changes.
        """
        try:
            check_role(self.roles, role)
            check_settings(max_new_tokens, top_p, temperature, self.max_new_tokens_limit)
            self.check_message(message if isinstance(message, str) else "")
            history = self.clean_history(history)
        except UserError as error:
            raise refuse(error) from None
        history.append({"role": "user", "content": message})
        messages = role_messages(self.roles, role, history)
        reply = ""
        yield "", [*history, {"role": "assistant", "content": reply}]
        stop = threading.Event()
        try:
            for reply in reply_stream(self.model, self.tokenizer, messages, max_new_tokens, top_p, temperature,
                                      stop=stop):
                # the text box is left alone while streaming: the user may be typing the next message
                yield gr.skip(), [*history, {"role": "assistant", "content": reply}]
        except UserError as error:
            raise refuse(error) from None
        except Exception as error:
            # show the failure in the page instead of a bare "Error" badge
            logger.exception("generation failed")
            raise gr.Error(f"generation failed: {type(error).__name__}: {error}", print_exception=False) from None
        finally:
            # Clear, a new role or a closed tab cancels this generator: stop the model thread too
            stop.set()
        if not reply.strip():
            yield gr.skip(), [*history, {"role": "assistant", "content": EMPTY_REPLY}]


def build_demo(
    model,
    tokenizer,
    roles: dict[str, str],
    default_role: str | None = None,
    max_new_tokens: int = 512,
    top_p: float = 0.8,
    temperature: float = 0.8,
    max_message_chars: int = 2000,
    concurrency: int = 1,
    max_queue: int = 16,
) -> gr.Blocks:
    """The chat page for one loaded model, with its queue set up; launch it with demo.launch()."""
    chat = RolePlayChat(model, tokenizer, roles, max_message_chars)
    default_role = check_role(roles, default_role or (DEFAULT_ROLE if DEFAULT_ROLE in roles else next(iter(roles))))
    check_settings(max_new_tokens, top_p, temperature)

    # analytics off: a local demo should not report its use to Gradio's servers
    with gr.Blocks(title="Baichuan2 角色扮演 role-play", analytics_enabled=False) as demo:
        gr.Markdown("## Baichuan2 角色扮演 · role-play chat")
        with gr.Row():
            with gr.Column(scale=4):
                # sanitize_html strips scripts and event handlers; allow_tags=False also drops
                # custom tags, so neither a message nor a model reply can inject markup
                chatbot = gr.Chatbot(
                    label="对话 Chat", elem_id="chatbot", height=480, sanitize_html=True, allow_tags=False,
                    buttons=["copy", "copy_all"], feedback_options=None,
                )
                msg = gr.Textbox(
                    label="消息 Message", elem_id="message", lines=1, max_lines=6,
                    placeholder="输入消息，按 Enter 发送 (type a message, Enter sends)",
                )
                with gr.Row():
                    submit = gr.Button("发送 Submit", variant="primary", elem_id="submit")
                    clear = gr.Button("清空 Clear", elem_id="clear")
            with gr.Column(scale=1):
                role = gr.Radio(list(roles), value=default_role, label="角色 Role (switching starts a new chat)",
                                elem_id="role")
                limit = chat.max_new_tokens_limit
                new_tokens = gr.Slider(1, limit, value=min(max_new_tokens, limit), step=1,
                                       label="max new tokens", elem_id="max_new_tokens")
                nucleus = gr.Slider(0.05, 1.0, value=top_p, step=0.05, label="top_p", elem_id="top_p")
                heat = gr.Slider(0.0, 2.0, value=temperature, step=0.05, label="temperature (0 = greedy)",
                                 elem_id="temperature")

        # Enter and Submit run the same queued, streaming handler (api_name "chat" for clients);
        # its progress and errors show on the chat only, never hiding the message being typed.
        # A request beyond the queue bound is turned away by Gradio with "This application is
        # currently busy. Please try again."; the message stays in the box to be sent again.
        turn = gr.on([msg.submit, submit.click], chat.chat, [msg, chatbot, role, new_tokens, nucleus, heat],
                     [msg, chatbot], api_name="chat", validator=chat.validate, preprocess=False,
                     show_progress_on=chatbot)
        # Clear (the button or the chat's trash icon) and a new role start over, keeping a draft
        # message on a role switch; all of them stop a reply still streaming
        clear.click(lambda: ([], ""), None, [chatbot, msg], queue=False, cancels=[turn], api_visibility="private")
        chatbot.clear(lambda: None, None, None, queue=False, cancels=[turn], api_visibility="private")
        role.change(lambda: [], None, chatbot, queue=False, cancels=[turn], api_visibility="private")

    demo.queue(max_size=max_queue, default_concurrency_limit=concurrency)
    return demo


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)

    add_model_args(parser)

    group = parser.add_argument_group("roles")
    group.add_argument("--roles_file", default=DEFAULT_ROLES_FILE,
                       help="JSON object role name -> description (default: data/roles.json)")
    group.add_argument("--default_role", help=f"role selected when the page opens (default: {DEFAULT_ROLE})")

    group = parser.add_argument_group("generation (the sliders' starting values)")
    group.add_argument("--max_new_tokens", type=int, default=512, help="longest reply in tokens (default: %(default)s)")
    group.add_argument("--top_p", type=float, default=0.8, help="nucleus sampling mass (default: %(default)s)")
    group.add_argument("--temperature", type=float, default=0.8,
                       help="sampling temperature, 0 = greedy (default: %(default)s)")
    group.add_argument("--max_message_chars", type=int, default=2000,
                       help="longer messages are refused (default: %(default)s)")

    group = parser.add_argument_group("server")
    group.add_argument("--host", default="127.0.0.1",
                       help="address to listen on; 0.0.0.0 opens the page to the network (default: %(default)s)")
    group.add_argument("--port", type=int, default=9090, help="port to listen on (default: %(default)s)")
    group.add_argument("--share", action="store_true",
                       help="also make a public gradio.live link (off unless asked: anyone with the link can use it)")
    group.add_argument("--concurrency", type=int, default=1,
                       help="replies generated at the same time (default: %(default)s)")
    group.add_argument("--max_queue", type=int, default=16,
                       help="requests waiting in line; more are told the page is busy (default: %(default)s)")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    quiet_third_party()
    for name in ("max_message_chars", "concurrency", "max_queue"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be at least 1, got {getattr(args, name)}")
    check_settings(args.max_new_tokens, args.top_p, args.temperature)
    roles = load_roles_file(args.roles_file)
    if args.default_role is not None:
        check_role(roles, args.default_role)
    model, tokenizer = load_for_inference(args.model_path, args.adapter, args.device, args.trust_remote_code)
    demo = build_demo(
        model, tokenizer, roles, args.default_role, args.max_new_tokens, args.top_p, args.temperature,
        args.max_message_chars, args.concurrency, args.max_queue,
    )
    try:
        demo.launch(server_name=args.host, server_port=args.port, share=args.share)
    except OSError as error:  # e.g. the port is taken
        raise UserError(f"cannot serve on {args.host}:{args.port}: {error}") from None


if __name__ == "__main__":
    exit_on_user_error(main)
