"""Training data for chunkft-run: read a file, tokenize it, split it, and serve seeded resumable batches.

Files, by extension: plain text (.txt, .text, .md), tokenized and packed into seq_len blocks (causal LM);
TSV/CSV with a header naming a text column (text/sentence) and a label column (sequence classification);
and record files: JSONL, one JSON object a line, or the rows of a .parquet or .arrow file or of a Hugging
Face datasets directory (Dataset.save_to_disk; of a DatasetDict, the "train" split), read with the
`datasets` library. One kind of record per file, chosen by the first record's keys:
- {"text"}: documents joined by the end-of-sequence token, then packed (causal LM);
- instruction ({"instruction"|"prompt", optional "input", "output"|"response"}): one padded example per
  record, the prompt's label positions set to -100 so only the response is learned;
- chat ({"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}, or ShareGPT's
  {"conversations": [{"from": "system"|"human"|"gpt", "value": str}, ...]}): one padded example per
  conversation in which only the assistant turns are learned (see below);
- for a classifier, {"text"|"sentence", "label"} records, like a TSV's rows.

Chat rendering. A tokenizer with a chat template (tokenizer.hf.chat_template) renders the conversation
with it; an assistant turn is the text between the rendering of the turns before it plus the generation
prompt and the rendering up to and including it (so its content and the template's end-of-turn token are
learned, the role headers are not), mapped to tokens by their offsets. The byte tokenizer, and Hugging
Face tokenizers without a template, use one fixed plain template, each piece encoded on its own:

    <|system|>\n{system}\n<|user|>\n{user}\n<|assistant|>\n{assistant}<eos><|user|>\n...

where <eos> is the tokenizer's end-of-sequence id (not text) and "<|user|>" etc. are ordinary text; the
assistant's content and that <eos> are learned. A padded example longer than seq_len keeps its first
seq_len tokens; one left with nothing to learn is skipped, and both counts are in Dataset.notes.

The held-out split is the last 10% of the examples, so it is deterministic and, for packed text, the end of
the document. Every bad-input problem raises DataError with one line that says where (file:line for text
files, "file: row i" for parquet/arrow/datasets rows, counted from 0) and what to do, before anything is
written.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import torch

IGNORE_INDEX = -100  # Hugging Face losses skip label positions with this value
EVAL_FRACTION_PERCENT = 10  # the held-out split: the last 10% of the examples

Format = Literal["text", "jsonl-text", "instruction", "chat", "classification"]
TEXT_SUFFIXES = (".txt", ".text", ".md")
JSONL_SUFFIXES = (".jsonl",)
TABLE_SUFFIXES = (".tsv", ".csv")
RECORD_SUFFIXES = (".parquet", ".arrow")  # and directories: read with the datasets library
RECORD_KINDS = {".parquet": "a Parquet file", ".arrow": "an Arrow file"}
TEXT_COLUMNS = ("text", "sentence")
PROMPT_KEYS = ("instruction", "prompt")
RESPONSE_KEYS = ("output", "response")
CHAT_KEYS = ("messages", "conversations")
CHAT_ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "gpt": "assistant",
    "user": "user",
    "assistant": "assistant",
}
BOM = "\ufeff"  # the UTF-8 byte-order mark, stripped from the start of every data file


class DataError(ValueError):
    """A data file that cannot be used; the message is one line: where, what is wrong, what to do."""


# ----------------------------------------------------------------------------------------- tokenizers


class Tokenizer(Protocol):
    """What the data pipeline needs from a tokenizer."""

    eos_id: int
    pad_id: int

    def encode(self, text: str) -> list[int]: ...  # no special tokens

    def encode_wrapped(self, text: str) -> list[int]: ...  # with the model's special tokens around it

    def save(self, directory: Path) -> None: ...

    def id_count(self) -> int: ...  # 1 + the largest id it can produce: the embedding must have as many

    def identity(self) -> str: ...  # sha256 of what decides its ids (a checkpoint records it)


class ByteTokenizer:
    """UTF-8 bytes 0..255 as ids 0..255, then bos/eos/pad; for presets, which have no tokenizer of their own.

    Lossless and dependency-free; the presets' vocabulary (512) leaves room for the three specials.
    """

    bos_id = 256
    eos_id = 257
    pad_id = 258
    vocab_size = 259
    SPECIAL_TOKENS = ("<|bos|>", "<|eos|>", "<|pad|>")  # ids 256, 257, 258 in an exported tokenizer.json

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def encode_wrapped(self, text: str) -> list[int]:
        return [self.bos_id, *self.encode(text), self.eos_id]

    def id_count(self) -> int:
        return self.vocab_size

    def identity(self) -> str:
        return hashlib.sha256(b"chunkft-bytes:256:257:258").hexdigest()

    def save(self, directory: Path) -> None:
        """Write this tokenizer as a Hugging Face one (tokenizer.json, tokenizer_config.json), so the exported
        model loads with AutoTokenizer and can be planned and fine-tuned again with the very same ids."""
        directory = Path(directory)
        _byte_level_tokenizer(self).save(str(directory / "tokenizer.json"))
        bos, eos, pad = self.SPECIAL_TOKENS
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": bos,
            "eos_token": eos,
            "pad_token": pad,
            "split_special_tokens": True,  # "<|eos|>" in the text stays bytes, as ByteTokenizer encodes it
            "clean_up_tokenization_spaces": False,
            "model_max_length": 10**30,  # no length of its own: the plan's seq_len cuts the blocks
        }
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
        spec = {  # the id scheme in plain words, for readers without the tokenizers library
            "kind": "chunkft-bytes",
            "description": "UTF-8 bytes 0..255 are ids 0..255; specials follow",
            "bos_id": self.bos_id,
            "eos_id": self.eos_id,
            "pad_id": self.pad_id,
            "vocab_size": self.vocab_size,
        }
        (directory / "chunkft_tokenizer.json").write_text(json.dumps(spec, indent=2) + "\n")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, which the tokenizers ByteLevel pre-tokenizer maps bytes
    through (a copy, so that no transformers internals are needed)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1)]
    printable += range(ord("\xae"), ord("\xff") + 1)
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _byte_level_tokenizer(byte_tok: ByteTokenizer) -> Any:
    """A tokenizers.Tokenizer that gives exactly ByteTokenizer's ids: a merge-free byte-level BPE whose
    token for byte b is id b, then the specials, wrapped as bos ... eos like encode_wrapped."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = {char: b for b, char in _bytes_to_unicode().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    bos, eos, pad = byte_tok.SPECIAL_TOKENS
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (bos, eos, pad)])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}",
        pair=f"{bos} $A {eos} $B {eos}",
        special_tokens=[(bos, byte_tok.bos_id), (eos, byte_tok.eos_id)],
    )
    return tok


