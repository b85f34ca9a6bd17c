"""What every imagegen command shares: its options, declared once, and the error contract.

stdout is data (paths or JSON); errors are a message and a hint on stderr (a JSON object with
--json) and an exit code from the error table.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Annotated, Optional

import typer

from imagegen.util.errors import ImagegenError

EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what a shell reports for a command whose reader left

# Shared options, declared once.
JsonOpt = Annotated[bool, typer.Option("--json", help="Write one JSON object per result on stdout; errors as JSON on stderr.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing on stderr but errors.")]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show tracebacks for unexpected errors.", envvar="IMAGEGEN_DEBUG")]
RuntimeOpt = Annotated[str, typer.Option("--runtime", help="Where workers run: auto, docker, local, or remote (IMAGEGEN_REMOTE_WORKERS=URL#TOKEN,...).", envvar="IMAGEGEN_RUNTIME")]
KeepWarmOpt = Annotated[float, typer.Option("--keep-warm", help="Seconds an idle worker stays up for the next call.", envvar="IMAGEGEN_KEEP_WARM")]
ProgressOpt = Annotated[Optional[bool], typer.Option("--progress/--no-progress", help="Progress bars on stderr (default: only when stderr is a terminal).")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Run even when a job looks too large for every GPU's memory.")]
FastOpt = Annotated[bool, typer.Option("--fast", envvar="IMAGEGEN_FAST", help="Fast mode: torch.compile the model (the first image compiles for a while; later ones and later workers reuse it) and fp8 matmuls for fp8 models on Ada/Hopper GPUs; GPU workers only. Images may differ slightly.")]
FamilyOpt = Annotated[Optional[str], typer.Option("--family", help="Model family: sd15, sdxl or flux (detected when omitted).")]


class Context:
    json_mode = False
    debug = False


def fail(error: ImagegenError) -> None:
    if Context.json_mode:
        print(json.dumps(error.to_json()), file=sys.stderr, flush=True)
    else:
        print(f"error: {error.message}", file=sys.stderr)
        print(f"hint: {error.hint}", file=sys.stderr, flush=True)
    raise typer.Exit(error.exit_code)


def run_guarded(json_mode: bool, debug: bool, body) -> None:
    """Run a command body with the error contract: ImagegenError -> message + hint + exit code."""
    Context.json_mode, Context.debug = json_mode, debug
    try:
        body()
    except ImagegenError as error:
        fail(error)
    except KeyboardInterrupt:
        fail(ImagegenError("interrupted", "interrupted; what this command started was stopped"))
    except BrokenPipeError:
        # The reader of stdout went away (`imagegen ... | head -1`): stop quietly, as shell tools do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise typer.Exit(EXIT_BROKEN_PIPE) from None
    except (typer.Exit, typer.Abort, SystemExit):
        raise
    except Exception as exc:  # noqa: BLE001 - the last resort: a bug, reported as one
        if debug:
            raise
        fail(ImagegenError("internal_error", f"{exc.__class__.__name__}: {exc}"))


def read_stdin_prompt() -> str:
    if sys.stdin is None or sys.stdin.isatty():
        raise ImagegenError("invalid_prompt", "no prompt given", hint='Pass a prompt: imagegen generate "a red fox", or pipe one on stdin.')
    return sys.stdin.read()
PickOpt = Annotated[Optional[list[str]], typer.Option("--pick", metavar="3,7", help="1-based indices from the last contact sheet, e.g. 3,7; repeat for later stages.")]
AutoOpt = Annotated[bool, typer.Option("--auto", help="Pick by the documented rule (a scorer in $IMAGEGEN_FUNNEL_SCORER, else the first N).")]
GpusOpt = Annotated[Optional[str], typer.Option("--gpus", help="all, none, N, or indices/UUIDs: 0,2 or GPU-3f2a...")]
WorkersOpt = Annotated[int, typer.Option("--workers", help="CPU workers when no GPU is used.")]
TimeoutOpt = Annotated[Optional[float], typer.Option("--timeout", help="Overall cap in seconds per job.")]
