"""python -m train.sample: write text with a trained model, or chat with it.

    python -m train.sample checkpoint=out/pretrain 'prompt="To be, or not"' num_samples=3
    python -m train.sample prompt_file=opening.txt temperature=0
    echo "To be" | python -m train.sample prompt=-
    python -m train.sample mode=chat checkpoint=out/sft      # /reset, /context, /exit
    printf 'Hello\nWho is Hamlet?\n' | python -m train.sample mode=chat checkpoint=out/sft

(Hydra reads a comma as a list of runs: quote a prompt that has one, as above.)

Generate mode continues a prompt the way pretraining documents are laid out: every
document follows an <|eos|>, so the model reads [eos] + encode(prompt), and without a
prompt it starts a fresh document. It stops at <|eos|> (end of document) or <|end|>
(end of a turn). Chat mode renders the history with tokenizer/chat.py, exactly as SFT
trained on it, and asks for the next assistant turn.

Chat keys: /help lists the commands, /reset starts over (the system message stays),
/context says how much of the model's context the conversation uses and how long a reply
may be, /exit (or Ctrl-D) quits. A line starting with "/" and a name is a command, never
sent to the model; an unknown one lists the commands. Ctrl-C during a reply stops that
reply (what was printed stays in the history) and returns to the prompt; Ctrl-C at the
prompt, or a second one, quits (exit 130).
Replies are shown without the space they start with (SFT's replies begin with one: see
data/tasks.py, "Copying"); the history keeps them as the model wrote them. When the
conversation outgrows the context, the oldest turns are dropped, with a note.

Text goes to stdout as it is produced; notes and warnings go to stderr, so a pipe gets
only the text. The decoding itself lives in model/generate.py.
"""

import os
import re
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from command import entry_point
from data.sources import read_utf8_file
from errors import UserError
from model import GPT
from model.generate import completions
from tokenizer.chat import ChatFormatError, drop_oldest_turns, render_prompt
from tokenizer.stream import TextStream

from .core.checkpoint import CHECKPOINT_NAME, load_policy
from .core.decoding import prepare_for_decoding
from .core.runtime import precision_name, setup_runtime
from .settings import SampleSettings

# --------------------------------------------------------------------------- settings


def decoding(s: SampleSettings) -> dict:
    """The decoding settings as plain values (model/generate.py's keywords)."""
    names = ("max_new_tokens", "num_samples", "temperature", "top_k", "top_p")
    return {name: getattr(s, name) for name in names}


