"""The load bench behind `python benches/load.py` (see benches/load.py for the scenarios).

procs.py starts the processes (the fake upstream, `pwachat serve`), clients.py drives them (wrk and
this script's asyncio clients), scenarios.py measures, results.py records: the table and the JSON
result that benches/compare.py checks against benches/baseline.json.
"""
