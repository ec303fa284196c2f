"""The eager baselines: MeZO and P-RGE eager are one estimator, first-order LoRA learns, the runner's curves."""
from __future__ import annotations

import pytest
import torch

from export.baselines import (
    BASELINES,
    BaselineConfig,
    EagerJob,
    eager_training_job,
    first_order_step,
    frozen_weights,
    measure_peak_rss,
    measure_step_seconds,
    mezo_step,
    prge_eager_step,
    run_baseline,
)
from export.calibration import median_class_bias
from export.lora import AdapterTensors, LoraFaConfig
from export.models import tiny_llama
from export.prge import PrgeConfig, PrgeProgram
from shared.tasks import encode_split, load_examples, load_task_spec, verbalizer_token_ids
from shared.errors import InputError

SEQ_LEN = 32


@pytest.fixture(scope="module")
def task_splits(smollm2_tokenizer):
    """A slice of the embedded Rotten Tomatoes task: 64 train, 24 validation, 20 test examples."""
    task = load_task_spec("rotten_tomatoes")
    examples = load_examples(task)
    sizes = {"train": 64, "validation": 24, "test": 20}
    splits = {name: encode_split(examples[name][:n], task, smollm2_tokenizer, SEQ_LEN) for name, n in sizes.items()}
    return splits, verbalizer_token_ids(task, smollm2_tokenizer)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: these ops are tiny, and on a busy 2-core machine a second
    spinning OpenMP thread made a 5-step MeZO run 50x slower (18 s against 0.3 s)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture()
def tiny(smollm2_tokenizer):
    return tiny_llama(num_layers=2, hidden_size=64, tokenizer=smollm2_tokenizer).model


def build(model, verbalizer, prefix_sharing: bool = True, q: int = 4, bs: int = 4) -> PrgeProgram:
    # Layer 1 of 2 trains: prefix sharing has a layer to share.
    adapter = AdapterTensors.build(model, LoraFaConfig(layers=(1,), target_modules=("q_proj", "v_proj", "down_proj")))
    return PrgeProgram(model, adapter, PrgeConfig(q=q, batch_size=bs, seq_len=SEQ_LEN, prefix_sharing=prefix_sharing),
                       verbalizer)


def batch(split, rows: slice):
    return (torch.as_tensor(split.input_ids[rows]), torch.as_tensor(split.lengths[rows]),
            torch.as_tensor(split.labels[rows]))


def test_mezo_sequential_step_equals_prge_batched_step(tiny, task_splits) -> None:
    splits, verbalizer = task_splits
    batched = build(tiny, verbalizer, prefix_sharing=True)
    sequential = build(tiny, verbalizer, prefix_sharing=False)  # MeZO: every forward runs every layer
    ids, lengths, labels = batch(splits["train"], slice(0, 4))
    gen = torch.Generator().manual_seed(3)
    b = torch.randn(batched.b_size, generator=gen) * 0.05  # [P]
    z = torch.randn(4, batched.b_size, generator=gen)  # [q, P]

    b_prge, loss_prge = prge_eager_step(batched, ids, lengths, labels, b, z, lr=0.5, eps=1e-2)
    b_mezo, loss_mezo = mezo_step(sequential, ids, lengths, labels, b, lambda i: z[i], q=4, lr=0.5, eps=1e-2)

    assert not torch.equal(b_prge, b)  # a real update, not a no-op
    torch.testing.assert_close(b_mezo, b_prge, atol=1e-5, rtol=0)
    assert loss_mezo == pytest.approx(loss_prge, rel=1e-5)


def test_prge_eager_and_mezo_runs_follow_the_same_trajectory(tiny, task_splits) -> None:
    splits, verbalizer = task_splits
    program = build(tiny, verbalizer)
    cfg = BaselineConfig(steps=3, eval_every=3, lr=0.5, test=False)
    prge = run_baseline("prge_eager", program, splits, cfg)
    mezo = run_baseline("mezo", program, splits, cfg)
    torch.testing.assert_close(mezo.b, prge.b, atol=1e-5, rtol=0)
    assert mezo.losses == pytest.approx(prge.losses, rel=1e-5)


