"""Training data for chunkft-run: read a file, tokenize it, split it, and serve seeded resumable batches.

Four formats, chosen by the file's extension and, for JSONL, by each record's keys:
- plain text (.txt, .text, .md): tokenized and packed into seq_len blocks (causal LM);
- JSONL with {"text"}: documents joined by the end-of-sequence token, then packed (causal LM);
- instruction JSONL ({"instruction"|"prompt", optional "input", "output"|"response"}): one padded
  example per record, the prompt's label positions set to -100 so only the response is learned;
- TSV/CSV with a header naming a text column (text/sentence) and a label column (sequence classification).

The held-out split is the last 10% of the examples, so it is deterministic and, for packed text, the end of
the document. Every bad-input problem raises DataError with one line that says where (file:line) and what
to do, before anything is written.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import torch

IGNORE_INDEX = -100  # Hugging Face losses skip label positions with this value
EVAL_FRACTION_PERCENT = 10  # the held-out split: the last 10% of the examples

Format = Literal["text", "jsonl-text", "instruction", "classification"]
TEXT_SUFFIXES = (".txt", ".text", ".md")
JSONL_SUFFIXES = (".jsonl",)
TABLE_SUFFIXES = (".tsv", ".csv")
TEXT_COLUMNS = ("text", "sentence")
PROMPT_KEYS = ("instruction", "prompt")
RESPONSE_KEYS = ("output", "response")
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
    """A file's examples, split into train and held-out parts."""

    path: str
    format: Format
    train: TokenData
    eval: TokenData


def detect_format(path: Path) -> Format:
    """The format from the extension (JSONL is refined per record by load_dataset)."""
    suffix = path.suffix.lower()
    if suffix in TEXT_SUFFIXES:
        return "text"
    if suffix in JSONL_SUFFIXES:
        return "jsonl-text"
    if suffix in TABLE_SUFFIXES:
        return "classification"
    raise DataError(f"{path}: unknown data format {suffix or '(none)'!r}; use .txt, .jsonl, .tsv or .csv")


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
    text = _read_text(p)
    fmt = detect_format(p)
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
                f"{p}: the plan's model is {task}; it needs a .tsv/.csv file with text and label columns"
            )
        if fmt == "text":
            data = _pack(p, tokenizer.encode(text), tokenizer, seq_len)
        else:
            fmt, data = _jsonl(p, text, tokenizer, seq_len)
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
    return Dataset(path=str(p), format=fmt, train=train, eval=held)


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


def _jsonl(p: Path, text: str, tokenizer: Tokenizer, seq_len: int) -> tuple[Format, TokenData]:
    records: list[tuple[int, dict[str, object]]] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{p}:{lineno}: invalid JSON ({e.msg}); one JSON object per line") from None
        if not isinstance(rec, dict):
            raise DataError(f"{p}:{lineno}: expected a JSON object, got {type(rec).__name__}")
        records.append((lineno, rec))
    if not records:
        raise DataError(f"{p}: no JSON records")
    first = records[0][1]
    fmt: Format = "instruction" if any(k in first for k in PROMPT_KEYS) else "jsonl-text"
    if fmt == "jsonl-text":
        stream: list[int] = []
        for lineno, rec in records:
            if not isinstance(rec.get("text"), str):
                raise DataError(
                    f"{p}:{lineno}: missing string field 'text'; a JSONL text file needs "
                    '{"text": ...} on every line (or instruction records throughout)'
                )
            stream += tokenizer.encode(rec["text"])  # type: ignore[arg-type]
            stream.append(tokenizer.eos_id)
        return fmt, _pack(p, stream, tokenizer, seq_len)
    return fmt, _instructions(p, records, tokenizer, seq_len)