# Files a Hugging Face tokenizer is read from (one of them is needed besides tokenizer_config.json).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.txt", "vocab.json", "spiece.model")
_PROBE_TEXT = "The quick brown fox jumps over the lazy dog."


class NoTokenizerError(DataError):
    """A model directory without tokenizer files (transformers would build an empty tokenizer)."""


def _no_tokenizer(directory: str | os.PathLike[str]) -> NoTokenizerError:
    return NoTokenizerError(
        f"{directory} has no tokenizer files ({', '.join(TOKENIZER_FILES)} ...); copy them in from the "
        "base model"
    )


def _has_tokenizer_files(directory: str | os.PathLike[str]) -> bool:
    d = Path(directory)
    return any((d / f).is_file() for f in TOKENIZER_FILES) or any(d.glob("*.tiktoken"))


class HFTokenizer:
    """A Hugging Face checkpoint's own tokenizer behind the same small interface."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        from transformers import AutoTokenizer

        try:
            self.hf = AutoTokenizer.from_pretrained(str(directory))
        except (OSError, ValueError) as e:
            if Path(directory).is_dir() and not _has_tokenizer_files(directory):
                raise _no_tokenizer(directory) from None
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DataError(
                f"{directory}: cannot load the model's tokenizer ({first}); "
                "the directory needs tokenizer files"
            ) from None
        if not _usable(self.hf):
            raise _no_tokenizer(directory)
        eos = self.hf.eos_token_id if self.hf.eos_token_id is not None else self.hf.sep_token_id
        pad = self.hf.pad_token_id if self.hf.pad_token_id is not None else eos
        if eos is None or pad is None:
            raise DataError(f"{directory}: the tokenizer has no eos or sep token to end sequences with")
        self.eos_id: int = int(eos)
        self.pad_id: int = int(pad)

    def encode(self, text: str) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=False))

    def encode_wrapped(self, text: str) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=True))

    def save(self, directory: Path) -> None:
        self.hf.save_pretrained(str(directory))

    def id_count(self) -> int:
        return len(self.hf)  # the vocabulary and the added tokens

    def identity(self) -> str:
        """Of the token -> id map and the special ids: what the data's ids depend on (not file bytes,
        which change with a re-save)."""
        vocab = sorted(self.hf.get_vocab().items())
        key = json.dumps([vocab, sorted(self.hf.all_special_ids), self.eos_id, self.pad_id])
        return hashlib.sha256(key.encode()).hexdigest()


def fresh_model_tokenizer(directory: str | None) -> Tokenizer:
    """The tokenizer of a randomly initialised model: the directory's own when it has tokenizer files, else
    (presets, config-only directories) the byte-level one: a fresh model learns whatever ids it is given."""
    if directory is None:
        return ByteTokenizer()
    try:
        return HFTokenizer(directory)
    except NoTokenizerError:
        return ByteTokenizer()


def _usable(hf: Any) -> bool:
    """Whether plain English becomes ordinary tokens: without tokenizer files transformers builds a tokenizer
    of special tokens only, which turns any text into nothing (or all [UNK]) and the data into 0 blocks."""
    ids = hf.encode(_PROBE_TEXT, add_special_tokens=False)
    special = set(hf.all_special_ids)
    return any(i not in special for i in ids)


# ------------------------------------------------------------------------------------------- datasets


@dataclass(frozen=True)
class TokenData:
    """Fixed-length examples as tensors; labels are (N, seq_len) for causal LM, (N,) for classification."""

    input_ids: torch.Tensor  # int64 (N, seq_len)
    attention_mask: torch.Tensor  # int64 (N, seq_len)
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def batch(self, indices: torch.Tensor) -> dict[str, torch.Tensor]:
        return {
            "input_ids": self.input_ids[indices],
            "attention_mask": self.attention_mask[indices],
            "labels": self.labels[indices],
        }

    def tokens(self) -> int:
        """Tokens the model reads (attended positions), for tokens-per-second figures."""
        return int(self.attention_mask.sum())


@dataclass(frozen=True)
class Dataset:
    """A file's examples, split into train and held-out parts; notes are lines for the run's log (rows
    truncated or skipped), so that a shortened dataset is never silent."""

    path: str
    format: Format
    train: TokenData
    eval: TokenData
    notes: tuple[str, ...] = ()


def detect_format(path: Path) -> Format:
    """The format from the extension; record files (.jsonl, .parquet, .arrow, datasets directories) say
    "jsonl-text" here and are refined from their records by load_dataset."""
    suffix = path.suffix.lower()
    if suffix in TEXT_SUFFIXES:
        return "text"
    if suffix in JSONL_SUFFIXES or suffix in RECORD_SUFFIXES or path.is_dir():
        return "jsonl-text"
    if suffix in TABLE_SUFFIXES:
        return "classification"
    raise DataError(
        f"{path}: unknown data format {suffix or '(none)'!r}; use .txt, .jsonl, .tsv, .csv, .parquet, "
        ".arrow or a datasets directory"
    )


def load_dataset(
    path: str | os.PathLike[str],
    tokenizer: Tokenizer,
    *,
    task: str,
    seq_len: int,
    num_labels: int | None = None,
    min_train_examples: int = 1,
) -> Dataset:
    """Read, validate and tokenize a data file for a model of the given task ("causal-lm" or
    "sequence-classification"); the last 10% of the examples are held out."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: data file not found; check the --data path")
    fmt = detect_format(p)
    notes: list[str] = []
    if fmt == "jsonl-text":  # records: JSONL lines, or the rows of a parquet/arrow file or datasets directory
        records = _jsonl_records(p, _read_text(p)) if p.suffix.lower() in JSONL_SUFFIXES else _table_rows(p)
        fmt, data = _from_records(p, records, tokenizer, task, seq_len, num_labels, notes)
    else:
        text = _read_text(p)
        if fmt == "classification":
            if task != "sequence-classification":
                raise DataError(
                    f"{p}: a {p.suffix} file holds text,label rows for classification, but the "
                    f"plan's model is {task}; use a .txt or .jsonl file"
                )
            data = _classification(p, text, tokenizer, seq_len, num_labels)
        else:
            if task != "causal-lm":
                raise DataError(
                    f"{p}: the plan's model is {task}; it needs a .tsv/.csv file with text and label "
                    "columns (or .jsonl/.parquet/.arrow records with them)"
                )
            data = _pack(p, tokenizer.encode(text), tokenizer, seq_len)
    n_eval = max(1, math.ceil(len(data) * EVAL_FRACTION_PERCENT / 100))
    n_train = len(data) - n_eval
    if n_train < max(1, min_train_examples):
        raise DataError(
            f"{p}: only {len(data)} examples of {seq_len} tokens; after holding out {n_eval} for "
            f"evaluation, training needs at least {max(1, min_train_examples)}; "
            "give more data or a shorter seq_len"
        )
    train = TokenData(data.input_ids[:n_train], data.attention_mask[:n_train], data.labels[:n_train])
    held = TokenData(data.input_ids[n_train:], data.attention_mask[n_train:], data.labels[n_train:])
    return Dataset(path=str(p), format=fmt, train=train, eval=held, notes=tuple(notes))


