"""The chat engine: the one object beneath every front end. web_demo.py's page, its OpenAI-compatible
API (utils/api.py) and predict.py each build one and only format what it gives:

    prompts, role = read_prompts(args, args.role)      # before the slow model load: bad names fail fast
    engine = ChatEngine.load(args, prompts.roles, user_name=prompts.user_name)   # utils.chat.add_model_args
    messages = engine.turn(message, history, role.name, sampling)   # every input check, then the prompt
    for reply in engine.start_reply(messages, sampling, stop): ...   # the reply so far, as it grows
    prompt = engine.request_prompt(model, client_messages)          # an API client's list (utils/assembly.py)

It holds the model and tokenizer, the roles with their prompts, the bound on concurrent generation
(GenerationSlots, which the page and the API share), the limits of what a request may ask, and the
default sampling. Nothing heavy is imported at module level, so that the scripts' `--help` stays instant.
"""

import threading
from dataclasses import dataclass, replace

from utils.cli import UserError
from utils.assembly import JOIN, AssemblyError, assemble, group_of, names_of, scene_of, without_notes
from utils.chat import (
    CHARS_PER_TOKEN_BOUND,
    MAX_MESSAGE_CHARS,
    GenerationSlots,
    Sampling,
    check_logit_bias,
    check_logprobs,
    check_max_new_tokens,
    check_message,
    check_min_p,
    check_penalty,
    check_repetition_penalty,
    check_temperature,
    check_top_k,
    check_top_p,
    content_text,
    newest_history,
    role_messages,
)
from utils.cards import USER_NAME
from utils.prompts import Prompts, Role, check_role

# A conversation longer than this is refused before any of it is read: each message costs work
# (and the page's history travels both ways on every turn), while a context of a few thousand
# tokens only ever holds the newest few dozen.
MAX_MESSAGES = 1000
TURN_FIELDS = ("message", "history", "role", "max_new_tokens", "top_p", "temperature")
# What a client's system prompt does when `model` names a trained role (web_demo.py --client_system):
# the role's trained prompt alone, the client's instead, or the trained prompt followed by the client's
CLIENT_SYSTEM = ("role", "client", "append")


class InputError(UserError):
    """Bad input, by the input it is about (`problems`: field -> text, in the inputs' order), so that
    a front end can show each problem where it belongs: the page beside its input, the API as the
    error's `param`. Its text is the first problem."""

    def __init__(self, problems: dict[str, str]):
        super().__init__(next(iter(problems.values())))
        self.problems = problems


class UnknownModel(UserError):
    """A request's `model` is no role, and it brings no system prompt to play instead."""


@dataclass(frozen=True)
class RequestPrompt:
    """The prompt of a client's message list: its messages (system first), where the system text
    came from ("role NAME", "client", "role NAME + client", for the request log) and whether the
    last turn is a prefill that the reply continues."""

    messages: list[dict]
    source: str
    prefill: bool

    @property
    def system(self) -> str:
        return self.messages[0]["content"]


def read_prompts(args, name: str | None = None) -> tuple[Prompts, Role]:
    """The roles (and user name) that the model flags give (the model's prompt record, or
    --roles_file) and the role called `name` (None: the first). Read before the model loads, so
    that a bad roles file or role name is told at once."""
    from utils.prompts import load_prompts

    prompts = load_prompts(args.model_path, args.adapter, args.roles_file, args.card_system_prompt, args.lorebook)
    return prompts, check_role(prompts.roles, name or next(iter(prompts.roles)))


