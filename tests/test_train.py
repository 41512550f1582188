"""`prefix-serve train`: data checks, learning, and train/serve consistency against a real server."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from safetensors import safe_open
from transformers import AutoTokenizer, FalconConfig, FalconForCausalLM

from clients.client import Client
from clients.train import ARTIFACT_NAME, TrainOptions, train
from clients.training_data import IGNORE_INDEX, Example, TrainingDataError, read_examples, tokenize_example
from prefix_store.artifact import read_metadata
from server.api.app import create_app
from server.cli import main
from server.config import ServeConfig
from server.model_loading import LoadedModel, load_model
from tests.conftest import SMOL_VOCAB
from tests.live_server import serve_in_thread
from tests.tiny_models import oracle_greedy

PAIRS = [
    {"prompt": "name[The Eagle], food[French] =>", "completion": " The Eagle serves French food."},
    {"prompt": "name[Aromi], food[Italian] =>", "completion": " Aromi serves Italian food."},
    {"prompt": "name[Zizzi], food[Indian] =>", "completion": " Zizzi serves Indian food."},
    {"prompt": "name[Bibimbap], food[Chinese] =>", "completion": " Bibimbap serves Chinese food."},
]


def write_jsonl(path: Path, rows: list[object]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def loaded(tiny_model_dir: Path) -> LoadedModel:
    return load_model(str(tiny_model_dir))


@pytest.fixture(scope="module")
def server_url(loaded: LoadedModel, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("train-server")
    config = ServeConfig(store=f"disk://{root / 'store'}", max_new_tokens=32, max_prompt_tokens=200)
    with serve_in_thread(create_app(config, model=loaded)) as url:
        yield url


@pytest.mark.parametrize(
    ("line", "words"),
    [
        ("{not json", "not valid JSON"),
        ('["a list"]', "expected a JSON object"),
        ('{"prompt": "x"}', "'completion' must be a string, got missing"),
        ('{"prompt": "x", "completion": 3}', "'completion' must be a string, got int"),
        ('{"prompt": "x", "completion": ""}', "'completion' is empty"),
        ('{"prompt": "x", "completion": "y", "label": 1}', "unexpected keys ['label']"),
        ('{"messages": [{"role": "robot", "content": "hi"}]}', "role must be one of"),
        ('{"messages": [{"role": "user", "content": "hi"}]}', "no assistant message"),
    ],
)
def test_malformed_line_is_reported_before_training(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], line: str, words: str
) -> None:
    data = write_jsonl(tmp_path / "data.jsonl", [PAIRS[0], "", PAIRS[1], line, PAIRS[2]])
    out = tmp_path / "out"
    # --model points nowhere: the data must be rejected before any model is looked for.
    code = main(["train", str(data), "--output", str(out), "--model", str(tmp_path / "no-model")])
    err = capsys.readouterr().err
    assert code == 1 and len(err.splitlines()) == 1, err
    assert err.startswith(f"error: {data} line 4: ") and words in err, err
    assert not out.exists()


def test_bad_options_and_missing_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = write_jsonl(tmp_path / "data.jsonl", PAIRS)
    cases = [
        (["--steps", "0"], "--steps must be at least 1"),
        (["--init-text", " "], "--init-text is empty"),
        (["--device", "bogus"], "--device 'bogus'"),
        (["--task-id", "../x"], "invalid task id"),
        (["--model", str(tmp_path / "missing.gguf")], "GGUF file not found"),
        # Found before training, not after it (the whole run was lost).
        (["--output", str(data / "out")], f"--output {data / 'out'} cannot be written: {data} is not"),
    ]
    for extra, words in cases:
        code = main(["train", str(data), "--output", str(tmp_path / "out"), *extra])
        err = capsys.readouterr().err
        assert code == 1 and err.startswith("error: ") and words in err and len(err.splitlines()) == 1, err


def test_what_cannot_be_trained_or_stored_is_refused_clearly(
    tiny_model_dir: Path, smol_tokenizer_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An example that with the prefix overflows the model's context (GPT-2's position table: an IndexError mid-run;
    RoPE: positions the server would refuse), a prefix too large for --artifact-dtype float16 (it wrote infinities
    and exited 0), a model whose caches PEFT lays out wrongly (Falcon's one KV head: a RuntimeError): one line each."""
    falcon_dir = tmp_path / "falcon"
    config = FalconConfig(
        vocab_size=SMOL_VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, multi_query=True,
        new_decoder_architecture=False, parallel_attn=True, alibi=False, max_position_embeddings=512,
    )  # fmt: skip
    FalconForCausalLM(config).save_pretrained(falcon_dir)
    AutoTokenizer.from_pretrained(smol_tokenizer_dir).save_pretrained(falcon_dir)
    data = write_jsonl(tmp_path / "data.jsonl", PAIRS)
    long = write_jsonl(tmp_path / "long.jsonl", [PAIRS[0], {"prompt": "x", "completion": " word" * 505}])
    cases = [
        ([str(long), "--model", str(tiny_model_dir)], f"{long} line 2: 507 tokens after the 10-token prefix exceed"),
        (
            [str(data), "--model", str(tiny_model_dir), "--artifact-dtype", "float16", "--lr", "30000"],
            "overflow --artifact-dtype float16",
        ),
        ([str(data), "--model", str(falcon_dir)], "PEFT cannot train a prefix for it"),
    ]
    for args, words in cases:
        out = tmp_path / "out"
        code = main(["train", *args, "--output", str(out), "--steps", "5", "--batch-size", "4", "--no-progress"])
        last = capsys.readouterr().err.strip().splitlines()[-1]  # after the model's loading bar
        assert code == 1 and last.startswith("error: ") and words in last, last
        assert not (out / ARTIFACT_NAME).exists()


