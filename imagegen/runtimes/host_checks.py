"""`imagegen doctor --hosts`: each SSH host checked (SSH, its engine, NVIDIA runtime, GPUs, the image, free disk)."""

from __future__ import annotations

import shlex

from imagegen.runtimes import ssh_forward
from imagegen.runtimes.docker_hosts import HostDocker, resolve
from imagegen.util.errors import ImagegenError


def _free_disk_kib(engine: HostDocker) -> int | None:
    """Free space where the host's cache lives (its nearest existing folder), from `df`."""
    folder = shlex.quote(engine._base_dir())
    out = ssh_forward.run(engine.target, f'd={folder}; while [ ! -e "$d" ]; do d=$(dirname "$d"); done; '
                                         'df -Pk "$d" | tail -n 1')
    try:
        return int(out.split()[3])
    except (IndexError, ValueError):
        return None


def host_checks(name: str) -> list[dict]:
    """`imagegen doctor --hosts`: for one SSH host, each check as {check, ok, detail, fix, optional, host};
    a host that does not answer stops at the first check that fails, with the next step to take."""
    from imagegen import __version__

    def check(what: str, ok: bool, detail: str, fix: str = "", optional: bool = False) -> dict:
        return {"check": what, "ok": ok, "detail": detail, "fix": "" if ok else fix, "optional": optional,
                "host": name}

    try:
        target = resolve(name)
    except ImagegenError as error:
        return [check("ssh", False, error.message, error.hint or "")]
    if target is None:
        return []
    login = target.login()
    try:
        engine = HostDocker(name, target)
    except ImagegenError as error:
        if error.code == "docker_unavailable":
            return [check("ssh", True, f"{target} answers"),
                    check("docker", False, error.message, f"Run `{login} docker info`: install Docker there, start it, "
                          "and add the login user to the docker group.")]
        return [check("ssh", False, error.message, f"Run `{login} true`: it must log in without a prompt (an SSH "
                      "key in ssh-agent or ~/.ssh/config, the host in known_hosts), and the host must be up.")]
    try:
        info = engine.client.info()
        found = engine.remote_gpus
        has_nvidia = "nvidia" in (info.get("Runtimes") or {})
        checks = [check("ssh", True, f"{target} answers (uid {engine.remote_uid})"),
                  check("docker", True, f"engine {info.get('ServerVersion')} answers"),
                  check("nvidia runtime", has_nvidia, "present" if has_nvidia else "absent",
                        "Install the NVIDIA Container Toolkit there and restart Docker.", optional=not found),
                  check("gpus", bool(found), "; ".join(f"{g.index}: {g.name} {g.uuid} {g.memory_total_mib} MiB "
                                                       f"({g.memory_free_mib} free)" for g in found)
                        or "no NVIDIA GPU found (nvidia-smi absent or failing): workers run on CPU",
                        "Install the NVIDIA driver there so nvidia-smi works.", optional=True)]
        try:
            label = engine.client.images.get(engine.image).labels.get("imagegen.version")
            checks.append(check("image", label == __version__, f"{engine.image} (imagegen {label})",
                                f"imagegen image push {name}"))
        except Exception:  # noqa: BLE001 - ImageNotFound and API errors alike
            checks.append(check("image", False, f"{engine.image} is not there", f"imagegen image push {name}"))
        free = _free_disk_kib(engine)
        gib = (free or 0) / 1024**2
        checks.append(check("free disk", free is not None and gib > 10, f"{gib:.1f} GiB free at {engine._base_dir()}",
                            "Free space there (SD1.5 needs 2 GB, SDXL 7 GB, Flux about 30 GB), or set "
                            "IMAGEGEN_HOSTS_DIR to a folder on a larger disk.", optional=gib > 3))
        return checks
    finally:
        engine.close()
