"""Run folders and checkpoints: claiming --output-dir (checks, locks), checkpoint files without pickle, finding
the checkpoint to --resume, the RNG states a checkpoint carries."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from common import DistillError
from models import model_fingerprint

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
        existed = out.is_dir()
        if existed:  # before looking inside: a run writing there now would change what we see
            lock_output(out / LOCK_NAME, "--output-dir", out)
        try:
            self.settings = self._run_settings()
            folder = find_checkpoint(args.resume) if args.resume else None
            inside = folder is not None and folder.resolve().parent == out.resolve()
            if folder is not None:
                self._check_resume_settings(folder)
            present = sorted(p.name for p in out.iterdir() if p.name != LOCK_NAME) if existed else []
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
            if existed:
                unlock_output(out / LOCK_NAME)
            raise
        if not existed:
            out.mkdir(parents=True)
            lock_output(out / LOCK_NAME, "--output-dir", out)
        elif present and args.overwrite:
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
        temporary name and renamed when complete, so a run killed while saving never leaves a checkpoint that
        --resume would pick up. JSON plus safetensors (`save_state`): resuming never unpickles, so a checkpoint
        from elsewhere cannot run code. With --save-total-limit N only the newest N checkpoints are kept."""
        acc = self.accelerator
        final, tmp = self.path / f"checkpoint-{step}", self.path / f".checkpoint-{step}.tmp"
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        save_state({"rng": _get_rng_state()}, tmp, f"rng_{acc.process_index}")
        if acc.is_main_process:
            acc.unwrap_model(model).save_pretrained(tmp, save_function=acc.save)
            save_state({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "step": step,
                        **state, "settings": self.settings, "history": self.history}, tmp, "trainer_state")
            shutil.copy(metrics, tmp / "metrics.jsonl")
        acc.wait_for_everyone()
        if acc.is_main_process:
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            limit = self.args.save_total_limit
            for old in complete_checkpoints(self.path)[:-limit] if limit else []:
                shutil.rmtree(old)
        acc.wait_for_everyone()
        return final

    def load_checkpoint(self, folder: Path, model, optimizer, scheduler, metrics: Path) -> dict:
        """Weights, optimizer and schedule from `folder` (found and checked by `claim`), loaded in place; returns
        the trainer state (step, elapsed_s, best, ...) with this process's RNG states under "rng"."""
        from safetensors.torch import load_file

        acc = self.accelerator
        model = acc.unwrap_model(model)
        if (folder / "adapter_model.safetensors").exists():
            from peft import set_peft_model_state_dict

            set_peft_model_state_dict(model, load_file(folder / "adapter_model.safetensors"))
        else:
            weights = {}
            for shard in folder.glob("*.safetensors"):
                weights.update(load_file(shard))
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