def find_checkpoint(path: str | None, root: Path = Path("out")) -> str:
    """The given path, or else the most recently written out/*/ckpt.pt."""
    if path:
        return str(path)
    found = sorted(root.glob(f"*/{CHECKPOINT_NAME}"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise UserError(
            f"no checkpoint found under {root}/ (looked for {root}/*/{CHECKPOINT_NAME}); "
            "train one (make pretrain) or pass checkpoint=PATH"
        )
    return str(found[-1])


def read_prompt(prompt: str | None, prompt_file: str | None) -> str | None:
    """The prompt text from prompt=..., prompt=- (stdin) or prompt_file=...; None if none."""
    if prompt is not None and prompt_file:
        raise UserError("give either prompt or prompt_file, not both")
    if prompt_file:
        path = Path(prompt_file)
        text = read_utf8_file(path, "prompt_file")
        source = f"prompt_file {path}"
    elif prompt is None:
        return None
    elif str(prompt) == "-":
        text, source = sys.stdin.read(), "the prompt read from stdin"
    else:
        text, source = str(prompt), "prompt"
    if not text.strip():
        raise UserError(f"{source} is empty; give some text, or leave prompt out to start afresh")
    return text


# --------------------------------------------------------------------------- streaming


def stream_reply(
    model: GPT,
    tok,
    ids: list[int],
    settings: dict,
    generator: torch.Generator,
    use_cache: bool,
    out: TextStream | None = None,
) -> list[int]:
    """Generate after `ids`, print the text as it comes (through `out`), return the new
    ids (no stop id). Interrupted, `out.ids` holds what was generated so far."""
    out = out if out is not None else TextStream(tok)
    steps = completions(
        model,
        [ids],
        settings["max_new_tokens"],
        settings["temperature"],
        settings["top_k"] or None,
        settings["top_p"],
        stop_ids=(tok.eos_id, tok.end_id),
        use_cache=use_cache,
        generator=generator,
    )
    for (reply,) in steps:  # one more token each step
        if not reply.stopped:  # a stop token ends the reply and is not printed
            sys.stdout.write(out.push(reply.tokens[-1]))
            sys.stdout.flush()
    sys.stdout.write(out.flush())
    sys.stdout.flush()
    return reply.text_tokens


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def crop_to_context(ids: list[int], block_size: int, what: str) -> list[int]:
    """The last block_size ids, with a warning when that cuts anything."""
    if len(ids) <= block_size:
        return ids
    warn(
        f"{what} is {len(ids)} tokens but the model's context is {block_size}; "
        f"keeping its last {block_size} tokens"
    )
    return ids[-block_size:]


# --------------------------------------------------------------------------- the two modes


def sample(
    model: GPT, tok, text: str | None, use_cache: bool, settings: dict, generator: torch.Generator
) -> None:
    """Generate mode: num_samples continuations of the prompt, streamed one after another."""
    ids = [tok.eos_id] + (tok.encode(text) if text is not None else [])
    ids = crop_to_context(ids, model.config.block_size, "the prompt")
    for i in range(settings["num_samples"]):
        if settings["num_samples"] > 1:
            print(f"---------- sample {i + 1} of {settings['num_samples']}", flush=True)
        sys.stdout.write(text or "")
        stream_reply(model, tok, ids, settings, generator, use_cache)
        sys.stdout.write("\n")
        sys.stdout.flush()


def user_messages(interactive: bool) -> Iterator[str]:
    """One user message per line: typed at a prompt, or read from a pipe. Ctrl-C at the
    prompt ends the line first, then quits (KeyboardInterrupt goes on up)."""
    if interactive:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
        while True:
            try:
                yield input("you> ")
            except EOFError:
                print(file=sys.stderr)
                return
            except KeyboardInterrupt:
                print(file=sys.stderr)
                raise
    else:
        for line in sys.stdin:
            yield line.rstrip("\r\n")


def fit_history(tok, history: list[dict], budget: int) -> list[int]:
    """Render the history for the next reply, dropping the oldest turns to fit `budget`
    (tokenizer/chat.py: drop_oldest_turns; the server cuts conversations the same way);
    a note says how many went. Beyond that, crop_to_context cuts the newest message's start.
    """
    ids, kept = drop_oldest_turns(tok, history, budget)
    dropped = sum(m["role"] == "user" for m in history) - sum(m["role"] == "user" for m in kept)
    history[:] = kept
    if dropped:
        print(f"(the context is full: dropped the {dropped} oldest turn(s))", file=sys.stderr)
    return ids


def context_note(tok, history: list[dict], budget: int, block_size: int, reply: int) -> str:
    """What /context says: the context the conversation uses, the room left, the reply's."""
    used = len(render_prompt(tok, history))
    turns = sum(m["role"] == "user" for m in history)
    over = (
        ", and the next reply drops the oldest turns (or cuts a long question's start) to fit"
        if used > budget
        else ""
    )
    return (
        f"(context: the conversation ({turns} question(s)) uses {used} of {block_size} tokens; "
        f"up to {budget} are kept for it, the oldest turns dropped beyond, so "
        f"{max(0, budget - used)} are left{over}; a reply may be {reply} tokens (max_new_tokens))"
    )


# A line whose first word is "/" and a name is a command, never a message to the model.
COMMAND = re.compile(r"/[A-Za-z]\w*")
COMMAND_LIST = (
    "commands: /help lists them; /reset starts over (the system message stays); /context "
    "shows how much of the context the conversation uses; /exit (or Ctrl-D) quits"
)


def chat(
    model: GPT,
    tok,
    s: SampleSettings,
    settings: dict,
    generator: torch.Generator,
    messages: Iterable[str] | None = None,
) -> None:
    """Chat mode: a conversation loop with /help, /reset, /context, /exit and Ctrl-C."""
    block_size = model.config.block_size
    # Leave room for a reply: at most half the context, so that some history survives.
    budget = block_size - min(settings["max_new_tokens"], block_size // 2)
    opening = [{"role": "system", "content": str(s.system)}] if s.system else []
    history = list(opening)
    interactive = sys.stdin.isatty()
    if interactive:
        print(
            "chat: type a message; /help lists the commands, /reset starts over, /context "
            "shows the context used, /exit (or Ctrl-D) quits; Ctrl-C stops a reply (up to "
            f"{settings['max_new_tokens']} "
            f"tokens; context {block_size} tokens, the oldest turns dropped when it is full)",
            file=sys.stderr,
        )
    for line in messages if messages is not None else user_messages(interactive):
        message = line.strip()
        if not message:
            continue
        command = message.split()[0] if COMMAND.fullmatch(message.split()[0]) else None
        if command == "/exit":
            break
        if command == "/reset":
            history = list(opening)
            print("(conversation reset)", file=sys.stderr, flush=True)
            continue
        if command == "/context":
            note = context_note(tok, history, budget, block_size, settings["max_new_tokens"])
            print(note, file=sys.stderr, flush=True)
            continue
        if command is not None:  # /help, or one that does not exist: never sent to the model
            unknown = "" if command == "/help" else f"unknown command {command}; "
            print(f"({unknown}{COMMAND_LIST})", file=sys.stderr, flush=True)
            continue
        if not interactive:
            print(f"you> {message}")
        history.append({"role": "user", "content": message})
        reply = reply_to(model, tok, history, budget, s.use_cache, settings, generator)
        history.append({"role": "assistant", "content": tok.decode(reply)})


def reply_to(
    model, tok, history, budget: int, use_cache: bool, settings: dict, generator
) -> list[int]:
    """Stream the assistant's reply to the history; Ctrl-C stops it and keeps its start."""
    try:
        ids = fit_history(tok, history, budget)
    except ChatFormatError as e:
        raise UserError(f"cannot render the conversation: {e}") from None
    ids = crop_to_context(ids, model.config.block_size, "the conversation")
    sys.stdout.write("assistant> ")
    out = TextStream(tok, lstrip=True)  # replies start with a space: not after "> "
    stopped = False
    try:
        reply = stream_reply(model, tok, ids, settings, generator, use_cache, out)
    except KeyboardInterrupt:  # stop this reply only; a second Ctrl-C (at the prompt) quits
        sys.stdout.write(out.flush())
        reply, stopped = out.ids, True
    sys.stdout.write("\n")
    sys.stdout.flush()
    if stopped:
        print("(reply stopped; Ctrl-C at the prompt quits)", file=sys.stderr, flush=True)
    return reply


# --------------------------------------------------------------------------- entry point


def run(s: SampleSettings) -> None:
    settings = decoding(s)
    text = read_prompt(s.prompt, s.prompt_file) if s.mode == "generate" else None  # fail early
    rt = setup_runtime(s.device, s.precision, s.seed)
    model, tok, ckpt = load_policy(find_checkpoint(s.checkpoint))
    # Inference only: the weights themselves go to the compute dtype (no autocast), so
    # bf16/fp16 halve the bytes read per token; decoding is bound by reading the weights.
    model = prepare_for_decoding(model.to(device=rt.device, dtype=rt.dtype))
    print(
        f"{ckpt['path']}: {model.num_params() / 1e6:.1f}M parameters, context "
        f"{model.config.block_size}, on {rt.device} in {precision_name(rt.dtype)}",
        file=sys.stderr,
        flush=True,
    )
    generator = torch.Generator(device=rt.device).manual_seed(int(s.seed))
    if s.mode == "chat":
        chat(model, tok, s, settings, generator)
    else:
        sample(model, tok, text, s.use_cache, settings, generator)


@entry_point("sample", SampleSettings)
def main(settings: SampleSettings) -> None:
    try:
        run(settings)
    except BrokenPipeError:  # the reader went away (| head): stop quietly, as Python suggests
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)


if __name__ == "__main__":
    main()
