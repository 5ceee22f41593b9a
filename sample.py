"""
Ask the model about images from the command line (nanoGPT's sample.py for MedGPT-oss):

    python sample.py --model out/stage3/final --image cxr.png "Describe the findings."
    python sample.py --model DIR --image a.dcm --window=40,400 --image b.png "Compare the two images."
    python sample.py --model DIR --interactive --reasoning=high --show_reasoning

Design choices
- The prompt is harmony's, built by data.harmony.render_generation_prompt as eval.py builds it: one `<image>` line
  per image before the first question (LLaVA's layout), each image tiled and preprocessed by the checkpoint's own
  vision settings (vision.image_to_tiles). Without --reasoning the prompt opens the final channel (eval.Encoder's
  final_header): the model answers at once and stops at <|return|> or <|end|>. With --reasoning the harmony system
  message carries the reasoning effort (data.harmony.system_prompt_text) and the model writes its analysis channel
  first, shown only with --show_reasoning.
- Streaming: GPT.generate's on_token callback gets each new token; the text of the current message is decoded
  again as it grows and the new part printed (a character split across tokens waits for its last byte). The
  decoding path is generate's own (KV cache, the CPU fast path), so the answer's tokens are generate's.
- --interactive: one question per stdin line; the images go with the first; each answer (its final channel)
  joins the history as an assistant turn, so later questions see the conversation (earlier analysis is dropped,
  as harmony does).
- DICOM (.dcm, or a file with DICM at byte 128): read with pydicom (optional, imported lazily) as data.demo reads
  its sources (modality rescale, MONOCHROME1 inverted, first frame), then windowed by --window=C,W if given
  (the window applies to every DICOM or 16/32-bit greyscale image; 8-bit images are shown as they are).
- Patient text (questions, answers) goes to stdout only: nothing is logged or written anywhere else.
"""
import argparse
import json
import os
import sys

import numpy as np
import torch
from PIL import Image

import eval as evaluation
import model as modeling
import vision
from data import demo
from data.harmony import render_generation_prompt, system_prompt_text
from data.tokenizer import CALL, CHANNEL, END, MESSAGE, RETURN, START, decode

# ----------------------------------------------------------------------------------------------------------
# Model and images


def load_model(path, dtype, device, mxfp4=False):
    """(model, is_multimodal) for a LLaVA-format MedGPT directory or a gpt-oss one; mxfp4: experts kept MXFP4."""
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise SystemExit(f"--model {path}: no config.json; expected a LLaVA-format MedGPT directory (train_stage*.py's "
                         f"<out_dir>/final) or a gpt-oss directory")
    with open(config_path) as f:
        model_type = json.load(f).get("model_type")
    if model_type not in ("llava", "gpt_oss"):
        raise SystemExit(f"{config_path}: model_type {model_type!r}; expected 'llava' (MedGPT) or 'gpt_oss'")
    cls = modeling.MedGPT if model_type == "llava" else modeling.GPT
    return cls.from_pretrained(path, dtype=dtype, device=device, mxfp4_resident=mxfp4).eval(), model_type == "llava"


def is_dicom(path):
    if path.lower().endswith((".dcm", ".dicom")):
        return True
    with open(path, "rb") as f:
        return f.read(132)[128:] == b"DICM"  # the DICOM preamble: 128 bytes, then the magic


def open_image(path):
    """A PIL image of a PNG/JPEG/... file or of a DICOM file's first frame ('F' mode for greyscale: windowable)."""
    if not os.path.isfile(path):
        raise SystemExit(f"--image {path}: no such file")
    if not is_dicom(path):
        return Image.open(path)
    try:
        import pydicom  # noqa: F401  (data.demo.read_dicom imports it; checked here for sample.py's message)
    except ImportError:
        raise SystemExit(f"--image {path} is a DICOM file; reading it needs pydicom: pip install pydicom") from None
    frames, _ = demo.read_dicom(path, checks=())  # (N, H, W) float32 after the modality rescale, or (N, H, W, 3)
    first = frames[0]
    return Image.fromarray(first.astype(np.float32), mode="F") if first.ndim == 2 else Image.fromarray(first)


