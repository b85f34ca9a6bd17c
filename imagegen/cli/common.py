"""What every imagegen command shares: its options, declared once (alone and in groups), and the error contract.

stdout is data (paths or JSON); errors are a message and a hint on stderr (a JSON object with
--json) and an exit code from the error table. Kept light: `imagegen --help` imports only this and typer.
"""

import contextlib
import copy
import dataclasses
import functools
import inspect
import json
import math
import os
import sys
import typing
from pathlib import Path
from typing import Annotated

import typer

from imagegen.util.errors import ImagegenError

EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what a shell reports for a command whose reader left
MAX_KEEP_WARM = 7 * 24 * 3600.0  # a week: the longest a worker waits (longer is a typo); `imagegen stop` ends it


def _finite(low: float, high: float | None, what: str, low_open: bool = False):
    """A typer callback refusing nan, inf and values outside low..high (a usage error, exit 2)."""

    def check(value: float | None) -> float | None:
        if value is None:
            return None
        bad_low = value <= low if low_open else value < low
        if not math.isfinite(value) or bad_low or (high is not None and value > high):
            limits = f"above {low:g}" if low_open else f"from {low:g}"
            limits += f" to {high:g}" if high is not None else ""
            raise typer.BadParameter(f"{value} is not {what} ({limits})")
        return value

    return check


def output_option(help: str) -> typer.models.OptionInfo:
    """-o/--output, declared once: what it names (an image, a folder) differs by command, and so its help."""
    return typer.Option("--output", "-o", help=help)


# Shared options, declared once.
JsonOpt = Annotated[bool, typer.Option(
    "--json", help="Write one JSON object per result on stdout; errors as JSON on stderr.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing on stderr but errors.")]
DebugOpt = Annotated[bool, typer.Option(
    "--debug", help="Show tracebacks for unexpected errors.", envvar="IMAGEGEN_DEBUG")]
RuntimeOpt = Annotated[str, typer.Option(
    "--runtime", envvar="IMAGEGEN_RUNTIME",
    help="Where workers run: auto, docker, local, remote (IMAGEGEN_REMOTE_WORKERS=URL#TOKEN,...), or ray (a Ray "
         "cluster: --ray-address).")]
KeepWarmOpt = Annotated[float, typer.Option(
    "--keep-warm", envvar="IMAGEGEN_KEEP_WARM",
    help="Seconds an idle worker stays up for the next call, up to 604800 (a week; `imagegen stop` ends it "
         "sooner). 0: the workers this command starts are stopped when it ends (those it reuses are left).",
    callback=_finite(0.0, MAX_KEEP_WARM, "a number of seconds"))]
HostsOpt = Annotated[str | None, typer.Option(
    "--hosts", envvar="IMAGEGEN_DOCKER_HOSTS", metavar="local,box2,me@box3:2222",
    help="Run Docker workers on these hosts over SSH (Docker context names too; `local` is this machine).")]


def _exported(variable: str):
    """A callback that hands an option's value to the code reading `variable` (Ray reads RAY_ADDRESS itself)."""
    def export(value):
        if value:
            os.environ[variable] = "1" if value is True else str(value)
        return value
    return export


RayAddressOpt = Annotated[str | None, typer.Option(
    "--ray-address", envvar="RAY_ADDRESS", metavar="HOST:PORT", callback=_exported("RAY_ADDRESS"),
    help="The Ray cluster for --runtime ray (default: RAY_ADDRESS, else the cluster started on this machine).")]
RayInsecureOpt = Annotated[bool, typer.Option(
    "--ray-allow-insecure", callback=_exported("IMAGEGEN_RAY_ALLOW_NO_AUTH"),
    help="Accept a Ray cluster without token authentication: only for a cluster on this one machine.")]
ProgressOpt = Annotated[bool | None, typer.Option(
    "--progress/--no-progress", help="Progress bars on stderr (default: only when stderr is a terminal).")]
ForceOpt = Annotated[bool, typer.Option(
    "--force", help="Run even when a job looks too large for every GPU's memory.")]
