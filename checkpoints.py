"""Run folders and checkpoints: claiming --output-dir (checks, locks), checkpoint files without pickle, finding
the checkpoint to --resume, the RNG states a checkpoint carries."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
import signal
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch

from common import DistillError
from models import model_fingerprint

# -- output folders: checks, locks, checkpoint files --------------------------------------------------------------

LOCK_NAME = ".lock"  # in a run's --output-dir (and a cache folder), held while the run lives
_HELD_LOCKS: dict[str, list[int]] = {}  # resolved lock path -> open descriptors, for the locks this process holds


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
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    except FileNotFoundError:  # a run refused at start removed the folder it had just made
        raise DistillError(f"{flag} '{output}' was removed by another run while this one claimed it: start this "
                           "run again") from None
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
    _HELD_LOCKS[str(Path(lock_path).resolve())] = [fd]


def unlock_output(lock_path: Path) -> None:
    for fd in _HELD_LOCKS.pop(str(Path(lock_path).resolve()), []):
        os.close(fd)


def replace_locked_file(path: Path, data: bytes) -> None:
    """Give `path`, a file this process holds with `lock_output` as its own lock (generate_data.py's --output), the
    contents `data` at once: written to a temporary file that is locked first, flushed, then renamed over `path`.
    A crash leaves the old file or the new one, never a mix; the old file stays locked until `unlock_output`, so a
    run that opened it just before the rename cannot take it either."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    with contextlib.suppress(ImportError):
        import fcntl

        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    os.fsync(fd)
    os.replace(tmp, path)
    fsync_path(path.parent)
    _HELD_LOCKS.setdefault(str(path.resolve()), []).insert(0, fd)


def claim_folder(out: Path, flag: str) -> Path | None:
    """Make folder `out` (and its missing parents) if absent and lock it (`lock_output`); returns the topmost folder
    this call made, or None.

    The lock alone decides which run owns the folder: of two runs started at once into one new folder, both may
    find it absent and both try to make it, but only one gets the lock, and the other gets `lock_output`'s
    refusal whatever the timing (making the folder is not the decision: it may already exist, or be made by
    the other run between the check and the mkdir).
    """
    top = next((p for p in reversed([out, *out.parents]) if not p.exists()), None)
    try:
        out.mkdir(parents=True)
    except FileExistsError:
        top = None
    lock_output(out / LOCK_NAME, flag, out)
    return top


def unclaim_folder(out: Path, created: Path | None) -> None:
    """Release a folder `claim_folder` locked for a run refused at start; the folders it made (`created`: the
    topmost) are removed again, so that a refused run leaves nothing behind. The lock file is unlinked while still
    held: no other run can be holding it."""
    if created is not None:
        with contextlib.suppress(OSError):
            (out / LOCK_NAME).unlink()
    unlock_output(out / LOCK_NAME)
    if created is not None:
        for folder in [out, *out.parents][:len(out.parts) - len(created.parts) + 1]:
            try:
                folder.rmdir()
            except OSError:  # not empty: another run has claimed it, or made something beside it, meanwhile
                break


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
    from safetensors import SafetensorError
    from safetensors.torch import load_file

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
        tensors = load_file(folder / f"{name}.tensors")
        return decode(json.loads((folder / f"{name}.json").read_text()))
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as err:
        raise DistillError(f"--resume '{folder}': {name} is damaged ({type(err).__name__}: {err})") from None


def complete_checkpoints(folder: Path) -> list[Path]:
    """The complete checkpoint-N folders in `folder`, oldest first."""
    found = [p for p in Path(folder).glob("checkpoint-*")
             if p.name.split("-")[1].isdigit() and (p / "trainer_state.json").exists()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def find_checkpoint(path: str | Path) -> Path:
    """--resume PATH: PATH itself when it is a checkpoint, else the latest complete checkpoint in it. A checkpoint
    that cannot be read whole (`checkpoint_damage`) is passed over, in one line, for the newest one that can;
    PATH naming a damaged checkpoint, or holding only damaged ones, is refused in one line."""
    folder = Path(path)
    older = ("was written by an older version as a pickle (trainer_state.pt), which is not loaded: unpickling a "
             "file can run any code in it. Continue it with the version that wrote it, or start a new run")
    if (folder / "trainer_state.json").exists():
        damage = checkpoint_damage(folder)
        if damage is None:
            return folder
        intact = next((c for c in reversed(complete_checkpoints(folder.parent))
                       if c != folder and checkpoint_damage(c) is None), None)
        raise DistillError(f"--resume '{folder}': this checkpoint is damaged ({damage}); "
                           + (f"the newest complete one is {intact}" if intact else "there is no complete one beside "
                              "it: start a new run"))
    if (folder / "trainer_state.pt").exists():
        raise DistillError(f"--resume '{folder}' {older}")
    found = complete_checkpoints(folder)
    damaged = []
    for candidate in reversed(found):
        damage = checkpoint_damage(candidate)
        if damage is None:
            if damaged:
                print(f"--resume: {'; '.join(damaged)}: resuming from {candidate.name}, the newest complete "
                      "checkpoint")
            return candidate
        damaged.append(f"{candidate.name} is damaged ({damage})")
    if damaged:
        raise DistillError(f"--resume '{path}': no complete checkpoint there: {'; '.join(damaged)}")
    if any((p / "trainer_state.pt").exists() for p in folder.glob("checkpoint-*")):
        raise DistillError(f"--resume '{path}': its checkpoints {older}")
    raise DistillError(f"--resume '{path}': no complete checkpoint there (checkpoint-N with trainer_state.json)")


def checkpoint_damage(folder: Path) -> str | None:
    """What keeps checkpoint `folder` from being read whole, or None: a file cut short or empty (an interrupted
    copy, a crash before the data reached the disk) or missing. Every JSON file must parse, every safetensors file
    hold exactly the bytes its header describes (headers are read, not the weights), the trainer and RNG states
    both their halves, metrics.jsonl every step up to the checkpoint's."""
    names = sorted(p.name for p in folder.iterdir())
    for name in names:
        path = folder / name
        if name.endswith(".json") and path.is_file():
            try:
                json.loads(path.read_text())
            except (OSError, ValueError) as err:
                return f"{name}: {'empty file' if _size(path) == 0 else f'cut short or corrupt ({err})'}"
        elif name.endswith((".safetensors", ".tensors")):
            problem = _safetensors_damage(path)
            if problem:
                return f"{name}: {problem}"
    for stem in [n.removesuffix(".json") for n in names if n.endswith(".json") and n.startswith(("rng_", "trainer_"))]:
        if f"{stem}.tensors" not in names:
            return f"{stem}.tensors is missing"
    if "rng_0.json" not in names:
        return "rng_0.json is missing"
    shards = {"model.safetensors", "adapter_model.safetensors"} & set(names)
    if "model.safetensors.index.json" in names:
        index = json.loads((folder / "model.safetensors.index.json").read_text())
        missing = sorted(set(index.get("weight_map", {}).values()) - set(names))
        if missing:
            return f"weight shard {missing[0]} is missing"
    elif not shards:
        return "no weights (model.safetensors or adapter_model.safetensors)"
    step = json.loads((folder / "trainer_state.json").read_text()).get("step")
    try:
        lines = (folder / "metrics.jsonl").read_text().splitlines()
        last = json.loads(lines[-1]).get("step") if lines else None
    except (OSError, ValueError) as err:
        return f"metrics.jsonl: missing or cut short ({err})"
    if not lines:
        return "metrics.jsonl: empty file"
    if last != step:
        return f"metrics.jsonl: ends at step {last}, not at the checkpoint's step {step}"
    return None


def _size(path: Path) -> int:
    return path.stat().st_size


def _safetensors_damage(path: Path) -> str | None:
    """How a safetensors file falls short of what its header describes, or None (the format: an 8-byte
    little-endian header length, the JSON header, then the tensors' bytes at the header's data_offsets)."""
    size = _size(path)
    if size == 0:
        return "empty file"
    with path.open("rb") as f:
        head = f.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else None
        if length is None or 8 + length > size:
            return f"cut short ({size} bytes, less than its header)"
        try:
            header = json.loads(f.read(length))
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, IndexError, AttributeError) as err:
            return f"corrupt header ({err})"
    if 8 + length + end != size:
        return f"cut short ({size} of {8 + length + end} bytes)" if size < 8 + length + end else \
            f"{size - 8 - length - end} bytes more than its header describes"
    return None


def fsync_tree(folder: Path) -> None:
    """Flush every file under `folder`, then the folder itself, to the disk (see `RunFolder.save_checkpoint`)."""
    for path in [*sorted(folder.rglob("*"), key=lambda p: -len(p.parts)), folder]:
        fsync_path(path)


def fsync_path(path: Path) -> None:
    """Flush a file, or a folder's entries (what was created, removed or renamed in it), to the disk. A file system
    may otherwise persist a rename before the data it publishes: after a power cut, a complete-looking checkpoint
    of empty or partial files."""
    if os.name != "posix":  # a folder cannot be opened for fsync elsewhere
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_failure(err: BaseException) -> str | None:
    """A save's failure to write (disk full, file too large, quota, an I/O error) as a short reason, or None for
    any other error. safetensors reports the OS error inside its own exception's message."""
    if isinstance(err, OSError):
        return f"{err.strerror or err}" + (f" ({Path(err.filename).name})" if err.filename else "")
    if type(err).__name__ == "SafetensorError" and "I/O error: " in str(err):
        return str(err).split("I/O error: ", 1)[1]
    return None


def write_or_stop(accelerator, write, what: str, out: Path, *, partial: Path | None = None) -> None:
    """Run this process's part of a save (`write()`). A write failure on any process (`write_failure`) stops every
    process with one line naming `what` was being written and the newest intact checkpoint in `out` (what --resume
    continues), after removing `partial` (the unfinished copy), instead of a traceback on one process while the
    others wait."""
    error = None
    try:
        write()
    except Exception as err:  # noqa: BLE001 -- anything but a write failure is raised as it is
        error = write_failure(err)
        if error is None:
            raise
    if accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        error = next((e for e in gather_object([error]) if e), None)
    if error is None:
        return
    if partial is not None and accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
    intact = complete_checkpoints(out)
    raise DistillError(f"cannot write {what}: {error}; " + (
        f"the newest intact checkpoint is {intact[-1]} (free space, then --resume {out} continues from it)"
        if intact else "no checkpoint was written before it, so nothing can be resumed"))


class Preempted(DistillError):
    """A run stopped by SIGTERM or Ctrl-C after saving a checkpoint; `run_main` exits with 128 + the signal's
    number, as a shell reports a process the signal ended."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_status = 128 + signum


class StopSignals:
    """SIGTERM (what schedulers and spot instances send some time before they kill) and a first Ctrl-C (SIGINT)
    ask a run to stop after the optimizer step in progress, so that it can save a checkpoint; a second one stops
    at once. `received` is the first signal's number (None before). Only the main thread can take signals."""

    NAMES = {signal.SIGTERM: "SIGTERM", signal.SIGINT: "SIGINT (Ctrl-C)"}

    def __init__(self, *, listen: bool, announce: bool):
        self.received: int | None = None
        self.listen, self.announce = listen, announce  # the main process says so, once
        self._previous: dict = {}

    def __enter__(self) -> StopSignals:
        if self.listen and threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in self.NAMES}
        return self

    def __exit__(self, *exc) -> None:
        self.restore()

    def flag(self, device) -> torch.Tensor:
        """1.0 once a signal came, else 0.0: summed over processes, so that all stop after the same step."""
        return torch.tensor(float(self.received is not None), dtype=torch.float64, device=device)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)  # None: set outside Python
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        if self.received is not None:  # the second: what the signal did before (Ctrl-C: KeyboardInterrupt)
            self.restore()
            signal.raise_signal(signum)
            return
        self.received = signum
        if not self.announce:
            return
        text = (f"\n{self.NAMES[signum]}: finishing the step in progress, then saving a checkpoint and stopping "
                f"({self.NAMES[signum].split()[0]} again stops at once)\n").encode()
        # os.write: a print here could re-enter a print the signal interrupted. sys.stderr may have no descriptor
        # (a notebook, a captured stream): then the process's own.
        for stream in (sys.stderr, sys.__stderr__):
            with contextlib.suppress(AttributeError, OSError, ValueError):
                os.write(stream.fileno(), text)
                return


