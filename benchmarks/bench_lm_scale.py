r"""Issue 19, point 4: a corpus of 1,000,000 tokens through a causal LM with d = 768 and 13 hidden
states, measured by the DAG's measure_lm job, in bounded memory (target: peak RSS under 4 GB).

What it builds under --out (nothing is downloaded; every input is made here):
- corpus/: the first --chars characters of the Python standard library's sources (every .py file
  under the running interpreter's stdlib, in path order, one .txt per source file, named so that
  name order is path order), real text every machine has offline;
- tokenizer.json: a byte-level BPE of --vocab tokens trained on that corpus
  (dnc.lm.train.train_bpe_tokenizer, as the DAG's train_lm_tokenizer does);
- gpt2/: a GPT-2 of GPT-2 small's shape (d = 768, 12 blocks, so 13 hidden states, 12 heads,
  1,024 positions) with --vocab rows, seeded random initialisation (no weights can be downloaded
  here), written by save_pretrained;
- scale.yaml: one text dataset (context --context, max_tokens --tokens, test_fraction 0.1), one
  `hf:` model experiment with `layers: all`, lm_resources mem_mb --mem-mb;
- wf/: a copy of the workflow, run with `snakemake --cores 2` (every job: corpus tokenizing,
  measuring, metrics table, report) under /usr/bin/time -v.

It prints the job's memory plan and summary (groups, windows per forward pass, estimate, peak RSS
of the measuring process), the maximum resident set of any process of the run (GNU time), the
wall time, K and the samples, and stores them in --json under --label.

    .venv/bin/python benchmarks/bench_lm_scale.py --json benchmarks/results/lm_scale_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pandas as pd
import torch
import yaml
from common import machine

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dnc.lm.train import train_bpe_tokenizer  # noqa: E402


def write_corpus(folder: Path, chars: int) -> dict:
    """The stdlib's .py sources in path order as numbered .txt files, up to chars characters."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    folder.mkdir(parents=True, exist_ok=True)
    total, files = 0, 0
    for src in sorted(stdlib.rglob("*.py")):
        if "site-packages" in src.parts or total >= chars:
            continue
        try:
            text = src.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        text = text[: chars - total]
        (folder / f"{files:05d}.txt").write_text(text, encoding="utf-8")
        total, files = total + len(text), files + 1
    return {"stdlib": str(stdlib), "characters": total, "files": files}


def write_model(folder: Path, vocab: int, seed: int) -> int:
    """GPT-2 small's shape with vocab rows, seeded; returns the parameter count."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab, n_positions=1024, n_embd=768, n_layer=12, n_head=12,
                     bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(cfg).eval()
    model.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def config(out: Path, args: argparse.Namespace) -> dict:
    return {
        "device": "auto",
        "lm_resources": {"gpu": 0, "mem_mb": args.mem_mb, "runtime": 600, "threads": args.threads},
        "datasets": {"stdlib": {"name": "text", "path": str(out / "corpus"),
                                "tokenizer": str(out / "tokenizer.json"), "context": args.context,
                                "max_tokens": args.tokens, "test_fraction": 0.1}},
        "models": {"experiments": {"gpt2_768": {"model": f"hf:{out / 'gpt2'}", "dataset": "stdlib",
                                                "layers": "all", "batch_size": args.batch}}},
    }


def run_dag(wd: Path, configfile: Path) -> tuple[float, int, str]:
    """Wall seconds, maximum resident set (bytes) of any process of the run, and the output."""
    cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "snakemake", "--directory", str(wd),
           "--snakefile", str(wd / "Snakefile"), "--cores", "2", "--workflow-profile", "none",
           "--configfile", str(configfile)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    text = proc.stdout + proc.stderr
    if proc.returncode != 0:
        sys.exit(f"snakemake failed ({proc.returncode}):\n{text[-4000:]}")
    kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", text).group(1))
    return seconds, kb * 1024, text


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="/tmp/dnc_lm_scale", help="working folder (inputs, results)")
    ap.add_argument("--tokens", type=int, default=1_000_000)
    ap.add_argument("--chars", type=int, default=5_000_000, help="corpus characters (enough for --tokens)")
    ap.add_argument("--vocab", type=int, default=16384)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--batch", type=int, default=8, help="windows per forward pass (at most)")
    ap.add_argument("--mem-mb", type=int, default=4000, help="lm_resources mem_mb of the measuring job")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="store the results in this JSON file, under --label")
    ap.add_argument("--label", default="gpt2_768_1m")
    args = ap.parse_args(argv)

    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    corpus = write_corpus(out / "corpus", args.chars)
    files = sorted(str(p) for p in (out / "corpus").glob("*.txt"))
    tok = train_bpe_tokenizer(files, args.vocab, out / "tokenizer.json")
    params = write_model(out / "gpt2", tok["vocab_size"], args.seed)
    print(f"corpus {corpus}, tokenizer {tok}, model {params:,} parameters", flush=True)

    wd = out / "wf"
    wd.mkdir()
    for name in ("Snakefile", "workflow", "scripts", "config", "examples"):
        (shutil.copytree if (ROOT / name).is_dir() else shutil.copy)(ROOT / name, wd / name)
    configfile = out / "scale.yaml"
    configfile.write_text(yaml.safe_dump(config(out, args)))
    seconds, max_rss, text = run_dag(wd, configfile)

    logs = "\n".join(p.read_text() for p in sorted((wd / "logs" / "measure_lm").rglob("*.log")))
    plan = [line for line in logs.splitlines() if "memory plan" in line or "peak RSS" in line]
    metrics = pd.read_parquet(next((wd / "results").rglob("metrics.parquet")))
    last = metrics[(metrics["layer"] == metrics["layer"].max()) & (metrics["split"] == "train")]
    values = {m: float(v) for m, v in zip(last["metric"], last["value"])
              if m in ("num_classes", "num_samples", "nc1_pinv", "cdnv", "nc2_etf", "accuracy")}
    result = {"machine": machine(), "argv": sys.argv[1:], "corpus": corpus, "tokenizer": tok,
              "parameters": params, "wall_s": round(seconds, 1), "max_rss_bytes": max_rss,
              "job_log": plan, "last_hidden_train": values, "torch": torch.__version__}
    print(json.dumps(result, indent=1))
    if args.json:
        path = Path(args.json)
        stored = json.loads(path.read_text()) if path.exists() else {}
        stored[args.label] = result
        path.write_text(json.dumps(stored, indent=1) + "\n")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    main()
