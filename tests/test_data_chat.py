"""Chat data and datasets files (issue: data users actually have): chat JSONL (messages and ShareGPT) with
only the assistant turns learned, .parquet/.arrow/save_to_disk rows read like JSONL records, their one-line
errors, and a chunkft-run on chat data under a padded plan."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner

from chunkft.executor.cli import main as run_main
from chunkft.executor.data import IGNORE_INDEX, ByteTokenizer, DataError, HFTokenizer, TokenData, load_dataset
from chunkft.planner.cli import main as plan_main

BYTES = ByteTokenizer()
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hello there"},
    {"role": "assistant", "content": "Hi! How are you?"},
    {"role": "user", "content": "I am fine, thank you."},
    {"role": "assistant", "content": "Good to hear."},
]
ASSISTANT = [m["content"] for m in CONVERSATION if m["role"] == "assistant"]
SHAREGPT_ROLE = {"system": "system", "user": "human", "assistant": "gpt"}


def conversations(n: int) -> list[list[dict[str, str]]]:
    """CONVERSATION, then n - 1 variations of it (so a file holds enough rows to split)."""
    out = [CONVERSATION]
    for i in range(1, n):
        out.append([{**m, "content": f"{m['content']} ({i})"} for m in CONVERSATION])
    return out


def sharegpt(conv: list[dict[str, str]]) -> list[dict[str, str]]:
    return [{"from": SHAREGPT_ROLE[m["role"]], "value": m["content"]} for m in conv]


def plain_ids(conv: list[dict[str, str]]) -> list[int]:
    """The documented plain template with the byte tokenizer: <|role|>\\n content, "\\n" after a system or
    user turn, the eos id after an assistant one."""
    ids: list[int] = []
    for m in conv:
        ids += BYTES.encode(f"<|{m['role']}|>\n{m['content']}")
        ids += [BYTES.eos_id] if m["role"] == "assistant" else BYTES.encode("\n")
    return ids


def write_jsonl(path: Path, records: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def learned_runs(ids: torch.Tensor, labels: torch.Tensor) -> list[list[int]]:
    """The contiguous runs of learned positions, as their ids; labels equal ids wherever learned."""
    learned = labels.ne(IGNORE_INDEX)
    assert torch.equal(labels[learned], ids[learned])
    runs: list[list[int]] = []
    for i in range(len(ids)):
        if learned[i]:
            if i == 0 or not learned[i - 1]:
                runs.append([])
            runs[-1].append(int(ids[i]))
    return runs


def same(a: TokenData, b: TokenData) -> bool:
    return all(torch.equal(getattr(a, f), getattr(b, f)) for f in ("input_ids", "attention_mask", "labels"))


# ------------------------------------------------------------------------- the byte tokenizer's template


def test_byte_tokenizer_chat_learns_exactly_the_assistant_contents_and_eos(tmp_path: Path) -> None:
    f = write_jsonl(tmp_path / "chat.jsonl", [{"messages": c} for c in conversations(4)])
    ds = load_dataset(f, BYTES, task="causal-lm", seq_len=160)
    assert ds.format == "chat" and (len(ds.train), len(ds.eval)) == (3, 1) and ds.notes == ()
    ids, labels, mask = ds.train.input_ids[0], ds.train.labels[0], ds.train.attention_mask[0]
    want = plain_ids(CONVERSATION)
    text = (
        "<|system|>\nBe brief.\n<|user|>\nHello there\n<|assistant|>\nHi! How are you?<eos>"
        "<|user|>\nI am fine, thank you.\n<|assistant|>\nGood to hear.<eos>"
    )
    assert want == [BYTES.eos_id if i == 0 else i for i in text.replace("<eos>", "\0").encode()]
    n = len(want)
    assert ids[:n].tolist() == want
    assert ids[n:].eq(BYTES.pad_id).all() and mask[:n].eq(1).all() and mask[n:].eq(0).all()
    assert labels[n:].eq(IGNORE_INDEX).all()
    runs = learned_runs(ids, labels)
    assert runs == [BYTES.encode(t) + [BYTES.eos_id] for t in ASSISTANT]
    assert [BYTES.decode(r) for r in runs] == ASSISTANT


def test_a_hugging_face_tokenizer_without_a_template_uses_the_plain_one(tmp_path: Path) -> None:
    """The byte tokenizer saved as a Hugging Face one has no chat template: the same ids as ByteTokenizer."""
    (tmp_path / "tok").mkdir()
    BYTES.save(tmp_path / "tok")
    tok = HFTokenizer(tmp_path / "tok")
    assert not tok.hf.chat_template
    f = write_jsonl(tmp_path / "chat.jsonl", [{"messages": c} for c in conversations(4)])
    a, b = (load_dataset(f, t, task="causal-lm", seq_len=160) for t in (BYTES, tok))
    assert same(a.train, b.train) and same(a.eval, b.eval)


# ------------------------------------------------------------------ a Hugging Face tokenizer's template

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LLAMA3 = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
TEMPLATES = {  # name: (template, end-of-turn token, special tokens of the config)
    "chatml": (CHATML, "<|im_end|>", {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}),
    "llama3": (
        LLAMA3,
        "<|eot_id|>",
        {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "pad_token": "<|end_of_text|>"},
    ),
}
SPECIALS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>",
    "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
]  # fmt: skip


@pytest.fixture(scope="module")
def bpe_json(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny byte-level BPE with real merges (so tokens cross word and role boundaries), trained here."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=420,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = [" ".join(m["content"] for m in c) + " system user assistant" for c in conversations(8)]
    tok.train_from_iterator(corpus * 10, trainer)
    path = tmp_path_factory.mktemp("bpe") / "tokenizer.json"
    tok.save(str(path))
    return path


def templated(directory: Path, bpe_json: Path, name: str) -> HFTokenizer:
    template, _, specials = TEMPLATES[name]
    directory.mkdir()
    shutil.copy(bpe_json, directory / "tokenizer.json")
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "chat_template": template, **specials}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return HFTokenizer(directory)


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_chat_template_rows_learn_only_the_assistant_turns(tmp_path: Path, bpe_json: Path, name: str) -> None:
    tok = templated(tmp_path / name, bpe_json, name)
    end = TEMPLATES[name][1]
    f = write_jsonl(tmp_path / "chat.jsonl", [{"messages": c} for c in conversations(4)])
    ds = load_dataset(f, tok, task="causal-lm", seq_len=128)
    assert ds.format == "chat"
    ids, labels, mask = ds.train.input_ids[0], ds.train.labels[0], ds.train.attention_mask[0]
    rendered = tok.hf.apply_chat_template(CONVERSATION, tokenize=True)
    rendered = list(rendered["input_ids"] if not isinstance(rendered, list) else rendered)
    n = len(rendered)
    assert ids[:n].tolist() == rendered and mask[:n].eq(1).all() and mask[n:].eq(0).all()
    assert ids[n:].eq(tok.pad_id).all() and labels[n:].eq(IGNORE_INDEX).all()
    runs = learned_runs(ids, labels)
    assert [tok.hf.decode(r, skip_special_tokens=False) for r in runs] == [t + end for t in ASSISTANT]
    end_id = tok.hf.convert_tokens_to_ids(end)
    assert all(r[-1] == end_id for r in runs)
    # every other token (the system and user turns, every role header, the "\n" after <|im_end|>) is not
    learned = sum(len(r) for r in runs)
    assert int(labels.ne(IGNORE_INDEX).sum()) == learned < n


CHATML_GENERATION = CHATML.replace(
    "{{ m['content'] }}<|im_end|>",
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}<|im_end|>{% endgeneration %}"
    "{% else %}{{ m['content'] }}<|im_end|>{% endif %}",
)


def test_the_prefix_diff_agrees_with_a_templates_own_generation_mask(tmp_path: Path, bpe_json: Path) -> None:
    """Where a template marks its assistant text with {% generation %}, transformers' assistant mask and
    chunkft's prefix-by-prefix spans pick the same tokens."""
    tok = templated(tmp_path / "gen", bpe_json, "chatml")
    tok.hf.chat_template = CHATML_GENERATION
    f = write_jsonl(tmp_path / "chat.jsonl", [{"messages": c} for c in conversations(4)])
    ds = load_dataset(f, tok, task="causal-lm", seq_len=128)
    own = tok.hf.apply_chat_template(
        CONVERSATION, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    n = len(own["input_ids"])
    assert ds.train.input_ids[0, :n].tolist() == list(own["input_ids"])
    assert ds.train.labels[0, :n].ne(IGNORE_INDEX).tolist() == [bool(m) for m in own["assistant_masks"]]


@pytest.mark.parametrize("tokenizer", ["bytes", "chatml"])
def test_sharegpt_conversations_give_the_same_tokens_as_messages(
    tmp_path: Path, bpe_json: Path, tokenizer: str
) -> None:
    tok = BYTES if tokenizer == "bytes" else templated(tmp_path / "tok", bpe_json, tokenizer)
    convs = conversations(5)
    a = write_jsonl(tmp_path / "messages.jsonl", [{"messages": c} for c in convs])
    b = write_jsonl(tmp_path / "sharegpt.jsonl", [{"conversations": sharegpt(c)} for c in convs])
    da, db = (load_dataset(f, tok, task="causal-lm", seq_len=160) for f in (a, b))
    assert da.format == db.format == "chat"
    assert same(da.train, db.train) and same(da.eval, db.eval)


def test_chat_is_chosen_over_a_prompt_column(tmp_path: Path) -> None:
    """Chat datasets often keep the first user turn as a "prompt" column (ultrachat's layout)."""
    recs = [{"prompt": c[1]["content"], "messages": c} for c in conversations(4)]
    ds = load_dataset(write_jsonl(tmp_path / "chat.jsonl", recs), BYTES, task="causal-lm", seq_len=160)
    assert ds.format == "chat"


def test_long_conversations_are_cut_and_those_with_nothing_learned_skipped_with_a_note(
    tmp_path: Path,
) -> None:
    long_prompt = [{"role": "user", "content": "x" * 100}, {"role": "assistant", "content": "yes"}]
    recs = [{"messages": c} for c in conversations(4)] + [{"messages": long_prompt}]
    f = write_jsonl(tmp_path / "chat.jsonl", recs)
    ds = load_dataset(f, BYTES, task="causal-lm", seq_len=80)
    assert len(ds.train) + len(ds.eval) == 4  # the long-prompt record is skipped
    assert ds.notes == (
        f"{f}: 5 of 5 chat records are longer than seq_len=80: cut to their first 80 tokens, 1 of them "
        "skipped with no assistant token left",
    )
    row, labels = ds.train.input_ids[0], ds.train.labels[0]
    assert ds.train.attention_mask.eq(1).all()  # cut rows are full
    assert row.tolist() == plain_ids(CONVERSATION)[:80]
    assert learned_runs(row, labels) == [BYTES.encode("Hi! How are you?") + [BYTES.eos_id]]
    with pytest.raises(DataError, match=r"0 usable chat record\(s\) \(5 with no assistant token within"):
        load_dataset(f, BYTES, task="causal-lm", seq_len=20)


# ------------------------------------------------------------------------ parquet, arrow, save_to_disk


def _records(kind: str) -> list[dict[str, Any]]:
    if kind == "text":
        return [{"text": f"document {i}: " + "words " * 12} for i in range(12)]
    if kind == "instruction":  # "input" only on some: parquet stores null elsewhere, read as absent
        return [
            {"instruction": f"add {i}", "output": f"r{i}", **({"input": "x"} if i % 2 == 0 else {})}
            for i in range(8)
        ]
    if kind == "chat":
        return [{"messages": c} for c in conversations(6)]
    if kind == "sharegpt":
        return [{"conversations": sharegpt(c)} for c in conversations(6)]
    return [{"sentence": f"film {i} was {'good' if i % 2 else 'bad'}", "label": i % 2} for i in range(10)]


def _write(kind: str, container: str, directory: Path) -> Path:
    import datasets
    import pyarrow.feather

    records = _records(kind)
    ds = datasets.Dataset.from_list(records)
    if container == "parquet":
        ds.to_parquet(str(directory / "train.parquet"))
        return directory / "train.parquet"
    if container == "save_to_disk":
        ds.save_to_disk(str(directory / "saved"))
        return directory / "saved"
    if container == "datasetdict":
        held = datasets.Dataset.from_list(records[:2])
        datasets.DatasetDict({"test": held, "train": ds}).save_to_disk(str(directory / "dict"))
        return directory / "dict"
    if container == "arrow-stream":  # what save_to_disk writes
        ds.save_to_disk(str(directory / "tmp"))
        shutil.copy(next((directory / "tmp").glob("*.arrow")), directory / "train.arrow")
        return directory / "train.arrow"
    pyarrow.feather.write_feather(ds.data.table, str(directory / "train.arrow"))  # the Arrow IPC file format
    return directory / "train.arrow"


@pytest.mark.parametrize(
    "container", ["parquet", "arrow-stream", "arrow-file", "save_to_disk", "datasetdict"]
)
@pytest.mark.parametrize("kind", ["text", "instruction", "chat", "sharegpt", "classification"])
def test_datasets_files_give_the_same_data_as_jsonl(tmp_path: Path, kind: str, container: str) -> None:
    task = "sequence-classification" if kind == "classification" else "causal-lm"
    jsonl = write_jsonl(tmp_path / "train.jsonl", _records(kind))
    other = _write(kind, container, tmp_path)
    a, b = (load_dataset(f, BYTES, task=task, seq_len=160, num_labels=2) for f in (jsonl, other))
    assert a.notes == b.notes == ()
    assert a.format == b.format == {"sharegpt": "chat"}.get(kind, "jsonl-text" if kind == "text" else kind)
    assert same(a.train, b.train) and same(a.eval, b.eval)


def test_a_tsv_and_its_parquet_give_the_same_classification_rows(tmp_path: Path) -> None:
    import datasets

    tsv = tmp_path / "c.tsv"
    tsv.write_text("sentence\tlabel\n" + "".join(f"film {i}\t{i % 2}\n" for i in range(10)))
    rows = [{"sentence": f"film {i}", "label": i % 2} for i in range(10)]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "c.parquet"))
    a, b = (
        load_dataset(f, BYTES, task="sequence-classification", seq_len=16, num_labels=2)
        for f in (tsv, tmp_path / "c.parquet")
    )
    assert same(a.train, b.train) and same(a.eval, b.eval)