# --resume compares the new run's settings (`RunFolder.settings`) with the checkpoint's. Where and how often to
# write, and paths whose content is compared instead, are not compared; the schedule, evaluation and numerics may
# change (applied, reported, recorded); every other difference changes what is trained and is refused. These are
# add_train_args' flags; a script adds its own through `RunInputs`.
_RESUME_IGNORED = {"output_dir", "resume", "overwrite", "save_every", "save_total_limit", "log_every", "report_to",
                   "chunk_size", "eval_batch_size", "gradient_checkpointing", "trust_remote_code"}
_RESUME_ADJUSTABLE = {"lr", "weight_decay", "warmup_ratio", "max_steps", "epochs", "max_grad_norm", "eval_every",
                      "eval_data", "eval_data_content", "eval_problems", "eval_max_new_tokens", "eval_system_prompt",
                      "save_best", "dtype", "bf16", "data", "student"}
_SETTING_NAMES = {"data_content": "--data content", "eval_data_content": "--eval-data content",
                  "student_content": "--student weights/tokenizer", "training_rows": "training rows",
                  "processes": "processes"}


@dataclass
class RunInputs:
    """What a script adds to --resume's comparison beyond `add_train_args`' flags.

    contents:   content fingerprints of its other inputs, {key: (label for messages, fingerprint)}: a teacher's
                weights, a cache's teacher and store (a path may stay the same while what it holds changes)
    adjustable: its flags that may change on resume (the path of an input whose content is compared)
    ignored:    its flags that do not change what is trained (a sampler backend, a warning threshold)
    """

    contents: dict[str, tuple[str, str]] = field(default_factory=dict)
    adjustable: tuple[str, ...] = ()
    ignored: tuple[str, ...] = ()


