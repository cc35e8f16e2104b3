"""A web page and an OpenAI-compatible API to chat with a fine-tuned Baichuan2 role-play model.

A merged model directory:
    python web_demo.py --model_path runs/roleplay-merged
A base model plus a LoRA adapter (a training checkpoint), the base in 4 bits (about 5-6 GB of GPU memory for 7B):
    python web_demo.py --model_path baichuan-inc/Baichuan2-7B-Chat --adapter runs/roleplay/epoch-1-step-501 \\
        --quantization_bit 4
The API alone, open to the network, with a key:
    ROLEPLAY_API_KEY=... python web_demo.py --model_path runs/roleplay-merged --api_only --host 0.0.0.0
Try the page on the quickstart's tiny model (short, rough replies, in the roles' voices):
    bash scripts/quickstart.sh && python web_demo.py --model_path runs/quickstart/merged

then open http://127.0.0.1:9090, or point an OpenAI client (SillyTavern, Open WebUI, `openai`) at
http://127.0.0.1:9090/v1 (utils/api.py says what it honours). The server listens on 127.0.0.1 only
and makes no share link unless `--host` / `--share` ask for it; those need a key (`--api_key` or
$ROLEPLAY_API_KEY), or `--no_api_key` to go without one knowingly.

The radio offers the roles the model was trained on, with their trained system prompts (the
model's roleplay.json; --roles_file plays other roles, from a roles file or character cards). A
role with a greeting (a card's first_mes) opens the chat with it, and it stays in the prompt as
the first assistant turn. Switching role starts a new conversation.
Group mode: pick two or three roles under "group" and they share one scene. After each user message
every member answers once, each reply streamed and labelled with its speaker: first the members the
message names, in the order it names them, then the others in the group's order. Each reply comes
from its own prompt, the speaker's seat of the scene so far as data_helper.py trains group scenes
(ChatEngine.scene_prompt). The members' greetings open the scene, as SillyTavern opens a group chat.
A member added joins the scene as it is; a group the scene no longer fits (a member who spoke left)
starts a new one. Fewer than two roles is the one-on-one chat of the radio's role.
The reply streams in token by token; Stop ends it where it is, Clear ends it and empties the chat.
Submit is disabled while a reply runs (a message typed meanwhile waits in the box). Earlier turns go
into the prompt; when the context is full the oldest whole rounds are dropped. A conversation of
more than --max_messages messages is refused: start a new one.

At most `--concurrency` replies are generated at once and `--max_queue` more wait for a slot, the
page's and the API's together; beyond that a request is turned away with "busy" (the API: 429 with
Retry-After). gradio_client can use the page's endpoint:

    from gradio_client import Client
    job = Client("http://127.0.0.1:9090").submit("你好", [], "张飞", 128, 0.8, 0.8, api_name="/chat")
    for text_box, history in job:   # history grows as the reply streams; pass it back for the next turn
        ...
    job = Client(...).submit("李白，作首诗", [], "张飞", 128, 0.8, 0.8, ["孙悟空", "张飞", "李白"], api_name="/chat")
    # a group's history: each reply carries its speaker as metadata.title
"""

import argparse
import hmac
import logging
import os
import re
import threading

from utils.cli import HelpFormatter, UserError, exit_on_problems, exit_on_user_error, printable
from utils.chat import MAX_MESSAGE_CHARS, add_generation_args, add_model_args
from utils.engine import CLIENT_SYSTEM, MAX_MESSAGES, TURN_FIELDS
from utils.guard import MAX_BODY_BYTES, READ_TIMEOUT_S

logger = logging.getLogger("web_demo")

EMPTY_REPLY = "（没有生成内容 / the model produced no text）"
MAX_GROUP = 3  # the scenes trained (data/sample/scenes) seat three characters at most
GROUP_HELP = ("Pick 2-3 roles to chat with all of them: after your message each answers once, first those "
              "your message names (in the order named), then the rest in this list's order. Fewer than 2: "
              "the one-on-one chat of the role above. Removing a member who spoke starts a new scene.")