def _read_text(p: Path) -> str:
    if not p.exists():
        raise DataError(f"{p}: data file not found; check the --data path")
    if not p.is_file():
        raise DataError(f"{p}: is not a regular file; give a data file")
    raw = p.read_bytes()
    if b"\x00" in raw:
        line = raw[: raw.index(b"\x00")].count(b"\n") + 1
        raise DataError(f"{p}:{line}: binary data (NUL byte); give a UTF-8 text file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(f"{p}:{line}: not valid UTF-8 (byte {e.start}); give a UTF-8 text file") from None
    # Spreadsheets and Windows editors start UTF-8 exports with a byte-order mark: it is no text (it would
    # be trained on, break the first JSON record and rename the first column '\ufeffsentence').
    text = text.removeprefix(BOM)
    if not text.strip():
        raise DataError(f"{p}: data file is empty")
    return text


def _pack(p: Path, ids: list[int], tokenizer: Tokenizer, seq_len: int) -> TokenData:
    """Cut one token stream into seq_len blocks; the tail shorter than a block is dropped."""
    n = len(ids) // seq_len
    if n < 2:
        raise DataError(
            f"{p}: {len(ids)} tokens make {n} block(s) of {seq_len}; need at least 2 "
            "(one to train, one to evaluate); give more text"
        )
    x = torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)
    return TokenData(x, torch.ones_like(x), x.clone())


