"""Naming Docker hosts (--hosts, contexts) and the ssh command lines; a host that does not answer (real ssh)."""

from __future__ import annotations

import hashlib
import json
import shutil
import socket

import pytest

from imagegen.runtimes import ssh_forward
from imagegen.runtimes.base import is_cpu_slot
from imagegen.runtimes.docker_hosts import host_names, resolve, split_slot
from imagegen.runtimes.ssh_forward import Target
from imagegen.util.errors import ImagegenError


@pytest.mark.parametrize("text, target", [
    ("box2", Target("box2")),
    ("me@box3:2222", Target("box3", "me", 2222)),
    ("ssh://root@127.0.0.1:2022", Target("127.0.0.1", "root", 2022)),
    ("me@[::1]:22", Target("::1", "me", 22)),
])
def test_ssh_hosts_are_parsed(text, target):
    assert Target.parse(text) == target


@pytest.mark.parametrize("text", ["", "me@", "box:99999", "box/2", "a b", "-oProxyCommand=x", "-oFoo"])
def test_a_malformed_host_is_invalid_argument(text):
    with pytest.raises(ImagegenError) as caught:
        Target.parse(text)
    assert caught.value.code == "invalid_argument"


def test_the_ssh_command_line_names_user_and_port_and_ends_options_before_the_host(monkeypatch):
    target = Target.parse("me@box3:2222")
    assert target.argv() == ["-l", "me", "-p", "2222", "--", "box3"]
    assert target.login() == "ssh -p 2222 me@box3"
    monkeypatch.setenv("IMAGEGEN_SSH_CONFIG", "/etc/imagegen/ssh_config")
    options = ssh_forward.ssh_options()
    assert options[:2] == ["-F", "/etc/imagegen/ssh_config"] and "BatchMode=yes" in options


def test_hosts_come_from_the_option_or_the_environment_each_once(monkeypatch):
    assert host_names("local, box2,box2,,me@box3") == ["local", "box2", "me@box3"]
    monkeypatch.setenv("IMAGEGEN_DOCKER_HOSTS", "box4,local")
    assert host_names(None) == ["box4", "local"]


def test_local_and_docker_contexts_are_resolved(tmp_path, monkeypatch):
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path))
    for name, host in (("gpu-box", "ssh://me@box5:2200"), ("here", "unix:///var/run/docker.sock"),
                       ("tcp-box", "tcp://10.0.0.5:2375")):
        meta = tmp_path / "contexts" / "meta" / hashlib.sha256(name.encode()).hexdigest() / "meta.json"
        meta.parent.mkdir(parents=True)
        meta.write_text(json.dumps({"Name": name, "Endpoints": {"docker": {"Host": host}}}))
    assert resolve("local") is None and resolve("here") is None
    assert resolve("gpu-box") == Target("box5", "me", 2200)
    assert resolve("plain-box") == Target("plain-box")
    with pytest.raises(ImagegenError) as caught:
        resolve("tcp-box")
    assert caught.value.code == "invalid_argument" and "ssh://" in caught.value.hint


def test_slots_name_their_host():
    assert split_slot("me@box3:2222/GPU-3f2a") == ("me@box3:2222", "GPU-3f2a")
    assert is_cpu_slot("box2/cpu-2") and not is_cpu_slot("box2/GPU-3f2a")


def test_no_host_answering_is_host_unreachable_naming_each(tmp_path, monkeypatch):
    if not shutil.which("ssh"):
        pytest.skip("no ssh client")  # the parsing above needs none; this one runs the real one
    config = tmp_path / "ssh_config"
    config.write_text("Host *\n  StrictHostKeyChecking yes\n")
    monkeypatch.setenv("IMAGEGEN_SSH_CONFIG", str(config))
    ports = []
    for _ in range(2):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            ports.append(probe.getsockname()[1])
    from imagegen.runtimes.choose import make_runtime

    with pytest.raises(ImagegenError) as caught:
        make_runtime("auto", hosts=f"me@127.0.0.1:{ports[0]},me@127.0.0.1:{ports[1]}")
    assert caught.value.code == "host_unreachable"
    assert all(str(port) in caught.value.message for port in ports)
    assert "ssh -p" in caught.value.hint
    with pytest.raises(ImagegenError) as caught:
        make_runtime("local", hosts="box2")
    assert caught.value.code == "invalid_argument"
