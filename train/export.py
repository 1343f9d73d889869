"""python -m train.export (make export): a checkpoint as a Hugging Face model directory.

    python -m train.export checkpoint=out/sft out=my-model/

and then, in any program with transformers:

    tok = AutoTokenizer.from_pretrained("my-model/")
    model = AutoModelForCausalLM.from_pretrained("my-model/")
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=100)        # stops at <|end|> or <|eos|>
    pipeline("text-generation", model="my-model/")(messages)

The folder holds
    config.json, model.safetensors,   the language model as a GPT2LMHeadModel (model/hf.py),
    generation_config.json            or for the Llama family a LlamaForCausalLM or, with
                                      QK-norm, a Qwen3ForCausalLM (model/hf_llama.py), whatever
                                      kind the checkpoint holds; generate stops at <|eos|>
                                      and <|end|>
    tokenizer.json,                   the checkpoint's tokenizer (either kind) with our chat
    tokenizer_config.json             format as its chat template (tokenizer/hf.py)
    handgpt.json,                     what Hugging Face's format has no place for, so that
    handgpt_tokenizer.bin             init_from=my-model/ gives back this very model
                                      (train/core/pretrained.py)

It is written into a temporary folder beside `out` and renamed when complete, so a killed
export leaves no half-written model; an existing `out` is replaced only with overwrite=true.
"""

import json
import shutil
from pathlib import Path

import torch

from command import entry_point
from errors import UserError
from model import GPT, hf, hf_llama
from tokenizer.base import Tokenizer
from tokenizer.hf import save_hf_tokenizer

from .core.checkpoint import load_model
from .core.files import disk_error, write_error
from .core.pretrained import EXPORT_FORMAT, EXPORT_META, EXPORT_TOKENIZER
from .settings import ExportSettings

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
STAGING_SUFFIX = ".export-tmp"


def run(cfg: ExportSettings) -> Path:
    """Export cfg.checkpoint into cfg.out; returns the folder."""
    if not cfg.out:
        raise UserError("give the folder to write: out=my-model/")
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"out={out} is a file; give a folder")
    if out.is_dir() and any(out.iterdir()) and not cfg.overwrite:
        raise UserError(f"{out} is not empty; choose another out, or overwrite=true to replace it")
    model, tok, ckpt = load_model(cfg.checkpoint)
    model = model.to(DTYPES[cfg.dtype])
    staging = out.with_name(out.name + STAGING_SUFFIX)
    shutil.rmtree(staging, ignore_errors=True)  # what a killed export left
    try:
        write_export(model, tok, ckpt, staging)
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    except Exception as e:
        cause = disk_error(e)
        if cause is None:
            raise
        raise write_error(out, cause, setting="out") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(
        f"{ckpt['path']} -> {out}/ ({model.num_params() / 1e6:.1f}M parameters, "
        f"{tok.kind} tokenizer, {cfg.dtype})"
    )
    return out


def write_export(model: GPT, tok: Tokenizer, ckpt: dict, out_dir: Path) -> None:
    """The model, the tokenizer and our metadata (see the module docstring) into out_dir."""
    convert = hf if hf_llama.hf_family(model.config) == "gpt2" else hf_llama
    convert.export_pretrained(
        model,
        out_dir,
        bos_token_id=tok.bos_id,
        eos_token_id=[tok.eos_id, tok.end_id],  # a document ends, a turn ends: stop at either
        pad_token_id=tok.pad_id,
    )
    save_hf_tokenizer(tok, out_dir, model_max_length=model.config.block_size)
    (out_dir / EXPORT_TOKENIZER).write_bytes(tok.to_bytes())
    meta = {
        "format": EXPORT_FORMAT,
        "model_config": model.config.to_dict(),
        "tokenizer": {"kind": tok.kind, "file": EXPORT_TOKENIZER},
        "stage": ckpt.get("stage"),
        "exported_from": ckpt["path"],
    }
    (out_dir / EXPORT_META).write_text(json.dumps(meta, indent=2) + "\n")


@entry_point("export", ExportSettings)
def main(settings: ExportSettings) -> None:
    run(settings)


if __name__ == "__main__":
    main()
