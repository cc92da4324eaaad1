"""kfp_finetune.pipelines.steplog: kfp.local's stream filed per step, one terminal line per step with its key result."""

import io
import json
import logging
import threading
from pathlib import Path

from kfp_finetune.pipelines.steplog import StepLogs, key_result


def _executor_output(path: Path, artifacts: dict, params: dict | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({
        "artifacts": {name: {"artifacts": [a]} for name, a in artifacts.items()},
        "parameterValues": params or {},
    }))
    return path


def _step_lines(name: str, output_file: Path | None, body: list[str], status: str = "SUCCESS") -> str:
    """What kfp.local prints for one step (colours included)."""
    lines = [
        f"04:10:32.200 - INFO - Executing task \x1b[96m'{name}'\x1b[0m",
        "04:10:32.200 - INFO - Streamed logs:",
        "",
        "    {",
        f'        "outputFile": "{output_file.parent / "blessed"}"' if output_file else "",  # an output parameter's
        f'        "outputFile": "{output_file}"' if output_file else '        "outputFile": ""',
        "    }",
        *[f"    {b}" for b in body],
        f"04:10:37.091 - INFO - Task \x1b[96m'{name}'\x1b[0m finished with status \x1b[92m{status}\x1b[0m",
        f"04:10:37.093 - INFO - Task \x1b[96m'{name}'\x1b[0m outputs:",
        "-" * 80,
    ]
    return "\n".join(lines) + "\n"


def test_each_step_gets_its_log_and_one_terminal_line(tmp_path):
    ingest_out = _executor_output(tmp_path / "root" / "ingest" / "executor_output.json", {
        "dataset": {"uri": "x", "metadata": {"num_examples": {"train": 786.0, "validation": 98.0, "test": 116.0},
                                             "class_names": [str(i) for i in range(10)]}}})
    model_dir = tmp_path / "root" / "train-head" / "model"
    model_dir.mkdir(parents=True)
    (model_dir / "model.json").write_text(json.dumps({"history": {"val_accuracy": [0.5, 0.7, 0.8]}}))
    head_out = _executor_output(tmp_path / "root" / "train-head" / "executor_output.json", {
        "model": {"uri": str(model_dir), "metadata": {"val_accuracy": 0.8061, "phase": "train_head"}}})
    terminal = io.StringIO()
    steps = StepLogs(tmp_path / "logs", terminal, total=6)
    steps.write("04:10:32.187 - INFO - Running pipeline: 'kfp-finetune'\n")
    # Written in uneven pieces, as a stream may be.
    text = _step_lines("ingest", ingest_out, ["ingested 1000 images"]) + _step_lines(
        "train-head", head_out, ["Epoch 1/3", "Epoch 3/3"])
    for i in range(0, len(text), 37):
        steps.write(text[i:i + 37])
    steps.close()

    lines = terminal.getvalue().splitlines()
    assert len(lines) == 2, lines
    assert lines[0].startswith("[1/6] ingest") and "SUCCESS" in lines[0]
    assert "1000 images ingested (786 train / 98 validation / 116 test), 10 classes" in lines[0]
    assert lines[1].startswith("[2/6] train-head") and "3 epochs, val_accuracy 0.806" in lines[1]
    ingest_log = (tmp_path / "logs" / "ingest.log").read_text()
    assert "ingested 1000 images" in ingest_log and "Epoch" not in ingest_log and "\x1b[" not in ingest_log
    assert "Epoch 3/3" in (tmp_path / "logs" / "train-head.log").read_text()
    assert "Running pipeline" in (tmp_path / "logs" / "pipeline.log").read_text()


def test_verbose_streams_everything_and_still_files_it(tmp_path):
    terminal = io.StringIO()
    steps = StepLogs(tmp_path / "logs", terminal, verbose=True)
    steps.write(_step_lines("backbone", None, ["a line of the step"]))
    steps.close()
    assert "a line of the step" in terminal.getvalue()
    assert "a line of the step" in (tmp_path / "logs" / "backbone.log").read_text()
    assert "[1] backbone" in terminal.getvalue()