# -------------------------------------------------------------------------------- one-line errors

GOOD = json.dumps({"messages": CONVERSATION[1:3]})


def _bad_chat(line4: object) -> str:
    return "\n".join([GOOD, GOOD, "", json.dumps(line4)]) + "\n"  # the bad record on line 4


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (
            _bad_chat({"messages": [*CONVERSATION[1:3], {"role": "bot", "content": "x"}]}),
            "chat.jsonl:4: messages[2].role must be one of 'system', 'user', 'assistant', got 'bot'",
        ),
        (
            _bad_chat({"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]}),
            "chat.jsonl:4: messages[0] has no 'content'; every turn needs its text",
        ),
        (
            _bad_chat({"messages": [{"role": "user", "content": ["a"]}, CONVERSATION[2]]}),
            "chat.jsonl:4: messages[0].content must be a string, got list",
        ),
        (
            _bad_chat({"messages": [CONVERSATION[0], CONVERSATION[1]]}),
            "chat.jsonl:4: the conversation has no assistant turn, and only assistant turns are learned",
        ),
        (_bad_chat({"messages": []}), "chat.jsonl:4: messages must be a non-empty list"),
        (_bad_chat({"messages": ["hi"]}), "chat.jsonl:4: messages[0] must be an object with 'role'"),
        (
            _bad_chat({"messages": [CONVERSATION[2], CONVERSATION[1]]}),
            "chat.jsonl:4: messages[0] is an assistant turn; start with a system or user turn",
        ),
        (
            _bad_chat({"conversations": [{"from": "bot", "value": "x"}]}),
            "chat.jsonl:4: conversations[0].from must be one of 'system', 'human', 'gpt'",
        ),
        (_bad_chat({"text": "plain"}), "chat.jsonl:4: a record without 'messages' or 'conversations'"),
    ],
)
def test_bad_chat_records_give_one_line_with_file_and_line(tmp_path: Path, body: str, expected: str) -> None:
    f = tmp_path / "chat.jsonl"
    f.write_text(body)
    with pytest.raises(DataError) as e:
        load_dataset(f, BYTES, task="causal-lm", seq_len=64)
    msg = str(e.value)
    assert msg.startswith(str(tmp_path) + "/") and expected in msg and "\n" not in msg