def parse_window(text):
    if text is None:
        return None
    try:
        centre, width = (float(v) for v in text.split(","))
    except ValueError:
        raise SystemExit(f"--window={text!r}: expected CENTRE,WIDTH, e.g. --window=40,400") from None
    return centre, width


def image_tiles(model, paths, max_tiles, window):
    """(pixel_values (n_tiles, 3, S, S) or None, image tokens per image) for the images, in order."""
    if not paths:
        return None, []
    images = [open_image(path) for path in paths]
    # the window is in the pixel units of high bit-depth greyscale (DICOM): 8-bit images are shown as they are
    windowable = [image.mode == "F" or image.mode.startswith("I") for image in images]
    if window is not None and not any(windowable):
        raise SystemExit(f"--window applies to DICOM or 16/32-bit greyscale images; none of {paths} is one")
    tiles = [vision.image_to_tiles(image, max_tiles, model.config.vision.image_size,
                                   window=window if can else None, preprocessing=model.config.preprocessing)
             for image, can in zip(images, windowable)]
    return torch.cat(tiles), [t.shape[0] * model.tokens_per_tile for t in tiles]


# ----------------------------------------------------------------------------------------------------------
# Streaming the answer


class Stream:
    """Follows harmony's structure in the new tokens (channel headers, message bodies) and prints the final
    channel's text as it grows (and the analysis channel's, with show_reasoning), to `out`."""

    def __init__(self, tok, out, opened_final, show_reasoning):
        self.tok, self.out, self.show_reasoning = tok, out, show_reasoning
        self.ids = []  # every new token
        self.channel = "final" if opened_final else None
        self.header, self.body, self.printed, self.in_body = [], [], "", opened_final
        self.answer = ""

    def __call__(self, token):
        t = int(token[0])
        self.ids.append(t)
        if t in (END, RETURN, CALL, START):
            self.close()
        elif t == CHANNEL:
            self.header, self.in_body = [], False
        elif t == MESSAGE:
            self.channel, self.body, self.printed, self.in_body = decode(self.tok, self.header).strip(), [], "", True
            if self.channel == "analysis" and self.show_reasoning:
                self.out.write("[reasoning] ")
        elif self.in_body:
            self.body.append(t)
            self.show()
        else:
            self.header.append(t)

    def visible(self):
        return self.channel == "final" or (self.channel == "analysis" and self.show_reasoning)

    def show(self):
        text = decode(self.tok, self.body)
        if text.endswith("\ufffd"):  # a character whose bytes are not all here yet
            return
        if self.visible():
            self.out.write(text[len(self.printed):])
            self.out.flush()
        self.printed = text

    def close(self):
        """A message ends: remember the final answer, end the printed line."""
        if self.in_body:
            text = decode(self.tok, self.body)
            if self.visible():
                self.out.write(text[len(self.printed):] + "\n")
                self.out.flush()
            if self.channel == "final":
                self.answer = text.strip()
        self.header, self.body, self.printed, self.in_body = [], [], "", False


def prompt_ids(model, is_multimodal, tok, messages, image_tokens, reasoning):
    """The harmony prompt of the next assistant turn, as eval.py builds it (the final channel opened unless the
    model reasons first)."""
    image_token_id = model.image_token_id if is_multimodal else modeling.IMAGE_TOKEN_ID
    rendered = render_generation_prompt(tok, messages, image_tokens, image_token_id)
    return rendered.ids + evaluation.Encoder(tok, reasoning=bool(reasoning)).final_header


