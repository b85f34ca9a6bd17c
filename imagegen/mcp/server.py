"""`imagegen mcp`: an MCP stdio server: generate_image, batch, run_workflow, list_models, and the funnel and upscale
tools of mcp/funnel_tools.py.

Each tool call runs the same code path as the CLI (`generate.generate`) in a worker thread, so the
event loop keeps answering while an image renders. Sampling steps and finished images go to the
client as progress notifications; failures come back as tool errors whose text is the
`imagegen.error/1` JSON (code, message, hint). The mcp SDK moves fd 1 aside for the protocol,
so a stray print reaches stderr, never the client.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import logging
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Annotated

import anyio
import anyio.from_thread
import anyio.to_thread
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.types import CallToolResult, ImageContent, TextContent
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from imagegen import __version__
from imagegen.engine import addons
from imagegen.engine import generate as gen
from imagegen.engine.progress import Reporter
from imagegen.mcp import funnel_tools
from imagegen.util import cancel
from imagegen.util.errors import ImagegenError

THUMBNAIL_PX = 128
logger = logging.getLogger("imagegen.mcp")

# Tool arguments, declared once for generate_image and for the items of batch.
Prompt = Annotated[str, Field(description="What to draw.")]
ModelName = Annotated[str | None, Field(description="A registered model (see list_models); sd15 when omitted.")]
Checkpoint = Annotated[str | None, Field(description="Absolute path of a local SD1.5/SDXL .safetensors file, "
                                                     "used instead of a registered model.")]
Size = Annotated[str | None, Field(description="WIDTHxHEIGHT in multiples of 8, e.g. 768x512; "
                                               "the model's default when omitted.")]
Steps = Annotated[int | None, Field(description="Sampling steps; the model's default when omitted.")]
Seed = Annotated[int | None, Field(description="Seed of the first image; random when omitted. Image i gets seed+i.")]
Count = Annotated[int, Field(description="Number of images.")]
Cfg = Annotated[float | None, Field(description="Classifier-free guidance scale.")]
Negative = Annotated[str | None, Field(description="Negative prompt (SD1.5/SDXL).")]
Fast = Annotated[bool, Field(description="Fast mode: torch.compile the model (the first image compiles for minutes, "
                                         "later ones are faster) and fp8 matmuls for fp8 models on Ada/Hopper; "
                                         "GPU workers only. Worth it for many images.")]
OutputDir = Annotated[str | None, Field(description="Absolute path of the directory to write the PNGs into; "
                                                    "imagegen's output directory when omitted.")]
SourceImage = Annotated[str | None, Field(description="Absolute path of an image (PNG, JPEG or WebP) to start from: "
                                                      "img2img, or inpainting with mask. The output takes its size "
                                                      "(rounded down to a multiple of 8) unless size is given.")]
Mask = Annotated[str | None, Field(description="Absolute path of an inpainting mask the size of image: white is "
                                               "repainted, black kept.")]
MaskGrow = Annotated[int | None, Field(description="Grow the mask by this many pixels (0-256).")]
Denoise = Annotated[float | None, Field(description="How much of image is redrawn, 0 (kept) to 1 (new); default 0.6, "
                                                    "1.0 when inpainting.")]
Extend = Annotated[str | list[int] | None, Field(description="Outpaint: a border to add to image and draw, in pixels "
                                                             "(multiples of 8): one number for every side, or "
                                                             "[left, top, right, bottom].")]
Loras = Annotated[list[str | dict] | None, Field(description=(
    "LoRAs to stack, each \"NAME_OR_FILE[:STRENGTH]\" (a registered LoRA or the absolute path of a .safetensors "
    "file) or {\"name\", \"strength\"}; <lora:name:0.8> tags in the prompt work too."))]
Controls = Annotated[list[str | dict] | None, Field(description=(
    "ControlNets, each \"MODEL:IMAGE[:STRENGTH[:START:END]]\" or {\"model\", \"image\", \"strength\", "
    "\"start\", \"end\", \"preprocess\"}; IMAGE is the absolute path of the control image."))]
ControlPreprocess = Annotated[str | None, Field(description="\"canny\": turn each control image into edges first.")]


class ImageSpec(BaseModel):
    """One prompt and its options: the arguments of generate_image, and one item of batch."""

    model_config = ConfigDict(extra="forbid")  # a misspelt option is an error, never silently dropped

    prompt: Prompt
    model: ModelName = None
    checkpoint: Checkpoint = None
    size: Size = None
    steps: Steps = None
    seed: Seed = None
    count: Count = 1
    cfg: Cfg = None
    negative: Negative = None
    fast: Fast = False
    output_dir: OutputDir = None
    image: SourceImage = None
    mask: Mask = None
    mask_grow: MaskGrow = None
    denoise: Denoise = None
    extend: Extend = None
    loras: Loras = None
    controls: Controls = None
    control_preprocess: ControlPreprocess = None

    def request(self) -> gen.Request:
        if self.output_dir is not None and self.output_dir.strip() in ("", "-"):
            raise ImagegenError("invalid_argument", f"output_dir {self.output_dir!r} is not a directory",
                                hint="Pass a directory path, or leave output_dir out for the default.")
        timeouts, explicit = gen.timeouts_from_env()
        folder = funnel_tools.absolute(self.output_dir, "output_dir")
        output = str(folder) + os.sep if folder else None
        checkpoint = funnel_tools.absolute(self.checkpoint, "checkpoint")
        image, mask = funnel_tools.absolute(self.image, "image"), funnel_tools.absolute(self.mask, "mask")
        loras, controls = addons.anchored(self.loras, self.controls, None)  # their files: absolute paths only
        return gen.Request(prompt=self.prompt, model=self.model, checkpoint=checkpoint,
                           size=self.size, steps=self.steps, seed=self.seed, count=self.count, cfg=self.cfg,
                           negative=self.negative, fast=self.fast, output=output, timeouts=timeouts,
                           explicit_timeouts=explicit, loras=loras, controls=controls,
                           control_preprocess=self.control_preprocess, image=image, mask=mask,
                           mask_grow=self.mask_grow, denoise=self.denoise, extend=self.extend)


# A runner takes the validated plans of one tool call, keyed by item index, and yields
# (item index, result record or error) as images finish. Today's runs them one after another;
# the batch scheduler slots in here.
Runner = Callable[[dict[int, gen.Plan], object, Reporter], Iterable[tuple[int, "dict | ImagegenError"]]]


def run_in_sequence(plans: dict[int, gen.Plan], runtime,
                    reporter: Reporter) -> Iterator[tuple[int, dict | ImagegenError]]:
    for index, planned in plans.items():
        try:
            for record in gen.execute(planned, runtime, reporter):
                yield index, record
        except ImagegenError as error:
            if error.code == "interrupted":
                raise
            yield index, error


class ClientProgress(Reporter):
    """Reports to the MCP client from the worker thread. Progress counts images (total = images in
    the call), the current image's sampling steps giving the fraction; MCP wants every notification
    to carry a larger value than the last, so repeats are dropped."""

    def __init__(self, ctx: Context, total_images: int, cancelled: threading.Event):
        super().__init__(quiet=False, show_progress=False)
        self.ctx, self.total, self.cancelled = ctx, total_images, cancelled
        self.done = 0
        self.sent = -1.0

    def status(self, message: str) -> None:
        super().status(message)
        self._send(self.done, message)

    def progress(self, state) -> None:
        if self.cancelled.is_set():
            raise ImagegenError("interrupted", "the client cancelled the request")
        if state.phase == "sampling" and state.total:
            # steps / (total + 1): the image is not done until it is decoded and saved
            fraction = min(state.step, state.total) / (state.total + 1)
            self._send(self.done + fraction, f"image {self.done + 1}/{self.total}: step {state.step}/{state.total}")

    def finished(self, record: dict) -> None:
        self.done += 1
        self._send(self.done, f"image {self.done}/{self.total} saved: {record['path']}")

    def _send(self, value: float, message: str) -> None:
        if value <= self.sent:
            return
        self.sent = value
        try:
            anyio.from_thread.run(self.ctx.report_progress, value, self.total, message)
        except Exception as exc:  # noqa: BLE001 - progress is advisory; it never fails a job
            logger.debug("progress notification failed: %r", exc)


def thumbnail(path: str, size: int = THUMBNAIL_PX) -> bytes:
    from PIL import Image

    with Image.open(path) as image:
        image.thumbnail((size, size))
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def image_content(record: dict) -> list:
    return [TextContent(type="text", text=json.dumps(record)),
            ImageContent(type="image", data=base64.b64encode(thumbnail(record["path"])).decode("ascii"),
                         mime_type="image/png")]


def error_result(error: ImagegenError) -> CallToolResult:
    record = error.to_json()
    return CallToolResult(content=[TextContent(type="text", text=json.dumps(record))], structured_content=record,
                          is_error=True)


def argument_error(tool: str, exc: ValidationError) -> ImagegenError:
    """A schema violation (a wrong type, a missing prompt, an unknown key in a batch item) as
    invalid_argument naming each argument, like any other bad input."""
    problems, names = [], []
    for problem in exc.errors():
        where = ".".join(str(part) for part in problem["loc"]) or "arguments"
        names.append(where)
        if problem["type"] == "missing":
            problems.append(f"{where} is required")
        elif problem["type"] == "extra_forbidden":
            problems.append(f"{where} is not an option")
        else:
            problems.append(f"{where}: {problem['msg']} (got {json.dumps(problem.get('input'), default=str)[:60]})")
    return ImagegenError("invalid_argument", f"{tool}: " + "; ".join(problems),
                         hint=f"Fix the argument(s) named; the {tool} tool's input schema lists each option "
                              "and its type.",
                         arguments=names)


def unknown_arguments(tool: str, unknown: list[str], known: set[str]) -> ImagegenError:
    import difflib

    guesses = [f"{name} (did you mean {close[0]}?)" if (close := difflib.get_close_matches(name, known, n=1))
               else name for name in unknown]
    return ImagegenError("invalid_argument", f"{tool}: unknown argument(s) {', '.join(guesses)}",
                         hint=f"{tool} takes: {', '.join(sorted(known))}.", arguments=unknown)


class ImagegenServer(MCPServer):
    """MCPServer whose argument errors come back as imagegen.error/1 tool errors (code invalid_argument),
    like every other failure, instead of the SDK's plain text; unknown arguments are refused, not dropped."""

    async def call_tool(self, name: str, arguments: dict, context: Context | None = None):
        tool = self._tool_manager.get_tool(name)
        if tool is not None:
            known = set((tool.parameters or {}).get("properties", {}))
            unknown = sorted(set(arguments or {}) - known)
            if unknown:
                return error_result(unknown_arguments(name, unknown, known))
        try:
            return await super().call_tool(name, arguments, context)
        except ToolError as exc:
            if isinstance(exc.__cause__, ValidationError):
                return error_result(argument_error(name, exc.__cause__))
            raise


