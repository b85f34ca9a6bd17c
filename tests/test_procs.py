"""What a worker passes on to ComfyUI: an allowlist of the caller's environment, never a secret."""

from __future__ import annotations

from imagegen.util.procs import child_env


def test_secrets_are_dropped_and_what_comfyui_needs_is_kept():
    environ = {
        "PATH": "/usr/bin", "HOME": "/home/u", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "TMPDIR": "/tmp",
        "CUDA_VISIBLE_DEVICES": "0", "NVIDIA_VISIBLE_DEVICES": "all", "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2",
        "PYTHONPATH": "/x", "IMAGEGEN_HOME": "/h", "IMAGEGEN_COMFYUI_DIR": "/c", "TORCHINDUCTOR_CACHE_DIR": "/i",
        "TRITON_CACHE_DIR": "/t", "XDG_CACHE_HOME": "/xc", "HF_HUB_OFFLINE": "1", "PYTORCH_CUDA_ALLOC_CONF": "x",
        # secrets, and what ComfyUI has no use for
        "HF_TOKEN": "s", "HUGGING_FACE_HUB_TOKEN": "s", "IMAGEGEN_REMOTE_WORKERS": "http://a#s",
        "IMAGEGEN_REMOTE_TOKEN_FILE": "/tok", "IMAGEGEN_WORKER_TOKEN": "s", "IMAGEGEN_UPSTREAM_SECRET": "s",
        "IMAGEGEN_API_KEY": "s", "AWS_SECRET_ACCESS_KEY": "s", "GITHUB_TOKEN": "s", "OPENAI_API_KEY": "s",
        "PYTHON_KEYRING_PASSWORD": "s", "SSH_AUTH_SOCK": "/agent", "HTTPS_PROXY": "http://u:pw@proxy", "DISPLAY": ":0",
    }
    kept = child_env(environ)
    assert set(kept) == {"PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES",
                         "OMP_NUM_THREADS", "MKL_NUM_THREADS", "PYTHONPATH", "IMAGEGEN_HOME", "IMAGEGEN_COMFYUI_DIR",
                         "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR", "XDG_CACHE_HOME", "HF_HUB_OFFLINE",
                         "PYTORCH_CUDA_ALLOC_CONF"}
    assert all(kept[name] == environ[name] for name in kept)
