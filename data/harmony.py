"""
Harmony chat rendering (GPT-oss's chat format) to token ids, a loss mask and image-token runs.

Design choices
- A conversation is a list of dicts `{"role": "system"|"developer"|"user"|"assistant", "content": str}`; an
  assistant turn may carry `"thinking"`, rendered as a message in the `analysis` channel before the answer
  in the `final` channel. Every message is
  `<|start|>{role}[<|channel|>{channel}]<|message|>{content}<|end|>`, token for token what openai-harmony
  renders; the last assistant message of a training conversation ends with `<|return|>` instead.
- Each piece (role, channel, text) is encoded on its own, as harmony does, with special-token strings in the
  text read as plain text (so data cannot forge `<|end|>`).
- The loss mask covers exactly what the model generates after the prompt `<|start|>assistant`: from
  `<|channel|>` through `<|end|>`/`<|return|>`, including the `<|start|>assistant` between a turn's analysis
  and final messages (the model writes that too). Everything else (system, developer, user turns, and the
  `<|start|>assistant` the prompt supplies) has no loss.
- Thinking is kept in every assistant turn (harmony's `auto_drop_analysis=False`). openai-harmony's default
  drops the analysis messages before the first final answer, which would train the first turn of a
  multi-turn conversation to answer without its reasoning.
- `<image>` in a message's text is an image placeholder: it becomes a run of `image_token_id` ids, as many
  as the caller says that image has (tiles x tokens per tile, see data.datasets), text around it encoded
  separately. The runs are returned as (start, end) spans so packing never cuts one.
- The harmony system message (identity, reasoning effort, valid channels) is opt-in: `system_prompt_text()`
  writes harmony's text for a `{"role": "system"}` message; a LLaVA "system" prompt is a developer message
  (`developer_text()`), as OpenAI maps a chat "system" prompt to harmony's developer instructions.
"""
from dataclasses import dataclass, field

from .tokenizer import CHANNEL, END, IMAGE_TOKEN_ID, MESSAGE, RETURN, START, encode_ordinary

ROLES = ("system", "developer", "user", "assistant")
IMAGE_PLACEHOLDER = "<image>"


@dataclass
class Rendered:
    ids: list                                        # token ids
    loss_mask: list                                  # bool per id: True on the assistant's output
    image_spans: list = field(default_factory=list)  # (start, end) of each image's run of image-token ids


def system_prompt_text(model_identity="You are ChatGPT, a large language model trained by OpenAI.",
                       reasoning_effort="medium", knowledge_cutoff="2024-06", current_date=None,
                       channels=("analysis", "commentary", "final")) -> str:
    """The text harmony writes for a SystemContent message (no tools)."""
    lines = [model_identity] if model_identity else []
    if knowledge_cutoff:
        lines.append(f"Knowledge cutoff: {knowledge_cutoff}")
    if current_date:
        lines.append(f"Current date: {current_date}")
    sections = ["\n".join(lines)] if lines else []
    if reasoning_effort:
        sections.append(f"Reasoning: {reasoning_effort.lower()}")
    if channels:
        sections.append(f"# Valid channels: {', '.join(channels)}. Channel must be included for every message.")
    return "\n\n".join(sections)


def developer_text(instructions: str) -> str:
    """The text harmony writes for a DeveloperContent message with instructions (no tools)."""
    return f"# Instructions\n\n{instructions}"


class RenderError(ValueError):
    """A conversation that cannot be rendered (unknown role, placeholders without images, ...)."""


def check_messages(messages):
    if not messages:
        raise RenderError("empty conversation: no messages")
    for i, message in enumerate(messages):
        role = message.get("role")
        if role not in ROLES:
            raise RenderError(f"message {i}: unknown role {role!r}; expected one of {ROLES}")
        if not isinstance(message.get("content"), str):
            raise RenderError(f"message {i} ({role}): content must be a string, got {type(message.get('content')).__name__}")
        if message.get("thinking") is not None and role != "assistant":
            raise RenderError(f"message {i} ({role}): only assistant turns may carry 'thinking'")


