"""The dashboard: PySide6 + pyqtgraph views of the fleet engine (the only package that imports Qt).

The engine (``desktop.engine``) runs on its own thread and asyncio loop; its events
reach the GUI thread in batches (``bridge``), go into a mirror of its state
(``model``), and each view redraws what changed on its own timer: the device cards
(``devices``), the job form (``job_form``), the plan (``plan_view``), the live plots
(``live``), the phases, export progress and results (``progress``), all in one
window (``window``). ``replay`` plays a recorded run through the same views;
``app`` starts and closes it all; ``screenshots`` draws each step of the flow.
"""
