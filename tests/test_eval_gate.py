"""The baseline gate: rules per metric, config mismatches, and the CLI's exit codes 0 / 1 / 2."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
from typer.testing import CliRunner

from llmtool.cli import app
from llmtool.errors import UsageError
from llmtool.evaluate.gate import (
    Tolerance,
    check_config,
    compare,
    config_differences,
    judge,
    paired_difference,
    parse_tolerance,
    read_baseline,
)

runner = CliRunner()


def ppl(value: float, se: float = 0.001) -> dict:
    return {
        "value": value,
        "unit": "ppl/token",
        "higher_is_better": False,
        "gate": "perplexity",
        "standard_error": se,
    }


def tps(value: float) -> dict:
    return {"value": value, "unit": "tokens/s", "higher_is_better": True, "gate": "throughput"}


@pytest.mark.parametrize(
    ("old", "new", "status"),
    [
        (ppl(10.0), ppl(9.0), "better"),
        (ppl(10.0), ppl(10.0), "same"),
        (ppl(10.0), ppl(10.3), "worse"),  # +3%, no per-window pairs: the tolerance decides
        (ppl(10.0), ppl(10.03), "within tolerance"),  # +0.3% < +0.5%
        # Independent standard errors no longer excuse a rise: only the paired noise does.
        (ppl(10.0, 0.02), ppl(10.3, 0.02), "worse"),
        (tps(100.0), tps(95.0), "within tolerance"),
        (tps(100.0), tps(85.0), "worse"),
        (tps(100.0), tps(120.0), "better"),
        (
            {**tps(0), "gate": "count", "higher_is_better": False},
            {**tps(2), "gate": "count", "higher_is_better": False},
            "worse",
        ),
        ({**tps(5.0), "gate": None}, {**tps(1.0), "gate": None}, "info"),
        (ppl(10.0), ppl(math.nan), "worse"),
    ],
)
def test_rules(old, new, status):
    row = judge("m", old, new, Tolerance())
    assert row.status == status
    if math.isfinite(new["value"]) and old["value"]:
        assert row.change == pytest.approx((new["value"] - old["value"]) / old["value"])


def test_paired_noise_and_spread_rules():
    # +3% with a paired standard error of 0.02 nats: ln(1.03) = 0.0296 < 2σ = 0.04, noise.
    row = judge("perplexity", ppl(10.0), ppl(10.3), Tolerance(), paired=(math.log(1.03), 0.02))
    assert (row.status, row.decided_by) == ("within tolerance", "paired noise")
    row = judge("perplexity", ppl(10.0), ppl(10.3), Tolerance(), paired=(math.log(1.03), 0.001))
    assert (row.status, row.decided_by) == ("worse", "paired noise")
    # -15% tok/s: beyond the 10% tolerance, but the repeats themselves spread by 20%.
    noisy = {**tps(85.0), "spread": 0.2}
    row = judge("decode", tps(100.0), noisy, Tolerance())
    assert (row.status, row.decided_by) == ("within tolerance", "spread of repeats")
    row = judge("decode", tps(100.0), {**tps(85.0), "spread": 0.03}, Tolerance())
    assert (row.status, row.decided_by) == ("worse", "tolerance")
    assert "spread 3%" in row.limit


def test_paired_difference_is_the_window_by_window_noise():
    old = {"window_nll": [10.0, 20.0, 30.0], "window_tokens": [5, 10, 15]}
    same_shift = {"window_nll": [10.5, 21.0, 31.5], "window_tokens": [5, 10, 15]}
    d, se = paired_difference(old, same_shift)
    assert d == pytest.approx(3.0 / 30) and se == pytest.approx(0.0, abs=1e-12)
    noisy = {"window_nll": [12.0, 19.0, 31.0], "window_tokens": [5, 10, 15]}
    d, se = paired_difference(old, noisy)
    n, diff = np.array([5, 10, 15.0]), np.array([2.0, -1.0, 1.0])
    ref = math.sqrt(3 / 2 * ((diff - d * n) ** 2).sum()) / n.sum()
    assert d == pytest.approx(2.0 / 30) and se == pytest.approx(ref)
    assert paired_difference({}, noisy) is None  # a v1 baseline: tolerance only
    with pytest.raises(UsageError, match="other windows"):
        paired_difference(old, {"window_nll": [1.0, 2.0], "window_tokens": [5, 25]})


def test_tolerance_option():
    assert parse_tolerance([]) == Tolerance(0.005, 2.0, 0.10)
    assert parse_tolerance(["perplexity=1%,sigmas=3", "throughput=0.2"]) == Tolerance(
        0.01, 3.0, 0.2
    )
    with pytest.raises(UsageError, match="--tolerance"):
        parse_tolerance(["latency=5%"])
    with pytest.raises(UsageError, match="not a non-negative number"):
        parse_tolerance(["perplexity=-1%"])
    assert (
        judge("m", tps(100), tps(85), parse_tolerance(["throughput=20%"])).status
        == "within tolerance"
    )


CONFIG = {
    "dtype": "fp32",
    "execution_provider": "cpu",
    "perplexity": {
        "data_sha256": "a" * 64,
        "protocol": "hf",
        "max_length": 64,
        "stride": 32,
        "text_field": None,
    },
    "throughput": {"batch_sizes": [1], "prompt_lengths": [8], "new_tokens": 4},
}


@pytest.mark.parametrize(
    ("path", "value", "shown"),
    [
        (("perplexity", "data_sha256"), "b" * 64, "data_sha256 aaaaaaaaaaaa… → bbbbbbbbbbbb…"),
        (("perplexity", "protocol"), "lm-eval", "protocol hf → lm-eval"),
        (("dtype",), "fp16", "dtype fp32 → fp16"),
        (("throughput", "prompt_lengths"), [16], "prompt_lengths [8] → [16]"),
        (("execution_provider",), "cuda", "execution provider cpu → cuda"),
    ],
)
def test_config_mismatch(path, value, shown):
    new = copy.deepcopy(CONFIG)
    target = new
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    assert config_differences(CONFIG, new) == [shown]
    with pytest.raises(UsageError, match="measured with another config") as e:
        check_config({"config": CONFIG}, new, "base.json")
    assert e.value.exit_code == 2


def test_sections_in_common_are_what_is_compared():
    ppl_only = {**CONFIG, "throughput": None}
    assert config_differences(CONFIG, ppl_only) == []  # throughput left out: compare perplexity
    tp_only = {**CONFIG, "perplexity": None}
    assert config_differences(ppl_only, tp_only) == [
        "no perplexity or throughput section in common"
    ]


def test_compare_uses_common_metrics_only():
    old = {"metrics": {"perplexity": ppl(10.0), "gone": tps(1.0)}}
    new = {"metrics": {"perplexity": ppl(11.0), "new": tps(1.0)}}
    result = compare(old, new, Tolerance(), "base.json")
    assert [r.metric for r in result.rows] == ["perplexity"]
    assert not result.passed and result.to_dict()["passed"] is False


def test_read_baseline_errors(tmp_path):
    path = tmp_path / "b.json"
    with pytest.raises(UsageError, match="does not exist"):
        read_baseline(path)
    path.write_text("{not json")
    with pytest.raises(UsageError, match="not readable JSON"):
        read_baseline(path)
    path.write_text(json.dumps({"perplexity": 3.0}))  # a walking-skeleton file
    with pytest.raises(UsageError, match="not an llmtool eval report"):
        read_baseline(path)
    path.write_text(json.dumps({"schema": "llmtool-eval", "schema_version": 99}))
    with pytest.raises(UsageError, match="upgrade llmtool"):
        read_baseline(path)


# The CLI end to end: one measured baseline, edited to stand for earlier runs.


def eval_args(onnx_dir, data, *extra):
    return [
        "eval",
        str(onnx_dir),
        "--data",
        str(data),
        "--max-length",
        "64",
        "--provider",
        "cpu",
        *map(str, extra),
    ]


@pytest.fixture(scope="module")
def measured(tiny_llama_export, tmp_path_factory):
    from conftest import SAMPLE_TEXT

    path = tmp_path_factory.mktemp("gate") / "base.json"
    result = runner.invoke(app, eval_args(tiny_llama_export[1], SAMPLE_TEXT, "--json", path))
    assert result.exit_code == 0, result.output
    return tiny_llama_export[1], SAMPLE_TEXT, json.loads(path.read_text())


def with_baseline(measured, tmp_path, edit):
    onnx_dir, data, record = measured
    record = copy.deepcopy(record)
    edit(record)
    path = tmp_path / "baseline.json"
    path.write_text(json.dumps(record))
    return runner.invoke(
        app, eval_args(onnx_dir, data, "--baseline", path, "--json", tmp_path / "new.json")
    )


def set_ppl(value, se=None):
    """Edit only the perplexity metric (a baseline without per-window sums, as v1 wrote)."""

    def edit(record):
        record["metrics"]["perplexity"]["value"] = value(record["perplexity"])
        record.pop("window_nll")
        record.pop("window_tokens")
        if se is not None:
            record["metrics"]["perplexity"]["standard_error"] = se

    return edit


def shift_windows(rise, noise=0.0, seed=0):
    """A baseline whose windows were, on average, ``rise`` (relative perplexity) better.

    Each window's ΣNLL goes down by ln(1 + rise) per token, times a random factor around 1 with
    spread ``noise``: a consistent improvement (noise 0.5) or mere scatter (noise 5).
    """

    def edit(record):
        rng = np.random.default_rng(seed)
        n = np.array(record["window_tokens"], dtype=float)
        factors = 1 + noise * rng.standard_normal(len(n))
        factors *= n.sum() / (factors * n).sum()  # the mean shift stays exactly ln(1 + rise)
        old = np.array(record["window_nll"]) - math.log1p(rise) * n * factors
        record["window_nll"] = old.tolist()
        nll = old.sum() / n.sum()
        record["metrics"]["perplexity"]["value"] = math.exp(nll)
        record["perplexity"] = math.exp(nll)

    return edit


def test_cli_gate_baseline_one_percent_better_fails(measured, tmp_path):
    """The defect: a 1% rise on the same tokens is real (paired noise ~0), so it must fail."""
    result = with_baseline(measured, tmp_path, shift_windows(0.01, noise=0.5))
    assert result.exit_code == 1, result.output
    rows = json.loads((tmp_path / "new.json").read_text())["gate"]["rows"]
    row = next(r for r in rows if r["metric"] == "perplexity")
    assert row["status"] == "worse" and row["decided_by"] == "paired noise"
    assert row["change"] == pytest.approx(0.01, rel=1e-3)


def test_cli_gate_scatter_without_a_consistent_rise_passes(measured, tmp_path):
    """+1% on average but windows scattered far more than that: paired noise, not a regression."""
    result = with_baseline(measured, tmp_path, shift_windows(0.01, noise=40.0))
    assert result.exit_code == 0, result.output
    rows = json.loads((tmp_path / "new.json").read_text())["gate"]["rows"]
    row = next(r for r in rows if r["metric"] == "perplexity")
    assert row["status"] == "within tolerance" and row["decided_by"] == "paired noise"


def test_cli_gate_unchanged_passes(measured, tmp_path):
    result = with_baseline(measured, tmp_path, lambda r: None)
    assert result.exit_code == 0, result.output
    assert "Baseline" in result.stdout and "same" in result.stdout
    gate = json.loads((tmp_path / "new.json").read_text())["gate"]
    assert gate["passed"] and {r["status"] for r in gate["rows"]} == {"same"}


def test_cli_gate_better_passes(measured, tmp_path):
    result = with_baseline(measured, tmp_path, set_ppl(lambda p: p * 1.05))
    assert result.exit_code == 0, result.output
    rows = json.loads((tmp_path / "new.json").read_text())["gate"]["rows"]
    assert next(r for r in rows if r["metric"] == "perplexity")["status"] == "better"


def test_cli_gate_worse_fails_with_exit_1(measured, tmp_path):
    result = with_baseline(measured, tmp_path, set_ppl(lambda p: p / 1.05, se=0.001))
    assert result.exit_code == 1, result.output
    assert "worse than the baseline" in result.stderr and "perplexity" in result.stderr
    rows = json.loads((tmp_path / "new.json").read_text())["gate"]["rows"]  # written before exiting
    assert next(r for r in rows if r["metric"] == "perplexity")["status"] == "worse"


def test_cli_gate_v1_baseline_is_judged_by_the_tolerance_alone(measured, tmp_path):
    """A baseline without per-window sums: +0.3% passes, +1% fails (no σ rule to hide it)."""
    result = with_baseline(measured, tmp_path, set_ppl(lambda p: p / 1.003))
    assert result.exit_code == 0, result.output
    rows = json.loads((tmp_path / "new.json").read_text())["gate"]["rows"]
    row = next(r for r in rows if r["metric"] == "perplexity")
    assert row["status"] == "within tolerance" and "tolerance only" in row["limit"]
    result = with_baseline(measured, tmp_path, set_ppl(lambda p: p / 1.01, se=0.05))
    assert result.exit_code == 1, result.output


def test_cli_gate_mismatched_config_exits_2(measured, tmp_path):
    def edit(record):
        record["config"]["perplexity"]["protocol"] = "lm-eval"
        record["config"]["perplexity"]["data_sha256"] = "0" * 64

    result = with_baseline(measured, tmp_path, edit)
    assert result.exit_code == 2, result.output
    assert "another config" in result.stderr and "protocol lm-eval → hf" in result.stderr
    assert not (tmp_path / "new.json").exists()  # refused before measuring


def test_cli_help_documents_exit_codes():
    result = runner.invoke(app, ["eval", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    assert "Exit codes: 0 success" in result.stdout and "1 a metric" in result.stdout
    assert "--baseline" in result.stdout and "--tolerance" in result.stdout