class _Writer:
    """Appends pieces to one token stream, tracking the loss mask and the image runs."""

    def __init__(self, tok, image_tokens, image_token_id):
        self.tok, self.image_tokens, self.image_token_id = tok, list(image_tokens), image_token_id
        self.ids, self.mask, self.spans = [], [], []
        self.images_used = 0

    def tokens(self, ids, loss):
        self.ids.extend(ids)
        self.mask.extend([loss] * len(ids))

    def text(self, text, loss):
        pieces = text.split(IMAGE_PLACEHOLDER)
        for i, piece in enumerate(pieces):
            if i > 0:
                self.image(loss)
            if piece:
                self.tokens(encode_ordinary(self.tok, piece), loss)

    def image(self, loss):
        if self.images_used >= len(self.image_tokens):
            n_placeholders = self.images_used + 1
            raise RenderError(f"more {IMAGE_PLACEHOLDER} placeholders than images: placeholder {n_placeholders} "
                              f"has no image ({len(self.image_tokens)} given)")
        n = self.image_tokens[self.images_used]
        self.spans.append((len(self.ids), len(self.ids) + n))
        self.tokens([self.image_token_id] * n, False)  # image features are inputs, never predicted
        self.images_used += 1

    def message(self, role, content, channel=None, end=END, header_loss=False, body_loss=False):
        self.tokens([START], header_loss)
        self.tokens(encode_ordinary(self.tok, role), header_loss)
        if channel is not None:
            self.tokens([CHANNEL], body_loss)
            self.tokens(encode_ordinary(self.tok, channel), body_loss)
        self.tokens([MESSAGE], body_loss)
        self.text(content, body_loss)
        self.tokens([end], body_loss)


def _render(tok, messages, image_tokens, image_token_id, for_training):
    check_messages(messages)
    w = _Writer(tok, image_tokens, image_token_id)
    last = len(messages) - 1
    for i, message in enumerate(messages):
        role, content = message["role"], message["content"]
        if role != "assistant":
            w.message(role, content)
            continue
        # with for_training the assistant's output is trained; in a generation prompt it is history
        loss = for_training
        if message.get("thinking") is not None:
            w.message("assistant", message["thinking"], channel="analysis", body_loss=loss)
            # the model itself writes the <|start|>assistant that opens its final message
            w.message("assistant", content, channel="final", header_loss=loss, body_loss=loss,
                      end=RETURN if for_training and i == last else END)
        else:
            w.message("assistant", content, channel="final", body_loss=loss,
                      end=RETURN if for_training and i == last else END)
    return w


def render_conversation(tok, messages, image_tokens=(), image_token_id=IMAGE_TOKEN_ID) -> Rendered:
    """A training conversation -> ids, loss mask (the assistant's output), image spans.

    image_tokens: for each image, in the order its <image> placeholder appears, how many image-token ids it gets.
    """
    w = _render(tok, messages, image_tokens, image_token_id, for_training=True)
    if w.images_used != len(w.image_tokens):
        raise RenderError(f"{len(w.image_tokens)} images but {w.images_used} {IMAGE_PLACEHOLDER} placeholders; "
                          f"put one {IMAGE_PLACEHOLDER} in the text where each image belongs")
    return Rendered(w.ids, w.mask, w.spans)


def render_generation_prompt(tok, messages, image_tokens=(), image_token_id=IMAGE_TOKEN_ID) -> Rendered:
    """The prompt for eval: the conversation so far, then `<|start|>assistant` (the model writes the rest).
    Earlier assistant turns end with <|end|>; the loss mask is all False."""
    w = _render(tok, messages, image_tokens, image_token_id, for_training=False)
    if w.images_used != len(w.image_tokens):
        raise RenderError(f"{len(w.image_tokens)} images but {w.images_used} {IMAGE_PLACEHOLDER} placeholders")
    w.tokens([START], False)
    w.tokens(encode_ordinary(tok, "assistant"), False)
    return Rendered(w.ids, w.mask, w.spans)


def targets_from_mask(ids, loss_mask, ignore_index=-100) -> list:
    """nanoGPT's targets: targets[t] = ids[t + 1] where that token is trained, else ignore_index."""
    targets = [ignore_index] * len(ids)
    for t in range(len(ids) - 1):
        if loss_mask[t + 1]:
            targets[t] = ids[t + 1]
    return targets
