"""The measurement of a causal language model (dnc.lm.hf, dnc.lm.measure, dnc.lm.stage): per-layer
metrics against dnc.metrics.layer_metrics on the hidden states gathered in memory from
output_hidden_states with the windows and labels of docs/language_models.md, layer groups, dropped
test samples, accuracy, checkpoint folders, random initialisation, bad inputs refused before any
forward pass, the memory plan and the gathering of steps."""

import math

import numpy as np
import pandas as pd
import pytest
import torch

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from dnc.data.spec import TextSpec  # noqa: E402
from dnc.io import BadInputError, read_metadata  # noqa: E402
from dnc.lm import hf  # noqa: E402
from dnc.lm.corpus import prepare_text_dataset, read_windows  # noqa: E402
from dnc.lm.measure import (  # noqa: E402
    LMMemoryError,
    LMMemoryPlan,
    ModelShape,
    TokenClasses,
    layer_state_bytes,
    measure_split,
    plan_memory,
)
from dnc.lm.stage import gather_lm_metrics, measure_lm_step  # noqa: E402
from dnc.metrics import Convention, layer_metrics  # noqa: E402
from dnc.metrics.accumulators import ClassMeanAccumulator, ResidualAccumulator  # noqa: E402

CONTEXT, BATCH = 24, 4
WORDS = ("the cat sat on a mat while dogs ran past old trees and small birds sang softly near quiet "
         "rivers under grey skies every morning").split()
# Only at the end of the corpus, so in the test windows: labels that are no train class.
TAIL = "\nZebra 12345 QUOKKA 67890 xylophone JIVE {}[]<> Zebra 0987 QUIZ!"


def _text(seed: int, sentences: int) -> str:
    rng = np.random.default_rng(seed)
    return "\n".join(" ".join(rng.choice(WORDS, size=rng.integers(4, 12))) + "." for _ in range(sentences))


