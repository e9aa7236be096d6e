"""``sparsekern bench --out``: a path that cannot be a writable folder is refused before any benchmark
runs (for the ops suite and ``--patching``), and a missing folder is created up front."""

from __future__ import annotations

import pytest

from sparsekern import cli


@pytest.mark.parametrize("patching", [False, True])
def test_bench_out_checked_before_running(tmp_path, monkeypatch, patching):
    import sparsekern.bench.patching as bench_patching
    from sparsekern.bench import suite

    def must_not_run(*a, **kw):
        raise AssertionError("benchmark started")

    monkeypatch.setattr(suite, "run_suite", must_not_run)
    monkeypatch.setattr(bench_patching, "main", must_not_run)
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    extra = ["--patching"] if patching else []
    for out in (blocker, blocker / "sub"):
        with pytest.raises(SystemExit, match=f"--out '{out}' must be a folder.*writable.*nothing was run"):
            cli.main(["bench", "--quick", "--no-progress", *extra, "--out", str(out)])
    # a missing folder is created up front (and then the run starts)
    new = tmp_path / "new" / "results"
    with pytest.raises(AssertionError, match="benchmark started"):
        cli.main(["bench", "--quick", "--no-progress", *extra, "--out", str(new)])
    assert new.is_dir() and list(new.iterdir()) == []
