"""`cage demo`: three scripted agent missions on a throw-away repository, offline.

- :mod:`cage.demo.repository`: the demo repository (a real bug, its test, a mission policy);
- :mod:`cage.demo.agent`: the scripted stand-in agents (``python -m cage.demo.agent NAME``),
  standard library only, talking to the mock upstream through the metering proxy;
- :mod:`cage.demo.missions`: runs the three missions with ``cage mission run --mock`` and
  gathers verdicts, reasons and spend from the receipts and the demo's own ledger.

Nothing here is imported by ``cage --help``: the command module loads it inside ``run``.
"""