TURN_INPUTS = (*TURN_FIELDS, "group")
BUSY = "busy: every generation slot and waiting place is taken; try again in a moment"
API_KEY_ENV = "ROLEPLAY_API_KEY"


class _Turn:
    """A running reply: its stop event, and the chat to show once stopped (None: keep the reply)."""

    def __init__(self):
        self.stop = threading.Event()
        self.restart = None


class RolePlayChat:
    """The page's handlers over a ChatEngine, kept apart from the layout so that tests can call them
    directly.

    Each running reply has a stop event, filed under its browser session: Stop, Clear and a role
    switch set the session's events, and each of its replies then ends at once, yielding nothing
    more, which frees its slot.
    """

    def __init__(self, engine):
        self.engine = engine
        self._stops: dict[str, set[_Turn]] = {}
        self._stops_lock = threading.Lock()

    def validate(self, message, history, role, max_new_tokens, top_p, temperature, group=None) -> list:
        """Gradio validator of chat(): runs before a request joins the queue, so bad input never
        waits in line; each problem shows next to its input (gradio_client: ValidationError)."""
        import gradio as gr

        from utils.chat import Sampling
        from utils.engine import InputError

        try:
            self.check_turn(message, history, role, Sampling(max_new_tokens, top_p, temperature), group)
        except InputError as error:
            return [gr.validate(field not in error.problems, error.problems.get(field, "")) for field in TURN_INPUTS]
        return [gr.validate(True, "") for _ in TURN_INPUTS]

    def check_turn(self, message, history, role, sampling, group) -> tuple[list, list[dict]]:
        """Who answers a new user `message`, and the conversation it ends: the speakers, in turn, as
        (name, the prompt of their reply to a scene), and the scene so far. One-on-one: the radio's
        role, unnamed, after the history; in group mode (two or more in `group`) the members in
        speaking order after the scene. Else an InputError holding every problem (TURN_INPUTS)."""
        from functools import partial

        from utils.engine import InputError

        if not group_mode(group):
            played, conversation = self.engine.check_turn(message, history, role, sampling)
            return [(None, partial(self.engine.prompt, played))], conversation
        try:  # the message, the history's shape and the sampling, as in one-on-one
            self.engine.check_turn(message, history, role, sampling)
            problems = {}
        except InputError as error:
            problems = dict(error.problems)
        try:
            members = self.check_group(group)
            if "history" not in problems:
                scene = self.scene_of(history, members)
        except InputError as error:
            problems.update(error.problems)
        if problems:
            raise InputError({field: problems[field] for field in TURN_INPUTS if field in problems})
        speakers = [(name, partial(self.engine.scene_prompt, name)) for name in speaking_order(message, members)]
        return speakers, [*scene, {"role": "user", "content": message}]

    def check_group(self, group) -> list[str]:
        """The group's members, each a role, at most MAX_GROUP of them (InputError on "group")."""
        from utils.engine import InputError

        if not isinstance(group, (list, tuple)):
            raise InputError({"group": f"the group must be a list of role names, got {type(group).__name__}"})
        members = list(group)
        if len(members) > MAX_GROUP:
            raise InputError({"group": f"a group has at most {MAX_GROUP} roles, got {len(members)}"})
        for name in members:
            if not isinstance(name, str) or name not in self.engine.roles:
                raise InputError({"group": f"unknown role {name!r} in the group; choose from: "
                                           f"{', '.join(self.engine.roles)}"})
        if len(set(members)) < len(members):
            raise InputError({"group": "a role is in the group twice"})
        return members

    def scene_of(self, history, members: list[str]) -> list[dict]:
        """A group chat's history as a scene: the plain messages, each reply with the "name" of its
        speaker, which the chat keeps in the message's metadata title (InputError on "history")."""
        from utils.engine import InputError

        scene = []
        for number, (sent, message) in enumerate(zip(history or [], self.engine.clean_history(history)), 1):
            if message["role"] == "assistant" and message["content"] == EMPTY_REPLY:
                continue  # a member who said nothing (chat shows the notice)
            if message["role"] == "assistant":
                metadata = sent.get("metadata")
                name = metadata.get("title") if isinstance(metadata, dict) else None
                if name not in members:
                    raise InputError({"history": f"message {number} of the history is not by a member of the "
                                                 f"group ({', '.join(members)}): start a new scene"})
                message = {**message, "name": name}
            scene.append(message)
        return scene

    def stop(self, request=None, restart: list | None = None) -> None:
        """End this session's running replies, if any. With `restart`, each reply's last update shows
        that chat instead of what was shown: updates of one reply reach the page in order, so an
        update already on its way cannot bring the reply back after a Clear."""
        with self._stops_lock:
            for turn in self._stops.get(getattr(request, "session_hash", None), ()):
                turn.restart = restart
                turn.stop.set()

    def chat(self, message, history, role, max_new_tokens, top_p, temperature, request=None, *, group=None):
        """One turn: show the message, then stream the reply into the chat, or in group mode each
        member's reply in turn, labelled with its name. Yields (text box, chat)."""
        import gradio as gr

        from utils.chat import Busy, Cancelled, Sampling, newest_history

        sampling = Sampling(max_new_tokens, top_p, temperature)
        try:  # the validator's checks again: a direct caller of this handler gets them too
            speakers, scene = self.check_turn(message, history, role, sampling, group)
            # the first prompt now: a prompt that cannot be built is refused before anything is shown
            messages = speakers[0][1](scene)
        except UserError as error:
            raise gr.Error(str(error), print_exception=False) from None
        session, turn = getattr(request, "session_hash", None), _Turn()
        with self._stops_lock:
            self._stops.setdefault(session, set()).add(turn)
        # the chat shown holds the turns the prompt holds, as typed: the role's lorebook entries and
        # notes folded into them are the prompt's alone (shown, they would come back as history and
        # be applied again on every turn); a speaker's name goes in its message's metadata, never
        # into the text, so the scene comes back as it was
        history = [shown(m) for m in newest_history(scene, self.engine.model_max_length)]
        asked, reply = len(history), ""
        try:
            with self.engine.slots.place() as slot:
                for name, prompt in speakers:
                    messages, reply = messages or prompt(scene), ""
                    yield ("" if len(history) == asked else gr.skip()), [*history, shown(spoken(reply, name))]
                    with slot(turn.stop):
                        for reply in self.engine.start_reply(messages, sampling, turn.stop):
                            if turn.stop.is_set():
                                break
                            # the text box is left alone while streaming: the user may be typing the next message
                            yield gr.skip(), [*history, shown(spoken(reply, name))]
                    if turn.stop.is_set():
                        break
                    # a reply of nothing is shown as such, and is no line of the scene: no prompt holds the notice
                    said = spoken(reply, name)
                    scene = [*scene, said] if reply.strip() else scene
                    history, messages = [*history, shown(said if reply.strip() else spoken(EMPTY_REPLY, name))], None
        except Busy:
            raise gr.Error(BUSY, print_exception=False) from None
        except Cancelled:
            pass
        except UserError as error:
            raise gr.Error(str(error), print_exception=False) from None
        except Exception as error:
            logger.exception("generation failed")  # shown in the page instead of a bare "Error" badge
            raise gr.Error(f"generation failed: {type(error).__name__}: {error}", print_exception=False) from None
        finally:
            with self._stops_lock:
                self._stops[session].discard(turn)
                if not self._stops[session]:
                    del self._stops[session]
        if turn.stop.is_set():
            if turn.restart is not None:
                yield gr.skip(), turn.restart
            elif not reply and len(history) == asked:  # stopped before any token: the message back
                yield message, history[:-1]
            elif not reply:  # a group stopped between two speakers: the replies so far stay
                yield gr.skip(), history
        elif not reply.strip():
            yield gr.skip(), history

    def greeting(self, role, group=None) -> list[dict]:
        """The chat a role starts with: its greeting, when it has one, which then goes back into the
        prompt as the first assistant turn. A group's scene opens with each member's greeting, in
        the group's order, as SillyTavern opens a group chat."""
        if group_mode(group):
            return [shown(spoken(self.engine.roles[name].greeting, name)) for name in group
                    if name in self.engine.roles and self.engine.roles[name].greeting]
        return self.engine.roles[role].opening() if role in self.engine.roles else []

    def another_greeting(self, role, history, group=None) -> list[dict]:
        """The chat opened by the role's next greeting (a card's alternate_greetings, in turn), while
        it holds only its greeting, as SillyTavern swipes a first message; once the user has spoken,
        or in group mode, the chat as it is (Clear starts over)."""
        greetings = self.engine.roles[role].greetings() if role in self.engine.roles else []
        history = history or []
        if (len(greetings) < 2 or len(history) > 1 or (history and history[0].get("role") != "assistant")
                or group_mode(group)):
            return history
        from utils.chat import content_text

        shown = content_text(history[0]["content"]) if history else None
        following = greetings[(greetings.index(shown) + 1) % len(greetings)] if shown in greetings else greetings[0]
        return [{"role": "assistant", "content": following}]

    def fits(self, history, group, role=None) -> bool:
        """Whether the chat shown goes on under a changed group, once the user has spoken: a group's
        scene while every reply in it is by a member (one added joins the scene as it is), a one-on-one
        chat while no reply in it is named. Before, a chat of greetings starts over, showing those of
        the group as it is now, unless it shows them already: a late change then must not end the
        reply to a message just sent, which the chat does not show yet."""
        from utils.chat import content_text

        history = history or []
        names = [(m.get("metadata") or {}).get("title") for m in history if m.get("role") == "assistant"]
        if not any(m.get("role") == "user" for m in history):
            def seen(chat):
                return [(content_text(m.get("content")), (m.get("metadata") or {}).get("title")) for m in chat]

            return bool(history) and seen(history) == seen(self.greeting(role, group))
        return all(name in group for name in names) if group_mode(group) else not any(names)

    def has_alternates(self, role, group=None) -> bool:
        return role in self.engine.roles and len(self.engine.roles[role].greetings()) > 1 and not group_mode(group)


