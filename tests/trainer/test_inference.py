"""trainer.load on a text model: the checkpoint alone is enough (the training data is
deleted first); generation is reproducible; evaluation reproduces training's last
valid/loss; step carries state exactly; memory stays flat in the evaluated file's length;
checkpoints from before the inference section say so."""

from __future__ import annotations

import io
import json
import shutil
import tracemalloc

import pytest
import torch

import trainer
from tests.trainer.usage import recall_config, run_cli, text, text_config, train
from trainer import checkpoint as ckpt
from trainer import filedata
from trainer.artifact import ArtifactError
from trainer.data import load_data
from trainer.config import parse_config
from trainer.inference import MAX_TOKENS
from trainer.loop import fit
from trainer.reporting import FileReporter, latest_checkpoint


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A char LSTM trained on generated text; then its data files are gone."""
    folder = tmp_path_factory.mktemp("text")
    config = text_config(folder)
    data = load_data(parse_config(config).data, 0)
    path, last = train(folder, config)
    kept = folder / "kept-valid.txt"
    shutil.copy(folder / "valid.txt", kept)
    (folder / "train.txt").unlink()
    (folder / "valid.txt").unlink()
    return {"path": path, "run": path.parent.parent, "last": last, "valid": kept, "vocab": data.vocab, "folder": folder}


@pytest.fixture(scope="module")
def model(trained):
    return trainer.load(trained["run"])  # a run folder: its latest checkpoint


def test_the_checkpoint_holds_what_inference_needs(trained):
    state = torch.load(io.BytesIO(trained["path"].read_bytes()), weights_only=True)  # plain types only
    assert state["format"] == ckpt.FORMAT == 2
    section = state["inference"]
    assert section["kind"] == "text" and section["version"] == 1
    assert section["tokenizer"]["vocab"] == trained["vocab"] and section["tokenizer"]["kind"] == "char"
    assert section["tokenizer"]["vocab"][0] == section["tokenizer"]["unknown"] == "<unk>"
    assert section["task"]["classes"] == len(trained["vocab"]) and "next character" in section["predicts"]


def test_generate_is_reproducible_and_names_unknown_characters(model):
    first = model.generate("the cat Zat", max_tokens=60, temperature=0.8, top_k=5, seed=7)
    again = model.generate("the cat Zat", max_tokens=60, temperature=0.8, top_k=5, seed=7)
    assert first == again
    assert len(first.tokens) == 60 and first.text == "".join(first.tokens)  # characters: the text is the tokens
    assert first.unknown == ["Z"]  # read as <unk>, and said so
    assert set(first.tokens) <= set(model.vocab)
    streamed = model.stream("the cat Zat", max_tokens=60, temperature=0.8, top_k=5, seed=7)
    assert streamed.unknown == ["Z"]
    assert "".join(streamed) == first.text
    flat = model.generate("the ", max_tokens=300, temperature=5.0, seed=1)  # nearly uniform over the vocabulary
    assert "<unk>" not in flat.tokens and "<unk>" not in flat.text  # no character: never generated
    greedy = model.generate("the ", max_tokens=20, temperature=0)
    assert greedy == model.generate("the ", max_tokens=20, temperature=0, seed=99)  # no sampling at 0


def test_generate_batch_samples_every_prompt_as_generate_would(model):
    """Prompts of different lengths, sampled together as one batch of streams: greedy, each
    continuation is the one generate gives alone; sampled, each respects top_k."""
    prompts = ["the ", "a cat sat on the mat\n", "Zz"]
    together = model.generate_batch(prompts, max_tokens=30, temperature=0)
    assert [g.text for g in together] == [model.generate(p, 30, temperature=0).text for p in prompts]
    assert together[2].unknown == model.generate("Zz", 1).unknown and "Z" in together[2].unknown
    sampled = model.generate_batch(prompts, max_tokens=30, temperature=1.0, top_k=1, seed=3)
    assert [g.text for g in sampled] == [g.text for g in together]  # top 1 is the likeliest
    assert model.generate_batch(prompts, 30, seed=4) == model.generate_batch(prompts, 30, seed=4)
    for bad in ([], "the ", ["ok", ""]):
        with pytest.raises(ValueError, match="prompt"):
            model.generate_batch(bad, 5)


def test_evaluate_reproduces_the_last_validation_loss(model, trained):
    result = model.evaluate(trained["valid"])  # the job's own settings: data.batch_size streams
    assert result["loss"] == pytest.approx(trained["last"]["valid/loss"], abs=1e-6)
    assert result["bpc"] == pytest.approx(trained["last"]["valid/bpc"], abs=1e-6)
    assert result["ppl"] == pytest.approx(trained["last"]["valid/ppl"], rel=1e-6)


def test_step_over_a_file_in_50_chunks_equals_one_pass(model, trained):
    ids, unknown = model.encode(trained["valid"].read_text())
    assert unknown == []
    whole, whole_state = model.step(ids)
    assert whole.shape == (len(ids), len(model.vocab))
    outputs, state = [], None
    for chunk in torch.tensor(ids).chunk(50):
        out, state = model.step(chunk, state)
        outputs.append(out)
    torch.testing.assert_close(torch.cat(outputs), whole, rtol=0, atol=1e-6)
    for name in ("h", "c"):
        torch.testing.assert_close(state[name], whole_state[name], rtol=0, atol=1e-6)


def test_evaluate_reads_the_file_as_it_goes(model, tmp_path, monkeypatch):
    """Peak Python memory (token lists, arrays) does not grow with the file's length."""
    monkeypatch.setattr(filedata, "BLOCK_CHARS", 4096)  # many blocks in a small file

    def peak(documents: int) -> tuple[int, int]:
        path = tmp_path / f"eval-{documents}.txt"
        path.write_text(text(documents, seed=documents))
        tracemalloc.start()
        try:
            result = model.evaluate(path, batch_size=32)
            used = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert result["loss"] > 0 and result["streams"] == 32
        return used, path.stat().st_size

    # Both long enough for full evaluation windows (32 streams of > 512 steps) and many blocks.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a long sequential run: on a busy machine, threads only wait
    try:
        small, small_bytes = peak(500)
        large, large_bytes = peak(5000)
    finally:
        torch.set_num_threads(threads)
    assert large_bytes > 8 * small_bytes
    assert large < 1.2 * small + 64 * 1024, (small, large)


