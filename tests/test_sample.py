"""sample.py on a tiny random MedGPT saved to disk: the streamed answer is MedGPT.generate's greedy answer to the
same harmony prompt (built here independently), with PNG and DICOM images, in a two-turn conversation, and with
harmony's reasoning effort in the system message (openai-harmony as the oracle)."""
import io

import numpy as np
import pytest
import torch
from PIL import Image

import model as M
import sample
import training
import vision
from data.harmony import render_generation_prompt
from data.tokenizer import CHANNEL, END, MESSAGE, RETURN, START, CALL, decode, encode_ordinary
from test_tokenizer import harmony_enc, ranks_dirs, tok  # noqa: F401  (session fixtures)

pydicom = pytest.importorskip("pydicom")
QUESTION = "Describe the findings."
NEW = 10


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    model = M.MedGPT(training.arch_config("tiny")).float().eval()
    path = tmp_path_factory.mktemp("tiny_medgpt")
    model.save_pretrained(path)
    return str(path), M.MedGPT.from_pretrained(path, dtype=torch.float32)


@pytest.fixture(scope="module")
def ct_file():
    return pydicom.data.get_testdata_file("CT_small.dcm")


def ct_pixels(path):
    """The first frame in Hounsfield units, straight from pydicom (the oracle for sample.open_image)."""
    ds = pydicom.dcmread(path)
    return ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)


@pytest.fixture(scope="module")
def png_file(ct_file, tmp_path_factory):
    path = tmp_path_factory.mktemp("png") / "ct.png"
    vision.to_rgb(Image.fromarray(ct_pixels(ct_file), mode="F")).save(path)
    return str(path)


def final_header(tok):
    return [CHANNEL] + encode_ordinary(tok, "final") + [MESSAGE]


def greedy(model, tok, messages, images, window=None):
    """MedGPT.generate's greedy answer to the harmony prompt of `messages` (final channel opened), as eval does."""
    tiles = [vision.image_to_tiles(im, 1, model.config.vision.image_size, window=window,
                                   preprocessing=model.config.preprocessing) for im in images]
    prompt = render_generation_prompt(tok, messages, [len(t) * model.tokens_per_tile for t in tiles],
                                      model.image_token_id).ids + final_header(tok)
    out = model.generate(torch.tensor([prompt]), pixel_values=torch.cat(tiles) if tiles else None,
                         max_new_tokens=NEW, temperature=0.0, stop_tokens=[RETURN, END, CALL])
    return out[0, len(prompt):].tolist()


def run(argv, stdin=""):
    out = io.StringIO()
    turns = sample.run(sample.parse_args(argv), stdin=io.StringIO(stdin), out=out)
    return turns, out.getvalue()


def shown(tok, ids):
    """What the stream prints for an answer in the final channel: its text up to the first stop token."""
    cut = next((i for i, t in enumerate(ids) if t in (RETURN, END, CALL)), len(ids))
    return decode(tok, ids[:cut])


def test_answer_equals_greedy_generate(saved, tok, png_file):
    path, model = saved
    turns, printed = run(["--model", path, "--image", png_file, f"--max_new_tokens={NEW}", QUESTION])
    want = greedy(model, tok, [{"role": "user", "content": "<image>\n" + QUESTION}], [Image.open(png_file)])
    assert turns == [want]
    assert printed == shown(tok, want) + "\n"


def test_dicom_with_a_window(saved, tok, ct_file, png_file):
    path, model = saved
    im = sample.open_image(ct_file)
    assert im.mode == "F" and np.array_equal(np.asarray(im), ct_pixels(ct_file))
    turns, _ = run(["--model", path, "--image", ct_file, "--window=40,400", "--image", png_file,
                    f"--max_new_tokens={NEW}", QUESTION])
    images = [Image.fromarray(ct_pixels(ct_file), mode="F"), Image.open(png_file)]
    # the window applies to the 16-bit DICOM only; the PNG is 8-bit RGB
    tiles = sample.image_tiles(model, [ct_file], 1, (40.0, 400.0))[0]
    assert torch.equal(tiles, vision.image_to_tiles(images[0], 1, 112, window=(40, 400),
                                                    preprocessing=model.config.preprocessing))
    with pytest.raises(SystemExit, match="applies to DICOM"):
        run(["--model", path, "--image", png_file, "--window=40,400", QUESTION])
    with_window = torch.cat([tiles, sample.image_tiles(model, [png_file], 1, None)[0]])
    prompt = sample.prompt_ids(model, True, tok, [{"role": "user", "content": "<image>\n<image>\n" + QUESTION}],
                               [model.tokens_per_tile] * 2, None)
    out = model.generate(torch.tensor([prompt]), pixel_values=with_window, max_new_tokens=NEW, temperature=0.0,
                         stop_tokens=[RETURN, END, CALL])
    assert turns == [out[0, len(prompt):].tolist()]


