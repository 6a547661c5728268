"""What every KDAS command line shares (kdas_core, engines and app): exit codes, and how an old
flag spelling keeps working for one release. Imports nothing heavy: every `--help` uses it.

Exit codes (README "Command-line conventions" is the one user-facing copy of this table):

  0    success
  1    runtime failure: the work started and then failed (message on stderr; a traceback only for a bug)
  2    usage or bad input: a bad option, a missing, corrupt or foreign file, an output that cannot be created
  3    verification disagreement: a built artefact disagrees with its checkpoint (where a command verifies)
  4    the requested backend or device is not available here (TensorRT, CUDA, a GPU)
  130  interrupted (Ctrl+C); 143 terminated (SIGTERM)
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from typing import Callable

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_VERIFY = 3
EXIT_UNAVAILABLE = 4
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143

_MEANING = {
    EXIT_OK: "success",
    EXIT_FAILURE: "runtime failure (the work started and then failed; message on stderr)",
    EXIT_USAGE: "usage or bad input: bad option; missing, corrupt or foreign file; output cannot be created",
    EXIT_VERIFY: "verification disagreement: the built artefact disagrees with the PyTorch checkpoint",
    EXIT_UNAVAILABLE: "the requested backend, device or display is not available here (TensorRT, CUDA, a GPU)",
    EXIT_INTERRUPTED: "interrupted (Ctrl+C); 143: terminated (SIGTERM)",
}


def exit_codes_help(*codes: int) -> str:
    """The `exit status` paragraph of one command's --help: only the codes it can return."""
    codes = codes or tuple(_MEANING)
    return "exit status (same meaning for every kdas command, docs/cli.md):\n" + "\n".join(
        f"  {c:<4} {_MEANING[c]}" for c in codes)


def name_some(names, limit: int = 8) -> str:
    """'a, b, c' or, when cut, 'a, b, ... and 4 more': a shortened list says it is shortened."""
    names = [str(n) for n in names]
    shown = ", ".join(names[:limit])
    return shown if len(names) <= limit else f"{shown} and {len(names) - limit} more"


def bars_wanted(enabled: bool = True, stream=None) -> bool:
    """Progress bars only on a terminal: under nohup, SLURM or `> log` a bar's redraws become
    hundreds of lines, so the callers print one line per epoch (or per block of images) instead."""
    stream = stream if stream is not None else sys.stderr
    return bool(enabled) and hasattr(stream, "isatty") and stream.isatty()


class UnavailableError(RuntimeError):
    """The requested backend or device cannot run on this machine (exit code 4)."""


class UsageError(ValueError):
    """Bad usage or input that the user can fix (exit code 2): the message names the thing (a flag,
    a file) and says what to do. Our own input errors derive from it (CheckpointError,
    DatasetError, ...); a bare ValueError or RuntimeError from inside torch or numpy is not one."""


# OS errors about a path the user named (a missing input, an --out that cannot be created) are
# bad input too; their message carries the path.
PATH_ERRORS = (FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError)


class RunFailure(RuntimeError):
    """The work started and then failed for a reason we detected and can name (exit code 1, one
    line, no traceback): training diverged, a measurement could not be made."""


