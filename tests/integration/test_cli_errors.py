"""Every class of bad input through the command line: one line on stderr, exit status 2, no
traceback, refused before any model work or progress output, and nothing already there
touched (issue 14)."""

import io
import json
import shutil
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file, save_file

import mmscope.models
from mmscope.cli import main
from mmscope.core import images


def _one_line(capsys, *needles: str) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mmscope: error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture()
def no_model(monkeypatch):
    """Fail the test if a handler gets as far as loading a model."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(mmscope.models, "load", refuse)


@pytest.fixture()
def image(tmp_path):
    path = tmp_path / "scene.png"
    Image.fromarray(np.full((48, 48, 3), 128, np.uint8)).save(path)
    return str(path)


# ----- settings and flags, refused by the parser or the registry before the model ---------
@pytest.mark.parametrize(
    "args, needles",
    [
        (
            ["ask", "--image", "x.png", "--prompt", "hi", "--max-new-tokens", "-1"],
            ["--max-new-tokens must be an integer in [1, 4,096], not '-1'"],
        ),
        (
            ["ask", "--image", "x.png", "--prompt", "hi", "--max-new-tokens", "99999999"],
            ["--max-new-tokens must be", "'99999999'"],
        ),
        (["world", "sample", "--n", "1000000000", "--out", "w"], ["--n must be", "[1, 100,000]"]),
        (["world", "sample", "--seed", "-1", "--out", "w"], ["--seed must be a seed", "'-1'"]),
        (["world", "sample", "--seed", "9999999999", "--out", "w"], ["--seed must be"]),
        (["world", "sample", "--size", "-5", "--out", "w"], ["--size must be", "'-5'"]),
        (
            ["world", "sample", "--size", "big", "--out", "w"],
            ["--size must be an integer", "'big'"],
        ),
        (["bench", "--n", "1000000000"], ["--n must be", "'1000000000'"]),
        (["bench", "--batch-size", "0"], ["--batch-size must be"]),
        (["eval", "pope", "--n", "-1"], ["--n must be"]),
        (["eval", "chair", "--n", "1000000000"], ["--n must be"]),
        (["toys", "eval", "--n", "0"], ["--n must be"]),
        (["demo", "--explain", "-1"], ["--explain must be", "[0, 100,000]"]),
        (["train-toy", "llava", "--seed", "-3"], ["--seed must be"]),
        (["lens", "--k", "-3"], ["analysis logit_lens: k must be in [1, 1,000,000], not -3"]),
        (["knockout", "--window", "1000000000"], ["window = 1000000000 is over the ceiling"]),
        (["prune", "--ratios", "0.5,2"], ["analysis fastv: ratios must be in [0, 1]"]),
        (["prune", "--ratios", "half"], ["--ratios must be comma-separated numbers, not 'half'"]),
        (["prune", "--layers", "1.5"], ["--layers must be comma-separated integers"]),
        (["trace", "--noise", "-1"], ["noise must be >= 0, not -1.0"]),
        (
            ["lens", "--image", "x.png", "--prompt", "hi", "--box", "1,2,3"],
            ["--box must be four numbers x0,y0,x1,y1, not '1,2,3'"],
        ),
        (["ablate", "--image", "x.png", "--prompt", "hi", "--box", "a,b,c,d"], ["'a,b,c,d'"]),
        (
            ["ablate", "--image", "x.png", "--prompt", "hi", "--box", "9,0,3,4"],
            ["0 <= x0 < x1", "'9,0,3,4'"],
        ),
        (["lens", "--prompt", "what ?"], ["--prompt needs --image"]),
        (["neurons", "stats", "--set", "progress=maybe"], ["progress takes true or false"]),
        (
            ["neurons", "stats", "--set", "batch_size=1000000000"],
            ["study neuron_stats: batch_size must be in [1, 65,536], not 1000000000"],
        ),
        (["neurons", "stats", "--set", "top_k=-1"], ["top_k must be in [0, 1,000,000], not -1"]),
        (["probe", "--set", "layers=a,b"], ["--set layers='a,b': layers takes an integer"]),
        (["sae", "train", "--set", "epochs=1000000000"], ["epochs must be in [1, 1,000,000]"]),
        (["sae", "train", "--set", "lr=0"], ["lr must be > 0, not 0.0"]),
        (["neurons", "miner", "--set", "share=nan"], ["share must be a finite number"]),
        (["neurons", "stats", "--n", "-2"], ["--n must be"]),
        (["probe", "--seed", "-1"], ["--seed must be"]),
    ],
)
def test_settings_and_flags(args, needles, capsys, no_model):
    assert main(args) == 2
    _one_line(capsys, *needles)


def test_help_still_exits_0(capsys):
    assert main(["world", "sample", "--help"]) == 0
    assert "--size" in capsys.readouterr().out


# ----- data files --------------------------------------------------------------------------
def _bomb(folder):
    buf = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    struct.pack_into(">II", data, 16, 10_000, 10_000)
    struct.pack_into(">I", data, 29, zlib.crc32(bytes(data[12:29])))
    (folder / "bomb.png").write_bytes(bytes(data))


@pytest.fixture()
def data(tmp_path, image):
    _bomb(tmp_path)
    q = {"image": "scene.png", "question": "what color ?"}
    files = {
        "binary": b"\x00\x01\x02\x03 garbage\n",
        "latin1": '{"image": "scene.png", "question": "caf\xe9 ?"}\n'.encode("latin-1"),
        "bbox": json.dumps({**q, "bbox": ["a", "b", "c", "d"]}).encode(),
        "boxes": json.dumps({**q, "boxes": [[1, 2, 3]]}).encode(),
        "rle": json.dumps({**q, "mask_rle": {"size": [5, 5], "counts": [25]}}).encode(),
        "evidence": json.dumps(
            {
                "image": "scene.png",
                "objects": [{"bbox": [0, 0, 4, 4]}],
                "questions": [{"text": "what ?", "answer": "x", "evidence": [3]}],
            }
        ).encode(),
        "bomb": json.dumps({**q, "image": "bomb.png"}).encode(),
        "pope_bomb": json.dumps({"image": "bomb.png", "text": "a dog ?", "label": "yes"}).encode(),
        "pope_label": json.dumps({"image": "scene.png", "text": "a dog ?", "label": 1}).encode(),
    }
    for name, content in files.items():
        (tmp_path / f"{name}.jsonl").write_bytes(content)
    return tmp_path


@pytest.mark.parametrize(
    "command, name, needles",
    [
        (["bench"], "binary", ["binary.jsonl, line 1: binary data"]),
        (["bench"], "latin1", ["latin1.jsonl, line 1: not UTF-8 text"]),
        (["bench"], "bbox", ["bbox must be [x0, y0, x1, y1]", "['a', 'b', 'c', 'd']"]),
        (["bench"], "boxes", ["each of boxes must be", "[1, 2, 3]"]),
        (["bench"], "rle", ["mask_rle of size [5, 5] does not match the image [48, 48]"]),
        (["bench"], "evidence", ["evidence index 3 names no object (the image has 1)"]),
        (["bench"], "bomb", ["bomb.png has 100.0 megapixels, over the 50 MP limit"]),
        (["neurons", "stats"], "bbox", ["bbox.jsonl, line 1: bbox must be"]),
        (["neurons", "stats"], "bomb", ["over the 50 MP limit"]),
        (["eval", "pope"], "binary", ["binary.jsonl, line 1: binary data"]),
        (["eval", "pope"], "pope_bomb", ["pope_bomb.jsonl, line 1", "100.0 megapixels"]),
        (["eval", "pope"], "pope_label", ["label must be 'yes' or 'no', got 1"]),
    ],
)
def test_data_files(command, name, needles, data, capsys, no_model):
    assert (
        main(
            [*command, "--data", str(data / f"{name}.jsonl"), "--out", str(data / "o")]
            if command[0] != "eval"
            else [*command, "--data", str(data / f"{name}.jsonl")]
        )
        == 2
    )
    _one_line(capsys, *needles)
    assert not (data / "o").exists()


def test_allow_large_reaches_the_model(image, capsys, monkeypatch):
    """``--allow-large`` is honoured all the way: the loaded image is not refused again."""
    monkeypatch.setattr(images, "MAX_PIXELS", 100)  # the 48 x 48 image is "large" now
    assert main(["ask", "--image", image, "--prompt", "what color ?"]) == 2
    _one_line(capsys, "over the 0 MP limit", "--allow-large")
    args = ["ask", "--image", image, "--prompt", "what color ?", "--allow-large", "--json"]
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out)["answer"]


# ----- output paths ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "args",
    [
        ["explain", "--image", "x.png", "--prompt", "hi"],
        ["world", "sample", "--n", "2"],
        ["bench", "--n", "2"],
        ["lens"],
        ["neurons", "stats", "--n", "2"],
        ["demo"],
        ["train-toy", "clip"],
    ],
)
def test_an_out_that_is_a_file_is_refused_and_left_alone(args, tmp_path, capsys, no_model):
    taken = tmp_path / "taken"
    taken.write_text("my notes")
    assert main([*args, "--out", str(taken)]) == 2
    _one_line(capsys, "--out must be a folder that can be written", "is an existing file")
    assert main([*args, "--out", str(taken / "sub")]) == 2
    _one_line(capsys, "cannot be created", "is a file")
    assert taken.read_text() == "my notes" and sorted(tmp_path.iterdir()) == [taken]


# ----- models ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved(tmp_path_factory, tiny_llava):
    folder = tmp_path_factory.mktemp("llava")
    tiny_llava.model.save_pretrained(folder)
    tiny_llava.processor.save_pretrained(folder)
    return folder


def _broken(saved, tmp_path, kind: str):
    folder = tmp_path / kind
    shutil.copytree(saved, folder)
    if kind == "partial":
        tensors = load_file(folder / "model.safetensors")
        keep = sorted(tensors)[::2]
        save_file({k: tensors[k] for k in keep}, folder / "model.safetensors")
    elif kind == "sandbox":
        (folder / "chat_template.jinja").write_text("{{ ''.__class__.__base__ }}")
    elif kind in ("model_type", "auto_map"):
        config = json.loads((folder / "config.json").read_text())
        config["model_type"] = "zorblax"
        if kind == "auto_map":
            config["auto_map"] = {"AutoModel": "modeling_z.Z"}
            (folder / "modeling_z.py").write_text("raise SystemExit('ran the folder code')\n")
        (folder / "config.json").write_text(json.dumps(config))
    return str(folder)


@pytest.mark.parametrize(
    "kind, needles",
    [
        ("partial", ["do not fit its architecture", "missing from them", "random weights"]),
        ("sandbox", ["chat template", "sandbox forbids"]),
        ("model_type", ["model type 'zorblax', which is not known to transformers"]),
        ("auto_map", ["needs the folder's own code (auto_map)", "runs no code"]),
    ],
)
def test_broken_model_folders(kind, needles, saved, tmp_path, image, capsys):
    args = ["ask", "--model", _broken(saved, tmp_path, kind), "--image", image, "--prompt", "hi"]
    assert main(args) == 2
    _one_line(capsys, *needles)


def test_a_hub_id_offline_is_one_line_at_once(image, capsys, monkeypatch):
    from mmscope.models import hub

    monkeypatch.setattr(hub, "_offline", lambda: True)
    assert main(["ask", "--model", "owner/not-cached", "--image", image, "--prompt", "hi"]) == 2
    _one_line(capsys, "owner/not-cached is not in the local cache", "offline")


# ----- silent fallbacks are refused or said ------------------------------------------------
def test_an_unknown_target_word_is_refused_naming_it(image, tmp_path, capsys):
    out = str(tmp_path / "o")
    base = ["explain", "--image", image, "--prompt", "what color ?", "--method", "saliency"]
    assert main([*base, "--target", "zzqq", "--out", out]) == 2
    _one_line(capsys, "'zzqq' is not in the vocabulary of toy-llava", "<unk>")
    assert main([*base, "--target", "red zzqq circle", "--out", out]) == 2
    assert "'red'" not in _one_line(capsys, "'zzqq' is not in the vocabulary")
    assert main(["lens", "--n", "2", "--target", "blorf", "--out", out]) == 2
    _one_line(capsys, "'blorf' is not in the vocabulary")


def test_a_prompt_longer_than_the_context(image, tmp_path, capsys):
    long = "what " * 200
    assert main(["ask", "--image", image, "--prompt", long]) == 2
    _one_line(capsys, "the prompt is 200 tokens, longer than the 128-token context of toy-llava")
    fits_alone = "what color is the circle " + "red " * 100  # fits; with the image it does not
    args = ["explain", "--image", image, "--prompt", fits_alone, "--out", str(tmp_path / "o")]
    assert main(args) == 2
    _one_line(capsys, "prepared sequence is", "longer than the 128-token context")


def test_an_answer_running_past_the_context_is_shortened_with_one_warning(image, capsys):
    prompt = "what color is the circle " + "red " * 58
    args = ["ask", "--image", image, "--prompt", prompt, "--max-new-tokens", "40", "--json"]
    assert main(args) == 0
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mmscope: warning: generating ")
    assert "not 40" in lines[0] and "128-token context" in lines[0]
    assert "answer" in json.loads(captured.out)


# ----- progress output never comes before a refusal ----------------------------------------
def test_no_progress_bar_before_a_refusal(image, data, tmp_path, capsys):
    base = ["--verbose", "explain", "--image", image, "--prompt", "what color ?"]
    assert (
        main(
            [
                *base,
                "--method",
                "saliency,occlusion",
                "--target",
                "zzqq",
                "--out",
                str(tmp_path / "e"),
            ]
        )
        == 2
    )
    _one_line(capsys, "'zzqq'")
    assert (
        main(
            ["--verbose", "bench", "--data", str(data / "bbox.jsonl"), "--out", str(tmp_path / "b")]
        )
        == 2
    )
    _one_line(capsys, "bbox must be")
    assert (
        main(
            ["neurons", "stats", "--n", "2", "--set", "batch_size=0", "--out", str(tmp_path / "s")]
        )
        == 2
    )
    _one_line(capsys, "batch_size must be in [1, 65,536], not 0")
    long = "what color is the circle " + "red " * 100
    assert (
        main(
            [
                "--verbose",
                "explain",
                "--image",
                image,
                "--prompt",
                long,
                "--out",
                str(tmp_path / "e"),
            ]
        )
        == 2
    )
    _one_line(capsys, "longer than the 128-token context")


# ----- a few as a user runs them: a separate process, no traceback --------------------------
@pytest.mark.parametrize(
    "args, needle",
    [
        (
            ["ask", "--image", "x.png", "--prompt", "hi", "--max-new-tokens", "-1"],
            "--max-new-tokens",
        ),
        (["world", "sample", "--out", "{data}/w", "--box", "1"], "unrecognized arguments"),
        (["bench", "--data", "{data}/binary.jsonl", "--out", "{data}/o"], "binary data"),
        (
            ["explain", "--image", "x.png", "--prompt", "hi", "--out", "{data}/bbox.jsonl"],
            "is an existing file",
        ),
    ],
)
def test_as_a_separate_process(args, needle, data):
    args = [a.replace("{data}", str(data)) for a in args]
    out = subprocess.run(
        [sys.executable, "-m", "mmscope", *args], capture_output=True, text=True, timeout=300
    )
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1 and needle in lines[0], out.stderr
    assert "Traceback" not in out.stderr