def test_failure_report_has_the_tail_and_the_path(tmp_path):
    terminal = io.StringIO()
    steps = StepLogs(tmp_path / "logs", terminal, total=6)
    body = [f"line {i}" for i in range(100)] + ["UserError: --source /nope has no images"]
    # kfp.local raises instead of printing a FAILURE line: the step is still running when the run stops.
    text = _step_lines("ingest", None, body).split("04:10:37.091")[0]
    steps.write(text)
    failed = steps.running()[0]
    steps.finish(failed, "FAILURE")
    report = steps.failure_report(failed)
    steps.close()
    assert "[1/6] ingest" in terminal.getvalue() and "FAILURE" in terminal.getvalue()
    assert report.splitlines()[-2] == "    UserError: --source /nope has no images"
    assert "line 99" in report and "line 50" not in report  # only the last ~30 lines
    assert str(tmp_path / "logs" / "ingest.log") in report.splitlines()[-1]


def test_skipped_and_cached_steps_get_a_line(tmp_path):
    terminal = io.StringIO()
    steps = StepLogs(tmp_path / "logs", terminal, total=6)
    steps.write("04:12:00.000 - INFO - Task ingest cache hit (key=0123456789ab); skipping execution.\n")
    steps.write("04:12:00.000 - INFO - Skipping conditional task export (condition evaluated to False)\n")
    steps.close()
    lines = terminal.getvalue().splitlines()
    assert lines[0].startswith("[1/6] ingest") and "CACHED" in lines[0]
    # A skipped condition group is not a step: it takes no number.
    assert lines[1].startswith("[-] export") and "SKIPPED" in lines[1] and "condition is false" in lines[1]


def test_parallel_steps_keep_separate_logs(tmp_path):
    terminal = io.StringIO()
    steps = StepLogs(tmp_path / "logs", terminal)
    barrier = threading.Barrier(2)

    def branch(name: str) -> None:
        steps.write(f"Executing task '{name}'\n")
        barrier.wait()
        for i in range(50):
            steps.write(f"{name} says {i}\n")
        steps.write(f"Task '{name}' finished with status SUCCESS\n")

    threads = [threading.Thread(target=branch, args=(n,)) for n in ("train-head", "train-head-2")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    steps.close()
    for name in ("train-head", "train-head-2"):
        text = (tmp_path / "logs" / f"{name}.log").read_text()
        assert text.count(f"{name} says") == 50 and "says" in text
        other = "train-head-2" if name == "train-head" else "train-head says"
        assert other not in text


def test_key_results_of_the_later_steps():
    evaluate = {"artifacts": {"metrics": {"artifacts": [{"metadata": {"accuracy": 0.94}}]}},
                "parameterValues": {"blessed": True, "accuracy": 0.9482}}
    assert key_result("evaluate", evaluate) == "test accuracy 0.948, blessed"
    evaluate["parameterValues"]["blessed"] = False
    assert key_result("evaluate", evaluate).endswith("NOT blessed")
    export = {"artifacts": {"exported_model": {"artifacts": [{"metadata": {}}]}},
              "parameterValues": {"pushed_uri": "/srv/models/digits/20261130041500"}}
    assert key_result("export", export) == "pushed /srv/models/digits/20261130041500"
    export["parameterValues"]["pushed_uri"] = ""
    assert "not pushed" in key_result("export", export)


def test_kfp_records_are_followed_whatever_the_root_handlers(tmp_path):
    """ParallelFor branches swap the root logger's handlers from several threads (kfp.local's
    local_logger_context), so a record may reach stderr instead of stdout: the root-logger filter still files it."""
    terminal = io.StringIO()
    steps = StepLogs(tmp_path / "logs", terminal, total=2)
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    stray = io.StringIO()
    root.handlers[:] = [logging.StreamHandler(stray)]  # what a racing branch may leave behind
    root.setLevel(logging.INFO)
    try:
        with steps.capturing():
            def branch(name: str) -> None:
                logging.info(f"Executing task \x1b[96m'{name}'\x1b[0m")
                print(f"{name} output")
                logging.info(f"Task \x1b[96m'{name}'\x1b[0m finished with status \x1b[92mSUCCESS\x1b[0m")

            threads = [threading.Thread(target=branch, args=(n,)) for n in ("fine-tune", "fine-tune")]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
    finally:
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)
    steps.close()
    lines = terminal.getvalue().splitlines()
    assert sorted(line.split()[0] for line in lines) == ["[1/2]", "[2/2]"] and all("SUCCESS" in x for x in lines)
    assert stray.getvalue() == ""  # filed, not printed
    for log in ("fine-tune.log", "fine-tune-2.log"):
        text = (tmp_path / "logs" / log).read_text()
        assert text.count("fine-tune output") == 1 and "finished with status SUCCESS" in text
