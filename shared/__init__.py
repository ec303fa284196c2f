"""What the desktop and the device agent share, all of it pure and small.

Today: the program manifest and its block layout (`manifest`, `blocks`), the
tokenised task files (`task_data`), content hashes and atomic writes
(`hashing`, `files`), the typed record codec and the training events
(`records`, `events`), and the planner with its inputs (`profiles`,
`fleet_io`, `costmodel`, `crunch`, `bandwidth`, `boundaries`,
`plan_baselines`, `planner`). The wire protocol will join them (issue 20).

Imports only the standard library and numpy (checked by
tests/test_import_rules.py): an agent on a board imports this package without
torch, Qt or transformers.
"""
