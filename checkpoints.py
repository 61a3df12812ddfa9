"""Run folders and checkpoints: claiming --output-dir (checks, locks), checkpoint files without pickle, finding
the checkpoint to --resume, the RNG states a checkpoint carries."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
from pathlib import Path

import torch

from common import DistillError

# -- output folders: checks, locks, checkpoint files --------------------------------------------------------------

LOCK_NAME = ".lock"  # in a run's --output-dir (and a cache folder), held while the run lives
_HELD_LOCKS: dict[str, int] = {}  # resolved lock path -> open descriptor, for the locks this process holds


def check_output_path(path: Path, flag: str, *, folder: bool) -> None:
    """Refuse, before any work is done, an output that cannot be written: a file where a folder is wanted (or
    the reverse), a parent that is a file, a place without write permission."""
    path = Path(path)
    if path.exists():
        if folder and not path.is_dir():
            raise DistillError(f"{flag} '{path}' is a file, not a folder")
        if not folder and path.is_dir():
            raise DistillError(f"{flag} '{path}' is a folder; give the path of a file to write")
        target = path
    else:
        target = path.absolute().parent
        while not target.exists():
            target = target.parent
        if not target.is_dir():
            raise DistillError(f"{flag} '{path}': '{target}' is a file, so no folder can be made there")
    if not os.access(target, os.W_OK | (os.X_OK if target.is_dir() else 0)):
        raise DistillError(f"{flag} '{path}': no permission to write to '{target}'")


def lock_output(lock_path: Path, flag: str, output: Path, *, record_pid: bool = True) -> None:
    """Hold an exclusive lock on `lock_path` (created if absent) until `unlock_output` or the end of this process,
    so that a second run writing the same output is refused instead of interleaving its files with this one's.
    An advisory lock (flock): the kernel drops it when the process dies, so a killed run leaves no stale lock."""
    try:
        import fcntl
    except ImportError:  # not POSIX: runs are not guarded against each other
        return
    # A run of this process that ended in an exception (a test, a notebook) may still hold it: take it back.
    unlock_output(lock_path)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.read(fd, 32).decode(errors="replace").strip() if record_pid else ""
        os.close(fd)
        raise DistillError(f"{flag} '{output}' is in use by another run{f' (pid {holder})' if holder else ''}: "
                           f"wait for it to end, or choose another {flag}") from None
    if record_pid:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
    _HELD_LOCKS[str(Path(lock_path).resolve())] = fd


def unlock_output(lock_path: Path) -> None:
    fd = _HELD_LOCKS.pop(str(Path(lock_path).resolve()), None)
    if fd is not None:
        os.close(fd)


def file_fingerprint(path: str | Path) -> str:
    """A hash of a file's bytes (streamed)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def save_state(obj, folder: Path, name: str) -> None:
    """Write `obj` as NAME.json, with its tensors in NAME.tensors (safetensors format). No pickle: reading it back
    (`load_state`) can only build dicts, lists, tuples, numbers, strings, numpy arrays and tensors, never run code
    from the file. Holds what optimizer, scheduler and RNG states are made of (dicts with int keys included)."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}

    def encode(x):
        if torch.is_tensor(x):
            key = str(len(tensors))
            tensors[key] = x.detach().cpu().contiguous()
            return {"__tensor__": key}
        if isinstance(x, dict):
            if all(isinstance(k, str) for k in x):
                return {k: encode(v) for k, v in x.items()}
            return {"__items__": [[encode(k), encode(v)] for k, v in x.items()]}
        if isinstance(x, tuple):
            return {"__tuple__": [encode(v) for v in x]}
        if isinstance(x, list):
            return [encode(v) for v in x]
        if type(x).__module__ == "numpy":
            return {"__ndarray__": x.tolist(), "dtype": str(x.dtype)} if hasattr(x, "shape") and x.shape else x.item()
        if x is None or isinstance(x, (bool, int, float, str)):
            return x
        raise TypeError(f"save_state: cannot store a {type(x).__name__}")

    text = json.dumps(encode(obj))
    save_file(tensors, folder / f"{name}.tensors")
    (folder / f"{name}.json").write_text(text)


def load_state(folder: Path, name: str):
    """Read what `save_state` wrote."""
    from safetensors.torch import load_file

    tensors = load_file(folder / f"{name}.tensors")

    def decode(x):
        if isinstance(x, list):
            return [decode(v) for v in x]
        if not isinstance(x, dict):
            return x
        if x.keys() == {"__tensor__"}:
            return tensors[x["__tensor__"]]
        if x.keys() == {"__tuple__"}:
            return tuple(decode(v) for v in x["__tuple__"])
        if x.keys() == {"__items__"}:
            return {decode(k): decode(v) for k, v in x["__items__"]}
        if x.keys() == {"__ndarray__", "dtype"}:
            import numpy as np

            return np.array(x["__ndarray__"], dtype=np.dtype(x["dtype"]))
        return {k: decode(v) for k, v in x.items()}

    try:
        return decode(json.loads((folder / f"{name}.json").read_text()))
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DistillError(f"--resume '{folder}': {name} is damaged ({type(err).__name__}: {err})") from None


def complete_checkpoints(folder: Path) -> list[Path]:
    """The complete checkpoint-N folders in `folder`, oldest first."""
    found = [p for p in Path(folder).glob("checkpoint-*")
             if p.name.split("-")[1].isdigit() and (p / "trainer_state.json").exists()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def find_checkpoint(path: str | Path) -> Path:
    """--resume PATH: PATH itself when it is a checkpoint, else the latest complete checkpoint in it."""
    folder = Path(path)
    older = ("was written by an older version as a pickle (trainer_state.pt), which is not loaded: unpickling a "
             "file can run any code in it. Continue it with the version that wrote it, or start a new run")
    if (folder / "trainer_state.json").exists():
        return folder
    if (folder / "trainer_state.pt").exists():
        raise DistillError(f"--resume '{folder}' {older}")
    found = complete_checkpoints(folder)
    if found:
        return found[-1]
    if any((p / "trainer_state.pt").exists() for p in folder.glob("checkpoint-*")):
        raise DistillError(f"--resume '{folder}': its checkpoints {older}")
    raise DistillError(f"--resume '{path}': no complete checkpoint there (checkpoint-N with trainer_state.json)")


# --resume compares the new run's settings (`TrainLoop._run_settings`) with the checkpoint's. Where and how often
# to write, and paths whose content is compared instead, are not compared; the schedule, evaluation and numerics
# may change (applied, reported, recorded); every other difference changes what is trained and is refused.
_RESUME_IGNORED = {"output_dir", "resume", "overwrite", "save_every", "save_total_limit", "log_every", "report_to",
                   "chunk_size", "eval_batch_size", "gradient_checkpointing", "trust_remote_code", "vllm",
                   "vllm_gpu_memory", "min_exact_alignment"}
_RESUME_ADJUSTABLE = {"lr", "weight_decay", "warmup_ratio", "max_steps", "epochs", "max_grad_norm", "eval_every",
                      "eval_data", "eval_data_content", "eval_problems", "eval_max_new_tokens", "eval_system_prompt",
                      "save_best", "dtype", "teacher_dtype", "bf16", "data", "student", "teacher", "teacher_cache"}
_SETTING_NAMES = {"data_content": "--data content", "eval_data_content": "--eval-data content",
                  "student_content": "--student weights/tokenizer", "teacher_content": "--teacher weights/tokenizer",
                  "teacher_cache_content": "--teacher-cache teacher/store/K/dtype", "training_rows": "training rows",
                  "processes": "processes"}




def _get_rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    with contextlib.suppress(ImportError):
        import numpy as np

        state["numpy"] = np.random.get_state()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])