# ------------------------------------------------------------------------------------------- records

Record = tuple[str, dict[str, Any]]  # (where it is, for errors: "file:line" or "file: row i"; the record)


def _jsonl_records(p: Path, text: str) -> list[Record]:
    records: list[Record] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{p}:{lineno}: invalid JSON ({e.msg}); one JSON object per line") from None
        if not isinstance(rec, dict):
            raise DataError(f"{p}:{lineno}: expected a JSON object, got {type(rec).__name__}")
        records.append((f"{p}:{lineno}", rec))
    if not records:
        raise DataError(f"{p}: no JSON records")
    return records


def _table_rows(p: Path) -> list[Record]:
    """The rows of a .parquet/.arrow file or a save_to_disk directory (a DatasetDict's "train" split), read
    by the datasets library, imported only here (it costs most of a second). Files are read through a
    throw-away cache, so nothing is left in ~/.cache; rows are numbered from 0, as ds[i] indexes them.
    Null values count as absent fields (a parquet column exists in every row)."""
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"{p}: reading {p.suffix or 'a datasets directory'} needs `pip install datasets`"
        ) from None
    if p.is_dir() and not any((p / f).is_file() for f in ("dataset_dict.json", "state.json")):
        raise DataError(
            f"{p}: is a directory but not a datasets one (no dataset_dict.json or state.json, as "
            "Dataset.save_to_disk writes); give a data file or such a directory"
        )
    bars, verbosity = datasets.is_progress_bar_enabled(), datasets.logging.get_verbosity()
    datasets.disable_progress_bars()  # the run's log is one line per event, not progress bars
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # failures come back as one DataError line
    try:
        if p.is_dir():
            ds = datasets.load_from_disk(str(p))
            if isinstance(ds, datasets.DatasetDict):
                if "train" not in ds:
                    raise DataError(f"{p}: a DatasetDict without a 'train' split (it has {sorted(ds)})")
                ds = ds["train"]
            rows = [dict(r) for r in ds]
        else:
            with tempfile.TemporaryDirectory(prefix="chunkft-datasets-") as cache:
                module = "parquet" if p.suffix.lower() == ".parquet" else "arrow"
                # load_dataset's steps, so that a file of no rows is told apart from an unreadable one
                builder = datasets.load_dataset_builder(module, data_files=str(p), cache_dir=cache)
                builder.download_and_prepare()
                if not builder.info.splits["train"].num_examples:
                    raise DataError(f"{p}: no rows; the data file is empty")
                rows = [dict(r) for r in builder.as_dataset(split="train", in_memory=True)]
    except DataError:
        raise
    except Exception as e:  # the library's and pyarrow's many error types: one line that says which file
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        kind = "a datasets directory" if p.is_dir() else RECORD_KINDS.get(p.suffix.lower(), "a data file")
        raise DataError(f"{p}: cannot be read as {kind} ({first[:200]})") from None
    finally:
        datasets.logging.set_verbosity(verbosity)
        if bars:
            datasets.enable_progress_bars()
    if not rows:
        raise DataError(f"{p}: no rows; the data file is empty")
    return [(f"{p}: row {i}", {k: v for k, v in r.items() if v is not None}) for i, r in enumerate(rows)]


