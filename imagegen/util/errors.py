"""One table of every user-facing failure: a stable snake_case code, an exit code and a default hint.

Raise `ImagegenError(code, message, hint=...)`; the CLI turns it into a line on stderr
(or a JSON object with --json) and the table's exit code.
"""

from __future__ import annotations

from dataclasses import dataclass

EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

ERROR_SCHEMA = "imagegen.error/1"


@dataclass(frozen=True)
class ErrorKind:
    exit_code: int
    meaning: str
    hint: str


ERRORS: dict[str, ErrorKind] = {
    # Bad input: nothing was started.
    "invalid_argument": ErrorKind(EXIT_USAGE, "An option has a value outside what it accepts.",
                                  "Run the command with --help to see the accepted values."),
    "usage_error": ErrorKind(EXIT_USAGE,
        "The command line is malformed: an unknown option, a missing argument, or an extra one.",
        "Run the command with --help to see what it accepts."),
    "invalid_prompt": ErrorKind(EXIT_USAGE, "The prompt is empty, too long or has control characters.",
                                "Pass a non-empty prompt of printable text."),
    "invalid_size": ErrorKind(EXIT_USAGE, "The image size is malformed or out of range.",
                              "Use --size WIDTHxHEIGHT with multiples of 8, e.g. --size 768x512."),
    "unknown_model": ErrorKind(EXIT_USAGE, "No model of that name is registered.",
                               "Run `imagegen models list` to see the registered models."),
    "invalid_models_yaml": ErrorKind(EXIT_USAGE, "A models.yaml file is malformed.",
                                     "Fix the file at the line named, or move it aside."),
    "invalid_model_file": ErrorKind(EXIT_USAGE,
        "A model file is missing, not .safetensors, or not a model imagegen understands.",
        "Pass a .safetensors checkpoint; `imagegen models inspect FILE` shows what a file holds."),
    "incompatible_bundle": ErrorKind(EXIT_USAGE,
        "A bundle's files do not fit together (e.g. the wrong text encoder for a Flux model).",
        "Run `imagegen models inspect FILE` on each file and fix the bundle in models.yaml."),
    "lora_mismatch": ErrorKind(EXIT_USAGE,
        "A LoRA was made for another model family than the model it is used with (e.g. an SDXL LoRA on SD1.5).",
        "Use a LoRA made for the model's family, or a model of the LoRA's family (-m)."),
    "controlnet_mismatch": ErrorKind(EXIT_USAGE,
        "A ControlNet was made for another model family than the model it steers.",
        "Use a ControlNet of the model's family (`imagegen models list` shows each one's base), or another -m."),
    "unknown_addon": ErrorKind(EXIT_USAGE,
        "A --lora or --control names neither a registered LoRA/ControlNet, a .safetensors file, nor a file in the "
        "LoRA/ControlNet folders (the model cache's, IMAGEGEN_SHARED_MODELS trees).",
        "Pass a registered name (`imagegen models list`), a file's name from those folders, or a file's path."),
    "ambiguous_addon": ErrorKind(EXIT_USAGE,
        "A LoRA or ControlNet name matches two or more different files in the LoRA/ControlNet folders.",
        "Pass the file's path, or its name with its subfolder (`sub/name`)."),
    "model_exists": ErrorKind(EXIT_USAGE, "A model of that name is registered already (yours or a built-in).",
                              "Pass --force to replace it, or choose another name."),
    "output_exists": ErrorKind(EXIT_USAGE, "The output file exists already.",
                               "Pass --overwrite, or choose another -o path."),
    "output_not_writable": ErrorKind(EXIT_USAGE, "The output location cannot be written.",
                                     "Choose an -o path in a writable directory."),
    "invalid_funnel_state": ErrorKind(EXIT_USAGE,
        "A funnel's funnel.json is malformed, or names a path outside its folder.",
        "Restore funnel.json (imagegen writes only paths inside the funnel folder), or start a new funnel."),
    "invalid_workflow": ErrorKind(EXIT_USAGE,
        "A workflow file is malformed, has no output node, or uses an editor feature imagegen cannot run exactly.",
        "Save the workflow with the editor's Export (API), or fix the node named (docs/workflows.md)."),
    "unknown_node_class": ErrorKind(EXIT_USAGE,
        "A workflow uses node classes the pinned ComfyUI does not have (custom nodes).",
        "Replace the nodes named with ComfyUI core nodes; imagegen never installs custom nodes."),
    "invalid_source_image": ErrorKind(EXIT_USAGE, "An input image (--from, --image, --mask) cannot be read or "
                                      "decoded, is over the size limit, or (for --from) carries no parameters.",
                                      "Pass a PNG, JPEG or WebP file (for --from: a PNG written by imagegen)."),
    "invalid_mask": ErrorKind(EXIT_USAGE, "The --mask is not the size of the --image (it is never resized).",
                              "Make the mask exactly the image's size: white repaints, black keeps."),
    "input_missing": ErrorKind(EXIT_USAGE,
        "`--from` needs the input image (or mask) the PNG was made from, and it is not where it was, or it changed.",
        "Pass the file again with --image (or --mask)."),
    "runtime_unavailable": ErrorKind(EXIT_USAGE, "The chosen runtime cannot run here.",
                                     "Run `imagegen doctor`, or choose another --runtime."),
    "fast_unavailable": ErrorKind(EXIT_USAGE,
        "Fast mode compiles the model where the worker runs, and a compiler or Python's headers are missing there.",
        "Install them (Debian/Ubuntu: apt install build-essential python3-dev), use --runtime docker, or drop --fast."),
    # Environment and runtime failures.
    "comfyui_not_found": ErrorKind(EXIT_FAILURE, "No ComfyUI checkout was found for the local runtime.",
                                   "Run scripts/setup-dev.sh, or set IMAGEGEN_COMFYUI_DIR to a ComfyUI checkout."),
    "cluster_insecure": ErrorKind(EXIT_USAGE,
        "The Ray cluster runs without token authentication: anyone who reaches it can run code on its machines.",
        "Restart it with RAY_AUTH_MODE=token on every node (docs/cluster.md); on a single-machine cluster only, "
        "set IMAGEGEN_RAY_ALLOW_NO_AUTH=1 or pass --ray-allow-insecure."),
    "cluster_unreachable": ErrorKind(EXIT_FAILURE,
        "The Ray cluster cannot be reached, refused our token, or one of its nodes did not answer.",
        "Check RAY_ADDRESS / --ray-address and the token (RAY_AUTH_TOKEN_PATH), then run `ray status`."),
    "worker_start_failed": ErrorKind(EXIT_FAILURE, "A worker did not become ready.",
                                     "Read the worker log named above; `imagegen stop --all` clears stale workers."),
    "worker_died": ErrorKind(EXIT_FAILURE, "A worker stopped while running a job.",
                             "Run the command again: a fresh worker is started."),
    "worker_unreachable": ErrorKind(EXIT_FAILURE, "A worker stopped answering.",
                                    "Run `imagegen stop --all` and try again."),
    "timeout": ErrorKind(EXIT_FAILURE, "A phase of the job ran past its time budget.",
                         "Raise the budget named above (flag or environment variable), or check the worker log."),
    "graph_rejected": ErrorKind(EXIT_FAILURE, "ComfyUI rejected the workflow.",
                                "Check the model files and parameters named above."),
    "execution_failed": ErrorKind(EXIT_FAILURE, "ComfyUI failed while running the workflow.",
                                  "Read the error above; `imagegen models inspect` checks a model's files."),
    "model_missing": ErrorKind(EXIT_FAILURE,
        "A model file is not in the cache.",
        "Run `imagegen models pull NAME` (needs network), or register a local file with `imagegen models add`."),
    "download_failed": ErrorKind(EXIT_FAILURE, "A model download failed.",
                                 "Run the same command again: downloads resume."),
    "checksum_mismatch": ErrorKind(EXIT_FAILURE,
        "A downloaded file does not match its recorded sha256 or size.",
        "Run the command again to download it afresh; if it repeats, the registry entry is wrong."),
    "gated_model": ErrorKind(EXIT_FAILURE, "The model is gated: its licence must be accepted and a token given.",
                             "Accept the licence on the model's page, then set HF_TOKEN."),
    "disk_full": ErrorKind(EXIT_FAILURE, "Not enough free disk space (for a download, an image or a state file).",
                           "Free space on the disk named above, or set IMAGEGEN_MODELS_DIR / -o to a larger one."),
    "docker_unavailable": ErrorKind(EXIT_USAGE, "The Docker daemon cannot be reached.",
                                    "Start Docker (`sudo systemctl start docker`), or use --runtime local."),
    "docker_permission": ErrorKind(EXIT_USAGE,
        "Permission denied on the Docker socket.",
        "Add yourself to the docker group (`sudo usermod -aG docker $USER`, then log in again)."),
    "image_missing": ErrorKind(EXIT_FAILURE, "The imagegen Docker image is not built.",
                               "Build it with ./build-image.sh."),
    "host_unreachable": ErrorKind(EXIT_FAILURE, "A Docker host of --hosts cannot be reached over SSH.",
                                  "Check `ssh HOST docker info` works with no prompt, then `imagegen doctor --hosts`."),
    "host_command_failed": ErrorKind(EXIT_FAILURE, "A command imagegen ran on a Docker host over SSH failed.",
                                     "Run `imagegen doctor --hosts HOST` to see what the host lacks."),
    "ssh_unavailable": ErrorKind(EXIT_USAGE, "No ssh client is installed on this machine.",
                                 "Install OpenSSH's client (apt-get install openssh-client)."),
    "nvidia_runtime_missing": ErrorKind(EXIT_FAILURE, "A GPU was requested but Docker has no NVIDIA runtime.",
                                        "Install the NVIDIA Container Toolkit, or run on CPU with --gpus none."),
    "worker_unhealthy": ErrorKind(EXIT_FAILURE,
        "A worker ran far slower than its own history and was taken out of the rotation.",
        "Check the GPU (thermals, other processes); `imagegen workers` shows each worker's recent speed."),
    "insufficient_gpu_memory": ErrorKind(EXIT_USAGE,
        "No GPU here can hold the job (model plus activations).",
        "Use a smaller size or model (an fp8 variant), or pass --force to try anyway."),
    "out_of_memory": ErrorKind(EXIT_FAILURE, "The worker ran out of memory.",
                               "Use a smaller --size or --count, or a smaller model."),
    "output_busy": ErrorKind(EXIT_FAILURE, "Another imagegen command is writing in the same output folder.",
                             "Wait for it to finish, or choose another -o directory."),
    "source_missing": ErrorKind(EXIT_FAILURE,
        "A funnel stage's source image (a picked image of the stage before) is gone.",
        "Run `imagegen funnel resume DIR`: it draws the missing image again, then goes on."),
    "jobs_failed": ErrorKind(EXIT_FAILURE, "Some jobs of a batch failed; the others finished.",
                             "See the failed lines in manifest.jsonl; run the same command again to retry only those."),
    "output_closed": ErrorKind(141, "stdout was closed by its reader before all output was written (e.g. `| head`).",
                               "Read the whole output, or write to a file with -o."),
    "interrupted": ErrorKind(EXIT_INTERRUPTED, "Interrupted by the user.", "Run the command again to continue."),
    "internal_error": ErrorKind(EXIT_FAILURE, "An unexpected error; this is a bug.",
                                "Run again with --debug and report the traceback."),
}


class ImagegenError(Exception):
    """A failure the user can act on. `code` must be a key of ERRORS."""

    def __init__(self, code: str, message: str, hint: str | None = None, **details):
        if code not in ERRORS:
            raise KeyError(f"unregistered error code {code!r}")
        super().__init__(message)
        self.code = code
        self.message = message
        self.hint = hint or ERRORS[code].hint
        self.details = details

    def __str__(self) -> str:
        return self.message

    @property
    def exit_code(self) -> int:
        return ERRORS[self.code].exit_code

    def to_json(self) -> dict:
        record = {"schema": ERROR_SCHEMA, "code": self.code, "message": self.message,
                  "hint": self.hint, "exit_code": self.exit_code}
        if self.details:
            record["details"] = self.details
        return record

