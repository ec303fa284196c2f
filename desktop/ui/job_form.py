"""The job form: model, task, fp32 / int8, LoRA rank and alpha, layers, q, eps, lr, batch, local steps, rounds.

Every field may be left empty, which means the exporter's (or the engine's)
default; what is typed is read by :func:`job_from_fields`, which names the
field at fault in an ``InputError`` (shown under the form, never a dialog).
"""
from __future__ import annotations

from dataclasses import dataclass

from PySide6.QtCore import Signal
from PySide6.QtWidgets import QCheckBox, QComboBox, QFileDialog, QGridLayout, QLabel, QLineEdit, QPushButton, QWidget

from desktop.engine.job import WEIGHTS, JobSpec
from shared.errors import InputError

EMBEDDED_MODEL = "smollm2"
EMBEDDED_TASK = "rotten_tomatoes"


@dataclass(frozen=True)
class JobFields:
    """The form's text, one string per field ("" = default)."""

    model: str = ""
    task: str = ""
    weights: str = ""
    calibrate: bool = True
    rank: str = ""
    alpha: str = ""
    layers: str = ""
    q: str = ""
    eps: str = ""
    lr: str = ""
    bs: str = ""
    local_steps: str = ""
    rounds: str = ""


@dataclass(frozen=True)
class RunChoice:
    """What the form asks the engine to run."""

    job: JobSpec
    rounds: int
    local_steps: int


DEFAULT_ROUNDS = 5
DEFAULT_LOCAL_STEPS = 10


def _number(text: str, name: str, kind: type, minimum: float | None = None):
    text = text.strip()
    if not text:
        return None
    try:
        value = kind(text)
    except ValueError:
        raise InputError(f"job form: {name} {text!r} is not {'a whole number' if kind is int else 'a number'}") from None
    if minimum is not None and value < minimum:
        raise InputError(f"job form: {name} must be at least {minimum:g}, got {text}")
    return value


def job_from_fields(form: JobFields) -> RunChoice:
    """The job and run settings the form's text describes.

    Raises:
        InputError: naming the field whose text is not a valid value.
    """
    weights = form.weights.strip() or None
    if weights is not None and weights not in WEIGHTS:
        raise InputError(f"job form: weights {weights!r}, expected one of {', '.join(WEIGHTS)}")
    job = JobSpec(
        model=form.model.strip() or None, task=form.task.strip() or None, layers=form.layers.strip() or None,
        q=_number(form.q, "q", int, 1), bs=_number(form.bs, "batch", int, 1), rank=_number(form.rank, "rank", int, 1),
        alpha=_number(form.alpha, "alpha", float), weights=weights, lr=_number(form.lr, "lr", float, 0),
        eps=_number(form.eps, "eps", float), calibrate=None if form.calibrate else "none")
    job.check("job form")
    rounds = _number(form.rounds, "rounds", int, 1) or DEFAULT_ROUNDS
    local_steps = _number(form.local_steps, "local steps", int, 1) or DEFAULT_LOCAL_STEPS
    return RunChoice(job, rounds, local_steps)


def fields_from_job(job: JobSpec, rounds: int, local_steps: int) -> JobFields:
    """The form's text for a job (so the demo shows the settings it runs with)."""
    def text(value) -> str:
        return "" if value is None else f"{value:g}" if isinstance(value, float) else str(value)

    return JobFields(model=text(job.model), task=text(job.task), weights=text(job.weights),
                     calibrate=job.calibrate != "none", rank=text(job.rank), alpha=text(job.alpha),
                     layers=text(job.layers), q=text(job.q), eps=text(job.eps), lr=text(job.lr), bs=text(job.bs),
                     local_steps=str(local_steps), rounds=str(rounds))