def test_interactive_two_turns(saved, tok, png_file):
    path, model = saved
    turns, printed = run(["--model", path, "--image", png_file, f"--max_new_tokens={NEW}", "--interactive"],
                         stdin="Is there a fracture?\n\nWhat else?\n")
    assert len(turns) == 2 and printed.count("> ") == 2
    first_user = {"role": "user", "content": "<image>\nIs there a fracture?"}
    first = greedy(model, tok, [first_user], [Image.open(png_file)])
    assert turns[0] == first
    history = [first_user, {"role": "assistant", "content": shown(tok, first).strip()},
               {"role": "user", "content": "What else?"}]
    assert turns[1] == greedy(model, tok, history, [Image.open(png_file)])


@pytest.mark.parametrize("effort", ["low", "high"])
def test_reasoning_prompt_is_harmonys(saved, tok, harmony_enc, effort):
    from openai_harmony import Conversation, Message, ReasoningEffort, Role, SystemContent
    path, model = saved
    system = SystemContent.new().with_reasoning_effort(ReasoningEffort(effort.capitalize()))
    conversation = Conversation.from_messages([Message.from_role_and_content(Role.SYSTEM, system),
                                               Message.from_role_and_content(Role.USER, QUESTION)])
    want = harmony_enc.render_conversation_for_completion(conversation, Role.ASSISTANT)
    messages = [{"role": "system", "content": sample.system_prompt_text(reasoning_effort=effort)},
                {"role": "user", "content": QUESTION}]
    assert sample.prompt_ids(model, True, tok, messages, [], effort) == want
    turns, _ = run(["--model", path, f"--reasoning={effort}", "--max_new_tokens=4", QUESTION])
    prompt = want
    out = model.generate(torch.tensor([prompt]), max_new_tokens=4, temperature=0.0, stop_tokens=[RETURN, CALL])
    assert turns == [out[0, len(prompt):].tolist()]


@pytest.mark.parametrize("show_reasoning", [False, True])
def test_analysis_channel_shown_only_when_asked(tok, show_reasoning):
    ids = ([CHANNEL] + encode_ordinary(tok, "analysis") + [MESSAGE] + encode_ordinary(tok, "Opacity, left base.")
           + [END, START] + encode_ordinary(tok, "assistant") + [CHANNEL] + encode_ordinary(tok, "final") + [MESSAGE]
           + encode_ordinary(tok, "Left lower lobe pneumonia — likely.") + [RETURN])
    out = io.StringIO()
    stream = sample.Stream(tok, out, opened_final=False, show_reasoning=show_reasoning)
    for t in ids:
        stream(torch.tensor([t]))
    final = "Left lower lobe pneumonia — likely.\n"
    assert out.getvalue() == ("[reasoning] Opacity, left base.\n" + final if show_reasoning else final)
    assert stream.answer == "Left lower lobe pneumonia — likely."


def test_sampling_is_seeded_and_top_k_1_is_greedy(saved, png_file):
    path, _ = saved
    base = ["--model", path, "--image", png_file, f"--max_new_tokens={NEW}", QUESTION]
    greedy_turns, _ = run(base)
    assert run(base + ["--temperature=0.8", "--top_k=1"])[0] == greedy_turns
    assert run(base + ["--temperature=1.5", "--seed=3"])[0] == run(base + ["--temperature=1.5", "--seed=3"])[0]


def test_mxfp4_resident_answers_as_the_dense_model(tmp_path, tok, png_file, saved):
    path, model = saved
    model.save_pretrained(tmp_path / "mxfp4", mxfp4=True)
    base = ["--model", str(tmp_path / "mxfp4"), "--image", png_file, f"--max_new_tokens={NEW}", QUESTION]
    assert run(base + ["--mxfp4"])[0] == run(base)[0]


def test_bad_arguments(saved):
    path, _ = saved
    with pytest.raises(SystemExit):
        sample.parse_args(["--model", path])  # no question and not interactive
    with pytest.raises(SystemExit):
        sample.parse_args(["--model", path, "--show_reasoning", QUESTION])
    with pytest.raises(SystemExit, match="CENTRE,WIDTH"):
        sample.parse_window("40")
    with pytest.raises(SystemExit, match="no such file"):
        sample.open_image("/nonexistent.dcm")
