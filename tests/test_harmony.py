"""Harmony rendering equals openai-harmony's token for token; the loss mask covers exactly the assistant output."""
import pytest
from openai_harmony import (Conversation, DeveloperContent, Message, ReasoningEffort, RenderConversationConfig,
                            Role, SystemContent, TextContent)

from data import harmony as H
from data.tokenizer import IMAGE_TOKEN_ID, RETURN, END
from test_tokenizer import harmony_enc, ranks_dirs, tok  # noqa: F401  (session fixtures)

KEEP_THINKING = RenderConversationConfig(auto_drop_analysis=False)
IMAGE_STAND_IN = "IMG"  # harmony cannot write image ids; a separate text piece stands in for each image run


def oracle_message(role, text, channel=None):
    """A harmony Message whose contents are split at <image> exactly where ours are (each piece encoded alone)."""
    pieces = []
    for i, piece in enumerate(text.split(H.IMAGE_PLACEHOLDER)):
        if i > 0:
            pieces.append(TextContent(text=IMAGE_STAND_IN))
        if piece:
            pieces.append(TextContent(text=piece))
    msg = Message.from_role_and_contents(Role(role), pieces)
    return msg.with_channel(channel) if channel else msg


def oracle_conversation(messages):
    out = []
    for m in messages:
        if m["role"] == "assistant":
            if m.get("thinking") is not None:
                out.append(oracle_message("assistant", m["thinking"], "analysis"))
            out.append(oracle_message("assistant", m["content"], "final"))
        else:
            out.append(oracle_message(m["role"], m["content"]))
    return Conversation.from_messages(out)


def with_stand_ins(tok, rendered):
    """Our ids with each image run replaced by the stand-in's tokens, to compare with harmony."""
    stand_in = tok.encode(IMAGE_STAND_IN, add_special_tokens=False).ids
    ids, prev = [], 0
    for start, end in rendered.image_spans:
        ids += rendered.ids[prev:start] + stand_in
        prev = end
    return ids + rendered.ids[prev:]


CONVERSATIONS = [
    [{"role": "user", "content": "What modality is this?"}, {"role": "assistant", "content": "Chest X-ray."}],
    [{"role": "system", "content": H.system_prompt_text()},
     {"role": "developer", "content": H.developer_text("Answer as a radiologist, briefly.")},
     {"role": "user", "content": "<image>\nDescribe the findings."},
     {"role": "assistant", "content": "Right lower lobe consolidation.", "thinking": "Opacity at the right base, air bronchograms."}],
    [{"role": "user", "content": "Compare <image> with <image>: any change?"},
     {"role": "assistant", "content": "The effusion has resolved.", "thinking": "Left CP angle was blunted; now sharp."},
     {"role": "user", "content": "And the heart?"},
     {"role": "assistant", "content": "Normal size.", "thinking": "CTR about 0.45."},
     {"role": "user", "content": "Thanks<image>"},
     {"role": "assistant", "content": "You're welcome  \n\n"}],
    [{"role": "user", "content": "Text with <|end|> and <|start|>assistant inside"}, {"role": "assistant", "content": "<|return|> ok"}],
]


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_training_render_equals_harmony(tok, harmony_enc, messages):
    n_images = sum(m["content"].count("<image>") for m in messages)
    rendered = H.render_conversation(tok, messages, image_tokens=[5 + i for i in range(n_images)])
    want = harmony_enc.render_conversation_for_training(oracle_conversation(messages), KEEP_THINKING)
    assert with_stand_ins(tok, rendered) == want
    assert rendered.ids[-1] == RETURN
    for i, (start, end) in enumerate(rendered.image_spans):
        assert end - start == 5 + i and set(rendered.ids[start:end]) == {IMAGE_TOKEN_ID}
    assert rendered.ids.count(IMAGE_TOKEN_ID) == sum(5 + i for i in range(n_images))


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_loss_mask_is_exactly_the_assistant_output(tok, harmony_enc, messages):
    """For each assistant turn k: harmony's completion prompt for the history before it (ending in
    <|start|>assistant) is the unmasked prefix; the turn's tokens up to its <|end|>/<|return|> are masked."""
    n_images = sum(m["content"].count("<image>") for m in messages)
    rendered = H.render_conversation(tok, messages, image_tokens=[3] * n_images)
    ours = with_stand_ins(tok, rendered)
    mask = []  # our mask, image runs collapsed like the ids
    prev = 0
    stand_in = len(tok.encode(IMAGE_STAND_IN, add_special_tokens=False).ids)
    for start, end in rendered.image_spans:
        mask += rendered.loss_mask[prev:start] + [False] * stand_in
        prev = end
    mask += rendered.loss_mask[prev:]
    expected = [False] * len(ours)
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = harmony_enc.render_conversation_for_completion(
            oracle_conversation(messages[:k]), Role.ASSISTANT, KEEP_THINKING)
        upto = harmony_enc.render_conversation_for_training(oracle_conversation(messages[:k + 1]), KEEP_THINKING)
        assert ours[:len(prompt)] == prompt
        assert upto[-1] == RETURN and ours[len(upto) - 1] in (RETURN, END)
        for t in range(len(prompt), len(upto)):
            expected[t] = True
    assert mask == expected
    assert all(not rendered.loss_mask[t] for s, e in rendered.image_spans for t in range(s, e))


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_generation_prompt_equals_harmony(tok, harmony_enc, messages):
    history = messages[:-1]
    n_images = sum(m["content"].count("<image>") for m in history)
    rendered = H.render_generation_prompt(tok, history, image_tokens=[4] * n_images)
    want = harmony_enc.render_conversation_for_completion(oracle_conversation(history), Role.ASSISTANT, KEEP_THINKING)
    assert with_stand_ins(tok, rendered) == want
    assert not any(rendered.loss_mask)