def _from_records(
    p: Path,
    records: list[Record],
    tokenizer: Tokenizer,
    task: str,
    seq_len: int,
    num_labels: int | None,
    notes: list[str],
) -> tuple[Format, TokenData]:
    """One format per file, chosen by the first record's keys: chat, instruction, else text (or, for a
    classifier, text + label)."""
    first = records[0][1]
    if task == "sequence-classification":
        return "classification", _labelled_records(p, records, tokenizer, seq_len, num_labels)
    if task != "causal-lm":
        raise DataError(
            f"{p}: the plan's model is {task}; chunkft trains causal-lm or sequence-classification"
        )
    if any(k in first for k in CHAT_KEYS):  # before instruction: chat datasets often keep a "prompt" column
        rows = [(where, _chat_example(where, _chat_turns(where, rec), tokenizer)) for where, rec in records]
        return "chat", _padded(p, rows, seq_len, tokenizer, "chat", notes)
    if any(k in first for k in PROMPT_KEYS):
        return "instruction", _instructions(p, records, tokenizer, seq_len, notes)
    stream: list[int] = []
    for where, rec in records:
        if not isinstance(rec.get("text"), str):
            raise DataError(
                f"{where}: missing string field 'text'; text data needs "
                '{"text": ...} in every record (or instruction or chat records throughout)'
            )
        stream += tokenizer.encode(rec["text"])
        stream.append(tokenizer.eos_id)
    return "jsonl-text", _pack(p, stream, tokenizer, seq_len)


def _get_str(where: str, rec: dict[str, Any], keys: tuple[str, ...], required: bool) -> str:
    for k in keys:
        if k in rec:
            v = rec[k]
            if not isinstance(v, str):
                raise DataError(f"{where}: field {k!r} must be a string, got {type(v).__name__}")
            return v
    if required:
        raise DataError(
            f"{where}: missing {' or '.join(repr(k) for k in keys)}; "
            "instruction records need "
            '"instruction" (or "prompt") and "output" (or "response") in every one'
        )
    return ""


def format_prompt(instruction: str, context: str) -> str:
    """The prompt template the response is conditioned on (Alpaca-style; plain and documented)."""
    if context:
        return f"### Instruction:\n{instruction}\n\n### Input:\n{context}\n\n### Response:\n"
    return f"### Instruction:\n{instruction}\n\n### Response:\n"


Example = tuple[list[int], list[int]]  # token ids and their labels (IGNORE_INDEX where nothing is learned)


