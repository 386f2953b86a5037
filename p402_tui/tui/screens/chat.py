"""The chat view: ask any model (or let the router pick), watch the answer stream, see what it cost.

Answers stream through `Markdown.get_stream()` (appending to a plain `Markdown`
falls behind at about twenty appends a second), fed once a frame rather than
once a token, so the view keeps up well past a thousand tokens a second and
keys never wait behind rendering (`bench/tui_chat.py`). Under each answer:
where it went and why (model, mode, candidates, attempts) and what it took
(cost, latency, time to first token, tokens, tokens/s).

The screen talks to a `ChatLink`: the orchestrator in this process
(`LocalLink`), or a gateway when the console is attached (`attach.RemoteLink`).
The conversation is an agent session, created with the first message; with no
store it is kept in memory, and the screen says so.
"""

from __future__ import annotations

import asyncio
import base64
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.reactive import reactive
from textual.screen import Screen
from textual.widgets import Footer, Input, Label, Markdown, Select, Static
from textual.widgets.markdown import MarkdownStream

from ...core.config import MODES
from ...core.hooks import CallContext, RouteOptions
from ...core.router import parse_model_ref
from ...core.types import ChatChunk, ChatMessage, ChatRequest, ContentPart, ImageURL, P402Meta, Usage
from ...service.protocol import P402Service
from ..commands import Command, ListedCommands
from ..format import ms, short, usd
from ..widgets.palette import palette_of
from ..widgets.status import StatusLine, status_text

AUTO = "auto"
FRAME_S = 1 / 30  # streamed text reaches the Markdown widget at most this often
MAX_IMAGE_BYTES = 20 * 1024 * 1024
IMAGE_TYPES = {  # magic bytes -> media type; the file's name is not trusted
    b"\x89PNG\r\n\x1a\n": "image/png",
    b"\xff\xd8\xff": "image/jpeg",
    b"GIF87a": "image/gif",
    b"GIF89a": "image/gif",
}


# --- where prompts go ----------------------------------------------------------------------


class AnswerStream(Protocol):
    """The orchestrator's `ChatStream`, or its remote twin: chunks, then `meta` and `decision`."""

    meta: P402Meta

    @property
    def decision(self) -> Any: ...

    def __aiter__(self) -> Any: ...

    async def aclose(self) -> None: ...


class ChatLink(Protocol):
    persistent: bool  # False: no store behind it, so nothing outlives this console

    async def models(self) -> list[str]: ...

    def default_mode(self) -> str: ...

    def stream(self, request: ChatRequest, options: RouteOptions, ctx: CallContext) -> AnswerStream: ...

    async def create_session(self, name: str, metadata: dict[str, Any]) -> str | None:
        """The new session's id; None when it turns out there is no store to keep it."""

    async def set_metadata(self, session_id: str, metadata: dict[str, Any]) -> None: ...


class LocalLink:
    """Prompts go to the orchestrator in this process; sessions to its store, when there is one.

    The store's hooks write each answered request's messages to its session, so the
    link only creates the session and keeps its metadata.
    """

    def __init__(self, orchestrator: Any, service: P402Service | None = None) -> None:
        self.orchestrator = orchestrator
        self.service = service

    @property
    def persistent(self) -> bool:
        return self.service is not None and getattr(self.service, "persistent", True)

    async def models(self) -> list[str]:
        aliases = list(self.orchestrator.router.aliases)  # configured names first, as /v1/models lists them
        return aliases + [m.id for m in self.orchestrator.router.usable_models() if "chat" in m.capabilities]

    def default_mode(self) -> str:
        return self.orchestrator.router.config.mode

    def stream(self, request: ChatRequest, options: RouteOptions, ctx: CallContext) -> AnswerStream:
        return self.orchestrator.stream(request, options, ctx)

    async def create_session(self, name: str, metadata: dict[str, Any]) -> str | None:
        if self.service is None or not self.persistent:
            return None
        return (await self.service.create_session(name, agent="console", metadata=metadata))["id"]

    async def set_metadata(self, session_id: str, metadata: dict[str, Any]) -> None:
        if self.service is not None:
            await self.service.update_session(session_id, metadata=metadata)


