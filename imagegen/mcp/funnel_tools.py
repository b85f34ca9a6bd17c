"""MCP tools for the funnel and for upscaling: funnel_start, funnel_show, funnel_pick and upscale_image.

Each runs the CLI's own code (funnel/pipeline.py, engine/upscale.py) in a worker thread. The funnel
tools answer with the funnel's status record (imagegen.funnel_status/1: what comes next and the
command that continues it) and the contact sheet to pick from, so a vision agent can look and pick.
Paths are checked like the CLI's (absolute here: the server's working folder is not the agent's).
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Annotated

from mcp.server.mcpserver import Context
from mcp.types import CallToolResult, TextContent
from pydantic import Field

from imagegen.engine.progress import BatchReporter
from imagegen.util import cancel
from imagegen.util.errors import ImagegenError

SHEET_PX = 1024  # the contact sheet as the agent sees it: large enough to read its numbers

Dir = Annotated[str, Field(description="Absolute path of the funnel directory (it holds funnel.json).")]
Picks = Annotated[list[int], Field(description="1-based numbers from the contact sheet of the stage awaiting a "
                                               "pick, e.g. [3, 7].", min_length=1)]


def absolute(value: str | None, name: str) -> Path | None:
    """A path argument: absolute, with no NUL, like a path on the command line."""
    if value is None:
        return None
    path = Path(value).expanduser() if isinstance(value, str) else None
    if path is None or not value.strip() or "\0" in value or not path.is_absolute():
        raise ImagegenError("invalid_argument", f"{name} {value!r} must be an absolute path",
                            hint=f"Pass {name} as an absolute path (the server's working folder is not yours).")
    return path


def required(value: str, name: str) -> Path:
    path = absolute(value, name)
    if path is None:
        raise ImagegenError("invalid_argument", f"{name} is required", hint=f"Pass {name} as an absolute path.")
    return path


class ToolProgress(BatchReporter):
    """A funnel stage's or an upscale's progress as MCP notifications; a cancelled call stops at the next step."""

    def __init__(self, ctx: Context, cancelled: threading.Event):
        super().__init__(quiet=False, show_progress=False)
        self.ctx, self.cancelled, self.done, self.sent = ctx, cancelled, 0, -1.0

    def status(self, message: str) -> None:
        super().status(message)
        self._send(message)

    def finished(self, images=1, failed: bool = False) -> None:
        self.done += images if isinstance(images, int) else 1
        self._send(f"{self.done} image(s) done")

    def worker_progress(self, state):
        def update(progress) -> None:
            if self.cancelled.is_set():
                raise ImagegenError("interrupted", "the client cancelled the request")
        return update

    def progress(self, state) -> None:
        if self.cancelled.is_set():
            raise ImagegenError("interrupted", "the client cancelled the request")

    def _send(self, message: str) -> None:
        import anyio.from_thread

        value = self.done + 0.5 if self.done > self.sent else self.sent + 0.001
        self.sent = value
        try:
            anyio.from_thread.run(self.ctx.report_progress, value, None, message)
        except Exception:  # noqa: BLE001 - progress is advisory; it never fails a job
            pass


def _status_result(tools, status: dict, records: list[dict]) -> CallToolResult:
    content: list = [TextContent(type="text", text=json.dumps(status))]
    if status.get("sheet") and Path(status["sheet"]).is_file():
        content.append(tools.picture(status["sheet"], SHEET_PX))
    for record in records:
        content += tools.image_records(record)
    return CallToolResult(content=content, structured_content={"status": status, "results": records})


def _advance(tools, funnel, ctx: Context, cancelled, picks: tuple[str, ...] = (), auto: bool = False,
             vary: int | None = None, vary_denoise: float | None = None) -> CallToolResult:
    from imagegen.engine import generate as gen
    from imagegen.funnel import pipeline
    from imagegen.funnel import vary as funnel_vary

    funnel_vary.check(vary, vary_denoise)
    timeouts, explicit = gen.timeouts_from_env()
    options = pipeline.Options(timeouts=timeouts, explicit=frozenset(explicit), picks=picks, auto=auto,
                               vary=vary or 0, vary_denoise=vary_denoise)
    records: list[dict] = []
    with cancel.scope(cancelled):
        status = pipeline.advance(funnel, tools.runtime(), ToolProgress(ctx, cancelled), records.append, options)
    return _status_result(tools, status, records)


def start(tools, ctx: Context, cancelled, *, prompt: str, output_dir: str, checkpoint: str | None,
          models: dict[str, str | None], drafts: int | None, keep: str | None, size: str | None, steps: str | None,
          seed: int | None, negative: str | None, auto: bool, loras: list | None = None) -> CallToolResult:
    import secrets

    from imagegen.engine import addons
    from imagegen.engine import generate as gen
    from imagegen.funnel import loras as funnel_loras
    from imagegen.funnel import pipeline
    from imagegen.funnel import stages as funnel_stages
    from imagegen.models.registry import Registry

    registry = Registry.load()
    text = gen.check_prompt(prompt)
    root = required(output_dir, "output_dir")
    given = {name: str(absolute(model, f"{name}_model")) if model and funnel_stages.is_path(model) else model
             for name, model in models.items()}
    if seed is not None and not 0 <= seed <= 2**32:
        raise ImagegenError("invalid_argument", f"seed {seed} is outside 0..{2**32}")
    stages = funnel_stages.configure(funnel_stages.default_stages(registry), registry, models=given,
                                     checkpoint=absolute(checkpoint, "checkpoint"), drafts=drafts, keep=keep,
                                     size=size, steps=steps)
    stack, _ = addons.anchored(loras, None, None, registry)  # a LoRA file: an absolute path only
    text, per_stage = funnel_loras.plan(text, stack, stages, registry)  # each LoRA on its family's stages
    text = gen.check_prompt(text)
    funnel = pipeline.Funnel.create(root, text, negative, secrets.randbelow(2**32) if seed is None else seed, stages,
                                    per_stage)
    return _advance(tools, funnel, ctx, cancelled, auto=auto)


def show(tools, directory: str) -> CallToolResult:
    from imagegen.funnel import pipeline

    funnel = pipeline.Funnel.load(required(directory, "dir"))
    status = pipeline.status_record(funnel)
    result = _status_result(tools, status, [])
    result.content.insert(1, TextContent(type="text", text="\n".join(pipeline.summary_lines(funnel))))
    result.structured_content = {"status": status, "funnel": funnel.data}
    return result


def pick(tools, ctx: Context, cancelled, *, directory: str, picks: list[int], advance: bool, vary: int | None,
         vary_denoise: float | None) -> CallToolResult:
    from imagegen.funnel import pipeline

    funnel = pipeline.Funnel.load(required(directory, "dir"))
    step = funnel.next_step()
    if step["action"] != "pick":
        raise ImagegenError("invalid_argument", f"{funnel.root} is not waiting for a pick (next: {step['action']}"
                                                + (f" stage {step['stage']})" if "stage" in step else ")"),
                            hint="Call funnel_show to see where it stands; funnel_pick with advance continues it.")
    text = ",".join(map(str, picks))
    if advance:
        return _advance(tools, funnel, ctx, cancelled, picks=(text,), vary=vary, vary_denoise=vary_denoise)
    return _pick_only(tools, funnel, step["stage"], text, vary, vary_denoise)


def _pick_only(tools, funnel, number: int, text: str, vary: int | None, vary_denoise: float | None) -> CallToolResult:
    """Record the picks (and put in the variations stage) without rendering anything."""
    from imagegen.funnel import pipeline
    from imagegen.funnel import state as state_file
    from imagegen.funnel import vary as funnel_vary

    funnel_vary.check(vary, vary_denoise)
    held = state_file.lock(funnel.root)
    try:
        funnel.data = pipeline.Funnel.load(funnel.root).data  # what the state file says now, under the lock
        record = funnel.record(number)
        choices = [image["index"] for image in record["images"] if funnel.done(image)]
        record["picks"] = pipeline.parse_picks(text, choices, record["sheet"])
        record["picked_by"] = "pick"
        funnel.save()
        if vary:
            funnel_vary.insert(funnel, number, vary, vary_denoise)
    finally:
        held.release()
    return _status_result(tools, pipeline.status_record(funnel), [])


def upscale_images(tools, ctx: Context, cancelled, *, images: list[str], scale: float, model: str | None,
                   output_dir: str | None, overwrite: bool) -> CallToolResult:
    import os

    from imagegen.engine import generate as gen
    from imagegen.engine import upscale

    paths = [absolute(image, "images[]") for image in images]
    folder = absolute(output_dir, "output_dir")
    timeouts, explicit = gen.timeouts_from_env()
    planned = upscale.plan(upscale.UpscaleRequest(images=paths, scale=scale, model=model,  # type: ignore[arg-type]
                                                  output=str(folder) + os.sep if folder else None, overwrite=overwrite,
                                                  timeouts=timeouts, explicit_timeouts=explicit))
    records: list[dict] = []
    reporter = ToolProgress(ctx, cancelled)
    with cancel.scope(cancelled):
        for record in upscale.execute(planned, tools.runtime(), reporter):
            reporter.finished(1)
            records.append(record)
    content: list = []
    for record in records:
        content += tools.image_records(record)
    return CallToolResult(content=content, structured_content={"results": records, "errors": []})


def register(server, tools) -> None:
    """Add the tools to the MCP server; `tools` is its ImagegenTools (runtime, threads, results)."""

    async def run(work, *args, **kwargs) -> CallToolResult:
        try:
            return await tools.in_thread(lambda *a: work(*a, **kwargs), *args)
        except Exception as exc:  # noqa: BLE001 - every failure reaches the client as a tool error
            return tools.failure(exc)

    @server.tool()
    async def funnel_start(
        prompt: Annotated[str, Field(description="What to draw.")],
        output_dir: Annotated[str, Field(description="Absolute path of a new funnel directory.")],
        ctx: Context,
        checkpoint: Annotated[str | None, Field(description="Absolute path of a local SD1.5/SDXL .safetensors "
                                                            "for every drawing stage.")] = None,
        draft_model: Annotated[str | None, Field(description="Model of the drafts stage.")] = None,
        refine_model: Annotated[str | None, Field(description="Model of the refine stage, or none.")] = None,
        polish_model: Annotated[str | None, Field(description="Model of the polish stage, or none.")] = None,
        upscale_model: Annotated[str | None, Field(description="Upscale model, or none.")] = None,
        drafts: Annotated[int | None, Field(description="Images in the first stage (default 20).")] = None,
        keep: Annotated[str | None, Field(description="Images kept after each stage but the last, e.g. 8,3,1.")]
        = None,
        size: Annotated[str | None, Field(description="WIDTHxHEIGHT for every drawing stage, or one each.")] = None,
        steps: Annotated[str | None, Field(description="Steps for every drawing stage, or one each: 20,25,40.")]
        = None,
        seed: Annotated[int | None, Field(description="Base seed (random when omitted).")] = None,
        negative: Annotated[str | None, Field(description="Negative prompt (SD1.5/SDXL).")] = None,
        auto: Annotated[bool, Field(description="Pick by the documented rule instead of stopping for picks.")]
        = False,
        loras: Annotated[list[str | dict] | None, Field(description=(
            "LoRAs to stack, each \"NAME_OR_FILE[:STRENGTH]\" (a registered LoRA, a file's name in the LoRA "
            "folders, or the absolute path of a .safetensors file) or {\"name\", \"strength\"}; <lora:name:0.8> "
            "tags in the prompt work too. Each applies on the stages whose model is of its family."))] = None,
    ) -> CallToolResult:
        """Start a funnel: many fast drafts, then picks, refine, polish and upscale. Renders the drafts and
        returns the status (imagegen.funnel_status/1) and the contact sheet to pick from with funnel_pick."""
        models = {"drafts": draft_model, "refine": refine_model, "polish": polish_model, "upscale": upscale_model}
        return await run(start, tools, ctx, prompt=prompt, output_dir=output_dir, checkpoint=checkpoint,
                         models=models, drafts=drafts, keep=keep, size=size, steps=steps, seed=seed,
                         negative=negative, auto=auto, loras=loras)

    @server.tool()
    async def funnel_show(dir: Dir) -> CallToolResult:
        """Where a funnel stands: each stage's images and picks, what comes next, and the contact sheet."""
        return await run(lambda _cancelled: show(tools, dir))

    @server.tool()
    async def funnel_pick(
        dir: Dir, picks: Picks, ctx: Context,
        advance: Annotated[bool, Field(description="Go on rendering after the pick, until the next pick or the "
                                                   "end (false: only record the pick).")] = True,
        vary: Annotated[int | None, Field(description="More like this: first N img2img variations of each pick, "
                                                      "to pick from again.")] = None,
        vary_denoise: Annotated[float | None, Field(description="How much a variation redraws (default 0.35).")]
        = None,
    ) -> CallToolResult:
        """Pick images of the stage awaiting a pick (numbers from its contact sheet) and optionally go on."""
        return await run(pick, tools, ctx, directory=dir, picks=picks, advance=advance, vary=vary,
                         vary_denoise=vary_denoise)

    @server.tool()
    async def upscale_image(
        images: Annotated[list[str], Field(description="Absolute paths of PNG, JPEG or WebP images.", min_length=1)],
        ctx: Context,
        scale: Annotated[float, Field(description="Output size as a multiple of the input's (1..8).")] = 2.0,
        model: Annotated[str | None, Field(description="A registered upscale model or an absolute .safetensors "
                                                       "path (realesrgan-x4 when omitted).")] = None,
        output_dir: Annotated[str | None, Field(description="Absolute folder for IMAGE-x2.png files; imagegen's "
                                                            "output directory when omitted.")] = None,
        overwrite: Annotated[bool, Field(description="Replace existing output files.")] = False,
    ) -> CallToolResult:
        """Upscale existing images with an upscale model. Returns each new PNG's record (its source's sha256, the
        model and the scale) and a thumbnail."""
        return await run(upscale_images, tools, ctx, images=images, scale=scale, model=model, output_dir=output_dir,
                         overwrite=overwrite)
