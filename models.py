"""Loading the student and teacher: dtypes, tokenizers, models (hub id or local folder), LoRA, the output head and
final hidden states the chunked losses start from."""

from __future__ import annotations

import contextlib
import hashlib
import random
from pathlib import Path

import torch

from common import DistillError, check_source, fingerprint, first_line


def resolve_dtype(name: str | None, device: torch.device | str = "cpu") -> torch.dtype:
    if name in (None, "auto"):
        on_gpu = torch.device(device).type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if on_gpu else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]



def load_tokenizer(name: str, *, trust_remote_code: bool = False, what: str = "model"):
    from transformers import AutoTokenizer

    check_source(name, what)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:  # ValueError: a folder without tokenizer files, an unknown model type
        raise DistillError(f"cannot load the tokenizer of {what} '{name}': {first_line(err)}") from None
    if tokenizer.pad_token_id is None:
        # Padding is always masked by position (attention_mask / loss_mask), never by token id, so reusing EOS as
        # the pad token cannot hide the real EOS from the loss (the TRL <1.9 pad==eos bug).
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(name: str, *, dtype: str | None = "auto", trust_remote_code: bool = False,
               device: torch.device | str = "cpu", what: str = "model"):
    """Load a causal LM and its tokenizer from a hub id or a local folder."""
    from transformers import AutoModelForCausalLM

    check_source(name, what, model=True)
    tokenizer = load_tokenizer(name, trust_remote_code=trust_remote_code, what=what)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            name, dtype=resolve_dtype(dtype, device), trust_remote_code=trust_remote_code)
    except OSError as err:
        raise DistillError(f"cannot load {what} '{name}': {err}") from None
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model.to(device), tokenizer


# What of a model folder decides its outputs: weights, config, tokenizer and template (not READMEs).
_MODEL_FILE_SUFFIXES = (".safetensors", ".bin", ".index.json", ".jinja", ".model")
_MODEL_FILE_NAMES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                     "added_tokens.json", "vocab.json", "merges.txt", "chat_template.json")


def model_fingerprint(name: str) -> str:
    """A cheap content fingerprint of a model (hub id or folder): equal means the same weights and tokenizer.

    Small files are hashed whole; each weight file by its size, its first and last MiB (a safetensors header names
    every tensor's shape and dtype) and 128 blocks of 4 KiB spread over it, so a 15 GB checkpoint costs
    milliseconds. Training changes nearly every weight, so two fine-tunes of one base never share the samples.
    A hub id is fingerprinted from its cached snapshot; one not cached locally by its name alone.
    """
    folder = Path(name).expanduser()
    if not folder.is_dir():
        try:
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(name, local_files_only=True))
        except Exception:  # not cached (or not a hub id): nothing local to read
            return fingerprint(f"hub:{name}")
    digest = hashlib.sha1()
    for path in sorted(folder.iterdir()):
        if not path.is_file() or not (path.name in _MODEL_FILE_NAMES or path.name.endswith(_MODEL_FILE_SUFFIXES)):
            continue
        size = path.stat().st_size
        digest.update(f"{path.name}:{size}\n".encode())
        with path.open("rb") as f:
            if size <= 4 * 2**20:
                digest.update(f.read())
                continue
            offsets = [0, size - 2**20] + [size * i // 129 for i in range(1, 129)]
            for offset in offsets:
                f.seek(offset)
                digest.update(f.read(2**20 if offset in offsets[:2] else 4096))
    return digest.hexdigest()[:16]


def maybe_lora(model, args):
    """Wrap the student in a LoRA adapter when --lora is given (peft is only imported then).

    A --student folder that holds a LoRA adapter (a --lora run's output) is refused: transformers loads it as its
    base with the adapter attached, and training on that would save a new adapter (or the base's weights) that
    names only the base, so what the adapter learned would be silently left behind."""
    if getattr(model, "_hf_peft_config_loaded", False):
        name = args.student  # the model itself names its base
        raise DistillError(
            f"--student '{name}' is a LoRA adapter (adapter_config.json), not a model: training on it would drop "
            "what the adapter learned. Merge it into its base first and pass the merged folder: python -c \"from "
            "peft import AutoPeftModelForCausalLM as M; from transformers import AutoTokenizer as T; "
            f"a = '{name}'; M.from_pretrained(a).merge_and_unload().save_pretrained(a + '_merged'); "
            "T.from_pretrained(a).save_pretrained(a + '_merged')\"")
    if not args.lora:
        return model
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise DistillError("--lora needs peft: pip install peft") from None
    targets = args.lora_target_modules
    targets = targets if targets == "all-linear" else [t.strip() for t in targets.split(",") if t.strip()]
    config = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                        target_modules=targets, task_type="CAUSAL_LM")
    model = get_peft_model(model, config)
    model.print_trainable_parameters()
    return model


def output_head(model) -> torch.nn.Module:
    """The vocabulary projection (lm_head) of a causal LM, through DDP/peft wrappers."""
    inner = getattr(model, "module", model)
    return inner.get_output_embeddings()


def student_hidden_states(model, input_ids, attention_mask) -> torch.Tensor:
    """Hidden states after the final norm, [B, T, H], of the model being trained, keeping autograd.

    We go through the top-level forward (so DDP/FSDP hooks run) and ask it to project only the last position
    (`logits_to_keep=1`); the loss then projects masked positions chunk by chunk itself.
    """
    out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True,
                logits_to_keep=1, use_cache=False)
    return out.hidden_states[-1]


def teacher_hidden_states(model, input_ids, attention_mask) -> torch.Tensor:
    """Final hidden states [B, T, H] of a model not being trained (the teacher; a student under evaluation).

    Callers run it under inference mode. It calls the backbone directly: such a model is never wrapped by DDP, so
    no hooks are skipped, and the per-layer hidden states that `output_hidden_states` would keep alive are never
    collected. The student's training forward cannot take this shortcut (see `student_hidden_states`).
    """
    inner = getattr(model, "module", model)
    if hasattr(inner, "get_base_model"):  # a peft-wrapped student
        inner = inner.get_base_model()
    return inner.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state


def frozen_teacher(model) -> torch.nn.Module:
    """Put the teacher in eval mode with no gradients; it is never wrapped for training."""
    model.eval()
    model.requires_grad_(False)
    return model


def load_teacher(args, device):
    """The frozen teacher (--teacher, in --teacher-dtype or --dtype) on `device`, and its tokenizer."""
    teacher, tokenizer = load_model(args.teacher, dtype=args.teacher_dtype or args.dtype, device=device,
                                    what="--teacher", trust_remote_code=args.trust_remote_code)
    return frozen_teacher(teacher), tokenizer


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    with contextlib.suppress(ImportError):
        import numpy as np

        np.random.seed(seed)
