"""`imagegen models`: list, add, remove, pull and inspect models."""

import json
from pathlib import Path
from typing import Annotated

import typer

from imagegen.cli.common import DebugOpt, FamilyOpt, JsonOpt, QuietOpt, run_guarded
from imagegen.util.errors import ImagegenError

models_app = typer.Typer(no_args_is_help=True, help="List, add, remove, pull and inspect models.")


@models_app.command("list")
def models_list(json_mode: JsonOpt = False, debug: DebugOpt = False) -> None:
    """Registered models: installed or not, size on disk, gated."""

    def body() -> None:
        from imagegen.models import cache
        from imagegen.models.registry import Registry

        registry = Registry.load()
        for name, bundle in sorted(registry.bundles.items()):
            entry = cache.model_record(bundle)
            if json_mode:
                print(json.dumps(entry))
            else:
                state = "installed" if entry["installed"] else f"missing {entry['missing_bytes'] / 1e9:.1f} GB"
                print(f"{name:<16} {bundle.family:<6} {bundle.total_size / 1e9:6.1f} GB  {state:<18}"
                      f"{' gated' if bundle.gated else ''}  {bundle.description}")

    run_guarded(json_mode, debug, body)


@models_app.command("add")
def models_add(
    name: Annotated[str, typer.Argument(help="Name to register the model under.")],
    file: Annotated[Path, typer.Option("--file", help="The local .safetensors file.")],
    family: FamilyOpt = None,
    force: Annotated[bool, typer.Option("--force",
                                        help="Replace your entry of that name, or shadow a built-in.")] = False,
    json_mode: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Register a local model file (used in place, never copied) in your models.yaml."""

    def body() -> None:
        from imagegen.models import addon_files, modelfile
        from imagegen.models.registry import FAMILIES, add_user_model, check_model_name

        check_model_name(name)
        header = modelfile.read_header(file)
        detected = modelfile.detect(header)
        addon = addon_files.detect_addon(header)
        chosen = family or detected.family or (addon.kind if addon.kind != "unknown" else None)
        if chosen not in FAMILIES:
            raise ImagegenError("invalid_model_file",
                                f"{file}: cannot tell its family (looks like {detected.kind}); pass --family",
                                hint="--family sd15, sdxl or flux.")
        base = addon.family if chosen in ("lora", "controlnet") else None
        if chosen in ("lora", "controlnet") and base not in ("sd15", "sdxl", "flux"):
            raise ImagegenError("invalid_model_file", f"{file}: cannot tell from its header which model family "
                                f"this {chosen} is for", hint=f"Add it to models.yaml by hand with `family: {chosen}`"
                                " and `base: sd15|sdxl|flux` (docs/controls.md), or pass the file itself.")
        target = add_user_model(name, file, chosen, force=force, base=base)
        record = {"schema": "imagegen.model_added/1", "name": name, "family": chosen, "file": str(file.resolve()),
                  "models_yaml": str(target)}
        print(json.dumps(record) if json_mode else f"registered {name} ({chosen}) in {target}")

    run_guarded(json_mode, debug, body)


@models_app.command("rm")
def models_rm(name: Annotated[str, typer.Argument(help="A model registered in your models.yaml.")],
              json_mode: JsonOpt = False, debug: DebugOpt = False) -> None:
    """Remove a model from your models.yaml (your files are left where they are)."""

    def body() -> None:
        from imagegen.models.registry import remove_user_model

        if not remove_user_model(name):
            raise ImagegenError("unknown_model", f"{name!r} is not in your models.yaml",
                                hint="Built-in models cannot be removed; "
                                     "`imagegen models list` shows the source of each.")
        print(json.dumps({"schema": "imagegen.model_removed/1", "name": name}) if json_mode else f"removed {name}")

    run_guarded(json_mode, debug, body)


@models_app.command("inspect")
def models_inspect(file: Annotated[Path, typer.Argument(help="A .safetensors file.")],
                   json_mode: JsonOpt = False, debug: DebugOpt = False) -> None:
    """Tell a model file's family and text-encoder shapes from its header alone (no torch)."""

    def body() -> None:
        from imagegen.models import addon_files, modelfile

        header = modelfile.read_header(file)
        found = modelfile.detect(header)
        record = {"schema": "imagegen.inspect/1", "file": str(file), "family": found.family, "kind": found.kind,
                  **found.details}
        addon = addon_files.detect_addon(header) if found.kind == "unknown" else None
        if addon is not None and addon.kind != "unknown":  # a LoRA or ControlNet: the family it is for
            record.update(family=addon.kind, kind=addon.kind, base=addon.family, layout=addon.layout, **addon.details)
        if json_mode:
            print(json.dumps(record))
        else:
            for key, value in record.items():
                if key != "schema":
                    print(f"{key}: {value}")

    run_guarded(json_mode, debug, body)


@models_app.command("pull")
def models_pull(name: Annotated[str, typer.Argument(help="A registered model (see `imagegen models list`).")],
                json_mode: JsonOpt = False, quiet: QuietOpt = False, debug: DebugOpt = False) -> None:
    """Download a model's missing files (verified by sha256 and size; an interrupted pull continues)."""

    def body() -> None:
        from imagegen.models import cache
        from imagegen.models.fetch import fetch_bundle
        from imagegen.models.fetch_progress import TqdmRenderer
        from imagegen.models.registry import Registry
        from imagegen.util import paths

        bundle = Registry.load().get(name)
        models_dir = paths.models_dir()
        renderer = None if json_mode else TqdmRenderer(quiet=quiet)
        def print_event(event: dict) -> None:
            print(json.dumps({"schema": "imagegen.fetch_event/1", **event}), flush=True)

        on_event = print_event if json_mode else renderer
        try:
            fetch_bundle(bundle, models_dir, on_event)
        finally:
            if renderer is not None:
                renderer.close()
        files = cache.ensure_bundle(bundle, None, models_dir)
        if json_mode:
            print(json.dumps({"schema": "imagegen.model_pulled/1", "name": name,
                              "files": {k: str(v) for k, v in files.items()}}))
        else:
            for path in files.values():
                print(path)

    run_guarded(json_mode, debug, body)
