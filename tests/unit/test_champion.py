"""evaluate's champion logic: the baseline resolved from push_to/LATEST, first run, class-set changes, per-class
recall guard."""

import json
import shutil
from pathlib import Path

import pytest

from kfp_finetune.components.core.errors import UserError
from kfp_finetune.components.evaluate.step import EvaluateConfig, _resolve_baseline, bless, evaluate
from kfp_finetune.components.registry import registry
from tests import evalchain


@pytest.fixture(scope="module")
def chain(tmp_path_factory, synthetic_folder, weights_mirror) -> evalchain.Chain:
    return evalchain.get(tmp_path_factory, synthetic_folder, weights_mirror)


def publish(model_dir: Path, dest: Path, version: str) -> None:
    """A pushed version holding `model_dir` as its Model artifact (what export pushes, minus the SavedModel)."""
    staged = dest.parent / f"staged-{version}"
    shutil.copytree(model_dir, staged / registry.MODEL_DIR)
    (staged / registry.VERSION_FILE).write_text(json.dumps({"version": version, "created": version}))
    registry.push(staged, str(dest), version)


def test_bless_rules_per_class_guard_and_refusal():
    recalls, before = {"a": 0.9, "b": 0.5}, {"a": 0.9, "b": 0.8}
    off = bless(0.8, 0.5, 0.8, 0.0, recalls, before, max_class_regression=1.0)
    assert off["blessed"] and len(off["rules"]) == 2  # no per-class rule at 1
    guarded = bless(0.8, 0.5, 0.8, 0.0, recalls, before, max_class_regression=0.2)
    assert not guarded["blessed"] and len(guarded["reasons"]) == 1 and "class b" in guarded["reasons"][0]
    assert bless(0.8, 0.5, 0.8, 0.0, recalls, before, max_class_regression=0.3)["blessed"]
    refused = bless(0.9, 0.5, refuse="class set changed")
    assert not refused["blessed"] and "class set changed" in refused["reasons"][0]


def test_baseline_resolution(tmp_path, chain):
    none = _resolve_baseline(EvaluateConfig("d", "m", "o", baseline_model="none", champion_from=str(tmp_path)))
    assert none == (None, {"status": "off", "reason": "baseline_model is 'none': no comparison"})
    explicit, info = _resolve_baseline(EvaluateConfig("d", "m", "o", baseline_model="/x", champion_from="/y"))
    assert explicit == "/x" and info["status"] == "compared"
    dest = tmp_path / "reg"
    first, info = _resolve_baseline(EvaluateConfig("d", "m", "o", champion_from=str(dest)))
    assert first is None and info["status"] == "no champion yet"
    publish(chain.weak, dest, "1")
    uri, info = _resolve_baseline(EvaluateConfig("d", "m", "o", champion_from=str(dest)))
    assert uri == str(dest / "1") and info["version"] == "1"
    with pytest.raises(UserError, match="--class-change"):
        EvaluateConfig("d", "m", "o", class_change="maybe")


def test_champion_compared_on_this_split_and_class_change_policies(tmp_path, chain):
    dest = tmp_path / "reg"
    first = evaluate(EvaluateConfig(str(chain.dataset), str(chain.strong), str(tmp_path / "e0"),
                                    champion_from=str(dest)))
    assert first.blessed and first.evaluation["champion"]["status"] == "no champion yet"

    publish(chain.weak, dest, "1")
    compared = evaluate(EvaluateConfig(str(chain.dataset), str(chain.strong), str(tmp_path / "e1"),
                                       champion_from=str(dest)))
    champion = compared.evaluation["champion"]
    assert champion["status"] == "compared" and champion["version"] == "1" and compared.blessed
    assert compared.evaluation["baseline"]["metrics"]["num_examples"] == compared.metrics["num_examples"]
    # The other way round: the weak challenger is refused, and the evaluation names the champion and why.
    publish(chain.strong, dest, "2")
    refused = evaluate(EvaluateConfig(str(chain.dataset), str(chain.weak), str(tmp_path / "e2"),
                                      champion_from=str(dest), min_accuracy=0.0))  # the baseline rule alone
    assert not refused.blessed and refused.evaluation["champion"]["version"] == "2"
    assert refused.evaluation["champion"]["decision"].startswith("challenger refused: failed accuracy >= baseline")

    # A champion with other classes: no comparison; the policy decides and says why.
    publish(chain.other_model, dest, "3")
    for policy, blessed in (("bless", True), ("refuse", False)):
        result = evaluate(EvaluateConfig(str(chain.dataset), str(chain.strong), str(tmp_path / f"c-{policy}"),
                                         champion_from=str(dest), class_change=policy))
        info = result.evaluation["champion"]
        assert info["status"] == "class set changed" and info["policy"] == policy and result.blessed == blessed
        assert "added: ['stripes']" in info["reason"] and "removed: ['checker']" in info["reason"]
        assert result.evaluation["baseline"] is None