def chat_link(source: Any) -> ChatLink | None:
    """The link behind the console's source: its runtime in-process, or the gateway it is attached to."""
    if source is None:
        return None
    link = getattr(source, "chat_link", None)
    if link is not None:
        return link
    runtime = getattr(source, "runtime", None)
    if runtime is None:
        return None
    return LocalLink(runtime.orchestrator, runtime.service)


# --- a conversation kept as an agent session -----------------------------------------------------


class SessionLog:
    """The agent session behind a chat or a comparison, created with the first message.

    Answered requests carry its id, so the store files their messages under it and
    charges their cost to it. Without a store there is no session: the screen's own
    list of messages is all there is, and the screen says so.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.session_id: str | None = None
        self.metadata: dict[str, Any] = {"kind": kind, "source": "console"}
        self.persistent: bool | None = None  # unknown until the first message
        self.messages = 0

    def describe(self) -> str:
        if self.persistent is None:
            return "new session"
        where = f"session {self.session_id}" if self.persistent else "in memory (no store)"
        return f"{where} · {self.messages} message{'s' if self.messages != 1 else ''}"

    async def open(self, link: ChatLink, title: str) -> str | None:
        """The session id, creating the session on the first message; None when nothing is stored."""
        if self.persistent is None:
            if link.persistent:
                self.session_id = await link.create_session(f"{self.kind}: {short(title, 40)}", self.metadata)
            self.persistent = self.session_id is not None
        return self.session_id

    async def update(self, link: ChatLink, **metadata: Any) -> None:
        self.metadata.update(metadata)
        if self.session_id is not None:
            await link.set_metadata(self.session_id, self.metadata)


# --- relaying a stream into a Markdown widget ----------------------------------------------------


@dataclass(slots=True)
class Outcome:
    """What came back, filled as it streams, so a stopped answer still knows what it got."""

    parts: list[str] = field(default_factory=list)
    usage: Usage | None = None
    error: str | None = None
    started: float = field(default_factory=time.monotonic)
    first_token_s: float | None = None
    elapsed_s: float = 0.0
    stopped: bool = False

    @property
    def text(self) -> str:
        return "".join(self.parts)


async def relay(stream: AnswerStream, sink: MarkdownStream, outcome: Outcome, *, frame_s: float = FRAME_S) -> None:
    """Feed the answer's text to the Markdown stream; note usage, first token and a broken stream.

    Text goes to the widget at most once a frame: every append re-renders the answer's
    last block, and appending per token at a thousand tokens a second would keep the
    event loop rendering while keys wait. Frames are aligned to the clock, so columns
    streaming side by side update in the same redraw. Text that arrives just before
    the stream pauses is shown when its frame is due, never held back for the next chunk.
    """
    pending: list[str] = []
    shown_frame = -1  # the clock frame (monotonic time // frame_s) the widget last got text in
    chunks = stream.__aiter__()
    waiting: asyncio.Future[ChatChunk] | None = None

    async def show() -> None:
        nonlocal shown_frame
        if pending:
            text = "".join(pending)
            pending.clear()
            shown_frame = int(time.monotonic() // frame_s)
            await sink.write(text)

    try:
        while True:
            if waiting is None:
                waiting = asyncio.ensure_future(chunks.__anext__())
            due = max(0.0, (shown_frame + 1) * frame_s - time.monotonic()) if pending else None
            done, _ = await asyncio.wait((waiting,), timeout=due)
            if not done:
                await show()
                continue
            arrived, waiting = waiting, None
            try:
                chunk = arrived.result()
            except StopAsyncIteration:
                break
            if chunk.error is not None:
                outcome.error = str(chunk.error.get("message") or chunk.error.get("kind") or "the stream broke")
                break
            if chunk.usage is not None:
                outcome.usage = chunk.usage
            if chunk.content:
                if outcome.first_token_s is None:
                    outcome.first_token_s = time.monotonic() - outcome.started
                outcome.parts.append(chunk.content)
                pending.append(chunk.content)
                if time.monotonic() // frame_s > shown_frame:
                    await show()
    finally:
        if waiting is not None:  # stopped while a chunk was awaited: end that read before the stream is closed
            waiting.cancel()
            await asyncio.gather(waiting, return_exceptions=True)
        outcome.elapsed_s = time.monotonic() - outcome.started
        await show()


@dataclass(slots=True)
class Figures:
    """An answer's numbers as shown: under a chat answer, at the foot of a compare column."""

    model: str
    cost_usd: float | None
    latency_ms: float | None
    ttft_ms: float | None
    tokens: int | None
    tokens_estimated: bool
    tokens_per_s: float | None
    cached: bool
    saved_usd: float
    usage_estimated: bool = False  # billed on our count: the provider sent no usage

    @classmethod
    def of(cls, stream: AnswerStream, outcome: Outcome) -> "Figures":
        meta = stream.meta
        latency = meta.latency_ms or outcome.elapsed_s * 1000
        ttft = meta.ttft_ms if meta.ttft_ms is not None else (
            outcome.first_token_s * 1000 if outcome.first_token_s is not None else None)
        if outcome.usage is not None and outcome.usage.completion_tokens:
            tokens, estimated = outcome.usage.completion_tokens, outcome.usage.estimated or meta.usage_estimated
        elif outcome.parts:
            tokens, estimated = len(outcome.parts), True  # one streamed piece is about one token
        else:
            tokens, estimated = (0 if not outcome.stopped else None), False
        generating_ms = latency - (ttft or 0.0)
        per_s = None
        if tokens and latency:
            per_s = tokens / ((generating_ms if generating_ms > 1 else latency) / 1000)
        model = f"{meta.provider}/{meta.model}" if meta.provider else (meta.model or "?")
        return cls(
            model=model,
            cost_usd=None if outcome.stopped and not meta.cost_usd else meta.cost_usd,
            latency_ms=latency,
            ttft_ms=ttft,
            tokens=tokens,
            tokens_estimated=estimated,
            tokens_per_s=per_s,
            cached=meta.cached,
            saved_usd=meta.saved_usd,
            usage_estimated=meta.usage_estimated,
        )

    def cost_text(self) -> str:
        if self.cached:
            return f"cached · $0 (saved {usd(self.saved_usd)})"
        return ("~" if self.usage_estimated else "") + usd(self.cost_usd)

    def tokens_text(self) -> str:
        if self.tokens is None:
            return "- tok"
        return f"{'≈' if self.tokens_estimated else ''}{self.tokens} tok"

    def timing_text(self) -> str:
        rate = f" · {self.tokens_per_s:,.0f} tok/s" if self.tokens_per_s else ""
        return f"{ms(self.latency_ms)} · TTFT {ms(self.ttft_ms)}{rate}"