def group_mode(group) -> bool:
    """Whether the chat is a group's: two or more roles picked (or a group that is no list, to be told why)."""
    return group is not None and not (isinstance(group, (list, tuple)) and len(group) < 2)


def speaking_order(message: str, group: list[str]) -> list[str]:
    """Who answers a user's message in a group, each member once: those the message names, in the
    order it first names them, then the rest in the group's order. A fixed rule (SillyTavern's
    "natural order" also draws by chance), so that the user can tell who speaks and steer it."""
    found, taken = [], [False] * len(message)
    for name in sorted(group, key=len, reverse=True):  # 张飞飞 named is not 张飞 named
        start = message.find(name)
        while start != -1 and any(taken[start:start + len(name)]):
            start = message.find(name, start + 1)
        if start != -1:
            taken[start:start + len(name)] = [True] * len(name)
            found.append((start, name))
    named = [name for _, name in sorted(found)]
    return [*named, *(name for name in group if name not in named)]


def spoken(text: str, name: str | None) -> dict:
    """A reply as a scene holds it: the plain text, and its speaker's name (None: one-on-one, unnamed)."""
    return {"role": "assistant", "content": text} if name is None else {"role": "assistant", "content": text,
                                                                        "name": name}


def shown(message: dict) -> dict:
    """A scene's message as the chat shows it: a speaker's name as the message's metadata title,
    which Gradio shows above the reply and sends back beside it (scene_of reads it there)."""
    plain = {"role": message["role"], "content": message["content"]}
    return plain if message.get("name") is None else {**plain, "metadata": {"title": message["name"]}}


