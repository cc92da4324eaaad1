"""submit / schedule: parameters checked against the compiled pipeline before any network call, and the request
each backend receives. KFP requests go to a local recording HTTP server standing in for the KFP API; Vertex AI
requests are checked as the built PipelineJob (anonymous credentials, NO_GCE_CHECK=True), up to the network call.
"""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

from kfp_finetune.components.core.errors import UserError
from kfp_finetune.pipelines import commands
from kfp_finetune.pipelines.cli import main
from kfp_finetune.pipelines.commands import Target, build_request, check_cron, parse_params, pipeline_inputs
from kfp_finetune.pipelines.pipeline import CompileOptions, compile_pipeline

IMAGE = "registry.example.com/team/kfp-finetune:1.2.3"


@pytest.fixture(scope="module")
def package(tmp_path_factory) -> Path:
    return compile_pipeline(tmp_path_factory.mktemp("pkg") / "pipeline.yaml", CompileOptions(image=IMAGE))


@pytest.fixture(autouse=True)
def offline_google_auth(monkeypatch):
    monkeypatch.setenv("NO_GCE_CHECK", "True")  # google.auth must not probe the GCE metadata server
    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)


# --- parameters ---------------------------------------------------------------------------------------------------


def test_params_are_typed_from_the_compiled_pipeline(package):
    inputs = pipeline_inputs(package)
    assert inputs["source"].type == "str" and not inputs["source"].optional
    values = parse_params(["source=gs://b/flowers", "head_epochs=3", "head_learning_rate=0.01", "augment=false"],
                          inputs)
    assert values == {"source": "gs://b/flowers", "head_epochs": 3, "head_learning_rate": 0.01, "augment": False}
    assert isinstance(values["head_epochs"], int)


@pytest.mark.parametrize(
    "pairs, message",
    [
        (["source=x", "epochs=3"], "no such parameter"),
        (["source=x", "head_epochs=three"], "head_epochs takes a int"),
        (["source=x", "augment=maybe"], "augment takes a bool"),
        (["source"], "expected NAME=VALUE"),
        (["head_epochs=3"], "missing required parameter(s) source"),
        # Ranges and choices of the steps the parameters feed, checked before anything is sent.
        (["source=x", "dropout=2"], "--param dropout=2.0: must be in [0, 1)"),
        (["source=x", "augment_strength=0.9"], "--param augment_strength=0.9: must be in (0, 0.5]"),
        (["source=x", "batch_norm=sometimes"], "--param batch_norm='sometimes': must be one of auto, frozen, train"),
        (["source=x", "head_epochs=-1"], "--param head_epochs=-1: must be an integer ≥ 0"),
    ],
)
def test_bad_params_are_refused_before_any_network_call(package, pairs, message):
    with pytest.raises(UserError) as caught:
        build_request(Target(host="http://127.0.0.1:9"), package, pairs, "minio://mlpipeline/root")
    assert message in str(caught.value)


def test_every_default_of_the_compiled_pipeline_passes_the_step_checks(package):
    """The step checks see the pipeline's own defaults as valid (0 / "" are "not set" where the step allows it)."""
    from kfp_finetune.pipelines.params import check_step_values

    inputs = pipeline_inputs(package)
    check_step_values({name: i.default for name, i in inputs.items() if i.default is not None})


def test_every_subcommands_help_renders():
    """argparse %-formats help strings: a bare % in a parameter's help (say "±10 %") crashed `--help`."""
    import argparse

    from kfp_finetune.pipelines.cli import build_parser

    parser = build_parser()
    parser.format_help()
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    subcommands = {name: sub for a in actions for name, sub in a.choices.items()}
    assert {"run", "train-head", "fine-tune", "ingest"} <= set(subcommands)
    for name, sub in subcommands.items():
        assert sub.format_help().startswith("usage:"), name


def test_a_refused_local_run_writes_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["run", "--source", str(tmp_path), "--output", str(out), "--param", "dropout=2"]) == 2
    assert "--param dropout=2.0: must be in [0, 1)" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("cron", ["0 3 * * 1", "*/15 * * * *", "TZ=Europe/Paris 0 3 * * MON-FRI", "0 0 1,15 * *"])
