"""The one runner behind every ``sparsekern bench`` suite (sparsekern/bench/runner.py) and its table, on a
toy suite: metadata, per-case error capture, the result files, the exit status, the options it applies."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from sparsekern import backends
from sparsekern.bench import runner
from sparsekern.bench import table as tb

CPU = torch.device("cpu")
COLUMNS = ("case", "value", "status", "note", "info")
TABLE = (tb.text("case", "case"), tb.num("value", "value", ".2f"), tb.MET)


def _toy(jobs, **kw) -> runner.Suite:
    return runner.Suite(name="toy", cases=("a", "b", "c"), columns=COLUMNS, table=TABLE, jobs=jobs,
                        settings=lambda opts: {"seed": opts.seed}, **kw)


def _boom() -> list[dict]:
    raise ValueError("boom")


def _jobs(opts: runner.Options):
    rows = {"a": lambda: [{"case": "a", "value": 1.5, "status": "ok", "target_met": True}],
            "b": _boom,
            "c": lambda: [{"case": "c", "value": 2.0, "status": "mismatch", "note": "differs"}]}
    return [runner.Job(c, rows[c], {"case": c, "info": {"k": 1}}) for c in _toy(None).selected(opts)]


def test_a_failing_case_becomes_an_error_row_and_the_run_goes_on(tmp_path, capsys):
    opts = runner.Options(device=CPU, quick=True, out=str(tmp_path), progress=False, seed=5)
    assert runner.run(_toy(_jobs), opts) == 1  # an error and a mismatch fail the run
    doc = json.loads((tmp_path / "latest-toy-quick.json").read_text())
    (stamped,) = tmp_path.glob("toy-quick-*.json")
    assert json.loads(stamped.read_text()) == doc
    assert doc["schema"] == 1 and doc["suite"] == "toy-quick" and doc["settings"] == {"seed": 5}
    assert doc["elapsed_s"] >= 0 and "loadavg_after" in doc and doc["machine"]["device"] == "cpu"
    a, b, c = doc["rows"]
    assert a["status"] == "ok" and c["status"] == "mismatch"
    assert b["case"] == "b" and b["status"] == "error" and b["note"] == "ValueError: boom"
    assert b["info"]["k"] == 1 and "test_bench_runner.py" in b["info"]["at"]  # where it was raised
    with open(stamped.with_suffix(".csv"), newline="") as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == list(COLUMNS) and [r["status"] for r in table] == ["ok", "error", "mismatch"]
    out = capsys.readouterr().out
    assert "sparsekern bench toy (toy-quick) on cpu" in out
    assert "ERROR" in out and "MISMATCH" in out and "row 2: ValueError: boom" in out
    assert runner.QUICK_NOTE in out and "latest-toy-quick.json" in out


def test_selected_cases_only_and_a_clean_run_passes(tmp_path):
    opts = runner.Options(device=CPU, out=str(tmp_path), progress=False, cases=("a",))
    assert runner.run(_toy(_jobs), opts) == 0
    doc = json.loads((tmp_path / "latest-toy.json").read_text())
    assert doc["suite"] == "toy" and [r["case"] for r in doc["rows"]] == ["a"]


def test_setup_failure_is_recorded_not_raised(tmp_path):
    def jobs(opts):
        yield runner.Job("a", lambda: [{"case": "a", "status": "ok"}], {"case": "a"})
        raise RuntimeError("no model")

    opts = runner.Options(device=CPU, out=str(tmp_path), progress=False)
    assert runner.run(_toy(jobs), opts) == 1
    rows = json.loads((tmp_path / "latest-toy.json").read_text())["rows"]
    assert [(r["case"], r["status"]) for r in rows] == [("a", "ok"), ("setup", "error")]
    assert rows[1]["note"] == "RuntimeError: no model"


def test_check_refuses_unknown_cases_and_other_devices():
    suite = _toy(_jobs, cpu_only="CPU processes only")
    runner.check(suite, runner.Options(device=CPU, cases=("c", "a")))
    with pytest.raises(runner.SuiteError, match=r"unknown case\(s\) \['x'\]; choose from a,b,c"):
        runner.check(suite, runner.Options(device=CPU, cases=("a", "x")))
    with pytest.raises(runner.SuiteError, match="CPU processes only"):
        runner.check(suite, runner.Options(device=torch.device("cuda")))  # a device object needs no GPU
    with pytest.raises(runner.SuiteError, match="unknown case"):
        runner.run(suite, runner.Options(device=CPU, cases=("x",)))  # before anything runs or is written


def test_backend_and_threads_apply_during_the_run_only(tmp_path):
    seen = {}

    def jobs(opts):
        def job():
            seen.update(backend=backends.forced_backend(), threads=torch.get_num_threads())
            return [{"case": "a", "status": "ok"}]

        return [runner.Job("a", job, {"case": "a"})]

    before = torch.get_num_threads()
    opts = runner.Options(device=CPU, out=str(tmp_path), progress=False, backend="ref", threads=1)
    assert runner.run(_toy(jobs), opts) == 0
    assert seen == {"backend": "ref", "threads": 1}
    assert torch.get_num_threads() == before and backends.forced_backend() != "ref"
    machine = json.loads((tmp_path / "latest-toy.json").read_text())["machine"]
    assert machine["forced_backend"] == "ref"


def test_table_numbers_rows_aligns_numbers_and_lists_notes_once():
    rows = [{"case": "a", "value": 1.5, "status": "ok", "target_met": True, "note": "n1"},
            {"case": "bb", "value": 12.25, "status": "ok", "target_met": False, "note": "n1"},
            {"case": "c", "status": "ok", "note": "n2"},
            {"case": "d", "value": "text", "status": "skipped"}]
    lines = tb.format_table(rows, TABLE).splitlines()
    assert lines[0].split() == ["#", "case", "value", "met"] and set(lines[1]) == {"-", " "}
    assert lines[2].split() == ["1", "a", "1.50", "yes"] and lines[3].split() == ["2", "bb", "12.25", "NO"]
    assert lines[4].split() == ["3", "c", "-", "-"] and lines[5].split() == ["4", "d", "-", "SKIPPED"]
    assert lines[2].index("1.50") + 4 == lines[3].index("12.25") + 5  # right-aligned
    assert lines[6:] == ["notes:", "  rows 1-2: n1", "  row 3: n2"]
    assert tb.row_lines(rows[2:3], TABLE, first=7)[0].split() == ["7", "c", "-", "-"]
    assert tb.times(None) == "-" and tb.times(2.345) == "2.35x" and tb.times(12.34) == "12.3x"