FastOpt = Annotated[bool, typer.Option(
    "--fast", envvar="IMAGEGEN_FAST",
    help="Fast mode: torch.compile the model (the first image compiles for a while; later ones and later workers "
         "reuse it) and fp8 matmuls for fp8 models on Ada/Hopper GPUs; GPU workers only. Images may differ slightly.")]
FamilyOpt = Annotated[str | None, typer.Option(
    "--family", help="Model family: sd15, sdxl or flux (detected when omitted).")]
ModelOpt = Annotated[str | None, typer.Option(
    "--model", "-m",
    help="A registered model (see `imagegen models list`); in a batch, the default for items that name none.")]
CheckpointOpt = Annotated[Path | None, typer.Option(
    "--checkpoint", help="A local SD1.5/SDXL .safetensors file to use instead of a registered model.")]
SizeOpt = Annotated[str | None, typer.Option(
    "--size", help="WIDTHxHEIGHT, multiples of 8 (model default when omitted).")]
StepsOpt = Annotated[int | None, typer.Option("--steps", help="Sampling steps (model default when omitted).")]
CfgOpt = Annotated[float | None, typer.Option(
    "--cfg", help="Classifier-free guidance scale.", callback=_finite(0.0, None, "a guidance scale"))]
NegativeOpt = Annotated[str | None, typer.Option("--negative", help="Negative prompt (SD1.5/SDXL).")]
CountOpt = Annotated[int, typer.Option("--count", "-n", help="Images per prompt (seeds seed, seed+1, ...).")]
GuidanceOpt = Annotated[float | None, typer.Option(
    "--guidance", help="Flux guidance (default 3.5).", callback=_finite(0.0, None, "a guidance value"))]
