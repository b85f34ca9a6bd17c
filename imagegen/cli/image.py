"""`imagegen image push HOST...`: the worker image copied to Docker hosts (`docker save | ssh HOST docker load`)."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import tempfile
from typing import Annotated

import typer

from imagegen.cli.common import DebugOpt, JsonOpt, QuietOpt, run_guarded
from imagegen.util.errors import ImagegenError

image_app = typer.Typer(no_args_is_help=True, help="The worker image: copy it to Docker hosts (--hosts).")
CHUNK = 1 << 20


def _remote_id(target, image: str) -> str | None:
    from imagegen.runtimes import ssh_forward

    try:
        return ssh_forward.run(target, f"docker image inspect --format '{{{{.Id}}}}' {shlex.quote(image)} "
                                       "2>/dev/null || true", timeout=60).strip() or None
    except ImagegenError as error:
        if error.code == "host_unreachable":
            raise
        return None


def push_one(name: str, image, show_bar: bool, force: bool = False) -> dict:
    """Stream `docker save` of this machine's image into `docker load` on the host; skip it when it is there."""
    from tqdm import tqdm

    from imagegen.runtimes import ssh_forward
    from imagegen.runtimes.docker_hosts import resolve

    target = resolve(name)
    if target is None:
        raise ImagegenError("invalid_argument", f"{name} is this machine: the image is already here",
                            hint="Name SSH hosts: imagegen image push box2 me@box3:2222")
    tag = image.tags[0] if image.tags else image.id
    if not force and _remote_id(target, tag) == image.id:
        return {"host": name, "image": tag, "id": image.id, "pushed": False, "bytes": 0}
    size = int(image.attrs.get("Size") or 0)
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        process = subprocess.Popen([ssh_forward.ssh_binary(), *ssh_forward.ssh_options(), *target.argv(),
                                    "docker load"], stdin=subprocess.PIPE, stdout=out, stderr=err)
        stdin = process.stdin
        assert stdin is not None  # stdin=PIPE
        sent = 0
        bar = tqdm(total=size or None, unit="B", unit_scale=True, desc=f"{tag} -> {name}", disable=not show_bar,
                   file=sys.stderr)
        try:
            for chunk in image.save(chunk_size=CHUNK, named=True):
                try:
                    stdin.write(chunk)
                except BrokenPipeError:
                    break  # ssh or docker load ended: its exit code and stderr say why
                sent += len(chunk)
                bar.update(len(chunk))
            try:
                stdin.close()
            except BrokenPipeError:
                pass
            code = process.wait()
        except BaseException:
            process.kill()
            raise
        finally:
            bar.close()
        err.seek(0)
        stderr = err.read().decode(errors="replace")
    if code == 255:
        raise ssh_forward.unreachable(target, stderr)
    if code != 0:
        why = stderr.strip()[-300:]
        raise ImagegenError("host_command_failed", f"docker load on {name} failed (exit {code}): {why}",
                            hint=f"Check `{target.login()} docker info` (the login user needs the docker group).")
    return {"host": name, "image": tag, "id": image.id, "pushed": True, "bytes": sent}


@image_app.command("push")
def push(
    hosts: Annotated[list[str], typer.Argument(help="SSH hosts ([user@]host[:port]) or Docker contexts.")],
    image_name: Annotated[str | None, typer.Option("--image", help="The image (default: this version's).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Send it even to a host that has it.")] = False,
    quiet: QuietOpt = False,
    json_mode: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Copy the worker image to each host over SSH, with progress; a host that has it already is skipped."""

    def body() -> None:
        from docker.errors import ImageNotFound

        from imagegen.runtimes.docker import IMAGE, connect

        wanted = image_name or IMAGE
        try:
            image = connect().images.get(wanted)
        except ImageNotFound:
            raise ImagegenError("image_missing", f"the Docker image {wanted} is not built on this machine",
                                hint="Build it with ./build-image.sh, then push it.") from None
        for name in dict.fromkeys(hosts):
            record = push_one(name, image, show_bar=not quiet and sys.stderr.isatty(), force=force)
            if json_mode:
                print(json.dumps({"schema": "imagegen.pushed/1", **record}), flush=True)
            elif not quiet:
                done = f"sent {record['bytes'] / 1e9:.2f} GB" if record["pushed"] else "already there"
                print(f"{name}: {record['image']} {done}", file=sys.stderr, flush=True)

    run_guarded(json_mode, debug, body)
