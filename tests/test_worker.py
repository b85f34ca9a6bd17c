"""The local worker: its token proxy and the ComfyUI behind it answer only their owner."""

from __future__ import annotations

from pathlib import Path

import pytest
import requests
import websocket

from imagegen.worker.serve import comfy_launch

pytestmark = pytest.mark.comfyui


def test_only_the_worker_can_talk_to_its_comfyui(comfy_worker):
    info = comfy_worker.info
    comfy = f"http://127.0.0.1:{info['comfy_port']}"
    assert requests.get(comfy + "/system_stats",
                        timeout=10).status_code == 403, "ComfyUI's own port must refuse strangers"
    assert requests.get(comfy + "/system_stats", headers={comfy_launch.HEADER: "a guess"},
                        timeout=10).status_code == 403
    assert requests.get(comfy + "/system_stats", headers={comfy_launch.HEADER: info["upstream_secret"]},
                        timeout=10).status_code == 200
    with pytest.raises(websocket.WebSocketBadStatusException):
        websocket.create_connection("ws" + comfy[4:] + "/ws?clientId=stranger", timeout=10)

    assert requests.get(comfy_worker.url + "/system_stats", timeout=10).status_code == 401
    authorized = {"Authorization": f"Bearer {comfy_worker.token}"}
    assert requests.get(comfy_worker.url + "/system_stats", headers=authorized, timeout=10).status_code == 200
    forged = {**authorized, comfy_launch.HEADER: "a guess"}  # the proxy sets the upstream secret itself
    assert requests.get(comfy_worker.url + "/system_stats", headers=forged, timeout=10).status_code == 200

    worker_pid = info["pid"]
    for child in Path(f"/proc/{worker_pid}/task/{worker_pid}/children").read_text().split():
        cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
        assert info["upstream_secret"].encode() not in cmdline, "ps must not show the secret"