def as_imagegen_error(exc: Exception) -> ImagegenError:
    if isinstance(exc, ImagegenError):
        return exc
    logger.exception("unexpected error in a tool call")
    return ImagegenError("internal_error", f"{exc.__class__.__name__}: {exc}")


class ImagegenTools:
    """The state the tools share: which runtime to use (made on first use) and how to run requests."""

    def __init__(self, runtime_name: str = "auto", keep_warm: float = 300.0, runner: Runner = run_in_sequence):
        self.runtime_name, self.keep_warm, self.runner = runtime_name, keep_warm, runner
        self._runtime = None
        self._lock = threading.Lock()
        self._ends = contextlib.ExitStack()  # --keep-warm 0: the workers the server started stop with it

    def runtime(self):
        from imagegen.runtimes.choose import make_runtime
        from imagegen.runtimes.lifetime import workers_of_command

        with self._lock:
            if self._runtime is None:
                made = make_runtime(self.runtime_name, self.keep_warm)
                self._runtime = self._ends.enter_context(workers_of_command(made, self.keep_warm))
            return self._runtime

    def close(self) -> None:
        """The server ends: with --keep-warm 0, stop the workers it started (those it reused are left)."""
        self._ends.close()

    async def in_thread(self, work: Callable, *args):
        """Run blocking work off the event loop. On cancellation the thread is told to stop (it
        interrupts its ComfyUI jobs at the next progress event) and is not waited for."""
        cancelled = threading.Event()
        try:
            return await anyio.to_thread.run_sync(work, *args, cancelled, abandon_on_cancel=True)  # type: ignore[arg-type]
        except anyio.get_cancelled_exc_class():
            cancelled.set()
            raise

    async def render(self, specs: list[ImageSpec], ctx: Context, batch: bool) -> CallToolResult:
        try:
            return await self.in_thread(self._render, specs, ctx, batch)
        except Exception as exc:  # noqa: BLE001 - every failure reaches the client as a tool error
            return error_result(as_imagegen_error(exc))

    def _render(self, specs: list[ImageSpec], ctx: Context, batch: bool, cancelled: threading.Event) -> CallToolResult:
        """Images as they finish, and failures as imagegen.error/1 records: generate_image fails as a
        whole (still listing any images it wrote), while batch goes on with its other items. A cancelled
        call stops wherever it is: a download, a worker start (the worker is stopped) or rendering."""
        with cancel.scope(cancelled):
            return self._render_items(specs, ctx, batch, cancelled)

    def _render_items(self, specs: list[ImageSpec], ctx: Context, batch: bool,
                      cancelled: threading.Event) -> CallToolResult:
        content: list = []
        results: list[dict] = []
        errors: list[dict] = []

        def failed(index: int, error: ImagegenError) -> None:
            record = {"item": index, **error.to_json()} if batch else error.to_json()
            errors.append(record)
            content.insert(len(errors) - 1, TextContent(type="text", text=json.dumps(record)))

        plans = {}
        for index, spec in enumerate(specs):  # validate every item before any worker starts
            try:
                plans[index] = gen.plan(spec.request())
            except ImagegenError as error:
                failed(index, error)
        if plans and (batch or not errors):
            reporter = ClientProgress(ctx, sum(len(p.jobs) for p in plans.values()), cancelled)
            for index, outcome in self.runner(plans, self.runtime(), reporter):
                if isinstance(outcome, ImagegenError):
                    failed(index, outcome)
                    continue
                record = {"item": index, **outcome} if batch else outcome
                reporter.finished(record)
                results.append(record)
                content += image_content(record)
        if not batch and errors:
            return CallToolResult(content=content, structured_content=errors[0], is_error=True)
        return CallToolResult(content=content, structured_content={"results": results, "errors": errors},
                              is_error=bool(errors) and not results)

    def _models(self, _cancelled: threading.Event) -> CallToolResult:
        from imagegen.models.cache import model_record
        from imagegen.models.registry import Registry

        records = [model_record(bundle) for _name, bundle in sorted(Registry.load().bundles.items())]
        return CallToolResult(content=[TextContent(type="text", text=json.dumps(records))],
                              structured_content={"models": records})

    def _workflow(self, ctx: Context, workflow: str, settings: dict, count: int, list_params: bool,
                  output_dir: str | None, cancelled: threading.Event) -> CallToolResult:
        """run_workflow: a user's own ComfyUI graph through engine/workflow_run, as `imagegen run` does."""
        from imagegen.comfy import graph_params
        from imagegen.comfy.client import Timeouts
        from imagegen.engine import workflow_run

        with cancel.scope(cancelled):
            reporter = ClientProgress(ctx, count, cancelled)
            source = funnel_tools.required(workflow, "workflow")  # the server's folder is not the agent's
            info = workflow_run.node_info_of(self.runtime(), reporter)  # a remote worker's own, else the pinned
            loaded = workflow_run.load(source, info)
            if list_params:
                applied = graph_params.apply(loaded.graph, settings, info, anchored=True)
                records = graph_params.describe(applied.graph, info)
                return CallToolResult(content=[TextContent(type="text", text=json.dumps(records))],
                                      structured_content={"params": records})
            folder = str(funnel_tools.absolute(output_dir, "output_dir")) + os.sep if output_dir else None
            jobs = workflow_run.plan(loaded, settings, count, folder, False, self.runtime(), info, anchored=True)
            content: list = []
            results = []
            for record in workflow_run.execute(jobs, self.runtime(), reporter, overwrite=False, timeouts=Timeouts(),
                                               explicit=set()):
                reporter.finished(record)
                results.append(record)
                content += image_content(record)
            return CallToolResult(content=content, structured_content={"results": results, "errors": []})

    async def models(self) -> CallToolResult:
        try:
            return await self.in_thread(self._models)
        except Exception as exc:  # noqa: BLE001
            return error_result(as_imagegen_error(exc))

    # what the tools of mcp/funnel_tools.py share with these
    @staticmethod
    def failure(exc: Exception) -> CallToolResult:
        return error_result(as_imagegen_error(exc))

    @staticmethod
    def image_records(record: dict) -> list:
        return image_content(record)

    @staticmethod
    def picture(path: str, size: int) -> ImageContent:
        return ImageContent(type="image", data=base64.b64encode(thumbnail(path, size)).decode("ascii"),
                            mime_type="image/png")