def test_labels_cover_completion_and_assistant_turns(loaded: LoadedModel) -> None:
    tokenizer, eos = loaded.tokenizer, loaded.eos_token_ids[0]
    pair = tokenize_example(Example(line=1, prompt="Q: 2+2?", completion=" 4"), tokenizer, eos)
    prompt_ids = tokenizer("Q: 2+2?").input_ids
    assert pair.input_ids == [*prompt_ids, *tokenizer(" 4", add_special_tokens=False).input_ids, eos]
    assert pair.labels[: len(prompt_ids)] == [IGNORE_INDEX] * len(prompt_ids)
    assert pair.labels[len(prompt_ids) :] == pair.input_ids[len(prompt_ids) :]

    # A tool's answer in the history is context, rendered by the chat template like any other turn.
    with_tool = (
        {"role": "user", "content": "time?"},
        {"role": "assistant", "content": "<tool_call>now</tool_call>"},
        {"role": "tool", "content": "noon"},
        {"role": "assistant", "content": "It is noon."},
    )
    tooled = tokenize_example(Example(line=1, messages=with_tool), tokenizer, eos)
    assert tokenizer.decode(tooled.input_ids) == tokenizer.apply_chat_template(list(with_tool), tokenize=False)
    learned = tokenizer.decode([t for t, label in zip(tooled.input_ids, tooled.labels, strict=True) if label >= 0])
    assert learned == "<tool_call>now</tool_call><|im_end|>\nIt is noon.<|im_end|>\n"

    messages = ({"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"})
    chat = tokenize_example(Example(line=1, messages=messages * 2), tokenizer, eos)
    full = tokenizer.apply_chat_template(list(messages * 2), tokenize=False)
    assert tokenizer.decode(chat.input_ids) == full
    learned = tokenizer.decode([t for t, label in zip(chat.input_ids, chat.labels, strict=True) if label >= 0])
    assert learned == "yo<|im_end|>\nyo<|im_end|>\n"
    # What the server feeds for the first turn is exactly the unlabelled context before it.
    context = tokenizer.apply_chat_template(list(messages[:1]), tokenize=False, add_generation_prompt=True)
    assert chat.input_ids[: chat.labels.index(next(x for x in chat.labels if x >= 0))] == (
        tokenizer(context, add_special_tokens=False).input_ids
    )


def test_read_examples_reports_missing_file(tmp_path: Path) -> None:
    with pytest.raises(TrainingDataError, match="no such file"):
        read_examples(tmp_path / "nope.jsonl")


