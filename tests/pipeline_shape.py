"""The reviewable shape of a compiled pipeline, for tests (the golden file tests/golden/pipeline_structure.json and
the structural checks of test_pipeline_compile / test_compare)."""

from typing import Any


def pipeline_structure(ir: dict[str, Any], image: str | None = None) -> dict[str, Any]:
    """The reviewable shape of a compiled pipeline: parameters, tasks with their edges and inputs, executor images.

    Used by the golden test (tests/golden/pipeline_structure.json). `image`, when given, is written as "<image>" so
    the golden file does not change with each release's version.
    """

    def img(value: str) -> str:
        return "<image>" if image and value == image else value

    def source(spec: dict[str, Any]) -> str:
        if "componentInputParameter" in spec:
            return f"param:{spec['componentInputParameter']}"
        if "componentInputArtifact" in spec:
            return f"param:{spec['componentInputArtifact']}"
        if "taskOutputParameter" in spec:
            out = spec["taskOutputParameter"]
            return f"{out['producerTask']}.{out['outputParameterKey']}"
        if "taskOutputArtifact" in spec:
            out = spec["taskOutputArtifact"]
            return f"{out['producerTask']}.{out['outputArtifactKey']}"
        if "runtimeValue" in spec:
            return f"const:{spec['runtimeValue'].get('constant')!r}"
        return "?"

    components = ir.get("components", {})
    executors = ir.get("deploymentSpec", {}).get("executors", {})
    tasks: dict[str, Any] = {}

    def walk(dag: dict[str, Any], prefix: str) -> None:
        for name, task in sorted(dag.get("tasks", {}).items()):
            path = f"{prefix}{name}"
            ref = task["componentRef"]["name"]
            inputs = task.get("inputs", {})
            entry: dict[str, Any] = {
                "display_name": task.get("taskInfo", {}).get("name"),
                "after": sorted(task.get("dependentTasks", [])),
                "parameters": {k: source(v) for k, v in sorted(inputs.get("parameters", {}).items())},
                "artifacts": {k: source(v) for k, v in sorted(inputs.get("artifacts", {}).items())},
                "caching": bool(task.get("cachingOptions", {}).get("enableCache", False)),
            }
            if "retryPolicy" in task:
                entry["retries"] = task["retryPolicy"].get("maxRetryCount", 0)
            if "triggerPolicy" in task:
                entry["condition"] = " ".join(task["triggerPolicy"].get("condition", "").split())
            component = components.get(ref, {})
            if "dag" in component:
                walk(component["dag"], f"{path}/")
            else:
                executor = executors.get(component.get("executorLabel", ""), {})
                container = executor.get("container", {})
                entry["image"] = img(container.get("image", ""))
                if container.get("resources"):
                    entry["resources"] = container["resources"]
            tasks[path] = entry

    walk(ir.get("root", {}).get("dag", {}), "")
    parameters = {
        name: {"type": p.get("parameterType"), "default": p.get("defaultValue"),
               "optional": bool(p.get("isOptional", False))}
        for name, p in sorted(ir.get("root", {}).get("inputDefinitions", {}).get("parameters", {}).items())
    }
    images = sorted({img(e.get("container", {}).get("image", "")) for e in executors.values()})
    return {"pipeline": ir.get("pipelineInfo", {}).get("name"), "parameters": parameters, "tasks": tasks,
            "images": images}