def test_bad_input_is_a_value_error_naming_it(model):
    cases = [
        (lambda: model.generate("", 10), "prompt"),
        (lambda: model.generate("the", MAX_TOKENS + 1), "max_tokens"),
        (lambda: model.generate("the", 10, temperature=-1), "temperature"),
        (lambda: model.generate("the", 10, top_k=0), "top_k"),
        (lambda: model.predict([[1.0]], 3), "predict: needs a timeseries model"),
        (lambda: model.step([len(model.vocab)]), "inputs"),
        (lambda: model.step([[]]), "inputs"),  # steps of no streams: nothing to check the ids of
        (lambda: model.step([-1, 3]), "inputs"),
        (lambda: model.step([1, 2], {"h": torch.zeros(1, 1, 16)}), "state"),
        (lambda: model.step([1, 2], {"h": torch.zeros(1, 2, 16), "c": torch.zeros(1, 1, 16)}), "state.h"),
    ]
    for call, name in cases:
        with pytest.raises(ValueError, match=name):
            call()


def test_checkpoints_without_the_inference_section_say_so(trained, tmp_path):
    state = ckpt.load(trained["path"])
    del state["inference"]
    state["format"] = 1
    ckpt.save(tmp_path / "old.pt", state)
    with pytest.raises(ArtifactError, match="format 1 has no inference section"):
        trainer.load(tmp_path / "old.pt")
    with pytest.raises(FileNotFoundError):
        trainer.load(tmp_path / "missing.pt")