def test_loss_goes_down(tiny_model_dir: Path, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "data.jsonl", [{"prompt": f"item {i}:", "completion": " ok ok ok"} for i in range(8)])
    options = TrainOptions(
        data=str(data), output=str(tmp_path / "out"), model=str(tiny_model_dir), steps=12, lr=0.1, batch_size=4
    )
    options.progress = False
    result = train(options, log=lambda _: None)
    # A random 2-layer model's logits are mostly its embeddings', so a prefix moves them by about a nat, not more.
    first, last = result.train_losses[0], sum(result.train_losses[-3:]) / 3
    assert result.steps == 12 and last < first - 0.5, result.train_losses
    assert all(b < a for a, b in zip(result.train_losses[:4], result.train_losses[1:5], strict=True))


def test_trained_prefix_served_equals_peft_forward(
    tiny_model_dir: Path, loaded: LoadedModel, server_url: str, tmp_path: Path
) -> None:
    data = write_jsonl(tmp_path / "train.jsonl", PAIRS)
    dev = write_jsonl(tmp_path / "dev.jsonl", PAIRS[:2])
    options = TrainOptions(
        data=str(data),
        eval=str(dev),
        output=str(tmp_path / "table"),
        model=str(tiny_model_dir),
        num_virtual_tokens=5,
        epochs=3,
        batch_size=2,
        lr=0.05,
        seed=3,
    )
    options.progress = False
    result = train(options, log=lambda _: None)
    assert result.task_id == "table" and len(result.eval_losses) == 3
    assert {p.name for p in result.output.iterdir()} >= {"adapter_config.json", "adapter_model.safetensors"}
    meta = read_metadata(result.artifact.read_bytes())
    assert meta.fingerprint == loaded.fingerprint and meta.num_virtual_tokens == 5 and meta.dtype == "float32"

    with Client(server_url) as client:
        client.upload_prefix("native", result.artifact)
        client.upload_prefix("peft", result.output)
        for prompt in ("name[Aromi], food[Indian] =>", "Hello"):
            want, _ = oracle_greedy(result.peft_model, loaded.tokenizer(prompt).input_ids, 12)
            for task in ("native", "peft"):
                got = client.generate(prompt, task_id=task, max_new_tokens=12).token_ids
                assert got == want[: len(got)] and (len(got) == 12 or got[-1] in loaded.eos_token_ids), (task, prompt)


def test_cli_trains_and_uploads(
    tiny_model_dir: Path, server_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = write_jsonl(tmp_path / "data.jsonl", PAIRS)
    out = tmp_path / "ckpt"
    argv = ["train", str(data), "--model", str(tiny_model_dir), "--output", str(out), "--steps", "2", "-p", "3"]
    argv += ["--prefix-projection", "--encoder-hidden-size", "16", "--artifact-dtype", "float16"]
    code = main([*argv, "--task-id", "cli-trained", "--upload", server_url, "--json", "--no-progress"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    summary = json.loads(captured.out)
    assert summary["steps"] == 2 and summary["uploaded"]["task_id"] == "cli-trained"
    assert summary["uploaded"]["num_virtual_tokens"] == 3 and summary["uploaded"]["dtype"] == "float16"
    with safe_open(str(out / ARTIFACT_NAME), "pt") as f:
        assert f.get_tensor("layers.0.key").shape == (2, 3, 16)  # [H_kv, P, d]: only the MLP's output is kept
    with Client(server_url) as client:
        assert client.get_prefix("cli-trained").version == summary["uploaded"]["version"]


def test_cli_refuses_before_training_a_prefix_the_server_would_refuse(
    tiny_model_dir: Path, server_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The server takes prefixes of at most its context minus 2 (510 here): asked for more with --upload, train says
    so before it loads the model or trains, not after."""
    data = write_jsonl(tmp_path / "data.jsonl", PAIRS)
    out = tmp_path / "ckpt"
    argv = ["train", str(data), "--model", str(tiny_model_dir), "--output", str(out), "--steps", "2", "-p", "511"]
    assert main([*argv, "--upload", server_url, "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "at most 510 virtual tokens" in err and "nothing was trained" in err
    assert not out.exists()
    with Client(server_url) as client:
        (base,) = [card for card in client.models() if card["parent"] is None]
        assert base["max_prefix_tokens"] == 510 and base["max_model_len"] == 512