def test_bad_parquet_rows_give_one_line_with_file_and_row(tmp_path: Path) -> None:
    import datasets

    rows = [{"messages": c} for c in conversations(8)]
    rows[7] = {"messages": [CONVERSATION[1], {"role": "robot", "content": "x"}]}
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "train.parquet"))
    with pytest.raises(DataError) as e:
        load_dataset(tmp_path / "train.parquet", BYTES, task="causal-lm", seq_len=64)
    assert str(e.value) == (
        f"{tmp_path}/train.parquet: row 7: messages[1].role must be one of 'system', 'user', 'assistant', "
        "got 'robot'"
    )


def _empty_parquet(d: Path) -> Path:
    import datasets

    datasets.Dataset.from_dict({"text": []}).to_parquet(str(d / "empty.parquet"))
    return d / "empty.parquet"


def _empty_arrow(d: Path) -> Path:
    import pyarrow as pa
    import pyarrow.ipc

    table = pa.table(
        {"messages": pa.array([], pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())])))}
    )
    with pyarrow.ipc.new_stream(str(d / "empty.arrow"), table.schema) as out:
        out.write_table(table)
    return d / "empty.arrow"


def _junk(d: Path) -> Path:
    (d / "junk.arrow").write_bytes(b"not arrow at all")
    return d / "junk.arrow"


