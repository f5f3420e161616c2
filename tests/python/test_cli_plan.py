"""``batchllm plan``: the job's prefix sharing explained without a model, checked on hand-computed jobs."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from batchllm_core.cli import main

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "fewshot_batch.jsonl"
TINY_KV_BYTES_PER_TOKEN = 2 * 2 * 2 * 16 * 2   # K and V, 2 layers, 2 KV heads, head_dim 16, bfloat16


def ids_line(custom_id, prompt, **body):
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": "/v1/completions",
                       "body": {"prompt": prompt, "max_tokens": 2, **body}})


@pytest.fixture()
def nested_job(tmp_path):
    shared = list(range(1, 9))           # 2 blocks of 4 shared by requests 0-3
    nested = shared + [9, 10, 11, 12]    # 1 more block shared by requests 2-3
    lines = [ids_line("a", shared + [100, 101]), ids_line("b", shared + [200, 201, 202]),
             ids_line("c", nested + [250]), ids_line("d", nested + [251, 252]), ids_line("e", [50, 51, 52]),
             "not json", ids_line("a", [1, 2])]
    path = tmp_path / "job.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_plan_json_matches_the_hand_computed_plan(nested_job, capsys):
    assert main(["plan", "-i", str(nested_job), "--json", "--block-size", "4"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["requests"] == 5
    assert plan["prompt_tokens"] == 10 + 11 + 13 + 14 + 3
    assert plan["prefill_tokens"] == 8 + 2 + 3 + 4 + 1 + 2 + 3
    assert plan["shared_tokens"] == 28
    assert plan["groups"] == 2 and plan["top_level_groups"] == 1 and plan["tree_depth"] == 2
    assert plan["output_tokens"] == 10
    assert plan["predicted_speedup"] == pytest.approx((51 + 10) / (23 + 10))
    assert plan["prefill_speedup"] == pytest.approx(51 / 23)
    block_bytes = 4 * TINY_KV_BYTES_PER_TOKEN
    # shared: prefix blocks 2 + 1, own parts (prompt rest + 2 outputs) 1 + 2 + 1 + 1, lone request 2
    assert plan["kv_peak_bytes"] == 10 * block_bytes
    assert plan["kv_peak_bytes_no_sharing"] == (3 + 4 + 4 + 4 + 2) * block_bytes
    assert plan["kv_largest_group_bytes"] == 8 * block_bytes
    top, child = plan["prefixes"]
    assert (top["begin"], top["end"], top["num_requests"], top["parent"]) == (0, 8, 4, -1)
    assert (child["begin"], child["end"], child["num_requests"], child["parent"]) == (8, 12, 2, 0)
    assert top["custom_ids_sample"] == ["a", "b", "c", "d"]
    assert [(e["line"], e["code"]) for e in plan["invalid"]] == [(6, "invalid_json"), (7, "duplicate_custom_id")]


def test_plan_report_lists_groups_and_invalid_lines(nested_job, capsys):
    assert main(["plan", "-i", str(nested_job), "--block-size", "4"]) == 0
    report = capsys.readouterr().out
    assert "to prefill:      23 after sharing" in report
    assert "4 requests share tokens [0, 8)" in report and "2 requests share tokens [8, 12)" in report
    assert "tree depth 2" in report and "invalid: line 6 (no custom_id)" in report


def test_plan_of_the_example_job_with_the_byte_tokenizer(capsys):
    assert main(["plan", "-i", str(EXAMPLE), "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["requests"] == 52 and plan["top_level_groups"] == 4
    assert plan["shared_tokens"] > plan["prefill_tokens"] and plan["predicted_speedup"] > 2
    assert plan["prompt_tokens"] == plan["prefill_tokens"] + plan["shared_tokens"]
    assert not plan["invalid"]


def test_plan_of_an_empty_job(tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert main(["plan", "-i", str(empty), "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["requests"] == plan["prompt_tokens"] == plan["prefill_tokens"] == plan["groups"] == 0
    assert plan["predicted_speedup"] == 1.0


def test_plan_errors(tmp_path, capsys):
    assert main(["plan", "-i", str(tmp_path / "missing.jsonl")]) == 1
    assert "cannot read input" in capsys.readouterr().err
    job = tmp_path / "job.jsonl"
    job.write_text(ids_line("a", [1, 2]) + "\n")
    assert main(["plan", "-i", str(job), "--model", str(tmp_path / "no-model")]) == 1
    assert "not a model directory" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["plan", "-i", str(job), "--block-size", "0"])


def test_python_dash_m_runs_the_same_command_line(nested_job):
    import batchllm_core

    package_parent = str(Path(batchllm_core.__file__).resolve().parents[1])  # source tree or site-packages
    result = subprocess.run([sys.executable, "-m", "batchllm_core", "plan", "-i", str(nested_job), "--json",
                             "--block-size", "4"], capture_output=True, text=True,
                            env={"PYTHONPATH": package_parent, "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["shared_tokens"] == 28
