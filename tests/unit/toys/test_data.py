"""The training fast path must produce exactly what the saved processor produces."""

import numpy as np
import pytest
import torch

from mmscope.models.llava import LlavaVLM
from mmscope.toys import build
from mmscope.toys.data import SceneBank, Vocab, example, llava_batch, pixels
from mmscope.toys.train import Recipe, train_clip
from mmscope.world import DESCRIBE_PROMPT, render, sample_scenes


def test_pixels_equal_the_image_processor():
    scenes = sample_scenes(3, 11)
    images = [render(s, build.IMAGE_SIZE).image for s in scenes]
    ours = pixels(np.stack([np.asarray(im) for im in images]))
    theirs = build.llava_processor().image_processor(images, return_tensors="pt")["pixel_values"]
    assert torch.allclose(ours, theirs, atol=1e-6)


@pytest.mark.parametrize("question_first", [False, True])
def test_training_sequences_equal_what_the_processor_makes(scene_image, question_first):
    tok = build.toy_tokenizer()
    vocab = Vocab(tok)
    processor = build.llava_processor(question_first=question_first)
    vlm = LlavaVLM(build.build_llava(len(tok)), processor, "toy")
    for prompt, answer in [
        ("what color is the circle ?", "red"),
        (DESCRIBE_PROMPT, "a red circle"),
    ]:
        ids, labels = example(vocab, prompt, answer, question_first)
        inputs = vlm.prepare(scene_image, prompt)
        span = inputs.image_spans[0][0]
        start, end = inputs.prompt_spans[0]
        assert (start > span.start) is not question_first  # the prompt's side of the image
        assert inputs.prompt_tokens[0] == tuple(prompt.split())
        assert end - start == len(prompt.split())
        n_prompt = sum(label == -100 for label in labels)
        assert vlm.prepare(scene_image, prompt).input_ids[0].tolist() == ids[:n_prompt]
        assert tok.decode(ids[n_prompt:], skip_special_tokens=True) == answer
        assert ids[-1] == tok.eos_token_id and labels[n_prompt:] == ids[n_prompt:]


def test_batches_mask_everything_but_answers():
    bank = SceneBank.sample(8, 5)
    batch = llava_batch(bank, Vocab(build.toy_tokenizer()), np.random.default_rng(0), 8)
    assert batch["pixel_values"].shape == (8, 3, 48, 48)
    answer = batch["labels"] != -100
    assert torch.all(batch["attention_mask"][answer] == 1)
    assert torch.all(batch["labels"][answer] == batch["input_ids"][answer])
    assert torch.all(answer[:, : 1 + build.NUM_IMAGE_TOKENS] == 0)


def test_clip_training_is_reproducible():
    bank = SceneBank.sample(64, 3)
    recipe = Recipe(clip_steps=3, clip_batch=16, warmup=1)
    a = train_clip(recipe, bank).state_dict()
    b = train_clip(recipe, bank).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_shape_twins_differ_by_one_shape_word():
    from mmscope.toys.data import shape_twin
    from mmscope.world import caption

    rng = np.random.default_rng(0)
    for scene in sample_scenes(200, 8):
        twin = shape_twin(scene, rng)
        ours, theirs = caption(scene).split(), caption(twin).split()
        changed = [(a, b) for a, b in zip(ours, theirs) if a != b]
        assert len(ours) == len(theirs) and len(changed) == 1
        assert {changed[0][0], changed[0][1]} <= {"circle", "square", "triangle", "cross"}
        assert [o.slot for o in twin.objects] == [o.slot for o in scene.objects]
        assert len({o.combo for o in twin.objects}) == len(twin.objects)


def test_clip_batches_pair_scenes_with_their_twins():
    from mmscope.toys.data import clip_batch

    bank = SceneBank.sample(32, 4)
    batch = clip_batch(bank, Vocab(build.toy_tokenizer(for_clip=True)), np.random.default_rng(1), 8)
    ids = batch["input_ids"]
    for i in range(4):  # item i and item i + 4 are a scene and its twin: one word apart
        assert int((ids[i] != ids[i + 4]).sum()) == 1


def test_per_example_loss_weighs_every_example_equally():
    from mmscope.toys.train import _per_example_loss

    vocab = 5
    logits = torch.zeros(2, 4, vocab)  # uniform: every token costs log(5)
    logits[0, 1, 3] = 100.0  # example 0's only answer token (position 2) is predicted
    labels = torch.tensor([[-100, -100, 3, -100], [-100, 1, 2, 4]])
    # example 0 costs 0, example 1 costs log 5 on each of its 3 tokens: mean of the two
    expected = 0.5 * float(torch.log(torch.tensor(5.0)))
    assert float(_per_example_loss(logits, labels)) == pytest.approx(expected, abs=1e-5)


def test_train_toy_llava_starts_from_the_toy_clip_in_out_and_records_it(tmp_path):
    import json

    from mmscope.toys.train import train_toys, weights_sha256

    recipe = Recipe(
        bank_size=32, clip_steps=2, clip_batch=8, llava_steps=2, llava_batch=4, warmup=1
    )
    clip_dir = train_toys("clip", tmp_path, recipe)["toy-clip"]
    assert not (tmp_path / "toy-llava").exists()
    llava_dir = train_toys("llava", tmp_path, recipe)["toy-llava"]
    info = json.loads((llava_dir / "training.json").read_text())
    assert info["vision_from"]["sha256"] == weights_sha256(clip_dir)
    assert info["recipe"]["question_first"] is True and info["seconds"] > 0
    # its vision tower starts from that toy-clip: after 2 steps at 0.2x the rate it is close
    from safetensors.torch import load_file

    clip = load_file(clip_dir / "model.safetensors")
    llava = load_file(llava_dir / "model.safetensors")
    key = "vision_model.embeddings.patch_embedding.weight"
    ours = next(v for k, v in llava.items() if k.endswith(key.split("vision_model.")[1]))
    assert torch.allclose(ours, clip[key], atol=2e-3)  # weights have std 0.04
    # and its processor puts the question first
    template = (llava_dir / "chat_template.jinja").read_text()
    assert template.index("'text'") < template.index("<image>")
