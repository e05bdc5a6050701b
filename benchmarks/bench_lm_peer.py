r"""dnc against rhubarbwu/neural-collapse on the same hidden states of the same causal language model
(issue 19, point 7): values and wall time.

Hidden states: a GPT-2 (transformers GPT2LMHeadModel, random initialisation seeded by --seed, or a
trained Hugging Face folder given by --model) over the text windows of docs/language_models.md:
the corpus (--corpus, or Python's pydoc_data topics in key order joined by a blank line, as the
DAG's lm_corpus writes it), a byte-level BPE of --vocab tokens trained on it with the tokenizers
package (or --tokenizer), windows of --context tokens (dnc.lm.corpus.cut_windows; the last tenth
are the test split, unused here). Position t of a train window is a sample of class window[t + 1];
the classes are the token ids occurring as labels, renumbered 0..K-1 in id order, and the
classifier is the output embedding's rows of those ids. The hidden states of --layers are computed
once and held in memory (float32, (N, d) per layer).

Both engines get exactly the same chunks (--chunk-windows windows of context - 1 samples each):
- dnc: dnc.metrics.accumulators.metrics_from_chunks, its whole default set plus the classifier
  measures, with Convention(ncc_max_classes=None) so that the NC4 decisions are made at any K;
- the peer (--peer: a checkout of https://github.com/rhubarbwu/neural-collapse, put on sys.path at
  run time, never a dependency): MeanAccumulator, then CovarAccumulator, VarNormAccumulator and
  DecAccumulator in one second pass, then its measures (covariance_ratio pinv and quotient,
  variability_cdnv with dist_exp 1 and 2, simplex_etf_error, mean_norms, kernel_stats with its
  distance, log and Riesz kernels and with a cosine kernel on its tiling, self_duality_error,
  similarities, clf_ncc_agreement), tiled by --peer-tile. Its default float32, and float64
  (accumulators with dtype=float64 and torch's default dtype float64, so that its kernel grids,
  allocated with the default dtype, are float64 too).

Timing at the last chosen hidden state: the full computation (both passes, every measure above) of
dnc and of the float32 peer, and both without the NC4 decisions (dnc: ncc_max_classes=0; the peer:
no DecAccumulator), --repeats runs per thread count in --threads, the order alternated between
repeats, medians of wall and CPU time; the float64 peer once. --ks repeats the full pair at fewer
classes (the K most frequent train labels and their samples). --memory: one child process per
engine loads the tensors, resets its peak resident set (/proc/self/clear_refs) and reports the
peak (VmHWM) above that baseline.

    git clone https://github.com/rhubarbwu/neural-collapse /tmp/nc_peer
    python benchmarks/bench_lm_peer.py --peer /tmp/nc_peer --memory --ks 1024,2048,4096 \
        --sweep-repeats 3 --json benchmarks/results/lm_peer_cpu.json
    # the model config/lm.yaml trains, with its corpus and tokenizer: values, 1-thread timing
    python benchmarks/bench_lm_peer.py --peer /tmp/nc_peer --model results/lm/tiny_gpt/checkpoint-160 \
        --tokenizer results/lm/tiny_gpt/tokenizer.json --corpus results/lm/tiny_gpt/corpus.txt \
        --threads 1 --label trained_tiny_gpt --json benchmarks/results/lm_peer_cpu.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
from common import machine

from dnc.lm.corpus import cut_windows, encode_corpus, load_tokenizer, read_corpus
from dnc.metrics.accumulators import metrics_from_chunks
from dnc.metrics.formulas import Convention

CONVENTION = Convention(ncc_max_classes=None)  # the peer decides NC4 at every K, so dnc does too
NO_DECISIONS = Convention(ncc_max_classes=0)  # the variant without NC4 on both sides


def pydoc_text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def train_tokenizer(text: str, vocab: int):
    """Byte-level BPE of vocab tokens trained on text (as tests/test_workflow_lm.py trains one)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator([text], trainer)
    return tok


def load_model(args, vocab: int):
    """The causal LM: --model (local files only) or a seeded random GPT-2 of vocab tokens."""
    import transformers

    if args.model:
        return transformers.AutoModelForCausalLM.from_pretrained(args.model, local_files_only=True).eval()
    torch.manual_seed(args.seed)
    cfg = transformers.GPT2Config(vocab_size=vocab, n_positions=args.context, n_embd=args.n_embd,
                                  n_layer=args.n_layer, n_head=args.n_head, bos_token_id=None,
                                  eos_token_id=None)
    return transformers.GPT2LMHeadModel(cfg).eval()