def _is_pin(model: str | None) -> bool:
    """Whether a decision's `model` option pinned a model (`auto` and `p402/<mode>` ask the router to choose)."""
    return parse_model_ref(model).pin is not None


def route_text(stream: AnswerStream, requested_mode: str | None) -> str:
    """Where the answer went and how: chosen model, mode (or pinned), candidates, attempts."""
    meta, decision = stream.meta, stream.decision
    served = f"{meta.provider}/{meta.model}" if meta.provider else None
    if served is None and decision is not None and decision.chosen is not None:
        served = decision.chosen.id
    parts = [f"→ {served or '?'}"]
    pinned = decision is not None and _is_pin(decision.options.model)
    mode = "pinned" if pinned else (decision.mode if decision is not None else requested_mode)
    if mode:
        parts.append(mode)
    if decision is not None:
        count = len(decision.candidates)
        parts.append(f"{count} candidate{'s' if count != 1 else ''}")
    attempts = meta.attempts
    failed = [a for a in attempts if a.error_kind]
    tries = max(len(attempts), 1 if served else 0)
    text = f"{tries} attempt{'s' if tries != 1 else ''}"
    if failed:
        text += " (" + ", ".join(f"{a.provider}/{a.model} {a.error_kind}" for a in failed[:3]) + ")"
    parts.append(text)
    return " · ".join(parts)


# --- images from a path --------------------------------------------------------------------


class ImageError(ValueError):
    """A path that is not a readable image: the message says why, for a notice."""


