"""The serving check's server process: a fresh interpreter with TensorFlow alone, as a model server has.

`ServerProcess` starts it ahead of its job: the interpreter imports TensorFlow (~4.5 s on a 2-core machine) while
export writes the SavedModel, which is one core's work, then serves the job `run` hands it: the SavedModel, a
Vertex / TF Serving REST body and the warmup file (components/export/serving.py compares its answers with Keras).
`run_server` starts one and runs it at once.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from kfp_finetune.components.core.errors import UserError

CHECK_TIMEOUT_S = 600.0


# The server side, run in a fresh interpreter: TensorFlow only. Argument: the pid of the process that started it.
# It imports TensorFlow, then reads the path of a JSON job file from stdin (nothing: exit 0) and writes a JSON result.
SERVER_SCRIPT = r'''
import base64, json, sys

# What a model server has: TensorFlow, not Keras nor this project (None in sys.modules = "not installed", also
# for importlib.util.find_spec, which TensorFlow's own imports consult).
for _name in ("keras", "tf_keras", "components", "pipelines"):
    sys.modules[_name] = None
if sys.platform.startswith("linux"):  # die with the export that started us, even when it is SIGKILLed
    import ctypes, os, signal
    ctypes.CDLL(None).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    if os.getppid() != int(sys.argv[1]):
        sys.exit("the export that started this serving check is gone")
import tensorflow as tf
from tensorflow.core.framework import tensor_pb2


def fields(buf):
    """(field number, wire type, value) of a serialized protobuf message."""
    i, n = 0, len(buf)
    def varint():
        nonlocal i
        shift = value = 0
        while True:
            b = buf[i]; i += 1
            value |= (b & 0x7F) << shift; shift += 7
            if not b & 0x80:
                return value
    while i < n:
        key = varint(); number, wire = key >> 3, key & 7
        if wire == 0:
            yield number, wire, varint()
        elif wire == 2:
            size = varint(); yield number, wire, buf[i:i + size]; i += size
        elif wire == 1:
            yield number, wire, buf[i:i + 8]; i += 8
        elif wire == 5:
            yield number, wire, buf[i:i + 4]; i += 4
        else:
            raise ValueError(f"wire type {wire}")


def warmup_request(record):
    """PredictionLog.predict_log(6).request(1) -> (signature_name, {input: tensor})."""
    logs = [v for f, w, v in fields(record) if f == 6 and w == 2]
    if not logs:
        raise ValueError("record is not a PredictionLog with a predict_log")
    request = [v for f, w, v in fields(logs[0]) if f == 1 and w == 2][0]
    signature, inputs = "serving_default", {}
    for f, w, v in fields(request):
        if f == 1 and w == 2:
            for g, x, s in fields(v):
                if g == 3 and x == 2 and s:
                    signature = s.decode()
        elif f == 2 and w == 2:
            entry = dict((g, s) for g, x, s in fields(v))
            inputs[entry[1].decode()] = tf.make_ndarray(tensor_pb2.TensorProto.FromString(entry[2]))
    return signature, inputs


def plain(outputs):
    return {k: (v.numpy().astype(str).tolist() if v.dtype == tf.string else v.numpy().tolist())
            for k, v in outputs.items()}


job_file = sys.stdin.readline().strip()
if not job_file:  # the export ended before its check (it failed, or was stopped)
    sys.exit(0)
job = json.load(open(job_file))
result = {"tensorflow": tf.__version__}
loaded = tf.saved_model.load(job["saved_model"], tags=["serve"])
signature = loaded.signatures[job["signature"]]
result["inputs"] = {k: [v.dtype.name, v.shape.as_list()] for k, v in signature.structured_input_signature[1].items()}
body = json.load(open(job["request"]))
batch = []
for instance in body["instances"]:
    value = instance[job["input"]] if isinstance(instance, dict) and "b64" not in instance else instance
    batch.append(base64.b64decode(value["b64"]) if isinstance(value, dict) else value.encode())
result["predict"] = plain(signature(**{job["input"]: tf.constant(batch, dtype=tf.string)}))
result["warmup"] = []
if job.get("warmup"):
    for record in tf.data.TFRecordDataset(job["warmup"]):
        name, inputs = warmup_request(record.numpy())
        fn = loaded.signatures[name]
        result["warmup"].append(plain(fn(**{k: tf.constant(v) for k, v in inputs.items()})))
json.dump(result, open(job["output"], "w"))
'''


class ServerProcess:
    """A serving-check interpreter, started now, importing TensorFlow until `run` hands it a job (once).

    `python`: the interpreter (default: KFP_FINETUNE_SERVING_PYTHON, else this one). Use it as a context manager,
    or `close()` it: a process never given a job is stopped there.
    """

    def __init__(self, python: str | None = None) -> None:
        from kfp_finetune.components.core import settings

        python = python or settings.serving_python() or sys.executable
        if os.sep in python:  # a path, not a name looked up on PATH: the subprocess runs in another directory
            python = os.path.abspath(python)
        # Absolute paths only: the server process runs in its own working directory (relative ones would miss).
        self.tmp = Path(tempfile.mkdtemp(prefix="serving-check-")).resolve()
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        try:
            self._process: subprocess.Popen[str] | None = subprocess.Popen(
                [python, "-c", SERVER_SCRIPT, str(os.getpid())], cwd=self.tmp, env=env, stdin=subprocess.PIPE,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        except OSError as exc:
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise UserError(f"serving check: cannot start the server interpreter {python!r} "
                            f"(KFP_FINETUNE_SERVING_PYTHON, else this Python): {exc}") from exc

    def run(self, saved_model_dir: str | os.PathLike, body: dict[str, Any], warmup: str | os.PathLike | None = None,
            timeout: float = CHECK_TIMEOUT_S, signature: str = "serving_default",
            input_name: str = "image_bytes") -> dict[str, Any]:
        """Serve the SavedModel's `signature` with the request `body` (and replay `warmup`); the server's JSON
        result. RuntimeError with the process's last stderr lines when it fails or does not answer in `timeout`."""
        if self._process is None:
            raise RuntimeError("this server process has already run its job")
        process, self._process = self._process, None
        request = self.tmp / "request.json"
        request.write_text(json.dumps(body))
        job = {"saved_model": os.path.abspath(saved_model_dir), "signature": signature, "input": input_name,
               "request": str(request),
               "warmup": os.path.abspath(warmup) if warmup else None, "output": str(self.tmp / "out.json")}
        (self.tmp / "job.json").write_text(json.dumps(job))
        try:
            _, stderr = process.communicate(f"{self.tmp / 'job.json'}\n", timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            process.kill()
            process.communicate()
            raise RuntimeError(f"the server process did not answer within {timeout:g} s") from exc
        if process.returncode != 0:
            tail = [line for line in stderr.strip().splitlines() if line.strip()][-3:]
            raise RuntimeError(f"the server process failed (exit {process.returncode}): {' | '.join(tail)[-600:]}")
        return json.loads((self.tmp / "out.json").read_text())

    def close(self) -> None:
        """Stop a process that never got its job; remove the job folder."""
        if self._process is not None:
            process, self._process = self._process, None
            process.kill()
            process.communicate()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def run_server(saved_model_dir: str | os.PathLike, body: dict[str, Any], warmup: str | os.PathLike | None = None,
               timeout: float = CHECK_TIMEOUT_S, python: str | None = None, server: ServerProcess | None = None,
               **job: str) -> dict[str, Any]:
    """Run SERVER_SCRIPT on the SavedModel in a fresh interpreter (`server`: one already started, which this
    closes); its JSON result (`job`: ServerProcess.run's signature / input_name). RuntimeError with the
    subprocess's last stderr lines when it fails."""
    with server or ServerProcess(python) as process:
        return process.run(saved_model_dir, body, warmup, timeout, **job)
