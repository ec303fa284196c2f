"""The eager baselines: MeZO and P-RGE eager are one estimator, first-order LoRA learns, the runner's curves,
and the twins share the trainer's directions, schedules, default lr and empty-split accuracy."""
from __future__ import annotations

import math

import pytest
import torch

from desktop.bench.baselines import (
    BASELINES,
    FIRST_ORDER_LR,
    BaselineConfig,
    EagerJob,
    _Batches,
    eager_training_job,
    evaluate,
    first_order_step,
    frozen_weights,
    measure_peak_rss,
    mezo_step,
    prge_eager_step,
    run_baseline,
)
from device_agent.trainer import SCHEDULES, draw_z, initial_rng_state, lr_at
from export.lora import AdapterTensors, LoraFaConfig
from export.models import tiny_llama
from export.prge import PrgeConfig, PrgeProgram
from export.program import DEFAULT_LR
from shared.tasks import encode_split, load_examples, load_task_spec, verbalizer_token_ids
from shared.errors import InputError
from shared.events import Eval, Step, Test

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

    b_prge, loss_prge, g_prge = prge_eager_step(batched, ids, lengths, labels, b, z, lr=0.5, eps=1e-2)
    b_mezo, loss_mezo, g_mezo = mezo_step(sequential, ids, lengths, labels, b, lambda i: z[i], q=4, lr=0.5, eps=1e-2)

    assert not torch.equal(b_prge, b)  # a real update, not a no-op
    torch.testing.assert_close(b_mezo, b_prge, atol=1e-5, rtol=0)
    assert loss_mezo == pytest.approx(loss_prge, rel=1e-5)
    torch.testing.assert_close(g_mezo, g_prge.float(), atol=1e-3, rtol=1e-3)


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
    events: list = []
    result = run_baseline(name, program, splits, BaselineConfig(steps=5, eval_every=2, eval_batch_size=16),
                          on_event=events.append)
    assert len(result.losses) == len(result.step_seconds) == 5
    assert all(s > 0 for s in result.step_seconds)
    assert result.eval_steps == [0, 2, 4, 5]  # zero-shot, every 2 steps, and the last step
    assert len(result.eval_accuracy) == 4 and all(0 <= a <= 1 for a in result.eval_accuracy)
    assert result.test_accuracy is not None and 0 <= result.test_accuracy <= 1
    assert result.b.shape == (program.b_size,) and not result.b.requires_grad
    assert result.config["batch_size"] == (8 if name == "first_order_lora" else 4)
    summary = result.summary()
    assert "b" not in summary and summary["train_seconds"] == pytest.approx(sum(result.step_seconds))
    # the events are the trainer's records, and say what the result says
    steps = [e for e in events if isinstance(e, Step)]
    assert [e.step for e in steps] == [1, 2, 3, 4, 5] and [e.loss for e in steps] == result.losses
    assert all(e.seq_len == SEQ_LEN and e.rss_mb > 0 and e.peak_rss_mb >= e.rss_mb for e in steps)
    assert all(math.isnan(e.g_abs_mean) for e in steps) == (name == "first_order_lora")
    evals = [e for e in events if isinstance(e, Eval)]
    assert [(e.step, e.accuracy, e.examples) for e in evals] == [(s, a, 24) for s, a in
                                                                 zip(result.eval_steps, result.eval_accuracy)]
    assert isinstance(events[-1], Test) and events[-1].accuracy == result.test_accuracy and events[-1].examples == 20


def test_unknown_baseline_or_schedule_is_an_input_error(tiny, task_splits) -> None:
    splits, verbalizer = task_splits
    with pytest.raises(InputError, match="baseline 'sgd'"):
        run_baseline("sgd", build(tiny, verbalizer), splits)
    with pytest.raises(InputError, match="schedule 'step'"):
        run_baseline("mezo", build(tiny, verbalizer), splits, BaselineConfig(schedule="step"))


# -- what the eager twins share with the ExecuTorch trainer ---------------------------


def test_prge_eager_draws_the_trainers_directions(tiny, task_splits) -> None:
    # prepare: the first batch the runner will take, and the z `deftly train --seed 3` draws first
    splits, verbalizer = task_splits
    program = build(tiny, verbalizer)
    cfg = BaselineConfig(steps=1, eval_every=1, eval_limit=1, test=False, seed=3)
    batch = _Batches(splits["train"], 4, cfg.seed).next()
    z, _ = draw_z(initial_rng_state(3), cfg.q, program.b_size)
    # execute
    result = run_baseline("prge_eager", program, splits, cfg)
    # assert: one step with exactly that z
    expected, _, _ = prge_eager_step(program, *batch, torch.zeros(program.b_size), torch.from_numpy(z),
                                     DEFAULT_LR["fp32"], cfg.eps)
    torch.testing.assert_close(result.b, expected, atol=0, rtol=0)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_the_schedules_are_the_trainers(tiny, task_splits, schedule: str) -> None:
    splits, verbalizer = task_splits
    events: list = []
    run_baseline("mezo", build(tiny, verbalizer), splits,
                 BaselineConfig(steps=4, eval_every=4, eval_limit=1, test=False, schedule=schedule, lr=0.2),
                 on_event=events.append)
    lrs = [e.lr for e in events if isinstance(e, Step)]
    assert lrs == [lr_at(t, 0.2, schedule, 4) for t in range(4)]  # linear decays to 0, as `deftly train`'s


def test_the_default_learning_rates() -> None:
    cfg = BaselineConfig()
    assert cfg.resolved_lr("prge_eager") == cfg.resolved_lr("mezo") == DEFAULT_LR["fp32"]
    assert cfg.resolved_lr("first_order_lora") == FIRST_ORDER_LR
    assert BaselineConfig(lr=0.3).resolved_lr("mezo") == 0.3


def test_accuracy_on_an_empty_split_is_nan(tiny, task_splits) -> None:
    splits, verbalizer = task_splits
    program = build(tiny, verbalizer)
    assert math.isnan(evaluate(program, splits["validation"], torch.zeros(program.b_size), limit=0))


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