def hidden_states(model, windows: np.ndarray, layers: list[int], batch: int) -> list[torch.Tensor]:
    """(N, d) float32 hidden states per layer index, N = n_windows * (context - 1): positions
    0 .. context - 2 of each window in stream order (the last position has no label)."""
    parts: list[list[torch.Tensor]] = [[] for _ in layers]
    ids = torch.from_numpy(windows.astype(np.int64))
    with torch.inference_mode():
        for lo in range(0, len(ids), batch):
            hs = model(ids[lo:lo + batch], output_hidden_states=True).hidden_states
            for out, i in zip(parts, layers):
                out.append(hs[i][:, :-1, :].reshape(-1, hs[i].shape[-1]).float())
    return [torch.cat(p) for p in parts]


def select_classes(tokens: np.ndarray, k: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Mask of the samples kept and the sorted token ids of the classes: all labels (k None) or
    the k most frequent (ties to the lower id). tokens: (N,) label token ids."""
    counts = np.bincount(tokens)
    present = np.flatnonzero(counts)
    if k is not None and k < len(present):
        order = np.lexsort((present, -counts[present]))  # by count descending, then id
        present = np.sort(present[order[:k]])
    return np.isin(tokens, present), present


def make_chunks(H: torch.Tensor, y: torch.Tensor, rows: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(H[i:i + rows], y[i:i + rows]) for i in range(0, H.shape[0], rows)]


def dnc_engine(chunks, K: int, d: int, W: torch.Tensor | None, nc4: bool = True) -> dict[str, float]:
    return metrics_from_chunks(lambda: iter(chunks), K, d, weight=W,
                               convention=CONVENTION if nc4 else NO_DECISIONS,
                               classifier=None if W is None else True, feature_dtype=torch.float32)


def _peer_accumulate(chunks, K: int, d: int, W, dtype, nc4: bool):
    """The peer's two passes: class means, then Sigma_W, the per-class variance norms and (nc4)
    the classifier/NCC agreement (README usage, CPU)."""
    from neural_collapse.accumulate import (
        CovarAccumulator,
        DecAccumulator,
        MeanAccumulator,
        VarNormAccumulator,
    )

    means_acc = MeanAccumulator(K, d, "cpu", dtype)
    for X, Y in chunks:
        means_acc.accumulate(X, Y)
    M, mG = means_acc.compute()
    covar = CovarAccumulator(K, d, "cpu", dtype, M=M)
    var_norms = VarNormAccumulator(K, d, "cpu", dtype, M=M)
    dec = None if W is None or not nc4 else DecAccumulator(K, d, "cpu", dtype, M=M, W=W)
    for X, Y in chunks:
        covar.accumulate(X, Y, M)
        var_norms.accumulate(X, Y, M)
        if dec is not None:
            dec.accumulate(X, Y, W, M)
    return M, mG, covar.compute(), var_norms.compute()[0], dec


def peer_engine(chunks, K: int, d: int, W: torch.Tensor | None, dtype: torch.dtype,
                tile: int, nc4: bool = True) -> dict[str, float]:
    """The peer's measures, named as dnc's (docs/metrics.md, conventions table): 1 - its NC4
    agreement, population std from its variances, Riesz mean in the log domain."""
    from neural_collapse.kernels import dist_kernel, kernel_stats, log_kernel, riesz_kernel
    from neural_collapse.measure import (
        clf_ncc_agreement,
        covariance_ratio,
        mean_norms,
        self_duality_error,
        similarities,
        simplex_etf_error,
        variability_cdnv,
    )
    from neural_collapse.util import tiling

    W = None if W is None else W.to(dtype)
    M, mG, Sw, vn, dec = _peer_accumulate(chunks, K, d, W, dtype, nc4)
    out = {"nc1_pinv": covariance_ratio(Sw, M, mG, "pinv"),
           "nc1_trace": covariance_ratio(Sw, M, mG, "quotient"),
           "cdnv": variability_cdnv(vn, M, 1.0, tile), "cdnv_exp": variability_cdnv(vn, M, 2.0, tile),
           "nc2_etf": simplex_etf_error(M, mG)}
    norms = mean_norms(M, mG)
    out["equinorm"] = (norms.std(unbiased=False) / norms.mean()).item()
    cos_mean, cos_var = kernel_stats(M, mG, lambda x, tile_size: tiling(x, lambda a, b: a @ b.mT, tile_size),
                                     tile)
    out["interference_mean"], out["equiangle"] = cos_mean, math.sqrt(cos_var)
    for name, kernel in (("dist", dist_kernel), ("log", log_kernel)):
        mean, var = kernel_stats(M, mG, kernel, tile)
        out[f"nc2g_{name}_mean"], out[f"nc2g_{name}_std"] = mean, math.sqrt(var)
    mean, var = kernel_stats(M, mG, riesz_kernel, tile)
    out["nc2g_riesz_logmean"] = math.log(mean) if mean > 0 else float("nan")
    out["nc2g_riesz_cv"] = math.sqrt(var) / mean if mean > 0 else float("nan")
    if W is not None:
        out["nc3_etf"] = self_duality_error(W, M, mG)
        cos = similarities(W, M, mG, cos=True)
        out["nc3_dual_cos_mean"] = cos.mean().item()
        out["nc3_uniform_duality"] = cos.std(unbiased=False).item()
    if dec is not None:
        out["nc4_classifier"] = 1.0 - clf_ncc_agreement(dec)
    return out


def run_peer(chunks, K, d, W, dtype, tile, nc4: bool = True) -> dict[str, float]:
    """peer_engine, with torch's default dtype set to dtype meanwhile (the peer's grids use it)."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        return peer_engine(chunks, K, d, W, dtype, tile, nc4)
    finally:
        torch.set_default_dtype(before)