def live_teacher_inputs(teacher: str) -> RunInputs:
    """RunInputs of a script that loads --teacher (loaded in --teacher-dtype)."""
    return RunInputs(contents={"teacher_content": ("--teacher weights/tokenizer", model_fingerprint(teacher))},
                     adjustable=("teacher", "teacher_dtype"))


class RunFolder:
    """A run's --output-dir: claimed for the run's lifetime (checked, locked, cleared on --overwrite), the
    checkpoint --resume continues (found, its settings compared with this run's), checkpoints written and read.

    The main process decides and every process raises the same error, so no process waits forever on one that has
    given up. `settings` is what this run trains (the flags, plus content fingerprints of the data, the student and
    `inputs.contents`), recorded in every checkpoint.
    """

    def __init__(self, args, accelerator, inputs: RunInputs, training_rows: int):
        self.args, self.accelerator, self.inputs = args, accelerator, inputs
        self.path = Path(args.output_dir)
        self.settings: dict | None = None
        self.history: list[dict] = []  # --resume's changed settings, recorded in run_config.json
        self.changes: list[str] = []
        self._training_rows = training_rows

    # -- claiming the folder ------------------------------------------------------------------------------------

    def claim(self) -> Path | None:
        """Check --output-dir, --resume and --overwrite, lock the folder, clear it on --overwrite; returns the
        checkpoint folder to continue from, or None."""
        acc = self.accelerator
        error, folder = None, None
        if acc.is_main_process:
            try:
                folder = self._claim_on_main()
            except DistillError as err:
                error = str(err)
        if acc.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            error, folder = broadcast_object_list([error, None if folder is None else str(folder)])
        if error:
            raise DistillError(error)
        return None if folder is None else Path(folder)

    def _claim_on_main(self) -> Path | None:
        args, out = self.args, self.path
        if args.save_total_limit < 0:
            raise DistillError("--save-total-limit must be >= 0 (0 = keep every checkpoint)")
        check_output_path(out, "--output-dir", folder=True)
        # Locked before looking inside (a run writing there now would change what we see); a new folder is made
        # first, and removed again if this run is refused.
        created = claim_folder(out, "--output-dir")
        try:
            self.settings = self._run_settings()
            folder = find_checkpoint(args.resume) if args.resume else None
            inside = folder is not None and folder.resolve().parent == out.resolve()
            if folder is not None:
                self._check_resume_settings(folder)
            present = sorted(p.name for p in out.iterdir() if p.name != LOCK_NAME)
            if inside and args.overwrite:
                raise DistillError(f"--overwrite with --resume {args.resume}: clearing --output-dir would delete the "
                                   "checkpoint being resumed; drop --overwrite")
            if present and not inside:
                listed = ", ".join(present[:5]) + (", ..." if len(present) > 5 else "")
                if not args.overwrite:
                    raise DistillError(f"--output-dir '{out}' is not empty ({listed}): pass --resume {out} to continue "
                                       "the run there, --overwrite to clear it first, or choose another --output-dir")
                self._check_overwrite(present)
        except DistillError:
            unclaim_folder(out, created)
            raise
        if present and args.overwrite:
            for name in present:
                path = out / name
                shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
            print(f"--overwrite: cleared {len(present)} entries of {out}")
        return folder

    def _check_overwrite(self, present: list[str]) -> None:
        """--overwrite clears only a folder that holds a run, and never one holding this run's inputs or the
        working directory (`--output-dir . --overwrite` must not empty a project)."""
        out = self.path.resolve()
        if "run_config.json" not in present:
            raise DistillError(f"--overwrite: '{self.path}' holds no run_config.json, so it is not a run folder "
                               "this tool wrote; not clearing it (empty it yourself or choose another --output-dir)")
        protected = {"the working directory": Path.cwd(), "your home folder": Path.home()}
        for key, value in vars(self.args).items():  # every flag naming an existing path is an input
            if key != "output_dir" and isinstance(value, str) and value and Path(value).expanduser().exists():
                protected[f"--{key.replace('_', '-')} '{value}'"] = Path(value).expanduser()
        for what, path in protected.items():
            path = path.resolve()
            if path == out or out in path.parents:
                raise DistillError(f"--overwrite: '{self.path}' holds {what}; not clearing it")

    def release(self) -> None:
        unlock_output(self.path / LOCK_NAME)

    # -- what a checkpoint continues ----------------------------------------------------------------------------

    def _run_settings(self) -> dict:
        args = self.args
        settings = json.loads(json.dumps(vars(args), default=str))
        settings["data_content"] = file_fingerprint(args.data) if Path(args.data).is_file() else None
        if args.eval_data:
            settings["eval_data_content"] = file_fingerprint(args.eval_data)
        settings["student_content"] = model_fingerprint(args.student)
        for key, (_, value) in self.inputs.contents.items():
            settings[key] = value
        settings["training_rows"] = self._training_rows
        settings["processes"] = self.accelerator.num_processes
        return settings

    def _check_resume_settings(self, folder: Path) -> None:
        """Refuse to continue a checkpoint with a change to what is trained (data, models, loss, batch layout):
        the run would silently be two runs in one. The schedule and evaluation may change: applied, reported
        and recorded in run_config.json's resume_history."""
        try:
            old = json.loads((folder / "trainer_state.json").read_text()).get("settings") or {}
        except (OSError, json.JSONDecodeError) as err:
            raise DistillError(f"--resume '{folder}': cannot read trainer_state.json ({err})") from None
        names = _SETTING_NAMES | {key: label for key, (label, _) in self.inputs.contents.items()}
        ignored = _RESUME_IGNORED | set(self.inputs.ignored)
        adjustable = _RESUME_ADJUSTABLE | set(self.inputs.adjustable)
        refused, changed = [], []
        for key in {**old, **self.settings}:
            value, before = self.settings.get(key), old.get(key)
            # A flag unknown to one side is a version difference; a content key on one side only is a different
            # kind of run (a live teacher against a --teacher-cache)
            one_sided = key not in old or key not in self.settings
            if key in ignored or value == before or (one_sided and key not in names and not key.endswith("_content")):
                continue
            name = names.get(key, f"--{key.replace('_', '-')}")
            (changed if key in adjustable else refused).append(f"{name} {value} (checkpoint: {before})")
        if refused:
            raise DistillError(f"--resume '{folder}': this run would train something else than the checkpoint's: "
                               f"{'; '.join(refused)}. Use the checkpoint's settings, or start a new run (another "
                               "--output-dir, or --overwrite)")
        if changed:
            print(f"--resume: continuing {folder} with changed settings, applied from its step on: "
                  f"{'; '.join(changed)}")
        self.changes = changed

    # -- checkpoint files ---------------------------------------------------------------------------------------

    def save_checkpoint(self, step: int, model, optimizer, scheduler, state: dict, metrics: Path) -> Path:
        """OUTPUT_DIR/checkpoint-N: weights (or adapter), optimizer, schedule, RNG of every process, `state` (data
        position, elapsed time, --save-best's best), the run's settings and metrics so far. Written under a
        temporary name, flushed to the disk (`fsync_tree`) and only then renamed, so neither a run killed while
        saving nor a power cut leaves a checkpoint that --resume would pick up half written; a full disk stops the
        run in one line (`write_or_stop`). JSON plus safetensors (`save_state`): resuming never unpickles, so a
        checkpoint from elsewhere cannot run code. With --save-total-limit N only the newest N are kept."""
        acc = self.accelerator
        final, tmp = self.path / f"checkpoint-{step}", self.path / f".checkpoint-{step}.tmp"
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()

        def write():  # each process flushes what it wrote
            rng = f"rng_{acc.process_index}"
            save_state({"rng": _get_rng_state()}, tmp, rng)
            if acc.is_main_process:
                acc.unwrap_model(model).save_pretrained(tmp, save_function=acc.save)
                save_state({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "step": step,
                            **state, "settings": self.settings, "history": self.history}, tmp, "trainer_state")
                shutil.copy(metrics, tmp / "metrics.jsonl")
                fsync_tree(tmp)
            else:
                for suffix in (".json", ".tensors"):
                    fsync_path(tmp / f"{rng}{suffix}")

        write_or_stop(acc, write, f"checkpoint {final}", self.path, partial=tmp)
        acc.wait_for_everyone()
        if acc.is_main_process:
            fsync_path(tmp)  # every process's files are in it now
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            fsync_path(self.path)  # the rename itself
            limit = self.args.save_total_limit
            for old in complete_checkpoints(self.path)[:-limit] if limit else []:
                shutil.rmtree(old)
        acc.wait_for_everyone()
        return final

    def load_checkpoint(self, folder: Path, model, optimizer, scheduler, metrics: Path) -> dict:
        """Weights, optimizer and schedule from `folder` (found and checked by `claim`), loaded in place; returns
        the trainer state (step, elapsed_s, best, ...) with this process's RNG states under "rng"."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        def read(path: Path) -> dict:  # checked by checkpoint_damage; still a file may change after the check
            try:
                return load_file(path)
            except (OSError, SafetensorError) as err:
                raise DistillError(f"--resume '{folder}': {path.name} is damaged ({err})") from None

        acc = self.accelerator
        model = acc.unwrap_model(model)
        if (folder / "adapter_model.safetensors").exists():
            from peft import set_peft_model_state_dict

            set_peft_model_state_dict(model, read(folder / "adapter_model.safetensors"))
        else:
            weights = {}
            for shard in folder.glob("*.safetensors"):
                weights.update(read(shard))
            missing, unexpected = model.load_state_dict(weights, strict=False)
            tied = {k for k in missing if "lm_head" in k and getattr(model.config, "tie_word_embeddings", False)}
            if set(missing) - tied or unexpected:
                raise DistillError(f"--resume '{folder}': weights do not match the model "
                                   f"(missing {sorted(set(missing) - tied)[:3]}, unexpected {unexpected[:3]})")
        state = load_state(folder, "trainer_state")
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        # The checkpoint's optimizer carries its own peak lr and weight decay: this run's flags win (a changed one
        # was reported by _check_resume_settings). Unchanged, this recomputes exactly the lr the schedule had.
        args, groups = self.args, optimizer.param_groups
        for group, decay in zip(groups, (args.weight_decay, 0.0)):
            group["initial_lr"], group["weight_decay"] = args.lr, decay
        scheduler.base_lrs = [args.lr] * len(groups)
        scheduler._last_lr = [args.lr * fn(scheduler.last_epoch) for fn in scheduler.lr_lambdas]
        for group, lr in zip(groups, scheduler._last_lr):
            group["lr"] = lr
        step = state["step"]
        self.history = list(state.get("history") or []) + (
            [{"step": step, "checkpoint": str(folder), "changed": self.changes}] if self.changes else [])
        rng_name = f"rng_{acc.process_index}"
        if not (folder / f"{rng_name}.json").exists():
            raise DistillError(f"--resume '{folder}': no {rng_name}.json (saved by fewer processes than this run)")
        state["rng"] = load_state(folder, rng_name)["rng"]
        if acc.is_main_process:
            shutil.copy(folder / "metrics.jsonl", metrics)
            print(f"resuming from {folder} at step {step}")
            if folder.resolve().parent == self.path.resolve():
                # Later checkpoints belong to the trajectory this run replaces; left there, a later --resume
                # would pick one of them up.
                for later in complete_checkpoints(self.path):
                    if int(later.name.split("-")[1]) > step:
                        shutil.rmtree(later)
                        print(f"removed {later}: later than the checkpoint this run continues")
        return state


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