ImageOutputOpt = Annotated[str | None, output_option("A .png path, a directory, or - for PNG bytes on stdout.")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace existing output files.")]
CallTimeoutOpt = Annotated[float | None, typer.Option(
    "--timeout", help="Overall cap in seconds for the whole call.",
    callback=_finite(0.0, None, "a number of seconds", low_open=True))]

PickOpt = Annotated[list[str] | None, typer.Option(
    "--pick", metavar="3,7", help="1-based indices from the last contact sheet, e.g. 3,7; repeat for later stages.")]
AutoOpt = Annotated[bool, typer.Option(
    "--auto", help="Pick by the documented rule (a scorer in $IMAGEGEN_FUNNEL_SCORER, else the first N).")]
GpusOpt = Annotated[str | None, typer.Option(
    "--gpus", help="all, cpu, or GPU indices/UUIDs: 0 (the first GPU), 0,2 or GPU-3f2a...")]
WorkersOpt = Annotated[int, typer.Option("--workers", help="CPU workers when no GPU is used.")]
TimeoutOpt = Annotated[float | None, typer.Option(
    "--timeout", help="Overall cap in seconds per job.",
    callback=_finite(0.0, None, "a number of seconds", low_open=True))]

ImageOpt = Annotated[Path | None, typer.Option(
    "--image", help="Start from this image (PNG, JPEG or WebP): img2img, or inpainting with --mask.")]
DenoiseOpt = Annotated[float | None, typer.Option(
    "--denoise", help="How much of --image is redrawn, 0 (kept) to 1 (all new); default 0.6 (1.0 when inpainting).",
    callback=_finite(0.0, 1.0, "a denoise strength"))]
MaskOpt = Annotated[Path | None, typer.Option(
    "--mask", help="Inpaint: a mask the size of --image; white repaints, black keeps (luminance of any image).")]
MaskGrowOpt = Annotated[int | None, typer.Option("--mask-grow", help="Grow the --mask by this many pixels (0..256).")]
ExtendOpt = Annotated[str | None, typer.Option(
    "--extend", metavar="PX|L,T,R,B",
    help="Outpaint: add a border to --image (pixels, multiples of 8; one number for every side) and draw it.")]
LoraOpt = Annotated[list[str] | None, typer.Option(
    "--lora", metavar="NAME_OR_FILE[:STRENGTH]",
    help="Apply a LoRA (a registered name, a .safetensors file, or a file's name in your LoRA folders), strength "
         "default 1; repeat to stack. "
         "<lora:name:0.8> in the prompt works too.")]
ControlOpt = Annotated[list[str] | None, typer.Option(
    "--control", metavar="MODEL:IMAGE[:STRENGTH[:START:END]]",
    help="Steer with a ControlNet (registered name or .safetensors file) and its control image; repeatable.")]
ControlPreprocessOpt = Annotated[str | None, typer.Option(
    "--control-preprocess", help="Turn each --control image into canny edges first (ComfyUI's Canny node): canny.")]


@dataclasses.dataclass
class Controls:
    """Creative controls on generate: the user's own image (--image, --denoise, --mask, --mask-grow), LoRAs
    (--lora) and ControlNets (--control, --control-preprocess)."""

    PANEL: typing.ClassVar[str] = "Your image, LoRAs and ControlNets"

    image: ImageOpt = None
    denoise: DenoiseOpt = None
    mask: MaskOpt = None
    mask_grow: MaskGrowOpt = None
    extend: ExtendOpt = None
    lora: LoraOpt = None
    control: ControlOpt = None
    control_preprocess: ControlPreprocessOpt = None


HiresOpt = Annotated[bool, typer.Option(
    "--hires", help="Hires fix: draw at --size, enlarge, then redraw the detail at --hires-denoise (one job).")]
HiresScaleOpt = Annotated[float | None, typer.Option(
    "--hires-scale", help="With --hires: the final size as a multiple of --size (above 1, up to 4; default 2).",
    callback=_finite(1.0, 4.0, "a hires scale", low_open=True))]
HiresDenoiseOpt = Annotated[float | None, typer.Option(
    "--hires-denoise", help="With --hires: how much the second pass redraws, 0..1 (default 0.35).",
    callback=_finite(0.0, 1.0, "a denoise strength"))]
HiresStepsOpt = Annotated[int | None, typer.Option(
    "--hires-steps", help="With --hires: steps of the second pass (default: --steps).")]
HiresModelOpt = Annotated[str | None, typer.Option(
    "--hires-model", help="With --hires: enlarge with this upscale model (name or .safetensors), or lanczos "
                          "(the default) or latent.")]


@dataclasses.dataclass
class HiresFix:
    """generate's hires fix: --hires, --hires-scale, --hires-denoise, --hires-steps, --hires-model."""

    PANEL: typing.ClassVar[str] = "Hires fix (two passes)"

    hires: HiresOpt = False
    hires_scale: HiresScaleOpt = None
    hires_denoise: HiresDenoiseOpt = None
    hires_steps: HiresStepsOpt = None
    hires_model: HiresModelOpt = None

    def fix(self):
        """The comfy.hires.HiresFix asked for, or None without --hires (any other --hires-* flag is then an
        error, even one given its default value)."""
        if not self.hires:
            given = [flag for flag, value in (("--hires-scale", self.hires_scale),
                                              ("--hires-denoise", self.hires_denoise),
                                              ("--hires-steps", self.hires_steps),
                                              ("--hires-model", self.hires_model)) if value is not None]
            if given:
                raise ImagegenError("invalid_argument", f"{given[0]} needs --hires",
                                    hint="Add --hires to draw the image in two passes.")
            return None
        from imagegen.comfy import hires

        return hires.HiresFix(scale=hires.DEFAULT_SCALE if self.hires_scale is None else self.hires_scale,
                              denoise=hires.DEFAULT_DENOISE if self.hires_denoise is None else self.hires_denoise,
                              steps=self.hires_steps, upscaler=self.hires_model or hires.LANCZOS)


@dataclasses.dataclass
class Mode:
    """How a command talks: --json, --quiet, --progress, --debug."""

    PANEL: typing.ClassVar[str] = "Output and messages"

    json_mode: JsonOpt = False
    quiet: QuietOpt = False
    progress: ProgressOpt = None
    debug: DebugOpt = False


@dataclasses.dataclass
class Workers:
    """Where and how workers run: --runtime, --hosts, --ray-address, --keep-warm, --fast, --force."""

    PANEL: typing.ClassVar[str] = "Where it runs"

    runtime: RuntimeOpt = "auto"
    hosts: HostsOpt = None
    ray_address: RayAddressOpt = None
    ray_allow_insecure: RayInsecureOpt = False
    keep_warm: KeepWarmOpt = 300.0
    fast: FastOpt = False
    force: ForceOpt = False

    @contextlib.contextmanager
    def runtime_for_command(self):
        """This command's runtime; with --keep-warm 0 the workers it starts are stopped when it ends."""
        from imagegen.runtimes.choose import make_runtime
        from imagegen.runtimes.lifetime import workers_of_command

        with workers_of_command(make_runtime(self.runtime, self.keep_warm, self.hosts), self.keep_warm) as runtime:
            yield runtime


@dataclasses.dataclass
class Draw:
    """What to draw with, shared by generate and batch: -m, --checkpoint, --size, --steps, --cfg, --negative, -n."""

    PANEL: typing.ClassVar[str] = "What to draw"

    model: ModelOpt = None
    checkpoint: CheckpointOpt = None
    size: SizeOpt = None
    steps: StepsOpt = None
    cfg: CfgOpt = None
    negative: NegativeOpt = None
    count: CountOpt = 1


@dataclasses.dataclass
class Pool:
    """How many workers a batch or funnel uses: --gpus, --workers, and --timeout per job."""

    PANEL: typing.ClassVar[str] = "Workers"

    gpus: GpusOpt = None
    workers_n: WorkersOpt = 1
    timeout: TimeoutOpt = None


def grouped(func):
    """Let a command take option groups: each parameter annotated with a dataclass above is
    expanded into the dataclass's options for typer, and rebuilt from them for the command."""
    signature = inspect.signature(func)
    hints = typing.get_type_hints(func, include_extras=True)
    params, groups = [], {}
    for param in signature.parameters.values():
        group = hints.get(param.name)
        if not (isinstance(group, type) and dataclasses.is_dataclass(group)):
            params.append(param.replace(annotation=hints.get(param.name, param.annotation)))
            continue
        field_hints = typing.get_type_hints(group, include_extras=True)
        fields = dataclasses.fields(group)
        groups[param.name] = (group, [f.name for f in fields])
        params += [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default,
                                     annotation=_in_panel(field_hints[f.name], getattr(group, "PANEL", None)))
                   for f in fields]
    names = [p.name for p in params]
    if len(set(names)) != len(names):
        raise TypeError(f"{func.__name__}: an option group repeats a parameter name")

    @functools.wraps(func)
    def command(**values):
        for name, (group, fields) in groups.items():
            values[name] = group(**{field: values.pop(field) for field in fields})
        return func(**values)

    command.__signature__ = signature.replace(parameters=params)
    command.__annotations__ = {p.name: p.annotation for p in params}
    return command