ENGINES = {"dnc": lambda c, K, d, W, tile: dnc_engine(c, K, d, W),
           "peer32": lambda c, K, d, W, tile: run_peer(c, K, d, W, torch.float32, tile),
           "peer64": lambda c, K, d, W, tile: run_peer(c, K, d, W, torch.float64, tile),
           "dnc_no_nc4": lambda c, K, d, W, tile: dnc_engine(c, K, d, W, nc4=False),
           "peer32_no_nc4": lambda c, K, d, W, tile: run_peer(c, K, d, W, torch.float32, tile, nc4=False)}
VALUE_ENGINES = ("dnc", "peer32", "peer64")


def compare(dnc: dict[str, float], peer: dict[str, float]) -> dict[str, float]:
    """|peer - dnc| / |dnc| per measure the peer gives (absolute difference where dnc's is 0)."""
    out = {}
    for key, p in peer.items():
        ref = dnc.get(key, float("nan"))
        out[key] = abs(p - ref) / abs(ref) if ref != 0 else abs(p - ref)
    return out


def time_engines(chunks, K, d, W, tile, threads: list[int], repeats: int,
                 pairs: tuple[tuple[str, str], ...]) -> dict:
    """Wall and CPU time of each (dnc, peer) pair of engines per thread count: repeats runs, the
    order alternated between repeats, medians and the peer/dnc ratio of the medians."""
    out: dict = {}
    engines = [e for pair in pairs for e in pair]
    last: dict[str, dict[str, float]] = {}
    for t in threads:
        torch.set_num_threads(t)
        wall: dict[str, list[float]] = {e: [] for e in engines}
        cpu: dict[str, list[float]] = {e: [] for e in engines}
        loads = []
        for r in range(repeats):
            for engine in (engines if r % 2 == 0 else engines[::-1]):
                t0, c0 = time.perf_counter(), time.process_time()
                last[engine] = ENGINES[engine](chunks, K, d, W, tile)
                wall[engine].append(time.perf_counter() - t0)
                cpu[engine].append(time.process_time() - c0)
            loads.append(os.getloadavg()[0])
            print(f"  threads {t}: " + ", ".join(f"{e} {wall[e][-1]:.1f} s" for e in engines)
                  + f", load {loads[-1]:.2f}", flush=True)
        med = {e: statistics.median(v) for e, v in wall.items()}
        med_cpu = {e: statistics.median(v) for e, v in cpu.items()}
        out[str(t)] = {"wall_s": wall, "cpu_s": cpu, "median_wall_s": med, "median_cpu_s": med_cpu,
                       "peer_over_dnc_wall": {p: med[p] / med[dn] for dn, p in pairs},
                       "peer_over_dnc_cpu": {p: med_cpu[p] / med_cpu[dn] for dn, p in pairs},
                       "load_avg_1min": loads}
    dn, peer = pairs[0]
    out["values"] = {"dnc": {k: last[dn][k] for k in last[peer]}, "peer32": last[peer],
                     "rel_diff_peer32": compare(last[dn], last[peer])}
    return out


def peak_memory(engine: str, tensors: str, args) -> dict:
    """A child process's peak resident set above its state after loading the tensors."""
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", engine, "--tensors", tensors,
           "--peer", args.peer, "--peer-tile", str(args.peer_tile), "--threads", str(args.threads[0])]
    res = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))