class JobForm(QWidget):
    """The form; :meth:`choice` reads it."""

    changed = Signal()

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.model = QComboBox()
        self.model.setEditable(True)
        self.model.addItem(f"{EMBEDDED_MODEL}  (SmolLM2-135M, embedded)", EMBEDDED_MODEL)
        self.task = QComboBox()
        self.task.setEditable(True)
        self.task.addItem(f"{EMBEDDED_TASK}  (embedded)", EMBEDDED_TASK)
        self.weights = QComboBox()
        self.weights.addItems(list(WEIGHTS))
        self.calibrate = QCheckBox("calibrated start")
        self.calibrate.setChecked(True)
        self.calibrate.setToolTip("The exporter measures a per-class logit bias on training prompts, so training "
                                  "starts from the model's calibrated zero-shot accuracy. Unticked, training starts "
                                  "from the raw model and its curve shows more of the learning.")
        self.text: dict[str, QLineEdit] = {}
        grid = QGridLayout(self)
        grid.setContentsMargins(0, 0, 0, 0)
        grid.setHorizontalSpacing(6)
        grid.setVerticalSpacing(3)
        browse_model = QPushButton("Folder…")
        browse_model.clicked.connect(self._browse_model)
        browse_task = QPushButton("File…")
        browse_task.clicked.connect(self._browse_task)
        grid.addWidget(QLabel("model"), 0, 0)
        grid.addWidget(self.model, 0, 1, 1, 2)
        grid.addWidget(browse_model, 0, 3)
        grid.addWidget(QLabel("task"), 1, 0)
        grid.addWidget(self.task, 1, 1, 1, 2)
        grid.addWidget(browse_task, 1, 3)
        grid.addWidget(QLabel("weights"), 2, 0)
        grid.addWidget(self.weights, 2, 1)
        grid.addWidget(self.calibrate, 2, 2, 1, 2)
        # Two fields a row: the form must leave the device cards room.
        hints = {"layers": "top:8", "rank": "8", "alpha": "16", "q": "4", "batch": "4", "eps": "program's",
                 "lr": "program's", "local steps": str(DEFAULT_LOCAL_STEPS), "rounds": str(DEFAULT_ROUNDS)}
        for i, (name, hint) in enumerate(hints.items()):
            edit = self.text[name] = QLineEdit()
            edit.setPlaceholderText(hint)
            edit.setToolTip(f"{name}: empty = the default ({hint})")
            edit.textChanged.connect(self.changed)
            row, col = 3 + i // 2, (i % 2) * 2
            grid.addWidget(QLabel(name), row, col)
            grid.addWidget(edit, row, col + 1)
        self.problem = QLabel()
        self.problem.setWordWrap(True)
        self.problem.setStyleSheet("color:#a1120b")
        self.problem.hide()
        grid.addWidget(self.problem, 3 + (len(hints) + 1) // 2, 0, 1, 4)

    def _browse_model(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "A Hugging Face model folder")
        if folder:
            self.model.setEditText(folder)

    def _browse_task(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "A task file", filter="Task (*.toml)")
        if path:
            self.task.setEditText(path)

    def _combo_value(self, combo: QComboBox) -> str:
        index = combo.findText(combo.currentText())
        return combo.itemData(index) if index >= 0 and combo.itemData(index) else combo.currentText().strip()

    def fields(self) -> JobFields:
        t = {name: edit.text() for name, edit in self.text.items()}
        return JobFields(model=self._combo_value(self.model), task=self._combo_value(self.task),
                         weights=self.weights.currentText(), calibrate=self.calibrate.isChecked(),
                         rank=t["rank"], alpha=t["alpha"], layers=t["layers"], q=t["q"], eps=t["eps"], lr=t["lr"],
                         bs=t["batch"], local_steps=t["local steps"], rounds=t["rounds"])

    def set_fields(self, values: JobFields) -> None:
        for combo, value in ((self.model, values.model), (self.task, values.task)):
            index = combo.findData(value) if value else 0
            if index >= 0:
                combo.setCurrentIndex(index)
            else:
                combo.setEditText(value)
        self.weights.setCurrentText(values.weights or WEIGHTS[0])
        self.calibrate.setChecked(values.calibrate)
        names = {"rank": values.rank, "alpha": values.alpha, "layers": values.layers, "q": values.q,
                 "eps": values.eps, "lr": values.lr, "batch": values.bs, "local steps": values.local_steps,
                 "rounds": values.rounds}
        for name, value in names.items():
            self.text[name].setText(value)

    def choice(self) -> RunChoice | None:
        """The job as typed, or None with the problem shown under the form."""
        try:
            choice = job_from_fields(self.fields())
        except InputError as exc:
            self.problem.setText(str(exc))
            self.problem.show()
            return None
        self.problem.hide()
        return choice

    def set_locked(self, locked: bool) -> None:
        """Grey the form out while a run uses it (a job cannot change mid-run)."""
        for child in self.findChildren(QWidget):
            if child is not self.problem:
                child.setEnabled(not locked)