@dataclass(frozen=True, slots=True)
class Attachment:
    name: str
    media_type: str
    size: int
    data_url: str


def load_image(path_text: str) -> Attachment:
    """Read an image file into a data: URL. Blocking: call it with `asyncio.to_thread`."""
    path = Path(path_text.strip().strip("'\"")).expanduser()
    if not path_text.strip():
        raise ImageError("give a path: /image PATH")
    if not path.exists():
        raise ImageError(f"no such file: {path}")
    if not path.is_file():
        raise ImageError(f"not a file: {path}")
    size = path.stat().st_size
    if size > MAX_IMAGE_BYTES:
        raise ImageError(f"{path.name} is {size / 1e6:.1f} MB; images up to {MAX_IMAGE_BYTES // 10**6} MB")
    try:
        data = path.read_bytes()
    except OSError as error:
        raise ImageError(f"cannot read {path}: {error.strerror or error}") from None
    media_type = next((kind for magic, kind in IMAGE_TYPES.items() if data.startswith(magic)), None)
    if media_type is None and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        media_type = "image/webp"
    if media_type is None:
        raise ImageError(f"{path.name} is not a PNG, JPEG, GIF or WebP image")
    encoded = base64.b64encode(data).decode("ascii")
    return Attachment(path.name, media_type, size, f"data:{media_type};base64,{encoded}")


def user_message(text: str, images: list[Attachment]) -> ChatMessage:
    if not images:
        return ChatMessage(role="user", content=text)
    parts = [ContentPart(type="text", text=text)]
    parts += [ContentPart(type="image_url", image_url=ImageURL(url=image.data_url)) for image in images]
    return ChatMessage(role="user", content=parts)


def shown_text(text: str, images: list[Attachment]) -> str:
    """A sent message as the log shows it: its text, and the names of its images."""
    return text + "".join(f"\n[image: {image.name}]" for image in images)


# --- widgets ------------------------------------------------------------------------------


class Prompt(Static):
    """One message the user sent."""


class AnswerView(Vertical):
    """One answer: the streamed Markdown, then where it went and what it took."""

    def __init__(self, label: str) -> None:
        super().__init__(classes="answer")
        self.border_title = label
        self.markdown = Markdown()
        self.route = Label("routing…", classes="meta-route")
        self.cost = Label("", classes="meta-cost")
        self.timing = Label("", classes="meta-timing")

    def compose(self) -> ComposeResult:
        yield self.markdown
        yield self.route
        with Horizontal(classes="answer-meta"):
            yield self.cost
            yield self.timing

    def show(self, route: str, figures: Figures, note: str | None = None) -> None:
        self.border_title = figures.model
        self.route.update(route)
        self.cost.update(f"{figures.cost_text()} · {figures.tokens_text()}")
        self.timing.update(figures.timing_text())
        if note:
            self.border_subtitle = note

    def fail(self, message: str) -> None:
        self.add_class("-error")
        self.route.update(Text(message, style="bold"))
        self.border_subtitle = "failed"


# --- the screen -------------------------------------------------------------------------------


class ChatCommands(ListedCommands):
    """The chat view's actions in the command palette."""

    def commands(self) -> list[Command]:
        screen = self.screen
        if not isinstance(screen, ChatScreen):
            return []
        return [
            ("Chat: stop the answer", screen.action_stop, "Cancel the streaming answer and its upstream call (escape)"),
            ("Chat: attach an image", screen.action_attach, "Type /image PATH to attach a PNG, JPEG, GIF or WebP (ctrl+o)"),
            ("Chat: new conversation", screen.action_new_chat, "Start a new session (ctrl+n)"),
            ("Chat: choose the model", screen.action_pick_model, "A catalog model, or auto to let the router pick (f2)"),
            ("Chat: choose the routing mode", screen.action_pick_mode, "cost, quality, speed, balanced or adaptive (f3)"),
        ]