def test_valid_cron(cron):
    assert check_cron(cron) == cron


@pytest.mark.parametrize("cron", ["0 3 * *", "every monday", "0 3 * * 1 2", ""])
def test_invalid_cron(cron):
    with pytest.raises(UserError, match="5 fields"):
        check_cron(cron)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({}, "either --host"),
        ({"host": "http://x", "project": "p", "region": "r"}, "either --host"),
        ({"host": "kfp.example.com"}, "http(s)://"),
        ({"project": "p"}, "--project and --region"),
    ],
)
def test_target_is_one_backend(kwargs, message):
    with pytest.raises(UserError) as caught:
        Target(**kwargs)
    assert message in str(caught.value)


def test_cli_refuses_an_unknown_param_without_contacting_the_host(package, capsys):
    # Nothing listens on port 9: had the command reached the network, the error would be a connection error.
    code = main(["submit", "--host", "http://127.0.0.1:9", "--pipeline-root", "minio://mlpipeline/root",
                 "--package", str(package), "--param", "source=x", "--param", "bogus=1"])
    assert code == 2
    assert "--param bogus: the pipeline has no such parameter" in capsys.readouterr().err


def test_vertex_needs_a_gcs_pipeline_root(package):
    with pytest.raises(UserError, match="gs://"):
        build_request(Target(project="p", region="europe-west4"), package, ["source=gs://b/x"], "/tmp/root")


# --- Vertex AI ----------------------------------------------------------------------------------------------------


def test_vertex_job_carries_the_checked_request(package):
    from google.auth.credentials import AnonymousCredentials

    request = build_request(
        Target(project="my-project", region="europe-west4"), package,
        ["source=gs://bucket/flowers", "head_epochs=3", "min_accuracy=0.8", "augment=false"],
        "gs://bucket/pipeline-root", display_name="nightly-flowers", labels={"team": "vision"},
        enable_caching=False,
    )
    job = commands.vertex_job(request, credentials=AnonymousCredentials())
    resource = job._gca_resource  # the request body PipelineJob.submit() would send
    assert resource.display_name == "nightly-flowers"
    assert dict(resource.labels)["team"] == "vision"
    runtime = resource.runtime_config
    assert runtime.gcs_output_directory == "gs://bucket/pipeline-root"
    assert dict(runtime.parameter_values) == {"source": "gs://bucket/flowers", "head_epochs": 3, "min_accuracy": 0.8,
                                              "augment": False}
    assert job.project == "my-project" and job.location == "europe-west4"
    spec = json.loads(type(resource).to_json(resource))["pipelineSpec"]
    images = {e["container"]["image"] for e in spec["deploymentSpec"]["executors"].values()}
    assert images == {IMAGE}
    for task in spec["root"]["dag"]["tasks"].values():  # enable_caching=False reaches every task
        assert not task.get("cachingOptions", {}).get("enableCache", False)


def test_vertex_schedule_request(package):
    request = build_request(Target(project="p", region="us-central1"), package, ["source=gs://b/x"],
                            "gs://b/root", display_name="weekly", cron="TZ=Etc/UTC 0 3 * * 1", max_concurrency=2)
    assert request.cron == "TZ=Etc/UTC 0 3 * * 1" and request.max_concurrency == 2
    assert request.parameters == {"source": "gs://b/x"}


def test_vertex_names_are_checked(package):
    with pytest.raises(UserError, match="lowercase"):
        build_request(Target(project="p", region="r"), package, ["source=gs://b/x"], "gs://b/r",
                      display_name="Nightly Run")


# --- KFP ----------------------------------------------------------------------------------------------------------


class FakeKfpApi(BaseHTTPRequestHandler):
    """Answers the few KFP v2beta1 calls kfp.Client makes, recording each request."""

    requests: list = []

    def _reply(self, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):  # noqa: N802
        self.requests.append(("GET", self.path, None))
        if "/healthz" in self.path:
            self._reply({"multi_user": False})
        elif "/experiments" in self.path:
            self._reply({"experiments": [{"experiment_id": "exp-1", "display_name": "nightly"}], "total_size": 1})
        else:
            self._reply({})

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        self.requests.append(("POST", self.path, body))
        if self.path.endswith("/runs"):
            self._reply({"run_id": "run-42", "display_name": body.get("display_name")})
        elif self.path.endswith("/recurringruns"):
            self._reply({"recurring_run_id": "rr-7", "display_name": body.get("display_name")})
        else:
            self._reply({})

    def log_message(self, *args):
        pass