def _in_panel(annotation, panel: str | None):
    """An option's annotation with its help section set (GroupedHelp lists options by section)."""
    base, *extras = typing.get_args(annotation)
    if panel is None or not extras:
        return annotation
    tagged = []
    for extra in extras:
        if isinstance(extra, typer.models.OptionInfo):
            extra = copy.copy(extra)
            extra.rich_help_panel = panel
        tagged.append(extra)
    arguments = (base, *tagged)
    return Annotated[arguments]


class GroupedHelp(typer.core.TyperCommand):
    """A command whose --help lists its options by section (an option group's PANEL), the ungrouped first."""

    def format_options(self, ctx, formatter) -> None:
        args: list = []
        sections: dict[str, list] = {"Options": []}
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is None:
                continue
            if param.param_type_name == "argument":
                args.append(record)
            else:
                sections.setdefault(getattr(param, "rich_help_panel", None) or "Options", []).append(record)
        if args:
            with formatter.section("Arguments"):
                formatter.write_dl(args)
        for title, records in sections.items():
            if records:
                with formatter.section(title):
                    formatter.write_dl(records)


class Context:
    json_mode = False
    debug = False


def report(error: ImagegenError, json_mode: bool) -> None:
    """The error contract on stderr: the JSON error object with --json, else `error:` and `hint:` lines."""
    if json_mode:
        print(json.dumps(error.to_json()), file=sys.stderr, flush=True)
    else:
        print(f"error: {error.message}", file=sys.stderr)
        print(f"hint: {error.hint}", file=sys.stderr, flush=True)


