"""kfp_finetune.pipelines.testing: the docstring example runs as written, and kfp.local is put back afterwards."""

import doctest

from kfp import dsl
from kfp.local import config as local_config

from kfp_finetune.pipelines import testing
from kfp_finetune.pipelines.testing import kfp_local, local_kfp  # noqa: F401  (kfp_local is a fixture)


def test_docstring_example_runs(synthetic_folder):
    """Runs each example of local_kfp's docstring in order and checks the shown results.

    (Not doctest's runner: kfp.local logs every task to stdout, which doctest would count as output.)
    """
    examples = doctest.DocTestParser().get_examples(testing.local_kfp.__doc__)
    assert len(examples) == 4
    namespace = {"image_folder": synthetic_folder}
    for example in examples:
        if example.want:
            assert repr(eval(example.source, namespace)) == example.want.strip()
        else:
            exec(example.source, namespace)


@dsl.component(base_image="python:3.11", install_kfp_package=False)
def double(x: int) -> int:
    return 2 * x


def test_context_manager_restores_previous_config(tmp_path):
    before = local_config.LocalExecutionConfig.instance
    with local_kfp(tmp_path / "root") as root:
        assert double(x=21).output == 42
        assert root == tmp_path / "root" and any(root.iterdir())  # outputs land under the given root
    assert local_config.LocalExecutionConfig.instance is before


def test_fixture(kfp_local):  # noqa: F811 (the fixture imported above)
    assert double(x=4).output == 8
    assert kfp_local.is_dir()