@pytest.fixture
def kfp_api():
    FakeKfpApi.requests = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeKfpApi)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}", FakeKfpApi.requests
    server.shutdown()
    server.server_close()


def test_kfp_submit_sends_the_compiled_pipeline_and_typed_arguments(package, kfp_api, capsys):
    host, requests = kfp_api
    code = main(["submit", "--host", host, "--pipeline-root", "minio://mlpipeline/root", "--package", str(package),
                 "--param", "source=minio://data/flowers", "--param", "fine_tune_epochs=4", "--name", "try-1",
                 "--experiment", "nightly"])
    assert code == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == "run-42"  # kfp.Client prints links before
    (run,) = [body for method, path, body in requests if method == "POST" and path.endswith("/runs")]
    assert run["display_name"] == "try-1"
    assert run["experiment_id"] == "exp-1"
    runtime = run["runtime_config"]
    assert runtime["pipeline_root"] == "minio://mlpipeline/root"
    assert runtime["parameters"] == {"source": "minio://data/flowers", "fine_tune_epochs": 4}
    assert run["pipeline_spec"]["pipelineInfo"]["name"] == "kfp-finetune"


def test_kfp_schedule_creates_a_recurring_run(package, kfp_api, capsys):
    host, requests = kfp_api
    code = main(["schedule", "--host", host, "--pipeline-root", "minio://mlpipeline/root", "--package",
                 str(package), "--param", "source=minio://data/flowers", "--cron", "0 3 * * 1", "--name", "weekly",
                 "--experiment", "nightly", "--max-concurrency", "2"])
    assert code == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == "rr-7"
    (recurring,) = [body for method, path, body in requests if method == "POST" and path.endswith("/recurringruns")]
    assert recurring["display_name"] == "weekly"
    assert recurring["max_concurrency"] in (2, "2")
    assert recurring["trigger"]["cron_schedule"]["cron"] == "0 3 * * 1"
    assert recurring["runtime_config"]["parameters"] == {"source": "minio://data/flowers"}


def test_kfp_refusal_is_one_line_naming_the_host(package, capsys):
    code = main(["submit", "--host", "http://127.0.0.1:9", "--pipeline-root", "minio://mlpipeline/root",
                 "--package", str(package), "--param", "source=x"])
    assert code == 2
    err = capsys.readouterr().err
    assert "http://127.0.0.1:9 refused the request" in err and err.count("\n") == 1


# --- the embedded demo data -----------------------------------------------------------------------------------------


def test_demo_dataset_is_ten_digit_folders_of_pngs(tmp_path):
    root = commands.write_demo_dataset(tmp_path / "digits", per_class=12, pixels=32)
    folders = sorted(p.name for p in root.iterdir() if p.is_dir())
    assert folders == [str(d) for d in range(10)]
    for folder in folders:
        files = sorted((root / folder).glob("*.png"))
        assert len(files) == 12
    with Image.open(files[0]) as image:
        assert image.size == (32, 32)
        assert image.getextrema()[1] > 200  # strokes stretched to near white


@pytest.mark.parametrize("compare", [(), ("head_only", "default")])
def test_run_reads_the_parameters_from_the_pipelines_own_spec_as_compile_writes_them(tmp_path, compare):
    from kfp_finetune.pipelines.params import spec_inputs
    from kfp_finetune.pipelines.pipeline import CompileOptions, build_pipeline, compile_pipeline

    from_spec = spec_inputs(build_pipeline(CompileOptions(compare_recipes=compare)))
    from_yaml = pipeline_inputs(compile_pipeline(tmp_path / "p.yaml", CompileOptions(compare_recipes=compare)))
    assert {n: (i.type, i.optional) for n, i in from_spec.items()} == {
        n: (i.type, i.optional) for n, i in from_yaml.items()}
    assert all(from_spec[n].default == pytest.approx(i.default) for n, i in from_yaml.items() if i.optional)
