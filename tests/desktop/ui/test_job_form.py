"""The job form: empty fields keep the defaults, typed ones are checked and named when wrong."""
from __future__ import annotations

import pytest

from desktop.engine.job import JobSpec
from desktop.ui.job_form import DEFAULT_LOCAL_STEPS, DEFAULT_ROUNDS, JobFields, JobForm, fields_from_job, job_from_fields
from shared.errors import InputError


def test_an_empty_form_is_the_exporters_defaults() -> None:
    choice = job_from_fields(JobFields(model="smollm2", task="rotten_tomatoes"))
    assert choice.job == JobSpec(model="smollm2", task="rotten_tomatoes")
    assert (choice.rounds, choice.local_steps) == (DEFAULT_ROUNDS, DEFAULT_LOCAL_STEPS)


def test_typed_settings_reach_the_job() -> None:
    choice = job_from_fields(JobFields(weights="int8", calibrate=False, rank="16", alpha="32", layers="top:4", q="2",
                                       eps="0.3", lr="0.2", bs="8", local_steps="15", rounds="3"))
    assert choice.job == JobSpec(weights="int8", calibrate="none", rank=16, alpha=32.0, layers="top:4", q=2, eps=0.3,
                                 lr=0.2, bs=8)
    assert (choice.rounds, choice.local_steps) == (3, 15)
    assert job_from_fields(fields_from_job(choice.job, 3, 15)) == choice  # the demo fills the form this way


@pytest.mark.parametrize("fields, message", [
    (JobFields(rank="eight"), "rank 'eight' is not a whole number"),
    (JobFields(q="0"), "q must be at least 1"),
    (JobFields(lr="-1"), "lr must be at least 0"),
    (JobFields(eps="0"), "eps must be positive"),
    (JobFields(weights="int4"), "weights 'int4'"),
    (JobFields(rounds="1.5"), "rounds '1.5' is not a whole number"),
])
def test_a_wrong_field_is_named(fields: JobFields, message: str) -> None:
    with pytest.raises(InputError, match=message):
        job_from_fields(fields)


def test_the_form_shows_its_problem_under_it_instead_of_a_dialog(qtbot) -> None:
    form = JobForm()
    qtbot.addWidget(form)
    form.text["batch"].setText("four")
    assert form.choice() is None
    assert "batch 'four' is not a whole number" in form.problem.text() and not form.problem.isHidden()
    form.text["batch"].setText("4")
    assert form.choice().job.bs == 4 and form.problem.isHidden()