def build_demo(chat: RolePlayChat, default_role: str):
    """The chat page (a small gr.Blocks, as Gradio's chatbot_streaming demo); the sliders start at
    the engine's default sampling."""
    import gradio as gr

    defaults, limit = chat.engine.defaults, chat.engine.max_new_tokens_limit
    from utils.guard import CHAT_TEXT_TAGS

    # analytics off: a local demo should not report its use to Gradio's servers
    with gr.Blocks(title="Baichuan2 角色扮演 role-play", analytics_enabled=False) as demo:
        gr.Markdown("## Baichuan2 角色扮演 · role-play chat")
        with gr.Row():
            with gr.Column(scale=4):
                # sanitize_html strips scripts and event handlers but keeps forms, inputs and images:
                # the tags of CHAT_TEXT_TAGS are shown as text instead (and PAGE_CSP stops any fetch
                # from elsewhere), so neither a message, a greeting nor a reply can inject them
                chatbot = gr.Chatbot(chat.greeting(default_role), label="对话 Chat", elem_id="chatbot", height=480,
                                     sanitize_html=True, allow_tags=CHAT_TEXT_TAGS, buttons=["copy", "copy_all"],
                                     feedback_options=None)
                msg = gr.Textbox(label="消息 Message", elem_id="message", lines=1, max_lines=6,
                                 placeholder="输入消息，按 Enter 发送 (type a message, Enter sends)")
                with gr.Row():
                    submit = gr.Button("发送 Submit", variant="primary", elem_id="submit")
                    stop = gr.Button("停止 Stop", elem_id="stop")
                    clear = gr.Button("清空 Clear", elem_id="clear")
                    # shown for a role with several greetings (a card's alternate_greetings)
                    another = gr.Button("换个开场 Another greeting", elem_id="another_greeting",
                                        visible=chat.has_alternates(default_role))
            with gr.Column(scale=1):
                # a name's control and bidi characters are shown escaped; the value stays the name
                choices = [(printable(name), name) for name in chat.engine.roles]
                role = gr.Radio(choices, value=default_role, elem_id="role",
                                label="角色 Role (switching starts a new chat)")
                # not capped at MAX_GROUP here: a fourth pick is told why beside this control on Submit
                group = gr.Dropdown(choices, value=[], multiselect=True, label="群聊 Group", info=GROUP_HELP,
                                    elem_id="group")
                settings = [
                    gr.Slider(1, limit, value=min(defaults.max_new_tokens, limit), step=1, label="max new tokens",
                              elem_id="max_new_tokens"),
                    gr.Slider(0.05, 1.0, value=defaults.top_p, step=0.05, label="top_p", elem_id="top_p"),
                    gr.Slider(0.0, 2.0, value=defaults.temperature, step=0.05, label="temperature (0 = greedy)",
                              elem_id="temperature")]
        wire(chat, msg, chatbot, role, group, settings, submit, stop, clear)
        gr.on([role.change, group.change], lambda name, members: gr.Button(visible=chat.has_alternates(name, members)),
              [role, group], another, queue=False, api_visibility="private")
        another.click(chat.another_greeting, [role, chatbot, group], chatbot, queue=False, api_visibility="private")
    # the bound on concurrent replies is chat.engine.slots, shared with the API: Gradio only runs the handlers
    demo.queue(default_concurrency_limit=None, max_size=None)
    return demo


