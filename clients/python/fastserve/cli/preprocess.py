"""`fastserve preprocess`: upload and clean corpora, train tokenizers, build datasets; and `fastserve
tokenize`, which shows how a tokenizer splits a text."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.text import Text

from fastserve.cli.common import SOURCE_FLAGS, command, group, print_json, print_table, state, table, to_dict
from fastserve.cli.jobs import add_job_commands, submitted
from fastserve.client.specs import corpus_source

app = group("Upload and clean corpora, train tokenizers, build datasets (jobs).")


def _client(ctx: typer.Context):
    return state(ctx).client().preprocessing


Source = Annotated[str, typer.Option(
    help="artifact://corpora/<name>/<version>, or a built-in corpus (stdlib-docstrings).")]
Seed = Annotated[int, typer.Option(help="Built-in corpus: seed of its document order.")]
MaxDocuments = Annotated[int, typer.Option(help="Built-in corpus: keep the first N documents; 0 for all.")]
TopLabels = Annotated[int, typer.Option(help="Built-in corpus: keep the N most frequent labels; 0 for all.")]
Output = Annotated[str, typer.Option("--output", help="Name of the artifact the job registers.")]
Follow = Annotated[bool, typer.Option("--watch", help="Follow the job to its end.")]

UPLOAD_FLAGS = {"header": "--name", "header.name": "--name", "header.format": "--format",
                "header.text_field": "--text-field", "header.label_field": "--label-field",
                "header.target_field": "--target-field", "chunk": "path"}


@command(app, "upload", help="Upload a text (one document a line), JSONL or CSV file as a corpus.",
         flags=UPLOAD_FLAGS)
def upload(ctx: typer.Context, path: Annotated[Path, typer.Argument(exists=True, dir_okay=False)],
           name: Annotated[str, typer.Option(help="Corpus name.")],
           format: Annotated[str, typer.Option(help="plain, jsonl or csv.")] = "plain",
           text_field: Annotated[str, typer.Option(help="JSONL field or CSV column of the text; default: text.")]
           = "",
           label_field: Annotated[str, typer.Option(help="Field or column of the label; default: none.")] = "",
           target_field: Annotated[str, typer.Option(help="Field or column of the target text (seq2seq); "
                                                          "default: none.")] = "") -> int:
    reply = _client(ctx).upload_corpus(name, path, format=format, text_field=text_field, label_field=label_field,
                                       target_field=target_field)
    if state(ctx).json:
        print_json(to_dict(reply))
    else:
        print(f"{reply.corpus.uri}  {reply.documents} documents, {reply.bytes_received} bytes")
    return 0


@command(app, "clean", help="Clean a corpus with an ordered pipeline of steps.",
         flags={**SOURCE_FLAGS, "steps": "--step", "output_name": "--output"})
def clean(ctx: typer.Context, source: Source, output: Output,
          step: Annotated[list[str], typer.Option(
              help="A step and its options: nfkc, strip_html, length_filter,min_chars=10, dedup_near,threshold=0.8 ..."
                   " In order; repeatable.")],
          seed: Seed = 0, max_documents: MaxDocuments = 0, top_labels: TopLabels = 0, follow: Follow = False) -> int:
    client = _client(ctx)
    job = client.submit_clean_job(corpus_source(source, seed, max_documents, top_labels), step, output)
    return submitted(ctx, client, job, follow)


TOKENIZER_FLAGS = {**SOURCE_FLAGS, "model": "--model", "vocab_size": "--vocab-size",
                   "special_tokens": "--special-token", "lowercase": "--lowercase", "min_frequency": "--min-frequency",
                   "output_name": "--output"}


@command(app, "tokenizer", help="Train a tokenizer (byte-level BPE, WordPiece or Unigram) on a corpus.",
         flags=TOKENIZER_FLAGS)
def tokenizer(ctx: typer.Context, source: Source, output: Output,
              model: Annotated[str, typer.Option(help="bpe, wordpiece or unigram.")] = "bpe",
              vocab_size: Annotated[int, typer.Option(help="Vocabulary size, special tokens included.")] = 8000,
              special_token: Annotated[list[str] | None, typer.Option(help="Repeatable; default per model.")] = None,
              lowercase: Annotated[bool, typer.Option(help="Lower-case the text first.")] = False,
              min_frequency: Annotated[int | None, typer.Option(
                  help="Fewest occurrences for a merge or word to enter the vocabulary (BPE, WordPiece); default: "
                       "the server's (2).")] = None,
              seed: Seed = 0, max_documents: MaxDocuments = 0, top_labels: TopLabels = 0,
              follow: Follow = False) -> int:
    client = _client(ctx)
    job = client.train_tokenizer(corpus_source(source, seed, max_documents, top_labels), output, model=model,
                                 vocab_size=vocab_size, special_tokens=special_token or (), lowercase=lowercase,
                                 min_frequency=min_frequency or 0)
    return submitted(ctx, client, job, follow)


DATASET_FLAGS = {**SOURCE_FLAGS, "tokenizer_uri": "--tokenizer", "task": "--task", "max_length": "--max-length",
                 "splits": "--validation or --test", "splits.validation_fraction": "--validation",
                 "splits.test_fraction": "--test", "splits.seed": "--split-seed", "output_name": "--output"}


@command(app, "dataset", help="Tokenize a corpus into train/validation/test shards for a training task.",
         flags=DATASET_FLAGS)
def dataset(ctx: typer.Context, source: Source, output: Output,
            tokenizer: Annotated[str, typer.Option(help="Tokenizer URI (artifact://tokenizers/... or builtin://...).")],
            task: Annotated[str, typer.Option(help="causal_lm, sequence_classification or seq2seq.")] = "causal_lm",
            max_length: Annotated[int | None, typer.Option(
                help="Block (causal_lm) or truncation length, in tokens; default: the server's (512).")] = None,
            validation: Annotated[float | None, typer.Option(
                help="Validation fraction; default: the server's (0.05).")] = None,
            test: Annotated[float, typer.Option(help="Test fraction.")] = 0.0,
            split_seed: Annotated[int, typer.Option(help="Seed of the split shuffle.")] = 0,
            seed: Seed = 0, max_documents: MaxDocuments = 0, top_labels: TopLabels = 0, follow: Follow = False) -> int:
    client = _client(ctx)
    job = client.build_dataset(corpus_source(source, seed, max_documents, top_labels), tokenizer, output, task=task,
                               max_length=max_length or 0, validation_fraction=validation, test_fraction=test,
                               seed=split_seed)
    return submitted(ctx, client, job, follow)


add_job_commands(app, _client)

DEFAULT_TOKENIZER = "builtin://all-MiniLM-L6-v2"
TOKENIZE_FLAGS = {"tokenizer_uri": "--tokenizer", "texts": "texts", "add_special_tokens": "--special-tokens"}


def register(app: typer.Typer) -> None:
    @command(app, "tokenize", help="Show how a tokenizer splits texts: each text's token ids and tokens.",
             flags=TOKENIZE_FLAGS)
    def tokenize(ctx: typer.Context, texts: list[str],
                 tokenizer: Annotated[str, typer.Option(
                     help="Tokenizer URI (artifact://tokenizers/<name>/<version>, or a model's: "
                          "artifact://models/..., builtin://...).")] = DEFAULT_TOKENIZER,
                 special_tokens: Annotated[bool, typer.Option(
                     help="Add the tokenizer's special tokens (BOS/EOS, [CLS]/[SEP]).")] = False) -> int:
        reply = _client(ctx).tokenize(tokenizer, texts, add_special_tokens=special_tokens)
        if state(ctx).json:
            print_json({"tokenizer": tokenizer,
                        "results": [{"text": t, **to_dict(r)} for t, r in zip(texts, reply.results, strict=True)]})
            return 0
        rows = table("text", "count", "ids", "tokens", long=("text", "ids", "tokens"))
        for text, result in zip(texts, reply.results, strict=True):
            # JSON lists: a token may hold a space or a comma, and the ids can be pasted as they are.
            rows.add_row(Text(text), str(len(result.ids)), Text(json.dumps(list(result.ids))),
                         Text(json.dumps(list(result.tokens), ensure_ascii=False)))
        print_table(ctx, rows)
        return 0
