"""The layout keeps its design (tests/import_graph.py): packages import one way (pipelines -> steps -> core), no
cycle between packages, no private name across packages, no module over 500 lines. Read with `ast`, nothing
imported. The checker itself is tested on small synthetic trees, so that it is known to fail when it should."""

from pathlib import Path

from tests import import_graph

REPO = Path(__file__).resolve().parents[2]


def test_the_repository_keeps_the_import_rules():
    found = import_graph.problems(REPO)
    assert not found, "\n".join(found)


def test_tests_and_benchmarks_import_the_installed_names():
    found = import_graph.unprefixed_elsewhere(REPO)
    assert not found, "\n".join(found)


def test_the_graph_sees_every_step_package():
    graph = import_graph.build(REPO)
    steps = {p for p in graph.edges if p.startswith("components.")}
    assert {"components.core", "components.ingest", "components.backbone", "components.train",
            "components.evaluate", "components.export", "components.predict", "components.compare",
            "components.registry"} <= steps
    assert {"components.core", "components.train", "components.ingest"} <= graph.edges["pipelines"]
    assert "components.core" in graph.edges["components.ingest"]


def _tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    for top in ("components", "pipelines"):
        (root / top).mkdir(exist_ok=True)
        (root / top / "__init__.py").touch()
    return root


CLEAN = {
    "components/core/__init__.py": "",
    "components/core/util.py": "from kfp_finetune.components import __version__\n\ndef helper():\n    return 1\n",
    "components/a/__init__.py": "",
    "components/a/step.py": "from kfp_finetune.components.core.util import helper\nfrom . import inner\n",
    "components/a/inner.py": "from .step import _private_is_fine_inside\n",
    "components/b/__init__.py": "",
    "components/b/step.py": "from kfp_finetune.components.a import step\n",
    "pipelines/pipeline.py": "from kfp_finetune.components.b.step import x\nfrom .local import _also_fine\n",
    "pipelines/local.py": "",
}


def test_a_clean_tree_passes(tmp_path):
    assert import_graph.problems(_tree(tmp_path, CLEAN)) == []


def test_a_cycle_hidden_in_a_function_fails(tmp_path):
    files = dict(CLEAN)
    files["components/a/inner.py"] = "def later():\n    from kfp_finetune.components.b import step\n"
    found = import_graph.problems(_tree(tmp_path, files))
    assert len(found) == 1 and found[0].startswith("import cycle between packages components.a, components.b")
    assert "components/a/inner.py:2" in found[0]


def test_a_private_name_across_packages_fails(tmp_path):
    files = dict(CLEAN)
    files["components/b/step.py"] = "from kfp_finetune.components.a.step import _helper\n"
    assert import_graph.problems(_tree(tmp_path, files)) == [
        "components/b/step.py:1 imports the private components.a.step._helper from package components.a"]
    files["components/b/step.py"] = "from kfp_finetune.components.a import _private_module\n"
    (tmp_path / "components/a/_private_module.py").parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / "components/a/_private_module.py").write_text("")
    found = import_graph.problems(_tree(tmp_path, files))
    assert found == ["components/b/step.py:1 imports the private components.a._private_module from package "
                     "components.a"]


def test_climbing_imports_fail(tmp_path):
    files = dict(CLEAN)
    files["components/core/util.py"] = "from kfp_finetune.components.a.step import helper\n"
    files["components/b/step.py"] = "import kfp_finetune.pipelines.local\n"
    found = import_graph.problems(_tree(tmp_path, files))
    assert any("components.core must import no step package" in line for line in found)
    assert any("components/ must not import pipelines/" in line for line in found)
    assert any(line.startswith("import cycle") for line in found)  # core <-> a


def test_an_import_without_the_installed_name_fails(tmp_path):
    files = dict(CLEAN)
    files["pipelines/local.py"] = "def f():\n    from components.a.step import helper\n"
    assert import_graph.problems(_tree(tmp_path, files)) == [
        "pipelines/local.py:2 imports components.a.step: write kfp_finetune.components.a.step"]


def test_a_long_module_fails(tmp_path):
    files = dict(CLEAN)
    files["components/a/inner.py"] = "x = 1\n" * (import_graph.MAX_LINES + 1)
    assert import_graph.problems(_tree(tmp_path, files)) == [
        f"components/a/inner.py: {import_graph.MAX_LINES + 1} lines (at most {import_graph.MAX_LINES})"]