@pytest.mark.parametrize("kwargs", [dict(), dict(reasoning_effort="high", current_date="2025-06-28"),
                                    dict(model_identity="You are MedGPT-oss.", reasoning_effort="low")])
def test_system_and_developer_text_equal_harmony(tok, harmony_enc, kwargs):
    content = SystemContent.new()
    if "model_identity" in kwargs:
        content = content.with_model_identity(kwargs["model_identity"])
    if "reasoning_effort" in kwargs:
        content = content.with_reasoning_effort(ReasoningEffort(kwargs["reasoning_effort"].capitalize()))
    if "current_date" in kwargs:
        content = content.with_conversation_start_date(kwargs["current_date"])
    want = harmony_enc.render(Message.from_role_and_content(Role.SYSTEM, content))
    ours = H.render_generation_prompt(tok, [{"role": "system", "content": H.system_prompt_text(**kwargs)}]).ids
    assert ours[:len(want)] == want
    dev = DeveloperContent.new().with_instructions("Use SI units.\nBe brief.")
    want = harmony_enc.render(Message.from_role_and_content(Role.DEVELOPER, dev))
    ours = H.render_generation_prompt(tok, [{"role": "developer", "content": H.developer_text("Use SI units.\nBe brief.")}]).ids
    assert ours[:len(want)] == want


def test_targets_follow_the_mask(tok):
    r = H.render_conversation(tok, CONVERSATIONS[0])
    targets = H.targets_from_mask(r.ids, r.loss_mask)
    for t in range(len(r.ids) - 1):
        assert targets[t] == (r.ids[t + 1] if r.loss_mask[t + 1] else -100)
    assert targets[-1] == -100 and targets[-2] == RETURN


@pytest.mark.parametrize("messages,images,match", [
    ([], [], "empty conversation"),
    ([{"role": "doctor", "content": "hi"}], [], "unknown role 'doctor'"),
    ([{"role": "user", "content": "<image><image>"}, {"role": "assistant", "content": "x"}], [576], "more <image> placeholders than images"),
    ([{"role": "user", "content": "<image>"}, {"role": "assistant", "content": "x"}], [576, 576], "2 images but 1 <image> placeholders"),
    ([{"role": "user", "content": "q", "thinking": "t"}], [], "only assistant turns"),
    ([{"role": "user", "content": None}], [], "content must be a string"),
])
def test_bad_conversations(tok, messages, images, match):
    with pytest.raises(H.RenderError, match=match):
        H.render_conversation(tok, messages, image_tokens=images)