def wire(chat: RolePlayChat, msg, chatbot, role, group, settings: list, submit, stop, clear) -> None:
    """The page's events, inside its gr.Blocks."""
    import gradio as gr

    # Gradio hands a handler the request (and so the browser session) through this annotation
    def respond(message, history, role, max_new_tokens, top_p, temperature, group, request: gr.Request):
        yield from chat.chat(message, history, role, max_new_tokens, top_p, temperature, request, group=group)

    def stop_reply(request: gr.Request):
        chat.stop(request)

    def start_over(role, group, request: gr.Request):
        chat.stop(request, restart=chat.greeting(role, group))
        return chat.greeting(role, group)

    def clear_chat(role, group, request: gr.Request):
        return start_over(role, group, request), ""

    private = {"queue": False, "api_visibility": "private"}
    # the group comes last, so that a client of api_name "chat" that leaves it out chats one-on-one
    inputs = [msg, chatbot, role, *settings, group]
    # Submit is disabled while a reply streams: Gradio ignores a new send until the running one ends
    # (trigger_mode "once"), and a message left in the box should say why. The lock runs the
    # validator (only queued events do), so that refused input leaves Submit as it was: Gradio
    # starts no .then after a refusal, and nothing would unlock it.
    lock = gr.on([msg.submit, submit.click], lambda *_: gr.Button(interactive=False), inputs, submit,
                 validator=chat.validate, preprocess=False, show_progress="hidden", api_visibility="private")
    # Enter and Submit then run the streaming handler (api_name "chat" for clients, validated again
    # there); its progress and errors show on the chat only, never hiding the message being typed.
    reply = lock.success(respond, inputs, [msg, chatbot], api_name="chat", validator=chat.validate,
                         preprocess=False, show_progress_on=chatbot)
    # Submit back once the reply ends, whatever its outcome: Gradio 6.31's page starts no .then after
    # an error (only .failure), so both outcomes are listed
    for outcome in (reply.success, reply.failure):
        outcome(lambda: gr.Button(interactive=True), None, submit, **private)
    # Stop keeps what was shown; Clear (the button or the chat's trash icon), a new role and a group
    # the chat no longer fits start over, keeping a draft message on a switch. Each ends the running
    # reply at once (its stop event), and the reply's own last update shows the new start.
    stop.click(stop_reply, None, None, **private)
    clear.click(clear_chat, [role, group], [chatbot, msg], **private)
    chatbot.clear(start_over, [role, group], chatbot, **private)
    role.change(start_over, [role, group], chatbot, **private)

    # Gradio's multiselect dropdown sends a pick's change late and more than once, each with the
    # value of its moment (seen under load): a change that the chat still fits keeps it, so that
    # none of them ends a reply that the user started meanwhile
    def regroup(role, group, history, request: gr.Request):
        return gr.skip() if chat.fits(history, group, role) else start_over(role, group, request)

    group.change(regroup, [role, group, chatbot], chatbot, preprocess=False, **private)