def build_server(tools: ImagegenTools) -> MCPServer:
    server = ImagegenServer(name="imagegen", version=__version__, instructions=(
        "Generate images locally with ComfyUI. generate_image returns each PNG's absolute path, its parameters "
        "as JSON and a small thumbnail; list_models shows the models and whether they are installed. "
        "funnel_start, funnel_show and funnel_pick run a funnel (many drafts, picks from a contact sheet, refine, "
        "upscale); upscale_image enlarges existing images."))

    @server.tool()
    async def generate_image(prompt: Prompt, ctx: Context, model: ModelName = None, checkpoint: Checkpoint = None,
                             size: Size = None, steps: Steps = None, seed: Seed = None, count: Count = 1,
                             cfg: Cfg = None, negative: Negative = None, fast: Fast = False,
                             output_dir: OutputDir = None, loras: Loras = None, controls: Controls = None,
                             control_preprocess: ControlPreprocess = None, image: SourceImage = None,
                             mask: Mask = None, mask_grow: MaskGrow = None, denoise: Denoise = None,
                             extend: Extend = None) -> CallToolResult:
        """Generate images from a prompt. Returns, per image, a JSON record (path, seed, model, size, steps,
        timings; schema imagegen.result/1) and a thumbnail. The first call may start a worker (seconds to minutes)."""
        spec = ImageSpec(prompt=prompt, model=model, checkpoint=checkpoint, size=size, steps=steps, seed=seed,
                         count=count, cfg=cfg, negative=negative, fast=fast, output_dir=output_dir, loras=loras,
                         controls=controls, control_preprocess=control_preprocess, image=image, mask=mask,
                         mask_grow=mask_grow, denoise=denoise, extend=extend)
        return await tools.render([spec], ctx, batch=False)

    @server.tool()
    async def batch(items: Annotated[list[ImageSpec], Field(description="The prompts, each with its own options.",
                                                            min_length=1)],
                    ctx: Context) -> CallToolResult:
        """Generate images for several prompts in one call. Each image's record carries `item` (its index in
        `items`); an item that fails is reported as an imagegen.error/1 record with its `item`, and the others
        still run."""
        return await tools.render(items, ctx, batch=True)

    @server.tool()
    async def run_workflow(
        workflow: Annotated[str, Field(description="Path of a ComfyUI workflow: API JSON (Export (API)), UI JSON "
                                                   "(Save), or a PNG made by ComfyUI or imagegen.")],
        ctx: Context,
        set: Annotated[dict[str, str | int | float | bool] | None, Field(  # noqa: A002 - the batch item's name
            description="Inputs to set, KEY: VALUE. KEY is a node title or id and an input (\"Positive.text\", "
                        "\"6.text\"), or prompt, negative, seed, steps, cfg, size, denoise, image (a local file), "
                        "checkpoint. list_params shows every key.")] = None,
        count: Annotated[int, Field(description="Runs; the seed goes up by one each run.", ge=1, le=100)] = 1,
        list_params: Annotated[bool, Field(description="Only list the settable inputs (key, type, value, "
                                                       "default, range); nothing runs.")] = False,
        output_dir: OutputDir = None,
    ) -> CallToolResult:
        """Run the user's own ComfyUI workflow with some inputs set. Call with list_params first to discover its
        keys. Returns, per saved image, a JSON record (path, seed, workflow sha256, the values set) and a
        thumbnail. Custom nodes are refused; model files are fetched from the registry or must be present."""
        try:
            return await tools.in_thread(tools._workflow, ctx, workflow, dict(set or {}), count, list_params,
                                         output_dir)
        except Exception as exc:  # noqa: BLE001 - every failure reaches the client as a tool error
            return error_result(as_imagegen_error(exc))

    @server.tool()
    async def list_models() -> CallToolResult:
        """The registered models (schema imagegen.model/1): family, installed or not, size, defaults and files."""
        return await tools.models()

    funnel_tools.register(server, tools)  # funnel_start, funnel_show, funnel_pick, upscale_image
    return server


def serve(runtime_name: str = "auto", keep_warm: float = 300.0) -> None:
    tools = ImagegenTools(runtime_name, keep_warm)
    try:
        build_server(tools).run("stdio")
    finally:
        tools.close()
