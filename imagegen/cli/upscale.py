"""`imagegen upscale IN... --scale 2`: enlarge existing images with an upscale model (see imagegen.engine.upscale)."""

from pathlib import Path
from typing import Annotated

import typer

from imagegen.cli.common import CallTimeoutOpt, Mode, OverwriteOpt, Workers, grouped, output_option, run_guarded


@grouped
def upscale(
    images: Annotated[list[Path], typer.Argument(help="The images to upscale (PNG, JPEG or WebP).")],
    *,
    scale: Annotated[float, typer.Option(
        "--scale", help="Output size as a multiple of the input's (1..8); any model serves any scale.")] = 2.0,
    model: Annotated[str | None, typer.Option(
        "--model", "-m", help="A registered upscale model or an upscaler .safetensors file (default realesrgan-x4, "
                              "or $IMAGEGEN_UPSCALE_MODEL).")] = None,
    output_path: Annotated[str | None, output_option(
        "A directory for IMAGE-x2.png files (default: the output directory), a .png for one image, or - for PNG "
        "bytes on stdout.")] = None,
    overwrite: OverwriteOpt = False,
    timeout: CallTimeoutOpt = None,
    workers: Workers,
    mode: Mode,
) -> None:
    """Upscale existing images on a worker; prints one path (or JSON object) per image."""

    def body() -> None:
        from imagegen.engine import generate as gen
        from imagegen.engine import upscale as upscale_mod
        from imagegen.engine.output import emit_results
        from imagegen.engine.progress import Reporter

        timeouts, explicit = gen.timeouts_from_env(timeout)
        request = upscale_mod.UpscaleRequest(images=list(images), scale=scale, model=model, output=output_path,
                                             overwrite=overwrite, timeouts=timeouts, explicit_timeouts=explicit)
        planned = upscale_mod.plan(request)  # every input and output checked before a worker starts
        reporter = Reporter(quiet=mode.quiet, show_progress=mode.progress)
        with workers.runtime_for_command() as runtime:
            emit_results(upscale_mod.execute(planned, runtime, reporter), mode.json_mode)

    run_guarded(mode.json_mode, mode.debug, body)