def fail(error: ImagegenError) -> None:
    report(error, Context.json_mode)
    raise typer.Exit(error.exit_code)


def stdout_closed() -> None:
    """The reader of stdout went away (`imagegen ... | head -c 10`): exit 141 as shell tools do, with
    no traceback and no "Exception ignored" at exit (stdout now points at /dev/null)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    except (AttributeError, OSError, ValueError):  # stdout is no file (a test runner's capture)
        pass
    finally:
        os.close(devnull)
    if Context.json_mode:  # an agent reading stderr learns why the output stopped short
        report(ImagegenError("output_closed", "stdout was closed before all output was written"), True)
    raise typer.Exit(EXIT_BROKEN_PIPE)


def run_guarded(json_mode: bool, debug: bool, body) -> None:
    """Run a command body with the error contract: ImagegenError -> message + hint + exit code."""
    Context.json_mode, Context.debug = json_mode, debug
    try:
        body()
        sys.stdout.flush()  # a short write to a closed pipe is an error here, not at interpreter exit
    except BrokenPipeError:
        stdout_closed()
    except ImagegenError as error:
        if error.code == "output_closed":  # the engine classified a BrokenPipeError of its own
            stdout_closed()
        fail(error)
    except KeyboardInterrupt:
        fail(ImagegenError("interrupted", "interrupted; what this command started was stopped"))
    except (typer.Exit, typer.Abort, SystemExit):
        raise
    except Exception as exc:  # noqa: BLE001 - the last resort: a bug, reported as one
        if debug:
            raise
        fail(ImagegenError("internal_error", f"{exc.__class__.__name__}: {exc}"))


def usage_failure(exc: typer.TyperException, json_mode: bool) -> int:
    """A usage error Click raised (a bad value, an unknown option, a missing argument) under the
    error contract: invalid_argument or usage_error, exit 2."""
    ctx = getattr(exc, "ctx", None)
    command = ctx.command_path if ctx is not None else "imagegen"
    if type(exc).__name__ == "NoArgsIsHelpError" and not json_mode:
        print(exc.format_message(), file=sys.stderr, flush=True)  # `imagegen` alone: the help
        return 2
    code = "invalid_argument" if isinstance(exc, typer.BadParameter) and \
        type(exc).__name__ != "MissingParameter" else "usage_error"
    message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
    report(ImagegenError(code, message, hint=f"Run `{command} --help` to see what it accepts."), json_mode)
    return 2


def read_stdin_prompt(max_chars: int) -> str:
    """The prompt piped on stdin, read up to a bound: `generate < /dev/zero` is refused at once."""
    if sys.stdin is None or sys.stdin.isatty():
        raise ImagegenError("invalid_prompt", "no prompt given",
                            hint='Pass a prompt: imagegen generate "a red fox", or pipe one on stdin.')
    limit = max_chars * 4 + 1  # UTF-8 takes at most 4 bytes a character
    stream = getattr(sys.stdin, "buffer", None)
    data = stream.read(limit) if stream is not None else sys.stdin.read(max_chars + 1).encode()
    if len(data) >= limit:
        raise ImagegenError("invalid_prompt", f"the prompt on stdin is longer than {max_chars} characters",
                            hint=f"Pipe at most {max_chars} characters of text.")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise ImagegenError("invalid_prompt", "the prompt on stdin is not UTF-8 text",
                            hint="Pipe plain UTF-8 text, e.g. `echo \"a red fox\" | imagegen generate`.") from None
