"""`imagegen run WORKFLOW`: a user's own ComfyUI workflow (API or UI JSON, or a PNG that carries one), with
`--set KEY=VALUE` on its inputs, through the same workers, downloads, checks and provenance as generate."""

import json
from pathlib import Path
from typing import Annotated

import typer

from imagegen.cli.common import CallTimeoutOpt, ImageOutputOpt, Mode, OverwriteOpt, Workers, grouped, run_guarded
from imagegen.util.errors import ImagegenError

SetOpt = Annotated[list[str] | None, typer.Option(
    "--set", metavar="KEY=VALUE",
    help="Set an input: by node title (Positive.text=...), by node id (6.text=...), or by name: prompt, negative, "
         "seed, steps, cfg, size (WxH), denoise, image (a local file), checkpoint. Repeatable.")]


def parse_settings(values: list[str] | None) -> dict[str, str]:
    """KEY=VALUE pairs, in order (a later one for the same key wins)."""
    settings: dict[str, str] = {}
    for item in values or []:
        key, separator, value = item.partition("=")
        if not separator or not key.strip():
            raise ImagegenError("invalid_argument", f"--set {item!r} is not KEY=VALUE",
                                hint="For example --set prompt=\"a red fox\" or --set 3.seed=7.")
        settings[key.strip()] = value
    return settings


def print_params(records: list[dict], json_mode: bool) -> None:
    for record in records:
        if json_mode:
            print(json.dumps({"schema": "imagegen.workflow_param/1", **record}), flush=True)
            continue
        limits = ""
        if "min" in record or "max" in record:
            limits = f"  [{record.get('min')}..{record.get('max')}]"
        choices = f"  ({len(record['choices'])} choices)" if record.get("choices") else ""
        where = f"  -> {', '.join(record['sets'])}" if record.get("sets") else \
            f"  ({record['class_type']}{': ' + record['title'] if record.get('title') else ''})"
        print(f"{record['key']}\t{record['type']}\t= {json.dumps(record['value'])}{limits}{choices}{where}",
              flush=True)


@grouped
def run(
    workflow: Annotated[Path | None, typer.Argument(
        help="A workflow: API JSON (Export (API)), UI JSON (Save), or a PNG made by ComfyUI or imagegen.")] = None,
    *,
    settings: SetOpt = None,
    count: Annotated[int, typer.Option("--count", "-n", help="Runs of the workflow, seeds seed, seed+1, ...")] = 1,
    output_path: ImageOutputOpt = None,
    list_params: Annotated[bool, typer.Option(
        "--list-params", help="Print every settable input (type, value, range) and exit; nothing starts.")] = False,
    from_image: Annotated[Path | None, typer.Option(
        "--from", help="Rerun the workflow a PNG made by `imagegen run` (its graph, --set values and inputs).")] = None,
    overwrite: OverwriteOpt = False,
    timeout: CallTimeoutOpt = None,
    workers: Workers,
    mode: Mode,
) -> None:
    """Run your own ComfyUI workflow; prints one path (or JSON object) per image it saves."""

    def body() -> None:
        from imagegen.engine import generate as gen
        from imagegen.engine import output, workflow_run
        from imagegen.engine.progress import Reporter

        source = from_image or workflow
        if source is None or (from_image is not None and workflow is not None):
            raise ImagegenError("usage_error", "give a workflow file, or --from IMAGE, not both" if source else
                                "no workflow given", hint="imagegen run workflow.json --set prompt=\"a fox\"")
        if not 1 <= count <= gen.MAX_COUNT:
            raise ImagegenError("invalid_argument", f"--count {count} is outside 1..{gen.MAX_COUNT}")
        given = parse_settings(settings)
        timeouts, explicit = gen.timeouts_from_env(timeout)
        with workers.runtime_for_command() as runtime:
            reporter = Reporter(quiet=mode.quiet, show_progress=mode.progress)
            info = workflow_run.node_info_of(runtime, reporter)  # the pinned ComfyUI's, or a remote worker's own
            loaded = workflow_run.load(source, info)
            if list_params:
                from imagegen.comfy import graph_params

                applied = graph_params.apply(loaded.graph, given, info)
                print_params(graph_params.describe(applied.graph, info), mode.json_mode)
                return
            jobs = workflow_run.plan(loaded, given, count, output_path, overwrite, runtime, info)
            output.emit_results(workflow_run.execute(jobs, runtime, reporter, overwrite=overwrite, timeouts=timeouts,
                                                     explicit=explicit), mode.json_mode)

    run_guarded(mode.json_mode, mode.debug, body)