def run_cli(fn: Callable[[], int | None], prog: str, *, user_errors: tuple[type[BaseException], ...] = (),
            codes: dict[type[BaseException], int] | None = None, interrupted: str = "interrupted",
            coded: tuple[type[BaseException], ...] = ()) -> int:
    """Run a command's body with the exit codes of this module, for every KDAS command line.

    UsageError, the PATH_ERRORS and `user_errors` -> one `prog: error:` line, exit 2;
    UnavailableError -> 4; RunFailure and other OS errors -> 1; `codes` maps further types of ours to codes (engines'
    VerifyError -> 3); `coded`: our error types that carry their own `exit_code` (the app's
    AppError: 2, 1 or 4 by what went wrong); Ctrl+C -> 130 with `interrupted`. Anything else is a
    bug, not the user's input: its traceback is printed with a line that says so, exit 1."""
    known = {**(codes or {}), UnavailableError: EXIT_UNAVAILABLE, RunFailure: EXIT_FAILURE,
             OSError: EXIT_FAILURE}  # disk full, a device gone: the machine, not the input, and not a bug
    try:
        return int(fn() or 0)
    except KeyboardInterrupt:
        print(f"{prog}: {interrupted}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (UsageError, *PATH_ERRORS, *user_errors) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as exc:
        code = getattr(exc, "exit_code", None) if isinstance(exc, coded) else None
        if code is None:
            code = next((c for t, c in known.items() if isinstance(exc, t)), None)
        if code is not None:
            print(f"{prog}: error: {exc}", file=sys.stderr)
            return code
        traceback.print_exc()
        print(f"{prog}: internal error ({type(exc).__name__}), not a problem with your input: the traceback "
              "above says where; please report it with the command line", file=sys.stderr)
        return EXIT_FAILURE


RUN_BEST = "best.safetensors"  # the checkpoint a train/distill run folder chose on validation


def weights_from_run(path: str, flag: str = "--weights") -> str:
    """What a `--weights` value names: the path itself, or, for the run folder of
    kdas_core.train / distill, its best.safetensors (said on stderr, so a user knows which
    file ran). A folder without one is a usage error that says what to give instead."""
    if not os.path.isdir(path):
        return path
    best = os.path.join(path, RUN_BEST)
    if not os.path.isfile(best):
        raise UsageError(f"{flag} {path}: a folder with no {RUN_BEST}; give a model file or the run folder "
                         "of kdas_core.train / kdas_core.distill")
    print(f"{flag} {path}: a run folder; using its {RUN_BEST}", file=sys.stderr)
    return best


def short_prog(prog: str) -> str:
    """The name every message of a command starts with: `kdas_core.train`, not `python -m kdas_core.train`."""
    return prog.removeprefix("python -m ").strip()


class Parser(argparse.ArgumentParser):
    """The argument parser of every KDAS command line.

    - A usage error is one line, `PROG: error: MESSAGE`, and a pointer to --help (the full usage
      is for --help only), exit 2, the same prefix `run_cli` gives every other error.
    - `exit_codes=(...)`: the codes this command can return; --help ends with their meanings.
    - Descriptions and epilogs keep their line breaks (examples stay examples).
    """

    def __init__(self, *args, exit_codes: tuple[int, ...] | None = None, **kwargs):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)
        self.exit_codes = exit_codes

    def format_help(self) -> str:
        text = super().format_help()
        if self.exit_codes is not None and "exit status" not in (self.epilog or ""):
            text = text.rstrip("\n") + "\n\n" + exit_codes_help(*self.exit_codes) + "\n"
        return text

    def error(self, message: str):  # argparse's hook: never returns
        prog = short_prog(self.prog)
        self.exit(EXIT_USAGE, f"{prog}: error: {message}\n(the options: {self.prog} --help)\n")


DEVICE_HELP = "cpu, cuda or cuda:N"


def device_arg(text: str) -> str:
    """argparse `type=` for every --device: 'cpu', 'cuda' or 'cuda:N' (whether that device exists
    is checked when the work starts, by `require_device`)."""
    t = text.strip().lower()
    if t in ("cpu", "cuda") or (t.startswith("cuda:") and t[5:].isdigit()):
        return t
    raise argparse.ArgumentTypeError(f"expected {DEVICE_HELP}, got {text!r}")


def require_device(device: str | None, flag: str = "--device") -> str:
    """The device to run on: `device` itself when this machine has it, the best one here when None
    ('cuda' when a CUDA GPU is visible, else 'cpu'). Asking for a GPU that is not here raises
    UnavailableError (exit 4) with the one message every command gives. Imports torch."""
    import torch

    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UnavailableError(f"{flag} {device}: no CUDA GPU is visible on this machine "
                                   "(torch.cuda.is_available() is False); use --device cpu")
        index = int(device.split(":", 1)[1]) if ":" in device else 0
        if index >= torch.cuda.device_count():
            raise UnavailableError(f"{flag} {device}: this machine has {torch.cuda.device_count()} CUDA "
                                   f"device(s) (cuda:0..cuda:{torch.cuda.device_count() - 1})")
    return device


def add_progress_flag(parser, default: bool = True, what: str = "progress bars on a terminal") -> None:
    """--progress / --no-progress, the same pair on every command that shows progress."""
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=default,
                        help=f"{what} (default: {'on' if default else 'off'})")


def positive_int(text: str) -> int:
    """argparse `type=`: an integer >= 1."""
    return _int_at_least(text, 1)


def nonnegative_int(text: str) -> int:
    """argparse `type=`: an integer >= 0."""
    return _int_at_least(text, 0)


def positive_float(text: str) -> float:
    """argparse `type=`: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _int_at_least(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
    return value


class _DeprecatedAlias(argparse.Action):
    def __init__(self, option_strings, dest, new: str, append: bool = False, **kw):
        self.new, self.append = new, append
        super().__init__(option_strings, dest, **kw)

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"{parser.prog}: warning: {option_string} is deprecated and goes in the next release; "
              f"use {self.new}", file=sys.stderr)
        if self.append:
            values = (getattr(namespace, self.dest, None) or []) + [values]
        setattr(namespace, self.dest, values)


def add_deprecated_alias(parser, old: str, new: str, dest: str, *, append: bool = False, **kw) -> None:
    """`old` keeps working for one release, hidden from --help, with a one-line notice on stderr;
    it stores into the same `dest` as `new` (pass `type=`, `nargs=` as for `new`)."""
    parser.add_argument(old, dest=dest, action=_DeprecatedAlias, new=new, append=append,
                        help=argparse.SUPPRESS, **kw)


def default_workers() -> int:
    """Metric processes for a command line: the usable cores, at most 8."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(8, cores))