class LinkedScreen(Screen):
    """A view that reaches models through the console's link (in-process or attached): chat and compare.

    Subclasses name their VIEW and say in `show_model_list` what to do with the models once listed.
    Escape stops what is running; with nothing running it takes the focus out of a text box to MAIN,
    where single-letter keys (d, c, v, q) are keys again rather than typed text.
    """

    VIEW = ""
    MAIN = ""  # the selector of the screen's main content
    BINDINGS = [
        Binding("escape", "stop", "Stop"),
        Binding("escape", "leave_input", "Leave input"),
    ]

    def __init__(self, *, id: str) -> None:
        super().__init__(id=id)
        self._models_loaded = False

    def on_screen_resume(self) -> None:
        self.update_status()
        self._load_models()

    # --- what the app calls -------------------------------------------------------------

    def show_state(self, state: Any) -> None:
        self.update_status()
        if not self._models_loaded:
            self._load_models()

    def update_status(self) -> None:
        if self.is_mounted and hasattr(self.app, "status_fields"):
            fields = self.app.status_fields()  # type: ignore[attr-defined]
            self.query_one(StatusLine).show(status_text(fields, palette_of(self.app), view=self.VIEW))

    @property
    def link(self) -> ChatLink | None:
        return chat_link(getattr(self.app, "source", None))

    def _load_models(self) -> None:
        link = self.link
        if link is None or self._models_loaded or not self.is_mounted:
            return
        self._models_loaded = True
        self._fill_models(link)

    @work(exclusive=True, group="models", exit_on_error=False)
    async def _fill_models(self, link: ChatLink) -> None:
        try:
            models = await link.models()
        except Exception as error:
            self._models_loaded = False
            self.notify(f"could not list models: {error}", severity="error")
            return
        self.show_model_list(link, models)

    def show_model_list(self, link: ChatLink, models: list[str]) -> None:
        raise NotImplementedError

    @property
    def busy(self) -> bool:
        """Whether an answer or a comparison is running, which escape stops."""
        raise NotImplementedError

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        # Both escape bindings stay out of the footer where they would do nothing.
        if action == "stop":
            return self.busy
        if action == "leave_input":
            return not self.busy and isinstance(self.focused, Input)
        return True

    def action_leave_input(self) -> None:
        self.query_one(self.MAIN).focus()