def _instructions(
    p: Path, records: list[Record], tokenizer: Tokenizer, seq_len: int, notes: list[str]
) -> TokenData:
    """One example per record: prompt then response then eos, padded; only response tokens are labels."""
    rows: list[tuple[str, Example]] = []
    for where, rec in records:
        if "text" in rec and not any(k in rec for k in PROMPT_KEYS):
            raise DataError(f'{where}: a {{"text"}} record among instructions; one format per file')
        prompt = tokenizer.encode(
            format_prompt(_get_str(where, rec, PROMPT_KEYS, True), _get_str(where, rec, ("input",), False))
        )
        response = tokenizer.encode(_get_str(where, rec, RESPONSE_KEYS, True)) + [tokenizer.eos_id]
        rows.append((where, (prompt + response, [IGNORE_INDEX] * len(prompt) + response)))
    return _padded(p, rows, seq_len, tokenizer, "instruction", notes)


def _padded(
    p: Path, rows: list[tuple[str, Example]], seq_len: int, tokenizer: Tokenizer, kind: str, notes: list[str]
) -> TokenData:
    """Examples cut to their first seq_len tokens and padded (attention 0, label -100); one with no learned
    token left is skipped, and the counts of both go to the run's notes."""
    ids_out, masks, labels_out = [], [], []
    cut = skipped = 0
    for _, (ids, labels) in rows:
        cut += len(ids) > seq_len
        ids, labels = ids[:seq_len], labels[:seq_len]
        if all(t == IGNORE_INDEX for t in labels):
            skipped += 1  # nothing to learn within the block (the prompt fills it)
            continue
        pad = seq_len - len(ids)
        ids_out.append(ids + [tokenizer.pad_id] * pad)
        masks.append([1] * len(ids) + [0] * pad)
        labels_out.append(labels + [IGNORE_INDEX] * pad)
    if cut:
        notes.append(
            f"{p}: {cut} of {len(rows)} {kind} records are longer than seq_len={seq_len}: cut to their first "
            f"{seq_len} tokens, {skipped} of them skipped with no {_LEARNED[kind]} token left"
        )
    if len(ids_out) < 2:
        raise DataError(
            f"{p}: {len(ids_out)} usable {kind} record(s) ({skipped} with no {_LEARNED[kind]} token within "
            f"seq_len={seq_len} are skipped); need at least 2; give more records or a longer seq_len"
        )
    return TokenData(torch.tensor(ids_out), torch.tensor(masks), torch.tensor(labels_out))


_LEARNED = {"instruction": "response", "chat": "assistant"}


# ---------------------------------------------------------------------------------------------- chat


def _chat_turns(where: str, rec: dict[str, Any]) -> list[tuple[str, str]]:
    """A record's conversation as (role, content) pairs, "messages" or ShareGPT "conversations" alike."""
    if "messages" in rec:
        key, role_key, text_key, roles = "messages", "role", "content", {r: r for r in CHAT_ROLES}
    elif "conversations" in rec:
        key, role_key, text_key, roles = "conversations", "from", "value", SHAREGPT_ROLES
    else:
        raise DataError(f"{where}: a record without 'messages' or 'conversations' among chat records")
    turns = rec[key]
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: {key} must be a non-empty list of {{{role_key!r}, {text_key!r}}} objects")
    out: list[tuple[str, str]] = []
    for i, turn in enumerate(turns):
        at = f"{key}[{i}]"
        if not isinstance(turn, dict):
            raise DataError(
                f"{where}: {at} must be an object with {role_key!r} and {text_key!r}, "
                f"got {type(turn).__name__}"
            )
        role = turn.get(role_key)
        if role not in roles:
            raise DataError(
                f"{where}: {at}.{role_key} must be one of {', '.join(map(repr, roles))}, got {role!r}"
            )
        text = turn.get(text_key)
        if text is None:
            raise DataError(f"{where}: {at} has no {text_key!r}; every turn needs its text")
        if not isinstance(text, str):
            raise DataError(f"{where}: {at}.{text_key} must be a string, got {type(text).__name__}")
        out.append((roles[role], text))
    if out[0][0] == "assistant":
        raise DataError(f"{where}: {key}[0] is an assistant turn; start with a system or user turn")
    if not any(role == "assistant" for role, _ in out):
        raise DataError(
            f"{where}: the conversation has no assistant turn, and only assistant turns are learned; "
            "drop it or add the reply"
        )
    return out