def build_app(demo, engine, api_key: str | None = None, limits=None):
    """The OpenAI-compatible API under /v1 and the page (None: the API alone) as one FastAPI app;
    both answer from `engine`, within its one bound. With `api_key`, API requests need it as their
    bearer token, and the page asks for it as the password of a login form (any user name). `limits`
    (utils.guard.Limits, default: its defaults, for 127.0.0.1) bound what a request may be; utils.guard
    says how."""
    from utils.api import api_app, page_not_found

    app = api_app(engine, api_key, limits)  # first: the page's mount at the root would take /v1 too
    if demo is None:
        return app
    import gradio as gr

    # a path neither answers (a client's base URL without /v1) is told where the API is
    return gr.mount_gradio_app(app, demo, path="", auth=page_login(api_key),
                               auth_message="password: the server's API key",
                               app_kwargs={"exception_handlers": {404: page_not_found}})


def page_login(api_key: str | None):
    """Gradio's login check for the page: any user name, the API key as the password (None: no login)."""
    if api_key is None:
        return None
    return lambda user, password: hmac.compare_digest(password.encode(), api_key.encode())


def is_loopback(host: str) -> bool:
    import ipaddress

    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name other than localhost may resolve to any address
        return False


def address(host: str, port: int) -> str:
    """host:port as a URL writes it, an IPv6 host in brackets ([::1]:9090)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def listen(host: str, port: int):
    """A socket bound to host:port (port 0: a free one), or a one-line UserError."""
    import socket

    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen()  # connections wait in the backlog from now on, before the server accepts them
    except OSError as error:
        raise UserError(f"cannot serve on {address(host, port)}: {error.strerror or error}") from None
    return sock


def launch(demo, sock, args) -> None:
    """Serve the page with Gradio's own server (which --share needs) on the port that `sock` found free."""
    port = sock.getsockname()[1]
    sock.close()  # Gradio binds the port itself
    try:
        demo.launch(server_name=args.host, server_port=port, share=args.share, auth=page_login(api_key(args)))
    except OSError as error:  # taken by someone else since the check
        raise UserError(f"cannot serve on {address(args.host, port)}: {error}") from None


