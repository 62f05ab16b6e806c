"""Ctrl-C, a scheduler's SIGTERM and a full disk: one line saying how to resume, and a clear exit code.

`run_command` runs every vaegen program (the `vaegen` group, the console scripts, `python -m generator|trainer`):

    one-line error (bad input, a locked directory, a full disk)  -> exit 2
    SIGINT (Ctrl-C)                                             -> exit 130
    SIGTERM (schedulers, `kill`)                                -> exit 143

By default a signal abandons the current unit of work at once (a shard, an evaluation): every writer writes under
a temporary name and renames, so nothing half-written is left that a later stage could take for output, and the
same command resumes. Training loops do better inside `StopRequests`: the first signal lets the current step or
epoch finish and a checkpoint be saved (a second one abandons at once), so the resumed run loses nothing.
"""

from __future__ import annotations

import contextlib
import errno
import signal
import sys

import click

EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}
_resume_hint = "rerun the same command to resume"


class Terminated(BaseException):
    """SIGTERM, raised like KeyboardInterrupt (a BaseException, so `except Exception` never swallows it)."""


class Interrupted(BaseException):
    """A loop stopped cleanly on a signal; `message` says where it stopped and how to resume."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum, self.message = signum, message


def set_resume_hint(hint: str) -> None:
    """What the one-line interruption message tells the user to do (the command knows best)."""
    global _resume_hint
    _resume_hint = hint


def _raise_terminated(signum, frame):
    raise Terminated()


class StopRequests:
    """Defer SIGINT/SIGTERM to a safe point: `if stops.requested: save; raise stops.interrupted(where)`."""

    def __init__(self, what: str = "the current step"):
        self.what, self.requested, self._previous = what, None, {}

    def _handle(self, signum, frame):
        if self.requested is not None:  # the second signal: abandon now
            raise KeyboardInterrupt if signum == signal.SIGINT else Terminated()
        self.requested = signum
        click.echo(f"\n{signal.Signals(signum).name}: finishing {self.what} and saving a checkpoint "
                   "(send it again to stop at once)", err=True)

    def __enter__(self):
        for signum in EXIT_CODES:
            with contextlib.suppress(ValueError):  # not the main thread: keep the default behaviour
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        return False

    def agreed(self, accelerator, out_of_time: bool = False) -> bool:
        """Whether to stop now: a signal or `out_of_time` on any process of the launch. All processes then stop
        at the same step or epoch, so none waits at a barrier the others never reach."""
        signalled = self.requested is not None
        if accelerator.num_processes > 1:
            import torch

            flags = torch.tensor([float(signalled), float(out_of_time)], device=accelerator.device)
            signalled, out_of_time = (accelerator.reduce(flags, reduction="sum") > 0).tolist()
            if signalled and self.requested is None:
                self.requested = signal.SIGTERM  # another process was signalled
        return signalled or out_of_time

    def interrupted(self, message: str) -> Interrupted:
        return Interrupted(self.requested, message)


def disk_full(exc: BaseException) -> OSError | None:
    """The ENOSPC error behind `exc` (itself, or anywhere in its cause/context chain), else None."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            return exc
        if "No space left on device" in str(exc) or "os error 28" in str(exc):  # safetensors, zarr wrappers
            return OSError(errno.ENOSPC, "No space left on device")
        exc = exc.__cause__ or exc.__context__
    return None


def _fail(message: str, code: int):
    click.echo(message, err=True)
    sys.exit(code)


def run_command(command: click.Command, prog_name: str, args=None):
    """Run a click command as a program, with the exit behaviour described in the module docstring."""
    try:
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
    except ValueError:  # not the main thread (an embedding application): leave signals alone
        previous = None
    try:
        rv = command.main(args=args, prog_name=prog_name, standalone_mode=False)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except Interrupted as e:
        _fail(f"stopped by {signal.Signals(e.signum).name}: {e.message}", EXIT_CODES[e.signum])
    except (KeyboardInterrupt, click.exceptions.Abort):
        _fail(f"interrupted (SIGINT); {_resume_hint}", 130)
    except Terminated:
        _fail(f"terminated (SIGTERM); {_resume_hint}", 143)
    except Exception as e:
        full = disk_full(e)
        if full is None:
            raise
        where = full.filename or getattr(e, "vaegen_directory", None)
        _fail(f"Error: no space left on device{f' writing {where}' if where else ''}; nothing half-written was "
              f"kept: free some space and {_resume_hint}", 2)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    sys.exit(rv if isinstance(rv, int) else 0)  # click returns the code of `ctx.exit(code)` (e.g. --help: 0)