def _get_str(p: Path, lineno: int, rec: dict[str, object], keys: tuple[str, ...], required: bool) -> str:
    for k in keys:
        if k in rec:
            v = rec[k]
            if not isinstance(v, str):
                raise DataError(f"{p}:{lineno}: field {k!r} must be a string, got {type(v).__name__}")
            return v
    if required:
        raise DataError(
            f"{p}:{lineno}: missing {' or '.join(repr(k) for k in keys)}; "
            "instruction JSONL needs "
            '"instruction" (or "prompt") and "output" (or "response") on every line'
        )
    return ""


def format_prompt(instruction: str, context: str) -> str:
    """The prompt template the response is conditioned on (Alpaca-style; plain and documented)."""
    if context:
        return f"### Instruction:\n{instruction}\n\n### Input:\n{context}\n\n### Response:\n"
    return f"### Instruction:\n{instruction}\n\n### Response:\n"


def _instructions(
    p: Path, records: list[tuple[int, dict[str, object]]], tokenizer: Tokenizer, seq_len: int
) -> TokenData:
    """One example per record: prompt then response then eos, padded; only response tokens are labels."""
    rows, masks, labels = [], [], []
    for lineno, rec in records:
        if "text" in rec and not any(k in rec for k in PROMPT_KEYS):
            raise DataError(f'{p}:{lineno}: a {{"text"}} record among instructions; one format per file')
        prompt = tokenizer.encode(
            format_prompt(
                _get_str(p, lineno, rec, PROMPT_KEYS, True), _get_str(p, lineno, rec, ("input",), False)
            )
        )
        response = tokenizer.encode(_get_str(p, lineno, rec, RESPONSE_KEYS, True)) + [tokenizer.eos_id]
        ids = (prompt + response)[:seq_len]
        n_prompt = min(len(prompt), seq_len)
        if n_prompt == len(ids):
            continue  # the prompt fills the whole block: nothing to learn from this record
        pad = seq_len - len(ids)
        rows.append(ids + [tokenizer.pad_id] * pad)
        masks.append([1] * len(ids) + [0] * pad)
        labels.append([IGNORE_INDEX] * n_prompt + ids[n_prompt:] + [IGNORE_INDEX] * pad)
    if len(rows) < 2:
        raise DataError(
            f"{p}: {len(rows)} usable instruction record(s) (prompts longer "
            f"than seq_len={seq_len} are skipped); need at least 2; give more records or "
            "a longer seq_len"
        )
    return TokenData(torch.tensor(rows), torch.tensor(masks), torch.tensor(labels))


def _classification(
    p: Path, text: str, tokenizer: Tokenizer, seq_len: int, num_labels: int | None
) -> TokenData:
    """Rows of (text, integer label), truncated and padded to seq_len with the model's special tokens."""
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
    rows, masks, labels = [], [], []
    for row in reader:
        lineno = reader.line_num
        if not row or all(not c.strip() for c in row):
            continue
        if len(row) != len(header):
            raise DataError(
                f"{p}:{lineno}: {len(row)} columns, the header has {len(header)}; check the "
                f"{'tabs' if delimiter == chr(9) else 'commas and quoting'} on that line"
            )
        try:
            label = int(row[label_col])
        except ValueError:
            raise DataError(f"{p}:{lineno}: label {row[label_col]!r} is not an integer class index") from None
        if label < 0 or (num_labels is not None and label >= num_labels):
            raise DataError(
                f"{p}:{lineno}: label {label} is outside 0..{(num_labels or 1) - 1} (the plan's num_labels)"
            )
        ids = tokenizer.encode_wrapped(row[text_col].strip())
        if len(ids) > seq_len:
            ids = ids[: seq_len - 1] + ids[-1:]  # keep the closing special token
        pad = seq_len - len(ids)
        rows.append(ids + [tokenizer.pad_id] * pad)
        masks.append([1] * len(ids) + [0] * pad)
        labels.append(label)
    if len(rows) < 2:
        raise DataError(f"{p}: {len(rows)} data row(s); need at least 2 (one to train, one to evaluate)")
    return TokenData(torch.tensor(rows), torch.tensor(masks), torch.tensor(labels, dtype=torch.long))


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
