"""The auditors' room: `fedllm audit` decides from the files alone whether every epsilon
claim of a run or a state store holds, and `fedllm audit canary` measures a lower bound.

    evidence.py    reading the files, dp-accounting's recomputation, how findings are kept
    chain.py       the ledger hash chain, re-derived from its written rule
    records.py     record-level reports and ledgers, and the run's privacy summary
    user.py        the user-level claim (the same events, `kind` "user-round")
    report.py      the table, report.md, report.html and plots
    canary.py      the canary statistics; canary_run.py runs the one-run canary audit

Nothing here imports the mechanism it audits (`fedllm.privacy`), the server or the client.
"""