def _chat_example(where: str, turns: list[tuple[str, str]], tokenizer: Tokenizer) -> Example:
    hf = getattr(tokenizer, "hf", None)
    if hf is not None and getattr(hf, "chat_template", None):
        return _templated_chat(where, turns, hf)
    ids: list[int] = []
    labels: list[int] = []
    for role, text in turns:  # the plain template (module docstring), each piece encoded on its own
        head = tokenizer.encode(f"<|{role}|>\n")
        if role == "assistant":
            body = tokenizer.encode(text) + [tokenizer.eos_id]
            learned = body
        else:
            body = tokenizer.encode(text + "\n")
            learned = [IGNORE_INDEX] * len(body)
        ids += head + body
        labels += [IGNORE_INDEX] * len(head) + learned
    return ids, labels


def _templated_chat(where: str, turns: list[tuple[str, str]], hf: Any) -> Example:
    """The chat template's rendering, with labels on the tokens that start inside an assistant turn's text.

    Assistant turn i is the text between render(turns[:i] + generation prompt) and render(turns[:i + 1]):
    this works with every template (few have {% generation %} markers for return_assistant_tokens_mask),
    and the spans are mapped to tokens through the offsets of one tokenization of the whole conversation,
    so a token merged across a boundary cannot shift them. Whitespace the template puts after the turn's
    end token ("<|im_end|>\\n") is not learned."""
    from jinja2 import TemplateError

    messages = [{"role": role, "content": text} for role, text in turns]

    def render(n: int, prompt: bool) -> str:
        try:
            out = hf.apply_chat_template(messages[:n], tokenize=False, add_generation_prompt=prompt)
        except (TemplateError, ValueError, TypeError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DataError(
                f"{where}: the tokenizer's chat template refuses this conversation ({first})"
            ) from None
        return str(out)

    full = render(len(messages), False)
    spans: list[tuple[int, int]] = []
    for i, (role, _) in enumerate(turns):
        if role != "assistant":
            continue
        before, upto = render(i, True), render(i + 1, False)
        if not (upto.startswith(before) and full.startswith(upto)):
            raise DataError(
                f"{where}: the tokenizer's chat template renders turn {i} differently once later turns "
                "follow, so its assistant text cannot be found; give the tokenizer a template that renders "
                "a conversation prefix by prefix"
            )
        spans.append((len(before), max(len(before), len(upto.rstrip()))))
    if not getattr(hf, "is_fast", False):
        raise DataError(f"{where}: chat data needs a fast (tokenizers) tokenizer, for its token offsets")
    enc = hf(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    labels = [
        t if any(s <= start < e for s, e in spans) else IGNORE_INDEX
        for t, (start, _) in zip(ids, enc["offset_mapping"], strict=True)
    ]
    return ids, labels


# ------------------------------------------------------------------------------------ classification


def _label(where: str, value: object, num_labels: int | None) -> int:
    if isinstance(value, str):
        try:
            label = int(value)
        except ValueError:
            raise DataError(f"{where}: label {value!r} is not an integer class index") from None
    elif isinstance(value, int) and not isinstance(value, bool):
        label = value
    else:
        raise DataError(f"{where}: label {value!r} is not an integer class index")
    if label < 0 or (num_labels is not None and label >= num_labels):
        raise DataError(
            f"{where}: label {label} is outside 0..{(num_labels or 1) - 1} (the plan's num_labels)"
        )
    return label


def _classified(texts: list[tuple[str, int]], tokenizer: Tokenizer, seq_len: int, p: Path) -> TokenData:
    """(text, label) rows, truncated and padded to seq_len with the model's special tokens."""
    rows, masks, labels = [], [], []
    for text, label in texts:
        ids = tokenizer.encode_wrapped(text.strip())
        if len(ids) > seq_len:
            ids = ids[: seq_len - 1] + ids[-1:]  # keep the closing special token
        pad = seq_len - len(ids)
        rows.append(ids + [tokenizer.pad_id] * pad)
        masks.append([1] * len(ids) + [0] * pad)
        labels.append(label)
    if len(rows) < 2:
        raise DataError(f"{p}: {len(rows)} data row(s); need at least 2 (one to train, one to evaluate)")
    return TokenData(torch.tensor(rows), torch.tensor(masks), torch.tensor(labels, dtype=torch.long))


def _labelled_records(
    p: Path, records: list[Record], tokenizer: Tokenizer, seq_len: int, num_labels: int | None
) -> TokenData:
    """Records with a text field ('text' or 'sentence') and an integer 'label', as for a TSV's rows."""
    texts = []
    for where, rec in records:
        key = next((k for k in TEXT_COLUMNS if k in rec), None)
        if key is None or "label" not in rec:
            raise DataError(
                f"{where}: a classifier's records need a text field ('text' or 'sentence') and 'label', "
                f"got {sorted(rec)}"
            )
        if not isinstance(rec[key], str):
            raise DataError(f"{where}: field {key!r} must be a string, got {type(rec[key]).__name__}")
        texts.append((rec[key], _label(where, rec["label"], num_labels)))
    return _classified(texts, tokenizer, seq_len, p)


def _classification(
    p: Path, text: str, tokenizer: Tokenizer, seq_len: int, num_labels: int | None
) -> TokenData:
    """Rows of (text, integer label) from a TSV/CSV with a header."""
    delimiter = "\t" if p.suffix.lower() == ".tsv" else ","
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    reader = csv.reader(io.StringIO(text), delimiter=delimiter, quoting=quoting)
    try:
        header = [h.strip().lower() for h in next(reader)]
    except StopIteration:
        raise DataError(f"{p}: data file is empty") from None
    text_col = next((header.index(c) for c in TEXT_COLUMNS if c in header), None)
    if text_col is None or "label" not in header:
        raise DataError(
            f"{p}:1: the header must name a text column ('text' or 'sentence') and 'label', got {header}"
        )
    label_col = header.index("label")
    texts = []
    for row in reader:
        lineno = reader.line_num
        if not row or all(not c.strip() for c in row):
            continue
        if len(row) != len(header):
            raise DataError(
                f"{p}:{lineno}: {len(row)} columns, the header has {len(header)}; check the "
                f"{'tabs' if delimiter == chr(9) else 'commas and quoting'} on that line"
            )
        texts.append((row[text_col], _label(f"{p}:{lineno}", row[label_col], num_labels)))
    return _classified(texts, tokenizer, seq_len, p)


# -------------------------------------------------------------------------------------------- batches


@dataclass(frozen=True)
class DataPosition:
    """Where the seeded shuffle stands: the epoch and the next example in its permutation (resumable)."""

    epoch: int
    index: int


class Batches:
    """Seeded shuffled batches over TokenData; each epoch's order is a function of (seed, epoch) only, so the
    position alone restores the stream exactly. An epoch's last partial batch is dropped."""

    def __init__(self, data: TokenData, batch_size: int, seed: int) -> None:
        if batch_size < 1:
            raise DataError(f"micro_batch_size must be >= 1, got {batch_size}")
        if len(data) < batch_size:
            raise DataError(
                f"{len(data)} training examples cannot fill one micro-batch of {batch_size}; "
                "give more data or a smaller micro_batch_size"
            )
        self.data = data
        self.batch_size = batch_size
        self.seed = seed
        self.position = DataPosition(0, 0)
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.data), generator=g)

    def next(self) -> dict[str, torch.Tensor]:
        epoch, index = self.position.epoch, self.position.index
        if index + self.batch_size > len(self.data):
            epoch, index = epoch + 1, 0
            self._order = self._permutation(epoch)
        batch = self.data.batch(self._order[index : index + self.batch_size])
        self.position = DataPosition(epoch, index + self.batch_size)
        return batch

    def seek(self, position: DataPosition) -> None:
        if position.epoch < 0 or not 0 <= position.index <= len(self.data):
            raise DataError(
                f"data position {position} does not fit {len(self.data)} training examples; the "
                "checkpoint was made with other data"
            )
        self.position = position
        self._order = self._permutation(position.epoch)


def eval_batches(data: TokenData, batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
    """The held-out examples in order, the last batch possibly smaller."""
    for start in range(0, len(data), batch_size):
        yield data.batch(torch.arange(start, min(start + batch_size, len(data))))
