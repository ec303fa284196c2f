"""`deftly dashboard`: bad input and a missing display are said in words, before any window."""
from __future__ import annotations

from desktop.cli import main


def test_without_a_display_the_dashboard_says_what_to_do_instead(monkeypatch, capsys) -> None:
    for name in ("QT_QPA_PLATFORM", "DISPLAY", "WAYLAND_DISPLAY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr("sys.platform", "linux")
    monkeypatch.setattr("PySide6.QtWidgets.QApplication.instance", staticmethod(lambda: None))
    assert main(["dashboard"]) == 2
    assert "no display to open the dashboard on" in capsys.readouterr().err


def test_a_replay_of_a_folder_without_metrics_is_refused_by_name(tmp_path, capsys) -> None:
    assert main(["dashboard", "--replay", str(tmp_path)]) == 2
    assert "no metrics.jsonl there" in capsys.readouterr().err