def answer(model, is_multimodal, tok, messages, pixel_values, image_tokens, args, out=sys.stdout):
    """Generate one assistant turn after `messages`, streaming it to `out`; returns (new token ids, final text)."""
    prompt = prompt_ids(model, is_multimodal, tok, messages, image_tokens, args.reasoning)
    weight = next(model.parameters())
    input_ids = torch.tensor([prompt], dtype=torch.long, device=weight.device)  # (1, T)
    stream = Stream(tok, out, opened_final=not args.reasoning, show_reasoning=args.show_reasoning)
    # with reasoning, <|end|> closes the analysis message and decoding goes on to the final one (as eval.py)
    stop_tokens = [RETURN, CALL] if args.reasoning else [RETURN, END, CALL]
    generator = torch.Generator(weight.device).manual_seed(args.seed)
    kwargs = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                  stop_tokens=stop_tokens, generator=generator, on_token=stream)
    if is_multimodal:
        pixels = None if pixel_values is None else pixel_values.to(weight.device, weight.dtype)
        out_ids = model.generate(input_ids, pixel_values=pixels, **kwargs)
    else:
        out_ids = model.generate(input_ids, **kwargs)
    if stream.in_body:  # max_new_tokens reached inside a message
        stream.close()
    return out_ids[0, len(prompt):].tolist(), stream.answer


def first_question(text, n_images):
    """The first user turn: one <image> line per image before the question (LLaVA's layout)."""
    return "<image>\n" * n_images + text


def run(args, stdin=sys.stdin, out=sys.stdout):
    """Answer the question (or, with --interactive, each stdin line); returns the new token ids of every turn."""
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype or (
        "bfloat16" if args.device.startswith("cuda") else "float32")]
    model, is_multimodal = load_model(args.model, dtype, args.device, args.mxfp4)
    if args.image and not is_multimodal:
        raise SystemExit(f"--image needs a MedGPT (LLaVA-format) model; {args.model} is a text-only gpt-oss model")
    tok = evaluation.load_tokenizer_for(args.model)
    pixel_values, image_tokens = image_tiles(model, args.image, args.max_tiles, parse_window(args.window)) \
        if is_multimodal else (None, [])
    history = [{"role": "system", "content": system_prompt_text(reasoning_effort=args.reasoning)}] \
        if args.reasoning else []
    questions = iter([args.prompt]) if not args.interactive else (line.rstrip("\n") for line in stdin)
    turns, first = [], True
    for question in questions:
        if not question.strip():
            continue
        if args.interactive:
            out.write(f"> {question}\n")
        history.append({"role": "user", "content": first_question(question, len(args.image)) if first else question})
        ids, text = answer(model, is_multimodal, tok, history, pixel_values, image_tokens, args, out)
        history.append({"role": "assistant", "content": text})
        turns.append(ids)
        first = False
    return turns


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Ask a MedGPT-oss model about images; the answer streams to stdout.")
    p.add_argument("prompt", nargs="?", help="the question (omit with --interactive)")
    p.add_argument("--model", required=True, help="checkpoint directory (LLaVA-format MedGPT, or gpt-oss text-only)")
    p.add_argument("--image", action="append", default=[],
                   help="an image file (PNG, JPEG, ... or DICOM); repeat for several, in prompt order")
    p.add_argument("--window", default=None,
                   help="window CENTRE,WIDTH (pixel units, e.g. Hounsfield: 40,400) for the DICOM / 16-bit images")
    p.add_argument("--max_tiles", type=int, default=1, help="image tiles per image (1 = plain LLaVA-1.5)")
    p.add_argument("--interactive", action="store_true", help="a conversation: one question per stdin line")
    p.add_argument("--reasoning", choices=["low", "medium", "high"], default=None,
                   help="harmony's reasoning effort (a system message); the model thinks before it answers")
    p.add_argument("--show_reasoning", action="store_true", help="print the analysis channel too")
    p.add_argument("--max_new_tokens", type=int, default=512)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top_k", type=int, default=None, help="sample from the k most likely tokens")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling (temperature > 0)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--mxfp4", action="store_true",
                   help="keep the experts in MXFP4 (4.25 bits a weight; the 20B's weights in ~13 GB)")
    args = p.parse_args(argv)
    if args.interactive == bool(args.prompt):
        p.error("give a question, or --interactive (questions on stdin), not both")
    if args.show_reasoning and not args.reasoning:
        p.error("--show_reasoning needs --reasoning=low|medium|high")
    if args.temperature < 0:
        p.error(f"--temperature={args.temperature}: must be >= 0")
    return args


def main(argv=None):
    run(parse_args(argv))


if __name__ == "__main__":
    main()