def _plain_dir(d: Path) -> Path:
    (d / "folder").mkdir()
    (d / "folder" / "notes.txt").write_text("hi")
    return d / "folder"


def _dict_without_train(d: Path) -> Path:
    import datasets

    part = datasets.Dataset.from_list(_records("text"))
    datasets.DatasetDict({"validation": part}).save_to_disk(str(d / "dd"))
    return d / "dd"


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (_empty_parquet, "empty.parquet: no rows; the data file is empty"),
        (_empty_arrow, "empty.arrow: no rows; the data file is empty"),
        (_junk, "junk.arrow: cannot be read as an Arrow file ("),
        (_plain_dir, "folder: is a directory but not a datasets one"),
        (_dict_without_train, "dd: a DatasetDict without a 'train' split (it has ['validation'])"),
    ],
)
def test_bad_datasets_files_give_one_line(tmp_path: Path, make: Any, expected: str) -> None:
    path = make(tmp_path)
    with pytest.raises(DataError) as e:
        load_dataset(path, BYTES, task="causal-lm", seq_len=16)
    assert str(e.value).startswith(f"{path}: ") and expected in str(e.value) and "\n" not in str(e.value)


def test_datasets_is_imported_only_for_datasets_files(tmp_path: Path) -> None:
    """The rest of chunkft does not pay its import time (most of a second)."""
    import subprocess
    import sys

    f = write_jsonl(tmp_path / "chat.jsonl", [{"messages": c} for c in conversations(4)])
    code = (
        "import sys; from chunkft.executor.data import ByteTokenizer, load_dataset; "
        f"load_dataset({str(f)!r}, ByteTokenizer(), task='causal-lm', seq_len=160); "
        "print('datasets' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ------------------------------------------------------------------------------------ chunkft-run


def test_chunkft_run_trains_on_chat_jsonl_under_a_padded_plan(tmp_path: Path) -> None:
    plan = tmp_path / "plan.json"
    args = ["tiny-llama", "--gpu", "cpu", "--seq-len", "64", "--batch-size", "2", "--chunks", "2"]
    res = CliRunner().invoke(plan_main, [*args, "--steps", "2", "--padded-batches", "-o", str(plan)])
    assert res.exit_code == 0, res.output
    short = [
        [{"role": "user", "content": f"What is {i} plus {i}?"}, {"role": "assistant", "content": f"{2 * i}."}]
        for i in range(12)
    ]
    data = write_jsonl(tmp_path / "chat.jsonl", [{"messages": c} for c in short])
    out = tmp_path / "run"
    res = CliRunner().invoke(run_main, [str(plan), "--data", str(data), "--output", str(out), "--quiet"])
    assert res.exit_code == 0, res.output
    report = json.loads((out / "run.json").read_text())
    losses = report["losses"]["train"]
    assert len(losses) == 2 and all(0 < x < 20 for x in losses) and report["skipped_steps"] == 0
    # chat rows are padded: a plan made for unpadded batches is refused, as for instruction rows
    unpadded = tmp_path / "unpadded.json"
    res = CliRunner().invoke(plan_main, [*args, "--steps", "2", "-o", str(unpadded)])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(run_main, [str(unpadded), "--data", str(data), "--output", str(tmp_path / "no")])
    assert res.exit_code == 2 and "chat rows are padded (10 of 10 training rows)" in res.output, res.output
    # the data's notes reach the user: a conversation too long to leave an assistant token is skipped
    long_one = [{"role": "user", "content": "x" * 100}, {"role": "assistant", "content": "yes"}]
    data = write_jsonl(tmp_path / "long.jsonl", [{"messages": c} for c in [*short, long_one]])
    res = CliRunner().invoke(run_main, [str(plan), "--data", str(data), "--output", str(tmp_path / "long")])
    assert res.exit_code == 0, res.output
    assert "chunkft-run: note: " in res.output and "skipped with no assistant token left" in res.output


def test_a_datasets_directory_has_a_fingerprint_for_resume_checks(tmp_path: Path) -> None:
    """A checkpoint records the data's fingerprint; a save_to_disk directory must have one too (before:
    only files did, so resuming on another directory went unchecked)."""
    from chunkft.executor.train import data_fingerprint

    d = tmp_path / "ds"
    (d / "train").mkdir(parents=True)
    (d / "train" / "data-00000.arrow").write_bytes(b"abc")
    (d / "dataset_dict.json").write_text("{}")
    first = data_fingerprint(d)
    assert data_fingerprint(d) == first and first[1] == 5
    (d / "train" / "data-00000.arrow").write_bytes(b"abd")
    assert data_fingerprint(d) != first
