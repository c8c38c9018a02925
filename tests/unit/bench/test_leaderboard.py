"""The leaderboard: rows with intervals, results written as they go, resume after a kill."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from mmscope.bench import BenchConfig, run_leaderboard
from mmscope.bench.report import write_leaderboard
from mmscope.core.errors import InputError, RegistryError
from mmscope.core.state import model_state
from mmscope.world.items import world_items

FAST = dict(
    methods=("saliency", "random", "oracle"),
    metrics=("deletion", "relevance_mass", "randomisation"),
    batch_size=2,
    subsets={"randomisation": 2},
)


def test_rows_cover_methods_and_metrics_and_the_model_is_untouched(tiny_llava, tmp_path):
    items = world_items(4)
    before = model_state(tiny_llava.model)
    results = run_leaderboard(tiny_llava, items, BenchConfig("tiny", 4, **FAST), tmp_path)
    assert model_state(tiny_llava.model) == before
    got = {(r.method, r.metric): r for r in results}
    assert set(got) <= {(m, k) for m in FAST["methods"] for k in FAST["metrics"]}
    assert len(got[("saliency", "deletion")].values) == 4
    assert got[("saliency", "randomisation")].n <= 2  # only the first 2 items
    assert got[("oracle", "randomisation")].mean == pytest.approx(1.0)  # it ignores the model
    lines = (tmp_path / "results.jsonl").read_text().splitlines()
    assert len(lines) == 2 * 3  # (batch, method) records
    page = write_leaderboard(
        results,
        tmp_path,
        {"model": "tiny", "n": 4, "data": "world", "subsets": {"randomisation": 2}},
    )
    table = json.loads((tmp_path / "leaderboard.json").read_text())
    assert "oracle" in table["fails_sanity"] and page.read_text().count("<tr") >= 4
    header = (tmp_path / "leaderboard.csv").read_text().splitlines()[0]
    assert header.startswith("method,metric,mean,ci_low,ci_high")


def test_resume_keeps_finished_work_and_ignores_a_cut_line(tiny_llava, tmp_path):
    items = world_items(4)
    config = BenchConfig("tiny", 4, **FAST)
    run_leaderboard(tiny_llava, items, config, tmp_path)
    path = tmp_path / "results.jsonl"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:2]) + "\n" + lines[2][:25])  # killed while writing
    resumed = run_leaderboard(tiny_llava, items, config, tmp_path, resume=True)
    after = path.read_text().splitlines()
    assert after[:2] == lines[:2]  # finished records were not redone
    assert len(after) == len(lines) and all(json.loads(line) for line in after)
    full = run_leaderboard(tiny_llava, items, config, tmp_path / "again")
    assert [r.to_dict() for r in resumed] == [r.to_dict() for r in full]


def test_resume_refuses_other_settings_and_bad_keys_raise(tiny_llava, tmp_path):
    items = world_items(2)
    run_leaderboard(tiny_llava, items, BenchConfig("tiny", 2, **FAST), tmp_path)
    other = BenchConfig("tiny", 2, **{**FAST, "metrics": ("deletion",)})
    with pytest.raises(InputError, match="other settings"):
        run_leaderboard(tiny_llava, items, other, tmp_path, resume=True)
    with pytest.raises(RegistryError):
        run_leaderboard(tiny_llava, items, BenchConfig("t", 2, methods=("nope",)), tmp_path / "x")
    with pytest.raises(InputError):
        run_leaderboard(tiny_llava, items, BenchConfig("t", 2, metrics=("pope",)), tmp_path / "y")


@pytest.mark.slow
def test_a_killed_cli_run_resumes_to_the_same_table(tmp_path):
    args = [
        sys.executable,
        "-m",
        "mmscope",
        "bench",
        "--model",
        "toy-llava",
        "--n",
        "24",
        "--batch-size",
        "2",
        "--methods",
        "saliency,random",
        "--metrics",
        "deletion,pointing_game",
        "--json",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        [*args, "--out", str(killed)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    results = killed / "results.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (
        not results.exists() or len(results.read_text().splitlines()) < 3
    ):
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(results.read_text().splitlines())
    assert 3 <= done < 24, "the run should be killed midway"
    resumed = subprocess.run(
        [*args, "--out", str(killed), "--resume"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    clean = subprocess.run(
        [*args, "--out", str(tmp_path / "clean")],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(resumed.stdout) == json.loads(clean.stdout)
    assert len(results.read_text().splitlines()) == 24


def test_metrics_that_do_not_apply_are_skipped_not_fatal(tiny_qwen2_vl, tmp_path):
    config = BenchConfig("tiny", 2, ("saliency",), ("deletion", "road_morf"), batch_size=2)
    with pytest.warns(UserWarning, match="road_morf skipped"):
        results = run_leaderboard(tiny_qwen2_vl, world_items(2), config, tmp_path)
    assert [r.metric for r in results] == ["deletion"]