def _gpt2(vocab: int, positions: int = 32, seed: int = 0, base: bool = False):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=vocab, n_positions=positions, n_embd=32, n_layer=2, n_head=2)
    return (transformers.GPT2Model if base else transformers.GPT2LMHeadModel)(cfg).eval()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: the tensors here are tiny, and on a busy machine OpenMP threads waiting for
    each other made every step 30x slower (11.5 s against 0.37 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tmp = tmp_path_factory.mktemp("lm_measure")
    text = _text(1, 100) + TAIL
    (tmp / "corpus.txt").write_text(text, encoding="utf-8")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([_text(1, 100)], trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok.save(str(tmp / "tokenizer.json"))
    meta = prepare_text_dataset(TextSpec("text", str(tmp / "corpus.txt"), str(tmp / "tokenizer.json"),
                                         context=CONTEXT, test_fraction=0.25), tmp / "data.parquet")
    vocab = meta["vocab_size"]
    _gpt2(vocab).save_pretrained(tmp / "model")
    model = _gpt2(vocab, seed=1)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)  # a step whose states differ clearly from the model folder's
    model.save_pretrained(tmp / "run" / "checkpoint-7")
    return {"tmp": tmp, "data": str(tmp / "data.parquet"), "vocab": vocab, "meta": meta}


def _settings(lm, **kw):
    return {"model": f"hf:{lm['tmp'] / 'model'}", "kwargs": {}, "layers": "all", "batch_size": BATCH,
            "dataset": "txt", **kw}


def _measure(lm, tmp_path, folder=None, name="step.parquet", step=0, **kw):
    folder = str(lm["tmp"] / "model") if folder is None else folder
    summary = measure_lm_step(_settings(lm, **kw), "gpt", step, folder, lm["data"], str(tmp_path / name), {},
                              device="cpu", progress=False)
    return pd.read_parquet(tmp_path / name), summary


def _value(table, metric, split, node):
    rows = table[(table["metric"] == metric) & (table["split"] == split) & (table["node"] == node)]
    return rows["value"].item()


def _reference(folder, lm, split):
    """dnc.metrics.layer_metrics per hidden state on the hidden states of the model's own forward
    (output_hidden_states, the measurement's batches of BATCH windows), samples at positions
    0..T-2 labelled by the next token, renumbered over the train labels, unknown ones dropped;
    the output embedding's rows of the classes and the argmax of the model's logits at the last."""
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()
    train, windows = read_windows(lm["data"], "train"), read_windows(lm["data"], split)
    tokens = np.unique(train[:, 1:])
    with torch.no_grad():
        outs = [model(torch.as_tensor(windows[i:i + BATCH]), output_hidden_states=True)
                for i in range(0, len(windows), BATCH)]
    labels = windows[:, 1:].ravel()
    keep = np.isin(labels, tokens)
    y = np.searchsorted(tokens, labels[keep])
    logits = torch.cat([o.logits[:, :-1] for o in outs]).reshape(-1, model.config.vocab_size)[keep]
    pred_tok = logits.argmax(1).numpy()
    pred = np.where(np.isin(pred_tok, tokens), np.searchsorted(tokens, pred_tok), -1)
    W = model.get_output_embeddings().weight.detach()[torch.as_tensor(tokens)]
    last = len(outs[0].hidden_states) - 1
    ref = {}
    for i in range(last + 1):
        H = torch.cat([o.hidden_states[i][:, :-1] for o in outs]).reshape(-1, W.shape[1])[keep]
        at_last = i == last
        ref[f"hidden_{i}"] = layer_metrics(H, y, num_classes=len(tokens), weight=W if at_last else None,
                                           classifier=True if at_last else None,
                                           predictions=pred if at_last else None)
    accuracy = float(np.mean(pred_tok == labels[keep]))
    return ref, accuracy, int((~keep).sum())


def _assert_close(got: float, want: float, what: str) -> None:
    if math.isnan(want):
        assert math.isnan(got), what
    else:
        assert got == pytest.approx(want, rel=1e-9, abs=1e-12), what


@pytest.mark.parametrize("split", ["train", "test"])
def test_every_metric_equals_layer_metrics_on_the_hidden_states(lm, tmp_path, split):
    table, summary = _measure(lm, tmp_path)
    assert summary["plan"]["windows"] == BATCH and summary["head_ok"]
    ref, accuracy, dropped = _reference(str(lm["tmp"] / "model"), lm, split)
    assert sorted(table["node"].unique()) == sorted(ref)
    for node, values in ref.items():
        for metric, want in values.items():
            _assert_close(_value(table, metric, split, node), want, f"{split} {node} {metric}")
    # nc3 (Papyan's) needs every train class present: in the test split some are absent.
    expected = {"nc3_etf", "nc4", "classifier_error"} | ({"nc3"} if split == "train" else set())
    assert expected <= set(ref["hidden_2"])
    assert "nc3" not in set(table.loc[table["node"] == "hidden_1", "metric"])
    assert _value(table, "accuracy", split, "hidden_2") == pytest.approx(accuracy, abs=0)
    assert set(table.loc[table["metric"] == "accuracy", "node"]) == {"hidden_2"}
    for node in ref:
        assert _value(table, "samples_dropped", split, node) == dropped
        assert _value(table, "vocab_size", split, node) == lm["vocab"]
    assert table.groupby(["node"])["layer"].unique().map(list).to_dict() == {
        "hidden_0": [1], "hidden_1": [2], "hidden_2": [3]}


def test_dropped_test_samples_are_the_labels_that_are_no_train_class(lm, tmp_path):
    table, summary = _measure(lm, tmp_path, layers=[1])
    train, test = read_windows(lm["data"], "train"), read_windows(lm["data"], "test")
    classes = set(train[:, 1:].ravel().tolist())
    dropped = sum(1 for t in test[:, 1:].ravel().tolist() if t not in classes)
    assert dropped > 0 and dropped == lm["meta"]["test_samples_dropped"]
    assert _value(table, "samples_dropped", "test", "hidden_1") == dropped
    assert _value(table, "samples_dropped", "train", "hidden_1") == 0
    assert _value(table, "num_samples", "test", "hidden_1") == test[:, 1:].size - dropped
    assert _value(table, "num_classes", "train", "hidden_1") == len(classes)
    assert summary["classes"] == len(classes) and "accuracy" not in set(table["metric"])
    assert set(table["node"]) == {"hidden_1"} and set(table["layer"]) == {1}


def test_one_layer_per_group_gives_the_same_numbers(lm):
    lm_model, layers = hf.load_language_model(_settings(lm), str(lm["tmp"] / "model"), CONTEXT, lm["vocab"],
                                              torch.device("cpu"))
    windows = read_windows(lm["data"], "test")
    classes = TokenClasses.of(read_windows(lm["data"], "train"), lm["vocab"])
    forward = hf.backbone(lm_model)
    calls = []

    def counted(ids):
        calls.append(ids.shape[0])
        return forward(ids)

    shape, K, conv, cpu = ModelShape(CONTEXT, 32, 3, 2, 128), classes.K, Convention(), torch.device("cpu")
    # A budget that holds the classifier's hidden state and BATCH windows, but not one more state.
    single = plan_memory([2], K, shape, BATCH, cpu, conv, 2, budget=2**40)
    tight = plan_memory(layers, K, shape, BATCH, cpu, conv, 2, budget=single.needed + 1024)
    assert tight.groups == ((0,), (1,), (2,)) and tight.windows == BATCH, tight
    split = {}
    for name, plan in (("one group", LMMemoryPlan("cpu", 32, ((0, 1, 2),), BATCH)), ("tight", tight)):
        calls.clear()
        split[name] = measure_split(counted, windows, classes, layers, plan, conv, lm_model.head, 2,
                                    progress=False)
        batches = -(-len(windows) // plan.windows)
        assert len(calls) == 2 * len(plan.groups) * batches, name
    assert split["tight"].metrics == split["one group"].metrics
    assert split["tight"].accuracy == split["one group"].accuracy


def test_a_checkpoint_folder_is_measured_with_its_own_weights(lm, tmp_path):
    folder = str(lm["tmp"] / "run" / "checkpoint-7")
    table, _ = _measure(lm, tmp_path, folder=folder, step=7, layers=[0, 2])
    base, _ = _measure(lm, tmp_path, name="base.parquet", layers=[0, 2])
    ref, accuracy, _ = _reference(folder, lm, "train")
    for node in ("hidden_0", "hidden_2"):
        for metric in ("nc1_pinv", "nc1_trace", "nc2_etf", "cdnv"):
            _assert_close(_value(table, metric, "train", node), ref[node][metric], f"{node} {metric}")
        assert _value(table, "nc1_pinv", "train", node) != _value(base, "nc1_pinv", "train", node)
    _assert_close(_value(table, "nc3", "train", "hidden_2"), ref["hidden_2"]["nc3"], "nc3")
    assert set(table["step"]) == {7} and read_metadata(tmp_path / "step.parquet", "dnc:step") == 7
    assert read_metadata(tmp_path / "step.parquet", "dnc:nodes") == {"1": "hidden_0", "2": "hidden_2"}
    assert read_metadata(tmp_path / "step.parquet", "dnc:checkpoint") == folder


def test_random_initialisation_is_seeded_and_leaves_the_global_generator(lm, tmp_path):
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    a, _ = _measure(lm, tmp_path, folder="", name="a.parquet", seed=5, layers=[1])
    assert torch.equal(torch.random.get_rng_state(), state)
    b, _ = _measure(lm, tmp_path, folder="", name="b.parquet", seed=5, layers=[1])
    c, _ = _measure(lm, tmp_path, folder="", name="c.parquet", seed=6, layers=[1])
    folder, _ = _measure(lm, tmp_path, name="folder.parquet", layers=[1])
    tables = {"a": a, "b": b, "c": c, "f": folder}
    nc1 = {k: _value(t, "nc1_pinv", "train", "hidden_1") for k, t in tables.items()}
    assert nc1["a"] == nc1["b"] and nc1["a"] != nc1["c"] and nc1["a"] != nc1["f"]
    assert read_metadata(tmp_path / "a.parquet", "dnc:checkpoint") == "init"


@pytest.fixture
def no_forward(monkeypatch):
    """Any forward pass of a GPT-2 fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("a forward pass ran before the input was refused")

    for cls in (transformers.GPT2Model, transformers.GPT2LMHeadModel):
        monkeypatch.setattr(cls, "forward", refuse)


def test_bad_inputs_are_refused_before_any_forward_pass(lm, tmp_path, no_forward):
    cases = {
        "base_only": (_gpt2(lm["vocab"], base=True), {}, ["not a causal language model", "GPT2Model"]),
        "small_vocab": (_gpt2(lm["vocab"] - 50), {}, ["tokenizer", str(lm["vocab"] - 50)]),
        "short": (_gpt2(lm["vocab"], positions=16), {}, ["16 positions", f"context is {CONTEXT}"]),
        "layers": (_gpt2(lm["vocab"]), {"layers": [0, 3]}, ["layers [0, 3]", "from 0", "to 2"]),
    }
    for name, (model, extra, words) in cases.items():
        model.save_pretrained(tmp_path / name)
        settings = _settings(lm, model=f"hf:{tmp_path / name}", **extra)
        with pytest.raises(BadInputError) as e:
            measure_lm_step(settings, "gpt", 0, str(tmp_path / name), lm["data"], str(tmp_path / "o.parquet"),
                            {}, device="cpu", progress=False)
        assert str(tmp_path / name) in str(e.value), name
        for w in words:
            assert w in str(e.value), (name, w, str(e.value))
    (tmp_path / "empty").mkdir()
    with pytest.raises(BadInputError, match="config.json"):
        measure_lm_step(_settings(lm), "gpt", 0, str(tmp_path / "empty"), lm["data"],
                        str(tmp_path / "o.parquet"), {}, device="cpu", progress=False)
    assert not (tmp_path / "o.parquet").exists()


def test_a_job_limit_below_one_layer_is_refused_before_any_forward_pass(lm, tmp_path, no_forward):
    from dnc.rfm.plan import process_rss

    mem_mb = process_rss() // 10**6 + 1  # a limit the process already nearly fills
    with pytest.raises(LMMemoryError) as e:
        measure_lm_step(_settings(lm), "gpt", 0, str(lm["tmp"] / "model"), lm["data"],
                        str(tmp_path / "o.parquet"), {}, device="cpu", mem_mb=mem_mb, progress=False)
    assert "mem_mb" in str(e.value) and "one hidden state" in str(e.value) and "K = " in str(e.value)


def test_plan_takes_the_fewest_groups_then_the_most_windows():
    shape, conv, cpu = ModelShape(256, 768, 13, 12, 3072), Convention(), torch.device("cpu")
    layers, K = list(range(13)), 16384
    # A vocabulary-sized K: the class statistics outweigh what fewer windows per pass would free.

    def plan(group, batch, budget):
        return plan_memory(list(group), K, shape, batch, cpu, conv, 12, budget=int(budget))

    roomy = plan(layers, 16, 2**40)
    assert roomy.groups == (tuple(layers),) and roomy.windows == 16
    # Room for the classifier's state and 16 windows, plus about four more states.
    alone = plan([12], 16, 2**40).needed
    for budget in (alone + 4.5 * 1.1 * layer_state_bytes(K, 768, conv), alone, alone - 2**27):
        some, one = plan(layers, 16, budget), plan(layers, 1, budget)
        assert [i for g in some.groups for i in g] == layers and some.needed <= budget
        assert len(some.groups) == len(one.groups) > 1 and one.windows == 1
        w = some.windows
        for g, after in zip(some.groups, some.groups[1:]):  # each group fits, and is full
            assert plan(g, w, budget).groups == (g,) and plan(g, w, budget).windows == w
            more = plan(g + after[:1], w, budget)
            assert len(more.groups) == 2 or more.windows < w
    assert plan(layers, 16, alone - 2**27).windows < 16
    with pytest.raises(LMMemoryError, match="needs about .* but only 1.0 MiB is available"):
        plan(layers, 16, 2**20)


@pytest.mark.parametrize("K,d,classifier", [(300, 32, True), (20, 64, True), (5000, 64, False)])
def test_layer_state_estimate_covers_the_accumulator_state(K, d, classifier):
    g = torch.Generator().manual_seed(0)
    y = torch.arange(4 * K) % K
    H = torch.randn(4 * K, d, generator=g)
    acc = ClassMeanAccumulator(K, d)
    acc.accumulate(H, y)
    W = torch.randn(K, d, generator=g) if classifier else None
    res = ResidualAccumulator(acc.compute(), Convention(), weight=W, classifier=True if classifier else None)
    res.accumulate(H, y)
    seen, held = set(), 0
    for obj in (res, res.means, res.geo, res._work, res._gather):
        for t in vars(obj).values():
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen:
                seen.add(t.untyped_storage().data_ptr())
                held += t.untyped_storage().nbytes()
    estimate = layer_state_bytes(K, d, Convention(), classifier)
    assert held <= estimate < 2 * held + 8 * 2**20


def test_head_that_is_not_the_last_state_drops_classifier_measures(lm, tmp_path, monkeypatch):
    forward = transformers.GPT2LMHeadModel.forward

    def scaled(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        out.logits = out.logits * 2 + 1  # a head that rescales: not head(last hidden state)
        return out

    monkeypatch.setattr(transformers.GPT2LMHeadModel, "forward", scaled)
    table, summary = _measure(lm, tmp_path, layers=[2])
    assert not summary["head_ok"]
    assert {"nc3", "nc4", "accuracy", "classifier_error"}.isdisjoint(table["metric"])
    assert "nc1_pinv" in set(table["metric"])


def test_gather_concatenates_steps_and_refuses_other_hidden_states(lm, tmp_path):
    a, _ = _measure(lm, tmp_path, name="s0.parquet", layers=[0, 2])
    b, _ = _measure(lm, tmp_path, folder=str(lm["tmp"] / "run" / "checkpoint-7"), name="s7.parquet", step=7,
                    layers=[0, 2])
    steps = [str(tmp_path / "s0.parquet"), str(tmp_path / "s7.parquet")]
    table = gather_lm_metrics(steps, str(tmp_path / "m.parquet"))
    back = pd.read_parquet(tmp_path / "m.parquet")
    assert len(back) == len(a) + len(b) == len(table)
    assert sorted(back["step"].unique()) == [0, 7] and back["node"].dtype == "string"
    assert read_metadata(tmp_path / "m.parquet", "dnc:steps") == [0, 7]
    _measure(lm, tmp_path, name="other.parquet", layers=[1])
    with pytest.raises(BadInputError, match="hidden states"):
        gather_lm_metrics([steps[0], str(tmp_path / "other.parquet")], str(tmp_path / "x.parquet"))
    assert not (tmp_path / "x.parquet").exists()


def _write_dataset(path, windows: np.ndarray, n_test: int, vocab: int) -> None:
    """A text dataset file in the layout of docs/schemas.md, from given windows (n, T)."""
    import pyarrow as pa

    from dnc.io import write_parquet

    n, T = windows.shape
    meta = {"name": "text", "context": T, "vocab_size": vocab, "tokens": int(windows.size),
            "windows": {"train": n - n_test, "test": n_test}}
    write_parquet(pa.table({
        "split": pa.array(["train"] * (n - n_test) + ["test"] * n_test, pa.string()),
        "window": pa.array(np.arange(n, dtype=np.int32)),
        "tokens": pa.FixedSizeListArray.from_arrays(pa.array(windows.astype(np.int32).ravel()), T),
    }), path, {"dnc:dataset": meta})


def test_a_split_without_two_classes(lm, tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    windows = rng.integers(0, 40, size=(6, CONTEXT))
    windows[-1] = 7  # the test window's labels: one token
    _write_dataset(tmp_path / "one_test_class.parquet", windows, 1, lm["vocab"])
    lm_one = {**lm, "data": str(tmp_path / "one_test_class.parquet")}
    table, summary = _measure(lm_one, tmp_path, layers=[1])
    assert set(table["split"]) == {"train"} and set(summary["samples"]) == {"train"}
    _write_dataset(tmp_path / "none.parquet", windows[:5], 0, lm["vocab"])
    table, _ = _measure({**lm, "data": str(tmp_path / "none.parquet")}, tmp_path, layers=[1])
    assert set(table["split"]) == {"train"}
    windows[:] = 7
    _write_dataset(tmp_path / "one_class.parquet", windows, 1, lm["vocab"])
    monkeypatch.setattr(transformers.GPT2Model, "forward", lambda *a, **k: pytest.fail("forward pass"))
    with pytest.raises(BadInputError, match="1 distinct label token.*at least 2 classes"):
        _measure({**lm, "data": str(tmp_path / "one_class.parquet")}, tmp_path, layers=[1])
