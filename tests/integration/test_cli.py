"""The command line: help, one-line errors with exit 2, world export, ask and demo."""

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from mmscope.cli import main


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mmscope", *args], capture_output=True, text=True, timeout=300
    )


def test_help_lists_the_commands():
    out = run("--help")
    assert out.returncode == 0
    commands = ("ask", "explain", "world", "train-toy", "toys", "demo", "methods", "bench")
    inside = ("lens", "ablate", "knockout", "trace", "heads", "prune", "first-token")
    for command in commands + inside:
        assert command in out.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["ask", "--model", "toy-nope", "--image", "x.png", "--prompt", "hi"], "unknown model"),
        (["ask", "--image", "missing.png", "--prompt", "what ?"], "does not exist"),
        (["explain", "--image", "x.png", "--prompt", "what ?", "--method", "nope"], "unknown"),
        (
            ["explain", "--image", "x.png", "--prompt", "hi", "--method", "chefer_relevance,xyz"],
            "unknown method 'xyz'",
        ),
        (["bench", "--n", "2", "--metrics", "deletion,nope"], "unknown explanation metric"),
        (["bench", "--n", "2", "--methods", "saliency,nope"], "unknown method 'nope'"),
        (["bench", "--n", "0"], "n must be"),
        (["bench", "--n", "2", "--subset", "randomisation=x"], "--subset takes"),
        (["bench", "--data", "/nonexistent.jsonl"], "no such file"),
    ],
)
def test_errors_print_one_line_and_exit_2(args, message, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and "Traceback" not in err


def test_corrupt_image_and_empty_prompt_exit_2(tmp_path, capsys):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    assert main(["ask", "--image", str(bad), "--prompt", "what ?"]) == 2
    good = tmp_path / "good.png"
    Image.fromarray(np.zeros((48, 48, 3), np.uint8)).save(good)
    assert main(["ask", "--image", str(good), "--prompt", " "]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2 and "empty" in lines[1]


def test_world_sample_writes_a_loadable_dataset(tmp_path):
    assert main(["world", "sample", "--n", "5", "--out", str(tmp_path)]) == 0
    from mmscope.world import load_dataset

    samples = load_dataset(tmp_path)
    assert len(samples) == 5 and (tmp_path / "images" / "00000.png").is_file()
    line = json.loads((tmp_path / "annotations.jsonl").read_text().splitlines()[0])
    assert {"image", "objects", "questions", "caption"} <= set(line)


def test_ask_answers_with_the_toy(tmp_path):
    from mmscope.world import Scene, WorldObject, render

    scene = Scene((WorldObject("circle", "red", "large", "top left"),))
    path = tmp_path / "scene.png"
    render(scene, 48).image.save(path)
    out = run("ask", "--image", str(path), "--prompt", "what color is the circle ?", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["answer"] == "red"


def test_demo_writes_the_report(tmp_path):
    args = ["demo", "--out", str(tmp_path), "--n", "5", "--explain", "1", "--bench", "2"]
    args += ["--inside", "12", "--decoding", "6", "--neurons", "12"]
    assert main(args) == 0
    html = (tmp_path / "index.html").read_text()
    assert html.count("<img") >= 10 and "what" in html or "is there" in html
    from mmscope.methods.explain import attribution_methods

    for method in attribution_methods():  # every method, next to the true evidence
        assert f"<th>{method}</th>" in html
    assert "explained token by token" in html
    assert "The leaderboard on 2 world questions" in html and "<td><b>oracle</b></td>" in html
    assert "Object hallucination: POPE" in html and "adversarial" in html
    from mmscope.report.inside import SECTIONS

    assert "Inside the model" in html
    for key in SECTIONS:  # one figure per analysis
        assert f'alt="{key}"' in html
    from mmscope.decoding import decoders

    assert "Does a better decoder stop hallucination?" in html
    for key in decoders():  # a row of the comparison and a caption per decoder
        assert html.count(f"<td><b>{key}</b></td>") == 1 and f"<td>{key}</td>" in html
    assert "<mark>" in html and 'alt="hallucination"' in html
    from mmscope.report.neurons import CLIP, LLAVA

    assert "Neurons and concepts" in html
    for key in [*LLAVA, *CLIP]:  # one figure per study
        assert f'alt="{key}"' in html


def test_explain_writes_overlays_scores_and_a_page(tmp_path, capsys):
    from mmscope.world import Scene, WorldObject, render

    scene = Scene((WorldObject("circle", "red", "large", "top left"),))
    image = tmp_path / "scene.png"
    render(scene, 96).image.save(image)  # a size other than the model's: maps are resized
    out = tmp_path / "out"
    args = ["explain", "--image", str(image), "--prompt", "what color is the circle ?"]
    assert main([*args, "--method", "saliency,grad_cam", "--out", str(out), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert set(printed["methods"]) == {"saliency", "grad_cam"}
    for name in ("saliency.png", "saliency.json", "grad_cam.png", "scores.json", "index.html"):
        assert (out / name).is_file()
    scores = json.loads((out / "scores.json").read_text())
    assert len(scores["grad_cam"]["image_scores"][0][0][0]) == 6  # a 6x6 patch grid
    caption = ["explain", "--image", str(image), "--prompt", "describe the image ."]
    assert main([*caption, "--generated", "--method", "grad_cam", "--out", str(out / "g")]) == 0
    page = (out / "g" / "index.html").read_text()
    assert page.count("<img") >= 3  # one overlay per generated token: "a red circle"
    assert "-0.00" not in page


def test_methods_lists_every_attribution_method_under_its_level(capsys):
    from mmscope.methods.explain import attribution_methods

    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    architecture = out.split("  architecture")[1].split("training and inference")[0]
    for method in attribution_methods():
        assert f"    {method} " in architecture
    from mmscope.decoding import decoders
    from mmscope.methods.analysis import analyses

    decoding = out.split("\n  decoding\n")[1]
    assert all(f"    {key} " in decoding for key in decoders())
    inside = out.split("\n  token\n")[1].split("\n  architecture")[0]
    assert all(f"    {key} " in inside for key in analyses())


def test_eval_pope_json(capsys):
    args = ["eval", "pope", "--model", "toy-llava", "--split", "random", "--n", "10", "--json"]
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["model"] == "toy-llava" and list(out["splits"]) == ["random"]
    scores = out["splits"]["random"]
    keys = {"accuracy", "precision", "recall", "f1", "yes_ratio", "n", "ci"}
    assert keys <= set(scores) and set(scores["ci"]) == {"accuracy", "f1"}
    assert all(0 <= scores[k] <= 1 for k in keys - {"n", "ci"}) and 20 <= scores["n"] <= 60
    lo, hi = scores["ci"]["f1"]
    assert lo <= scores["f1"] <= hi


def test_eval_with_several_decoders_and_ask_with_one(capsys, tmp_path):
    args = ["eval", "pope", "--split", "adversarial", "--n", "6", "--decoder", "greedy,vcd"]
    assert main(args + ["--json"]) == 0
    out = json.loads(capsys.readouterr().out)["decoders"]
    assert set(out) == {"greedy", "vcd"}
    assert out["greedy"]["adversarial"]["n"] == out["vcd"]["adversarial"]["n"]
    assert main(["eval", "chair", "--n", "3", "--decoder", "beam,opera_fast"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == ["beam", "opera_fast"]
    from mmscope.world import render, sample_scenes

    image = tmp_path / "scene.png"
    render(sample_scenes(1, 3)[0], 48).image.save(image)
    ask = ["ask", "--image", str(image), "--prompt", "describe the image .", "--json"]
    assert main(ask + ["--decoder", "vcd"]) == 0
    assert json.loads(capsys.readouterr().out)["answer"]
    assert main(ask + ["--decoder", "nope"]) == 2
    assert "unknown decoder 'nope'" in capsys.readouterr().err


def test_eval_bad_split_and_eval_help(capsys):
    assert main(["eval", "pope", "--split", "hard"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "unknown POPE split 'hard'" in err
    out = run("eval", "--help")
    assert out.returncode == 0 and "pope" in out.stdout and "chair" in out.stdout


def test_bench_json_rows_and_the_written_table(tmp_path, capsys):
    args = ["bench", "--n", "3", "--methods", "saliency,oracle", "--metrics", "insertion,"
            "relevance_rank", "--out", str(tmp_path), "--json"]
    assert main(args) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert {(r["method"], r["metric"]) for r in rows} <= {
        (m, k) for m in ("saliency", "oracle") for k in ("insertion", "relevance_rank")
    }
    for r in rows:
        assert r["ci"][0] <= r["mean"] <= r["ci"][1] and r["n"] >= 1
    for name in ("leaderboard.csv", "leaderboard.json", "leaderboard.html", "results.jsonl"):
        assert (tmp_path / name).is_file()


@pytest.mark.parametrize(
    "command", ["lens", "ablate", "knockout", "trace", "heads", "prune", "first-token"]
)
def test_inside_commands_write_json_and_a_figure(command, tmp_path, capsys):
    """Every inside-the-model command on a few world questions: JSON on stdout, files on disk."""
    args = [command, "--out", str(tmp_path), "--json"]
    if command in ("ablate", "prune", "first-token"):
        args += ["--n", "6"]
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out)
    json_file, png_file = (tmp_path / p.split("/")[-1] for p in out["files"])
    assert json_file.name == f"{out['analysis']}.json"
    saved = json.loads(json_file.read_text())
    assert saved == {k: v for k, v in out.items() if k in saved}
    assert png_file.stat().st_size > 1000


def test_inside_command_on_a_given_image_with_an_evidence_box(tmp_path, capsys):
    from mmscope.world import render, sample_scenes

    image = tmp_path / "scene.png"
    render(sample_scenes(1, 3)[0], 48).image.save(image)
    args = ["ablate", "--image", str(image), "--prompt", "what color is the circle ?"]
    assert main(args + ["--box", "8,8,24,24", "--out", str(tmp_path), "--json"]) == 0
    sets = json.loads(capsys.readouterr().out)["sets"]
    assert sets["object"]["mean_tokens"] == sets["random"]["mean_tokens"] > 0
    assert main(args + ["--out", str(tmp_path)]) == 2  # the object set needs a box
    assert "--box" in capsys.readouterr().err


STUDY_COMMANDS = [
    (["neurons", "stats"], "neuron_stats", "neuron_stats.neurons.parquet"),
    (["neurons", "dape"], "dape", "dape.dape.parquet"),
    (["neurons", "miner"], "miner", "miner.miner.parquet"),
    (["neurons", "dissect", "--model", "toy-clip"], "network_dissection", None),
    (["probe", "--set", "concepts=color"], "probe", "probe.probes.parquet"),
    (["concepts", "splice", "--model", "toy-clip"], "splice", None),
    (["concepts", "anisotropy"], "anisotropy", None),
    (["sae", "train", "--set", "epochs=2"], "sae_train", None),
]


@pytest.mark.parametrize("args,key,table", STUDY_COMMANDS)
def test_study_commands_write_json_a_figure_and_tables(args, key, table, tmp_path, capsys):
    """Study commands on a few world items: the result on stdout, JSON, PNG and Parquet."""
    assert main([*args, "--n", "8", "--out", str(tmp_path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert json.loads((tmp_path / f"{key}.json").read_text()) == out
    assert (tmp_path / f"{key}.png").stat().st_size > 1000
    if table:
        from mmscope.methods.study import read_table

        assert len(next(iter(read_table(tmp_path / table).values()))) > 0


def test_study_commands_chain_and_refuse_bad_settings(tmp_path, capsys):
    """A saved neuron set feeds `neurons edit`; a saved SAE feeds `sae label`; a setting the
    study does not take exits 2 with one line."""
    assert main(["neurons", "miner", "--n", "8", "--out", str(tmp_path)]) == 0
    capsys.readouterr()
    edit = ["neurons", "edit", "--n", "8", "--neurons", str(tmp_path / "miner.json")]
    assert main([*edit, "--set", "random_sets=1", "--out", str(tmp_path), "--json"]) == 0
    assert "accuracy" in json.dumps(json.loads(capsys.readouterr().out))
    clip = ["--model", "toy-clip", "--n", "8", "--out", str(tmp_path)]
    assert main(["sae", "train", *clip, "--set", "epochs=2"]) == 0
    assert main(["sae", "label", *clip, "--sae", str(tmp_path / "sae_train.json")]) == 0
    assert (tmp_path / "sae_label.json").is_file()
    capsys.readouterr()
    assert main(["neurons", "stats", "--n", "2", "--set", "no_such=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "neuron_stats takes" in err