def worker(args) -> None:
    """--worker: one engine on saved tensors; prints baseline and peak RSS (MiB) as JSON."""
    torch.set_num_threads(args.threads[0])
    data = torch.load(args.tensors)
    chunks = make_chunks(data["H"], data["y"], data["rows"])
    K, d = data["K"], data["H"].shape[1]
    g = torch.Generator().manual_seed(0)  # warm-up on 4 classes: imports and lazy set-up
    tiny = make_chunks(torch.randn(256, d, generator=g), torch.arange(256) % 4, 256)
    ENGINES[args.worker](tiny, 4, d, None if data["W"] is None else data["W"][:4], args.peer_tile)
    base = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident set
    t0 = time.perf_counter()
    ENGINES[args.worker](chunks, K, d, data["W"], args.peer_tile)
    wall = time.perf_counter() - t0
    print(json.dumps({"baseline_mib": base / 1024, "peak_mib": _status_kib("VmHWM") / 1024,
                      "peak_above_baseline_mib": (_status_kib("VmHWM") - base) / 1024, "wall_s": wall}))


def build(args) -> dict:
    """Tokens, windows, model and hidden states of the train split; labels as token ids."""
    text = read_corpus(args.corpus)[0] if args.corpus else pydoc_text()
    tok = load_tokenizer(args.tokenizer) if args.tokenizer else train_tokenizer(text, args.vocab)
    vocab = tok.get_vocab_size()
    ids = encode_corpus(text, tok, vocab, "pydoc_data")
    windows, n_test = cut_windows(ids, args.context, 0.1, "pydoc_data")
    train = windows[: len(windows) - n_test]
    model = load_model(args, vocab)
    n_hidden = model.config.num_hidden_layers + 1
    layers = args.layers or sorted({n_hidden // 2, n_hidden - 1})
    t0 = time.perf_counter()
    H = hidden_states(model, train, layers, args.batch)
    W = model.get_output_embeddings().weight.detach().float()  # (vocab, d)
    return {"H": H, "W": W, "tokens": train[:, 1:].reshape(-1).astype(np.int64), "layers": layers,
            "vocab": vocab, "corpus_tokens": int(ids.shape[0]), "train_windows": int(train.shape[0]),
            "forward_s": time.perf_counter() - t0, "n_hidden": n_hidden, "model": model.config.to_dict()}


def subset(data: dict, i: int, k: int | None, rows: int):
    """Chunks, K and classifier rows of layer position i restricted to the classes of k."""
    mask, classes = select_classes(data["tokens"], k)
    y = torch.from_numpy(np.searchsorted(classes, data["tokens"][mask]))
    H = data["H"][i][torch.from_numpy(mask)]
    last = data["layers"][i] == data["n_hidden"] - 1
    W = data["W"][torch.from_numpy(classes)].contiguous() if last else None
    return make_chunks(H, y, rows), len(classes), H, y, W


def values(data: dict, rows: int, tile: int) -> list[dict]:
    """Every engine's values at every chosen layer (all classes), timed once each."""
    out = []
    for i, layer in enumerate(data["layers"]):
        chunks, K, H, _, W = subset(data, i, None, rows)
        entry = {"hidden_state": layer, "N": H.shape[0], "K": K, "d": H.shape[1], "classifier": W is not None}
        for engine in VALUE_ENGINES:
            t0 = time.perf_counter()
            entry[engine] = ENGINES[engine](chunks, K, H.shape[1], W, tile)
            entry[f"{engine}_s"] = time.perf_counter() - t0
            print(f"hidden_{layer} {engine}: {entry[f'{engine}_s']:.2f} s", flush=True)
        entry["rel_diff_peer32"] = compare(entry["dnc"], entry["peer32"])
        entry["rel_diff_peer64"] = compare(entry["dnc"], entry["peer64"])
        out.append(entry)
    return out


def parse_args(argv=None) -> argparse.Namespace:
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--peer", required=True, help="checkout of rhubarbwu/neural-collapse")
    ap.add_argument("--json", help="store the results in this JSON file, under --label")
    ap.add_argument("--label", default="random_gpt2", help="key of this run in the --json file")
    ap.add_argument("--model", help="a Hugging Face causal LM folder (default: random GPT-2)")
    ap.add_argument("--corpus", help="a text file or folder of .txt (default: pydoc_data)")
    ap.add_argument("--tokenizer", help="tokenizer.json (default: a BPE of --vocab trained here)")
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--n-layer", type=int, default=4)
    ap.add_argument("--n-embd", type=int, default=128)
    ap.add_argument("--n-head", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--layers", type=ints, default=None, help="hidden-state indices (default: middle, last)")
    ap.add_argument("--batch", type=int, default=32, help="windows per forward pass")
    ap.add_argument("--chunk-windows", type=int, default=16, help="windows per chunk fed to both engines")
    ap.add_argument("--peer-tile", type=int, default=64, help="the peer's tile_size (64: its README's, "
                    "the fastest of 32-512 here)")
    ap.add_argument("--threads", type=ints, default=[1, 2])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--ks", type=ints, default=[], help="K sweep: time at these many classes too")
    ap.add_argument("--sweep-repeats", type=int, default=1)
    ap.add_argument("--memory", action="store_true", help="peak RSS of each engine in a child process")
    ap.add_argument("--worker", choices=list(ENGINES), help=argparse.SUPPRESS)
    ap.add_argument("--tensors", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def peer_commit(path: str) -> str:
    res = subprocess.run(["git", "-C", path, "rev-parse", "HEAD"], capture_output=True, text=True)
    return res.stdout.strip() if res.returncode == 0 else "unknown (not a git checkout)"


def header(args, data: dict, rows: int) -> dict:
    import tokenizers
    import transformers

    return {"argv": sys.argv, "machine": machine(), "torch": torch.__version__,
            "transformers": transformers.__version__, "tokenizers": tokenizers.__version__,
            "peer": os.path.abspath(args.peer), "peer_commit": peer_commit(args.peer),
            "model": "folder " + args.model if args.model else f"random GPT-2, seed {args.seed}",
            "model_config": {k: data["model"].get(k) for k in ("n_layer", "n_embd", "n_head", "vocab_size")},
            **{k: data[k] for k in ("vocab", "corpus_tokens", "train_windows", "layers", "forward_s")},
            "chunk_rows": rows, "peer_tile": args.peer_tile, "convention": CONVENTION.describe()}


def memory(args, H, y, W, K: int, rows: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "tensors.pt")
        torch.save({"H": H, "y": y, "W": W, "K": K, "rows": rows}, path)
        out = {"K": K, "N": H.shape[0], "threads": args.threads[0],
               **{e: peak_memory(e, path, args) for e in ("dnc", "peer32")}}
    print("memory", out, flush=True)
    return out


def write_json(path: str, label: str, result: dict) -> None:
    """Store result under label in the JSON object at path (other labels kept: one file for the
    random and the trained model's runs)."""
    runs = {}
    if os.path.exists(path):
        with open(path) as f:
            runs = json.load(f)
    runs[label] = result
    with open(path + ".tmp", "w") as f:
        json.dump(runs, f, indent=1, default=float)
    os.replace(path + ".tmp", path)


def main(argv=None) -> None:
    args = parse_args(argv)
    sys.path.insert(0, os.path.abspath(args.peer))
    if args.worker:
        return worker(args)
    torch.set_num_threads(args.threads[0])
    data = build(args)
    rows = args.chunk_windows * (args.context - 1)
    print(f"{data['train_windows']} train windows, hidden states {data['layers']}, "
          f"forward {data['forward_s']:.1f} s", flush=True)
    result = header(args, data, rows)
    result["values"] = values(data, rows, args.peer_tile)
    last = len(data["layers"]) - 1
    chunks, K, H, y, W = subset(data, last, None, rows)
    pairs = (("dnc", "peer32"), ("dnc_no_nc4", "peer32_no_nc4"))
    if args.repeats:
        print(f"timing at K = {K}", flush=True)
        result["timing"] = {"K": K, "N": H.shape[0], **time_engines(
            chunks, K, H.shape[1], W, args.peer_tile, args.threads, args.repeats, pairs)}
    if args.memory:
        result["memory"] = memory(args, H, y, W, K, rows)
    result["k_sweep"] = []
    for k in args.ks:
        chunks, Kk, Hk, _, Wk = subset(data, last, k, rows)
        print(f"K sweep: K = {Kk}, N = {Hk.shape[0]}", flush=True)
        result["k_sweep"].append({"K": Kk, "N": Hk.shape[0], **time_engines(
            chunks, Kk, Hk.shape[1], Wk, args.peer_tile, args.threads[:1], args.sweep_repeats, pairs[:1])})
    if args.json:
        write_json(args.json, args.label, result)
    print(json.dumps({v["hidden_state"]: v["rel_diff_peer32"] for v in result["values"]}, indent=1))


if __name__ == "__main__":
    main()