class ChatEngine:
    """One model serving role-play chats: checks a turn's input, builds its prompt, starts its reply.

    Limits: `max_message_chars` per new message, `max_messages` per conversation, and a reply of at
    most `max_new_tokens_limit` tokens (half the context, so that a prompt always keeps room), or,
    where a front end asks for any length (the API), as many as fit beside the prompt: more is
    refused, or with `clamp_max_tokens` cut to what is left.
    `defaults` is the sampling a request that sets none gets (None: Sampling's own).
    `user_name` names the user's lines in a group scene, as the training rows named them.
    A client's message list (`request_prompt`) is played with the policy `client_system` (one of
    CLIENT_SYSTEM) when it names a role; `client_model`, a name that is no role, means "the
    client's own system prompt" (the API lists it beside the roles; None: not listed).
    A role's context (its lorebooks, depth note and post-history instructions, as it trained with
    them) is applied wherever its trained prompt is served: the page, predict.py, and a request to
    the role under "role" or "append". There, a client's later system messages (an Author's Note,
    its own post-history) are already folded into the conversation by the assembly, so they count
    in the lorebook scan, and the role's notes come after them, as the training rows put them last.
    Under "client" (and for a model that is no role) the client's prompt is the client's own: a
    client such as SillyTavern sends its lorebook and notes itself, and applying ours too would
    place them twice. Under "role" and "append", a client's copy of a note the role's context
    places itself (its depth note, its post-history instructions) is taken out of the conversation
    (utils.assembly.without_notes), so that it is placed once, where the role trained with it.
    A SillyTavern group chat request (utils.assembly.group_of) under "role" or "append" is served
    from the seat of the member whose turn it is (`group_prompt`), whatever its `model` says
    (SillyTavern sends the selected model for every member).
    """

    def __init__(self, model, tokenizer, roles: dict[str, Role], slots: GenerationSlots | None = None,
                 defaults: Sampling | None = None, max_message_chars: int = MAX_MESSAGE_CHARS,
                 max_messages: int = MAX_MESSAGES, client_system: str = "role", client_model: str | None = None,
                 clamp_max_tokens: bool = False, user_name: str = USER_NAME):
        if client_system not in CLIENT_SYSTEM:
            raise ValueError(f"client_system must be one of {', '.join(CLIENT_SYSTEM)}, got {client_system!r}")
        if client_model in roles:
            raise ValueError(f"client_model {client_model!r} is the name of a role")
        self.client_system, self.client_model = client_system, client_model
        self.model, self.tokenizer, self.roles = model, tokenizer, roles
        self.clamp_max_tokens = clamp_max_tokens
        self.user_name = user_name  # who the user is in a group scene's lines ("Name: text")
        self.slots = slots or GenerationSlots(1, 0)  # predict.py: one reply at a time, nobody waiting
        self.defaults = defaults or Sampling()
        self.max_message_chars, self.max_messages = max_message_chars, max_messages
        self.model_max_length = model.config.model_max_length
        self.max_new_tokens_limit = max(1, self.model_max_length // 2)

    @classmethod
    def load(cls, args, roles: dict[str, Role], **options) -> "ChatEngine":
        """The engine of the model that the flags of utils.chat.add_model_args and add_generation_args
        name (the latter give the default sampling); `options` are the constructor's other arguments."""
        from utils.models import load_for_inference

        model, tokenizer = load_for_inference(args.model_path, args.adapter, args.device, args.trust_remote_code,
                                              args.quantization_bit)
        return cls(model, tokenizer, roles, defaults=Sampling(args.max_new_tokens, args.top_p, args.temperature),
                   **options)

    # ------------------------------------------------------------ the checks, one per input

    def check_message(self, text) -> None:
        check_message(text, self.max_message_chars)

    def clean_history(self, history) -> list[dict]:
        """A conversation from a browser or an API client as {"role", "content": str} dicts: only user
        and assistant turns, their content as plain text. Linear, and refused past `max_messages`
        before anything else, so that no request can make it slow."""
        if history is None:
            return []
        if not isinstance(history, list):
            raise UserError("the history must be a list of messages")
        self.check_length(history)
        messages = []
        for message in history:
            if not isinstance(message, dict) or message.get("role") not in ("user", "assistant"):
                raise UserError("the history may only hold messages with role 'user' or 'assistant'")
            messages.append({"role": message["role"], "content": content_text(message.get("content"))})
        return messages

    def check_length(self, conversation: list) -> None:
        """Refuse a conversation of more than `max_messages`: checked before any message is read."""
        if len(conversation) > self.max_messages:
            raise UserError(f"the conversation has {len(conversation)} messages, more than the server's limit of "
                            f"{self.max_messages} (--max_messages): start a new one")

    def role(self, name) -> Role:
        return check_role(self.roles, name)

    def check_sampling(self, sampling: Sampling, any_length: bool = False) -> dict[str, str]:
        """The problems of `sampling` (field -> text), each a setting that generate() would reject
        with an obscure message, or that asks for more than the model has. A reply is at most
        `max_new_tokens_limit` tokens long, or with `any_length` as long as fits beside its prompt
        (start_reply tells)."""
        limit = None if any_length else self.max_new_tokens_limit
        checks = {"max_new_tokens": (check_max_new_tokens, sampling.max_new_tokens, limit),
                  "top_p": (check_top_p, sampling.top_p), "temperature": (check_temperature, sampling.temperature),
                  "top_k": (check_top_k, sampling.top_k), "min_p": (check_min_p, sampling.min_p),
                  "repetition_penalty": (check_repetition_penalty, sampling.repetition_penalty),
                  "frequency_penalty": (check_penalty, sampling.frequency_penalty, "frequency_penalty"),
                  "presence_penalty": (check_penalty, sampling.presence_penalty, "presence_penalty"),
                  "logit_bias": (check_logit_bias, sampling.logit_bias, self.model.config.vocab_size),
                  "logprobs": (check_logprobs, sampling.logprobs)}
        return problems_of(checks)

    # ------------------------------------------------------------ one turn

    def check_turn(self, message, history, role, sampling: Sampling) -> tuple[Role, list[dict]]:
        """The role (`role` is its name) and the conversation of a new user `message` after `history`,
        once every input is checked; else an InputError holding every problem (fields: TURN_FIELDS)."""
        checks = {"message": (self.check_message, message), "history": (self.clean_history, history),
                  "role": (self.role, role)}
        results: dict = {}
        problems = {**problems_of(checks, results), **self.check_sampling(sampling)}
        if problems:
            raise InputError(problems)
        return results["role"], [*results["history"], {"role": "user", "content": message}]

    def turn(self, message, history, role, sampling: Sampling) -> list[dict]:
        """The prompt's messages for a new user `message` after `history` (check_turn, then prompt)."""
        return self.prompt(*self.check_turn(message, history, role, sampling))

    def prompt(self, role: Role, conversation: list[dict]) -> list[dict]:
        """The role's system prompt, then the newest messages of `conversation` that could fit in the
        context (build_chat_input then keeps the newest whole rounds that do fit, in tokens), with the
        role's context (utils.lorebook: lorebook entries, depth note, post-history) applied."""
        if len(role.system) > CHARS_PER_TOKEN_BOUND * self.model_max_length:
            raise InputError({"system": f"the system prompt is too long ({len(role.system)} characters)"})
        return role_prompt(role, newest_history(conversation, self.model_max_length))

    def scene_prompt(self, name, scene: list[dict]) -> list[dict]:
        """The prompt of character `name`'s next reply in a group `scene` (user and assistant messages,
        each assistant one with the "name" of its speaker): its seat (utils.scenes.seat), with its system
        prompt, its context and the group note, as data_helper.py trains a scene."""
        return self._seated(self.role(name), scene)

    def _seated(self, role: Role, scene: list[dict]) -> list[dict]:
        from utils.scenes import seat

        return self.prompt(seated(role, self.user_name), seat(scene, role.name, self.user_name))

    def group_prompt(self, role: Role, group, assembly) -> RequestPrompt | None:
        """The prompt of a group chat request (utils.assembly.group_of) whose active member is `role`,
        under "role" or "append": the member's seat of the scene, as data_helper.py trains it. The
        nudge is taken out (the seat's group note stands for it), and so are the member's own notes
        (its context places them); the user's lines are named as the model was trained (user_name).
        None when an assistant turn does not say which member spoke: request_prompt then serves the
        member one-on-one."""
        from utils.scenes import group_note

        notes = [group_note(role.name), *(role.context.notes() if role.context else ())]
        scene = scene_of(without_notes(assembly.conversation, notes, drop_empty=True), group.members or self.roles)
        if not scene:
            return None
        if not assembly.prefill and scene[-1].get("name") == role.name:
            # its own message last, and a new one asked for: the seat joins its messages in a row with a newline
            scene[-1]["content"] += "\n"
        role, source = self._with_client(role, assembly.system)
        prompt = self._seated(role, scene)
        # a prefill where the prompt ends on the member's own message, which the reply then continues
        return RequestPrompt(prompt, f"{source} (group seat)", prompt[-1]["role"] == "assistant")

    def _with_client(self, role: Role, client: str) -> tuple[Role, str]:
        """The role, with the client's system prompt after its own under "append"; and its source."""
        if client and self.client_system == "append":
            return replace(role, system=role.system + JOIN + client), f"role {role.name} + client"
        return role, f"role {role.name}"

    def request_prompt(self, model: str, messages: list[dict]) -> RequestPrompt:
        """The prompt for a client's `messages` (dicts with role, content as text, optionally name)
        sent to `model`, put together by utils.assembly and the client_system policy: a role's
        trained prompt, the client's system prompt, or both. Problems: an InputError by request
        field (messages[i]...), an UnknownModel for a name that is no role without a system prompt."""
        role = self.roles.get(model)
        try:
            assembly = assemble(messages, names_of(messages, role.name if role else model))
        except AssemblyError as error:
            raise InputError({error.param: str(error)}) from None
        client, conversation = assembly.system, assembly.conversation
        if role is None and not client and model != self.client_model:
            raise UnknownModel(f"The model `{model}` does not exist: use one of this server's roles "
                               f"({', '.join(self.roles)}), or send your own system message")
        last = f"messages[{assembly.origin[-1]}].content"
        try:
            self.check_message(conversation[-1]["content"])
        except UserError as error:
            raise InputError({last: str(error)}) from None
        if role is None or (client and self.client_system == "client"):
            # the client's prompt: its own lorebook and notes too, and a group chat as it sent it
            return RequestPrompt(self.prompt(Role(model, client), conversation), "client", assembly.prefill)
        # "role" or "append" (or a client that sent no system prompt: its later ones are in the conversation).
        # A group chat plays the member whose turn it is: SillyTavern sends its selected model for all.
        group = group_of(messages)
        if group and group.active in self.roles:
            role = self.roles[group.active]
            seated = self.group_prompt(role, group, assembly)
            if seated is not None:
                return seated  # else one-on-one with the member, its nudge kept: who speaks is unknown
        role, source = self._with_client(role, client)
        if role.context:
            conversation = without_notes(conversation, role.context.notes(), drop_empty=False)
        return RequestPrompt(self.prompt(role, conversation), source, assembly.prefill)

    def start_reply(self, messages: list[dict], sampling: Sampling, stop: threading.Event | None = None,
                    clamp: bool | None = None):
        """A ChatStream of the reply to `messages` (iterate it for the text so far); setting `stop`
        ends it at the next token. A seed makes the reply reproducible when one reply is generated at
        a time (torch has one global generator, which concurrent replies share).

        The oldest rounds are dropped to leave room for the reply, up to `max_new_tokens_limit`
        tokens of it; a longer max_new_tokens must fit beside that prompt (vLLM's rule), else an
        InputError on max_new_tokens, or with `clamp` (None: `clamp_max_tokens`) it is cut to fit."""
        reserve = min(int(sampling.max_new_tokens), self.max_new_tokens_limit)
        return self._stream(sampling, stop, clamp, messages=messages, reserve=reserve)

    def start_completion(self, prompt: str, sampling: Sampling, stop: threading.Event | None = None,
                         clamp: bool | None = None):
        """A ChatStream that continues the raw text `prompt`, as start_reply. A client that writes
        the chat layout itself (a text completion) means its special tokens: `<reserved_106>` in the
        prompt is the user token, `</s>` the eos. The prompt is whole or refused: nothing is cut."""
        if len(prompt) > CHARS_PER_TOKEN_BOUND * self.model_max_length:  # too long, before tokenising it
            raise InputError({"prompt": f"the prompt is too long ({len(prompt)} characters for a context of "
                                        f"{self.model_max_length} tokens)"})
        ids = self.tokenizer.encode(prompt, add_special_tokens=False)
        if not ids:
            raise InputError({"prompt": "the prompt is empty"})
        if len(ids) >= self.model_max_length:
            raise InputError({"prompt": f"the prompt takes {len(ids)} tokens, and the model's context is "
                                        f"{self.model_max_length}: no room is left for a reply"})
        return self._stream(sampling, stop, clamp, messages=None, prompt_ids=ids)

    def start_again(self, first, sampling: Sampling, stop: threading.Event | None = None,
                    clamp: bool | None = None):
        """Another reply to the prompt of the ChatStream `first` (an API request's n > 1), from the
        ids it laid out: the prompt is tokenised once for all of a request's replies."""
        return self._stream(sampling, stop, clamp, messages=None, prompt_ids=first.ids)

    def _stream(self, sampling: Sampling, stop, clamp: bool | None, **prompt):
        from baichuan.generation_utils import ChatStream, ContextFull

        clamp = self.clamp_max_tokens if clamp is None else clamp
        try:
            return ChatStream(self.model, self.tokenizer, max_new_tokens=int(sampling.max_new_tokens), stop=stop,
                              seed=sampling.seed, clamp=clamp, **prompt, **sampling.generate_kwargs())
        except ContextFull as error:
            raise InputError({"max_new_tokens": str(error)}) from None
        except ValueError as error:  # build_chat_input: the system prompt leaves no room for the reply
            raise UserError(str(error)) from None


def role_prompt(role: Role, conversation: list[dict]) -> list[dict]:
    """The role's system prompt, then `conversation`, with the role's context (utils.lorebook:
    lorebook entries, depth note, post-history) fired on it by the function that wrote its training
    rows; a prefill (a trailing assistant turn) stays last, after the notes. The one assembly of a
    role's prompt: ChatEngine.prompt's, and evaluate.py's for the test questions it asks."""
    messages = role_messages(role, conversation)
    if role.context is None:
        return messages
    prefill = messages[-1:] if messages[-1]["role"] == "assistant" else []
    applied, _ = role.context.apply(messages[: len(messages) - len(prefill)])
    return [*applied, *prefill]


def seated(role: Role, user_name: str) -> Role:
    """The role as it speaks in a group scene: its context with the group note after its system
    prompt (utils.scenes), as data_helper.py trains a scene; `user_name` is the user's in its lines."""
    from utils.lorebook import Context
    from utils.scenes import group_note

    return replace(role, context=replace(role.context or Context(role.name, user_name),
                                         extra_system=group_note(role.name)))


def problems_of(checks: dict, results: dict | None = None) -> dict[str, str]:
    """Run each check (field -> (function, *arguments)); the UserErrors' texts by field, and what
    each passing check returned in `results`."""
    problems = {}
    for field, (check, *arguments) in checks.items():
        try:
            value = check(*arguments)
        except UserError as error:
            problems[field] = str(error)
        else:
            if results is not None:
                results[field] = value
    return problems