def test_first_order_loss_decreases_on_a_fixed_batch(tiny, task_splits) -> None:
    splits, verbalizer = task_splits
    program = build(tiny, verbalizer)
    ids, lengths, labels = batch(splits["train"], slice(0, 8))
    b = torch.zeros(program.b_size, requires_grad=True)
    optimizer = torch.optim.AdamW([b], lr=1e-2, weight_decay=0.0)
    with frozen_weights(program):
        losses = [first_order_step(program, ids, lengths, labels, b, optimizer) for _ in range(8)]
        assert all(p.grad is None for p in program.parameters())  # the frozen weights got no gradient
    assert losses[-1] < losses[0] - 1e-3
    assert all(p.requires_grad for p in program.parameters())  # flags restored


@pytest.mark.parametrize("name", BASELINES)
def test_runner_returns_curves_and_accuracies(tiny, task_splits, name) -> None:
    splits, verbalizer = task_splits
    program = build(tiny, verbalizer)
    events: list[dict] = []
    result = run_baseline(name, program, splits, BaselineConfig(steps=5, eval_every=2, eval_batch_size=16),
                          on_event=events.append)
    assert len(result.losses) == len(result.step_seconds) == 5
    assert all(s > 0 for s in result.step_seconds)
    assert result.eval_steps == [0, 2, 4, 5]  # zero-shot, every 2 steps, and the last step
    assert len(result.eval_accuracy) == 4 and all(0 <= a <= 1 for a in result.eval_accuracy)
    assert result.test_accuracy is not None and 0 <= result.test_accuracy <= 1
    assert result.b.shape == (program.b_size,) and not result.b.requires_grad
    assert [e["kind"] for e in events].count("step") == 5 and events[-1]["kind"] == "test"
    assert result.config["batch_size"] == (8 if name == "first_order_lora" else 4)
    summary = result.summary()
    assert "b" not in summary and summary["train_seconds"] == pytest.approx(sum(result.step_seconds))


def test_median_class_bias_splits_the_training_prompts_evenly(tiny, task_splits) -> None:
    splits, verbalizer = task_splits
    program = build(tiny, verbalizer)
    train = splits["train"]
    bias = median_class_bias(program, train, limit=64)  # [C]
    with torch.no_grad():
        logits = program.class_logits(torch.as_tensor(train.input_ids), torch.as_tensor(train.lengths),
                                      torch.zeros(program.b_size))  # [64, C]
    predicted = (logits + bias).argmax(dim=1)
    assert bias.shape == (2,) and bias.sum().abs() < 1e-5
    assert abs(int(predicted.sum()) - 32) <= 1  # the median: half each way


def test_measure_step_seconds_is_positive(tiny, task_splits) -> None:
    splits, verbalizer = task_splits
    program = build(tiny, verbalizer)
    seconds = measure_step_seconds("mezo", program, splits["train"], steps=2, warmup=1)
    assert 0 < seconds < 10


def test_unknown_baseline_is_an_input_error(tiny, task_splits) -> None:
    splits, verbalizer = task_splits
    with pytest.raises(InputError, match="baseline 'sgd'"):
        run_baseline("sgd", build(tiny, verbalizer), splits)


def _allocate(megabytes: int) -> int:
    block = bytearray(megabytes * 1024 * 1024)
    block[::4096] = b"x" * len(block[::4096])  # touch every page so it is resident
    return len(block)


def test_peak_rss_is_measured_in_a_separate_process() -> None:
    peak = measure_peak_rss(_allocate, 200)
    assert peak.value == 200 * 1024 * 1024
    assert peak.bytes > 200 * 1024 * 1024  # the block, plus the interpreter
    with pytest.raises(RuntimeError, match="ValueError"):
        measure_peak_rss(int, "not a number")


def test_peak_rss_of_a_child_does_not_include_the_parents_peak() -> None:
    # prepare: the parent touches 400 MB (ru_maxrss would carry this into a spawned child)
    ballast = bytearray(400 * 1024 * 1024)
    ballast[::4096] = b"x" * len(ballast[::4096])
    # execute: a child that needs only 10 MB
    peak = measure_peak_rss(_allocate, 10)
    del ballast
    # assert
    assert peak.bytes < 300 * 1024 * 1024


def test_eager_training_job_runs_in_a_child(smollm2_conversion) -> None:
    job = EagerJob(method="first_order_lora", model="tiny", cache_dir=str(smollm2_conversion.cache_dir),
                   layers="top:1", seq_len=SEQ_LEN, steps=2, max_train_examples=16, threads=1)
    peak = measure_peak_rss(eager_training_job, job)
    assert len(peak.value["losses"]) == 2
    assert peak.bytes > 100 * 1024 * 1024  # torch alone is more than this