def test_a_format_1_checkpoint_resumes_and_its_next_checkpoint_has_the_section(tmp_path):
    config = recall_config("gru")
    fit(config, [FileReporter(tmp_path / "a")])
    old = ckpt.load(latest_checkpoint(tmp_path / "a"))
    del old["inference"]
    old["format"] = 1
    config["train"]["max_steps"] = 4
    fit(config, [FileReporter(tmp_path / "b")], resume=old)
    model = trainer.load(tmp_path / "b")
    assert model.kind == "recall" and model.artifact.step == 4


def test_a_word_model(tmp_path):
    config = text_config(tmp_path, tokenizer="word")
    config["train"]["max_steps"] = 10
    path, last = train(tmp_path, config)
    model = trainer.load(path)
    assert model.vocab[:1] == ["<unk>"] and "<eos>" in model.vocab
    assert model.evaluate(tmp_path / "valid.txt")["loss"] == pytest.approx(last["valid/loss"], abs=1e-6)
    out = model.generate("the zebra sat\non", max_tokens=30, seed=1)
    assert out.unknown == ["zebra"]
    assert out.text.startswith(" ") or out.tokens[0] == "<eos>"  # continues the line "on"
    assert out.text.count("\n") == out.tokens.count("<eos>")


def test_the_command_line(trained, model, capsys):
    run = str(trained["run"])
    assert run_cli(["generate", run, "--prompt", "the Zat", "-n", "40", "--seed", "3", "--top-k", "4"]) == 0
    printed = capsys.readouterr()
    assert printed.out == "the Zat" + model.generate("the Zat", 40, top_k=4, seed=3).text + "\n"
    assert "'Z'" in printed.err  # the unknown character is named

    assert run_cli(["evaluate", run, "--data", str(trained["valid"]), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["loss"] == pytest.approx(trained["last"]["valid/loss"], abs=1e-6)

    assert run_cli(["generate", run, "--prompt", "the", "-n", "0"]) == 2
    assert "max_tokens" in capsys.readouterr().err
    assert run_cli(["evaluate", str(trained["folder"] / "nothing-here"), "--data", str(trained["valid"])]) == 2


def test_the_unroll_command_has_the_commands():
    from service.cli.main import build_parser

    parser = build_parser(with_train=False)
    for argv in (["generate", "runs/x", "--prompt", "a"], ["predict", "m.pt", "--csv", "f.csv", "--horizon", "24"],
                 ["evaluate", "m.pt", "--data", "f.txt", "--json"], ["export", "m.pt", "--format", "onnx", "--out", "m.onnx"]):
        assert callable(parser.parse_args(argv).func)


def test_a_recall_model_evaluates_a_file_of_token_ids(tmp_path):
    config = recall_config("lstm")
    config["data"]["valid_length"] = 1200  # evaluation windows of 512 steps: the lag crosses them
    path, last = train(tmp_path, config)
    data = load_data(parse_config(config).data, 0)
    tokens = data.valid.window(0, data.valid.length).inputs  # (steps, streams)
    ids = tmp_path / "valid-ids.txt"
    ids.write_text("\n".join(" ".join(map(str, stream.tolist())) for stream in tokens.t()))  # stream after stream
    result = trainer.load(path).evaluate(ids)
    assert result["streams"] == data.valid.batch_size
    assert result["loss"] == pytest.approx(last["valid/loss"], abs=1e-6)
    assert result["accuracy"] == pytest.approx(last["valid/accuracy"], abs=1e-9)


def test_sampling_never_fails_when_unk_takes_all_the_mass():
    """At a low temperature the softmax can put all its weight on <unk>: with <unk> left out
    of the draw, the other tokens are still sampled (a zero-weight draw used to raise)."""
    from trainer.inference import _pick

    logits = torch.tensor([[100.0, 0.0, -1.0], [100.0, -3.0, 0.0]])
    picked = _pick(logits, 0.01, None, torch.Generator().manual_seed(0))
    assert picked.tolist() == [1, 2]