def run_server(app, sock, host: str, api_only: bool, read_timeout: float) -> None:
    """Serve `app` on `sock` (bound to `host`) until Ctrl-C, saying where first."""
    url = "http://" + address(host, sock.getsockname()[1])
    print(f"serving on {'' if api_only else url + ' (page), '}{url}/v1 (OpenAI-compatible API)", flush=True)
    make_server(app, read_timeout).run(sockets=[sock])


def make_server(app, read_timeout: float | None = None):
    """A uvicorn server for `app`; `.run(sockets=[listen(...)])` serves until Ctrl-C. A request's
    headers are due within `read_timeout` seconds (default utils.guard.READ_TIMEOUT_S)."""
    import uvicorn

    from utils.guard import READ_TIMEOUT_S, timed_h11

    protocol = timed_h11(READ_TIMEOUT_S if read_timeout is None else read_timeout)
    return uvicorn.Server(uvicorn.Config(app, log_level="warning", ws="none", http=protocol))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_model_args(parser)
    parser.add_argument_group("model").add_argument(
        "--default_role", help="role selected when the page opens (default: the model's first role)")
    group = add_generation_args(parser, "generation (the sliders' starting values, the API's defaults)")
    group.add_argument("--clamp_max_tokens", action="store_true",
                       help="an API request whose max_tokens does not fit in the context beside its prompt gets "
                            "what fits (then finish_reason \"length\") instead of a 400 that says the numbers "
                            "(vLLM's rule)")
    group.add_argument("--max_message_chars", type=int, default=MAX_MESSAGE_CHARS, help="longer messages are refused")
    group.add_argument("--max_messages", type=int, default=MAX_MESSAGES,
                       help="conversations of more messages (the page's history, an API request's messages) "
                            "are refused: each costs work, and only the newest few fit in the context")
    group = parser.add_argument_group("server")
    group.add_argument("--host", default="127.0.0.1",
                       help="address to listen on; 0.0.0.0 opens the page and the API to the network (needs a key)")
    group.add_argument("--port", type=int, default=9090, help="port to listen on; 0 picks a free one (printed)")
    group.add_argument("--share", action="store_true",
                       help="serve the page alone through a public gradio.live link instead (needs a key; "
                            "anyone with the link and the key can use it)")
    group.add_argument("--api_only", action="store_true",
                       help="serve the OpenAI-compatible API (/v1/chat/completions, /v1/models) without the page")
    group.add_argument("--api_key", help=f"requests must carry `Authorization: Bearer KEY` (the page asks for it as "
                                         f"its password); the environment variable {API_KEY_ENV} keeps it out of "
                                         f"the process list (default: ${API_KEY_ENV}, else no key)")
    group.add_argument("--no_api_key", action="store_true",
                       help="serve a non-loopback --host or --share without a key, knowing that anyone who "
                            "reaches it can use it")
    group.add_argument("--cors_origin", action="append", metavar="ORIGIN",
                       help="let web pages of this origin (e.g. http://localhost:3000; repeatable) call the API "
                            "and the page from a browser; without it no CORS header is sent (default: none)")
    group.add_argument("--allowed_host", action="append", metavar="NAME",
                       help="also answer requests whose Host header is NAME (repeatable; e.g. the name a reverse "
                            "proxy passes on). Loopback names and --host are always answered; others get a 400, "
                            "so that a web page cannot reach the server by rebinding its DNS name (default: none)")
    group.add_argument("--max_body_bytes", type=int, default=MAX_BODY_BYTES,
                       help="larger request bodies are refused with a 413 before they are read")
    group.add_argument("--read_timeout", type=float, default=READ_TIMEOUT_S,
                       help="seconds a client has to send a request's headers, and then its body; a slower "
                            "connection is closed (a body: 408)")
    group.add_argument("--client_system", choices=CLIENT_SYSTEM, default="role",
                       help="when an API request's model names a trained role and it brings system messages of "
                            "its own (SillyTavern sends its Main Prompt and the card): 'role' plays the role's "
                            "trained prompt and drops the client's leading system messages, 'client' plays the "
                            "client's, 'append' the trained prompt followed by the client's. System messages "
                            "later in the conversation join the user turn beside them in every case. A model "
                            "that is no role always plays the client's (the model list offers one such id, the "
                            "model directory's name)")
    group.add_argument("--log_requests", action="store_true",
                       help="print one line per API request: the client, the policy, the system prompt's source "
                            "and tokens, the parameters used and ignored, the status")
    group.add_argument("--concurrency", type=int, default=1, help="replies generated at the same time")
    group.add_argument("--max_queue", type=int, default=16,
                       help="requests waiting for a generation slot; more are told the server is busy")
    return parser.parse_args(argv)


