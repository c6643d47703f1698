"""`fastserve preprocess`: upload and clean corpora, train tokenizers, build datasets."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fastserve.cli.common import command, group, print_json, state, to_dict
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


@command(app, "upload", help="Upload a text (one document a line), JSONL or CSV file as a corpus.")
def upload(ctx: typer.Context, path: Annotated[Path, typer.Argument(exists=True, dir_okay=False)],
           name: Annotated[str, typer.Option(help="Corpus name.")],
           format: Annotated[str, typer.Option(help="plain, jsonl or csv.")] = "plain",
           text_field: str = "", label_field: str = "", target_field: str = "") -> int:
    reply = _client(ctx).upload_corpus(name, path, format=format, text_field=text_field, label_field=label_field,
                                       target_field=target_field)
    if state(ctx).json:
        print_json(to_dict(reply))
    else:
        print(f"{reply.corpus.uri}  {reply.documents} documents, {reply.bytes_received} bytes")
    return 0


@command(app, "clean", help="Clean a corpus with an ordered pipeline of steps.")
def clean(ctx: typer.Context, source: Source, output: Output,
          step: Annotated[list[str], typer.Option(
              help="A step and its options: nfkc, strip_html, length_filter,min_chars=10, dedup_near,threshold=0.8 ..."
                   " In order; repeatable.")],
          seed: Seed = 0, max_documents: MaxDocuments = 0, top_labels: TopLabels = 0, follow: Follow = False) -> int:
    client = _client(ctx)
    job = client.submit_clean_job(corpus_source(source, seed, max_documents, top_labels), step, output)
    return submitted(ctx, client, job, follow)


@command(app, "tokenizer", help="Train a tokenizer (byte-level BPE, WordPiece or Unigram) on a corpus.")
def tokenizer(ctx: typer.Context, source: Source, output: Output,
              model: Annotated[str, typer.Option(help="bpe, wordpiece or unigram.")] = "bpe",
              vocab_size: Annotated[int, typer.Option(help="Vocabulary size, special tokens included.")] = 8000,
              special_token: Annotated[list[str] | None, typer.Option(help="Repeatable; default per model.")] = None,
              lowercase: bool = False, min_frequency: int = 0, seed: Seed = 0, max_documents: MaxDocuments = 0,
              top_labels: TopLabels = 0, follow: Follow = False) -> int:
    client = _client(ctx)
    job = client.train_tokenizer(corpus_source(source, seed, max_documents, top_labels), output, model=model,
                                 vocab_size=vocab_size, special_tokens=special_token or (), lowercase=lowercase,
                                 min_frequency=min_frequency)
    return submitted(ctx, client, job, follow)


@command(app, "dataset", help="Tokenize a corpus into train/validation/test shards for a training task.")
def dataset(ctx: typer.Context, source: Source, output: Output,
            tokenizer: Annotated[str, typer.Option(help="Tokenizer URI (artifact://tokenizers/... or builtin://...).")],
            task: Annotated[str, typer.Option(help="causal_lm, sequence_classification or seq2seq.")] = "causal_lm",
            max_length: Annotated[int, typer.Option(help="Block or truncation length; 0 for 512.")] = 0,
            validation: Annotated[float | None, typer.Option(help="Validation fraction; default 0.05.")] = None,
            test: Annotated[float, typer.Option(help="Test fraction.")] = 0.0,
            split_seed: Annotated[int, typer.Option(help="Seed of the split shuffle.")] = 0,
            seed: Seed = 0, max_documents: MaxDocuments = 0, top_labels: TopLabels = 0, follow: Follow = False) -> int:
    client = _client(ctx)
    job = client.build_dataset(corpus_source(source, seed, max_documents, top_labels), tokenizer, output, task=task,
                               max_length=max_length, validation_fraction=validation, test_fraction=test,
                               seed=split_seed)
    return submitted(ctx, client, job, follow)


add_job_commands(app, _client)