class ChatScreen(LinkedScreen):
    """Streaming chat with any model, the router's choice made visible under each answer."""

    VIEW = "Chat"
    MAIN = "#chat-log"
    COMMANDS = {ChatCommands}
    BINDINGS = [
        Binding("ctrl+o", "attach", "Image"),
        Binding("ctrl+n", "new_chat", "New chat"),
        Binding("f2", "pick_model", "Model"),
        Binding("f3", "pick_mode", "Mode"),
    ]

    DEFAULT_CSS = """
    ChatScreen #chat-bar { height: 3; padding: 0 1; }
    ChatScreen #chat-bar Label { padding: 1 1 0 0; }
    ChatScreen #chat-model { width: 44; }
    ChatScreen #chat-mode { width: 18; }
    ChatScreen #chat-session { width: 1fr; padding: 1 0 0 2; color: $text-muted; text-align: right; }
    ChatScreen #chat-log { height: 1fr; padding: 0 1; }
    ChatScreen #chat-empty { color: $text-muted; padding: 1 2; }
    ChatScreen Prompt { margin: 1 0 0 8; padding: 0 1; background: $boost; border-left: thick $primary; }
    ChatScreen .answer { height: auto; margin: 1 0 0 0; padding: 0 1; border: round $accent 50%;
                         border-title-color: $accent; border-subtitle-color: $text-muted; }
    ChatScreen .answer.-error { border: round $error; }
    ChatScreen .answer Markdown { margin: 0; padding: 0; }
    ChatScreen .answer-meta { height: auto; color: $text-muted; }
    ChatScreen .answer-meta Label { margin-right: 3; }
    ChatScreen .meta-route { color: $text; width: 1fr; }
    ChatScreen #chat-attachments { height: auto; padding: 0 2; color: $accent; display: none; }
    ChatScreen #chat-attachments.-on { display: block; }
    ChatScreen #chat-input { margin: 0 1; }
    """

    streaming: reactive[bool] = reactive(False, bindings=True)

    def __init__(self) -> None:
        super().__init__(id="chat")
        self.session = SessionLog("chat")
        self.history: list[ChatMessage] = []
        self.attachments: list[Attachment] = []
        self._said_in_memory = False

    def compose(self) -> ComposeResult:
        yield StatusLine()
        with Horizontal(id="chat-bar"):
            yield Label("Model")
            yield Select([("auto: the router picks", AUTO)], value=AUTO, allow_blank=False, id="chat-model")
            yield Label("Mode")
            yield Select([(mode, mode) for mode in MODES], value="balanced", allow_blank=False, id="chat-mode")
            yield Static(self.session.describe(), id="chat-session")
        with VerticalScroll(id="chat-log"):
            yield Static(
                "Ask anything. [b]enter[/] sends, [b]escape[/] stops an answer, [b]/image PATH[/] attaches a picture.\n"
                "Pick a model above, or leave [b]auto[/] and a routing mode: the router's choice shows under each answer.",
                id="chat-empty",
            )
        yield Static(id="chat-attachments")
        yield Input(placeholder="Ask something…  (/image PATH attaches an image)", id="chat-input")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#chat-input", Input).focus()
        self.update_status()
        self._load_models()

    @property
    def busy(self) -> bool:
        return self.streaming

    def show_model_list(self, link: ChatLink, models: list[str]) -> None:
        picker = self.query_one("#chat-model", Select)
        picker.set_options([("auto: the router picks", AUTO)] + [(model, model) for model in models])
        picker.value = AUTO
        mode = link.default_mode()
        if mode in MODES:
            self.query_one("#chat-mode", Select).value = mode

    # --- choosing --------------------------------------------------------------------

    @property
    def model(self) -> str:
        value = self.query_one("#chat-model", Select).value
        return value if isinstance(value, str) else AUTO

    @property
    def mode(self) -> str:
        value = self.query_one("#chat-mode", Select).value
        return value if isinstance(value, str) else "balanced"

    @on(Select.Changed, "#chat-model")
    def _model_changed(self, event: Select.Changed) -> None:
        self.query_one("#chat-mode", Select).disabled = event.value != AUTO

    def action_pick_model(self) -> None:
        picker = self.query_one("#chat-model", Select)
        picker.focus()
        picker.expanded = True

    def _pin(self, model: str) -> None:
        """`/model provider/<id>`: any model, listed or not (an unlisted one is unpriced); the router says if it is unknown."""
        if not model:
            self.notify("give a model: /model provider/id, e.g. /model openai/gpt-4o-mini", severity="warning")
            return
        picker = self.query_one("#chat-model", Select)
        offered = [value for _, value in picker._options if isinstance(value, str)]
        if model not in offered:
            picker.set_options([(label, value) for label, value in picker._options if isinstance(value, str)]
                               + [(model, model)])
        picker.value = model

    def action_pick_mode(self) -> None:
        picker = self.query_one("#chat-mode", Select)
        if picker.disabled:
            self.notify("the mode applies when the model is auto", severity="warning", timeout=3)
            return
        picker.focus()
        picker.expanded = True

    # --- sending ---------------------------------------------------------------------

    @on(Input.Submitted, "#chat-input")
    def _submitted(self, event: Input.Submitted) -> None:
        text = event.value.strip()
        if not text:
            return
        if text.startswith("/image"):
            self._attach_image(text[len("/image"):].strip(), event.value)
            return
        if text.startswith("/model"):
            self._pin(text[len("/model"):].strip())
            event.input.value = ""
            return
        if self.streaming:
            self.notify("an answer is still streaming: escape stops it", severity="warning", timeout=3)
            return
        link = self.link
        if link is None:
            self.notify("the console is not connected yet", severity="warning")
            return
        event.input.value = ""
        images, self.attachments = self.attachments, []
        self._show_attachments()
        self.streaming = True
        self._ask(link, text, images, self.model, self.mode)

    @work(exclusive=True, group="chat", exit_on_error=False, description="chat answer")
    async def _ask(self, link: ChatLink, text: str, images: list[Attachment], model: str, mode: str) -> None:
        log = self.query_one("#chat-log", VerticalScroll)
        answer = AnswerView(model if model != AUTO else f"auto · {mode}")
        outcome = Outcome()
        history, session = self.history, self.session  # ctrl+n may start a new conversation meanwhile
        try:
            await self.query("#chat-empty").remove()
            await log.mount(Prompt(shown_text(text, images)))
            await log.mount(answer)
            log.anchor()
            history.append(user_message(text, images))
            session_id = await session.open(link, text)
            session.messages += 1
            self._session_changed()
            ctx = CallContext(session_id=session_id, source="console")
            options = RouteOptions(mode=mode) if model == AUTO else RouteOptions(model=model)
            request = ChatRequest(messages=list(history), stream=True)
            stream = link.stream(request, options, ctx)
            sink = Markdown.get_stream(answer.markdown)
            try:
                await relay(stream, sink, outcome)
            except asyncio.CancelledError:
                outcome.stopped = True
                raise
            finally:  # stopped, broken or done: close the upstream, then show and keep what came
                await sink.stop()
                await stream.aclose()
                self._finish(stream, outcome, answer, mode if model == AUTO else None)
                if outcome.text:
                    history.append(ChatMessage(role="assistant", content=outcome.text))
                    session.messages += 1
        except asyncio.CancelledError:
            raise
        except Exception as error:  # an error is a notice and a red answer, never a crash
            reason = getattr(error, "message", None) or str(error) or type(error).__name__
            answer.fail(reason)
            self.notify(reason, severity="error")
            if not outcome.parts and history and history[-1].role == "user":
                history.pop()  # nothing came back: the question is not part of the conversation
        finally:
            self.streaming = False
            self._session_changed()

    def _finish(self, stream: AnswerStream, outcome: Outcome, answer: AnswerView, mode: str | None) -> None:
        figures = Figures.of(stream, outcome)
        note = "stopped" if outcome.stopped else ("broken: " + outcome.error if outcome.error else None)
        answer.show(route_text(stream, mode), figures, note)
        if outcome.error:
            self.notify(f"the answer broke off: {outcome.error}", severity="error")
        if outcome.stopped:
            self.notify("stopped; the upstream call was cancelled", timeout=3)

    def _session_changed(self) -> None:
        self.query_one("#chat-session", Static).update(self.session.describe())
        if self.session.persistent is False and not self._said_in_memory:
            self._said_in_memory = True
            self.notify("no store: this conversation is kept in memory only", severity="warning")

    def action_stop(self) -> None:
        if not self.streaming:
            return
        self.workers.cancel_group(self, "chat")

    async def action_new_chat(self) -> None:
        if self.streaming:
            self.action_stop()
        self.session = SessionLog("chat")
        self.history = []
        log = self.query_one("#chat-log", VerticalScroll)
        await log.remove_children()  # the old welcome text must be gone before the new one takes its id
        await log.mount(Static("New conversation. Ask away.", id="chat-empty"))
        self.query_one("#chat-session", Static).update(self.session.describe())
        self.query_one("#chat-input", Input).focus()

    # --- attachments -------------------------------------------------------------------

    def action_attach(self) -> None:
        box = self.query_one("#chat-input", Input)
        box.value = "/image "
        box.cursor_position = len(box.value)
        box.focus()

    @work(group="chat-attach", exit_on_error=False, description="read an image")
    async def _attach_image(self, path: str, typed: str) -> None:
        """Attach the image at `path`; the command stays in the box until it works, so a typo is fixed, not retyped."""
        try:
            image = await asyncio.to_thread(load_image, path)
        except ImageError as error:
            self.notify(str(error), title="Image not attached", severity="error")
            return
        except Exception as error:
            self.notify(f"cannot attach {path}: {error}", title="Image not attached", severity="error")
            return
        self.attachments.append(image)
        self._show_attachments()
        box = self.query_one("#chat-input", Input)
        if box.value == typed:  # unless the user has started typing something else meanwhile
            box.value = ""
        self.notify(f"{image.name} attached ({image.size / 1024:.0f} KB); it goes with the next message", timeout=3)

    def _show_attachments(self) -> None:
        box = self.query_one("#chat-attachments", Static)
        box.set_class(bool(self.attachments), "-on")
        box.update("📎 " + ", ".join(a.name for a in self.attachments) if self.attachments else "")