def validate_args(args) -> list[str]:
    from utils.chat import check_settings

    problems = [f"--{name} must be at least 1, got {getattr(args, name)}"
                for name in ("max_message_chars", "max_messages", "concurrency", "max_queue", "max_body_bytes")
                if getattr(args, name) < 1]
    if not args.read_timeout > 0:
        problems.append(f"--read_timeout must be more than 0 seconds, got {args.read_timeout}")
    problems += [f"--cors_origin {origin!r} is not an origin (scheme://host[:port], e.g. http://localhost:3000, "
                 f"or *)" for origin in args.cors_origin or () if not re.fullmatch(r"https?://[^/\s?#]+|\*", origin)]
    if not 0 <= args.port < 65536:
        problems.append(f"--port must be in 0..65535, got {args.port}")
    key = api_key(args)
    if key is not None and not key.strip():
        problems.append(f"--api_key (or ${API_KEY_ENV}) is empty")
    if key is not None and args.no_api_key:
        problems.append("--no_api_key contradicts the key given by --api_key or $" + API_KEY_ENV)
    exposed = "--share" if args.share else None if is_loopback(args.host) else f"--host {args.host}"
    if exposed and key is None and not args.no_api_key:
        problems.append(f"{exposed} lets the network in: give a key (--api_key KEY or ${API_KEY_ENV}), "
                        f"or --no_api_key to serve without one")
    if args.share and args.api_only:
        problems.append("--share serves the page alone: it cannot go with --api_only")
    try:
        check_settings(args.max_new_tokens, args.top_p, args.temperature)
    except UserError as error:
        problems.append(str(error))
    return problems


def client_model(args, roles) -> str:
    """The model id meaning "the client's own system prompt": the model directory's (or hub id's)
    last part, e.g. roleplay-merged, marked as such if a role has that name."""
    name = os.path.basename(os.path.normpath(args.model_path)) or "client"
    return name if name not in roles else f"{name} (client prompt)"


def log_requests() -> None:
    """The API's request lines (utils.api.requests_log) on stderr, as they come."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s request %(message)s", "%H:%M:%S"))
    requests = logging.getLogger("web_demo.requests")
    requests.addHandler(handler)
    requests.setLevel(logging.INFO)
    requests.propagate = False


def api_key(args) -> str | None:
    return args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV)


def main(argv=None) -> None:
    args = parse_args(argv)
    exit_on_problems(validate_args(args))

    from utils.cli import quiet_third_party

    quiet_third_party()
    from utils.chat import GenerationSlots
    from utils.engine import ChatEngine, read_prompts
    from utils.guard import Limits

    prompts, default_role = read_prompts(args, args.default_role)
    roles = prompts.roles
    with listen(args.host, args.port) as sock:  # before the slow model load: a taken port is told at once
        engine = ChatEngine.load(args, roles, slots=GenerationSlots(args.concurrency, args.max_queue),
                                 max_message_chars=args.max_message_chars, max_messages=args.max_messages,
                                 client_system=args.client_system, client_model=client_model(args, roles),
                                 clamp_max_tokens=args.clamp_max_tokens, user_name=prompts.user_name)
        if args.log_requests:
            log_requests()
        demo = None if args.api_only else build_demo(RolePlayChat(engine), default_role.name)
        if args.share:
            launch(demo, sock, args)
        else:
            limits = Limits(args.max_body_bytes, args.read_timeout, args.cors_origin or [],
                            [args.host, *(args.allowed_host or ())])
            run_server(build_app(demo, engine, api_key(args), limits), sock, args.host, args.api_only,
                       args.read_timeout)


if __name__ == "__main__":
    exit_on_user_error(main)
